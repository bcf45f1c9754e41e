"""The ledger: orgs, join tokens, peers and their contribution reports, in one sqlite file.

Durability first: WAL, ``synchronous=FULL`` and one ``BEGIN IMMEDIATE`` transaction per change, so
a report the coordinator acknowledged survives ``kill -9``. Reports are append-only and idempotent
on their report id. Several processes (``serve``, ``token issue``, ``status``) open the same file.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import json
import secrets
import shlex
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from coordinator.books import accounting, connection, schema
from coordinator.books import run_epoch as checked_epoch
from coordinator.books.connection import put_meta
from coordinator.books.store import Store
from peer.errors import EVICTED_PREFIX, UserError

LEDGER_FILE = "ledger.sqlite"


class LedgerError(UserError):
    """A request the ledger refuses; ``code`` names the gRPC status it maps to."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


BANNED = "banned"  # an eviction reason starting with this also refuses later joins of the identity
QUOTA_LIVENESS = 60.0  # seconds: a peer silent longer no longer counts toward its org's quota
SUMMARY_SECONDS = 1.0  # the swarm figures of heartbeat replies (RunSummary) are at most this old
ADVANCE_SECONDS = 1.0  # a heartbeat of a peer that already votes re-checks the run epoch at most this often
_SAMPLES = "COALESCE(SUM(r.samples), 0)"  # a peer's reported samples, over its reports r
_PEER_FIELDS = "p.peer_id, p.org, p.device, p.epoch, p.last_seen, p.left_at, p.evicted, p.samples_per_second"
# the one definition of a live peer p: not gone, not evicted, heard from since ? (now - peer_timeout)
_ALIVE = "(p.left_at IS NULL AND p.evicted IS NULL AND p.last_seen >= ?)"


@dataclass(frozen=True)
class RunSummary:
    """The swarm's figures: live peers, their samples/s (the swarm's rate) and their epochs. One read of
    the live peers (Ledger.summarize); heartbeats reuse one for ``SUMMARY_SECONDS`` (Ledger.run_summary),
    so a heartbeat costs the same with 10 or 10,000 peers."""

    at: float
    live_peers: int
    swarm_samples_per_second: float
    live_epochs: dict  # live peer id -> its epoch
    sorted_epochs: tuple  # the same epochs, sorted

    def live_count(self, peer_id: str) -> int:
        """Live peers, counting ``peer_id`` (heard from just now) also when the summary predates it."""
        return self.live_peers + (peer_id not in self.live_epochs)

    def peers_behind(self, epoch: int, peer_id: str) -> int:
        """Live peers other than ``peer_id`` at an epoch below ``epoch``."""
        behind = bisect.bisect_left(self.sorted_epochs, epoch)
        own = self.live_epochs.get(peer_id)
        return behind - (own is not None and own < epoch)


def check_org_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_. " for c in name):
        raise UserError(f"invalid org name {name!r}: use 1-64 letters, digits, spaces, '-', '_' or '.'")
    return name


def _lists_version(allow: list[str], deny: list[str]) -> str:
    return hashlib.sha256(json.dumps([allow, deny]).encode()).hexdigest()[:16]


def _set_member(ordered: list[str], item: str, member: bool) -> None:
    """Put ``item`` into the sorted list ``ordered`` or take it out."""
    index = bisect.bisect_left(ordered, item)
    present = index < len(ordered) and ordered[index] == item
    if member and not present:
        ordered.insert(index, item)
    elif present and not member:
        del ordered[index]


def evict_peer(db, peer_id: str, reason: str) -> bool:
    """Withdraw one peer's admission inside the caller's transaction (an eviction, or a ban's)."""
    return db.execute(
        "UPDATE peers SET evicted=? WHERE peer_id=? AND evicted IS NULL", (reason[:200], peer_id)
    ).rowcount > 0


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Admission:
    peer_id: str
    org: str
    session: str


class Ledger(Store):
    MIGRATIONS = schema.LEDGER

    def __init__(self, target, epoch_rule: checked_epoch.EpochRule | None = None):
        """``target``: the sqlite file (its folder is made), or a postgresql:// URL (connection.py)."""
        if not connection.is_url(target):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(target)
        # set by the serving process (which knows run.toml): reports and heartbeats then advance the run epoch
        self.epoch_rule = epoch_rule
        # the hot paths' caches (heartbeat, join): see run_summary, swarm_lists and heartbeat
        self._summary: RunSummary | None = None
        self._summary_lock = threading.Lock()
        self._lists: tuple[str, tuple[str, list[str], list[str]]] | None = None
        self._advanced_at = 0.0
        self._voters_changed = True
        if self.dialect == "sqlite":  # PostgreSQL always checks them
            self._db.execute("PRAGMA foreign_keys=ON")

    @classmethod
    def open_existing(cls, data_dir: Path, store: str | None = None) -> "Ledger":
        """The books a ``serve`` made: the sqlite file in ``data_dir``, or the ``--store`` database."""
        if store:
            return cls.open_database(store)
        path = Path(data_dir) / LEDGER_FILE
        if not path.exists():
            raise UserError(
                f"no coordinator ledger in {data_dir}; start one with 'coordinator serve --run run.toml "
                f"--data-dir {data_dir}' or pass the --data-dir it uses"
            )
        return cls(path)

    @classmethod
    def open_database(cls, url: str) -> "Ledger":
        """The books in a PostgreSQL database that ``serve --store`` set up; nothing is created otherwise."""
        probe = connection.connect(url)
        try:
            versioned = probe.version(schema.LEDGER.name)
        finally:
            probe.close()
        if not versioned:
            raise UserError(f"no coordinator ledger in {connection.redacted(url)}; start one with 'coordinator serve "
                            f"--run run.toml --store {connection.redacted(url)}' or pass the --store it uses")
        return cls(url)

    # --- read models: one definition of each figure (coordinator/books/accounting.py, views.py) ----
    def accounts(self, peer_id: str | None = None) -> dict[str, accounting.Account]:
        """Every peer's account (with ``peer_id``: that peer's, read by key): settled and pending credit, audits."""
        return accounting.accounts(self._read, peer_id)

    def org_strikes(self) -> dict[str, int]:
        return accounting.org_strikes(self._read)

    def recent_audits(self, limit: int = 20) -> list[dict]:
        return accounting.recent_audits(self._read, limit)

    def recent_bans(self, limit: int = 20) -> list[dict]:
        return accounting.recent_bans(self._read, limit)

    # --- run metadata -------------------------------------------------------------------------
    def bind_run(self, run_id: str, config_hash: str) -> None:
        """Record which run this ledger belongs to; refuse a different run on an existing ledger."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='run_id'").fetchone()
            if row is not None and row["value"] != run_id:
                raise UserError(
                    f"{self._home()} holds the ledger of run '{row['value']}', not '{run_id}'; "
                    f"use another {'--data-dir' if self.path else '--store database'} for a new run"
                )
            put_meta(db, "run_id", run_id)
            put_meta(db, "run_config_hash", config_hash)

    def _home(self) -> str:
        return f"the data dir {self.path.parent}" if self.path else f"the store {self.describe()}"

    def meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key=?", (key,))
        return rows[0]["value"] if rows else None

    # --- orgs and tokens ----------------------------------------------------------------------
    def add_org(self, name: str, max_peers: int = 0) -> None:
        """Create an organization (or re-admit a removed one); max_peers 0 means no quota."""
        name = check_org_name(name)
        if max_peers < 0:
            raise UserError(f"--max-peers must be >= 0 (0: no limit), got {max_peers}")
        with self._write() as db:
            row = db.execute("SELECT removed FROM orgs WHERE name=?", (name,)).fetchone()
            if row is not None and row["removed"] is None:
                db.execute("UPDATE orgs SET max_peers=? WHERE name=?", (max_peers, name))
                return
            db.execute(
                "INSERT INTO orgs (name, created, max_peers) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET removed=NULL, max_peers=excluded.max_peers",
                (name, time.time(), max_peers),
            )

    def orgs(self) -> list[dict]:
        rows = self._read(
            """SELECT o.name, o.created, o.max_peers, o.removed,
                      (SELECT COUNT(*) FROM peers p WHERE p.org=o.name AND p.evicted IS NULL) AS peers,
                      (SELECT COUNT(*) FROM tokens t WHERE t.org=o.name AND t.revoked IS NULL) AS active_tokens
               FROM orgs o ORDER BY o.name"""
        )
        return [dict(row) | {"removed": row["removed"] is not None} for row in rows]

    def remove_org(self, name: str) -> int:
        """Remove an org: revoke its tokens and evict its peers; returns how many peers were evicted."""
        now = time.time()
        with self._voters_write() as db:
            row = db.execute("SELECT removed FROM orgs WHERE name=?", (name,)).fetchone()
            if row is None or row["removed"] is not None:
                raise UserError(f"no org named {name!r}; 'coordinator org list' shows the orgs")
            db.execute("UPDATE orgs SET removed=? WHERE name=?", (now, name))
            db.execute("UPDATE tokens SET revoked=? WHERE org=? AND revoked IS NULL", (now, name))
            return db.execute(
                "UPDATE peers SET evicted=? WHERE org=? AND evicted IS NULL", (f"org '{name}' was removed", name)
            ).rowcount

    def add_token(self, token_id: str, org: str, expires: float, max_peers: int) -> None:
        """Record an issued token (the signed token itself is never stored: its id is enough to revoke it)."""
        with self._write() as db:
            row = db.execute("SELECT removed FROM orgs WHERE name=?", (org,)).fetchone()
            if row is None or row["removed"] is not None:
                raise UserError(f"unknown org {org!r}; add it first with: coordinator org add {shlex.quote(org)}")
            db.execute(
                "INSERT INTO tokens (id, org, created, expires, max_peers) VALUES (?, ?, ?, ?, ?)",
                (token_id, org, time.time(), expires, max_peers),
            )

    def tokens(self) -> list[dict]:
        rows = self._read(
            """SELECT t.id, t.org, t.created, t.expires, t.max_peers, t.revoked,
                      (SELECT COUNT(*) FROM token_bindings b WHERE b.token_id=t.id) AS peers
               FROM tokens t ORDER BY t.created"""
        )
        return [dict(row) | {"revoked": row["revoked"] is not None} for row in rows]

    def revoke_token(self, token_id: str) -> int:
        """Revoke a token and evict the peers it admitted; returns how many peers were evicted."""
        with self._voters_write() as db:
            row = db.execute("SELECT revoked FROM tokens WHERE id=?", (token_id,)).fetchone()
            if row is None:
                raise UserError(f"no token with id {token_id!r}; 'coordinator token list' shows the ids")
            if row["revoked"] is None:
                db.execute("UPDATE tokens SET revoked=? WHERE id=?", (time.time(), token_id))
            return db.execute(
                "UPDATE peers SET evicted=? WHERE token_id=? AND evicted IS NULL",
                (f"token {token_id} was revoked", token_id),
            ).rowcount

    def evict(self, peer_id: str, reason: str) -> bool:
        """Withdraw one peer's admission; its further calls are refused and its swarm access ends."""
        with self._voters_write() as db:
            return evict_peer(db, peer_id, reason)

    def note_eviction(self) -> None:
        """A ban evicted a peer in the credit store's transaction (Credit.ban): the next heartbeat re-checks
        the voters, as after ``evict``."""
        self._voters_changed = True

    def swarm_lists(self) -> tuple[str, list[str], list[str]]:
        """(version, allowed, denied) hivemind peer ids: who may average with the swarm, who is shut out."""
        # built again only when they may have changed: triggers count every write that can change them
        # (admission, eviction, the internal ids), whichever process made it
        changes = self.meta("lists_changes")  # read before the lists, so a change in between is seen next time
        cached = self._lists
        if cached is not None and cached[0] == changes:
            return cached[1]
        # plain tuples: this reads every peer (a Join's reply carries every id)
        rows = self._tuples("SELECT hivemind_peer_id, evicted FROM peers")
        internal = json.loads(self.meta("internal_swarm_ids") or "[]")
        allow = sorted({swarm_id for swarm_id, evicted in rows if evicted is None} | set(internal))
        deny = sorted({swarm_id for swarm_id, evicted in rows if evicted is not None} - set(allow))
        version = _lists_version(allow, deny)
        self._lists = (changes, (version, allow, deny))
        return version, allow, deny

    @staticmethod
    def _listing(db: sqlite3.Connection, swarm_ids: set[str]) -> dict[str, tuple[bool, bool]]:
        """swarm id -> (allowed, denied) now, by swarm_lists' rule: allowed while any admitted peer (or an
        internal process) has the id, denied while only evicted ones do. Inside the caller's transaction."""
        row = db.execute("SELECT value FROM meta WHERE key='internal_swarm_ids'").fetchone()
        internal = set(json.loads(row[0])) if row else set()
        listing = {}
        for swarm_id in swarm_ids:
            allowed = swarm_id in internal or db.execute(
                "SELECT 1 FROM peers WHERE hivemind_peer_id=? AND evicted IS NULL LIMIT 1", (swarm_id,)).fetchone()
            denied = not allowed and db.execute(
                "SELECT 1 FROM peers WHERE hivemind_peer_id=? AND evicted IS NOT NULL LIMIT 1", (swarm_id,)).fetchone()
            listing[swarm_id] = (bool(allowed), bool(denied))
        return listing

    def _update_lists(self, before: str, after: str, listing: dict[str, tuple[bool, bool]]) -> None:
        """After a write that changed only the ids in ``listing``: the cached lists of change ``before``
        become those of ``after`` without reading every peer (a Join's admission). Without them cached,
        the next swarm_lists reads them all."""
        cached = self._lists
        if cached is None or cached[0] != before:
            return
        _, allow, deny = cached[1]
        allow, deny = list(allow), list(deny)  # callers may still hold the old ones
        for swarm_id, (allowed, denied) in listing.items():
            _set_member(allow, swarm_id, allowed)
            _set_member(deny, swarm_id, denied)
        self._lists = (after, (_lists_version(allow, deny), allow, deny))

    def set_internal_swarm_ids(self, ids: list[str]) -> None:
        """hivemind ids of the coordinator's own swarm processes (DHT node, observers): always admitted."""
        with self._write() as db:
            put_meta(db, "internal_swarm_ids", json.dumps(sorted(ids)))

    def add_internal_swarm_id(self, swarm_id: str) -> None:
        """Add one id to the internal ones in a single transaction, so processes of the coordinator
        that start together (observer, auditor) cannot drop each other's id."""
        with self._write() as db:
            row = db.execute("SELECT value FROM meta WHERE key='internal_swarm_ids'").fetchone()
            ids = set(json.loads(row["value"])) if row else set()
            put_meta(db, "internal_swarm_ids", json.dumps(sorted(ids | {swarm_id})))

    # --- peers --------------------------------------------------------------------------------
    def admit(self, claims, peer_id: str, public_key: bytes, hivemind_peer_id: str, device: str,
              swarm_auth_key: bytes = b"", live_within: float = 0.0) -> Admission:
        """Admit a peer holding a verified token (see coordinator.tokens); the ledger checks the rest:
        revocation, the token's use limit, the org's quota, and that the identity keeps its org.

        With ``live_within`` (the run's peer_timeout), an identity or a swarm id whose session was
        heard from that recently is refused: it is a copy of a running peer's key, and admitting it
        would take the original's session away. Once the original is silent that long, it may rejoin.
        """
        session = secrets.token_urlsafe(24)
        now = time.time()
        with self._write() as db:
            token = db.execute("SELECT * FROM tokens WHERE id=?", (claims.id,)).fetchone()
            if token is None or token["org"] != claims.org:
                raise LedgerError("UNAUTHENTICATED", "unknown join token; ask the run's operator for a valid token")
            if token["revoked"] is not None:
                raise LedgerError("PERMISSION_DENIED", "this join token was revoked; ask the operator for a new one")
            org = db.execute("SELECT * FROM orgs WHERE name=?", (token["org"],)).fetchone()
            if org["removed"] is not None:
                raise LedgerError("PERMISSION_DENIED", f"org '{org['name']}' was removed from this run")
            lists_before = db.execute("SELECT value FROM meta WHERE key='lists_changes'").fetchone()[0]
            existing = db.execute("SELECT org, evicted, hivemind_peer_id FROM peers WHERE peer_id=?",
                                  (peer_id,)).fetchone()
            if existing is not None and existing["org"] != token["org"]:
                raise LedgerError(
                    "PERMISSION_DENIED",
                    f"this peer identity already belongs to org '{existing['org']}'; "
                    f"use a token of that org or a new --data-dir",
                )
            if existing is not None and (existing["evicted"] or "").startswith(BANNED):
                raise LedgerError("PERMISSION_DENIED", f"this peer identity is {existing['evicted']}")
            bound = db.execute("SELECT 1 FROM token_bindings WHERE token_id=? AND peer_id=?", (token["id"], peer_id)).fetchone()
            if not bound and token["max_peers"]:
                uses = db.execute("SELECT COUNT(*) FROM token_bindings WHERE token_id=?", (token["id"],)).fetchone()[0]
                if uses >= token["max_peers"]:
                    raise LedgerError(
                        "PERMISSION_DENIED",
                        f"this join token was already used by {uses} other peer identit{'y' if uses == 1 else 'ies'} "
                        f"(its limit); ask the operator for a token of your own",
                    )
            if org["max_peers"]:
                active = db.execute(
                    "SELECT COUNT(*) FROM peers WHERE org=? AND peer_id<>? AND evicted IS NULL AND left_at IS NULL "
                    "AND last_seen>?", (org["name"], peer_id, now - QUOTA_LIVENESS),
                ).fetchone()[0]
                if active >= org["max_peers"]:
                    raise LedgerError(
                        "RESOURCE_EXHAUSTED",
                        f"org '{org['name']}' already has {active} active peers, its quota; stop one of them or "
                        f"ask the operator to raise it (coordinator org add {shlex.quote(org['name'])} --max-peers N)",
                    )
            if live_within > 0:
                self._refuse_live_copy(db, peer_id, hivemind_peer_id, now, live_within)
            if not bound:
                db.execute("INSERT INTO token_bindings VALUES (?, ?, ?)", (token["id"], peer_id, now))
            db.execute(
                """INSERT INTO peers (peer_id, org, token_id, public_key, hivemind_peer_id, swarm_auth_key, device,
                                      session_sha256, joined, last_seen)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (peer_id) DO UPDATE SET token_id=excluded.token_id,
                       hivemind_peer_id=excluded.hivemind_peer_id, swarm_auth_key=excluded.swarm_auth_key,
                       device=excluded.device, session_sha256=excluded.session_sha256,
                       last_seen=excluded.last_seen, left_at=NULL, evicted=NULL""",
                (peer_id, token["org"], token["id"], public_key, hivemind_peer_id, swarm_auth_key, device,
                 _sha256(session), now, now),
            )
            lists_after = db.execute("SELECT value FROM meta WHERE key='lists_changes'").fetchone()[0]
            changed = {hivemind_peer_id} | ({existing["hivemind_peer_id"]} if existing is not None else set())
            listing = self._listing(db, changed)
        self._update_lists(lists_before, lists_after, listing)
        if existing is not None:  # a peer that reported before and comes back votes again
            self._voters_changed = True
        return Admission(peer_id=peer_id, org=token["org"], session=session)

    @staticmethod
    def _refuse_live_copy(db, peer_id: str, hivemind_peer_id: str, now: float, live_within: float) -> None:
        live = db.execute(
            "SELECT peer_id, last_seen FROM peers WHERE (peer_id=? OR hivemind_peer_id=?) AND evicted IS NULL "
            "AND left_at IS NULL AND last_seen>=? ORDER BY peer_id<>?", (peer_id, hivemind_peer_id, now - live_within,
                                                                        peer_id)).fetchone()
        if live is None:
            return
        what = "peer identity (identity.key)" if live["peer_id"] == peer_id else \
            f"swarm identity (swarm_identity.key, in use by peer {live['peer_id']})"
        raise LedgerError(
            "ALREADY_EXISTS",
            f"this {what} is already in the run, heard from {now - live['last_seen']:.0f}s ago: another process "
            f"holds a copy of this data dir's keys. Stop it, or join with another --data-dir; if that process "
            f"crashed, join again after {live_within:.0f}s")

    def public_key(self, peer_id: str) -> bytes | None:
        rows = self._read("SELECT public_key FROM peers WHERE peer_id=?", (peer_id,))
        return rows[0]["public_key"] if rows else None

    def _check_session(self, db: sqlite3.Connection, peer_id: str, session: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM peers WHERE peer_id=?", (peer_id,)).fetchone()
        if row is None or not hmac.compare_digest(row["session_sha256"], _sha256(session)):
            raise LedgerError("UNAUTHENTICATED", "unknown peer session; join the run again")
        if row["evicted"] is not None:
            raise LedgerError("PERMISSION_DENIED", f"{EVICTED_PREFIX}{row['evicted']}")
        return row

    def authenticate(self, peer_id: str, session: str) -> bytes:
        """Check a peer's session; returns its Ed25519 public key."""
        with self._lock:
            return self._check_session(self._db, peer_id, session)["public_key"]

    def heartbeat(self, peer_id: str, session: str, epoch: int, samples_per_second: float) -> dict:
        """Record liveness; returns the peer's row.

        The run epoch is re-checked (a voter timing out can complete a quorum) when this heartbeat can
        change the voters at once (the peer was gone or silent, or this process let a peer go, evicted
        one or took a former one back since the last check), else at most every ADVANCE_SECONDS: the
        check reads every peer's reports, and a live voter's heartbeat only lets time pass for the others.
        Not fsynced (liveness; the run epoch is recomputed from the reports): the fsync was most of a
        Heartbeat's cost (benchmarks/capacity.py).
        """
        with self._write(durable=False) as db:
            row = dict(self._check_session(db, peer_id, session))
            now = time.time()
            rule = self.epoch_rule
            returning = rule is not None and not db.execute(
                f"SELECT {_ALIVE} FROM peers p WHERE p.peer_id=?", (now - rule.peer_timeout, peer_id)).fetchone()[0]
            db.execute(
                f"UPDATE peers SET last_seen=?, epoch={self._greatest}(epoch, ?), samples_per_second=?, left_at=NULL "
                "WHERE peer_id=?",
                (now, epoch, samples_per_second, peer_id),
            )
            if rule is not None and (returning or self._voters_changed or now - self._advanced_at >= ADVANCE_SECONDS):
                self._advance(db, now)
        return row

    @contextmanager
    def _voters_write(self):
        """A write that can take voters away (leave, evict, revoke, remove org): the next heartbeat re-checks."""
        with self._write() as db:
            yield db
        self._voters_changed = True  # after the commit, so the check that clears it sees this change

    def _advance(self, db: sqlite3.Connection, now: float) -> None:
        checked_epoch.advance(db, self.epoch_rule, now)
        self._voters_changed, self._advanced_at = False, now

    def leave(self, peer_id: str, session: str) -> None:
        with self._voters_write() as db:
            self._check_session(db, peer_id, session)
            db.execute("UPDATE peers SET left_at=? WHERE peer_id=?", (time.time(), peer_id))

    # --- reports ------------------------------------------------------------------------------
    def record_report(
        self, peer_id: str, session: str, report_id: str, epoch: int, samples: int, loss: float,
        compute_seconds: float, metrics: dict[str, float],
    ) -> bool:
        """Append one report; returns False when this report id was already recorded."""
        with self._write() as db:
            return self._record_report(db, peer_id, session, report_id, epoch, samples, loss, compute_seconds,
                                       metrics)

    def _record_report(self, db, peer_id: str, session: str, report_id: str, epoch: int, samples: int, loss: float,
                       compute_seconds: float, metrics: dict[str, float]) -> bool:
        """``record_report`` inside the caller's transaction (coordinator/books/reports.py)."""
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
            f"UPDATE peers SET last_seen=?, epoch={self._greatest}(epoch, ?), left_at=NULL WHERE peer_id=?",
            (now, epoch + 1, peer_id),
        )
        if self.epoch_rule is not None:
            self._advance(db, now)
        return True

    def report_ids(self) -> set[str]:
        return {row["report_id"] for row in self._read("SELECT report_id FROM reports")}

    # --- the run as a whole -------------------------------------------------------------------
    def run_epoch(self) -> int:
        """The run's checked epoch (coordinator/books/run_epoch.py): the one number every view shows."""
        with self._lock:
            return checked_epoch.current(self._db)

    def judge_report_epoch(self, peer_id: str, epoch: int) -> checked_epoch.Verdict:
        """Whether a Report of ``epoch`` is possible now (needs ``epoch_rule``). A report refused for now
        (not evidence) is remembered as the peer's claim: its next epoch is no jump."""
        with self._lock:
            verdict = checked_epoch.judge_report(self._db, self.epoch_rule, peer_id, epoch)
        if verdict.refused and not verdict.evidence:
            with self._write() as db:
                db.execute("INSERT INTO epoch_claims VALUES (?, ?) ON CONFLICT (peer_id) DO UPDATE SET "
                           f"epoch = {self._greatest}(epoch_claims.epoch, excluded.epoch)", (peer_id, epoch))
        return verdict

    def summarize(self, peer_timeout: float, now: float | None = None) -> RunSummary:
        """The swarm's figures now: one read of the live peers (by the index on last_seen)."""
        now = time.time() if now is None else now
        # plain tuples: at 10,000 peers this is most of the read's cost
        live = self._tuples(f"SELECT p.peer_id, p.epoch, p.samples_per_second FROM peers p WHERE {_ALIVE}",
                            (now - peer_timeout,))
        epochs = {peer: epoch for peer, epoch, _ in live}
        return RunSummary(now, len(live), sum(rate for _, _, rate in live), epochs, tuple(sorted(epochs.values())))

    def run_summary(self, peer_timeout: float) -> RunSummary:
        """The swarm's figures for heartbeat replies: ``summarize`` again when older than SUMMARY_SECONDS.
        While one thread reads them, the others use the previous summary rather than wait."""
        summary = self._summary
        if summary is not None and 0 <= time.time() - summary.at < SUMMARY_SECONDS:
            return summary
        if not self._summary_lock.acquire(blocking=summary is None):
            return summary
        try:
            summary = self._summary
            if summary is None or not 0 <= time.time() - summary.at < SUMMARY_SECONDS:
                summary = self._summary = self.summarize(peer_timeout)
            return summary
        finally:
            self._summary_lock.release()

    def others_alive(self, peer_id: str, peer_timeout: float, now: float | None = None) -> bool:
        """Whether a live peer other than ``peer_id`` exists (read now: a newcomer must see who joined just
        before it; it stops at the first)."""
        now = time.time() if now is None else now
        return bool(self._read(f"SELECT 1 FROM peers p WHERE {_ALIVE} AND p.peer_id <> ? LIMIT 1",
                               (now - peer_timeout, peer_id)))

    def reported_samples(self, peer_id: str) -> int:
        """The samples ``peer_id`` reported (its "samples" in ``snapshot``), by the reports' index."""
        return self._read(f"SELECT {_SAMPLES} AS samples FROM reports r WHERE r.peer_id=?", (peer_id,))[0]["samples"]

    def snapshot(self, peer_timeout: float, now: float | None = None) -> dict:
        """The run's state for status displays (JSON-ready); heartbeats read ``run_summary`` instead."""
        now = time.time() if now is None else now
        peers = self._read(
            f"""SELECT {_PEER_FIELDS}, {_ALIVE} AS alive, {_SAMPLES} AS samples, COUNT(r.report_id) AS reports
               FROM peers p LEFT JOIN reports r ON r.peer_id = p.peer_id
               GROUP BY p.peer_id ORDER BY p.joined""", (now - peer_timeout,)
        )
        orgs = self._read(
            """SELECT o.name, COALESCE(SUM(r.samples), 0) AS samples,
                      (SELECT COUNT(*) FROM peers p WHERE p.org = o.name) AS peers
               FROM orgs o LEFT JOIN peers p ON p.org = o.name LEFT JOIN reports r ON r.peer_id = p.peer_id
               GROUP BY o.name ORDER BY samples DESC, o.name"""
        )
        last = self._read(
            f"SELECT epoch, SUM(samples * loss) / {self._greatest}(SUM(samples), 1) AS loss FROM reports "
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
                "alive": bool(row["alive"]),
                "evicted": row["evicted"],
            }
            for row in peers
        ]
        return {
            "run_id": self.meta("run_id"),
            "epoch": self.run_epoch(),  # checked by a quorum, never one peer's report or heartbeat
            "samples": totals["samples"],
            "loss": last[0]["loss"] if last else None,
            "metrics": json.loads(metrics_rows[0]["metrics"]) if metrics_rows else {},
            "swarm_samples_per_second": self.summarize(peer_timeout, now).swarm_samples_per_second,
            "peers": peer_list,
            "orgs": [{"name": row["name"], "samples": row["samples"], "peers": row["peers"]} for row in orgs],
        }
