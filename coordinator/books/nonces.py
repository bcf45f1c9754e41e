"""Seen request nonces (coordinator/auth.py's replay check), in their own sqlite file next to the ledger."""

from __future__ import annotations

import hashlib

from coordinator.books import schema
from coordinator.books.store import Store

PRUNE_EVERY = 60.0  # seconds between deletions of nonces too old to matter
NONCE_FILE = "nonces.sqlite"


class NonceStore(Store):
    """Nonces seen within the clock window, in a sqlite file next to the ledger: a second use of one is
    a replay, also after a coordinator restart (a Join captured before it cannot be replayed after).

    One indexed insert per request. The file is not the books: it uses ``synchronous=NORMAL`` (WAL),
    which survives a killed process, the restart that matters here, without an fsync per request.
    Entries older than twice the window are pruned now and then; their requests fail the clock check.
    """

    MIGRATIONS = schema.NONCES

    def __init__(self, target, window: float):
        """``target``: the nonce file's path, or the books' postgresql:// URL (a table of its own there)."""
        super().__init__(target)
        self.window = window
        self._conn.relax_durability()
        self._next_prune = 0.0

    def add(self, key: bytes, nonce: str, now: float) -> bool:
        """Remember (key, nonce); False when it was already seen."""
        digest = hashlib.sha256(key + b"\0" + nonce.encode()).digest()[:20]
        with self._lock:
            if not self._db.execute("INSERT INTO seen_nonces VALUES (?, ?) ON CONFLICT DO NOTHING",
                                    (digest, now)).rowcount:
                return False
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY
                self._db.execute("DELETE FROM seen_nonces WHERE at < ?", (now - 2 * self.window,))
        return True
