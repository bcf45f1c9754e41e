"""Verification benchmark: what auditing costs and how surely it catches a cheater.

    python -m benchmarks.verification [--json FILE] [--threads N]

Measured in one run, as ratios (no absolute timing goal):
- the sketch's share of a peer's micro-batch (digits MLP and a ~6M-parameter MLP);
- auditor compute as a fraction of a peer's compute at the default [verification] settings: the
  replays the auditor makes per window (its share on arrival, then top-ups until the window reaches
  the detection confidence, as coordinator/auditor.py does), plus the parameter fingerprints;
- the window's detection confidence (worst case over where a cheater puts its fakes) and a Monte
  Carlo of seeded cheaters faking 10% at random.
Goal (issue 10): a window settles only at >= 99% against a 10% faker; <= 3% of the work audited
once a window holds ~2,000 micro-batches.
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

from coordinator.auditor import AuditPolicy, arrival_share  # noqa: E402
from coordinator.confidence import window_confidence  # noqa: E402
from examples.digits import TASK as DIGITS  # noqa: E402
from peer.runconfig import VerificationConfig  # noqa: E402
from peer.sketch import gradient_sketch, parameter_fingerprint  # noqa: E402
from peer.work import do_micro_batch  # noqa: E402

CHEAT_FRACTION = 0.1
WINDOW_MICRO_BATCHES = [8, 16, 64, 200, 500]  # one window = window_epochs epochs of these  # micro-batches per peer per epoch
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


def audited_window(v: VerificationConfig, micro_batches: int, established: bool, rng: random.Random) -> list[set]:
    """The micro-batches the auditor replays in one window of ``window_epochs`` reports: each report's
    share on arrival, then top-ups where the window is least covered until it is confident."""
    policy = AuditPolicy(v, rng)
    share = arrival_share(v, micro_batches, established, suspicious=False)
    audited = [set(policy.choose(micro_batches, share, [])) for _ in range(v.window_epochs)]
    while window_confidence([(micro_batches, len(a)) for a in audited], v.cheat_fraction) < v.detection_confidence:
        least = min(audited, key=len)
        least.add(rng.choice([i for i in range(micro_batches) if i not in least]))
    return audited


def window_overhead(v: VerificationConfig, micro_batches: int, work_s: float, fingerprint_s: float,
                    established: bool, rng: random.Random) -> dict:
    """Auditor work / the peer's work per window (mean of 200 windows of the real policy's draws), plus
    one parameter fingerprint per report (finding its snapshot; shared by every peer of a label, so
    this is the one-peer worst case)."""
    windows, replays = 200, 0
    for _ in range(windows):
        replays += sum(len(a) for a in audited_window(v, micro_batches, established, rng))
    fingerprints = windows * v.window_epochs
    peer_seconds = windows * v.window_epochs * micro_batches * work_s
    auditor_seconds = replays * work_s + fingerprints * fingerprint_s
    return {"replays": replays / windows, "replay_share": replays / (windows * v.window_epochs * micro_batches),
            "fraction": auditor_seconds / peer_seconds}


def detection(v: VerificationConfig, micro_batches: int, established: bool, rng: random.Random) -> dict:
    """P(a 10% cheater is caught in one window): the worst-case confidence, and Monte Carlo (random fakes)."""
    caught, ks, confidences = 0, [], []
    for _ in range(TRIALS // 4):
        audited = audited_window(v, micro_batches, established, rng)
        ks.append(sum(len(a) for a in audited))
        confidences.append(window_confidence([(micro_batches, len(a)) for a in audited], v.cheat_fraction))
        population = [(e, i) for e in range(v.window_epochs) for i in range(micro_batches)]
        fakes = set(rng.sample(population, math.ceil(CHEAT_FRACTION * len(population))))
        caught += any((e, i) in fakes for e, a in enumerate(audited) for i in a)
    return {"mean_k": sum(ks) / len(ks), "formula": min(confidences), "monte_carlo": caught / len(ks)}


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
    print(f"{'micro-batches/epoch':>20}{'window':>8}{'peer':>13}{'replays':>9}{'replayed':>10}{'auditor/peer':>14}"
          f"{'min confidence':>16}{'Monte Carlo':>13}")
    for micro_batches in WINDOW_MICRO_BATCHES:
        for established in (False, True):
            o = window_overhead(v, micro_batches, c["work_s"], c["fingerprint_s"], established, rng)
            d = detection(v, micro_batches, established, rng)
            row = {"micro_batches_per_epoch": micro_batches, "established": established, **o, **d}
            results["windows"].append(row)
            print(f"{micro_batches:>20}{micro_batches * v.window_epochs:>8}{'established' if established else 'new':>13}"
                  f"{o['replays']:>9.1f}{o['replay_share']:>10.2%}{o['fraction']:>14.2%}{d['formula']:>16.4f}"
                  f"{d['monte_carlo']:>13.4f}")
    needed_k = math.ceil(math.log(100) / -math.log(1 - CHEAT_FRACTION))
    print(f"\n99% detection of a {CHEAT_FRACTION:.0%} cheater needs k ~ {needed_k} audits per window once the window "
          f"is large; small windows need a larger share (coordinator/confidence.py)")
    results["needed_k"] = needed_k
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
