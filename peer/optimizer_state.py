"""An optimizer's state in hivemind's flat form, checked against this task's own before anyone uses it.

hivemind shares a sync peer's optimizer state as ``(optimizer_metadata, tensors)``: the optimizer's
``state_dict()`` flattened, each leaf either ``{"type": "tensor", "index": i}`` or ``{"type":
"value", "value": v}`` (hivemind.optim.state_averager.dump_optimizer_state). Checkpoints carry it
the same way, the metadata as JSON. Whatever arrives (from the swarm or from a checkpoint file) must
have exactly the structure of the task's optimizer after hivemind's zero-gradient warm-up step: the
same leaves in the same order, every tensor of the same shape and dtype and finite, every value a
plain scalar of the same type, and every integer, flag or string equal to ours (they include the
parameter indices that map state to parameters). Floats (learning rate, betas, ...) may differ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FlatState = tuple[list[dict], list["torch.Tensor"]]
_SCALARS = (type(None), bool, int, float, str)


def flat_state(optimizer) -> FlatState:
    """``optimizer``'s state in hivemind's flat form (copies on cpu)."""
    from hivemind.optim.state_averager import dump_optimizer_state

    metadata, tensors = dump_optimizer_state(optimizer)
    return list(metadata), [tensor.detach().cpu().clone() for tensor in tensors]


def reference_state(task, seed: int) -> FlatState:
    """The flat state a peer's hivemind.Optimizer holds for this task before its first real step."""
    from hivemind.optim.state_averager import initialize_optimizer_state_

    model = task.build_model(seed)
    optimizer = task.make_optimizer(model.parameters())
    initialize_optimizer_state_(optimizer)  # what hivemind's TrainingStateAverager does at construction
    return flat_state(optimizer)


def check_flat_state(metadata, tensors, reference: FlatState) -> str | None:
    """What is wrong with ``(metadata, tensors)`` for an optimizer shaped like ``reference``, or None."""
    import torch

    ref_metadata, ref_tensors = reference
    if not isinstance(metadata, (list, tuple)) or len(metadata) != len(ref_metadata):
        count = len(metadata) if isinstance(metadata, (list, tuple)) else type(metadata).__name__
        return f"the optimizer state has {count} entries, this task's optimizer has {len(ref_metadata)}"
    if len(tensors) != len(ref_tensors):
        return f"the optimizer state has {len(tensors)} tensors, this task's optimizer has {len(ref_tensors)}"
    for position, (got, want) in enumerate(zip(metadata, ref_metadata)):
        if not isinstance(got, dict) or got.get("type") != want["type"]:
            return f"optimizer entry {position} is not a {want['type']}"
        if want["type"] == "tensor":
            if got.get("index") != want["index"]:
                return f"optimizer entry {position} names tensor {got.get('index')!r}, expected {want['index']}"
            continue
        value, expected = got.get("value"), want["value"]
        if type(value) is not type(expected) or not isinstance(value, _SCALARS):
            return f"optimizer entry {position} is a {type(value).__name__}, expected {type(expected).__name__}"
        if isinstance(value, float):
            if not math.isfinite(value):
                return f"optimizer entry {position} is not finite"
        elif value != expected:
            return f"optimizer entry {position} is {value!r}, this task's optimizer has {expected!r}"
    for index, (got, want) in enumerate(zip(tensors, ref_tensors)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            shape = (tuple(got.shape), got.dtype) if isinstance(got, torch.Tensor) else type(got).__name__
            return f"optimizer tensor {index} is {shape}, expected {(tuple(want.shape), want.dtype)}"
        if got.is_floating_point() and not torch.isfinite(got).all():
            return f"optimizer tensor {index} has non-finite values"
    return None
