"""Credit: the cheap checks on every report, audit verdicts, strikes, bans and settlement per window.

Its tables live in the ledger's sqlite file next to the ledger's own (which keeps admission and the
raw reports). A report's samples are *provisional* until its window of epochs closes *and* its
audits reach the detection confidence of ``[verification]`` (a peer faking ``cheat_fraction`` of the
window would have been caught with probability ``detection_confidence``; coordinator/confidence.py).
Then the window is *settled*, or *forfeited* after a failed audit or a ban. Only reports whose
parameters matched a trusted snapshot can be audited; the others' samples are never paid
("unverified"), so a peer gains nothing by making its work unauditable. A window that never reaches
the confidence stays provisional. Everything that changes credit goes into the hash-chained log.
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

from coordinator.books import accounting, contribution_log, schema
from coordinator.books import run_epoch as checked_epoch
from coordinator.books.binding import BINDING
from coordinator.books.connection import put_meta
from coordinator.books.ledger import BANNED, evict_peer
from coordinator.books.store import Store
from coordinator.confidence import required_audits, window_confidence
from peer.report import canonical_body, canonical_bytes, signature_valid
from peer.runconfig import VerificationConfig

AUDITABLE = "done"  # audit_state of a report whose parameters matched a trusted snapshot

NORM_OUTLIER = 10.0  # a norm this many times off the epoch's median gets audited for sure
THROUGHPUT_OUTLIER = 20.0  # samples/s this many times the swarm's median gets audited more
MAX_MICRO_BATCHES = 100_000

PASS, INCONCLUSIVE, FAIL = "pass", "inconclusive", "fail"
# a report's distinct micro-batches with a verdict that counts as drawn (pass or fail), in SQL on `r`
_AUDITED = ("SELECT COUNT(DISTINCT a.micro_batch) FROM audits a WHERE a.report_id = r.report_id "
            "AND a.micro_batch >= 0 AND a.verdict IN ('pass', 'fail')")
WINDOW_FIELDS = ("window", "state", "micro_batches", "verifiable", "audited", "audits_needed", "confidence",
                 "samples", "samples_unverified")


@dataclass(frozen=True)
class Admitted:
    fresh: bool
    problems: list[str]


def _digest(projection) -> str:
    return hashlib.sha256(json.dumps(list(projection)).encode()).hexdigest()


class Credit(Store):
    MIGRATIONS = schema.LEDGER

    def __init__(self, target, verification: VerificationConfig, run_id: str, flops_per_sample: float = 0.0,
                 proof_required: bool = True):
        self.v = verification
        self.run_id = run_id
        # DiLoCo reports carry no per-micro-batch sketches yet: accepted unaudited (see auditor.py)
        self.proof_required = proof_required
        self.flops_per_sample = flops_per_sample
        super().__init__(target)  # the ledger's: its sqlite file or its postgresql:// URL
        with self._write() as db:  # so `coordinator ledger` (which has no run.toml) windows credit the same way
            put_meta(db, "verification", json.dumps(dataclasses.asdict(verification)))
        self.on_ban = None  # on_ban(peer_id, reason): revocation hook (token + swarm access)
        self.binding = None  # coordinator/books/binding.py: the averaged vector against the report (use_binding)

    def use_binding(self, binding) -> None:
        """Check the attestation records reports carry (their tables commit with the report)."""
        self.binding = binding

    # --- standing -----------------------------------------------------------------------------
    def banned_reason(self, peer_id: str) -> str | None:
        rows = self._read("SELECT reason FROM standing WHERE peer_id=? AND banned=1", (peer_id,))
        return rows[0]["reason"] if rows else None

    def plausible_epoch(self) -> int:
        """The highest epoch an honest peer can be at: the run's checked epoch plus slack."""
        return self.run_epoch() + self.v.epoch_slack

    def next_epoch_of(self, peer_id: str) -> int:
        """The epoch after the last one ``peer_id`` reported (0 before any; coordinator/books/run_epoch.py)."""
        with self._lock:
            return checked_epoch.next_epoch_of(self._db, peer_id)

    def run_epoch(self) -> int:
        """The epoch the run has reached as a quorum of peers reported it (coordinator/books/run_epoch.py)."""
        with self._lock:
            return checked_epoch.current(self._db)

    def quiet_for(self, seconds: float) -> bool:
        row = self._read("SELECT MAX(received) AS t FROM credit_reports")[0]
        return row["t"] is None or time.time() - row["t"] > seconds

    def peer_of_swarm_id(self, hivemind_peer_id: str) -> str | None:
        rows = self._read("SELECT peer_id FROM peers WHERE hivemind_peer_id=?", (hivemind_peer_id,))
        return rows[0]["peer_id"] if rows else None

    def ban(self, peer_id: str, reason: str) -> bool:
        """Ban a peer: refuse its reports and heartbeats, forfeit every window not yet settled, log it.

        A ban reaches what admitted the peer: the tokens bound to it are revoked (a new identity on
        the same token is refused; peers it admitted before stay admitted) and its org gets a strike
        (``coordinator org list``), and the peer is evicted (its session refused, its swarm access
        withdrawn), all in one transaction. ``on_ban`` is told after the commit. False if already banned.
        """
        with self._write() as db:
            banned = self._ban(db, peer_id, reason)
        if banned:
            self._banned([(peer_id, reason)])
        return banned

    def _ban(self, db, peer_id: str, reason: str) -> bool:
        """``ban`` inside the caller's transaction: the ban and the eviction commit together or not at all."""
        if db.execute("SELECT 1 FROM standing WHERE peer_id=? AND banned=1", (peer_id,)).fetchone():
            return False
        now = time.time()
        db.execute("INSERT INTO standing (peer_id) VALUES (?) ON CONFLICT DO NOTHING", (peer_id,))
        db.execute("UPDATE standing SET banned=1, reason=?, at=? WHERE peer_id=?", (reason, now, peer_id))
        org, token_ids = self._revoke_admission(db, peer_id, reason, now)
        contribution_log.append(db, "ban", peer_id, {"reason": reason, "org": org, "tokens_revoked": token_ids})
        windows = {row["epoch"] // self.v.window_epochs for row in db.execute(
            "SELECT epoch FROM credit_reports WHERE peer_id=?", (peer_id,))}
        for window in sorted(windows):
            self._settle_one(db, peer_id, window, forfeit=True)
        evict_peer(db, peer_id, f"{BANNED}: {reason}")
        return True

    def _banned(self, bans: list[tuple[str, str]]) -> None:
        """After the commit of ``bans``: tell ``on_ban`` (the serving process's caches)."""
        for peer_id, reason in bans:
            if self.on_ban is not None:
                self.on_ban(peer_id, reason)

    @staticmethod
    def _revoke_admission(db, peer_id: str, reason: str, now: float) -> tuple[str | None, list[str]]:
        """Revoke the peer's tokens and strike its org, in the ban's transaction."""
        row = db.execute("SELECT org FROM peers WHERE peer_id=?", (peer_id,)).fetchone()
        token_ids = sorted(r[0] for r in db.execute("SELECT token_id FROM token_bindings WHERE peer_id=?", (peer_id,)))
        for token_id in token_ids:
            db.execute("UPDATE tokens SET revoked=? WHERE id=? AND revoked IS NULL", (now, token_id))
        if row is None:
            return None, token_ids
        db.execute("INSERT INTO org_strikes VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                   (peer_id, row["org"], json.dumps(token_ids), reason[:200], now))
        return row["org"], token_ids

    def org_strikes(self) -> dict[str, int]:
        return accounting.org_strikes(self._read)

    # --- reports ------------------------------------------------------------------------------
    def signature_ok(self, request, public_key: bytes) -> bool:
        body = canonical_body(request, self.run_id)
        return bool(request.signature) and signature_valid(public_key, canonical_bytes(body), request.signature)

    def record_report(self, request, public_key: bytes, micro_batch_size: int) -> Admitted:
        """Store a (signature-checked) report and run the cheap checks; idempotent on report_id."""
        with self._write() as db:
            admitted, bans = self._record_report(db, request, public_key, micro_batch_size)
        self._banned(bans)
        return admitted

    def _record_report(self, db, request, public_key: bytes, micro_batch_size: int) -> tuple[Admitted, list]:
        """``record_report`` inside the caller's transaction, the bans it makes due included; returns
        them too, for ``_banned`` after the commit (coordinator/books/reports.py)."""
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
        if db.execute("SELECT 1 FROM credit_reports WHERE report_id=?", (request.report_id,)).fetchone():
            return Admitted(False, []), []
        for s in sketches:
            if s["norm"] == 0.0:  # an exactly fitted micro-batch: every zero gradient sketches alike
                continue          # (honest late in a run; a faked zero fails its replay instead)
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
            "median_norm, samples_per_second, received, audit_state, micro_batches) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request.report_id, request.peer_id, request.epoch, request.samples, credited,
             json.dumps(entry["report"]), json.dumps(flags), median_norm,
             min(samples_per_second, 1e12), time.time(),
             "done" if problems else "unproven" if unproven else "new", len(sketches)),
        )
        contribution_log.append(db, "report", request.peer_id, entry)
        for problem in problems:
            self._audit(db, request.report_id, request.peer_id, request.epoch, -1, FAIL, None, None, problem)
        evidence = self.binding.record(db, request)[0] if self.binding is not None else []
        for e in evidence:  # may name other peers: a sender or reducer this report's records disagree with
            self._audit(db, e.report_id, e.peer_id, e.epoch, BINDING, FAIL, e.relative_error, e.norm_ratio,
                        e.reason)
        bans = [ban for peer in sorted({request.peer_id, *(e.peer_id for e in evidence)})
                for ban in self._ban_if_due(db, peer)]
        return Admitted(True, problems), bans

    def record_check_failure(self, peer_id: str, epoch: int, reason: str) -> None:
        """A failed cheap check on a report that was refused (e.g. a forged signature)."""
        with self._write() as db:
            self._audit(db, None, peer_id, epoch, -1, FAIL, None, None, reason)
            bans = self._ban_if_due(db, peer_id)
        self._banned(bans)

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

    def record_audit(self, report_id: str, peer_id: str, epoch: int, micro_batch: int, verdict: str,
                     relative_error: float | None, ratio: float | None, reason: str) -> None:
        with self._write() as db:
            self._audit(db, report_id, peer_id, epoch, micro_batch, verdict, relative_error, ratio, reason)
            bans = self._ban_if_due(db, peer_id)
        self._banned(bans)

    def _audit(self, db, report_id, peer_id, epoch, micro_batch, verdict, relative_error, ratio, reason) -> None:
        finite = lambda x: None if x is None or not math.isfinite(x) else x  # noqa: E731
        db.execute("INSERT INTO audits (report_id, peer_id, epoch, micro_batch, verdict, relative_error, norm_ratio, "
                   "reason, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (report_id, peer_id, epoch, micro_batch, verdict, finite(relative_error), finite(ratio), reason,
                    time.time()))
        contribution_log.append(db, "audit", peer_id, {
            "report_id": report_id, "epoch": epoch, "micro_batch": micro_batch, "verdict": verdict,
            "relative_error": finite(relative_error), "norm_ratio": finite(ratio), "reason": reason})

    def _ban_if_due(self, db, peer_id: str) -> list[tuple[str, str]]:
        """The strike a failure makes due, and the ban, in the failure's transaction; returns the ban made."""
        reason = self._strike_if_due(db, peer_id)
        return [(peer_id, reason)] if reason and self._ban(db, peer_id, reason) else []

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
    def window_of(self, epoch: int) -> int:
        return epoch // self.v.window_epochs

    def window_reports(self, window: int) -> list[sqlite3.Row]:
        """The reports of a window, each with its audited micro-batches (pass or fail verdicts)."""
        lo, hi = window * self.v.window_epochs, (window + 1) * self.v.window_epochs
        return self._read(f"SELECT r.*, ({_AUDITED}) AS audited FROM credit_reports r WHERE epoch>=? AND epoch<?",
                          (lo, hi))

    def audited_micro_batches(self, report_id: str) -> set[int]:
        return {row["micro_batch"] for row in self._read(
            "SELECT DISTINCT micro_batch FROM audits WHERE report_id=? AND micro_batch>=0 AND verdict IN (?, ?)",
            (report_id, PASS, FAIL))}

    def audits_needed(self, micro_batches: int) -> int:
        """Audits a window of this many verifiable micro-batches needs (the confidence rule, and the floor)."""
        return required_audits(self.v, micro_batches)

    def confident(self, strata: list[tuple[int, int]]) -> bool:
        """Whether audits (micro-batches, audited) per report reach the window's detection confidence."""
        total = sum(m for m, _ in strata)
        return total > 0 and sum(k for _, k in strata) >= min(self.v.audit_floor, total) and \
            window_confidence(strata, self.v.cheat_fraction) >= self.v.detection_confidence

    def settle(self, run_epoch: int) -> int:
        """Settle every closed window (run_epoch past its end) whose reports are all judged and whose audits
        reach the detection confidence; a window with a failed audit is forfeited. Others stay provisional."""
        settled = 0
        with self._write() as db:
            # the auditor closes the last windows early at the run's end: the views must agree
            row = db.execute("SELECT value FROM meta WHERE key='closed_through'").fetchone()
            if row is None or int(row["value"]) < run_epoch:  # written only when it moves (this runs every poll)
                put_meta(db, "closed_through", str(run_epoch))
            for (peer_id, window), summary in self._summaries(db, run_epoch, undecided=True).items():
                if summary["state"] == "forfeit-due":
                    self._settle_one(db, peer_id, window, forfeit=True)
                    settled += 1
                elif summary["state"] == "settle-due":
                    self._settle_one(db, peer_id, window, forfeit=False)
                    settled += 1
        return settled

    def _summaries(self, db, run_epoch: int, peer_id: str | None = None,
                   undecided: bool = False) -> dict[tuple[str, int], dict]:
        """(peer, window) -> what the ledger shows of a window: state, micro-batches, audited, confidence.

        state: settled / forfeited (decided); open (not closed, or reports still to judge); provisional
        (closed, confidence not reached); settle-due / forfeit-due (closed, to be decided now).
        """
        w = self.v.window_epochs
        where, args = ("WHERE r.peer_id=?", (peer_id,)) if peer_id else ("WHERE 1=1", ())
        if undecided:  # what settlement and top-ups look at, every few hundred ms: skip decided windows
            where += (f" AND NOT EXISTS (SELECT 1 FROM settlements s WHERE s.peer_id = r.peer_id "
                      f'AND s."window" = r.epoch / {w})')
        reports = db.execute(f"SELECT r.peer_id, r.epoch, r.micro_batches, r.credited_samples, r.audit_state, "
                             f"({_AUDITED}) AS audited FROM credit_reports r {where}", args).fetchall()
        decided = {(row["peer_id"], row["window"]): dict(row) for row in db.execute(
            "SELECT * FROM settlements" + (" WHERE peer_id=?" if peer_id else ""), args)}
        failed = {(row["peer_id"], row["window"]) for row in db.execute(
            f'SELECT DISTINCT peer_id, epoch / {w} AS "window" FROM audits WHERE verdict=?' +
            (" AND peer_id=?" if peer_id else ""), (FAIL, *args))}
        summaries: dict[tuple[str, int], dict] = {}
        for row in reports:
            key = (row["peer_id"], row["epoch"] // w)
            s = summaries.setdefault(key, {"window": key[1], "micro_batches": 0, "verifiable": 0, "audited": 0,
                                           "samples": 0, "samples_unverified": 0, "open_reports": 0, "strata": []})
            s["micro_batches"] += row["micro_batches"]
            s["open_reports"] += row["audit_state"] == "new"
            if row["audit_state"] == AUDITABLE:
                s["verifiable"] += row["micro_batches"]
                s["audited"] += row["audited"]
                s["samples"] += row["credited_samples"]
                s["strata"].append((row["micro_batches"], row["audited"]))
            else:
                s["samples_unverified"] += row["credited_samples"]
        for key, s in summaries.items():
            strata = s.pop("strata")
            s["audits_needed"] = self.audits_needed(s["verifiable"]) if s["verifiable"] else 0
            s["confidence"] = round(window_confidence(strata, self.v.cheat_fraction), 4) if strata else 0.0
            closed = (key[1] + 1) * w < run_epoch
            if key in decided:
                s["state"] = decided[key]["status"]
                s["confidence"] = s["confidence"] if s["state"] == "settled" else 0.0
            elif not closed or s["open_reports"]:
                s["state"] = "open"
            elif key in failed:
                s["state"] = "forfeit-due"
            elif self.confident(strata):
                s["state"] = "settle-due"
            else:
                s["state"] = "provisional"
            del s["open_reports"]
        return summaries

    def _settle_one(self, db, peer_id: str, window: int, forfeit: bool) -> None:
        if db.execute('SELECT 1 FROM settlements WHERE peer_id=? AND "window"=?', (peer_id, window)).fetchone():
            return
        lo, hi = window * self.v.window_epochs, (window + 1) * self.v.window_epochs
        failed = db.execute("SELECT COUNT(*) FROM audits WHERE peer_id=? AND verdict=? AND epoch>=? AND epoch<?",
                            (peer_id, FAIL, lo, hi)).fetchone()[0]
        rows = db.execute(f"SELECT r.micro_batches, r.credited_samples, r.audit_state, ({_AUDITED}) AS audited "
                          f"FROM credit_reports r WHERE peer_id=? AND epoch>=? AND epoch<?",
                          (peer_id, lo, hi)).fetchall()
        verified = [row for row in rows if row["audit_state"] == AUDITABLE]
        samples = sum(row["credited_samples"] for row in rows)
        strata = [(row["micro_batches"], row["audited"]) for row in verified]
        confidence = window_confidence(strata, self.v.cheat_fraction) if strata else 0.0
        status = "forfeited" if forfeit or failed else "settled"
        # only micro-batches the audit could have drawn are paid; the rest is "unverified" (never paid)
        credited = sum(row["credited_samples"] for row in verified) if status == "settled" else 0
        flops = credited * self.flops_per_sample
        db.execute("INSERT INTO settlements VALUES (?, ?, ?, ?, ?, ?)", (peer_id, window, credited, flops, status,
                                                                          time.time()))
        contribution_log.append(db, "settle", peer_id, {
            "window": window, "samples": credited, "flops": flops, "status": status, "reported_samples": samples,
            "micro_batches": sum(row["micro_batches"] for row in rows),
            "verifiable": sum(row["micro_batches"] for row in verified),
            "audited": sum(row["audited"] for row in verified), "confidence": round(confidence, 6)})

    def _closed_through(self) -> int:
        """The run epoch windows are closed against: the run's, or further where the auditor closed the
        last windows at the run's end."""
        rows = self._read("SELECT value FROM meta WHERE key='closed_through'")
        return max(self.run_epoch(), int(rows[0]["value"]) if rows else 0)

    def provisional_windows(self, run_epoch: int) -> list[int]:
        """Closed windows some peer still waits on (confidence not reached): where top-up audits go."""
        run_epoch = max(run_epoch, self._closed_through())
        with self._lock:
            summaries = self._summaries(self._db, run_epoch, undecided=True)
        return sorted({window for (_, window), s in summaries.items() if s["state"] == "provisional"})

    # --- views --------------------------------------------------------------------------------
    def windows(self, peer_id: str | None = None) -> dict[str, list[dict]]:
        """peer -> its windows, oldest first (see ``_summaries``; *-due shows as provisional until decided)."""
        run_epoch = self._closed_through()
        with self._lock:
            summaries = self._summaries(self._db, run_epoch, peer_id)
        result: dict[str, list[dict]] = {}
        for (peer, window), s in sorted(summaries.items()):
            state = "provisional" if s["state"].endswith("-due") else s["state"]
            result.setdefault(peer, []).append({**s, "state": state})
        return result

    def peer_rows(self) -> list[dict]:
        """One row per peer that reported or was judged (org from the ledger's peers table)."""
        rows = self._read("""
            SELECT p.peer_id, p.org,
                (SELECT COALESCE(SUM(flops), 0) FROM settlements s WHERE s.peer_id = p.peer_id) AS flops,
                (SELECT COUNT(*) FROM settlements s WHERE s.peer_id = p.peer_id AND s.status='forfeited') AS forfeited,
                (SELECT COUNT(*) FROM audits a WHERE a.peer_id = p.peer_id AND a.verdict='pass') AS passed,
                (SELECT COUNT(*) FROM audits a WHERE a.peer_id = p.peer_id AND a.verdict='fail') AS failed,
                (SELECT COUNT(*) FROM audits a WHERE a.peer_id = p.peer_id AND a.verdict='inconclusive') AS unsure,
                COALESCE(st.strikes, 0) AS strikes, COALESCE(st.banned, 0) AS banned, st.reason AS reason
            FROM peers p LEFT JOIN standing st ON st.peer_id = p.peer_id ORDER BY p.joined""")
        accounts = accounting.accounts(self._read)  # provisional and settled samples: the accounts' definition
        windows = self.windows()
        result = []
        for row in rows:
            own = windows.get(row["peer_id"], [])
            unverified = sum(w["samples_unverified"] for w in own if w["state"] in ("settled", "forfeited"))
            result.append({
                "peer": row["peer_id"], "org": row["org"],
                "samples_provisional": int(accounts[row["peer_id"]].credit_pending),
                "samples_settled": int(accounts[row["peer_id"]].credit_settled), "samples_unverified": unverified, "flops_settled": row["flops"],
                "windows_forfeited": row["forfeited"], "audits_passed": row["passed"], "audits_failed": row["failed"],
                "audits_inconclusive": row["unsure"], "strikes": row["strikes"], "banned": bool(row["banned"]),
                "ban_reason": row["reason"] if row["banned"] else None,
                "windows": [{key: w[key] for key in WINDOW_FIELDS} for w in own],
            })
        return result

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
        """Problems found in the contribution log and in the tables derived from it (empty: intact).

        Read in one snapshot: the auditor and serve keep committing while an operator verifies."""
        with self._snapshot():
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
