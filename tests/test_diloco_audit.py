"""Replay-level audit of DiLoCo reports: real signed reports, the real credit tables and auditor.

Like tests/test_verification.py, but each report is one DiLoCo inner phase (a fresh inner optimizer
from the epoch's anchor, peer/work.py's do_micro_batch then the inner step) and the auditor's
snapshots are the anchors, which it judges step by step through coordinator/phase_replay.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import DIGITS_RUN  # noqa: E402
from test_verification import World  # noqa: E402
from examples.digits import TASK  # noqa: E402
from peer.report import attach_proof, sign_report  # noqa: E402
from peer.work import EpochProof, do_micro_batch  # noqa: E402
from protos import coordinator_pb2 as pb  # noqa: E402

STEPS = 6


class DilocoWorld(World):
    """The World of test_verification with a DiLoCo run: ``model`` is the swarm's anchor."""

    def __init__(self, tmp_path: Path):
        super().__init__(tmp_path, run_text=DIGITS_RUN.read_text().replace('strategy = "sync"', 'strategy = "diloco"'),
                         proof_required=False)
        assert self.config.averaging.strategy == "diloco" and self.config.averaging.inner_state == "reset"

    def report(self, name: str, lazy_from: int | None = None) -> pb.ReportRequest:
        """One inner phase from the anchor; ``lazy_from``: a peer that stops applying inner steps from
        that step on (it sends gradients taken at stale parameters, saving the optimizer's work)."""
        identity = self.peers[name]
        proof = EpochProof.start(self.model, self.config.seed, self.epoch, self.config.verification.sketch_dims,
                                 torch.device("cpu"))
        model = TASK.build_model(self.config.seed)
        model.load_state_dict(self.state())
        inner = TASK.make_optimizer(model.parameters())
        for step in range(STEPS):
            proof.micro_batches.append(do_micro_batch(
                TASK, model, self.inputs, self.targets, run_seed=self.config.seed, epoch=self.epoch,
                peer_id=identity.peer_id, micro_batch=step, micro_batch_size=self.config.micro_batch_size,
                sketch_dims=self.config.verification.sketch_dims, device=torch.device("cpu")))
            if lazy_from is None or step < lazy_from:
                inner.step()
            else:
                model.zero_grad()
        request = pb.ReportRequest(peer_id=identity.peer_id, report_id=f"{name}-{self.epoch}", epoch=self.epoch,
                                   samples=sum(m.samples for m in proof.micro_batches), loss=1.0,
                                   compute_seconds=0.01)
        attach_proof(request, proof)
        sign_report(request, self.config.run_id, identity.private_key)
        return request


@pytest.fixture
def world(tmp_path):
    w = DilocoWorld(tmp_path)
    w.start()
    yield w
    w.credit.close()
    w.ledger.close()


def test_honest_diloco_phases_pass_and_settle_a_lazy_one_fails(world):
    torch.set_num_threads(1)
    world.join("honest")
    world.join("lazy", world.partner_token)
    for _ in range(3):
        world.submit("honest", world.report("honest"))
        world.submit("lazy", world.report("lazy", lazy_from=1))
        world.audit_epoch()
        world.next_epoch()
    world.auditor.settle(world.epoch + 1, final=True)
    rows = world.rows()
    honest, lazy = rows["honest"], rows["lazy"]
    assert not honest["banned"] and honest["audits_failed"] == 0 and honest["strikes"] == 0, honest
    assert honest["samples_settled"] == 3 * STEPS * 32 and honest["audits_passed"] > 0, honest
    assert lazy["banned"] and lazy["audits_failed"] >= 2, lazy
    assert lazy["samples_settled"] == 0 and lazy["samples_provisional"] == 0, lazy


def test_diloco_report_from_another_anchor_is_not_judged(world):
    """A phase started from parameters the auditor never held is neither failed nor paid."""
    world.join("honest")
    with torch.no_grad():
        for p in world.model.parameters():
            p.add_(0.01)  # the peer's anchor is not the auditor's snapshot 0
    world.submit("honest", world.report("honest"))
    world.audit_epoch()
    row = world.rows()["honest"]
    assert row["audits_failed"] == 0 and row["strikes"] == 0 and row["samples_settled"] == 0, row


def test_diloco_state_is_checked_like_the_sync_state():
    """The anchor half of a DiLoCo state download (anchor then momentum, model.parameters() order) is
    checked for count, shapes, dtypes and finiteness; the momentum half is ignored."""
    from coordinator.swarm_snapshot import SnapshotError, anchor_order, check_state

    order, reference = anchor_order(TASK, 1)
    anchor = [reference[name] + 0.5 for name in order]
    momentum = [torch.zeros_like(t) for t in anchor]
    snapshot = check_state({"epoch": 4}, [*anchor, *momentum], order, reference)
    assert snapshot.epoch == 4 and all(torch.equal(snapshot.state_dict[n], a) for n, a in zip(order, anchor))
    with pytest.raises(SnapshotError, match="non-finite"):
        check_state({"epoch": 4}, [anchor[0] * float("nan"), *anchor[1:]], order, reference)
    with pytest.raises(SnapshotError, match="expected"):
        check_state({"epoch": 4}, [anchor[0].double(), *anchor[1:]], order, reference)
    with pytest.raises(SnapshotError, match="at least"):
        check_state({"epoch": 4}, anchor[:-1], order, reference)
