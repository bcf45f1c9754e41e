"""Replay and judge: recompute a peer's micro-batch at known parameters and compare sketches.

The recomputation is peer/work.py's ``do_micro_batch``, the function the peer's training loop
calls, so there is one definition of the work. Sketches are compared by relative L2 error and by
norm ratio, never by cosine (a gradient scaled x10 has cosine 1). Tolerances are per dtype; a
result between the tolerance and ten times it is *inconclusive* (checked again, never punished).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from coordinator.books.credit import FAIL, INCONCLUSIVE, PASS
from peer.runconfig import RunConfig
from peer.sketch import Sketch, norm_ratio, parameter_fingerprint, parameter_seed, relative_error
from peer.work import MicroBatchResult, do_micro_batch

INCONCLUSIVE_FACTOR = 10.0
INCONCLUSIVE_CAP = 0.5  # beyond this a result is a failure whatever the tolerance (noise is ~1.4)


@dataclass(frozen=True)
class Verdict:
    verdict: str
    relative_error: float
    norm_ratio: float
    reason: str


def tolerance_for(config: RunConfig, dtype: str) -> float:
    return config.verification.bf16_tolerance if dtype == "bf16" else config.verification.fp32_tolerance


def judge(claimed: Sketch, reference: Sketch, tolerance: float, what: str = "gradient") -> Verdict:
    error = relative_error(claimed, reference)
    ratio = norm_ratio(claimed, reference)
    off = max(error, abs(ratio - 1.0)) if math.isfinite(ratio) else math.inf
    if off <= tolerance:
        return Verdict(PASS, error, ratio, f"{what} matches")
    if off <= min(INCONCLUSIVE_FACTOR * tolerance, INCONCLUSIVE_CAP):
        return Verdict(INCONCLUSIVE, error, ratio, f"{what} slightly off (relative error {error:.2e}, "
                                                   f"norm ratio {ratio:.4f})")
    return Verdict(FAIL, error, ratio, f"{what} does not match the recomputation (relative error {error:.3g}, "
                                       f"norm ratio {ratio:.3g})")


class Replayer:
    """Holds the task's model and data; loads parameters, replays micro-batches on the CPU in fp32."""

    def __init__(self, task, config: RunConfig, device: torch.device | None = None):
        self.task, self.config = task, config
        self.device = device or torch.device("cpu")
        self.model = task.build_model(config.seed).to(self.device)
        self.model.train()
        self.inputs, self.targets = task.train_data()
        self.parameter_count = sum(p.numel() for p in self.model.parameters())

    def load(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Parameters from a checked snapshot (coordinator/swarm_snapshot.py: names, shapes, finiteness)."""
        self.model.load_state_dict(state_dict)

    def fingerprint(self, epoch: int) -> Sketch:
        return parameter_fingerprint(self.model, parameter_seed(self.config.seed, epoch),
                                     self.config.verification.sketch_dims)

    def replay(self, epoch: int, peer_id: str, micro_batch: int) -> MicroBatchResult:
        return do_micro_batch(self.task, self.model, self.inputs, self.targets, run_seed=self.config.seed,
                              epoch=epoch, peer_id=peer_id, micro_batch=micro_batch,
                              micro_batch_size=self.config.micro_batch_size,
                              sketch_dims=self.config.verification.sketch_dims, device=self.device)

    def audit(self, claim: dict, micro_batch: int, tolerance: float) -> Verdict:
        """Judge micro-batch ``micro_batch`` of a report body (peer/report.py's canonical_body)."""
        entry = claim["sketches"][micro_batch]
        done = self.replay(claim["epoch"], claim["peer_id"], micro_batch)
        if entry["samples"] != done.samples:
            return Verdict(FAIL, math.inf, math.inf, f"claims {entry['samples']} samples, assigned {done.samples}")
        return judge(Sketch(entry["norm"], tuple(entry["projection"])), done.sketch, tolerance)

    def check_parameters(self, claim: dict, tolerance: float) -> Verdict:
        claimed = Sketch(claim["parameters"]["norm"], tuple(claim["parameters"]["projection"]))
        return judge(claimed, self.fingerprint(claim["epoch"]), tolerance, what="parameter fingerprint")
