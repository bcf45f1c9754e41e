"""Runs the figure (b) micro-benchmark (averaging_probe.py) on the lab's hosts and collects its rounds."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from benchmarks.netns import Host
from benchmarks.procs import Processes

START_TIMEOUT = 120.0


def averager_configs(matchmaking_time: float, compression: str, peers: int) -> list[dict]:
    """baseline: DecentralizedAverager's defaults (5 s matchmaking window). potluck: what a DiLoCo
    round uses (peer/diloco.py): the run's matchmaking_time as the window, a request timeout below it,
    and target_group_size = the live peers the coordinator counts, so the round starts as soon as
    they have all joined instead of waiting out the window."""
    from peer.swarm import REQUEST_TIMEOUT

    return [
        {"name": "baseline"},
        {"name": "potluck", "min_matchmaking_time": matchmaking_time,
         "request_timeout": min(REQUEST_TIMEOUT, matchmaking_time / 2), "target_group_size": peers,
         "compression": compression},
    ]


def run_probe(hosts: list[Host], processes: Processes, folder: Path, *, values: int, rounds: int,
              configs: list[dict], env: dict) -> list[dict]:
    """hosts[0] runs the bootstrap DHT node, hosts[1:] one probe process each."""
    support, hosts = hosts[0], hosts[1:]
    folder.mkdir(parents=True, exist_ok=True)
    maddrs, barrier, seconds = folder / "maddrs.json", folder / "barrier", 60 * rounds * len(configs) + START_TIMEOUT
    barrier.mkdir(exist_ok=True)
    bootstrap = processes.start(
        support.command([sys.executable, "-m", "benchmarks.baseline_peer", "bootstrap", "--host", support.address,
                         "--out", str(maddrs), "--seconds", str(seconds)]), "probe-bootstrap", env=env)
    started = [bootstrap]
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not maddrs.exists():
            if time.monotonic() > deadline or bootstrap.poll() is not None:
                raise RuntimeError("the probe's bootstrap DHT node did not start")
            processes.sleep(0.1)
        for index, host in enumerate(hosts):
            started.append(processes.start(
                host.command([sys.executable, "-m", "benchmarks.averaging_probe", "--host", host.address,
                              "--maddrs", str(maddrs), "--index", str(index), "--peers", str(len(hosts)),
                              "--values", str(values), "--rounds", str(rounds), "--configs", json.dumps(configs),
                              "--barrier", str(barrier), "--out", str(folder / "rounds.jsonl"),
                              "--seconds", str(seconds)]), f"probe-{index}", env=env))
        deadline = time.monotonic() + seconds
        while any(popen.poll() is None for popen in started[1:]) and time.monotonic() < deadline:
            processes.sleep(0.2)
    finally:
        processes.stop(started, grace=2)
    path = folder / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
