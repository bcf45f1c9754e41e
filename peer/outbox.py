"""A durable outbox: reports are written to disk before they are sent, and kept until acknowledged.

A report survives a crash of either side: the peer resends whatever was not acknowledged, and the
coordinator treats a resent report id as the same report.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

OUTBOX_FILE = "outbox.sqlite"


class Outbox:
    def __init__(self, data_dir: Path):
        self._lock = threading.Lock()
        self._db = sqlite3.connect(Path(data_dir) / OUTBOX_FILE, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (report_id TEXT PRIMARY KEY, created REAL NOT NULL, "
            "payload BLOB NOT NULL, acked REAL, error TEXT) STRICT"
        )

    def put(self, report_id: str, payload: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, NULL, NULL)", (report_id, time.time(), payload))

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
