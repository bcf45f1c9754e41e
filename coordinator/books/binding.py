"""Binding: the vector a peer put into an all-reduce is the vector its signed report describes.

Every member of a round attests, per (sender, reducer) pair it is part of, a count sketch of the parts
that went between them (peer/attestation_reader.py brings the records in with its reports). Two checks:

- **own report**: once a sender's "sent" records of a gradient round cover the whole vector, their sum
  must equal the sketch its report of that epoch implies, sum_i (samples_i / micro_batch_size) *
  sketch_i / n (the count sketch is linear and one epoch's micro-batch sketches share a seed), and the
  vector's norm may not exceed the same mix of the micro-batch norms (triangle inequality). A
  mismatch means the peer averaged something other than the work it reported.
- **pairs**: a sender's "sent" record and its reducer's "received" record of one pair must agree. A
  disagreement in content is a dispute between the two (one in length is a round cut short:
  "incomplete", nobody's fault). A party disputing with at least two members of the
  round, and with more of them than it agrees with, is blamed: a poisoner that lies in its records
  disputes with every honest reducer, a framing reducer with every honest sender, while an honest
  party disputes with the liars only. In a two-peer round a dispute stays unresolved.

A peer can only attest for itself: "sent" records must name it as sender, "received" ones as reducer,
and records naming a swarm id the ledger does not know are ignored. Evidence becomes a failed audit
of kind "binding" (micro-batch ``BINDING``), so coordinator/books/credit.py turns two independent ones
into a strike, a ban and forfeited credit; passes stay in this module's own table.

The tables and all their SQL live here; the credit store calls :meth:`Binding.record` inside the
transaction that stores the report, so the records and their verdicts commit with it.

What is bound: the vector each sender puts into a gradient round, to its signed report of that epoch
(through its own records, and through its reducers' records wherever three or more members take
part). What is not (yet):
- a sender that attests nothing: rounds where reducers saw its parts but it sent no records are
  recorded as "withheld", not punished, since two colluding reducers could invent such a round;
- in a two-member round a dispute cannot be resolved; colluders that are half of a round or more
  can frame an honest member;
- the sketch seed is known before the round (one per run and epoch), so a vector in the sketch's
  null space is invisible to both checks; the norm bound limits it to the slack between the vector's
  norm and the mix of micro-batch norms (about a quarter of it on digits). A seed drawn after the
  round needs sketches the peer computes after it (VERIFICATION.md, "The projection seed");
- what a reducer sends back (the aggregated part) and its own part (never on the wire) are attested
  only by itself; DiLoCo rounds get the pair check only (their reports carry no micro-batch sketches);
- under uint8 compression the own-report check only sees gross lies (see OWN_TOLERANCE).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

import torch

from peer.attestation_reader import MAX_PER_REPORT
from peer.sketch import Sketch, relative_error

log = logging.getLogger("potluck.coordinator")


BINDING = -2  # the micro-batch number of binding evidence in the audits table (-1: a cheap check)
ROLES, KINDS = ("sent", "received"), ("grad", "diloco_delta")
MAX_ID_CHARS = 128
MAX_GROUP_MEMBERS = 256          # records one author may store per round: two per counterparty
MAX_GROUPS_PER_EPOCH = 4         # rounds one author may store records for under one epoch label
# Relative error of the sum of a sender's "sent" sketches against its report, honest, by codec: the
# sender sketches decode(encode(part)), the report the exact gradient. Measured on digits (sketch dims
# 64, tests/test_binding.py::test_honest_rounds_produce_no_evidence): none 8e-8, fp16 3e-4; uint8
# median 0.30, 99th percentile 0.46, max 0.52 over 900 (vector, seed) draws (its true error is ~0.3
# there: a quarter of the gradient is exact zeros, which 8-bit buckets do not keep). So under uint8
# only gross lies are caught: a sign flip (2.0; x10: 11, exactly, the sketch being linear), noise of
# the same norm (1.4); the norm bound still catches any scale-up.
OWN_TOLERANCE = {"none": 1e-3, "fp16": 1e-2, "uint8": 1.0,
                 "sparse": 1.0}  # sparse is DiLoCo-only (peer.runconfig), and DiLoCo rounds get no own-report check
PAIR_TOLERANCE = 1e-3  # both sides sketch the same decoded numbers: only float rounding differs
WITHHELD_AFTER = 3     # epochs after a round by which a reporting peer's own records of it must be in


@dataclass(frozen=True)
class Evidence:
    """A binding failure to be recorded as a failed audit of ``peer_id``."""

    peer_id: str
    epoch: int
    report_id: str | None
    relative_error: float | None
    norm_ratio: float | None
    reason: str


def parameter_count(task, seed: int) -> int:
    """How many coordinates every averaged vector has: the task's model, built once without memory."""
    try:
        with torch.device("meta"):
            model = task.build_model(seed)
    except Exception:  # a task whose construction needs real tensors
        model = task.build_model(seed)
    return sum(p.numel() for p in model.parameters())


def malformed(request) -> str | None:
    """Why a report's attestation records cannot even be stored (None: fine to go on)."""
    if len(request.attestations) > 2 * MAX_PER_REPORT:
        return f"more than {2 * MAX_PER_REPORT} attestation records"
    for a in request.attestations:
        if not all(math.isfinite(x) for x in (*a.sketch, a.norm_sq, a.weight, a.score, a.time)):
            return "an attestation record holds a non-finite number"
        if max(len(a.role), len(a.kind), len(a.group), len(a.sender), len(a.reducer)) > MAX_ID_CHARS:
            return "an attestation record holds an oversized name"
    return None


def run_binding(config) -> "Binding | None":
    """The run's binding checks, or None (with a warning) when its task is not installed here."""
    from peer.errors import UserError
    from peer.task import load_task

    try:
        task = load_task(config.task_name, config.task_version)
    except UserError as error:
        log.warning("attestation records will not be checked: %s", error)
        return None
    return Binding.for_run(config, task)


class Binding:
    def __init__(self, parameter_count: int, micro_batch_size: int, sketch_dims: int, compression: str,
                 epoch_slack: int):
        self.parameter_count = parameter_count
        self.micro_batch_size = micro_batch_size
        self.sketch_dims = sketch_dims
        self.own_tolerance = OWN_TOLERANCE[compression]
        self.epoch_slack = epoch_slack

    @classmethod
    def for_run(cls, config, task) -> "Binding":
        return cls(parameter_count(task, config.seed), config.micro_batch_size, config.verification.sketch_dims,
                   config.averaging.compression, config.verification.epoch_slack)

    # --- intake -------------------------------------------------------------------------------
    def record(self, db, request) -> tuple[list[Evidence], list[str]]:
        """Store a (stored, signature-checked) report's records and judge every round they touch.

        Returns the evidence found and the records ignored, with why."""
        author = request.peer_id
        row = db.execute("SELECT hivemind_peer_id FROM peers WHERE peer_id=?", (author,)).fetchone()
        if row is None:
            return [], []
        swarm_id, ignored, touched = row[0], [], set()
        highest = db.execute("SELECT MAX(epoch) FROM credit_reports").fetchone()[0]
        max_epoch = (highest + 1 if highest is not None else 0) + self.epoch_slack
        if len(request.attestations) > MAX_PER_REPORT:
            ignored.append(f"{len(request.attestations) - MAX_PER_REPORT} records beyond {MAX_PER_REPORT} per report")
        for a in list(request.attestations)[:MAX_PER_REPORT]:
            why = self._refusal(db, a, swarm_id, author, max_epoch)
            if why:
                ignored.append(why)
                continue
            db.execute(
                "INSERT INTO attestations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (a.group, a.role, a.sender, a.reducer, a.kind, a.epoch, author, request.report_id, a.length,
                 json.dumps(list(a.sketch)), a.norm_sq, a.weight, a.score, int(a.clipped), a.time, time.time()))
            touched.add(a.group)
        # this report may be what a round's own-report check was waiting for
        touched.update(r[0] for r in db.execute(
            "SELECT DISTINCT group_id FROM attestations WHERE role='sent' AND kind='grad' AND sender=? AND epoch=?",
            (swarm_id, request.epoch)))
        evidence = []
        for group in sorted(touched):
            evidence += self._judge(db, group)
        self._withheld(db, swarm_id, author, request.epoch)
        if ignored:
            log.info("report %s of peer %s: ignored %d attestation record(s), e.g. %s", request.report_id, author,
                     len(ignored), ignored[0])
        return evidence, ignored

    def _refusal(self, db, a, swarm_id: str, author: str, max_epoch: int) -> str | None:
        if a.role not in ROLES or a.kind not in KINDS:
            return f"unknown role {a.role!r} or kind {a.kind!r}"
        if not a.group or not a.sender or not a.reducer:
            return "a record without group, sender or reducer"
        if (a.sender if a.role == "sent" else a.reducer) != swarm_id:
            return f"a {a.role} record attests for another peer"
        if not 0 <= a.epoch <= max_epoch:
            return f"epoch {a.epoch} is outside what the run has reached"
        if not 0 < a.length <= self.parameter_count or len(a.sketch) != self.sketch_dims or a.norm_sq < 0:
            return "length, sketch size or norm out of range"
        other = a.reducer if a.role == "sent" else a.sender
        if not db.execute("SELECT 1 FROM peers WHERE hivemind_peer_id=?", (other,)).fetchone():
            return f"unknown swarm peer {other}"
        in_group = db.execute("SELECT COUNT(*) FROM attestations WHERE author=? AND group_id=?",
                              (author, a.group)).fetchone()[0]
        if in_group >= 2 * MAX_GROUP_MEMBERS:
            return f"too many records for round {a.group}"
        groups = {r[0] for r in db.execute("SELECT DISTINCT group_id FROM attestations WHERE author=? AND epoch=?",
                                           (author, a.epoch))}
        if a.group not in groups and len(groups) >= MAX_GROUPS_PER_EPOCH:
            return f"too many rounds under epoch {a.epoch}"
        return None

    # --- judgement ----------------------------------------------------------------------------
    def _judge(self, db, group: str) -> list[Evidence]:
        rows = db.execute("SELECT * FROM attestations WHERE group_id=?", (group,)).fetchall()
        peer_of = {r[0]: r[1] for r in db.execute(
            "SELECT hivemind_peer_id, peer_id FROM peers WHERE hivemind_peer_id IN (SELECT sender FROM attestations "
            "WHERE group_id=? UNION SELECT reducer FROM attestations WHERE group_id=?)", (group, group))}
        sent = {(r["sender"], r["reducer"]): r for r in rows if r["role"] == "sent"}
        received = {(r["sender"], r["reducer"]): r for r in rows if r["role"] == "received"}
        evidence = []
        for sender in sorted({s for s, _ in sent}):
            records = [r for (s, _), r in sent.items() if s == sender and r["kind"] == "grad"]
            if records and sender in peer_of:
                seen = [r["weight"] for (s, reducer), r in received.items() if s == sender and reducer != sender]
                evidence += self._own_report(db, group, peer_of[sender], records, seen)
        for (sender, reducer), mine in sorted(sent.items()):
            theirs = received.get((sender, reducer))
            if sender != reducer and theirs is not None and sender in peer_of and reducer in peer_of:
                self._pair(db, group, peer_of[sender], peer_of[reducer], mine, theirs)
        return evidence + self._blame(db, group)

    def _done(self, db, kind: str, group: str, subject: str, counterparty: str = "") -> bool:
        return db.execute("SELECT 1 FROM binding_checks WHERE check_kind=? AND group_id=? AND subject=? AND "
                          "counterparty=?", (kind, group, subject, counterparty)).fetchone() is not None

    def _verdict(self, db, kind, group, subject, counterparty, epoch, verdict, error, ratio, detail) -> None:
        finite = lambda x: None if x is None or not math.isfinite(x) else x  # noqa: E731
        db.execute("INSERT INTO binding_checks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (kind, group, subject, counterparty, epoch, verdict, finite(error), finite(ratio), detail,
                    time.time()))

    def _own_report(self, db, group: str, peer_id: str, records, weights_seen: list[float]) -> list[Evidence]:
        """``weights_seen``: the weights the other members' "received" records saw this sender declare."""
        if self._done(db, "own_report", group, peer_id):
            return []
        epoch = records[0]["epoch"]
        if all(r["weight"] == 0 for r in records):
            # hivemind tags a peer that is loading state along with weight 0: it sends whatever its buffer
            # holds, and every rule gives that no influence. Believed once a reducer saw the weight too.
            if not weights_seen:
                return []  # no other member's records yet
            if not any(weights_seen):
                self._verdict(db, "own_report", group, peer_id, "", epoch, "unchecked", None, None,
                              "it took part with weight 0 (its vector counts for nothing)")
                return []
        covered = sum(r["length"] for r in records)
        if covered < self.parameter_count:
            return []  # not all of this sender's records are in yet
        report = db.execute("SELECT report_id, body FROM credit_reports WHERE peer_id=? AND epoch=? "
                            "ORDER BY received DESC LIMIT 1", (peer_id, epoch)).fetchone()
        if covered == self.parameter_count and report is None:
            return []  # its report of that epoch is not in yet
        report_id = report["report_id"] if report is not None else None
        sketches = json.loads(report["body"])["sketches"] if report is not None else []
        if covered > self.parameter_count:
            error, ratio = None, None
            detail = f"sent records cover {covered} coordinates of a {self.parameter_count}-coordinate vector"
        elif not sketches:
            self._verdict(db, "own_report", group, peer_id, "", epoch, "unchecked", None, None,
                          "its report of that epoch carries no micro-batch sketches")
            return []
        else:
            error, ratio = self._compare_with_report(records, sketches)
            if error <= self.own_tolerance and ratio <= 1 + self.own_tolerance:
                self._verdict(db, "own_report", group, peer_id, "", epoch, "pass", error, ratio, "")
                return []
            detail = (f"the vector it averaged in round {group[:12]} differs from its report of epoch {epoch} "
                      f"(relative error {error:.3g}, norm {ratio:.3g}x the bound its report allows)")
        self._verdict(db, "own_report", group, peer_id, "", epoch, "fail", error, ratio, detail)
        return [Evidence(peer_id, epoch, report_id, error, ratio, f"binding: {detail}")]

    def _compare_with_report(self, records, sketches) -> tuple[float, float]:
        n = len(sketches)
        weights = [s["samples"] / self.micro_batch_size / n for s in sketches]
        expected = sum(w * torch.tensor(s["projection"], dtype=torch.float64) for w, s in zip(weights, sketches))
        got = sum(torch.tensor(json.loads(r["sketch"]), dtype=torch.float64) for r in records)
        error = relative_error(Sketch(0.0, tuple(got.tolist())), Sketch(0.0, tuple(expected.tolist())))
        bound = sum(w * s["norm"] for w, s in zip(weights, sketches))
        norm = math.sqrt(sum(r["norm_sq"] for r in records))
        ratio = norm / bound if bound > 0 else (1.0 if norm == 0 else math.inf)
        return error, ratio

    def _pair(self, db, group: str, sender: str, reducer: str, mine, theirs) -> None:
        if self._done(db, "pair", group, sender, reducer):
            return
        a = Sketch(0.0, tuple(json.loads(mine["sketch"])))
        b = Sketch(0.0, tuple(json.loads(theirs["sketch"])))
        error = relative_error(a, b)
        ratio = (math.sqrt(mine["norm_sq"] / theirs["norm_sq"]) if theirs["norm_sq"] > 0
                 else 1.0 if mine["norm_sq"] == 0 else math.inf)
        if mine["length"] != theirs["length"]:
            # parts lost in a failed round (HIVEMIND_NOTES 13-14), not a lie: a sender cannot change how
            # many coordinates a reducer counts, and a reducer that miscounts only voids this pair
            verdict = "incomplete"
            detail = f"sender says {mine['length']} coordinates, reducer {theirs['length']}"
        elif error <= PAIR_TOLERANCE and abs(ratio - 1) <= PAIR_TOLERANCE:
            verdict, detail = "agree", ""
        else:
            verdict, detail = "dispute", f"relative error {error:.3g}, norm ratio {ratio:.3g}"
        self._verdict(db, "pair", group, sender, reducer, theirs["epoch"], verdict, error, ratio, detail)

    def _blame(self, db, group: str) -> list[Evidence]:
        disputes: dict[str, set[str]] = {}
        agreements: dict[str, set[str]] = {}
        epochs: dict[str, list[int]] = {}  # labels of the disputed pairs a party is in (senders' labels differ)
        for row in db.execute("SELECT subject, counterparty, verdict, epoch FROM binding_checks WHERE "
                              "check_kind='pair' AND group_id=?", (group,)):
            if row["verdict"] not in ("agree", "dispute"):
                continue
            for me, other in ((row["subject"], row["counterparty"]), (row["counterparty"], row["subject"])):
                (disputes if row["verdict"] == "dispute" else agreements).setdefault(me, set()).add(other)
                if row["verdict"] == "dispute":
                    epochs.setdefault(me, []).append(row["epoch"])
        evidence = []
        for peer_id, others in sorted(disputes.items()):
            agreed = agreements.get(peer_id, set()) - others
            if len(others) < 2 or len(others) <= len(agreed) or self._done(db, "blame", group, peer_id):
                continue
            epoch = min(epochs[peer_id])
            detail = (f"disputes what it sent or received in round {group[:12]} with {len(others)} members "
                      f"({', '.join(sorted(o[:12] for o in others))}) and agrees with {len(agreed)}")
            self._verdict(db, "blame", group, peer_id, "", epoch, "fail", None, None, detail)
            evidence.append(Evidence(peer_id, epoch, None, None, None, f"binding: {detail}"))
        return evidence

    def _withheld(self, db, swarm_id: str, peer_id: str, epoch: int) -> None:
        """Rounds where two or more reducers say they received parts from this peer, long enough ago
        (WITHHELD_AFTER epochs) that its own records should be in, yet it sent none: recorded, not
        punished (two colluders could invent such a round; see the module notes)."""
        rows = db.execute(
            "SELECT group_id, MIN(epoch) AS epoch, COUNT(DISTINCT reducer) AS reducers FROM attestations "
            "WHERE role='received' AND sender=? AND reducer != sender GROUP BY group_id "
            "HAVING COUNT(DISTINCT reducer) >= 2 AND MIN(epoch) <= ?", (swarm_id, epoch - WITHHELD_AFTER)).fetchall()
        for row in rows:
            if self._done(db, "withheld", row["group_id"], peer_id) or db.execute(
                    "SELECT 1 FROM attestations WHERE group_id=? AND role='sent' AND sender=?",
                    (row["group_id"], swarm_id)).fetchone():
                continue
            self._verdict(db, "withheld", row["group_id"], peer_id, "", row["epoch"], "unresolved", None, None,
                          f"{row['reducers']} reducers attest parts it sent in round {row['group_id'][:12]}; "
                          f"it attested none")

    # --- views --------------------------------------------------------------------------------
    @staticmethod
    def verdicts(query) -> list[dict]:
        """Every binding check, for the ledger's views (query: the store's read function)."""
        return [dict(row) for row in query("SELECT * FROM binding_checks ORDER BY at, group_id")]
