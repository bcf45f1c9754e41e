"""``python -m benchmarks soak [--minutes 10] [--peers 8] [--strategy sync|diloco|both] --out F.json``:
how much training survives churn, outages, a straggler and a partition.

For each strategy two swarms run side by side in the lab (network namespaces with tbf-shaped links,
benchmarks/netns.py; loopback where namespaces are unavailable, said in the JSON): a fault-free one
and one that gets the faults of a schedule given as data (benchmarks/fault_schedule.py; ``--schedule``
replays a file). Both are the real ``coordinator serve`` and ``peer join`` CLIs with the same
run.toml and seed, measured over the same window, so the ratios compare like with like on a loaded
machine. Figures per strategy (benchmarks/soak_metrics.py): ``goodput_ratio``, ``loss_ratio``,
``longest_wait_s``, ``acknowledged_reports_lost``, ``ledger_verify`` and ``leftovers``.

Cleanup as in benchmarks/runner.py: try/finally plus signal handlers, every process group started is
killed by PID and every namespace deleted; then /proc is searched for anything left (``leftovers``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks import fault_schedule as fs
from benchmarks import soak_metrics as sm
from benchmarks.arms import Arm, Workload, check_run_toml, run_toml, transport_args
from benchmarks.netns import Host, LoopbackLab, NetnsLab, existing_namespaces, namespaces_available
from benchmarks.procs import Processes
from benchmarks.runner import git_commit, raise_on_signal

BIN = Path(sys.executable).parent
START_TIMEOUT = 180.0  # for a swarm of processes to form on a loaded 2-core machine
TICK = 0.05  # the fault loop's resolution (the straggler's duty cycle is 1 s)
END_GRACE = 12.0  # at the end, a peer has this long to leave after SIGINT before it is killed
RELAUNCH_AFTER_S = 5.0  # a peer whose join failed runs `peer join` again this long after it exited
GOALS = {"goodput_ratio": 0.85, "loss_ratio": 1.1, "wait_factor": 3.0}


@dataclass
class SoakConfig:
    peers: int = 8
    seconds: float = 600.0  # the measured window, from the moment the swarm formed
    seed: int = 20261206
    rate_mbit: float = 20.0
    step_seconds: float = 0.1  # simulated compute per micro-batch (as benchmarks run does)
    width: int = 256
    target_batch: int = 512
    inner_steps: int = 50
    matchmaking_time: float = 2.0
    averaging_timeout: float = 30.0
    partition_s: float = 60.0
    coordinator_down_s: float = 15.0
    rejoin_after_s: float = 5.0
    schedule: list | None = None  # faults; None: fault_schedule.default_schedule

    def workload(self) -> Workload:
        return Workload(peers=self.peers, rate_mbit=self.rate_mbit, step_seconds=self.step_seconds, width=self.width,
                        target_batch=self.target_batch, seconds=self.seconds, late_join_after=0, seed=self.seed,
                        matchmaking_time=self.matchmaking_time, averaging_timeout=self.averaging_timeout)

    def arm(self, strategy: str) -> Arm:
        if strategy == "sync":
            return Arm("sync", "potluck", {"strategy": "sync"})
        return Arm("diloco", "potluck", {"strategy": "diloco", "inner_steps": self.inner_steps, "compression": "uint8",
                                         "outer_lr": 0.7, "outer_momentum": 0.9, "overlap": True})

    def faults(self) -> list[fs.Fault]:
        if self.schedule is not None:
            return self.schedule
        return fs.default_schedule(self.peers, self.seconds, self.seed, self.partition_s, self.coordinator_down_s,
                                   self.rejoin_after_s)


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class PeerProc:
    name: str
    host: Host
    data_dir: Path
    popen: subprocess.Popen
    ended_at: float | None = None
    killed: bool = False
    throttled_since: float | None = None
    stopped: bool = False  # SIGSTOPped right now (straggler duty cycle)
    relaunches: int = 0
    exited_at: float | None = None  # when the harness saw it exit on its own
    relaunch: bool = False


@dataclass
class Swarm:
    """One coordinator and its peers; each fault of the schedule is one method."""

    name: str
    lab: object
    processes: Processes
    folder: Path
    config: SoakConfig
    arm: Arm
    faults: list = field(default_factory=list)

    def __post_init__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self.support = self.lab.add_host(None)
        namespaced = self.support.namespace is not None
        self.port = 7000 if namespaced else free_port(self.support.address)
        self.dht_port = 7001 if namespaced else free_port(self.support.address)
        self.cdir = self.folder / "coordinator"
        self.cdir.mkdir(exist_ok=True)
        (self.folder / "run.toml").write_text(run_toml(self.config.workload(), self.arm, f"soak-{self.name}"))
        self.coordinator = None
        self.coordinator_starts = 0
        self.served = None
        self.peers: dict[str, PeerProc] = {}
        self.done: list[dict] = []  # faults carried out, with when
        self.observed: list[dict] = []  # what followed them (relaunches, the coordinator serving again)
        self.restarted_at: float | None = None
        self.pending = sorted(self.faults, key=lambda f: f.at_s)
        self.t0 = None
        self.links_down: set[str] = set()

    # -- processes -----------------------------------------------------------------------------
    def start_coordinator(self) -> None:
        restarts = self.coordinator_starts
        self.coordinator_starts += 1
        self.coordinator = self.processes.start(
            self.support.command([str(BIN / "coordinator"), "serve", "--run", str(self.folder / "run.toml"),
                                  "--data-dir", str(self.cdir), "--host", self.support.address,
                                  "--port", str(self.port), "--dht-port", str(self.dht_port), "--no-dashboard"]),
            f"{self.name}-coordinator{'-' + str(restarts) if restarts else ''}", env=self.config.workload().env())

    def coordinator_ready(self) -> dict | None:
        try:
            info = json.loads((self.cdir / "coordinator.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if self.coordinator.poll() is not None:
            raise RuntimeError(f"{self.name}: the coordinator exited with {self.coordinator.returncode}")
        return info if info.get("pid") == self.coordinator.pid else None

    def join(self, name: str) -> PeerProc:
        host = self.lab.add_host(self.config.rate_mbit)
        data_dir = self.folder / name
        data_dir.mkdir(parents=True, exist_ok=True)
        return self._launch(name, host, data_dir)

    def _launch(self, name: str, host: Host, data_dir: Path) -> PeerProc:
        # --progress json: the event lines go to the log too (and plain lines crash on an epoch that
        # reports no chain, peer/progress.py:79, a product bug this harness reports rather than trips on)
        token = (self.cdir / "default-org.token").read_text().strip()
        popen = self.processes.start(
            host.command([str(BIN / "peer"), "join", self.served["address"], "--token", token, "--data-dir",
                          str(data_dir), "--host", host.address, "--threads", "1", "--progress", "json",
                          *transport_args(self.served)]),
            f"{self.name}-{name}", env=self.config.workload().env())
        peer = self.peers[name] = PeerProc(name, host, data_dir, popen)
        return peer

    def formed(self) -> bool:
        for peer in self.peers.values():
            if peer.popen.poll() is not None:
                raise RuntimeError(f"{self.name}: {peer.name} exited with {peer.popen.returncode} before the swarm formed")
            if not any(e["event"] == "epoch" for e in sm_events(peer.data_dir)):
                return False
        return True

    # -- faults ----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Carry out the faults that are due, and the straggler's duty cycle."""
        while self.pending and self.t0 is not None and now >= self.t0 + self.pending[0].at_s:
            fault = self.pending.pop(0)
            result = getattr(self, fault.action)(fault.target, now)
            self.done.append({**asdict(fault), "done_at_s": round(time.time() - self.t0, 2), "result": result})
        if self.restarted_at is not None and self._serving():
            self.observed.append({"at_s": round(now - self.t0, 2), "what": "coordinator serving again",
                                  "after_s": round(now - self.restarted_at, 2)})
            self.restarted_at = None
        for peer in list(self.peers.values()):
            if peer.exited_at is None and not peer.killed and peer.popen.poll() is not None:
                peer.exited_at = now
                # a volunteer whose `peer join` failed before it joined (the coordinator was down) runs it again
                peer.relaunch = self.t0 is not None and peer.popen.returncode != 0 and not self._joined(peer)
            if peer.relaunch and now - peer.exited_at >= RELAUNCH_AFTER_S:
                self._relaunch(peer, now)
            if peer.throttled_since is not None and not peer.killed:
                run = fs.running_now(now - peer.throttled_since)
                if run == peer.stopped:
                    self._signal(peer.popen.pid, signal.SIGCONT if run else signal.SIGSTOP)
                    peer.stopped = not run

    def _serving(self) -> bool:
        try:
            return self.coordinator_ready() is not None
        except RuntimeError:  # it exited: said by its exit code in the results
            return False

    def _joined(self, peer: PeerProc) -> bool:
        return any(e["event"] == "joined" for e in sm_events(peer.data_dir))

    def _relaunch(self, peer: PeerProc, now: float) -> None:
        self.observed.append({"at_s": round(now - self.t0, 2), "what": f"{peer.name} relaunched: `peer join` "
                              f"exited {peer.popen.returncode} before it joined (a volunteer runs it again)"})
        host, data_dir, relaunches = peer.host, peer.data_dir, peer.relaunches + 1
        self.peers[peer.name] = self._launch(peer.name, host, data_dir)
        self.peers[peer.name].relaunches = relaunches

    @staticmethod
    def _signal(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def kill_peer(self, target: str, now: float) -> str:
        peer = self.peers[target]
        self.processes.signal_group(peer.popen, signal.SIGKILL)
        peer.ended_at, peer.killed, peer.throttled_since = now, True, None
        return "killed"

    def join_peer(self, target: str, now: float) -> str:
        self.join(target)
        return f"joined on {self.peers[target].host.name}"

    def kill_coordinator(self, target: str, now: float) -> str:
        self.processes.signal_group(self.coordinator, signal.SIGKILL)
        self.coordinator.wait(timeout=10)
        return "killed"

    def restart_coordinator(self, target: str, now: float) -> str:
        if self.coordinator.poll() is None:
            return "still running: not restarted"
        self.start_coordinator()
        self.restarted_at = now
        return "restarted"

    def throttle_start(self, target: str, now: float) -> str:
        self.peers[target].throttled_since = now
        return f"runs {fs.THROTTLE_FRACTION:.0%} of each {fs.THROTTLE_PERIOD_S:g} s"

    def throttle_stop(self, target: str, now: float) -> str:
        peer = self.peers[target]
        peer.throttled_since = None
        if peer.stopped:
            self._signal(peer.popen.pid, signal.SIGCONT)
            peer.stopped = False
        return "full speed"

    def link_down(self, target: str, now: float) -> str:
        return self._set_link(target, up=False)

    def link_up(self, target: str, now: float) -> str:
        return self._set_link(target, up=True)

    def _set_link(self, target: str, up: bool) -> str:
        """The peer's link on the hub up or down; on loopback its whole process group is frozen instead."""
        peer = self.peers[target]
        (self.links_down.discard if up else self.links_down.add)(target)
        state = "up" if up else "down"
        if peer.host.namespace:
            subprocess.run(["ip", "-n", self.lab.hub, "link", "set", peer.host.hub_interface, state], check=True,
                           capture_output=True, timeout=20)
            return f"{peer.host.hub_interface} {state}"
        self.processes.signal_group(peer.popen, signal.SIGCONT if up else signal.SIGSTOP)
        return "loopback: process group continued" if up else "loopback: whole process group SIGSTOPped instead"

    # -- the end -----------------------------------------------------------------------------------
    def release(self) -> None:
        """Undo what would keep a peer from leaving cleanly: a stopped straggler, a link still down."""
        for peer in self.peers.values():
            if peer.throttled_since is not None and not peer.killed:
                self.throttle_stop(peer.name, time.time())
        for target in list(self.links_down):
            self.link_up(target, time.time())

    def live_peers(self) -> list[PeerProc]:
        return [p for p in self.peers.values() if not p.killed]


def stop_swarms(swarms: list[Swarm], processes: Processes, grace: float) -> None:
    """Every peer leaves at once (SIGINT, SIGKILL after grace); the coordinators take in their last
    reports, then stop."""
    ended = time.time()
    for swarm in swarms:
        for peer in swarm.live_peers():
            peer.ended_at = ended
    processes.stop([p.popen for swarm in swarms for p in swarm.live_peers()], grace=grace)
    processes.stop([swarm.coordinator for swarm in swarms if swarm.coordinator is not None], grace=grace)


def measure(swarm: Swarm, start: float, end: float) -> dict:
    """The figures of one swarm over the window [start, end]."""
    ledger = swarm.cdir / "ledger.sqlite"
    compute = sm.compute_by_report(ledger)
    logs = []
    for peer in swarm.peers.values():
        events = sm_events(peer.data_dir)
        for event in events:
            if event["event"] == "epoch":
                event["compute_seconds"] = compute.get(event.get("report_id"))
        logs.append(sm.PeerLog(peer.name, events, peer.ended_at, peer.killed))
    acked = set().union(*[sm.acknowledged_ids(p.data_dir) for p in swarm.peers.values()])
    in_ledger = sm.ledger_report_ids(ledger)
    verified = subprocess.run([str(BIN / "coordinator"), "ledger", "verify", "--data-dir", str(swarm.cdir)],
                              capture_output=True, text=True, timeout=120)
    exits = {p.name: "killed" if p.killed else p.popen.poll() for p in swarm.peers.values()}
    return {
        "goodput_samples_per_s": round(sm.goodput(logs, start, end), 2),
        "samples": sm.window_samples(logs, start, end),
        "solo_samples": sm.window_samples(logs, start, end, solo=True),
        "final_loss": sm.final_loss(logs),
        "longest_wait": sm.longest_wait(logs, start),
        "acknowledged_reports": len(acked),
        "acknowledged_reports_lost": len(acked - in_ledger),
        "lost_report_ids": sorted(acked - in_ledger)[:20],
        "reports_in_ledger": len(in_ledger),
        "outboxes": {p.name: sm.outbox_counts(p.data_dir) for p in swarm.peers.values()},
        "ledger_verify": {"ok": verified.returncode == 0,
                          "output": (verified.stdout + verified.stderr).strip()[-2000:]},
        "peer_exits": exits,
        "epochs": {p.name: sum(1 for e in log.events if e["event"] == "epoch") for p, log in
                   zip(swarm.peers.values(), logs)},
        "faults_done": swarm.done,
        "observed": swarm.observed,
        "faults_not_done": fs.as_data(swarm.pending),
    }


def sm_events(data_dir: Path) -> list[dict]:
    from peer.events import read_events

    try:
        return read_events(data_dir)
    except json.JSONDecodeError:  # a line cut by SIGKILL: read what is whole
        path = Path(data_dir) / "events.jsonl"
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
        return events


# -- leftovers ----------------------------------------------------------------------------------------
def ancestors() -> set[int]:
    """This process and its parents (a shell or `timeout` whose command line names the workdir is not ours)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def processes_left(groups: set[int], marker: str) -> list[dict]:
    """Live processes (zombies aside) in a process group we started, or whose command line names our workdir."""
    found, mine = [], ancestors()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            state, pgid = fields[0], int(fields[2])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if state == "Z":
            continue
        if pgid in groups or marker in cmdline:
            found.append({"pid": int(entry.name), "cmd": cmdline[:200]})
    return found


def leftovers(processes: Processes, groups: set[int], marker: str, prefix: str, grace: float = 10.0) -> dict:
    deadline = time.monotonic() + grace
    while True:  # a killed group's children may take a moment to go
        left = processes_left(groups, marker)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return {"processes": left, "namespaces": existing_namespaces(prefix) if prefix else []}


# -- the run ------------------------------------------------------------------------------------------
def drive(swarms: list[Swarm], config: SoakConfig, processes: Processes, log) -> tuple[float, float]:
    """Start the swarms, wait until all formed, run the schedule for config.seconds; returns the window."""
    for swarm in swarms:
        swarm.start_coordinator()
    deadline = time.monotonic() + START_TIMEOUT
    for swarm in swarms:
        while not (served := swarm.coordinator_ready()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{swarm.name}: the coordinator did not start within {START_TIMEOUT:.0f}s")
            processes.sleep(0.2)
        swarm.served = served
        for i in range(config.peers):
            swarm.join(f"peer{i}")
    while not all(swarm.formed() for swarm in swarms):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the swarms did not form within {START_TIMEOUT:.0f}s")
        processes.sleep(0.5)
    start = time.time()
    log(f"swarms formed; measuring {config.seconds:.0f}s")
    for swarm in swarms:
        swarm.t0 = start
    end = start + config.seconds
    reported = 0
    while time.time() < end:
        now = time.time()
        for swarm in swarms:
            before = len(swarm.done)
            swarm.tick(now)
            for done in swarm.done[before:]:
                log(f"{swarm.name} t={done['done_at_s']:.1f}s: {done['action']} {done['target']} ({done['result']})")
        if int(now - start) // 30 > reported:
            reported = int(now - start) // 30
            log(f"t={now - start:.0f}s")
        processes.sleep(TICK)
    for swarm in swarms:
        swarm.release()
    return start, end


def run_strategy(strategy: str, config: SoakConfig, lab, processes: Processes, workdir: Path, log) -> dict:
    """One strategy's pair of swarms; a failure is a result (with its reason), not the end of the soak."""
    try:
        return measure_strategy(strategy, config, lab, processes, workdir, log)
    except Exception as error:
        if processes.stopping.is_set():
            raise
        log(f"{strategy}: failed: {type(error).__name__}: {error}")
        for popen in list(processes._started):  # this strategy's swarms end here, the next one runs alone
            if popen.name.startswith(f"{strategy}-"):
                processes.signal_group(popen, signal.SIGKILL)
        return {"failed": f"{type(error).__name__}: {error}"}


def measure_strategy(strategy: str, config: SoakConfig, lab, processes: Processes, workdir: Path, log) -> dict:
    arm = config.arm(strategy)
    reason = check_run_toml(run_toml(config.workload(), arm, "probe"))
    if reason:
        return {"skipped": reason}
    faults = config.faults()
    clean = Swarm(f"{strategy}-clean", lab, processes, workdir / f"{strategy}-clean", config, arm)
    faulted = Swarm(f"{strategy}-faults", lab, processes, workdir / f"{strategy}-faults", config, arm, faults)
    log(f"{strategy}: {config.peers} peers, {config.seconds:.0f}s, fault-free and faulted swarms side by side")
    # on an error or an interrupt, run()'s cleanup kills everything at once; a graceful end is for a full run
    start, end = drive([clean, faulted], config, processes, log)
    stop_swarms([clean, faulted], processes, END_GRACE)
    base, hit = measure(clean, start, end), measure(faulted, start, end)
    timeout = config.averaging_timeout
    result = {
        "goodput_ratio": sm.ratio(hit["goodput_samples_per_s"], base["goodput_samples_per_s"]),
        "loss_ratio": sm.ratio(hit["final_loss"], base["final_loss"]),
        "longest_wait_s": hit["longest_wait"]["seconds"],
        "acknowledged_reports_lost": hit["acknowledged_reports_lost"] + base["acknowledged_reports_lost"],
        "ledger_verify": "ok" if hit["ledger_verify"]["ok"] and base["ledger_verify"]["ok"] else "FAILED",
        "fault_capacity": fs.capacity(faults, config.peers, config.seconds),  # the ceiling of goodput_ratio
        "averaging_timeout_s": timeout,
        "window_s": round(end - start, 1),
        "schedule": fs.as_data(faults),
        "faulted": hit,
        "fault_free": base,
    }
    result["goals"] = {
        "goodput_ratio>=0.85": result["goodput_ratio"] is not None and result["goodput_ratio"] >= GOALS["goodput_ratio"],
        "loss_ratio<=1.1": result["loss_ratio"] is not None and result["loss_ratio"] <= GOALS["loss_ratio"],
        "longest_wait<=3x_averaging_timeout": result["longest_wait_s"] <= GOALS["wait_factor"] * timeout,
        "zero_acknowledged_reports_lost": result["acknowledged_reports_lost"] == 0,
        "ledger_verify_ok": result["ledger_verify"] == "ok",
    }
    return result


def run(strategies: list[str], config: SoakConfig, workdir: Path | None = None, log=print,
        concurrent: bool = False) -> dict:
    """The soak; returns {strategy: figures, ..., "meta": ...}. On Ctrl-C everything is still cleaned up
    and the results so far (with ``meta.interrupted``) are attached to the KeyboardInterrupt raised."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, raise_on_signal)
    workdir = Path(workdir or tempfile.mkdtemp(prefix=f"plk-{os.getpid()}-soak-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    available, why = namespaces_available()
    meta = {"mode": "netns" if available else "loopback", "config": {k: v for k, v in asdict(config).items()
                                                                    if k != "schedule"},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": git_commit(),
            "cpus": os.cpu_count(), "load_average_start": os.getloadavg()[0], "workdir": str(workdir),
            "how": "fault-free and faulted swarms of a strategy run side by side, same run.toml and seed",
            "notes": []}
    if not available:
        meta["notes"].append(f"loopback mode: {why}; links not shaped, a partition is a SIGSTOP of the peer")
        log(f"network namespaces unavailable ({why}): loopback, links NOT shaped")
    lab = NetnsLab() if available else LoopbackLab()
    processes = Processes(workdir / "logs")
    results: dict = {}
    started = time.time()
    interrupted = None
    try:
        if concurrent and len(strategies) > 1:
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(len(strategies))
            try:
                futures = {s: pool.submit(run_strategy, s, config, lab, processes, workdir, log) for s in strategies}
                for strategy, future in futures.items():
                    results[strategy] = future.result()
            except BaseException:
                processes.close()  # the workers' waits end at once
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for strategy in strategies:
                results[strategy] = run_strategy(strategy, config, lab, processes, workdir, log)
    except (KeyboardInterrupt, SystemExit) as error:
        interrupted = error
    finally:
        groups = {popen.pid for popen in processes._started}
        processes.close()
        lab.close()
        left = leftovers(processes, groups, str(workdir), getattr(lab, "prefix", "") if available else "")
        for strategy in strategies:
            results.setdefault(strategy, {"not_run": "interrupted" if interrupted else "failed"})
            results[strategy]["leftovers"] = left
            if "goals" in results[strategy]:
                results[strategy]["goals"]["zero_leftovers"] = not left["processes"] and not left["namespaces"]
        meta.update(wall_seconds=round(time.time() - started, 1), load_average_end=os.getloadavg()[0],
                    interrupted=bool(interrupted))
        results["meta"] = meta
    if interrupted is not None:
        interrupted.results = results
        raise interrupted
    return results


def parse_args(argv: list[str]):
    parser = argparse.ArgumentParser(prog="python -m benchmarks soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="the measured window (default 10)")
    parser.add_argument("--peers", type=int, default=8, help="initial peers per swarm (default 8)")
    parser.add_argument("--strategy", choices=["sync", "diloco", "both"], default="both")
    parser.add_argument("--out", type=Path, required=True, help="where the JSON goes")
    parser.add_argument("--schedule", type=Path, help="a JSON list of {at_s, action, target} (default: seeded)")
    parser.add_argument("--seed", type=int, default=SoakConfig.seed)
    parser.add_argument("--partition-seconds", type=float, default=60.0)
    parser.add_argument("--coordinator-down-seconds", type=float, default=15.0)
    parser.add_argument("--inner-steps", type=int, default=50, help="DiLoCo inner steps per round")
    parser.add_argument("--concurrent", action="store_true", help="run both strategies at the same time")
    parser.add_argument("--workdir", type=Path, help="logs and data dirs (default: a new temp dir)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.out.parent.exists():
        print(f"error: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return 2
    if args.peers < 2 or args.minutes <= 0:
        print("error: a soak needs --peers >= 2 and --minutes > 0", file=sys.stderr)
        return 2
    config = SoakConfig(peers=args.peers, seconds=args.minutes * 60, seed=args.seed, inner_steps=args.inner_steps,
                        partition_s=args.partition_seconds, coordinator_down_s=args.coordinator_down_seconds)
    if args.schedule:
        try:
            config = replace(config, schedule=fs.load_schedule(args.schedule))
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    problem = fs.check_schedule(config.faults(), config.peers, config.seconds)
    if problem:
        print(f"error: schedule: {problem}", file=sys.stderr)
        return 2
    strategies = ["sync", "diloco"] if args.strategy == "both" else [args.strategy]
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    try:
        results = run(strategies, config, args.workdir, log, concurrent=args.concurrent)
    except (KeyboardInterrupt, SystemExit) as error:
        results = getattr(error, "results", None)
        if results is not None:
            args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
            print(f"interrupted; wrote what was measured to {args.out}", file=sys.stderr)
        return 130
    args.out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(json.dumps({s: {k: results[s].get(k) for k in ("goodput_ratio", "loss_ratio", "longest_wait_s",
                                                           "acknowledged_reports_lost", "ledger_verify", "leftovers")}
                      for s in strategies}, indent=1))
    print(f"wrote {args.out}")
    return 0
