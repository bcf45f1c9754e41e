"""``python -m benchmarks.nonce_store``: what remembering nonces across restarts costs per request.

Compares the former in-memory check (a dict insert under a lock) with coordinator.auth.NonceStore
(one insert into a WITHOUT ROWID sqlite table, WAL, synchronous=NORMAL), on a table that already
holds entries, in microseconds per request. A signed RPC's Ed25519 check alone is measured beside
them for scale.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from coordinator.auth import CLOCK_WINDOW
from coordinator.books.nonces import NonceStore

REQUESTS = 20_000


def per_request_us(add, nonces: list[str], keys: list[bytes]) -> float:
    started = time.perf_counter()
    for index, nonce in enumerate(nonces):
        add(keys[index % len(keys)], nonce, time.time())
    return (time.perf_counter() - started) / len(nonces) * 1e6


def main() -> None:
    keys = [secrets.token_bytes(32) for _ in range(50)]
    nonces = [secrets.token_hex(16) for _ in range(REQUESTS)]
    seen, lock = {}, threading.Lock()

    def in_memory(key, nonce, now):
        with lock:
            if key.hex() + nonce in seen:
                return False
            seen[key.hex() + nonce] = now
            return True

    with tempfile.TemporaryDirectory() as folder:
        store = NonceStore(Path(folder) / "nonces.sqlite", CLOCK_WINDOW)
        for index in range(5_000):  # a table that already holds a busy window's worth
            store.add(keys[0], f"warm-{index}", time.time())
        sqlite_us = per_request_us(store.add, nonces, keys)
        store.close()
    memory_us = per_request_us(in_memory, nonces, keys)
    key = Ed25519PrivateKey.generate()
    message, signature = b"x" * 200, key.sign(b"x" * 200)
    started = time.perf_counter()
    for _ in range(2_000):
        key.public_key().verify(signature, message)
    verify_us = (time.perf_counter() - started) / 2_000 * 1e6
    print(f"nonce check per request: in memory {memory_us:.1f} us, sqlite NonceStore {sqlite_us:.1f} us "
          f"(an Ed25519 signature check: {verify_us:.1f} us)")


if __name__ == "__main__":
    main()
