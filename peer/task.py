"""The task API: what every trainable task implements, and how a peer finds one.

A task is ordinary Python code installed on the volunteer's machine (no code travels over the
network). The run config names it by module (``[task] name = "examples.digits"``) and pins its
``version``; a peer refuses to train when the installed version differs, because peers running
different code would average incompatible gradients.

A task module exposes ``TASK``, an object with:

- ``name``, ``version``: identity, checked against the run config;
- ``build_model(seed)``: a fresh ``torch.nn.Module`` (same seed, same initial weights on every peer);
- ``train_data()`` / ``eval_data()``: a tuple of tensors ``(inputs, targets)`` held in memory;
- ``loss(model, inputs, targets)``: the scalar training loss of one micro-batch;
- ``make_optimizer(params)``: the local torch optimizer (hivemind wraps it);
- ``evaluate(model, inputs, targets)``: a dict of held-out metrics (e.g. ``{"accuracy": 0.93}``).
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch

from peer.errors import UserError


class Task(Protocol):
    name: str
    version: str

    def build_model(self, seed: int) -> torch.nn.Module: ...

    def train_data(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def eval_data(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def make_optimizer(self, params) -> torch.optim.Optimizer: ...

    def evaluate(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]: ...


def load_task(name: str, version: str) -> Task:
    """Import the locally installed task ``name`` and check that its version is ``version``."""
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise UserError(
            f"task '{name}' is not installed on this machine ({error.msg}); "
            f"install the package that provides it (for the examples: pip install -e . in the potluck checkout)"
        ) from None
    task = getattr(module, "TASK", None)
    if task is None:
        raise UserError(f"module '{name}' is not a potluck task: it defines no TASK object")
    if str(task.version) != str(version):
        raise UserError(
            f"task '{name}' is installed at version {task.version}, but the run needs version {version}; "
            f"install the matching version, then join again"
        )
    return task
