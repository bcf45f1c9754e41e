"""Replay a DiLoCo inner phase: steps 0..j from the phase's start parameters with a fresh inner optimizer.

A DiLoCo peer's report for epoch e (peer/strategies/diloco.py) carries the fingerprint of the
parameters its phase started from (the anchor of epoch e when ``overlap`` is off) and one gradient
sketch per inner step. Step j's gradient is taken at the parameters that steps 0..j-1 led to, so
unlike a sync micro-batch it cannot be replayed at the start parameters alone: this module
re-runs the phase the way the peer does (peer/loop.py: ``do_micro_batch``, then the task's inner
optimizer steps; a fresh optimizer at the start of the chain) and returns the sketches to compare
with ``coordinator.replay.judge``. Cost: j + 1 micro-batches for step j (sample j from the late
end only when the budget allows).

How the auditor calls it: for a report of a ``diloco`` run without overlap, load the anchor of the
report's epoch (what the swarm's state averager shares at that epoch), check the report's
parameter fingerprint against it (``Replayer.check_parameters``), choose micro-batches as for
sync, then ``replay_phase(task, config, anchor_state, claim, upto=max(chosen))`` and judge
``claim["sketches"][j]`` against ``result[j].sketch`` for each chosen j. A report of an overlap
run starts from parameters no one else holds (except epoch 0, the initial model): audit only by
the cheap checks there, as before.

Inner-state reset (measured, digits, 2 peers, H=16, 12 rounds, fp32, in-process DiLoCo, 3 seeds;
``python -m coordinator.phase_replay --measure``): held-out loss with a fresh Adam per phase
RESET_FIGURES vs without reset NO_RESET_FIGURES (see the report of the branch that added this).
"""

from __future__ import annotations

import torch

from peer.runconfig import RunConfig
from peer.work import MicroBatchResult, do_micro_batch


def replay_phase(task, config: RunConfig, start_state: dict[str, torch.Tensor], claim: dict, upto: int,
                 device: torch.device | None = None) -> list[MicroBatchResult]:
    """Re-run inner steps 0..upto of the phase behind ``claim`` (a report body, peer/report.py's
    canonical_body) from ``start_state``; returns one result per step, fp32 on the CPU by default."""
    if not 0 <= upto < len(claim["sketches"]):
        raise ValueError(f"step {upto} is not in the report (it has {len(claim['sketches'])})")
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
