"""Seen request nonces (coordinator/auth.py's replay check), in their own sqlite file next to the ledger."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

from coordinator.books import schema
from coordinator.books.store import SqliteStore

PRUNE_EVERY = 60.0  # seconds between deletions of nonces too old to matter
NONCE_FILE = "nonces.sqlite"


class NonceStore(SqliteStore):
    """Nonces seen within the clock window, in a sqlite file next to the ledger: a second use of one is
    a replay, also after a coordinator restart (a Join captured before it cannot be replayed after).

    One indexed insert per request. The file is not the books: it uses ``synchronous=NORMAL`` (WAL),
    which survives a killed process, the restart that matters here, without an fsync per request.
    Entries older than twice the window are pruned now and then; their requests fail the clock check.
    """

    MIGRATIONS = schema.NONCES

    def __init__(self, path: Path, window: float):
        super().__init__(path)
        self.window = window
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._next_prune = 0.0

    def add(self, key: bytes, nonce: str, now: float) -> bool:
        """Remember (key, nonce); False when it was already seen."""
        digest = hashlib.sha256(key + b"\0" + nonce.encode()).digest()[:20]
        with self._lock:
            try:
                self._db.execute("INSERT INTO seen_nonces VALUES (?, ?)", (digest, now))
            except sqlite3.IntegrityError:
                return False
            if now >= self._next_prune:
                self._next_prune = now + PRUNE_EVERY
                self._db.execute("DELETE FROM seen_nonces WHERE at < ?", (now - 2 * self.window,))
        return True
