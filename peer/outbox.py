"""A durable outbox: reports are written to disk before they are sent, and kept until acknowledged.

A report survives a crash of either side: the peer resends whatever was not acknowledged, and the
coordinator treats a resent report id as the same report. A report carries what it read of the
peer's local logs (attestation records); the read position is stored in the same transaction as the
report, so each record travels in exactly one report, even across a crash.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

OUTBOX_FILE = "outbox.sqlite"


class Outbox:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(Path(data_dir) / OUTBOX_FILE, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (report_id TEXT PRIMARY KEY, created REAL NOT NULL, "
            "payload BLOB NOT NULL, acked REAL, error TEXT) STRICT"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS cursors (name TEXT PRIMARY KEY, position INTEGER NOT NULL) STRICT")

    def put(self, report_id: str, payload: bytes, cursors: dict[str, int] | None = None) -> None:
        """Store a report and, in the same transaction, how far it read each local log (``cursors``)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, NULL, NULL)",
                                 (report_id, time.time(), payload))
                for name, position in (cursors or {}).items():
                    self._db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (name, position))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def cursor(self, name: str) -> int:
        """How far the reports stored so far have read the local log ``name`` (0: nothing yet)."""
        with self._lock:
            row = self._db.execute("SELECT position FROM cursors WHERE name=?", (name,)).fetchone()
        return row[0] if row else 0

    def pending(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return self._db.execute(
                "SELECT report_id, payload FROM outbox WHERE acked IS NULL ORDER BY created"
            ).fetchall()

    def mark_acked(self, report_id: str, error: str | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE outbox SET acked=?, error=? WHERE report_id=?", (time.time(), error, report_id))

    def acked_ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT report_id FROM outbox WHERE acked IS NOT NULL AND error IS NULL")]

    def close(self) -> None:
        with self._lock:
            self._db.close()
