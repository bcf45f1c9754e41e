"""Credit: the cheap checks on every report, audit verdicts, strikes, bans and settlement per window.

Its tables live in the ledger's sqlite file next to the ledger's own (which keeps admission and the
raw reports). A report's samples are *provisional* until its window of epochs closes; then they are
*settled* if the peer had no failed audit in that window and is not banned, else *forfeited*.
Everything that changes credit is also appended to the hash-chained contribution log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sqlite3
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator import contribution_log
from coordinator import run_epoch as checked_epoch
from coordinator.binding import BINDING
from coordinator.store import SqliteStore
from peer.report import canonical_body, canonical_bytes, signature_valid
from peer.runconfig import VerificationConfig

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS standing (
    peer_id TEXT PRIMARY KEY, strikes INTEGER NOT NULL DEFAULT 0, banned INTEGER NOT NULL DEFAULT 0,
    reason TEXT, at REAL
) STRICT;
CREATE TABLE IF NOT EXISTS settlements (
    peer_id TEXT NOT NULL, window INTEGER NOT NULL, samples INTEGER NOT NULL, flops REAL NOT NULL,
    status TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (peer_id, window)
) STRICT;
"""

NORM_OUTLIER = 10.0  # a norm this many times off the epoch's median gets audited for sure
THROUGHPUT_OUTLIER = 20.0  # samples/s this many times the swarm's median gets audited more
MAX_MICRO_BATCHES = 100_000

PASS, INCONCLUSIVE, FAIL = "pass", "inconclusive", "fail"


@dataclass(frozen=True)
class Admitted:
    fresh: bool
    problems: list[str]


def _digest(projection) -> str:
    return hashlib.sha256(json.dumps(list(projection)).encode()).hexdigest()


class Credit(SqliteStore):
    def __init__(self, path: Path, verification: VerificationConfig, run_id: str, flops_per_sample: float = 0.0,
                 proof_required: bool = True):
        self.v = verification
        self.run_id = run_id
        # DiLoCo reports carry no per-micro-batch sketches yet: accepted unaudited (see auditor.py)
        self.proof_required = proof_required
        self.flops_per_sample = flops_per_sample
        super().__init__(path)
        with self._write() as db:
            for statement in (SCHEMA + contribution_log.SCHEMA).split(";\n"):
                if statement.strip():
                    db.execute(statement + (";" if "BEGIN" in statement else ""))
        with self._write() as db:  # so `coordinator ledger` (which has no run.toml) windows credit the same way
            db.execute("INSERT OR REPLACE INTO meta VALUES ('verification', ?)",
                       (json.dumps(dataclasses.asdict(verification)),))
        self.on_ban = None  # on_ban(peer_id, reason): revocation hook (token + swarm access)
        self.binding = None  # coordinator/binding.py: the averaged vector against the report (use_binding)

    def use_binding(self, binding) -> None:
        """Check the attestation records reports carry (their tables commit with the report)."""
        with self._write() as db:
            binding.create_tables(db)
        self.binding = binding

    # --- standing -----------------------------------------------------------------------------
    def banned_reason(self, peer_id: str) -> str | None:
        rows = self._read("SELECT reason FROM standing WHERE peer_id=? AND banned=1", (peer_id,))
        return rows[0]["reason"] if rows else None

    def plausible_epoch(self) -> int:
        """The highest epoch an honest peer can be at: the run's checked epoch plus slack."""
        return self.run_epoch() + self.v.epoch_slack

    def run_epoch(self) -> int:
        """The epoch the run has reached as a quorum of peers reported it (coordinator/run_epoch.py)."""
        with self._lock:
            return checked_epoch.current(self._db)

    def quiet_for(self, seconds: float) -> bool:
        row = self._read("SELECT MAX(received) AS t FROM credit_reports")[0]
        return row["t"] is None or time.time() - row["t"] > seconds

    def peer_of_swarm_id(self, hivemind_peer_id: str) -> str | None:
        rows = self._read("SELECT peer_id FROM peers WHERE hivemind_peer_id=?", (hivemind_peer_id,))
        return rows[0]["peer_id"] if rows else None

    def ban(self, peer_id: str, reason: str) -> bool:
        """Ban a peer: refuse its reports and heartbeats, forfeit its unsettled credit, log it.

        The one entry point for bans; ``on_ban`` (the admission layer's revocation of the token and
        swarm access) is called after the ban is recorded. Returns False if it was already banned.
        """
        with self._write() as db:
            if db.execute("SELECT 1 FROM standing WHERE peer_id=? AND banned=1", (peer_id,)).fetchone():
                return False
            db.execute("INSERT INTO standing (peer_id) VALUES (?) ON CONFLICT DO NOTHING", (peer_id,))
            db.execute("UPDATE standing SET banned=1, reason=?, at=? WHERE peer_id=?", (reason, time.time(), peer_id))
            contribution_log.append(db, "ban", peer_id, {"reason": reason})
            windows = {row["epoch"] // self.v.window_epochs for row in db.execute(
                "SELECT epoch FROM credit_reports WHERE peer_id=?", (peer_id,))}
            for window in sorted(windows):
                self._settle_one(db, peer_id, window, forfeit=True)
        if self.on_ban is not None:
            self.on_ban(peer_id, reason)
        return True

    # --- reports ------------------------------------------------------------------------------
    def signature_ok(self, request, public_key: bytes) -> bool:
        body = canonical_body(request, self.run_id)
        return bool(request.signature) and signature_valid(public_key, canonical_bytes(body), request.signature)

    def record_report(self, request, public_key: bytes, micro_batch_size: int) -> Admitted:
        """Store a (signature-checked) report and run the cheap checks; idempotent on report_id."""
        body = canonical_body(request, self.run_id)
        problems, flags = [], {"report": [], "micro_batches": []}
        sketches = body["sketches"]
        unproven = not sketches and not body["parameters"]["projection"] and not self.proof_required
        indices = [s["index"] for s in sketches]
        if indices != list(range(len(sketches))) or len(sketches) > MAX_MICRO_BATCHES:
            problems.append("micro-batch indices are not 0, 1, 2, ... in order")
        if any(not 0 < s["samples"] <= micro_batch_size for s in sketches):
            problems.append(f"a micro-batch claims more than the assigned {micro_batch_size} samples")
        if not unproven and sum(s["samples"] for s in sketches) != request.samples:
            problems.append(f"{request.samples} samples claimed, {sum(s['samples'] for s in sketches)} sketched")
        if not unproven and (any(len(s["projection"]) != self.v.sketch_dims for s in sketches) or
                             len(body["parameters"]["projection"]) != self.v.sketch_dims):
            problems.append(f"sketches must have {self.v.sketch_dims} dimensions")
        if not unproven and body["compute_dtype"] not in ("fp32", "bf16"):
            problems.append(f"unknown compute dtype {body['compute_dtype']!r}")
        norms = [s["norm"] for s in sketches]
        median_norm = statistics.median(norms) if norms else 0.0
        samples_per_second = request.samples / request.compute_seconds if request.compute_seconds > 0 else math.inf
        entry = {"report": json.loads(canonical_bytes(body)), "signature": request.signature.hex(),
                 "public_key": public_key.hex()}
        with self._write() as db:
            if db.execute("SELECT 1 FROM credit_reports WHERE report_id=?", (request.report_id,)).fetchone():
                return Admitted(False, [])
            for s in sketches:
                digest = _digest(s["projection"])
                seen = db.execute("SELECT * FROM sketch_digests WHERE digest=?", (digest,)).fetchone()
                if seen is not None:
                    problems.append(f"micro-batch {s['index']} repeats the sketch of peer {seen['peer_id']} "
                                    f"epoch {seen['epoch']} micro-batch {seen['micro_batch']} (copy or replay)")
                else:
                    db.execute("INSERT INTO sketch_digests VALUES (?, ?, ?, ?)",
                               (digest, request.peer_id, request.epoch, s["index"]))
            others = db.execute(
                "SELECT median_norm, samples_per_second FROM credit_reports WHERE peer_id != ? AND epoch >= ?",
                (request.peer_id, request.epoch - 2)).fetchall()
            if others:
                typical_norm = statistics.median(row["median_norm"] for row in others)
                for s in sketches:
                    if s["norm"] == 0 or typical_norm > 0 and not (
                            1 / NORM_OUTLIER <= s["norm"] / typical_norm <= NORM_OUTLIER):
                        flags["micro_batches"].append(s["index"])
                if flags["micro_batches"]:
                    flags["report"].append("norm outlier")
                typical_speed = statistics.median(min(row["samples_per_second"], 1e12) for row in others)
                if samples_per_second > THROUGHPUT_OUTLIER * max(typical_speed, 1e-9):
                    flags["report"].append("throughput implausible")
            elif any(n == 0 for n in norms):
                flags["micro_batches"].extend(s["index"] for s in sketches if s["norm"] == 0)
            credited = 0 if problems else request.samples
            db.execute(
                "INSERT INTO credit_reports (report_id, peer_id, epoch, samples, credited_samples, body, flags, "
                "median_norm, samples_per_second, received, audit_state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request.report_id, request.peer_id, request.epoch, request.samples, credited,
                 json.dumps(entry["report"]), json.dumps(flags), median_norm,
                 min(samples_per_second, 1e12), time.time(),
                 "done" if problems else "unproven" if unproven else "new"),
            )
            contribution_log.append(db, "report", request.peer_id, entry)
            for problem in problems:
                self._audit(db, request.report_id, request.peer_id, request.epoch, -1, FAIL, None, None, problem)
            evidence = self.binding.record(db, request)[0] if self.binding is not None else []
            for e in evidence:  # may name other peers: a sender or reducer this report's records disagree with
                self._audit(db, e.report_id, e.peer_id, e.epoch, BINDING, FAIL, e.relative_error, e.norm_ratio,
                            e.reason)
            bans = {peer: self._strike_if_due(db, peer) for peer in {request.peer_id, *(e.peer_id for e in evidence)}}
        for peer, reason in bans.items():
            if reason:
                self.ban(peer, reason)
        return Admitted(True, problems)

    def record_check_failure(self, peer_id: str, epoch: int, reason: str) -> None:
        """A failed cheap check on a report that was refused (e.g. a forged signature)."""
        with self._write() as db:
            self._audit(db, None, peer_id, epoch, -1, FAIL, None, None, reason)
            banned = self._strike_if_due(db, peer_id)
        if banned:
            self.ban(peer_id, banned)

    # --- audits -------------------------------------------------------------------------------
    def reports_to_audit(self) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM credit_reports WHERE audit_state='new' ORDER BY received")

    def reports_of_epoch(self, epoch: int) -> list[sqlite3.Row]:
        return self._read("SELECT * FROM credit_reports WHERE epoch=?", (epoch,))

    def mark_report(self, report_id: str, state: str) -> None:
        with self._write() as db:
            db.execute("UPDATE credit_reports SET audit_state=? WHERE report_id=?", (state, report_id))

    def passed_audits(self, peer_id: str) -> int:
        return self._read("SELECT COUNT(*) AS n FROM audits WHERE peer_id=? AND verdict='pass'", (peer_id,))[0]["n"]

    def audits_in_window(self, peer_id: str, window: int) -> int:
        lo, hi = window * self.v.window_epochs, (window + 1) * self.v.window_epochs
        return self._read("SELECT COUNT(*) AS n FROM audits WHERE peer_id=? AND epoch>=? AND epoch<? AND "
                          "micro_batch>=0", (peer_id, lo, hi))[0]["n"]

    def record_audit(self, report_id: str, peer_id: str, epoch: int, micro_batch: int, verdict: str,
                     relative_error: float | None, ratio: float | None, reason: str) -> None:
        with self._write() as db:
            self._audit(db, report_id, peer_id, epoch, micro_batch, verdict, relative_error, ratio, reason)
            banned = self._strike_if_due(db, peer_id)
        if banned:
            self.ban(peer_id, banned)

    def _audit(self, db, report_id, peer_id, epoch, micro_batch, verdict, relative_error, ratio, reason) -> None:
        finite = lambda x: None if x is None or not math.isfinite(x) else x  # noqa: E731
        db.execute("INSERT INTO audits (report_id, peer_id, epoch, micro_batch, verdict, relative_error, norm_ratio, "
                   "reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (report_id, peer_id, epoch, micro_batch, verdict, finite(relative_error), finite(ratio), reason,
                    time.time()))
        contribution_log.append(db, "audit", peer_id, {
            "report_id": report_id, "epoch": epoch, "micro_batch": micro_batch, "verdict": verdict,
            "relative_error": finite(relative_error), "norm_ratio": finite(ratio), "reason": reason})

    def _strike_if_due(self, db, peer_id: str) -> str | None:
        """Two independent failures (distinct epoch / micro-batch) make a strike; returns a ban reason when due."""
        failures = db.execute("SELECT DISTINCT epoch, micro_batch, reason FROM audits WHERE peer_id=? AND verdict=?",
                              (peer_id, FAIL)).fetchall()
        distinct = {(row["epoch"], row["micro_batch"]) for row in failures}
        strikes = len(distinct) // 2
        db.execute("INSERT INTO standing (peer_id) VALUES (?) ON CONFLICT DO NOTHING", (peer_id,))
        row = db.execute("SELECT strikes, banned FROM standing WHERE peer_id=?", (peer_id,)).fetchone()
        if strikes > row["strikes"]:
            db.execute("UPDATE standing SET strikes=? WHERE peer_id=?", (strikes, peer_id))
            contribution_log.append(db, "strike", peer_id, {"strikes": strikes, "failures": len(distinct)})
        if strikes >= self.v.ban_after_strikes and not row["banned"]:
            return f"{strikes} strike(s): {failures[-1]['reason']}"
        return None

    # --- settlement ---------------------------------------------------------------------------
    def settle(self, run_epoch: int) -> int:
        """Settle every window that has closed (run_epoch past its end) and whose reports are audited."""
        settled = 0
        with self._write() as db:
            rows = db.execute(
                "SELECT peer_id, epoch / ? AS window, SUM(audit_state='new') AS open FROM credit_reports "
                "GROUP BY peer_id, window", (self.v.window_epochs,)).fetchall()
            for row in rows:
                closed = (row["window"] + 1) * self.v.window_epochs < run_epoch
                done = db.execute("SELECT 1 FROM settlements WHERE peer_id=? AND window=?",
                                  (row["peer_id"], row["window"])).fetchone()
                if closed and not done and not row["open"]:
                    self._settle_one(db, row["peer_id"], row["window"], forfeit=False)
                    settled += 1
        return settled

    def _settle_one(self, db, peer_id: str, window: int, forfeit: bool) -> None:
        if db.execute("SELECT 1 FROM settlements WHERE peer_id=? AND window=?", (peer_id, window)).fetchone():
            return
        lo, hi = window * self.v.window_epochs, (window + 1) * self.v.window_epochs
        failed = db.execute("SELECT COUNT(*) FROM audits WHERE peer_id=? AND verdict=? AND epoch>=? AND epoch<?",
                            (peer_id, FAIL, lo, hi)).fetchone()[0]
        samples = db.execute("SELECT COALESCE(SUM(credited_samples), 0) FROM credit_reports WHERE peer_id=? AND "
                             "epoch>=? AND epoch<?", (peer_id, lo, hi)).fetchone()[0]
        judged, passed = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(verdict=?), 0) FROM audits WHERE peer_id=? AND epoch>=? AND epoch<?",
            (PASS, peer_id, lo, hi)).fetchone()
        # audited, yet nothing could be confirmed (e.g. every report started from other parameters):
        # not punished, not credited
        status = "forfeited" if forfeit or failed else "unverified" if judged and not passed else "settled"
        credited = samples if status == "settled" else 0
        flops = credited * self.flops_per_sample
        db.execute("INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?)", (peer_id, window, credited, flops, status,
                                                                          time.time()))
        contribution_log.append(db, "settle", peer_id, {"window": window, "samples": credited, "flops": flops,
                                                        "status": status, "reported_samples": samples})

    # --- views --------------------------------------------------------------------------------
    def peer_rows(self) -> list[dict]:
        """One row per peer that reported or was judged (org from the ledger's peers table)."""
        rows = self._read("""
            SELECT p.peer_id, p.org,
                (SELECT COALESCE(SUM(r.credited_samples), 0) FROM credit_reports r WHERE r.peer_id = p.peer_id
                   AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.peer_id = r.peer_id
                                   AND s.window = r.epoch / ?)) AS provisional,
                (SELECT COALESCE(SUM(samples), 0) FROM settlements s WHERE s.peer_id = p.peer_id) AS settled,
                (SELECT COALESCE(SUM(flops), 0) FROM settlements s WHERE s.peer_id = p.peer_id) AS flops,
                (SELECT COUNT(*) FROM settlements s WHERE s.peer_id = p.peer_id AND s.status='forfeited') AS forfeited,
                (SELECT COUNT(*) FROM audits a WHERE a.peer_id = p.peer_id AND a.verdict='pass') AS passed,
                (SELECT COUNT(*) FROM audits a WHERE a.peer_id = p.peer_id AND a.verdict='fail') AS failed,
                (SELECT COUNT(*) FROM audits a WHERE a.peer_id = p.peer_id AND a.verdict='inconclusive') AS unsure,
                COALESCE(st.strikes, 0) AS strikes, COALESCE(st.banned, 0) AS banned, st.reason AS reason
            FROM peers p LEFT JOIN standing st ON st.peer_id = p.peer_id ORDER BY p.joined""",
                          (self.v.window_epochs,))
        return [{
            "peer": row["peer_id"], "org": row["org"],
            "samples_provisional": 0 if row["banned"] else row["provisional"],
            "samples_settled": row["settled"], "flops_settled": row["flops"],
            "windows_forfeited": row["forfeited"], "audits_passed": row["passed"], "audits_failed": row["failed"],
            "audits_inconclusive": row["unsure"], "strikes": row["strikes"], "banned": bool(row["banned"]),
            "ban_reason": row["reason"] if row["banned"] else None,
        } for row in rows]

    def org_rows(self) -> list[dict]:
        orgs: dict[str, dict] = {}
        for row in self.peer_rows():
            org = orgs.setdefault(row["org"], {"org": row["org"], "peers": 0, "samples_provisional": 0,
                                               "samples_settled": 0, "flops_settled": 0.0, "audits_passed": 0,
                                               "audits_failed": 0, "strikes": 0, "banned": 0})
            org["peers"] += 1
            for key in ("samples_provisional", "samples_settled", "flops_settled", "audits_passed", "audits_failed",
                        "strikes"):
                org[key] += row[key]
            org["banned"] += int(row["banned"])
        return sorted(orgs.values(), key=lambda o: (-o["samples_settled"], o["org"]))

    def audit_rows(self) -> list[dict]:
        kind = lambda mb: "binding" if mb == BINDING else "check" if mb < 0 else "replay"  # noqa: E731
        return [{**dict(row), "kind": kind(row["micro_batch"])}
                for row in self._read("SELECT * FROM audits ORDER BY id")]

    # --- integrity ----------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found in the contribution log and in the tables derived from it (empty: intact)."""
        with self._lock:
            problems = contribution_log.chain_problems(self._db)
            logged_reports, logged_settlements = {}, {}
            for seq, kind, peer_id, body in self._db.execute(
                    "SELECT seq, kind, peer_id, body FROM contribution_log ORDER BY seq"):
                entry = json.loads(body)
                if kind == "report":
                    report = entry["report"]
                    message = canonical_bytes(report)
                    if not signature_valid(bytes.fromhex(entry["public_key"]), message,
                                           bytes.fromhex(entry["signature"])):
                        problems.append(f"contribution_log: entry {seq} (report of {peer_id}) has a bad signature")
                    logged_reports[report["report_id"]] = (seq, report)
                elif kind == "settle":
                    logged_settlements[(peer_id, entry["window"])] = (seq, entry)
            for row in self._db.execute("SELECT * FROM credit_reports"):
                seq, report = logged_reports.get(row["report_id"], (None, None))
                if report is None:
                    problems.append(f"credit_reports: report {row['report_id']} is not in the contribution log")
                elif (row["peer_id"], row["epoch"], row["samples"]) != (report["peer_id"], report["epoch"],
                                                                         report["samples"]) or \
                        row["credited_samples"] > report["samples"]:
                    problems.append(f"credit_reports: report {row['report_id']} disagrees with log entry {seq}")
            for row in self._db.execute("SELECT * FROM settlements"):
                seq, entry = logged_settlements.get((row["peer_id"], row["window"]), (None, None))
                if entry is None:
                    problems.append(f"settlements: peer {row['peer_id']} window {row['window']} is not in the log")
                elif (row["samples"], row["status"]) != (entry["samples"], entry["status"]):
                    problems.append(f"settlements: peer {row['peer_id']} window {row['window']} disagrees with "
                                    f"log entry {seq}")
        return problems
