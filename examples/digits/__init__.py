"""Handwritten digits (sklearn's bundled 8x8 images, 1,797 samples): a small MLP classifier.

The data ships inside scikit-learn, so this task runs offline. A fixed 80/20 split keeps the
held-out set identical on every peer.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(SPLIT_SEED))
    held_out = int(len(inputs) * HELD_OUT_FRACTION)
    test, train = order[:held_out], order[held_out:]
    return (inputs[train], targets[train]), (inputs[test], targets[test])


class DigitsTask:
    name = "examples.digits"
    version = "1"

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def train_data(self):
        return _split()[0]

    def eval_data(self):
        return _split()[1]

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs), targets)

    def make_optimizer(self, params):
        return torch.optim.Adam(params, lr=2e-2)

    @torch.no_grad()
    def evaluate(self, model, inputs, targets):
        logits = model(inputs)
        return {
            "accuracy": (logits.argmax(-1) == targets).float().mean().item(),
            "loss": nn.functional.cross_entropy(logits, targets).item(),
        }


TASK = DigitsTask()
