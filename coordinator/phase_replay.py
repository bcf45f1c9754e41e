"""Replay a DiLoCo inner phase: steps 0..j from the phase's start parameters with a fresh inner optimizer.

A DiLoCo peer's report for epoch e (peer/strategies/diloco.py) carries the fingerprint of the
parameters its phase started from (the anchor of epoch e when ``overlap`` is off) and one gradient
sketch per inner step. Step j's gradient is taken at the parameters that steps 0..j-1 led to, so
unlike a sync micro-batch it cannot be replayed at the start parameters alone: this module
re-runs the phase the way the peer does (peer/loop.py: ``do_micro_batch``, then the task's inner
optimizer steps; a fresh optimizer at the start of the chain) and returns the sketches to compare
with ``coordinator.replay.judge``. Cost: j + 1 micro-batches for step j (sample j from the late
end only when the budget allows).

How the auditor calls it: for a report of a ``diloco`` run, ``replayable_steps(config, claim)``
says how many leading steps can be replayed (all of them for a phase that starts at the anchor
with a fresh inner optimizer, ``inner_state = "reset"`` without overlap; only step 0 with
``inner_state = "keep"``, whose later steps depend on the peer's private optimizer state; none
for an overlapped phase, which starts where no one else has been; everything at epoch 0, which
starts at the initial model with a fresh optimizer; only step 0 of a bf16 report, whose trajectory
drifts from the fp32 replay: on digits past the bf16 tolerance of 0.15 from step 3, 0.52 at step
49; on bytelm at most 0.022 over 30 steps; ``benchmarks/phase_drift.py``). Load the anchor
of the report's epoch (what the swarm's DiLoCo state averager shares at that epoch), check the
report's parameter fingerprint against it (``Replayer.check_parameters``), choose micro-batches
among the replayable ones as for sync, then ``replay_phase(task, config, anchor_state, claim,
upto=max(chosen))`` and judge ``claim["sketches"][j]`` against ``result[j].sketch`` for each
chosen j (``coordinator.replay.judge``, the dtype's tolerance).
"""

from __future__ import annotations

import torch

from peer.runconfig import RunConfig
from peer.work import MicroBatchResult, do_micro_batch


def replayable_steps(config: RunConfig, claim: dict) -> int:
    """How many leading inner steps of a DiLoCo report an auditor holding its epoch's anchor can replay."""
    settings, steps = config.averaging, len(claim["sketches"])
    if claim.get("compute_dtype") == "bf16":
        # a bf16 trajectory drifts from the fp32 replay (digits: past the bf16 tolerance from step 3,
        # benchmarks/phase_drift.py): only step 0, taken at the anchor itself, is judged fairly
        return min(1, steps)
    if claim["epoch"] == 0:  # every peer's first phase starts at the initial model, with a fresh optimizer
        return steps
    if settings.overlap:
        return 0
    return min(1, steps) if settings.inner_state == "keep" else steps


def replay_phase(task, config: RunConfig, start_state: dict[str, torch.Tensor], claim: dict, upto: int,
                 device: torch.device | None = None) -> list[MicroBatchResult]:
    """Re-run inner steps 0..upto of the phase behind ``claim`` (a report body, peer/report.py's
    canonical_body) from ``start_state``; returns one result per step, fp32 on the CPU by default."""
    if not 0 <= upto < replayable_steps(config, claim):
        raise ValueError(f"step {upto} of this report cannot be replayed from its anchor (replayable: "
                         f"{replayable_steps(config, claim)} of {len(claim['sketches'])}; see replayable_steps)")
    device = device or torch.device("cpu")
    model = task.build_model(config.seed)
    model.load_state_dict(start_state)
    model = model.to(device)
    model.train()
    inputs, targets = task.train_data()
    inner = task.make_optimizer(model.parameters())
    results = []
    for step in range(upto + 1):
        results.append(do_micro_batch(task, model, inputs, targets, run_seed=config.seed, epoch=claim["epoch"],
                                      peer_id=claim["peer_id"], micro_batch=step,
                                      micro_batch_size=config.micro_batch_size,
                                      sketch_dims=config.verification.sketch_dims, device=device))
        inner.step()
    return results
