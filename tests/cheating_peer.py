"""Cheating variants of the real peer, for tests only: the real `peer` CLI with one function swapped.

    python tests/cheating_peer.py CHEAT join ADDRESS --token T ...   (CHEAT from CHEATS below)

Production code has no cheat switches; each variant here replaces exactly one function of the peer
(the work of a micro-batch, the report signer, or hivemind's progress record). The same functions
are used in-process by the replay-level tests, optionally cheating on only a fraction of the
micro-batches (CHEAT_FRACTION, seeded by CHEAT_SEED).
"""

from __future__ import annotations

import copy
import os
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer import work  # noqa: E402
from peer.sketch import Sketch, gradient_seed, gradient_sketch  # noqa: E402

honest_micro_batch = work.do_micro_batch


class Cheat:
    """A do_micro_batch replacement that cheats on a fraction of micro-batches."""

    def __init__(self, kind: str, fraction: float = 1.0, seed: int = 0, victim: str = "p-0000000000000000"):
        self.kind, self.fraction, self.seed, self.victim = kind, fraction, seed, victim
        self.rng = random.Random(seed)
        self.frozen = None  # the stale cheat's old model

    def cheats_on(self, epoch: int, micro_batch: int) -> bool:
        """Which micro-batches are faked: a fixed, seeded choice per (epoch, micro-batch)."""
        return random.Random(f"{self.seed}|{epoch}|{micro_batch}").random() < self.fraction

    def __call__(self, task, model, inputs, targets, **kw):
        if self.kind == "stale" and self.frozen is None:
            self.frozen = copy.deepcopy(model)
        if not self.cheats_on(kw["epoch"], kw["micro_batch"]):
            return honest_micro_batch(task, model, inputs, targets, **kw)
        return getattr(self, self.kind)(task, model, inputs, targets, **kw)

    def _resketch(self, model, done, kw, samples=None):
        seed = gradient_seed(kw["run_seed"], kw["epoch"], kw["peer_id"], kw["micro_batch"])
        return work.MicroBatchResult(done.index, samples or done.samples, done.loss,
                                     gradient_sketch(model, seed, kw["sketch_dims"]))

    def free_rider(self, task, model, inputs, targets, **kw):
        """Computes nothing, claims the micro-batch, and makes up a sketch of plausible size."""
        model.zero_grad(set_to_none=False)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        projection = tuple(self.rng.gauss(0, 0.1) for _ in range(kw["sketch_dims"]))
        return work.MicroBatchResult(kw["micro_batch"], kw["micro_batch_size"], 2.3, Sketch(0.8, projection))

    def inflated(self, task, model, inputs, targets, **kw):
        """Does the work but claims twice the samples (and so twice the averaging weight)."""
        done = honest_micro_batch(task, model, inputs, targets, **kw)
        return work.MicroBatchResult(done.index, 2 * done.samples, done.loss, done.sketch)

    def _modify(self, model, kw, change):
        done = honest_micro_batch(kw.pop("task"), model, kw.pop("inputs"), kw.pop("targets"), **kw)
        with torch.no_grad():
            for p in model.parameters():
                change(p)
        return self._resketch(model, done, kw)

    def noise(self, task, model, inputs, targets, **kw):
        """Sends random noise of the gradient's norm instead of the gradient."""
        def change(p):
            noise = torch.randn_like(p.grad)
            p.grad.copy_(noise * p.grad.norm() / noise.norm().clamp_min(1e-12))
        return self._modify(model, dict(kw, task=task, inputs=inputs, targets=targets), change)

    def scaled(self, task, model, inputs, targets, **kw):
        return self._modify(model, dict(kw, task=task, inputs=inputs, targets=targets), lambda p: p.grad.mul_(10))

    def sign_flip(self, task, model, inputs, targets, **kw):
        return self._modify(model, dict(kw, task=task, inputs=inputs, targets=targets), lambda p: p.grad.neg_())

    def copied(self, task, model, inputs, targets, **kw):
        """Trains on another peer's assignment (a copy of its gradient), sketched under its own id."""
        done = honest_micro_batch(task, model, inputs, targets, **dict(kw, peer_id=self.victim))
        return self._resketch(model, done, kw)

    def stale(self, task, model, inputs, targets, **kw):
        """Computes gradients at old parameters (never updates its working copy)."""
        done = honest_micro_batch(task, self.frozen, inputs, targets, **kw)
        with torch.no_grad():
            for p, q in zip(model.parameters(), self.frozen.parameters()):
                p.grad = q.grad.clone()
        return self._resketch(model, done, kw)


def forge_signature(request, run_id, private_key) -> None:
    """Signs reports with a key that is not the peer's identity (a forged or tampered report)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from peer.report import canonical_body, canonical_bytes

    request.signature = Ed25519PrivateKey.generate().sign(canonical_bytes(canonical_body(request, run_id)))


def lie_about_epoch() -> None:
    """Publishes an epoch 1000 ahead in hivemind's progress records (HIVEMIND_NOTES trap 4), while
    its own training goes on as usual (so it keeps publishing)."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress

    honest = LocalTrainingProgress.dict

    def published(self, *args, **kwargs):
        record = honest(self, *args, **kwargs)
        return {**record, "epoch": record["epoch"] + 1000}

    LocalTrainingProgress.dict = published


LIE_AHEAD = 2  # epochs ahead, inside the default epoch_slack (3)


def lie_about_progress() -> None:
    """Publishes progress records two epochs ahead (inside the epoch slack) claiming the whole target
    batch at a huge rate: with hivemind believing them, every honest peer loops "behind the swarm,
    load state" (or steps after one micro-batch)."""
    from hivemind.optim.progress_tracker import LocalTrainingProgress

    honest = LocalTrainingProgress.dict

    def published(self, *args, **kwargs):
        record = honest(self, *args, **kwargs)
        return {**record, "epoch": record["epoch"] + LIE_AHEAD, "samples_accumulated": 10**6, "samples_per_second": 1e6,
                "time": record["time"] - 60}

    LocalTrainingProgress.dict = published


def replay_old_reports() -> None:
    """Reports each epoch with the sketches of its first epoch (a replayed report)."""
    from peer import client

    attach = client.attach_proof
    first = {}

    def attach_old(request, proof):
        first.setdefault("proof", proof)
        old = first["proof"]
        attach(request, work.EpochProof(proof.epoch, proof.parameters, proof.dtype, list(old.micro_batches)))
        request.samples = sum(item.samples for item in old.micro_batches)

    client.attach_proof = attach_old


CHEATS = ["free_rider", "inflated", "noise", "scaled", "sign_flip", "copied", "stale", "forged", "epoch_lie",
          "replay", "progress_lie"]


def install(kind: str) -> None:
    import peer.report
    import peer.loop

    if kind == "forged":
        peer.report.sign_report = forge_signature
    elif kind == "epoch_lie":
        lie_about_epoch()
    elif kind == "replay":
        replay_old_reports()
    elif kind == "progress_lie":
        lie_about_progress()
    else:
        peer.loop.do_micro_batch = Cheat(kind, float(os.environ.get("CHEAT_FRACTION", "1")),
                                            int(os.environ.get("CHEAT_SEED", "0")))


if __name__ == "__main__":
    kind = sys.argv.pop(1)
    if kind not in CHEATS:
        sys.exit(f"unknown cheat {kind!r}; one of {', '.join(CHEATS)}")
    install(kind)
    from peer.cli import main

    sys.argv[0] = "peer"
    main()
