"""A peer that poisons the gradient average while its reports stay honest.

It is the real `peer join` with one change: after hivemind's GradientAverager loads the peer's
accumulated gradients into the buffers it all-reduces, they are multiplied by POISON_SCALE (default
-10: sign-flipped x10). Its micro-batches, sketches and reports are the honest ones.
Run: python -m tests.variants.poisoning_peer join ...
"""

import os

import torch
from hivemind.optim.grad_averager import GradientAverager

from peer.cli import main

SCALE = float(os.environ.get("POISON_SCALE", "-10"))
honest_load = GradientAverager.load_accumulators_into_averager_


@torch.no_grad()
def poisoned_load(self):
    honest_load(self)
    with self.get_tensors() as averaged:
        for tensor in averaged:
            tensor.mul_(SCALE)


GradientAverager.load_accumulators_into_averager_ = poisoned_load

if __name__ == "__main__":
    main()
