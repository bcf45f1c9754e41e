"""The work of one micro-batch, in one place: what a peer computes and what an auditor recomputes.

A peer calls :func:`do_micro_batch` in its training loop; the coordinator's auditor calls the very
same function at the parameters the epoch started from, so "the work" has a single definition and
any change to it changes both sides at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from peer.assignment import micro_batch_indices
from peer.sketch import Sketch, gradient_seed, gradient_sketch, parameter_fingerprint, parameter_seed


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU: the numerics a peer trains with (and reports)."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def compute_dtype(device: torch.device) -> str:
    return "bf16" if device.type == "cuda" else "fp32"


@dataclass(frozen=True)
class MicroBatchResult:
    index: int
    samples: int
    loss: float
    sketch: Sketch


def do_micro_batch(task, model, inputs, targets, *, run_seed: int, epoch: int, peer_id: str, micro_batch: int,
                   micro_batch_size: int, sketch_dims: int, device: torch.device, autocast=None) -> MicroBatchResult:
    """Forward and backward of one assigned micro-batch; leaves its gradient in ``model``'s .grad
    (from zero) and returns its loss and the gradient's sketch."""
    index = micro_batch_indices(run_seed, epoch, peer_id, micro_batch, len(inputs), micro_batch_size)
    batch_inputs, batch_targets = inputs[index].to(device), targets[index].to(device)
    model.zero_grad(set_to_none=True)
    with (autocast or autocast_context(device))():
        loss = task.loss(model, batch_inputs, batch_targets)
    loss.backward()
    sketch = gradient_sketch(model, gradient_seed(run_seed, epoch, peer_id, micro_batch), sketch_dims)
    return MicroBatchResult(micro_batch, len(index), float(loss.detach()), sketch)


@dataclass
class EpochProof:
    """What a peer can show for one epoch: the parameters it started from and a sketch per micro-batch."""

    epoch: int
    parameters: Sketch
    dtype: str
    micro_batches: list[MicroBatchResult] = field(default_factory=list)

    @classmethod
    def start(cls, model, run_seed: int, epoch: int, sketch_dims: int, device: torch.device) -> "EpochProof":
        return cls(epoch, parameter_fingerprint(model, parameter_seed(run_seed, epoch), sketch_dims),
                   compute_dtype(device))
