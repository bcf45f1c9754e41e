"""One benchmark run: build the lab, run the arms interleaved, compute the figures, always clean up.

Cleanup is guaranteed by try/finally plus SIGTERM/SIGHUP handlers that turn into an exception (SIGINT
already is one): every process group started is killed by PID and every namespace deleted (their
veths and the bridge go with them). Nothing outside the ``plk-<pid>-`` names is touched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks import figures, formulas
from benchmarks.arms import Arm, ArmRunner, Workload, check_run_toml, run_toml
from benchmarks.netns import LoopbackLab, NetnsLab, namespaces_available
from benchmarks.probe import averager_configs, run_probe
from benchmarks.procs import Processes, child_env
from benchmarks.reference import parallel_bare_loops, single_process_curve
from benchmarks.simtask import parameter_count
from benchmarks.throughput import loopback_mbit

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Plan:
    """Everything one run does; --quick and --smoke are presets of it."""

    workload: Workload
    arms: list[Arm]
    repeats: int = 1  # arms run A, B, A, B ... this many times each
    probe_values: int = 1_000_000  # figure (b) payload: 1M fp32 values = 4 MB
    probe_rounds: int = 3
    overhead_seconds: float = 20.0  # figure (f): each of the two single-peer runs
    overhead_target_batch: int = 4096
    target_loss: float = 0.25  # figure (d): held-out cross-entropy on digits
    reference_cap: int = 60_000  # most samples the single-process reference trains
    figures: tuple[str, ...] = ("a", "b", "c", "d", "f", "g")
    label: str = "full"
    probe_peers: int = 0  # figure (b) peers (0: the workload's)
    concurrent: bool = False  # smoke only: every piece at once, to check the harness in seconds
    notes: list[str] = field(default_factory=list)


def default_arms(quick: bool) -> list[Arm]:
    """baseline, then potluck's arms; quick keeps one potluck arm (diloco when this checkout has it)."""
    sync = Arm("sync", "potluck", {"strategy": "sync"})
    diloco = Arm("diloco", "potluck", {"strategy": "diloco", "inner_steps": 100, "compression": "uint8",
                                       "outer_lr": 0.7, "outer_momentum": 0.9, "overlap": True})
    blocking = Arm("diloco-blocking", "potluck", {**diloco.averaging, "overlap": False})
    arms = [Arm("baseline", "baseline"), sync, blocking, diloco]
    if quick:
        usable = [arm for arm in (diloco, sync) if not check_run_toml(run_toml(Workload(), arm, "probe"))]
        arms = [arms[0], usable[0] if usable else sync]
    return arms


def resolve_arms(arms: list[Arm], workload: Workload, notes: list[str]) -> list[Arm]:
    """Keep the arms this checkout accepts. A sync arm whose [averaging] table is rejected (before
    the averaging strategies exist) runs as today's sync, without the table, and says so."""
    kept = []
    for arm in arms:
        if arm.kind != "potluck":
            kept.append(arm)
            continue
        reason = check_run_toml(run_toml(workload, arm, "probe"))
        if not reason:
            kept.append(arm)
        elif arm.averaging.get("strategy", "sync") == "sync" and not check_run_toml(run_toml(workload, replace(arm, averaging={}), "probe")):
            notes.append(f"arm {arm.name}: this checkout has no [averaging] section ({reason}); ran today's sync averaging")
            kept.append(replace(arm, averaging={}))
        else:
            notes.append(f"arm {arm.name} skipped: {reason}")
    return kept


def git_commit() -> str:
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return (result.stdout.strip() or "unknown") + ("+dirty" if dirty else "")


def shaped_stream_mbit(processes: Processes, server, client, seconds: float = 2.0) -> float | None:
    """One TCP stream from client to server host through both shaped links."""
    if not server.namespace:
        return None
    port = "5201"
    serve = subprocess.Popen(server.command([sys.executable, "-m", "benchmarks.throughput", "serve", server.address,
                                             port, str(seconds)]), stdout=subprocess.PIPE, text=True,
                             cwd=ROOT, env=child_env(), start_new_session=True)
    try:
        subprocess.run(client.command([sys.executable, "-m", "benchmarks.throughput", "send", server.address, port,
                                       str(seconds)]), timeout=seconds + 30, capture_output=True, cwd=ROOT,
                       env=child_env())
        out, _ = serve.communicate(timeout=30)
        return float(out.strip()) if out.strip() else None
    finally:
        processes.signal_group(serve, signal.SIGKILL)
        serve.wait(timeout=5)


def raise_on_signal(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def run(plan: Plan, workdir: Path | None = None, log=print) -> dict:
    """Run the plan; returns the results dict (figures by letter, and "meta")."""
    # SIGINT too: a shell that starts us in the background hands SIGINT over as ignored
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_on_signal)
    available, why = namespaces_available()
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"plk-{os.getpid()}-bench-"))
    workload = plan.workload
    if not available:
        log(f"network namespaces unavailable ({why}): running on loopback, links NOT shaped")
        plan.notes.append(f"loopback mode: {why}; links not shaped, wire bytes include other loopback traffic")
    lab = NetnsLab() if available else LoopbackLab()
    processes = Processes(workdir / "logs")
    started = time.time()
    meta = {"mode": lab.mode, "peers": workload.peers, "link_mbit": workload.rate_mbit if available else None,
            "simulated_compute": workload.simulated, "simulated_step_seconds": workload.step_seconds,
            "plan": plan.label, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
            "cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0], "workdir": str(workdir),
            "machine": "shared with other jobs and loaded; ratios come from arms interleaved in this one run"}
    results: dict = {}
    try:
        meta["unshaped_loopback_mbit"] = round(loopback_mbit(1.0), 1)
        log(f"unshaped loopback, one TCP stream: {meta['unshaped_loopback_mbit']:.0f} Mbit/s")
        if available:
            pair = lab.hosts_for(2, workload.rate_mbit)[1:]
            shaped = shaped_stream_mbit(processes, pair[0], pair[1])
            meta["shaped_stream_mbit"] = shaped
            log(f"shaped link, one TCP stream: {shaped} Mbit/s (tbf rate {workload.rate_mbit})")
        arms = resolve_arms(plan.arms, workload, plan.notes)
        meta["arms"] = [asdict(arm) for arm in arms]
        rate_bps = workload.rate_mbit * 1e6
        parameters = parameter_count(workload.width)
        meta["model_parameters"] = parameters
        meta["workload"] = asdict(workload)
        runner = ArmRunner(lab, processes, workdir / "arms")
        main_arm = next((a for a in reversed(arms) if a.kind == "potluck"), None)
        # (b) compares averaging protocols at the same fp32 payload; what codecs save shows in (c)
        probe_peers = plan.probe_peers or workload.peers
        probe_configs = averager_configs(workload.matchmaking_time, "none", probe_peers)
        # (f): two peers with real compute (the most 2 cores allow; a DiLoCo round needs a group of two)
        single = replace(workload, peers=2, step_seconds=0.0, late_join_after=0.0,
                         seconds=plan.overhead_seconds, target_batch=plan.overhead_target_batch)
        bare_seconds = min(plan.overhead_seconds / 3, 8)
        bare: list[float] = []
        runs: dict[str, list] = {arm.name: [] for arm in arms}
        overhead: dict = {}

        def probe():
            log(f"(b) averaging rounds of {plan.probe_values * 4 / 1e6:.1f} MB, {probe_peers} peers ...")
            return run_probe(lab.hosts_for(probe_peers, workload.rate_mbit), processes, workdir / "probe",
                             values=plan.probe_values, rounds=plan.probe_rounds, configs=probe_configs,
                             env=workload.env())

        def training(arm: Arm, repeat: int):
            log(f"arm {arm.name} ({repeat + 1}/{plan.repeats}): {workload.peers} peers, {workload.seconds:.0f} s ...")
            hosts = lab.hosts_for(workload.peers + (1 if workload.late_join_after else 0), workload.rate_mbit)
            runs[arm.name].append(runner.run(replace(arm, name=f"{arm.name}-{repeat}"), workload, hosts))

        def alone(arm: Arm):
            log(f"(f) arm {arm.name}: two peers, real compute ...")
            overhead[arm.kind] = runner.run(replace(arm, name=f"f-{arm.name}"), single,
                                            lab.hosts_for(single.peers, workload.rate_mbit))

        def bare_loop():
            bare.append(parallel_bare_loops(single.peers, workload.width, workload.seed, workload.micro_batch,
                                            bare_seconds))

        pieces = []
        if "b" in plan.figures:
            pieces.append(probe)
        if {"a", "c", "d", "g"} & set(plan.figures):
            pieces += [lambda arm=arm, r=r: training(arm, r) for r in range(plan.repeats) for arm in arms]
        if "f" in plan.figures and main_arm:
            # bare, potluck, bare, baseline, bare: each peer run sits between two bare loops
            pieces += [bare_loop, lambda: alone(main_arm), bare_loop, lambda: alone(arms[0]), bare_loop]
        outcomes = run_pieces(pieces, plan.concurrent, processes.close, plan.notes, log)
        probe_rounds = outcomes[0] if "b" in plan.figures else []
        if plan.concurrent:
            plan.notes.append("smoke: pieces ran concurrently, so the numbers only check the harness")
        if "b" in plan.figures:
            payload = formulas.payload_bytes(plan.probe_values, "none")
            results["b"] = figures.figure_b(probe_rounds or [], probe_peers, payload, rate_bps)
            results["b"]["potluck_config"] = probe_configs[1]
        if "potluck" in overhead and "baseline" in overhead:
            results["f"] = figures.figure_f(overhead["potluck"], overhead["baseline"], bare)

        for name, rs in runs.items():
            for r in rs:
                if r and r.skipped:
                    plan.notes.append(f"arm {r.arm.name} skipped: {r.skipped}")
        stats = {name: [figures.arm_stats(r, plan.target_loss) for r in rs if r and not r.skipped]
                 for name, rs in runs.items()}
        meta["arm_stats"] = {name: [asdict(s) for s in ss] for name, ss in stats.items()}
        if main_arm and stats.get(main_arm.name):
            main_run, main_stats = runs[main_arm.name][-1], pick(stats[main_arm.name])
            base_stats = pick(stats["baseline"]) if stats.get("baseline") else figures.empty_stats("baseline")
            needed = max([s.final_samples for ss in stats.values() for s in ss] + [1])
            log(f"reference: one process, {min(needed, plan.reference_cap):,} samples, real compute ...")
            reference = single_process_curve(workload.width, workload.seed, workload.micro_batch,
                                             min(needed, plan.reference_cap))
            meta["reference"] = {"samples": reference.samples, "loss": reference.loss,
                                 "step_seconds": reference.step_seconds}
            if needed > plan.reference_cap:
                plan.notes.append(f"the single-process reference stops at {plan.reference_cap:,} samples; "
                                  f"loss ratios past it are null")
            if "a" in plan.figures:
                results["a"] = figures.figure_a(main_run, main_stats, base_stats, parameters, rate_bps)
                results["a"]["arms"] = {n: [s.cu for s in ss] for n, ss in stats.items()}
            if "c" in plan.figures:
                results["c"] = figures.figure_c(main_run, main_stats, base_stats, reference, parameters)
                results["c"]["arms"] = {n: [s.bytes_per_sample for s in ss] for n, ss in stats.items()}
            if "d" in plan.figures:
                results["d"] = figures.figure_d(main_run, main_stats, base_stats, reference, plan.target_loss,
                                                workload.step_seconds)
            if "g" in plan.figures and workload.late_join_after:
                results["g"] = figures.figure_g(main_run, main_stats, base_stats, parameters, rate_bps)
        for letter in plan.figures:
            if letter not in results:
                results[letter] = figures.not_measured(letter)
    finally:
        processes.close()
        leftovers = lab.close()
        meta["leftover_namespaces"] = leftovers
        meta["wall_seconds"] = round(time.time() - started, 1)
        meta["load_average_end"] = os.getloadavg()[0]
        meta["notes"] = plan.notes
        results["meta"] = meta
    return results


def run_pieces(pieces: list, concurrent: bool, abort, notes: list[str], log) -> list:
    """Run the pieces one after another (benchmarks), or all at once in threads (the smoke check).
    A piece that fails is noted and yields None (its figure is then null), the others still run.
    On an interrupt, abort() kills what the workers started, so they end instead of being awaited."""

    def guarded(piece):
        try:
            return piece()
        except Exception as error:  # a failed arm is a result to report, not a reason to lose the others
            if isinstance(error, RuntimeError) and str(error) == "the benchmark is stopping":
                raise
            notes.append(f"a piece failed: {type(error).__name__}: {error}")
            log(f"failed: {error}")
            return None

    if not concurrent:
        return [guarded(piece) for piece in pieces]
    pool = ThreadPoolExecutor(max_workers=len(pieces) or 1)
    try:
        futures = [pool.submit(guarded, piece) for piece in pieces]
        return [future.result() for future in futures]
    except BaseException:
        abort()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def pick(stats: list):
    """The last repeat of an arm (the figures of earlier repeats stay in meta.arm_stats)."""
    return stats[-1]


def write_json(results: dict, path: Path) -> None:
    Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
