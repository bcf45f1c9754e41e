"""The soak's faults as data: a list of ``{"at_s", "action", "target"}`` entries (as torchft's tests
give theirs), built from a seed or read from a JSON file, and checked before anything starts.

Why data: a failed soak is rerun with the very same faults (``--schedule F.json``), and a test can
give a short schedule without touching the harness. ``at_s`` counts from the moment the swarm has
formed (every initial peer finished an epoch). Targets name peers ``peer0``.. (the initial ones) and
their replacements ``peer0-r``..; ``coordinator`` is the coordinator.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# action -> what it does (the harness in benchmarks/soak.py carries each one out)
ACTIONS = {
    "kill_peer": "SIGKILL the peer's whole process group (a crashed machine)",
    "join_peer": "a new peer, with a new identity and data dir, joins on a new host",
    "kill_coordinator": "SIGKILL the coordinator's process group (serve, auditor, observer)",
    "restart_coordinator": "coordinator serve again, same data dir, address and ports",
    "throttle_start": "the peer's main process runs THROTTLE_FRACTION of each THROTTLE_PERIOD_S (SIGSTOP/SIGCONT)",
    "throttle_stop": "the peer runs at full speed again",
    "link_down": "the peer's link goes down (its veth in the hub), a partition",
    "link_up": "the peer's link comes back",
}
THROTTLE_FRACTION = 0.1  # a straggler computes at a tenth of its rate
THROTTLE_PERIOD_S = 1.0
KILL_FRACTION = 0.3


@dataclass(frozen=True)
class Fault:
    at_s: float
    action: str
    target: str


def kills_for(peers: int) -> int:
    """How many peers are SIGKILLed: at least 30% of them, and at least one."""
    return max(1, math.ceil(KILL_FRACTION * peers - 1e-9))


def default_schedule(peers: int, seconds: float, seed: int, partition_s: float = 60.0,
                     coordinator_down_s: float = 15.0, rejoin_after_s: float = 5.0) -> list[Fault]:
    """The issue's faults over a soak of ``seconds``: 30% of the peers killed at random (seeded) times,
    each replaced ``rejoin_after_s`` later; the coordinator killed once and restarted
    ``coordinator_down_s`` later; one straggler from 10% to 60% of the run; one partition of
    ``partition_s`` (at most a third of the run). Each fault hits a different peer where there are enough."""
    rng = random.Random(seed)
    names = [f"peer{i}" for i in range(peers)]
    order = rng.sample(names, len(names))
    kills = kills_for(peers)
    victims = order[:kills]
    spare = order[kills:] or order  # the straggler and the partitioned peer are not killed, if peers allow
    straggler = spare[0]
    partitioned = spare[1] if len(spare) > 1 else spare[0]
    faults = []
    for victim in victims:
        at = round(rng.uniform(0.1, 0.7) * seconds, 1)
        faults += [Fault(at, "kill_peer", victim), Fault(round(at + rejoin_after_s, 1), "join_peer", f"{victim}-r")]
    down = round(rng.uniform(0.3, 0.5) * seconds, 1)
    faults += [Fault(down, "kill_coordinator", "coordinator"),
               Fault(round(down + coordinator_down_s, 1), "restart_coordinator", "coordinator")]
    faults += [Fault(round(0.1 * seconds, 1), "throttle_start", straggler),
               Fault(round(0.6 * seconds, 1), "throttle_stop", straggler)]
    partition = min(partition_s, seconds / 3)
    cut = round(rng.uniform(0.15, 0.85 - partition / seconds) * seconds, 1) if seconds > 0 else 0.0
    faults += [Fault(cut, "link_down", partitioned), Fault(round(cut + partition, 1), "link_up", partitioned)]
    return sorted(faults, key=lambda f: (f.at_s, f.action))


def check_schedule(faults: list[Fault], peers: int, seconds: float) -> str:
    """'' when the schedule can run on ``peers`` initial peers for ``seconds``, else why not."""
    known = {f"peer{i}" for i in range(peers)}
    for fault in faults:
        if fault.action not in ACTIONS:
            return f"unknown action {fault.action!r} (known: {', '.join(ACTIONS)})"
        if not 0 <= fault.at_s <= seconds:
            return f"{fault.action} {fault.target} at {fault.at_s}s is outside the run (0..{seconds:g}s)"
        if fault.action == "join_peer":
            known.add(fault.target)
    for fault in faults:
        if fault.action.endswith("coordinator"):
            if fault.target != "coordinator":
                return f"{fault.action} targets {fault.target!r}, not 'coordinator'"
        elif fault.target not in known:
            return f"{fault.action} targets {fault.target!r}, which is no peer of this run"
    joins = [f.target for f in faults if f.action == "join_peer"]
    if len(joins) != len(set(joins)) or set(joins) & {f"peer{i}" for i in range(peers)}:
        return "each join_peer needs a new name (not an initial peer's, not used twice)"
    return ""


def load_schedule(path: Path) -> list[Fault]:
    """Read a schedule file (a JSON list of {at_s, action, target}); a clear error otherwise."""
    try:
        entries = json.loads(Path(path).read_text())
        faults = [Fault(float(e["at_s"]), str(e["action"]), str(e["target"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a schedule (a JSON list of {{at_s, action, target}}): {error}") from None
    return sorted(faults, key=lambda f: (f.at_s, f.action))


def as_data(faults: list[Fault]) -> list[dict]:
    return [asdict(fault) for fault in faults]


def running_now(seconds_since_start: float, fraction: float = THROTTLE_FRACTION,
                period: float = THROTTLE_PERIOD_S) -> bool:
    """Whether a throttled process runs at this moment of its duty cycle."""
    return (seconds_since_start % period) < fraction * period


def capacity(faults: list[Fault], peers: int, seconds: float, step: float = 0.1) -> float:
    """The share of the fault-free run's peer-time that the schedule leaves: killed peers count until
    killed, replacements from their join (start-up taken as instant), a straggler at THROTTLE_FRACTION,
    a partitioned peer not at all. An optimistic ceiling of ``goodput_ratio``: what the faults alone
    take away, before any cost of recovering from them."""
    if seconds <= 0 or peers <= 0:
        return 1.0
    life = {f"peer{i}": [0.0, seconds] for i in range(peers)}
    throttled, cut = {}, {}
    for fault in sorted(faults, key=lambda f: f.at_s):
        if fault.action == "join_peer":
            life[fault.target] = [fault.at_s, seconds]
        elif fault.action == "kill_peer" and fault.target in life:
            life[fault.target][1] = min(life[fault.target][1], fault.at_s)
        elif fault.action in ("throttle_start", "link_down"):
            (throttled if fault.action == "throttle_start" else cut).setdefault(fault.target, []).append([fault.at_s, seconds])
        elif fault.action in ("throttle_stop", "link_up"):
            spans = (throttled if fault.action == "throttle_stop" else cut).get(fault.target, [])
            if spans:
                spans[-1][1] = fault.at_s

    def within(spans, t):
        return any(a <= t < b for a, b in spans)

    total, steps = 0.0, int(seconds / step)
    for name, (born, dies) in life.items():
        for k in range(steps):
            t = (k + 0.5) * step
            if born <= t < dies and not within(cut.get(name, []), t):
                total += THROTTLE_FRACTION if within(throttled.get(name, []), t) else 1.0
    return round(total / (peers * steps), 3)
