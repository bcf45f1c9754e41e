"""One durable sqlite connection shared by a process's threads: the plumbing of the ledger's stores.

WAL, ``synchronous=FULL`` and one ``BEGIN IMMEDIATE`` transaction per change, so what a store
acknowledged survives ``kill -9`` and a power cut (liveness alone skips the fsync: ``_write(durable=False)``); several processes (serve, the auditor, the CLIs) open one file.
Opening a store brings its file to the schema version of ``MIGRATIONS`` (coordinator/books/schema.py).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path

from coordinator.books.schema import migrate


class SqliteStore:
    MIGRATIONS: tuple = ()  # the file's schema steps (schema.LEDGER for the ledger file); none: a bare store

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        if self.MIGRATIONS:
            try:
                migrate(self._db, self.MIGRATIONS, self.path)
            except BaseException:
                self._db.close()
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self, durable: bool = True):
        """One IMMEDIATE transaction: committed when the block ends, rolled back on any exception.

        ``durable=False`` is for what may be lost with the machine's power but not with the process
        (a heartbeat's liveness): its commit skips the fsync (WAL, ``synchronous=NORMAL``), the next
        durable commit syncs it too. A kill -9 of the process loses nothing either way."""
        with self._lock:
            if not durable:
                self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if not durable:
                    self._db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _snapshot(self):
        """One read transaction: every read in the block sees the same committed state, however many
        commits other processes make meanwhile (a check across tables read one by one saw a row of
        one table whose partner row in another was committed after that table was read)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("ROLLBACK")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()
