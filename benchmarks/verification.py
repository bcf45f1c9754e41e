"""Verification benchmark: what auditing costs and how surely it catches a cheater.

    python -m benchmarks.verification [--json FILE] [--threads N]

Measured in one run, as ratios (no absolute timing goal):
- the sketch's share of a peer's micro-batch (digits MLP and a ~6M-parameter MLP);
- auditor compute as a fraction of swarm compute at the default [verification] rates, counting
  the real AuditPolicy's choices over a window (replays + one parameter fingerprint per snapshot);
- the probability of catching a peer that fakes 10% of its micro-batches within one window,
  by formula 1-(1-f)^k and by Monte Carlo over seeded cheaters with the real policy.
Goal (issue 4): >= 99% detection within one window at <= 3% overhead.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coordinator.auditor import AuditPolicy  # noqa: E402
from examples.digits import TASK as DIGITS  # noqa: E402
from peer.runconfig import VerificationConfig  # noqa: E402
from peer.sketch import gradient_sketch, parameter_fingerprint  # noqa: E402
from peer.work import do_micro_batch  # noqa: E402

CHEAT_FRACTION = 0.1
WINDOW_MICRO_BATCHES = [16, 64, 200, 500]  # one window = window_epochs epochs of these  # micro-batches per peer per epoch
TRIALS = 2000


class WideTask:
    """A ~6M-parameter MLP on random data: shows how the sketch's share shrinks as models grow."""

    def build_model(self, seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))

    def train_data(self):
        generator = torch.Generator().manual_seed(0)
        return torch.randn(4096, 1024, generator=generator), torch.randint(0, 10, (4096,), generator=generator)

    def loss(self, model, inputs, targets):
        return nn.functional.cross_entropy(model(inputs), targets)


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def costs(task, batch: int, dims: int, repeats: int) -> dict:
    model = task.build_model(1)
    inputs, targets = task.train_data()
    cpu = torch.device("cpu")
    counter = iter(range(10**9))

    def plain():
        index = torch.randperm(len(inputs))[:batch]
        model.zero_grad(set_to_none=True)
        task.loss(model, inputs[index], targets[index]).backward()

    def work():
        do_micro_batch(task, model, inputs, targets, run_seed=1, epoch=0, peer_id="p-bench", micro_batch=next(counter),
                       micro_batch_size=batch, sketch_dims=dims, device=cpu)

    t_plain, t_work = best_of(plain, repeats), best_of(work, repeats)
    t_sketch = best_of(lambda: gradient_sketch(model, next(counter), dims), repeats)
    t_fingerprint = best_of(lambda: parameter_fingerprint(model, 7, dims), repeats)
    return {"parameters": sum(p.numel() for p in model.parameters()), "batch": batch, "plain_s": t_plain,
            "work_s": t_work, "sketch_s": t_sketch, "fingerprint_s": t_fingerprint,
            "sketch_share": t_sketch / (t_plain + t_sketch)}


def window_overhead(v: VerificationConfig, micro_batches: int, work_s: float, fingerprint_s: float,
                    established: bool, rng: random.Random) -> dict:
    """Auditor work / the peer's work per window (mean of 200 windows of the real policy's draws)."""
    windows, replays, snapshots = 200, 0, 0
    for _ in range(windows):
        policy = AuditPolicy(v, rng)
        rate = policy.rate(established, suspicious=False)
        in_window = 0
        for epoch in range(v.window_epochs):
            if policy.snapshot_epoch(epoch):
                snapshots += 1
                in_window += len(policy.choose(micro_batches, rate, []))
        replays += max(in_window, v.audit_floor)
    peer_seconds = windows * v.window_epochs * micro_batches * work_s
    auditor_seconds = replays * work_s + snapshots * fingerprint_s
    return {"replays": replays / windows, "fraction": auditor_seconds / peer_seconds}


def detection(v: VerificationConfig, micro_batches: int, established: bool, rng: random.Random) -> dict:
    """P(a 10% cheater is caught in one window): formula with the mean k, and Monte Carlo."""
    policy = AuditPolicy(v, rng)
    rate = policy.rate(established, suspicious=False)
    caught, ks = 0, []
    for _ in range(TRIALS):
        policy._snapshot_epochs.clear()
        audited = [(e, i) for e in range(v.window_epochs) if policy.snapshot_epoch(e)
                   for i in policy.choose(micro_batches, rate, [])]
        k = max(len(audited), v.audit_floor)
        ks.append(k)
        caught += any(rng.random() < CHEAT_FRACTION for _ in range(k))
    mean_k = sum(ks) / len(ks)
    return {"mean_k": mean_k, "formula": sum(1 - (1 - CHEAT_FRACTION) ** k for k in ks) / len(ks),
            "monte_carlo": caught / TRIALS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    v = VerificationConfig()
    rng = random.Random(2026)
    results = {"config": v.__dict__, "cheat_fraction": CHEAT_FRACTION, "models": {}, "windows": []}
    print(f"[verification] defaults: {v}")
    print("\nsketch cost per micro-batch (best of N, CPU, %d thread(s))" % args.threads)
    print(f"{'model':<10}{'params':>10}{'batch':>7}{'fwd+bwd ms':>12}{'sketch ms':>11}{'sketch share':>14}")
    for name, task, batch, repeats in (("digits", DIGITS, 32, 200), ("wide-6M", WideTask(), 64, 10)):
        c = costs(task, batch, v.sketch_dims, repeats)
        results["models"][name] = c
        print(f"{name:<10}{c['parameters']:>10,}{batch:>7}{c['plain_s'] * 1e3:>12.2f}{c['sketch_s'] * 1e3:>11.2f}"
              f"{c['sketch_share']:>13.1%}")
    c = results["models"]["wide-6M"]
    print(f"\nper window of {v.window_epochs} epochs, one peer, wide-6M costs; cheater fakes {CHEAT_FRACTION:.0%}")
    print(f"{'micro-batches/epoch':>20}{'peer':>14}{'replays':>9}{'auditor/swarm':>15}{'k':>7}"
          f"{'P(caught) formula':>19}{'Monte Carlo':>13}")
    for micro_batches in WINDOW_MICRO_BATCHES:
        for established in (False, True):
            o = window_overhead(v, micro_batches, c["work_s"], c["fingerprint_s"], established, rng)
            d = detection(v, micro_batches, established, rng)
            row = {"micro_batches_per_epoch": micro_batches, "established": established, **o, **d}
            results["windows"].append(row)
            print(f"{micro_batches:>20}{'established' if established else 'new':>14}{o['replays']:>9.1f}"
                  f"{o['fraction']:>15.2%}{d['mean_k']:>7.1f}{d['formula']:>19.4f}{d['monte_carlo']:>13.4f}")
    needed_k = math.ceil(math.log(100) / -math.log(1 - CHEAT_FRACTION))
    share = v.snapshot_rate * v.audit_rate
    print(f"\n99% detection of a {CHEAT_FRACTION:.0%} cheater needs k >= {needed_k} audits per window; at the "
          f"established replay share {share:.1%} that is >= {math.ceil(needed_k / share)} micro-batches per peer "
          f"per window (window_epochs x micro-batches per epoch)")
    results["needed_k"] = needed_k
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
