"""``python -m benchmarks robust --out F.json``: what robust averaging buys against a poisoner, and costs.

Arms, interleaved in one run (each repeat runs every arm once, in turn), each a fresh swarm of
``peers`` OS processes on 127.0.0.1 training examples.digits in sync mode through the peer's own
``peer.swarm.make_optimizer`` (hivemind.Optimizer with potluck's averagers), no coordinator:

- ``honest-mean``, ``honest-robust``: every peer honest, ``[averaging] aggregator`` mean / centered_clip;
- ``poison-mean``, ``poison-robust``: one peer multiplies the gradients it puts into the all-reduce by
  -10 (hivemind's ``load_accumulators_into_averager_`` wrapped in that process only), the rest honest.

Figures: the honest peers' final held-out loss and accuracy per arm, and the seconds per all-reduce
(gradient and parameter rounds, timed around potluck's runner inside each averager process, so
matchmaking waits are not counted). Goals (issue 10): poisoned robust loss <= 1.05 x honest; honest
robust loss <= 1.02 x honest mean; robust round time <= 1.10 x mean. Compute is real (digits is
tiny); ``--step-seconds`` adds simulated compute per micro-batch. Attestation records are written
in every arm (their cost is in both round times); ``--no-records`` measures without them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = (("honest-mean", "mean", False), ("honest-robust", "centered_clip", False),
        ("poison-mean", "mean", True), ("poison-robust", "centered_clip", True))
POISON_SCALE = -10.0


# -- one peer (its own process) --------------------------------------------------------------------

def _time_allreduce(log_path: Path) -> None:
    """Wrap potluck's runner so every all-reduce appends its kind and seconds to ``log_path``."""
    import peer.same_result_allreduce as runner

    inner = runner.run_allreduce_inplace

    async def timed(averager, tensors, *args, **kwargs):
        started = time.perf_counter()
        await inner(averager, tensors, *args, **kwargs)
        kind = "grad" if "grad" in averager.prefix else "state"
        with open(log_path, "a") as log:
            log.write(json.dumps({"kind": kind, "seconds": time.perf_counter() - started}) + "\n")

    runner.run_allreduce_inplace = timed


def _poison() -> None:
    import torch
    from hivemind.optim.grad_averager import GradientAverager

    honest = GradientAverager.load_accumulators_into_averager_

    @torch.no_grad()
    def poisoned(self):
        honest(self)
        with self.get_tensors() as averaged:
            for tensor in averaged:
                tensor.mul_(POISON_SCALE)

    GradientAverager.load_accumulators_into_averager_ = poisoned


def peer_main(index: int, workdir: Path, aggregator: str, poison: bool, epochs: int, step_seconds: float,
              records: bool) -> None:
    import torch

    torch.set_num_threads(1)
    import hivemind

    from examples.digits import TASK
    from peer.runconfig import parse_run_config
    from peer.swarm import make_optimizer, use_fork_start_method

    use_fork_start_method()
    me = workdir / f"p{index}"
    me.mkdir(exist_ok=True)
    _time_allreduce(me / "rounds.jsonl")
    if poison:
        _poison()
    text = (ROOT / "examples" / "digits" / "run.toml").read_text()
    text = text.replace('aggregator = "centered_clip"', f'aggregator = "{aggregator}"')
    config = parse_run_config(text)
    maddrs = workdir / "maddrs.json"
    if index == 0:
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        (workdir / "maddrs.tmp").write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
        (workdir / "maddrs.tmp").rename(maddrs)
    else:
        while not maddrs.exists():
            time.sleep(0.1)
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=json.loads(maddrs.read_text()),
                           start=True)
    model = TASK.build_model(config.seed)
    opt = make_optimizer(dht, config, model, TASK, client_mode=False, data_dir=me if records else None)
    inputs, targets = TASK.train_data()
    generator = torch.Generator().manual_seed(1000 + index)
    (me / "ready").touch()
    while not (workdir / "go").exists():
        time.sleep(0.05)
    started = time.monotonic()
    while opt.local_epoch < epochs and time.monotonic() - started < 600:
        batch = torch.randint(len(inputs), (config.micro_batch_size,), generator=generator)
        loss = TASK.loss(model, inputs[batch], targets[batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step_seconds:
            time.sleep(step_seconds)
    result = TASK.evaluate(model, *TASK.eval_data())
    result.update(epoch=opt.local_epoch, seconds=time.monotonic() - started)
    (me / "result.json").write_text(json.dumps(result))
    while not (workdir / "done").exists():
        time.sleep(0.1)
    opt.shutdown()
    dht.shutdown()


# -- the run -------------------------------------------------------------------------------------------

def run_arm(workdir: Path, aggregator: str, poison: bool, peers: int, epochs: int, step_seconds: float,
            records: bool) -> dict:
    workdir.mkdir(parents=True)
    procs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for index in range(peers):
        bad = poison and index == peers - 1
        args = [sys.executable, "-m", "benchmarks.robust", "peer", str(index), str(workdir), aggregator,
                str(int(bad)), str(epochs), str(step_seconds), str(int(records))]
        log = open(workdir / f"p{index}.log", "wb")
        procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                      start_new_session=True))
    try:
        _wait(lambda: all((workdir / f"p{i}" / "ready").exists() for i in range(peers)), 180, "peers to start")
        (workdir / "go").touch()
        _wait(lambda: all((workdir / f"p{i}" / "result.json").exists() for i in range(peers)), 900, "peers to end")
    finally:
        (workdir / "done").touch()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    honest = range(peers - 1) if poison else range(peers)
    results = [json.loads((workdir / f"p{i}" / "result.json").read_text()) for i in honest]
    rounds = {"grad": [], "state": []}
    for i in honest:
        path = workdir / f"p{i}" / "rounds.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            item = json.loads(line)
            rounds[item["kind"]].append(item["seconds"])
    return {
        "loss": statistics.mean(r["loss"] for r in results),
        "accuracy": statistics.mean(r["accuracy"] for r in results),
        "epochs": [r["epoch"] for r in results],
        "seconds": max(r["seconds"] for r in results),
        "grad_round_s": statistics.median(rounds["grad"]) if rounds["grad"] else None,
        "state_round_s": statistics.median(rounds["state"]) if rounds["state"] else None,
        "rounds": {kind: len(values) for kind, values in rounds.items()},
    }


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def summarize(arms: dict) -> dict:
    def mean_of(name, key):
        values = [run[key] for run in arms[name] if run[key] is not None]
        return statistics.mean(values) if values else None

    figures = {name: {key: mean_of(name, key) for key in ("loss", "accuracy", "grad_round_s", "state_round_s")}
               for name in arms}
    if set(figures) != {name for name, _, _ in ARMS}:
        return {"figures": figures, "goals": {}}
    honest = figures["honest-mean"]["loss"]
    goals = {
        "poisoned_robust_loss_ratio": figures["poison-robust"]["loss"] / honest,
        "poisoned_mean_loss_ratio": figures["poison-mean"]["loss"] / honest,
        "honest_robust_loss_ratio": figures["honest-robust"]["loss"] / honest,
        "robust_round_time_ratio": (figures["honest-robust"]["grad_round_s"] / figures["honest-mean"]["grad_round_s"]
                                    if figures["honest-mean"]["grad_round_s"] else None),
    }
    goals["met"] = {
        "poisoned_robust_within_1.05x": goals["poisoned_robust_loss_ratio"] <= 1.05,
        "honest_robust_within_1.02x": goals["honest_robust_loss_ratio"] <= 1.02,
        "round_time_within_1.10x": goals["robust_round_time_ratio"] is not None
        and goals["robust_round_time_ratio"] <= 1.10,
    }
    return {"figures": figures, "goals": goals}


def table(summary: dict) -> str:
    lines = [f"{'arm':<15} {'held-out loss':>13} {'accuracy':>9} {'grad round s':>13} {'state round s':>14}"]
    for name, f in summary["figures"].items():
        lines.append(f"{name:<15} {f['loss']:>13.4f} {f['accuracy']:>9.3f} "
                     f"{f['grad_round_s'] or float('nan'):>13.4f} {f['state_round_s'] or float('nan'):>14.4f}")
    g = summary["goals"]
    if not g:
        return "\n".join(lines)
    lines.append(f"poisoned robust / honest loss: {g['poisoned_robust_loss_ratio']:.3f} (goal <= 1.05); "
                 f"poisoned mean / honest: {g['poisoned_mean_loss_ratio']:.3g}")
    lines.append(f"honest robust / honest mean loss: {g['honest_robust_loss_ratio']:.3f} (goal <= 1.02); "
                 f"robust / mean grad round time: {g['robust_round_time_ratio']:.3f} (goal <= 1.10)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "peer":
        index, workdir, aggregator, bad, epochs, step_seconds, records = argv[1:8]
        peer_main(int(index), Path(workdir), aggregator, bad == "1", int(epochs), float(step_seconds), records == "1")
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks robust", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=20, help="global epochs per arm (digits: 512 samples each)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all four arms, interleaved")
    parser.add_argument("--step-seconds", type=float, default=0.0, help="simulated extra compute per micro-batch")
    parser.add_argument("--no-records", action="store_true", help="do not write attestation records")
    parser.add_argument("--workdir", type=Path, help="where logs and arm data go (default: a new temp dir)")
    parser.add_argument("--arms", nargs="+", choices=[name for name, _, _ in ARMS], help="run only these arms")
    parser.add_argument("--robust", default="centered_clip", choices=["centered_clip", "trimmed_mean"],
                        help="the aggregator of the *-robust arms")
    args = parser.parse_args(argv)
    if not args.out.parent.exists():
        print(f"error: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return 2
    if args.peers < 3:
        print("error: --peers must be at least 3 (one poisoner among honest peers)", file=sys.stderr)
        return 2
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="potluck-robust-"))
    chosen = [arm for arm in ARMS if not args.arms or arm[0] in args.arms]
    arms = {name: [] for name, _, _ in chosen}
    for repeat in range(args.repeats):
        for name, aggregator, poison in chosen:
            aggregator = args.robust if aggregator == "centered_clip" else aggregator
            print(f"[robust] repeat {repeat} arm {name} ...", file=sys.stderr, flush=True)
            result = run_arm(workdir / f"{name}-{repeat}", aggregator, poison, args.peers, args.epochs,
                             args.step_seconds, not args.no_records)
            print(f"[robust]   {json.dumps(result)}", file=sys.stderr, flush=True)
            arms[name].append(result)
    summary = summarize(arms)
    output = {"benchmark": "robust", "robust_aggregator": args.robust, "peers": args.peers, "epochs": args.epochs, "repeats": args.repeats,
              "step_seconds": args.step_seconds, "records": not args.no_records, "workdir": str(workdir),
              "arms": arms, **summary}
    print(table(summary))
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
