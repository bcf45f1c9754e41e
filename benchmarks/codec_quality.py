"""Held-out loss and bytes of DiLoCo's codecs at equal samples (in-process, the real codecs).

    python -m benchmarks.codec_quality [--task examples.digits] [--peers 2] [--inner-steps 16] [--rounds 10]
                                       [--seeds 5] [--arms fp16,uint8,sparse]

The DiLoCo simulation of benchmarks/inner_reset.py (inner phases through peer.work.do_micro_batch,
torch's outer Nesterov step), with the pseudo-gradients combined as potluck's all-reduce does
(peer.same_result_allreduce): each peer's vector goes through the codec once on the way up (for
``sparse``: :class:`peer.sparse_codec.ErrorFeedback` first, then the lossless wire), the reducer
averages what it decoded, and the average goes through the codec once on the way down (everyone
applies the same decoded bytes). Bytes are the codec's real encodings: ``up`` one peer's vector,
``down`` the encoded average, per round (for N peers a peer sends (N-1)/N of ``up`` and receives
(N-1)/N of the others' ``up`` plus (N-1)/N of ``down``). Arms: none, fp16, uint8, sparse, or
sparse:bits=8,density=0.0625,chunk=256,outer_momentum=0.9 (any of those keys), separated by ';'. Prints one JSON line
per arm: held-out loss per seed and mean, accuracy, bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from benchmarks.inner_reset import add_simulation_arguments, simulate
from peer.compression import make_compression, round_trip
from peer.sparse_codec import ErrorFeedback
from peer.task import load_task


class Combine:
    """One arm's all-reduce for one run: per-peer residuals (sparse) and the bytes it encoded."""

    def __init__(self, codec_name: str, peers: int, shapes, chunk=256, bits=4, density=1 / 32):
        self.codec = make_compression(codec_name, chunk=chunk, bits=bits, density=density)
        self.feedback = [ErrorFeedback(shapes, chunk, density, bits) for _ in range(peers)] \
            if codec_name == "sparse" else None
        self.up, self.down = [], []

    def __call__(self, deltas):
        decoded, up = [], 0
        for index, delta in enumerate(deltas):
            if self.feedback is not None:
                delta = self.feedback[index].compress(delta)
            pairs = [round_trip(t.contiguous(), self.codec) for t in delta]
            decoded.append([d for d, _ in pairs])
            up += sum(n for _, n in pairs)
        mean = [sum(parts) / len(parts) for parts in zip(*decoded)]
        pairs = [round_trip(t, self.codec) for t in mean]
        self.up.append(up / len(deltas))
        self.down.append(sum(n for _, n in pairs))
        return [d for d, _ in pairs]


def parse_arm(text: str) -> tuple[str, dict, dict]:
    name, _, rest = text.partition(":")
    codec, outer = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "outer_momentum":
            outer[key] = float(value)
        else:
            codec[key] = float(value) if key == "density" else int(value)
    return name, codec, outer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_simulation_arguments(parser, seeds=5)
    parser.add_argument("--arms", default="none;fp16;uint8;sparse", help="arms separated by ';'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = load_task(args.task, args.version)
    shapes = [p.shape for p in task.build_model(0).parameters()]
    arms = [arm for arm in args.arms.split(";") if arm]
    for arm in arms:
        name, codec, outer = parse_arm(arm)
        runs, combines = [], []
        for s in range(args.seeds):
            combine = Combine(name, args.peers, shapes, **codec)
            runs.append(simulate(task, 20261128 + s, args.peers, args.inner_steps, args.rounds, reset=True,
                                 micro_batch=args.micro_batch, combine=combine, **outer))
            combines.append(combine)
        print(json.dumps({
            "arm": arm, "peers": args.peers, "inner_steps": args.inner_steps, "rounds": args.rounds,
            "samples": args.peers * args.inner_steps * args.rounds * args.micro_batch,
            "loss": [round(r["loss"], 4) for r in runs], "mean_loss": round(statistics.mean(r["loss"] for r in runs), 4),
            "mean_accuracy": round(statistics.mean(r.get("accuracy", 0.0) for r in runs), 4),
            "up_bytes_per_round": round(statistics.mean(b for c in combines for b in c.up)),
            "down_bytes_per_round": round(statistics.mean(b for c in combines for b in c.down)),
        }), flush=True)


if __name__ == "__main__":
    main()
