"""Checkpoints carry the whole training state (no processes): format, checks, resume messages."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coordinator.checkpoints import FORMAT, Manifest, clear_failure, last_failure, list_checkpoints, \
    load_checkpoint, load_training_state, record_failure, save_checkpoint
from coordinator.observer import FailureLine, next_due
from coordinator.swarm_snapshot import SnapshotError, anchor_order, check_state, parameter_order
from examples.digits import TASK
from peer.checkpoint import TrainingState, sha256_hex, state_to_bytes, training_state_from_bytes, \
    training_state_to_bytes
from peer.errors import UserError
from peer.optimizer_state import check_flat_state, flat_state, reference_state
from peer.resume import resume_lines

SEED = 7


def _trained_flat_state():
    """An Adam state after two real steps: moments and step counts that differ from a fresh one."""
    model = TASK.build_model(SEED)
    optimizer = TASK.make_optimizer(model.parameters())
    inputs, targets = TASK.train_data()
    for _ in range(2):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs[:64]), targets[:64]).backward()
        optimizer.step()
    return model, flat_state(optimizer)


def test_a_sync_state_round_trips_through_the_file_bit_for_bit(tmp_path):
    model, (metadata, tensors) = _trained_flat_state()
    state = TrainingState(model=model.state_dict(), strategy="sync", optimizer=(metadata, tensors))
    manifest = save_checkpoint(tmp_path, 6, state, "run", "hash", keep=2)
    assert manifest.format == FORMAT and manifest.holds == "parameters + optimizer state"
    loaded = load_training_state(tmp_path, list_checkpoints(tmp_path)[0])
    assert loaded.strategy == "sync" and loaded.optimizer[0] == metadata
    for got, want in zip(loaded.optimizer[1], tensors):
        assert torch.equal(got, want)
    # the model alone (export, auditors) has exactly the model's names: no optimizer tensors leak into it
    assert set(load_checkpoint(tmp_path, manifest)) == set(model.state_dict())
    assert check_flat_state(*loaded.optimizer, reference_state(TASK, SEED)) is None


def test_a_diloco_state_keeps_the_momentum_by_parameter_name():
    model = TASK.build_model(SEED)
    momentum = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    data = training_state_to_bytes(TrainingState(model.state_dict(), "diloco", momentum=momentum), {"epoch": "3"})
    loaded = training_state_from_bytes(data, sha256_hex(data))
    assert loaded.strategy == "diloco" and loaded.optimizer is None and loaded.holds() == "anchor + outer momentum"
    assert set(loaded.momentum) == set(momentum) and all(torch.equal(loaded.momentum[n], momentum[n]) for n in momentum)
    assert set(loaded.model) == set(model.state_dict())


def test_a_first_format_checkpoint_still_loads_as_the_model_only(tmp_path):
    model = TASK.build_model(SEED)
    data = state_to_bytes(model.state_dict(), {"epoch": "4", "run_id": "run", "run_config_hash": "h"})
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "epoch-00000004.safetensors").write_bytes(data)
    old = Manifest(epoch=4, run_id="run", run_config_hash="h", file="epoch-00000004.safetensors",
                   sha256=sha256_hex(data), bytes=len(data), created=0.0, format="potluck-checkpoint-1")
    raw = {key: value for key, value in vars(old).items() if key != "holds"}  # a manifest as version 1 wrote it
    (directory / "epoch-00000004.json").write_text(__import__("json").dumps(raw))
    [manifest] = list_checkpoints(tmp_path)
    state = load_training_state(tmp_path, manifest)
    assert state.strategy == "" and state.optimizer is None and not state.momentum
    assert state.holds() == "parameters only" == manifest.holds
    lines = resume_lines(SimpleNamespace(epoch=4, checkpoint_epoch=4, swarm_empty=True), state, "sync")
    assert lines == ["starting from the run's checkpoint at epoch 4",
                     "the checkpoint is of the first format (parameters only): the optimizer state starts fresh"]


def test_a_newer_format_is_a_clear_error():
    data = state_to_bytes({"w": torch.zeros(2)}, {"potluck_format": "9"})
    with pytest.raises(UserError, match="format '9'.*update potluck"):
        training_state_from_bytes(data, sha256_hex(data))


def test_an_optimizer_state_that_does_not_fit_is_refused():
    _, (metadata, tensors) = _trained_flat_state()
    reference = reference_state(TASK, SEED)
    assert check_flat_state(metadata, tensors, reference) is None
    assert "entries" in check_flat_state(metadata[:-1], tensors, reference)
    assert "tensors" in check_flat_state(metadata, tensors[:-1], reference)
    wrong_shape = [tensors[0].T.contiguous(), *tensors[1:]]
    assert "optimizer tensor 0" in check_flat_state(metadata, wrong_shape, reference)
    poisoned = [t.clone() for t in tensors]
    poisoned[3][0] = float("inf")
    assert "non-finite" in check_flat_state(metadata, poisoned, reference)
    # a parameter index (an int leaf) maps state to parameters: it must be this task's own
    index = next(i for i, entry in enumerate(metadata) if entry["type"] == "value" and entry["value"] == 1)
    remapped = [dict(entry) for entry in metadata]
    remapped[index]["value"] = 0
    assert "this task's optimizer has 1" in check_flat_state(remapped, tensors, reference)
    not_a_scalar = [dict(entry) for entry in metadata]
    not_a_scalar[index]["value"] = [1]
    assert "is a list" in check_flat_state(not_a_scalar, tensors, reference)
    nan_lr = [dict(entry) for entry in metadata]
    lr = next(i for i, entry in enumerate(metadata) if entry.get("value") == 0.02)
    nan_lr[lr]["value"] = float("nan")
    assert "not finite" in check_flat_state(nan_lr, tensors, reference)


def test_the_observer_keeps_a_checked_optimizer_state_or_momentum():
    order, reference = parameter_order(TASK, SEED)
    _, (metadata, tensors) = _trained_flat_state()
    params = [reference[name] + 1.0 for name in order]
    flat = reference_state(TASK, SEED)
    snapshot = check_state({"epoch": 5, "optimizer_metadata": metadata}, params + tensors, order, reference,
                           optimizer_reference=flat)
    assert snapshot.optimizer[0] == metadata and len(snapshot.optimizer[1]) == len(tensors)
    assert snapshot.training_state("sync").holds() == "parameters + optimizer state"
    with pytest.raises(SnapshotError, match="no optimizer state"):
        check_state({"epoch": 5}, params + tensors, order, reference, optimizer_reference=flat)
    with pytest.raises(SnapshotError, match="tensors"):
        check_state({"epoch": 5, "optimizer_metadata": metadata}, params + tensors[:-1], order, reference,
                    optimizer_reference=flat)

    order, reference = anchor_order(TASK, SEED)
    anchor = [reference[name] for name in order]
    momentum = [torch.ones_like(t) for t in anchor]
    snapshot = check_state({"epoch": 2}, anchor + momentum, order, reference, momentum=True)
    assert list(snapshot.momentum) == order and snapshot.training_state("diloco").holds() == "anchor + outer momentum"
    with pytest.raises(SnapshotError, match="momentum tensors"):
        check_state({"epoch": 2}, anchor + momentum[:-1], order, reference, momentum=True)
    momentum[1] = momentum[1] * float("nan")
    with pytest.raises(SnapshotError, match="non-finite"):
        check_state({"epoch": 2}, anchor + momentum, order, reference, momentum=True)


def test_a_joining_peer_says_when_the_run_goes_back():
    state = TrainingState(model={}, strategy="sync", optimizer=([], []))
    older = resume_lines(SimpleNamespace(epoch=80, checkpoint_epoch=68, swarm_empty=True), state, "sync")
    assert older == ["resuming from the run's checkpoint at epoch 68, older than the run's epoch 80 "
                     "(no peer is left; epochs 68-80 are trained again)"]
    nothing = resume_lines(SimpleNamespace(epoch=10, checkpoint_epoch=0, swarm_empty=True), None, "sync")
    assert nothing and nothing[0].startswith("warning: no peer is left and the run has no checkpoint")
    assert "epoch 10" in nothing[0]
    assert resume_lines(SimpleNamespace(epoch=10, checkpoint_epoch=0, swarm_empty=False), None, "sync") == []
    assert resume_lines(SimpleNamespace(epoch=0, checkpoint_epoch=0, swarm_empty=True), None, "sync") == []
    other = resume_lines(SimpleNamespace(epoch=3, checkpoint_epoch=3, swarm_empty=True), state, "diloco")
    assert other[1] == "the checkpoint was taken by a sync run: only its parameters are used"


def test_checkpoints_stay_on_their_cadence_and_a_failure_is_said_once(capsys, tmp_path):
    assert [next_due(saved, 10) for saved in (0, 9, 10, 51, 68)] == [10, 10, 20, 60, 70]
    failures = FailureLine(lambda epoch, why: record_failure(tmp_path, epoch, why))
    for _ in range(3):
        failures.say(10, "no peer shared its state")
    failures.say(11, "no peer shared its state")
    assert capsys.readouterr().out.splitlines() == ["checkpoint failed at epoch 10: no peer shared its state",
                                                    "checkpoint failed at epoch 11: no peer shared its state"]
    assert last_failure(tmp_path)["epoch"] == 11  # the dashboard's alert
    clear_failure(tmp_path)
    assert last_failure(tmp_path) is None
    (tmp_path / "checkpoints" / "failure.json").write_text("{not json")
    assert last_failure(tmp_path) is None
