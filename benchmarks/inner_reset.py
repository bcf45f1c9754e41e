"""Does resetting DiLoCo's inner optimizer state per phase cost held-out loss? (in-process, exact averaging)

    python -m benchmarks.inner_reset [--task examples.digits] [--peers 2] [--inner-steps 16] [--rounds 10]
                                     [--seeds 3]

Simulates DiLoCo with the peer's own pieces: each virtual peer runs ``inner_steps`` micro-batches
through peer.work.do_micro_batch and the task's optimizer, the pseudo-gradients are averaged
exactly (no codec, no network), and the outer Nesterov SGD step is torch's, as in peer.diloco. The
only difference between the two arms is whether each phase starts with a fresh inner optimizer
(what makes a phase replayable from the anchor, peer/strategies/diloco.py) or keeps its state.
Prints one JSON line per arm: final held-out loss and accuracy per seed, and their means.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from peer.task import load_task
from peer.work import do_micro_batch


def exact_mean(deltas: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(parts) / len(parts) for parts in zip(*deltas)]


def simulate(task, seed: int, peers: int, inner_steps: int, rounds: int, reset: bool, micro_batch: int = 32,
             outer_lr: float = 0.7, outer_momentum: float = 0.9, warmup: int = 0, combine=exact_mean) -> dict:
    """Final held-out metrics; ``combine`` turns the peers' pseudo-gradients into the applied average."""
    inputs, targets = task.train_data()
    eval_inputs, eval_targets = task.eval_data()
    models = [task.build_model(seed) for _ in range(peers)]
    anchor = [p.detach().clone() for p in models[0].parameters()]
    outer = torch.optim.SGD(anchor, lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)  # as peer.diloco
    inner = [task.make_optimizer(m.parameters()) for m in models]
    for epoch in range(rounds):
        deltas = []
        for index, model in enumerate(models):
            with torch.no_grad():
                for p, a in zip(model.parameters(), anchor):
                    p.copy_(a)
            if reset:
                inner[index] = task.make_optimizer(model.parameters())
            base = [group["lr"] for group in inner[index].param_groups]
            for step in range(inner_steps):
                scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
                for group, lr in zip(inner[index].param_groups, base):
                    group["lr"] = lr * scale
                do_micro_batch(task, model, inputs, targets, run_seed=seed, epoch=epoch, peer_id=f"p-{index}",
                               micro_batch=step, micro_batch_size=micro_batch, sketch_dims=64,
                               device=torch.device("cpu"))
                inner[index].step()
            for group, lr in zip(inner[index].param_groups, base):
                group["lr"] = lr
            deltas.append([a - p.detach() for a, p in zip(anchor, model.parameters())])
        for a, mean in zip(anchor, combine(deltas)):
            a.grad = mean
        outer.step()
    final = task.build_model(seed)
    with torch.no_grad():
        for p, a in zip(final.parameters(), anchor):
            p.copy_(a)
    final.eval()
    return task.evaluate(final, eval_inputs, eval_targets)


def add_simulation_arguments(parser: argparse.ArgumentParser, seeds: int) -> None:
    """The options of an in-process DiLoCo simulation (task, peers, phase length, rounds, seeds)."""
    parser.add_argument("--task", default="examples.digits")
    parser.add_argument("--version", default="1")
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--inner-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=seeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_simulation_arguments(parser, seeds=3)
    parser.add_argument("--warmup", type=int, default=0, help="also try a reset with this many warm-up inner steps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task, args.version)
    arms = [(True, 0), (False, 0)] + ([(True, args.warmup)] if args.warmup else [])
    for reset, warmup in arms:
        runs = [simulate(task, 20261128 + s, args.peers, args.inner_steps, args.rounds, reset,
                         micro_batch=args.micro_batch, warmup=warmup)
                for s in range(args.seeds)]
        print(json.dumps({"reset_inner_state": reset, "warmup": warmup, "peers": args.peers, "inner_steps": args.inner_steps,
                          "rounds": args.rounds, "samples": args.peers * args.inner_steps * args.rounds * args.micro_batch,
                          "loss": [round(r["loss"], 4) for r in runs],
                          "mean_loss": round(statistics.mean(r["loss"] for r in runs), 4),
                          "mean_accuracy": round(statistics.mean(r.get("accuracy", 0.0) for r in runs), 4)}),
              flush=True)


if __name__ == "__main__":
    main()
