"""Arms: one configuration of a training swarm, run on the lab's hosts and recorded for figures.

An arm is either the ``baseline`` (plain hivemind.Optimizer with its defaults, see baseline_peer.py)
or a ``potluck`` arm: the real ``coordinator serve`` and ``peer join`` CLIs with a run.toml whose
[averaging] table comes from the arm (so sync, diloco, compression... are chosen by run.toml values
alone). An arm whose run.toml this checkout rejects is skipped, with the reason.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.counters import CounterSeries
from benchmarks.netns import Host
from benchmarks.procs import Processes

BIN = Path(sys.executable).parent
START_TIMEOUT = 120.0  # seconds for a swarm of processes to start on a loaded 2-core machine
SAMPLE_INTERVAL = 0.25


@dataclass
class Workload:
    """What every training arm of one benchmark run trains, and for how long."""

    peers: int = 4
    rate_mbit: float = 20.0
    step_seconds: float = 0.1  # simulated compute per micro-batch; 0 = real compute
    width: int = 1024
    micro_batch: int = 32
    target_batch: int = 512
    seconds: float = 40.0  # training time per arm, from the moment the swarm formed
    late_join_after: float = 15.0  # an extra peer joins this long after training started (g); 0: none
    late_grace: float = 30.0  # at most this long past `seconds` for the late peer's first contribution
    seed: int = 20261128
    matchmaking_time: float = 2.0
    averaging_timeout: float = 30.0

    @property
    def simulated(self) -> bool:
        return self.step_seconds > 0

    def env(self) -> dict:
        return {"POTLUCK_BENCH_WIDTH": str(self.width), "POTLUCK_BENCH_STEP_SECONDS": str(self.step_seconds),
                "OMP_NUM_THREADS": "1", "HIVEMIND_LOGLEVEL": "ERROR"}


@dataclass
class Arm:
    name: str
    kind: str  # "baseline" | "potluck"
    averaging: dict = field(default_factory=dict)  # the run.toml [averaging] table of a potluck arm


@dataclass
class PeerRecord:
    name: str
    host: Host
    launched_at: float
    late: bool
    events: list[dict]


@dataclass
class ArmRun:
    arm: Arm
    workload: Workload
    peers: list[PeerRecord]
    support: Host  # the coordinator's (or the baseline's bootstrap node's) host
    counters: CounterSeries
    train_start: float
    train_end: float
    skipped: str = ""

    def initial_peers(self) -> list[PeerRecord]:
        return [peer for peer in self.peers if not peer.late]


def run_toml(workload: Workload, arm: Arm, run_id: str, peers: int | None = None) -> str:
    """The run.toml of a potluck arm."""
    averaging = "".join(f"{key} = {json.dumps(value)}\n" for key, value in arm.averaging.items())
    return (
        f'[run]\nid = "{run_id}"\nseed = {workload.seed}\nepochs = 0\n\n'
        f'[task]\nname = "benchmarks.simtask"\nversion = "1"\n\n'
        f"[training]\ntarget_batch_size = {workload.target_batch}\nmicro_batch_size = {workload.micro_batch}\n"
        f"min_peers = {peers or workload.peers}\nmatchmaking_time = {workload.matchmaking_time}\n"
        f"averaging_timeout = {workload.averaging_timeout}\n"
        + (f"\n[averaging]\n{averaging}" if averaging else "")
    )


def check_run_toml(text: str) -> str:
    """'' when this checkout accepts the run.toml, else the reason it does not."""
    from peer.errors import UserError
    from peer.runconfig import parse_run_config

    try:
        parse_run_config(text, where="arm run.toml")
    except UserError as error:
        return str(error)
    return ""


def read_events(data_dir: Path) -> list[dict]:
    from peer.events import read_events as read

    return read(data_dir)


def attach_compute_seconds(events: list[dict], ledger_path: Path) -> None:
    """potluck's epoch events name their report; the ledger holds its compute seconds."""
    if not ledger_path.exists():
        return
    with sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True) as db:
        compute = dict(db.execute("SELECT report_id, compute_seconds FROM reports"))
    for event in events:
        if event["event"] == "epoch" and "compute_seconds" not in event:
            event["compute_seconds"] = compute.get(event.get("report_id"))


def transport_args(served: dict) -> list[str]:
    """How a peer pins the coordinator: its TLS fingerprint, --insecure for a plaintext one, nothing
    for a checkout that predates TLS (no such field in coordinator.json)."""
    if "tls_fingerprint" not in served:
        return []
    return ["--fingerprint", served["tls_fingerprint"]] if served["tls_fingerprint"] else ["--insecure"]


class ArmRunner:
    """Runs arms on the hosts it is given: hosts[0] supports (coordinator or bootstrap), hosts[1:] are
    peers (the one after the workload's peers is the late joiner when the workload has one)."""

    def __init__(self, lab, processes: Processes, workdir: Path):
        self.lab, self.processes, self.workdir = lab, processes, Path(workdir)

    # -- shared steps -------------------------------------------------------------------------
    def _start_sampler(self, folder: Path, max_seconds: float, hosts: list[Host]):
        ifaces = [host.hub_interface for host in hosts if host.hub_interface] or ["lo"]
        args = [sys.executable, "-m", "benchmarks.counters", str(folder / "counters.jsonl"),
                str(SAMPLE_INTERVAL), str(max_seconds), *ifaces]
        return self.processes.start(self.lab.counter_command() + args, f"{folder.name}-counters")

    def _wait(self, predicate, timeout: float, what: str, watch=()):
        return self.processes.wait_for(predicate, timeout, what, watch, interval=0.1)

    def run(self, arm: Arm, workload: Workload, hosts: list[Host]) -> ArmRun:
        folder = self.workdir / arm.name
        folder.mkdir(parents=True, exist_ok=True)
        if arm.kind == "potluck":
            text = run_toml(workload, arm, f"bench-{arm.name}")
            reason = check_run_toml(text)
            if reason:
                return ArmRun(arm, workload, [], hosts[0], CounterSeries([]), 0, 0, skipped=reason)
            (folder / "run.toml").write_text(text)
        sampler = self._start_sampler(folder, workload.seconds + workload.late_grace + 2 * START_TIMEOUT, hosts)
        started = []
        try:
            support, peer_hosts = hosts[0], hosts[1:1 + workload.peers]
            late_host = hosts[1 + workload.peers] if workload.late_join_after and len(hosts) > 1 + workload.peers else None
            launch = self._potluck(folder, support, started, workload) if arm.kind == "potluck" else \
                self._baseline(folder, support, started, workload)
            peers = [launch(host, f"peer{i}", late=False) for i, host in enumerate(peer_hosts)]
            watch = [popen for popen, _ in peers]

            def all_started():
                return all(any(e["event"] == "epoch" for e in read_events(d)) for _, d in peers)

            self._wait(all_started, START_TIMEOUT + workload.seconds, f"every peer of arm {arm.name} to finish an epoch", watch)
            train_start = min(e["time"] for _, d in peers for e in read_events(d) if e["event"] == "started")
            late = None
            if late_host is not None:
                self.processes.sleep(train_start + workload.late_join_after - time.time())
                late = launch(late_host, "late", late=True)
            self.processes.sleep(train_start + workload.seconds - time.time())
            if late is not None:
                def contributed():
                    return any(e["event"] == "epoch" and e["samples"] > 0 for e in read_events(late[1]))

                try:
                    self._wait(contributed, workload.late_grace, "the late peer's first contribution", [late[0]])
                except RuntimeError:
                    if self.processes.stopping.is_set():
                        raise
                    # otherwise figure (g) reports that it did not contribute in time
            train_end = time.time()
            self.processes.stop([popen for popen, _ in peers + ([late] if late else [])])
            self.processes.stop(started)
            records = []
            for (popen, data_dir), host in zip(peers + ([late] if late else []), peer_hosts + ([late_host] if late else [])):
                events = read_events(data_dir)
                attach_compute_seconds(events, folder / "coordinator" / "ledger.sqlite")
                records.append(PeerRecord(popen.name, host, popen.started_at, popen.name.endswith("late"), events))
        finally:
            self.processes.stop(started, grace=5)
            self.processes.stop([sampler], grace=1)
        return ArmRun(arm, workload, records, support, CounterSeries.load(folder / "counters.jsonl"), train_start, train_end)

    # -- the two kinds of arm --------------------------------------------------------------------
    def _potluck(self, folder: Path, support: Host, started: list, workload: Workload):
        coordinator_dir = folder / "coordinator"
        coordinator_dir.mkdir(parents=True, exist_ok=True)
        coordinator = self.processes.start(
            support.command([str(BIN / "coordinator"), "serve", "--run", str(folder / "run.toml"),
                             "--data-dir", str(coordinator_dir), "--host", support.address, "--port", "0"]),
            f"{folder.name}-coordinator", env=workload.env())
        started.append(coordinator)

        def info():
            try:
                return json.loads((coordinator_dir / "coordinator.json").read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                return None

        served = self._wait(info, START_TIMEOUT, "the coordinator to start", [coordinator])
        address = served["address"]
        token = (coordinator_dir / "default-org.token").read_text().strip()
        pin = transport_args(served)

        def launch(host: Host, name: str, late: bool):
            data_dir = folder / name
            data_dir.mkdir(parents=True, exist_ok=True)
            popen = self.processes.start(
                host.command([str(BIN / "peer"), "join", address, "--token", token, "--data-dir", str(data_dir),
                              "--host", host.address, "--threads", "1", "--progress", "plain", *pin]),
                f"{folder.name}-{name}", env=workload.env())
            return popen, data_dir

        return launch

    def _baseline(self, folder: Path, support: Host, started: list, workload: Workload):
        maddrs, barrier = folder / "maddrs.json", folder / "barrier"
        barrier.mkdir(parents=True, exist_ok=True)
        seconds = str(workload.seconds + 2 * START_TIMEOUT)
        bootstrap = self.processes.start(
            support.command([sys.executable, "-m", "benchmarks.baseline_peer", "bootstrap", "--host", support.address,
                             "--out", str(maddrs), "--seconds", seconds]),
            f"{folder.name}-bootstrap", env=workload.env())
        started.append(bootstrap)
        self._wait(maddrs.exists, START_TIMEOUT, "the baseline's bootstrap node", [bootstrap])

        def launch(host: Host, name: str, late: bool):
            data_dir = folder / name
            popen = self.processes.start(
                host.command([sys.executable, "-m", "benchmarks.baseline_peer", "train", "--host", host.address,
                              "--maddrs", str(maddrs), "--data-dir", str(data_dir), "--barrier", str(barrier),
                              "--index", name, "--peers", str(workload.peers), "--seed", str(workload.seed),
                              "--target-batch", str(workload.target_batch), "--micro-batch", str(workload.micro_batch),
                              "--seconds", seconds]),
                f"{folder.name}-{name}", env=workload.env())
            return popen, data_dir

        return launch
