"""coordinator/phase_replay.py: the auditor's replay of a DiLoCo inner phase, in process (digits, CPU fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import DIGITS_RUN
from coordinator.phase_replay import replay_phase, replayable_steps
from coordinator.replay import judge
from examples.digits import TASK
from peer.runconfig import parse_run_config
from peer.sketch import Sketch
from peer.work import do_micro_batch

STEPS = 6
PEER = "p-00000000000000aa"


def diloco_config(**averaging):
    config = parse_run_config(DIGITS_RUN.read_text().replace('strategy = "sync"', 'strategy = "diloco"'))
    return dataclasses.replace(config, averaging=dataclasses.replace(config.averaging, **averaging))


def peer_phase(config, start_state, epoch: int, skip: int | None = None) -> dict:
    """What a DiLoCo peer reports for one phase (a fresh inner optimizer, do_micro_batch, then the
    inner step); with ``skip``, a lazy peer that copies step skip-1's sketch instead of computing step skip."""
    model = TASK.build_model(config.seed)
    model.load_state_dict(start_state)
    inputs, targets = TASK.train_data()
    inner = TASK.make_optimizer(model.parameters())
    sketches = []
    for step in range(STEPS):
        if step == skip:
            sketches.append(dict(sketches[-1], index=step))
            continue
        done = do_micro_batch(TASK, model, inputs, targets, run_seed=config.seed, epoch=epoch, peer_id=PEER,
                              micro_batch=step, micro_batch_size=config.micro_batch_size,
                              sketch_dims=config.verification.sketch_dims, device=torch.device("cpu"))
        inner.step()
        sketches.append({"index": step, "samples": done.samples, "norm": done.sketch.norm,
                         "projection": list(done.sketch.projection)})
    return {"epoch": epoch, "peer_id": PEER, "sketches": sketches}


def verdicts(config, start_state, claim) -> list[str]:
    replayed = replay_phase(TASK, config, start_state, claim, upto=len(claim["sketches"]) - 1)
    tolerance = config.verification.fp32_tolerance
    return [judge(Sketch(entry["norm"], tuple(entry["projection"])), done.sketch, tolerance).verdict
            for entry, done in zip(claim["sketches"], replayed)]


def anchor_state(seed: int) -> dict:
    model = TASK.build_model(0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)  # an anchor some rounds into the run
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_an_honest_phase_replays_exactly_and_a_skipped_step_fails():
    torch.set_num_threads(1)
    config = diloco_config()
    anchor = anchor_state(1)
    honest = peer_phase(config, anchor, epoch=3)
    assert verdicts(config, anchor, honest) == ["pass"] * STEPS
    lazy = peer_phase(config, anchor, epoch=3, skip=4)
    # a skipped step fails, and so does every later one: the trajectory went elsewhere
    assert verdicts(config, anchor, lazy) == ["pass"] * 4 + ["fail", "fail"]
    # the same work claimed from another anchor (stale parameters) fails from step 0 on
    assert set(verdicts(config, anchor_state(2), honest)) == {"fail"}


def test_replayable_steps_follow_inner_state_and_overlap():
    claim = {"epoch": 5, "sketches": [{}] * STEPS}
    assert replayable_steps(diloco_config(), claim) == STEPS
    assert replayable_steps(diloco_config(inner_state="keep"), claim) == 1
    assert replayable_steps(diloco_config(overlap=True), claim) == 0
    assert replayable_steps(diloco_config(), dict(claim, compute_dtype="bf16")) == 1  # drifts from the fp32 replay
    for config in (diloco_config(inner_state="keep"), diloco_config(overlap=True)):
        assert replayable_steps(config, dict(claim, epoch=0)) == STEPS  # first phase: initial model, fresh optimizer
    with pytest.raises(ValueError, match="cannot be replayed from its anchor"):
        replay_phase(TASK, diloco_config(inner_state="keep"), anchor_state(1), claim, upto=2)
