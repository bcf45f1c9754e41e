"""The ledger file's one schema: numbered migration steps, applied in order, the version in the file.

``PRAGMA user_version`` holds how many steps a file has had (on PostgreSQL: the ``schema_versions`` table,
coordinator/books/postgres_schema.py has its steps). Opening a store applies the missing ones
in one write transaction (several processes open one file: the first applies them, the others see
them done). A file from before versioning (version 0, made by potluck with each store creating its
own tables) gets step 1, whose ``IF NOT EXISTS`` statements fill in whatever tables it lacks. A file
at a version above this code's was written by a newer potluck and is refused.

A step, once released, never changes: a new table or column is a new step at the end.
"""

from __future__ import annotations

import sqlite3

from coordinator.books import postgres_schema
from peer.errors import UserError

# --- step 1: the tables as potluck created them before versioning (ledger, credit, log, binding) ---
_LEDGER_V1 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS orgs (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL,
    max_peers INTEGER NOT NULL DEFAULT 0,
    removed REAL
) STRICT;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    created REAL NOT NULL,
    expires REAL NOT NULL,
    max_peers INTEGER NOT NULL,
    revoked REAL
) STRICT;
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    token_id TEXT NOT NULL REFERENCES tokens(id),
    public_key BLOB NOT NULL,
    hivemind_peer_id TEXT NOT NULL,
    swarm_auth_key BLOB NOT NULL,
    device TEXT NOT NULL,
    session_sha256 TEXT NOT NULL,
    joined REAL NOT NULL,
    last_seen REAL NOT NULL,
    left_at REAL,
    evicted TEXT,
    epoch INTEGER NOT NULL DEFAULT 0,
    samples_per_second REAL NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS token_bindings (
    token_id TEXT NOT NULL REFERENCES tokens(id),
    peer_id TEXT NOT NULL,
    bound REAL NOT NULL,
    PRIMARY KEY (token_id, peer_id)
) STRICT;
CREATE TABLE IF NOT EXISTS reports (
    report_id TEXT PRIMARY KEY,
    peer_id TEXT NOT NULL REFERENCES peers(peer_id),
    epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    loss REAL NOT NULL,
    compute_seconds REAL NOT NULL,
    metrics TEXT NOT NULL,
    received REAL NOT NULL,
    UNIQUE (peer_id, epoch)
) STRICT;
CREATE TABLE IF NOT EXISTS epoch_claims (
    peer_id TEXT PRIMARY KEY REFERENCES peers(peer_id),
    epoch INTEGER NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS peers_swarm_lists ON peers (hivemind_peer_id, evicted);
CREATE INDEX IF NOT EXISTS peers_last_seen ON peers (last_seen);
INSERT OR IGNORE INTO meta VALUES ('lists_changes', '0');
CREATE TRIGGER IF NOT EXISTS lists_change_on_admit AFTER INSERT ON peers
BEGIN UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'lists_changes'; END;
CREATE TRIGGER IF NOT EXISTS lists_change_on_update AFTER UPDATE OF hivemind_peer_id, evicted ON peers
BEGIN UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'lists_changes'; END;
CREATE TRIGGER IF NOT EXISTS lists_change_on_delete AFTER DELETE ON peers
BEGIN UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'lists_changes'; END;
CREATE TRIGGER IF NOT EXISTS lists_change_on_internal AFTER INSERT ON meta WHEN NEW.key = 'internal_swarm_ids'
BEGIN UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'lists_changes'; END;
"""

_CREDIT_V1 = """
CREATE TABLE IF NOT EXISTS credit_reports (
    report_id TEXT PRIMARY KEY,
    peer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    credited_samples INTEGER NOT NULL,
    body TEXT NOT NULL,
    flags TEXT NOT NULL,
    median_norm REAL NOT NULL,
    samples_per_second REAL NOT NULL,
    received REAL NOT NULL,
    audit_state TEXT NOT NULL DEFAULT 'new'
) STRICT;
CREATE INDEX IF NOT EXISTS credit_reports_epoch ON credit_reports (epoch);
CREATE TABLE IF NOT EXISTS sketch_digests (
    digest TEXT PRIMARY KEY, peer_id TEXT NOT NULL, epoch INTEGER NOT NULL, micro_batch INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY,
    report_id TEXT,
    peer_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    micro_batch INTEGER NOT NULL,
    verdict TEXT NOT NULL,
    relative_error REAL,
    norm_ratio REAL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS audits_report ON audits (report_id);
CREATE INDEX IF NOT EXISTS audits_verdict ON audits (verdict);
CREATE INDEX IF NOT EXISTS audits_peer ON audits (peer_id);
CREATE TABLE IF NOT EXISTS standing (
    peer_id TEXT PRIMARY KEY, strikes INTEGER NOT NULL DEFAULT 0, banned INTEGER NOT NULL DEFAULT 0,
    reason TEXT, at REAL
) STRICT;
CREATE TABLE IF NOT EXISTS settlements (
    peer_id TEXT NOT NULL, window INTEGER NOT NULL, samples INTEGER NOT NULL, flops REAL NOT NULL,
    status TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (peer_id, window)
) STRICT;
CREATE TABLE IF NOT EXISTS org_strikes (
    peer_id TEXT PRIMARY KEY, org TEXT NOT NULL, token_ids TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL
) STRICT;
"""

_CONTRIBUTION_LOG_V1 = """
CREATE TABLE IF NOT EXISTS contribution_log (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
) STRICT;
CREATE TRIGGER IF NOT EXISTS contribution_log_no_update BEFORE UPDATE ON contribution_log
BEGIN SELECT RAISE(ABORT, 'the contribution log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS contribution_log_no_delete BEFORE DELETE ON contribution_log
BEGIN SELECT RAISE(ABORT, 'the contribution log is append-only'); END;
"""

_BINDING_V1 = """
CREATE TABLE IF NOT EXISTS attestations (
    group_id TEXT NOT NULL, role TEXT NOT NULL, sender TEXT NOT NULL, reducer TEXT NOT NULL,
    kind TEXT NOT NULL, epoch INTEGER NOT NULL, author TEXT NOT NULL, report_id TEXT NOT NULL,
    length INTEGER NOT NULL, sketch TEXT NOT NULL, norm_sq REAL NOT NULL, weight REAL NOT NULL,
    score REAL NOT NULL, clipped INTEGER NOT NULL, at REAL NOT NULL, received REAL NOT NULL,
    PRIMARY KEY (group_id, role, sender, reducer)
) STRICT;
CREATE INDEX IF NOT EXISTS attestations_author ON attestations (author, epoch);
CREATE INDEX IF NOT EXISTS attestations_sender ON attestations (sender, role);
CREATE TABLE IF NOT EXISTS binding_checks (
    check_kind TEXT NOT NULL, group_id TEXT NOT NULL, subject TEXT NOT NULL, counterparty TEXT NOT NULL,
    epoch INTEGER NOT NULL, verdict TEXT NOT NULL, relative_error REAL, norm_ratio REAL, detail TEXT NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (check_kind, group_id, subject, counterparty)
) STRICT;
"""


def statements(script: str) -> list[str]:
    """The SQL statements of a script, each whole (a trigger's body holds semicolons of its own)."""
    result, pending = [], ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n;"):
                result.append(pending.strip())
            pending = ""
    return result


def _tables_before_versioning(db: sqlite3.Connection) -> None:
    for script in (_LEDGER_V1, _CREDIT_V1, _CONTRIBUTION_LOG_V1, _BINDING_V1):
        for statement in statements(script):
            db.execute(statement)
    if "expires" not in {row[1] for row in db.execute("PRAGMA table_info(tokens)")}:
        raise UserError("this ledger was written by an older potluck (unsigned tokens); start the run in a new "
                        "--data-dir")


def _micro_batches_per_report(db: sqlite3.Connection) -> None:
    """credit_reports.micro_batches (for the windows' confidence), counted from each stored body."""
    if "micro_batches" not in {row[1] for row in db.execute("PRAGMA table_info(credit_reports)")}:
        db.execute("ALTER TABLE credit_reports ADD COLUMN micro_batches INTEGER NOT NULL DEFAULT 0")
        db.execute("UPDATE credit_reports SET micro_batches = json_array_length(body, '$.sketches')")


def _credit_reports_by_peer(db: sqlite3.Connection) -> None:
    """A peer's account (accounting.py, every heartbeat) reads its own reports' credit by key."""
    db.execute("CREATE INDEX IF NOT EXISTS credit_reports_peer ON credit_reports (peer_id, epoch)")


_LEDGER_SQLITE = (_tables_before_versioning, _micro_batches_per_report, _credit_reports_by_peer)  # the file's steps



def _seen_nonces(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE IF NOT EXISTS seen_nonces (digest BLOB PRIMARY KEY, at REAL NOT NULL) STRICT, WITHOUT ROWID")


def version(db: sqlite3.Connection) -> int:
    """A sqlite file's schema version."""
    return db.execute("PRAGMA user_version").fetchone()[0]


class Schema:
    """One schema's numbered steps, written once per dialect: step n of each means the same tables.
    PostgreSQL starts at potluck's versioned schema, so its steps create what the sqlite steps made."""

    def __init__(self, name: str, sqlite: tuple, postgresql: tuple):
        assert len(sqlite) == len(postgresql)
        self.name, self._steps = name, {"sqlite": sqlite, "postgresql": postgresql}

    def steps(self, dialect: str) -> tuple:
        return self._steps[dialect]

    def __len__(self) -> int:
        return len(self._steps["sqlite"])


LEDGER = Schema("ledger", _LEDGER_SQLITE, postgres_schema.LEDGER)  # the books' steps, in order
NONCES = Schema("nonces", (_seen_nonces,), postgres_schema.NONCES)  # the nonces' (coordinator/books/nonces.py)


def _check_not_newer(found: int, steps: tuple, where: str) -> None:
    if found > len(steps):
        raise UserError(f"{where} has schema version {found}, newer than this potluck knows ({len(steps)}): it was "
                        f"written by a newer potluck; upgrade potluck to open it")


def migrate(conn, schema: Schema) -> int:
    """Bring the store of ``conn`` (coordinator/books/connection.py) to ``len(schema)``; returns the version it had."""
    steps = schema.steps(conn.dialect)
    found = conn.version(schema.name)
    _check_not_newer(found, steps, conn.describe())
    if found == len(steps):
        return found
    conn.begin()
    try:
        found = conn.version(schema.name)  # another process may have migrated meanwhile
        _check_not_newer(found, steps, conn.describe())
        for number, step in enumerate(steps[found:], start=found + 1):
            step(conn.db)
            conn.set_version(schema.name, number)
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.end()
    conn.commit()
    return found
