"""The ledger: orgs, join tokens, peers and their contribution reports, in one sqlite file.

Durability first: WAL, ``synchronous=FULL`` and one ``BEGIN IMMEDIATE`` transaction per change, so
a report the coordinator acknowledged survives ``kill -9``. Reports are append-only and idempotent
on their report id. Several processes (``serve``, ``token issue``, ``status``) open the same file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from peer.errors import UserError

LEDGER_FILE = "ledger.sqlite"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS orgs (name TEXT PRIMARY KEY, created REAL NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    secret_sha256 TEXT NOT NULL,
    created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    org TEXT NOT NULL REFERENCES orgs(name),
    token_id TEXT NOT NULL REFERENCES tokens(id),
    public_key BLOB NOT NULL,
    hivemind_peer_id TEXT NOT NULL,
    device TEXT NOT NULL,
    session_sha256 TEXT NOT NULL,
    joined REAL NOT NULL,
    last_seen REAL NOT NULL,
    left_at REAL,
    epoch INTEGER NOT NULL DEFAULT 0,
    samples_per_second REAL NOT NULL DEFAULT 0
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
"""


class LedgerError(UserError):
    """A request the ledger refuses; ``code`` names the gRPC status it maps to."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Admission:
    peer_id: str
    org: str
    session: str


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._write() as db:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @classmethod
    def open_existing(cls, data_dir: Path) -> "Ledger":
        path = Path(data_dir) / LEDGER_FILE
        if not path.exists():
            raise UserError(
                f"no coordinator ledger in {data_dir}; start one with 'coordinator serve --run run.toml "
                f"--data-dir {data_dir}' or pass the --data-dir it uses"
            )
        return cls(path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # --- run metadata -------------------------------------------------------------------------
    def bind_run(self, run_id: str, config_hash: str) -> None:
        """Record which run this ledger belongs to; refuse a different run on an existing ledger."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='run_id'").fetchone()
            if row is not None and row["value"] != run_id:
                raise UserError(
                    f"the data dir {self.path.parent} holds the ledger of run '{row['value']}', not '{run_id}'; "
                    f"use another --data-dir for a new run"
                )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('run_id', ?)", (run_id,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('run_config_hash', ?)", (config_hash,))

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    # --- orgs and tokens ----------------------------------------------------------------------
    def issue_token(self, org: str) -> tuple[str, str]:
        """Create ``org`` if new and a join token for it; returns (token id, token)."""
        org = org.strip()
        if not org or len(org) > 64 or not all(c.isalnum() or c in "-_. " for c in org):
            raise UserError(f"invalid org name {org!r}: use 1-64 letters, digits, spaces, '-', '_' or '.'")
        token_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        now = time.time()
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO orgs VALUES (?, ?)", (org, now))
            db.execute(
                "INSERT INTO tokens (id, org, secret_sha256, created) VALUES (?, ?, ?, ?)",
                (token_id, org, _sha256(secret), now),
            )
        return token_id, f"plk_{token_id}_{secret}"

    def _check_token(self, db: sqlite3.Connection, token: str) -> sqlite3.Row:
        parts = token.split("_", 2)
        unknown = LedgerError("UNAUTHENTICATED", "unknown join token; ask the run's operator for a valid token")
        if len(parts) != 3 or parts[0] != "plk":
            raise unknown
        row = db.execute("SELECT * FROM tokens WHERE id=?", (parts[1],)).fetchone()
        if row is None or not hmac.compare_digest(row["secret_sha256"], _sha256(parts[2])):
            raise unknown
        if row["revoked"]:
            raise LedgerError("PERMISSION_DENIED", "this join token was revoked; ask the operator for a new one")
        return row

    # --- peers --------------------------------------------------------------------------------
    def admit(self, token: str, peer_id: str, public_key: bytes, hivemind_peer_id: str, device: str) -> Admission:
        session = secrets.token_urlsafe(24)
        now = time.time()
        with self._write() as db:
            token_row = self._check_token(db, token)
            existing = db.execute("SELECT org FROM peers WHERE peer_id=?", (peer_id,)).fetchone()
            if existing is not None and existing["org"] != token_row["org"]:
                raise LedgerError(
                    "PERMISSION_DENIED",
                    f"this peer identity already belongs to org '{existing['org']}'; "
                    f"use a token of that org or a new --data-dir",
                )
            db.execute(
                """INSERT INTO peers (peer_id, org, token_id, public_key, hivemind_peer_id, device,
                                      session_sha256, joined, last_seen)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (peer_id) DO UPDATE SET token_id=excluded.token_id,
                       hivemind_peer_id=excluded.hivemind_peer_id, device=excluded.device,
                       session_sha256=excluded.session_sha256, last_seen=excluded.last_seen, left_at=NULL""",
                (peer_id, token_row["org"], token_row["id"], public_key, hivemind_peer_id, device,
                 _sha256(session), now, now),
            )
        return Admission(peer_id=peer_id, org=token_row["org"], session=session)

    def _check_session(self, db: sqlite3.Connection, peer_id: str, session: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM peers WHERE peer_id=?", (peer_id,)).fetchone()
        if row is None or not hmac.compare_digest(row["session_sha256"], _sha256(session)):
            raise LedgerError("UNAUTHENTICATED", "unknown peer session; join the run again")
        return row

    def authenticate(self, peer_id: str, session: str) -> bytes:
        """Check a peer's session; returns its Ed25519 public key."""
        with self._lock:
            return self._check_session(self._db, peer_id, session)["public_key"]

    def heartbeat(self, peer_id: str, session: str, epoch: int, samples_per_second: float) -> None:
        with self._write() as db:
            self._check_session(db, peer_id, session)
            db.execute(
                "UPDATE peers SET last_seen=?, epoch=MAX(epoch, ?), samples_per_second=?, left_at=NULL "
                "WHERE peer_id=?",
                (time.time(), epoch, samples_per_second, peer_id),
            )

    def leave(self, peer_id: str, session: str) -> None:
        with self._write() as db:
            self._check_session(db, peer_id, session)
            db.execute("UPDATE peers SET left_at=? WHERE peer_id=?", (time.time(), peer_id))

    # --- reports ------------------------------------------------------------------------------
    def record_report(
        self, peer_id: str, session: str, report_id: str, epoch: int, samples: int, loss: float,
        compute_seconds: float, metrics: dict[str, float],
    ) -> bool:
        """Append one report; returns False when this report id was already recorded."""
        with self._write() as db:
            self._check_session(db, peer_id, session)
            previous = db.execute("SELECT peer_id, epoch FROM reports WHERE report_id=?", (report_id,)).fetchone()
            if previous is not None:
                if (previous["peer_id"], previous["epoch"]) != (peer_id, epoch):
                    raise LedgerError("ALREADY_EXISTS", f"report id {report_id} was used for another report")
                return False
            if db.execute("SELECT 1 FROM reports WHERE peer_id=? AND epoch=?", (peer_id, epoch)).fetchone():
                raise LedgerError("ALREADY_EXISTS", f"peer {peer_id} already reported epoch {epoch}")
            now = time.time()
            db.execute(
                "INSERT INTO reports VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (report_id, peer_id, epoch, samples, loss, compute_seconds, json.dumps(metrics, sort_keys=True), now),
            )
            db.execute(
                "UPDATE peers SET last_seen=?, epoch=MAX(epoch, ?), left_at=NULL WHERE peer_id=?",
                (now, epoch + 1, peer_id),
            )
        return True

    def report_ids(self) -> set[str]:
        return {row["report_id"] for row in self._read("SELECT report_id FROM reports")}

    # --- the run as a whole -------------------------------------------------------------------
    def snapshot(self, peer_timeout: float, now: float | None = None) -> dict:
        """The run's state for status displays and heartbeats (JSON-ready)."""
        now = time.time() if now is None else now
        peers = self._read(
            """SELECT p.peer_id, p.org, p.device, p.epoch, p.last_seen, p.left_at, p.samples_per_second,
                      COALESCE(SUM(r.samples), 0) AS samples, COUNT(r.report_id) AS reports
               FROM peers p LEFT JOIN reports r ON r.peer_id = p.peer_id
               GROUP BY p.peer_id ORDER BY p.joined"""
        )
        orgs = self._read(
            """SELECT o.name, COALESCE(SUM(r.samples), 0) AS samples,
                      (SELECT COUNT(*) FROM peers p WHERE p.org = o.name) AS peers
               FROM orgs o LEFT JOIN peers p ON p.org = o.name LEFT JOIN reports r ON r.peer_id = p.peer_id
               GROUP BY o.name ORDER BY samples DESC, o.name"""
        )
        last = self._read(
            "SELECT epoch, SUM(samples * loss) / MAX(SUM(samples), 1) AS loss FROM reports "
            "GROUP BY epoch ORDER BY epoch DESC LIMIT 1"
        )
        metrics_rows = self._read("SELECT metrics FROM reports ORDER BY epoch DESC, received DESC LIMIT 1")
        totals = self._read("SELECT COALESCE(SUM(samples), 0) AS samples FROM reports")[0]
        peer_list = [
            {
                "id": row["peer_id"],
                "org": row["org"],
                "device": row["device"],
                "epoch": row["epoch"],
                "samples": row["samples"],
                "reports": row["reports"],
                "samples_per_second": row["samples_per_second"],
                "last_seen_seconds_ago": round(now - row["last_seen"], 1),
                "alive": row["left_at"] is None and now - row["last_seen"] <= peer_timeout,
            }
            for row in peers
        ]
        reported_epoch = last[0]["epoch"] + 1 if last else 0
        return {
            "run_id": self.meta("run_id"),
            "epoch": max([reported_epoch] + [p["epoch"] for p in peer_list]),
            "samples": totals["samples"],
            "loss": last[0]["loss"] if last else None,
            "metrics": json.loads(metrics_rows[0]["metrics"]) if metrics_rows else {},
            "swarm_samples_per_second": sum(p["samples_per_second"] for p in peer_list if p["alive"]),
            "peers": peer_list,
            "orgs": [{"name": row["name"], "samples": row["samples"], "peers": row["peers"]} for row in orgs],
        }
