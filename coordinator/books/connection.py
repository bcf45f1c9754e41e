"""Where the books live: an embedded sqlite file (the default) or a PostgreSQL database (``--store``).

The stores write their SQL once, in sqlite's spelling with a few portable habits (``?`` placeholders,
``ON CONFLICT`` upserts, ``"window"`` quoted, subqueries named) and the helpers below where the two
differ (``put_meta``, ``greatest``, ``json_number``); this layer is the rest:

- sqlite: the books get the ``sqlite3`` connection itself, exactly as before (WAL, ``synchronous=FULL``,
  ``BEGIN IMMEDIATE`` per write, the schema version in ``PRAGMA user_version``).
- PostgreSQL: a thin wrapper turns ``?`` into ``%s``; a write transaction takes one advisory lock, so
  writers queue as under sqlite's ``BEGIN IMMEDIATE`` (every read-then-write of the books stays
  serial, across processes); a snapshot is ``REPEATABLE READ``; the schema versions sit in the
  ``schema_versions`` table; a non-durable commit is ``synchronous_commit = off``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from peer.errors import UserError

SCHEMES = ("postgresql", "postgres")
# --store of every coordinator command; serve hands it to its auditor and observer this way (not in argv,
# where a password in the URL would show in the process list)
STORE_ENV = "POTLUCK_COORDINATOR_STORE"
WRITE_LOCK = 0x706F746C  # the advisory lock every write transaction of the books holds ("potl")


def is_url(target) -> bool:
    """A URL (checked by ``check_url`` when connecting); a Path or plain string is a sqlite file."""
    return isinstance(target, str) and "://" in target


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def check_url(url: str) -> str:
    """A ``--store`` URL as given, or a clear UserError: postgresql://USER@HOST:PORT/DB."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UserError(f"--store {redacted(url)!r}: {error}; expected postgresql://USER@HOST:PORT/DB") from None
    if parts.scheme not in SCHEMES or not parts.hostname or not unquote(parts.path.lstrip("/")) or \
            "/" in parts.path.lstrip("/") or (port is not None and not 0 < port < 65536):
        raise UserError(f"--store {redacted(url)!r} is not a PostgreSQL URL; expected postgresql://USER@HOST:PORT/DB "
                        f"(or leave --store out for the sqlite file in --data-dir)")
    return url


def connect(target):
    """A connection to ``target``: a sqlite file path, or a postgresql:// URL."""
    if is_url(target):
        return PostgresConnection(target)
    return SqliteConnection(Path(target))


def _write_ahead_log(db: sqlite3.Connection, bound: float = 30.0) -> None:
    """Switch the file to WAL. Processes opening one new file at once (serve, auditor, observer) can get
    "database is locked" here at once, without sqlite's busy wait (measured under load), so retry, bounded."""
    deadline = time.monotonic() + bound
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SqliteConnection:
    dialect = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        _write_ahead_log(self.db)
        self.db.execute("PRAGMA synchronous=FULL")

    def describe(self) -> str:
        return str(self.path)

    def begin(self, durable: bool = True) -> None:
        if not durable:
            self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.end(durable)
            raise

    def commit(self) -> None:
        self.db.execute("COMMIT")

    def rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def end(self, durable: bool = True) -> None:
        """After a write's commit or rollback: the durability knob back to FULL."""
        if not durable:
            self.db.execute("PRAGMA synchronous=FULL")

    def begin_snapshot(self) -> None:
        self.db.execute("BEGIN")

    def relax_durability(self) -> None:
        """For files that are not the books (the nonces): commits survive a killed process, not a power cut."""
        self.db.execute("PRAGMA synchronous=NORMAL")

    def tuples(self, sql: str, args: tuple = ()) -> list[tuple]:
        cursor = self.db.execute(sql, args)
        cursor.row_factory = None
        return cursor.fetchall()

    # --- the schema version (coordinator/books/schema.py) ---
    def version(self, name: str) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def set_version(self, name: str, number: int) -> None:
        self.db.execute(f"PRAGMA user_version = {int(number)}")

    def close(self) -> None:
        self.db.close()


class Row:
    """A PostgreSQL result row read like sqlite3.Row: by position, by column name, ``dict(row)``."""

    __slots__ = ("_values", "_index")

    def __init__(self, values, index: dict):
        self._values, self._index = values, index

    def __getitem__(self, key):
        return self._values[self._index[key] if isinstance(key, str) else key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __eq__(self, other):
        return tuple(self._values) == tuple(other)

    def keys(self):
        return list(self._index)

    def __repr__(self):
        return f"Row({dict(zip(self._index, self._values))})"


def _rows(cursor):
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: Row(values, index)


class _Cursor:
    """What the books use of a sqlite3 cursor: fetchone, fetchall, iteration, rowcount."""

    def __init__(self, cursor):
        self._cursor = cursor
        self.rowcount = cursor.rowcount

    def fetchone(self):
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self):
        return self._cursor.fetchall() if self._cursor.description else []

    def __iter__(self):
        return iter(self.fetchall())


class _Translated:
    """The books' SQL on a psycopg connection: ``?`` placeholders become ``%s``."""

    def __init__(self, owner: "PostgresConnection"):
        self._owner = owner

    def execute(self, sql: str, args=()) -> _Cursor:
        conn = self._owner.live()
        if args:
            return _Cursor(conn.execute(sql.replace("%", "%%").replace("?", "%s"), tuple(args)))
        return _Cursor(conn.execute(sql))


def _driver():
    try:
        import psycopg
    except ImportError:
        raise UserError("--store postgresql://... needs the PostgreSQL driver: pip install 'potluck[postgresql]' "
                        "(psycopg 3)") from None
    return psycopg


def _number_loader(psycopg):
    """Sums and averages come back as PostgreSQL ``numeric``: read them as int or float, like sqlite's."""

    class NumberLoader(psycopg.adapt.Loader):
        def load(self, data):
            text = bytes(data).decode()
            try:
                return int(text)
            except ValueError:
                return float(text)

    return NumberLoader


class PostgresConnection:
    """One psycopg connection (autocommit; transactions are explicit). When the server drops it (a restart,
    a network cut), the call that finds out fails and the next one, outside a transaction, reconnects:
    a transaction is never continued on a new connection."""

    dialect = "postgresql"

    def __init__(self, url: str):
        self.url = check_url(url)
        self._psycopg = _driver()
        self._in_transaction = False
        self._relaxed = False
        self._conn = self._connect()
        self.db = _Translated(self)

    def _connect(self):
        psycopg = self._psycopg
        try:
            conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10, row_factory=_rows)
        except psycopg.Error as error:
            detail = " ".join(str(error).split())
            raise UserError(f"cannot open the PostgreSQL store {redacted(self.url)}: {detail}") from None
        conn.adapters.register_loader("numeric", _number_loader(psycopg))
        if self._relaxed:
            conn.execute("SET synchronous_commit = off")
        return conn

    def live(self):
        """The connection, made again if the server dropped it (never inside a transaction)."""
        if self._conn.broken and not self._in_transaction:
            self._conn = self._connect()
        return self._conn

    def describe(self) -> str:
        return redacted(self.url)

    def begin(self, durable: bool = True) -> None:
        self.live().execute("BEGIN")
        self._in_transaction = True
        try:
            if not durable:  # the commit does not wait for the WAL flush; a crashed server keeps a consistent state
                self._conn.execute("SET LOCAL synchronous_commit = off")
            self._conn.execute(f"SELECT pg_advisory_xact_lock({WRITE_LOCK})")
        except BaseException:
            self.rollback()
            raise

    def commit(self) -> None:
        self._in_transaction = False
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        self._in_transaction = False
        if not self._conn.broken:  # a dropped connection's transaction is gone with it
            self._conn.execute("ROLLBACK")

    def end(self, durable: bool = True) -> None:
        pass  # SET LOCAL ended with the transaction

    def begin_snapshot(self) -> None:
        self.live().execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._in_transaction = True

    def relax_durability(self) -> None:
        self._relaxed = True
        self.live().execute("SET synchronous_commit = off")

    def tuples(self, sql: str, args: tuple = ()) -> list[tuple]:
        return [tuple(row) for row in self.db.execute(sql, args).fetchall()]

    # --- the schema versions: one row per schema (the ledger's, the nonces') ---
    def version(self, name: str) -> int:
        # a query of the catalog, not to_regclass: after waiting for the write lock, this must see the table
        # another process's migration just committed (a cached catalog lookup may not yet)
        if not self.live().execute("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables WHERE tablename = "
                                  "'schema_versions' AND schemaname = current_schema())").fetchone()[0]:
            return 0
        row = self._conn.execute("SELECT version FROM schema_versions WHERE name = %s", (name,)).fetchone()
        return row[0] if row else 0

    def set_version(self, name: str, number: int) -> None:
        self._conn.execute("CREATE TABLE IF NOT EXISTS schema_versions (name TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        self._conn.execute("INSERT INTO schema_versions VALUES (%s, %s) ON CONFLICT (name) DO UPDATE SET "
                           "version = excluded.version", (name, number))

    def close(self) -> None:
        self._conn.close()


def put_meta(db, key: str, value: str) -> None:
    """Set one ``meta`` row inside the caller's transaction. sqlite keeps ``INSERT OR REPLACE`` (a replace is
    an insert: the internal ids' trigger counts it); PostgreSQL upserts (its trigger counts updates too)."""
    if isinstance(db, sqlite3.Connection):
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
    else:
        db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))


def dialect_of(db) -> str:
    """The dialect of what a store's ``_write`` or ``_snapshot`` yields."""
    return "sqlite" if isinstance(db, sqlite3.Connection) else "postgresql"


def greatest(dialect: str) -> str:
    """The SQL function of the larger of two values: sqlite's scalar MAX, PostgreSQL's GREATEST."""
    return "MAX" if dialect == "sqlite" else "GREATEST"


def json_number(dialect: str, column: str, key: str) -> str:
    """SQL for the number at ``key`` of a JSON object held in a TEXT column."""
    if dialect == "sqlite":
        return f"json_extract({column}, '$.{key}')"
    return f"(({column})::jsonb ->> '{key}')::double precision"
