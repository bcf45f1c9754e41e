"""Replay-level verification: real sketches, real signed reports, the real credit tables and auditor.

No swarm here (tests/test_cheaters_swarm.py has one): a "world" holds a ledger file, the auditor's
snapshots of the parameters at each epoch's start, an honest peer and a cheater built from
tests/cheating_peer.py, and steps the parameters between epochs as the swarm would.
"""

from __future__ import annotations

import json
import math
import random
import sqlite3
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cheating_peer import Cheat, honest_micro_batch  # noqa: E402
from conftest import DIGITS_RUN, cli  # noqa: E402
from coordinator.auditor import AuditPolicy, Auditor  # noqa: E402
from coordinator.credit import FAIL, INCONCLUSIVE, PASS, Credit  # noqa: E402
from coordinator.ledger import LEDGER_FILE, Ledger  # noqa: E402
from coordinator.replay import judge  # noqa: E402
from examples.digits import TASK  # noqa: E402
from peer.identity import load_or_create_identity  # noqa: E402
from peer.report import attach_proof, sign_report  # noqa: E402
from peer.runconfig import parse_run_config  # noqa: E402
from peer.sketch import gradient_seed, gradient_sketch  # noqa: E402
from peer.work import EpochProof  # noqa: E402
from protos import coordinator_pb2 as pb  # noqa: E402

VERIFY = """
[verification]
audit_rate_new = 0.5
audit_floor = 2
window_epochs = 2
"""
MICRO_BATCHES = 8


class World:
    def __init__(self, tmp_path: Path, extra: str = VERIFY):
        self.config = parse_run_config(DIGITS_RUN.read_text() + extra)
        self.data_dir = tmp_path / "c"
        self.ledger = Ledger(self.data_dir / LEDGER_FILE)
        self.ledger.bind_run(self.config.run_id, self.config.config_hash)
        _, self.token = self.ledger.issue_token("default")
        _, self.partner_token = self.ledger.issue_token("acme")
        self.credit = Credit(self.ledger.path, self.config.verification, self.config.run_id)
        self.auditor = Auditor(self.config, TASK, self.credit, AuditPolicy(self.config.verification, random.Random(7)))
        self.model = TASK.build_model(self.config.seed)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5)
        self.inputs, self.targets = TASK.train_data()
        self.epoch = 0
        self.peers = {}

    def join(self, name: str, token: str | None = None):
        identity = load_or_create_identity(self.data_dir.parent / name)
        self.ledger.admit(token or self.token, identity.peer_id, identity.public_bytes, f"Qm{name}", "cpu")
        self.peers[name] = identity
        return identity

    def report(self, name: str, work=honest_micro_batch, micro_batches: int = MICRO_BATCHES) -> pb.ReportRequest:
        """What the trainer does in one epoch: fingerprint, micro-batches through `work`, a signed report."""
        identity = self.peers[name]
        proof = EpochProof.start(self.model, self.config.seed, self.epoch, self.config.verification.sketch_dims,
                                 torch.device("cpu"))
        for index in range(micro_batches):
            proof.micro_batches.append(work(
                TASK, self.model, self.inputs, self.targets, run_seed=self.config.seed, epoch=self.epoch,
                peer_id=identity.peer_id, micro_batch=index, micro_batch_size=self.config.micro_batch_size,
                sketch_dims=self.config.verification.sketch_dims, device=torch.device("cpu")))
        request = pb.ReportRequest(peer_id=identity.peer_id, report_id=f"{name}-{self.epoch}", epoch=self.epoch,
                                   samples=sum(m.samples for m in proof.micro_batches), loss=1.0,
                                   compute_seconds=0.01)
        attach_proof(request, proof)
        sign_report(request, self.config.run_id, identity.private_key)
        return request

    def submit(self, name: str, request: pb.ReportRequest) -> list[str]:
        """The service's path: signature, then the report with its cheap checks; then the auditor."""
        public_key = self.peers[name].public_bytes
        if not self.credit.signature_ok(request, public_key):
            self.credit.record_check_failure(request.peer_id, request.epoch, "report signature does not verify")
            return ["refused"]
        if self.credit.banned_reason(request.peer_id):
            return ["banned"]
        self.credit.record_report(request, public_key, self.config.micro_batch_size)
        return []

    def audit_epoch(self) -> None:
        for row in self.credit.reports_to_audit():
            self.auditor.audit_report(row)

    def next_epoch(self) -> None:
        """The swarm's averaged step: new parameters, which the auditor snapshots (as it would)."""
        self.model.zero_grad()
        TASK.loss(self.model, self.inputs[:256], self.targets[:256]).backward()
        self.optimizer.step()
        self.epoch += 1
        self.auditor.add_snapshot(self.epoch, [p.detach().clone() for p in self.model.parameters()])

    def start(self) -> None:
        self.auditor.add_snapshot(0, [p.detach().clone() for p in self.model.parameters()])

    def rows(self) -> dict:
        names = {identity.peer_id: name for name, identity in self.peers.items()}
        return {names[row["peer"]]: row for row in self.credit.peer_rows()}


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    w.start()
    yield w
    w.credit.close()
    w.ledger.close()


def run_epochs(world: World, cheater_work, epochs: int = 3, transform=None) -> dict:
    world.join("honest")
    world.join("cheater", world.partner_token)
    for _ in range(epochs):
        world.submit("honest", world.report("honest"))
        request = world.report("cheater", cheater_work)
        if transform:
            transform(request)
        world.submit("cheater", request)
        world.audit_epoch()
        world.next_epoch()
    world.auditor.settle(world.epoch + 1, final=True)
    return world.rows()


def assert_caught(rows: dict) -> None:
    honest, cheater = rows["honest"], rows["cheater"]
    assert cheater["banned"] and cheater["strikes"] >= 1 and cheater["audits_failed"] >= 2, cheater
    assert cheater["samples_settled"] == 0 and cheater["samples_provisional"] == 0, cheater
    assert not honest["banned"] and honest["audits_failed"] == 0 and honest["strikes"] == 0, honest
    assert honest["samples_settled"] == 3 * MICRO_BATCHES * 32 and honest["audits_passed"] > 0, honest


# catalogue rows 1, 3, 4, 2 (copied gradient), 6: each cheat is a swapped work function of the real peer
@pytest.mark.parametrize("kind", ["free_rider", "inflated", "noise", "scaled", "sign_flip", "copied", "stale"])
def test_cheater_is_caught_and_loses_credit(world, kind):
    victim = world.join("victim").peer_id
    rows = run_epochs(world, Cheat(kind, victim=victim))
    assert_caught(rows)


def test_identical_payload_copied_from_another_peer_is_caught(world):
    """Catalogue row 2: a peer that copies another's report payload verbatim (its sketches)."""
    copies = []

    def copy_honest(request):
        del request.sketches[:]
        request.sketches.extend(copies[-1].sketches)
        sign_report(request, world.config.run_id, world.peers["cheater"].private_key)

    original = world.report

    def report(name, work=honest_micro_batch, micro_batches=MICRO_BATCHES):
        request = original(name, work, micro_batches)
        if name == "honest":
            copies.append(request)
        return request

    world.report = report
    assert_caught(run_epochs(world, honest_micro_batch, transform=copy_honest))
    assert any("repeats the sketch" in a["reason"] for a in world.credit.audit_rows())


def test_replayed_old_report_is_caught(world):
    """Catalogue row 2 (replay): each epoch the cheater resends its first epoch's sketches."""
    first = []

    def replay(request):
        if first:
            del request.sketches[:]
            request.sketches.extend(first[0].sketches)
            sign_report(request, world.config.run_id, world.peers["cheater"].private_key)
        else:
            first.append(request)

    world.join("honest")
    world.join("cheater", world.partner_token)
    for _ in range(4):
        world.submit("honest", world.report("honest"))
        request = world.report("cheater")
        replay(request)
        world.submit("cheater", request)
        world.audit_epoch()
        world.next_epoch()
    # the same report id again is one row, not new credit (idempotent)
    assert world.credit.record_report(first[0], world.peers["cheater"].public_bytes, 32).fresh is False
    world.auditor.settle(world.epoch + 1, final=True)
    rows = world.rows()
    assert rows["cheater"]["banned"] and rows["cheater"]["samples_settled"] < rows["honest"]["samples_settled"] / 2
    assert rows["honest"]["audits_failed"] == 0 and not rows["honest"]["banned"]


def test_forged_or_tampered_report_is_refused(world):
    """Catalogue row 7: a report signed by another key, or changed after signing, is refused."""
    world.join("honest")
    world.join("cheater", world.partner_token)
    forged = world.report("cheater")
    sign_report(forged, world.config.run_id, world.peers["honest"].private_key)
    assert world.submit("cheater", forged) == ["refused"]
    world.next_epoch()
    tampered = world.report("cheater")
    tampered.samples *= 2
    assert world.submit("cheater", tampered) == ["refused"]
    assert world.credit.banned_reason(world.peers["cheater"].peer_id), "two refused reports make a strike and a ban"
    assert world.submit("honest", world.report("honest")) == []


def test_ban_forfeits_unsettled_credit_and_calls_revocation(world):
    world.join("honest")
    calls = []
    world.credit.on_ban = lambda peer, reason: calls.append((peer, reason))
    world.submit("honest", world.report("honest"))
    assert world.rows()["honest"]["samples_provisional"] == MICRO_BATCHES * 32
    assert world.credit.ban(world.peers["honest"].peer_id, "operator decision")
    assert not world.credit.ban(world.peers["honest"].peer_id, "again")
    assert calls == [(world.peers["honest"].peer_id, "operator decision")]
    row = world.rows()["honest"]
    assert row["banned"] and row["samples_provisional"] == 0 and row["samples_settled"] == 0


def test_ledger_cli_and_tampering_detected(world):
    run_epochs(world, Cheat("noise"))
    data_dir = str(world.data_dir)
    peers = json.loads(cli("coordinator", "ledger", "--data-dir", data_dir, "--format", "json").stdout)
    assert {"peer", "samples_provisional", "samples_settled", "audits_passed", "audits_failed", "strikes",
            "banned"} <= set(peers[0])
    orgs = json.loads(cli("coordinator", "ledger", "--by", "org", "--data-dir", data_dir, "--format", "json").stdout)
    assert {org["org"]: org["banned"] for org in orgs} == {"default": 0, "acme": 1}
    csv = cli("coordinator", "ledger", "--data-dir", data_dir, "--format", "csv").stdout.splitlines()
    assert csv[0].startswith("peer,org,samples_provisional,samples_settled") and len(csv) == 1 + len(peers)
    assert cli("coordinator", "ledger", "verify", "--data-dir", data_dir).returncode == 0

    db = sqlite3.connect(world.data_dir / LEDGER_FILE)
    with pytest.raises(sqlite3.IntegrityError):
        db.execute("UPDATE contribution_log SET body='{}' WHERE seq=3")
    # someone edits the file with the triggers out of the way: the chain names the entry
    db.execute("DROP TRIGGER contribution_log_no_update")
    db.execute("UPDATE contribution_log SET body=replace(body, '\"verdict\"', '\"verdict \"') WHERE seq=3")
    db.commit()
    result = cli("coordinator", "ledger", "verify", "--data-dir", data_dir)
    assert result.returncode == 1 and "entry 3" in result.stderr, result.stderr
    # and a derived table edited on its own disagrees with the log
    db.execute("UPDATE settlements SET samples = samples + 1000")
    db.commit()
    result = cli("coordinator", "ledger", "verify", "--data-dir", data_dir)
    assert result.returncode == 1 and "settlements" in result.stderr


def split_micro_batch(chunks: int):
    """An honest peer that accumulates one micro-batch's gradient over `chunks` smaller passes."""
    from peer.assignment import micro_batch_indices
    from peer.work import MicroBatchResult

    def work(task, model, inputs, targets, **kw):
        index = micro_batch_indices(kw["run_seed"], kw["epoch"], kw["peer_id"], kw["micro_batch"], len(inputs),
                                    kw["micro_batch_size"])
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in index.chunk(chunks):
            loss = task.loss(model, inputs[part], targets[part]) * len(part) / len(index)
            loss.backward()
            total += float(loss.detach())
        sketch = gradient_sketch(model, gradient_seed(kw["run_seed"], kw["epoch"], kw["peer_id"], kw["micro_batch"]),
                                 kw["sketch_dims"])
        return MicroBatchResult(kw["micro_batch"], len(index), total, sketch)

    return work


def test_no_false_positives_over_1000_honest_audits(world):
    """Catalogue row 11: honest peers with other thread counts and micro-batch splits always pass."""
    identity = world.join("honest")
    verdicts = {PASS: 0, INCONCLUSIVE: 0, FAIL: 0}
    worst = 0.0
    threads = torch.get_num_threads()
    try:
        for round_ in range(1000):
            if round_ % 100 == 0 and round_:
                world.next_epoch()
            torch.set_num_threads(1 + round_ % 3)
            work = split_micro_batch(1 + round_ % 4)
            claim = work(TASK, world.model, world.inputs, world.targets, run_seed=world.config.seed,
                         epoch=world.epoch, peer_id=identity.peer_id, micro_batch=round_,
                         micro_batch_size=32, sketch_dims=64, device=torch.device("cpu"))
            torch.set_num_threads(1)
            world.auditor._load(world.epoch)
            replayed = world.auditor.replayer.replay(world.epoch, identity.peer_id, round_)
            verdict = judge(claim.sketch, replayed.sketch, world.config.verification.fp32_tolerance)
            verdicts[verdict.verdict] += 1
            worst = max(worst, verdict.relative_error, abs(verdict.norm_ratio - 1))
    finally:
        torch.set_num_threads(threads)
    print(f"honest audits: {verdicts}, worst deviation {worst:.2e}")
    assert verdicts == {PASS: 1000, INCONCLUSIVE: 0, FAIL: 0}
    assert worst < world.config.verification.fp32_tolerance / 100


def test_bf16_peers_pass_under_the_bf16_tolerance(world):
    """A peer computing under bf16 autocast (as on CUDA) is judged with the bf16 tolerance: no failure."""
    identity = world.join("honest")
    tolerance = world.config.verification.bf16_tolerance
    worst = 0.0
    for index in range(50):
        claim = honest_micro_batch(TASK, world.model, world.inputs, world.targets, run_seed=world.config.seed,
                                   epoch=0, peer_id=identity.peer_id, micro_batch=index, micro_batch_size=32,
                                   sketch_dims=64, device=torch.device("cpu"),
                                   autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        world.auditor._load(0)
        verdict = judge(claim.sketch, world.auditor.replayer.replay(0, identity.peer_id, index).sketch, tolerance)
        assert verdict.verdict != FAIL, verdict
        worst = max(worst, verdict.relative_error)
    print(f"bf16 vs fp32 worst relative error {worst:.2e}")


@pytest.mark.parametrize("fraction", [0.1, 0.3])
def test_detection_rate_matches_theory(world, fraction):
    """Seeded cheaters faking a fraction f of micro-batches; k audited: P(caught) = 1 - (1-f)^k."""
    trials, micro_batches, rate = 300, 20, 0.2
    identity = world.join("cheater")
    policy = AuditPolicy(world.config.verification, random.Random(fraction))
    world.auditor._load(0)
    caught, expected = 0, 0.0
    for trial in range(trials):
        cheat = Cheat("noise", fraction=fraction, seed=trial)
        chosen = policy.choose(micro_batches, rate, [])
        expected += 1 - (1 - fraction) ** len(chosen)
        failed = False
        for index in chosen:
            # the real cheating work for this (epoch, micro-batch), judged against a real replay
            claim = cheat(TASK, world.auditor.replayer.model, world.inputs, world.targets, run_seed=world.config.seed,
                          epoch=trial, peer_id=identity.peer_id, micro_batch=index, micro_batch_size=32,
                          sketch_dims=64, device=torch.device("cpu"))
            replayed = world.auditor.replayer.replay(trial, identity.peer_id, index)
            failed |= judge(claim.sketch, replayed.sketch, 1e-3).verdict == FAIL
        caught += failed
    p = expected / trials
    sigma = math.sqrt(p * (1 - p) / trials)
    print(f"f={fraction}: caught {caught}/{trials}, theory {p:.3f} +- {sigma:.3f}")
    assert abs(caught / trials - p) < 3.5 * sigma
