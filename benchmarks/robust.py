"""``python -m benchmarks robust --out F.json``: what robust averaging buys against a poisoner, and costs.

Arms, interleaved in one run (each repeat runs every arm once, in turn), each a fresh swarm of
``peers`` OS processes on 127.0.0.1 training examples.digits in sync mode through the peer's own
``peer.swarm.make_optimizer`` (hivemind.Optimizer with potluck's averagers), no coordinator:

- ``honest-mean``, ``honest-robust``: every peer honest, ``[averaging] aggregator`` mean / centered_clip;
- ``poison-mean``, ``poison-robust``: one peer multiplies the gradients it puts into the all-reduce by
  -10 (hivemind's ``load_accumulators_into_averager_`` wrapped in that process only), the rest honest.

Figures: the honest peers' final held-out loss and accuracy per arm, and the seconds per all-reduce
(gradient and parameter rounds, timed around potluck's runner inside each averager process, so
matchmaking waits are not counted). Round times inside training arms move with the machine's load,
so a round-time probe follows: ``peers`` processes, each with one averager per rule (mean,
centered_clip, centered_clip without attestation records) on the same vector, the rules taking turns
round by round, so every rule sees the same load. Goals (issue 10): poisoned robust loss <= 1.05 x honest; honest
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

def _time_allreduce(log_path: Path, kind_of=None) -> None:
    """Wrap potluck's runner so every all-reduce appends its kind and seconds to ``log_path``."""
    import peer.same_result_allreduce as runner

    inner = runner.run_allreduce_inplace

    async def timed(averager, tensors, *args, **kwargs):
        started = time.perf_counter()
        await inner(averager, tensors, *args, **kwargs)
        kind = kind_of(averager) if kind_of else ("grad" if "grad" in averager.prefix else "state")
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
    dht = _join_dht(index, workdir)
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



def _join_dht(index: int, workdir: Path):
    """Member 0 starts the DHT and publishes its addresses in ``workdir``; the others bootstrap from them."""
    import hivemind

    maddrs = workdir / "maddrs.json"
    if index == 0:
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        (workdir / "maddrs.tmp").write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
        (workdir / "maddrs.tmp").rename(maddrs)
        return dht
    while not maddrs.exists():
        time.sleep(0.1)
    return hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=json.loads(maddrs.read_text()), start=True)

ROUND_RULES = (("mean", "mean", True), ("centered_clip", "centered_clip", True),
               ("centered_clip-no-records", "centered_clip", False))


def rounds_main(index: int, workdir: Path, peers: int, size: int, rounds: int) -> None:
    """One member of the round-time probe: the three rules take turns, round by round, on one vector."""
    import torch

    torch.set_num_threads(1)
    from hivemind.averaging import DecentralizedAverager

    from peer.attestations import Attestations
    from peer.averagers import PotluckAveraging
    from peer.robust import AveragingRule
    from peer.swarm import use_fork_start_method

    class Averager(PotluckAveraging, DecentralizedAverager):
        pass

    use_fork_start_method()
    me = workdir / f"r{index}"
    me.mkdir(exist_ok=True)
    _time_allreduce(me / "rounds.jsonl", kind_of=lambda averager: averager.prefix.split("_", 1)[1])
    dht = _join_dht(index, workdir)
    signal = torch.randn(size, generator=torch.Generator().manual_seed(1))
    vector = signal + torch.randn(size, generator=torch.Generator().manual_seed(100 + index))
    averagers = []
    for name, aggregator, records in ROUND_RULES:
        averagers.append(Averager(
            [vector.clone()], dht=dht, prefix=f"rt_{name.replace('_', '-')}", start=True,
            rule=AveragingRule(aggregator), attestations=Attestations(me, "grad", 1, 64) if records else None,
            target_group_size=peers, min_group_size=peers, min_matchmaking_time=1.0, request_timeout=0.5,
            allreduce_timeout=30, next_chunk_timeout=10))
    (me / "ready").touch()
    for round_index in range(rounds):
        turn = round_index % len(averagers)  # each rule goes first as often as the others
        for averager in averagers[turn:] + averagers[:turn]:
            with averager.get_tensors() as tensors:
                tensors[0].copy_(vector)
            try:
                averager.step(gather={"epoch": round_index}, timeout=30)
            except Exception as error:  # a failed round is left out of the figures
                print(f"round {round_index} {averager.prefix} failed: {error!r}", flush=True)
    (me / "result.json").write_text("{}")
    while not (workdir / "done").exists():
        time.sleep(0.1)
    for averager in averagers:
        averager.shutdown()
    dht.shutdown()


def run_round_probe(workdir: Path, peers: int, size: int, rounds: int) -> dict:
    """Seconds per all-reduce (median over members and rounds) for each rule, the rules interleaved."""
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for index in range(peers):
        log = open(workdir / f"r{index}.log", "wb")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "benchmarks.robust", "rounds", str(index), str(workdir), str(peers), str(size),
             str(rounds)], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True))
    try:
        _wait(lambda: all((workdir / f"r{i}" / "result.json").exists() for i in range(peers)), 900, "round probe")
    finally:
        (workdir / "done").touch()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    seconds = {}
    for i in range(peers):
        for line in (workdir / f"r{i}" / "rounds.jsonl").read_text().splitlines():
            item = json.loads(line)
            seconds.setdefault(item["kind"], []).append(item["seconds"])
    figures = {kind: {"median_s": statistics.median(values), "rounds": len(values)} for kind, values in seconds.items()}
    mean = figures.get("mean", {}).get("median_s")
    for name in ("centered-clip", "centered-clip-no-records"):
        if mean and name in figures:
            figures[name]["vs_mean"] = figures[name]["median_s"] / mean
    return {"size": size, "peers": peers, "rounds": rounds, "figures": figures}


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
    if argv and argv[0] == "rounds":
        index, workdir, peers, size, rounds = argv[1:6]
        rounds_main(int(index), Path(workdir), int(peers), int(size), int(rounds))
        return 0
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
    parser.add_argument("--probe-only", action="store_true", help="only the round-time probe, no training arms")
    parser.add_argument("--probe-rounds", type=int, default=15, help="rounds per rule in the round-time probe (0: skip)")
    parser.add_argument("--probe-size", type=int, nargs="+", default=[17226],
                        help="vector sizes of the round-time probe (17,226: the digits model)")
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
    chosen = [] if args.probe_only else [arm for arm in ARMS if not args.arms or arm[0] in args.arms]
    arms = {name: [] for name, _, _ in chosen}
    for repeat in range(args.repeats):
        for name, aggregator, poison in chosen:
            aggregator = args.robust if aggregator == "centered_clip" else aggregator
            print(f"[robust] repeat {repeat} arm {name} ...", file=sys.stderr, flush=True)
            result = run_arm(workdir / f"{name}-{repeat}", aggregator, poison, args.peers, args.epochs,
                             args.step_seconds, not args.no_records)
            print(f"[robust]   {json.dumps(result)}", file=sys.stderr, flush=True)
            arms[name].append(result)
    probes = []
    for size in args.probe_size if args.probe_rounds else []:
        print(f"[robust] round-time probe, {size} values ...", file=sys.stderr, flush=True)
        probes.append(run_round_probe(workdir / f"probe-{size}", args.peers, size, args.probe_rounds))
        print(f"[robust]   {json.dumps(probes[-1])}", file=sys.stderr, flush=True)
    summary = summarize(arms)
    summary["round_probe"] = probes
    output = {"benchmark": "robust", "robust_aggregator": args.robust, "peers": args.peers, "epochs": args.epochs, "repeats": args.repeats,
              "step_seconds": args.step_seconds, "records": not args.no_records, "workdir": str(workdir),
              "arms": arms, **summary}
    print(table(summary))
    for probe in probes:
        print(f"round-time probe, {probe['size']:,} values, {probe['peers']} members (median s per all-reduce):")
        for kind, figure in probe["figures"].items():
            ratio = f"  {figure['vs_mean']:.3f} x mean" if "vs_mean" in figure else ""
            print(f"  {kind:<26} {figure['median_s']:.4f} s over {figure['rounds']} rounds{ratio}")
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
