"""Figure (b) micro-benchmark: time of one averaging round of a fixed payload, per averager config.

One process per host (``python -m benchmarks.averaging_probe --host H --maddrs F --index I ...``)
holds one ``DecentralizedAverager`` per config on a shared DHT. Rounds run config after config
(A, B, A, B, ...), every peer starting each round together at a file barrier. Each round is timed
in two phases: group formation (step() until the group is assembled) and the data phase (from the
trigger until the average arrives). The averaged values are checked: every peer starts with its
index in every element, so the exact mean is known (hivemind can return partial results, trap 14).
Writes one JSON line per round to --out; stops by itself after --seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

ROUND_TIMEOUT = 20.0  # a round that hangs (trap 13) is recorded as failed, not waited out


def make_compression(name: str):
    """potluck's codecs (peer.compression also fixes hivemind's 8-bit decoder for numpy >= 2.4)."""
    try:
        from peer.compression import make_compression as potluck_codec
    except ImportError:  # a checkout before the codecs existed: fp32 only
        from hivemind.compression import NoCompression

        if name != "none":
            raise ValueError(f"compression {name!r} needs peer.compression") from None
        return NoCompression()
    return potluck_codec(name)


def barrier(folder: Path, key: str, index: int, peers: int, timeout: float) -> None:
    (folder / f"{key}-{index}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob(f"{key}-*"))) < peers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {key}: not every peer arrived")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.averaging_probe")
    parser.add_argument("--host", required=True)
    parser.add_argument("--maddrs", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--peers", type=int, required=True)
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", required=True, help="JSON list of {name, averager kwargs..., compression}")
    parser.add_argument("--barrier", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seconds", type=float, default=300)
    args = parser.parse_args()

    import hivemind
    import torch

    from hivemind.averaging.control import AveragingStage

    from peer.swarm import use_fork_start_method

    torch.set_num_threads(1)
    use_fork_start_method()
    deadline = time.monotonic() + args.seconds
    dht = hivemind.DHT(initial_peers=json.loads(Path(args.maddrs).read_text()),
                       host_maddrs=[f"/ip4/{args.host}/tcp/0"], start=True)
    configs = json.loads(args.configs)
    averagers, tensors = {}, {}
    for config in configs:
        kwargs = {k: v for k, v in config.items() if k not in ("name", "compression")}
        tensors[config["name"]] = torch.full((args.values,), float(args.index))
        averagers[config["name"]] = hivemind.DecentralizedAverager(
            [tensors[config["name"]]], dht, start=True, prefix=f"probe-{config['name']}",
            compression=make_compression(config.get("compression", "none")),
            allreduce_timeout=ROUND_TIMEOUT, **kwargs)
    folder = Path(args.barrier)
    expected = sum(range(args.peers)) / args.peers
    with open(args.out, "a", buffering=1) as out:
        for round_index in range(args.rounds):
            for config in configs:
                name = config["name"]
                if time.monotonic() > deadline:
                    break
                with averagers[name].get_tensors() as (tensor,):
                    tensor.fill_(float(args.index))
                barrier(folder, f"{round_index}-{name}", args.index, args.peers, max(deadline - time.monotonic(), 1))
                called = time.perf_counter()
                control = averagers[name].step(wait=False, require_trigger=True, timeout=ROUND_TIMEOUT)
                while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done() \
                        and time.perf_counter() - called < ROUND_TIMEOUT:
                    time.sleep(0.002)
                formed = time.perf_counter()
                control.allow_allreduce()
                try:
                    group = control.result(timeout=ROUND_TIMEOUT)
                    error = ""
                except Exception as exc:  # a failed round is a result too
                    group, error = None, f"{type(exc).__name__}: {exc}"
                done = time.perf_counter()
                with averagers[name].get_tensors() as (tensor,):
                    max_error = float((tensor - expected).abs().max())
                out.write(json.dumps({
                    "config": name, "round": round_index, "index": args.index, "time": time.time(),
                    "group_size": len(group) if group else 0, "formation": formed - called,
                    "data": done - formed, "total": done - called, "max_error": max_error, "error": error,
                }) + "\n")
    os._exit(0)  # hivemind's shutdown can hang (trap 10)


if __name__ == "__main__":
    main()
