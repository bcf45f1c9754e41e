"""What coordinator.swarm_snapshot accepts from the swarm: checked state only (no processes needed)."""

from __future__ import annotations

import pytest
import torch

from coordinator.swarm_snapshot import SnapshotError, check_state, parameter_order
from examples.digits import TASK

SEED = 7


def _download():
    order, reference = parameter_order(TASK, SEED)
    tensors = [reference[name] + 1.0 for name in order]
    return order, reference, tensors


def test_a_well_formed_state_becomes_a_snapshot_in_model_order():
    order, reference, tensors = _download()
    snapshot = check_state({"epoch": 4, "group_bits": ""}, tensors + [torch.zeros(3)], order, reference)
    assert snapshot.epoch == 4
    model = TASK.build_model(SEED)
    model.load_state_dict(snapshot.state_dict)  # strict: every key, every shape
    for name in order:
        torch.testing.assert_close(snapshot.state_dict[name], reference[name] + 1.0)


@pytest.mark.parametrize("metadata", [None, [], {"epoch": -1}, {"epoch": "3"}, {"epoch": True}, {}])
def test_bad_metadata_is_refused(metadata):
    order, reference, tensors = _download()
    with pytest.raises(SnapshotError):
        check_state(metadata, tensors, order, reference)


def test_wrong_shape_missing_tensor_and_non_finite_values_are_refused():
    order, reference, tensors = _download()
    with pytest.raises(SnapshotError, match="expected"):
        check_state({"epoch": 1}, [tensors[0].T] + tensors[1:], order, reference)
    with pytest.raises(SnapshotError, match="at least"):
        check_state({"epoch": 1}, tensors[:-1], order, reference)
    poisoned = [t.clone() for t in tensors]
    poisoned[2][0] = float("nan")
    with pytest.raises(SnapshotError, match="non-finite"):
        check_state({"epoch": 1}, poisoned, order, reference)
    with pytest.raises(SnapshotError, match="expected"):
        check_state({"epoch": 1}, [tensors[0].double()] + tensors[1:], order, reference)
