"""The benchmark task: digits, a wider MLP (payload of a chosen size), and optionally simulated compute.

Simulated compute (as hivemind's own benchmark_optimizer does): each micro-batch computes a real
loss and real gradients, then sleeps a fixed time, so a 2-core machine can host N > 2 peers whose
communication is real while their compute is not. Both knobs come from the environment, set
identically for every peer by the harness:

- ``POTLUCK_BENCH_WIDTH``: hidden width (1024: ~1.1M parameters, ~4.4 MB of fp32);
- ``POTLUCK_BENCH_STEP_SECONDS``: sleep per micro-batch (0: real compute only).
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from examples.digits import TASK as DIGITS

DEFAULT_WIDTH = 1024
LEARNING_RATE = 1e-3


def width() -> int:
    return int(os.environ.get("POTLUCK_BENCH_WIDTH", DEFAULT_WIDTH))


def step_seconds() -> float:
    return float(os.environ.get("POTLUCK_BENCH_STEP_SECONDS", "0"))


class BenchTask:
    """width / step_seconds: None reads the environment (how peers get them)."""

    name = "benchmarks.simtask"
    version = "1"

    def __init__(self, hidden: int | None = None, sleep_seconds: float | None = None):
        self.hidden, self.sleep_seconds = hidden, sleep_seconds

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        hidden = self.hidden if self.hidden is not None else width()
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))

    def train_data(self):
        return DIGITS.train_data()

    def eval_data(self):
        return DIGITS.eval_data()

    def loss(self, model, inputs, targets):
        loss = nn.functional.cross_entropy(model(inputs), targets)
        sleep = self.sleep_seconds if self.sleep_seconds is not None else step_seconds()
        if sleep > 0:
            time.sleep(sleep)
        return loss

    def make_optimizer(self, params):
        return torch.optim.Adam(params, lr=LEARNING_RATE)

    def evaluate(self, model, inputs, targets):
        return DIGITS.evaluate(model, inputs, targets)


def parameter_count(hidden: int) -> int:
    return 64 * hidden + hidden + hidden * hidden + hidden + hidden * 10 + 10


TASK = BenchTask()
