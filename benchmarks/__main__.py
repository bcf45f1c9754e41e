"""``python -m benchmarks run [--quick|--smoke] --out FILE.json``: measure figures (a), (b), (c),
(d), (f), (g) of the shared BENCHMARKS.md, each against its bound and the baseline arm (plain
hivemind.Optimizer with its defaults), print a table and write the JSON.

Needs root for network namespaces; otherwise it runs on loopback and says so.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: the in-process reference runs one thread
from dataclasses import replace
from pathlib import Path

from benchmarks.arms import Arm, Workload
from benchmarks.report import table
from benchmarks.runner import Plan, default_arms, run, write_json


def parse_arm(text: str) -> Arm:
    """NAME or NAME:key=value,key=value (the run.toml [averaging] table), e.g.
    diloco:strategy=diloco,inner_steps=100,compression=uint8; 'baseline' is plain hivemind."""
    import tomllib

    name, _, rest = text.partition(":")
    if name == "baseline":
        return Arm("baseline", "baseline")
    averaging = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            averaging[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            averaging[key] = value
    return Arm(name, "potluck", averaging)


def build_plan(args) -> Plan:
    if args.smoke:  # seconds, for the test suite: 2 peers, one short arm each, tiny probe
        plan = Plan(Workload(peers=2, seconds=10, late_join_after=2, late_grace=20, width=128, step_seconds=0.05,
                             target_batch=128), default_arms(quick=True), probe_values=100_000, probe_rounds=1,
                    overhead_seconds=6, overhead_target_batch=512, reference_cap=5_000, label="smoke",
                    concurrent=True)
        plan.arms = [replace(arm, averaging={**arm.averaging, "inner_steps": 10}) if "inner_steps" in arm.averaging
                     else arm for arm in plan.arms]
    elif args.quick:
        plan = Plan(Workload(peers=4, seconds=45, late_join_after=6, late_grace=15, width=512, step_seconds=0.05),
                    default_arms(quick=True), probe_rounds=3, probe_peers=2, overhead_seconds=20,
                    overhead_target_batch=1024, reference_cap=30_000, label="quick")
    else:
        plan = Plan(Workload(peers=4, seconds=90, late_join_after=20), default_arms(quick=False), repeats=2)
    workload = plan.workload
    if args.peers:
        workload = replace(workload, peers=args.peers)
    if args.rate:
        workload = replace(workload, rate_mbit=args.rate)
    if args.seconds:
        workload = replace(workload, seconds=args.seconds)
    if args.step_seconds is not None:
        if workload.peers > 2 and args.step_seconds == 0:
            raise SystemExit("error: real compute (--step-seconds 0) allows at most 2 peers on 2 cores; "
                             "use --peers 2 or a simulated step time")
        workload = replace(workload, step_seconds=args.step_seconds)
    plan = replace(plan, workload=workload)
    if args.arm:
        arms = [parse_arm(text) for text in args.arm]
        if not any(arm.kind == "baseline" for arm in arms):
            arms.insert(0, Arm("baseline", "baseline"))
        plan = replace(plan, arms=arms)
    if args.only:
        plan = replace(plan, figures=tuple(args.only))
    return plan


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "robust":  # its own options: see benchmarks/robust.py
        from benchmarks import robust

        return robust.main(argv[1:])
    if argv and argv[0] == "soak":  # its own options: see benchmarks/soak.py
        from benchmarks import soak

        return soak.main(argv[1:])
    if argv and argv[0] == "honest-long":  # its own options: see benchmarks/honest_long.py
        from benchmarks import honest_long

        return honest_long.main(argv[1:])
    if argv and argv[0] == "coordinator_scale":  # its own options: see benchmarks/coordinator_scale.py
        from benchmarks import coordinator_scale

        return coordinator_scale.main(argv[1:])
    if argv and argv[0] == "capacity":  # its own options: see benchmarks/capacity.py
        from benchmarks import capacity

        return capacity.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("robust", help="robust averaging against a poisoning peer (python -m benchmarks robust -h)")
    sub.add_parser("soak", help="churn, outages, a straggler, a partition: what survives (soak -h)")
    sub.add_parser("honest-long", help="false positives in a long honest run with churn (honest-long -h)")
    sub.add_parser("coordinator_scale", help="Heartbeat and Join cost per call vs peers (coordinator_scale -h)")
    sub.add_parser("capacity", help="a real serve driven by N simulated peers: calls/s, latency, CPU (capacity -h)")
    runp = sub.add_parser("run", help="run the benchmarks")
    runp.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    mode = runp.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 5 minutes on 2 cores: one potluck arm")
    mode.add_argument("--smoke", action="store_true", help="a tiny run that checks the harness (tests)")
    runp.add_argument("--peers", type=int, help="peers per swarm (default 4)")
    runp.add_argument("--rate", type=float, help="link rate per peer, Mbit/s (default 20)")
    runp.add_argument("--seconds", type=float, help="training seconds per arm")
    runp.add_argument("--step-seconds", type=float, help="simulated compute per micro-batch (0: real compute)")
    runp.add_argument("--arm", action="append", help="an arm, NAME[:key=value,...] (repeatable); see parse_arm")
    runp.add_argument("--only", nargs="+", choices=list("abcdfg"), help="measure only these figures")
    runp.add_argument("--workdir", type=Path, help="where logs and arm data go (default: a new temp dir)")
    args = parser.parse_args(argv)
    if not args.out.parent.exists():
        print(f"error: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return 2
    plan = build_plan(args)
    results = run(plan, args.workdir, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(table(results))
    write_json(results, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
