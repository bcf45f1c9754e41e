"""One durable connection to the books shared by a process's threads: the plumbing of their stores.

The books live in a sqlite file (the default) or a PostgreSQL database (``--store postgresql://...``);
coordinator/books/connection.py holds what differs. On sqlite: WAL, ``synchronous=FULL`` and one
``BEGIN IMMEDIATE`` transaction per change, so what a store acknowledged survives ``kill -9`` and a
power cut (liveness alone skips the fsync: ``_write(durable=False)``); several processes (serve, the
auditor, the CLIs) open one file. On PostgreSQL every write transaction holds one advisory lock, so
writers queue the same way. Opening a store brings it to the schema version of ``MIGRATIONS``
(coordinator/books/schema.py).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

from coordinator.books import connection
from coordinator.books.schema import migrate


class Store:
    MIGRATIONS = None  # the schema (schema.LEDGER for the books); None: a bare store

    def __init__(self, target):
        """``target``: a sqlite file's path, or a postgresql:// URL."""
        self._lock = threading.Lock()
        self._conn = connection.connect(target)
        self.target = target if connection.is_url(target) else Path(target)
        self.path = None if connection.is_url(target) else Path(target)  # the sqlite file, if that is the store
        self.dialect = self._conn.dialect
        self._db = self._conn.db
        self._greatest = connection.greatest(self.dialect)
        if self.MIGRATIONS is not None:
            try:
                migrate(self._conn, self.MIGRATIONS)
            except BaseException:
                self._conn.close()
                raise

    def describe(self) -> str:
        """Where the books are, for messages (a URL without its password)."""
        return self._conn.describe()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self, durable: bool = True):
        """One write transaction: committed when the block ends, rolled back on any exception.

        ``durable=False`` is for what may be lost with the machine's power but not with the process
        (a heartbeat's liveness): its commit skips the fsync (sqlite: WAL, ``synchronous=NORMAL``, the
        next durable commit syncs it too; PostgreSQL: ``synchronous_commit=off``). A kill -9 of the
        process loses nothing either way."""
        with self._lock:
            self._conn.begin(durable)
            try:
                try:
                    yield self._db
                except BaseException:
                    self._conn.rollback()
                    raise
                self._conn.commit()
            finally:
                self._conn.end(durable)

    @contextmanager
    def _snapshot(self):
        """One read transaction: every read in the block sees the same committed state, however many
        commits other processes make meanwhile (a check across tables read one by one saw a row of
        one table whose partner row in another was committed after that table was read)."""
        with self._lock:
            self._conn.begin_snapshot()
            try:
                yield self._db
            finally:
                self._conn.rollback()

    def _read(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _tuples(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Rows as plain tuples: cheaper where a read returns thousands of them."""
        with self._lock:
            return self._conn.tuples(sql, args)


SqliteStore = Store  # the name the books' stores knew it by
