"""Figures (a), (b), (c), (d), (f), (g) of BENCHMARKS.md, computed from what the arms recorded.

Windows: a peer's steady state runs from its first completed epoch (or DiLoCo outer round) to its
last, so start-up and the join gate are not counted. Wire bytes are each host's upload (one count
per byte on the wire), read from the hub ends of the veths; what the late joiner sends and receives
is left out of (c), so the state download of (g) does not inflate the swarm's bytes per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks import formulas
from benchmarks.arms import ArmRun, PeerRecord
from benchmarks.reference import Curve

TX, RX = 0, 1


def epochs(peer: PeerRecord) -> list[dict]:
    return [e for e in peer.events if e["event"] == "epoch"]


@dataclass
class ArmStats:
    name: str
    cu: float | None
    compute_per_round: float | None  # seconds of compute per peer between two averaging rounds
    bytes_per_sample: float | None
    window_samples: int
    window_bytes: float | None
    final_loss: float | None
    final_samples: int
    seconds_to_target: float | None
    samples_to_target: int | None
    join_seconds: float | None
    join_parts: dict
    rounds: int
    curve: list = None  # (seconds since start, swarm samples, held-out loss) after each round, as peer 0 saw it


def empty_stats(name: str) -> ArmStats:
    """The stats of an arm that did not run (its figures are null)."""
    return ArmStats(name, None, None, None, 0, None, None, 0, None, None, None, {}, 0, [])


UNITS = {"a": "fraction of peer-time computing", "b": "T_bound / T_round (group formation included)",
         "c": "wire bytes per trained sample", "d": "x speed-up to the target loss vs one process",
         "f": "peer samples/s / bare torch loop samples/s", "g": "s from launch until the new peer's first contribution"}


def not_measured(letter: str) -> dict:
    figure = {"value": None, "unit": UNITS[letter], "bound": None, "baseline": None,
              "note": "not measured in this run (see meta.notes)"}
    if letter == "c":
        figure["loss_ratio"] = None
    return figure


def steady_epochs(peer: PeerRecord) -> list[dict]:
    """The epochs after the first: each was computed entirely in steady state."""
    return epochs(peer)[1:]


def wire_bytes(run: ArmRun, start: float, end: float) -> float | None:
    if not run.counters.samples:
        return None
    hosts = [run.support] + [peer.host for peer in run.peers]
    if all(host.hub_interface is None for host in hosts):  # loopback: one shared counter
        return run.counters.bytes_between(start, end, "lo", TX)
    late = [peer.host for peer in run.peers if peer.late]
    uploads = sum(run.counters.bytes_between(start, end, h.hub_interface, RX) for h in hosts if h not in late)
    to_late = sum(run.counters.bytes_between(start, end, h.hub_interface, TX) for h in late)
    return uploads - to_late


def arm_stats(run: ArmRun, target_loss: float) -> ArmStats:
    initial = [peer for peer in run.initial_peers() if len(epochs(peer)) >= 2]
    compute = [sum(e.get("compute_seconds") or 0.0 for e in steady_epochs(p)) for p in initial]
    walls = [epochs(p)[-1]["time"] - epochs(p)[0]["time"] for p in initial]
    steady = [e for p in initial for e in steady_epochs(p)]
    cu = sum(compute) / sum(walls) if initial and sum(walls) > 0 else None
    compute_per_round = (sum(e.get("compute_seconds") or 0.0 for e in steady) / len(steady)) if steady else None
    window_samples = sum(e["samples"] for e in steady)
    window_bytes = None
    if initial:
        start = sum(epochs(p)[0]["time"] for p in initial) / len(initial)
        end = sum(epochs(p)[-1]["time"] for p in initial) / len(initial)
        window_bytes = wire_bytes(run, start, end)
    bytes_per_sample = window_bytes / window_samples if window_bytes is not None and window_samples else None

    # the loss curve, as peer 0 sees it after each averaging round, against the swarm's samples so far
    all_epochs = [e for p in run.peers for e in epochs(p)]
    curve = []
    if run.peers and epochs(run.peers[0]):
        for event in epochs(run.peers[0]):
            samples = sum(e["samples"] for e in all_epochs if e["epoch"] <= event["epoch"])
            curve.append((event["time"] - run.train_start, samples, event.get("metrics", {}).get("loss")))
    reached = next(((t, s) for t, s, loss in curve if loss is not None and loss <= target_loss), (None, None))
    final_loss, final_samples = (curve[-1][2], curve[-1][1]) if curve else (None, 0)

    join_seconds, parts = None, {}
    for peer in run.peers:
        if peer.late:
            times = {e["event"]: e["time"] for e in reversed(peer.events)}
            contributed = next((e["time"] for e in epochs(peer) if e["samples"] > 0), None)
            join_seconds = contributed - peer.launched_at if contributed else None
            parts = {name: round(times[name] - peer.launched_at, 2) for name in ("joined", "started", "state_loaded")
                     if name in times}
            if contributed is None:
                parts["contributed"] = "not within the arm"
    rounds = min((len(epochs(p)) for p in run.initial_peers()), default=0)
    return ArmStats(run.arm.name, cu, compute_per_round, bytes_per_sample, window_samples, window_bytes, final_loss,
                    final_samples, reached[0], reached[1], join_seconds, parts, rounds, curve)


def strategy_payload(run: ArmRun, parameters: int) -> tuple[float, float, bool]:
    """(bytes averaged per round, samples per round, overlapped) of an arm's strategy, from its config."""
    averaging, workload = run.arm.averaging, run.workload
    if averaging.get("strategy") == "diloco":
        size = formulas.payload_bytes(parameters, averaging.get("compression", "none"))
        samples = workload.peers * averaging.get("inner_steps", 1) * workload.micro_batch
        return size, samples, bool(averaging.get("overlap", False))
    # sync (potluck today, and hivemind's defaults): gradients, then parameters, each epoch
    size = formulas.payload_bytes(parameters, averaging.get("compression", "none"))
    return 2 * size, workload.target_batch, False


def figure_a(main: ArmRun, main_stats: ArmStats, base_stats: ArmStats, parameters: int, rate_bps: float) -> dict:
    size, _, overlapped = strategy_payload(main, parameters)
    bound = 1.0 if overlapped else (
        formulas.blocking_cu_bound(main_stats.compute_per_round, main.workload.peers, size, rate_bps)
        if main_stats.compute_per_round else None)
    return {"value": main_stats.cu, "unit": "fraction of peer-time computing", "bound": bound,
            "of_bound": ratio(main_stats.cu, bound), "baseline": base_stats.cu, "arm": main.arm.name,
            "peers": main.workload.peers, "compute_per_round_s": main_stats.compute_per_round,
            "rounds": main_stats.rounds, "goal": ">= 0.90 at N=4, 20 Mbit/s, and >= 0.98 of bound"}


def figure_b(rounds: list[dict], peers: int, payload: int, rate_bps: float) -> dict:
    bound = formulas.allreduce_bound_seconds(peers, payload, rate_bps)

    def summary(config: str) -> dict:
        by_round: dict[int, list[dict]] = {}
        for row in rounds:
            if row["config"] == config:
                by_round.setdefault(row["round"], []).append(row)
        ok = [rows for rows in by_round.values() if not any(r["error"] for r in rows)]
        total = formulas.median([max(r["total"] for r in rows) for rows in ok])
        data = formulas.median([max(r["data"] for r in rows) for rows in ok])
        correct = all(r["max_error"] < 1e-2 * max(peers, 1) for rows in ok for r in rows)
        return {"round_s": total, "data_s": data, "efficiency": ratio(bound, total),
                "data_efficiency": ratio(bound, data), "rounds_ok": len(ok), "rounds": len(by_round),
                "values_correct": correct}

    potluck, baseline = summary("potluck"), summary("baseline")
    return {"value": potluck["efficiency"], "unit": "T_bound / T_round (group formation included)", "bound": 1.0,
            "bound_s": bound, "baseline": baseline["efficiency"], "data_phase": potluck["data_efficiency"],
            "baseline_data_phase": baseline["data_efficiency"], "potluck": potluck, "baseline_detail": baseline,
            "peers": peers, "payload_bytes": payload, "goal": ">= 0.8 of bound for >= 4 MB, formation included"}


def figure_c(main: ArmRun, main_stats: ArmStats, base_stats: ArmStats, reference: Curve, parameters: int) -> dict:
    size, samples_per_round, _ = strategy_payload(main, parameters)
    peers = main.workload.peers
    bound = peers * formulas.allreduce_bytes(peers, size) / samples_per_round
    data_parallel = formulas.data_parallel_bytes_per_sample(peers, parameters, main.workload.micro_batch)
    loss_ratio = loss_ratio_of(main_stats, reference)
    return {"value": main_stats.bytes_per_sample, "unit": "wire bytes per trained sample", "bound": bound,
            "baseline": base_stats.bytes_per_sample, "reduction_vs_baseline": ratio(base_stats.bytes_per_sample,
                                                                                      main_stats.bytes_per_sample),
            "data_parallel": data_parallel, "reduction_vs_data_parallel": ratio(data_parallel, main_stats.bytes_per_sample),
            "loss_ratio": loss_ratio, "loss_ratio_at_samples": loss_ratio_point(main_stats, reference)[1],
            "baseline_loss_ratio": loss_ratio_of(base_stats, reference),
            "final_loss": main_stats.final_loss, "final_samples": main_stats.final_samples,
            "reference_loss": reference.loss_at(main_stats.final_samples), "arm": main.arm.name,
            "goal": ">= 400x fewer bytes/sample than hivemind defaults, loss within 2% of one process"}


def loss_ratio_point(stats: ArmStats, reference: Curve) -> tuple[float | None, int | None]:
    """(arm loss / single-process loss, samples) at the arm's last round the reference reaches."""
    points = [(samples, loss) for _, samples, loss in (stats.curve or [])
              if loss is not None and reference.loss_at(samples) is not None]
    if not points:
        return None, None
    samples, loss = points[-1]
    return ratio(loss, reference.loss_at(samples)), samples


def loss_ratio_of(stats: ArmStats, reference: Curve) -> float | None:
    return loss_ratio_point(stats, reference)[0]


def figure_d(main: ArmRun, main_stats: ArmStats, base_stats: ArmStats, reference: Curve, target: float,
             step_seconds: float) -> dict:
    """The single process's time = its steps to the target x (simulated sleep + its real time per step)."""
    single_samples = reference.samples_to(target)
    per_step = step_seconds + reference.step_seconds
    single_seconds = single_samples / main.workload.micro_batch * per_step if single_samples is not None else None

    def s(stats: ArmStats):
        return ratio(single_seconds, stats.seconds_to_target)

    peers = main.workload.peers
    value = s(main_stats)
    return {"value": value, "unit": "x speed-up to the target loss vs one process", "bound": float(peers),
            "efficiency": ratio(value, peers), "baseline": s(base_stats), "target_loss": target,
            "swarm_seconds": main_stats.seconds_to_target, "swarm_samples": main_stats.samples_to_target,
            "single_seconds": single_seconds, "single_samples": single_samples,
            "baseline_seconds": base_stats.seconds_to_target, "loss_ratio": loss_ratio_of(main_stats, reference),
            "arm": main.arm.name}


def samples_per_second(run: ArmRun) -> float | None:
    """Wall-clock samples/s per peer over the steady state (mean over the peers)."""
    rates = []
    for peer in run.peers:
        steady = steady_epochs(peer)
        if steady:
            rates.append(sum(e["samples"] for e in steady) / (steady[-1]["time"] - epochs(peer)[0]["time"]))
    return sum(rates) / len(rates) if rates else None


def figure_f(potluck: ArmRun, baseline: ArmRun, bare: list[float]) -> dict:
    bare_rate = formulas.median(bare)  # the machine is shared: the median of the bare runs around the arms
    mine, theirs = samples_per_second(potluck), samples_per_second(baseline)
    return {"value": ratio(mine, bare_rate), "unit": "peer samples/s / bare torch loop samples/s", "bound": 1.0,
            "baseline": ratio(theirs, bare_rate), "peer_samples_per_s": mine, "baseline_samples_per_s": theirs,
            "bare_samples_per_s": bare, "arm": potluck.arm.name, "peers": potluck.workload.peers,
            "goal": ">= 0.95"}


def figure_g(main: ArmRun, main_stats: ArmStats, base_stats: ArmStats, parameters: int, rate_bps: float) -> dict:
    model_bytes = parameters * 4
    return {"value": main_stats.join_seconds, "unit": "s from launch until the new peer's first contribution",
            "bound": formulas.transfer_bound_seconds(model_bytes, rate_bps), "baseline": base_stats.join_seconds,
            "parts_s": main_stats.join_parts, "baseline_parts_s": base_stats.join_parts, "model_bytes": model_bytes,
            "arm": main.arm.name}


def ratio(a, b):
    return a / b if a is not None and b else None
