"""The soak harness (benchmarks/soak.py): its schedule and figures by hand, a shortened real soak of both
strategies with its checks asserted, and a Ctrl-C that leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import fault_schedule as fs
from benchmarks import soak_metrics as sm
from benchmarks.netns import existing_namespaces

ROOT = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


# -- the schedule ------------------------------------------------------------------------------------
def test_default_schedule_has_every_fault_of_the_issue():
    faults = fs.default_schedule(peers=8, seconds=600, seed=1)
    actions = [f.action for f in faults]
    assert actions.count("kill_peer") == 3 == actions.count("join_peer")  # ceil(30% of 8)
    for action in ("kill_coordinator", "restart_coordinator", "throttle_start", "throttle_stop", "link_down", "link_up"):
        assert actions.count(action) == 1, action
    down = next(f for f in faults if f.action == "link_down")
    up = next(f for f in faults if f.action == "link_up")
    assert up.target == down.target and up.at_s - down.at_s == pytest.approx(60)
    killed = {f.target for f in faults if f.action == "kill_peer"}
    straggler = next(f.target for f in faults if f.action == "throttle_start")
    assert straggler not in killed and down.target not in killed and down.target != straggler
    assert faults == sorted(faults, key=lambda f: (f.at_s, f.action))
    assert fs.check_schedule(faults, 8, 600) == ""


def test_schedule_is_seeded_and_fits_short_runs():
    assert fs.default_schedule(4, 180, seed=7) == fs.default_schedule(4, 180, seed=7)
    assert fs.default_schedule(4, 180, seed=7) != fs.default_schedule(4, 180, seed=8)
    for peers in (2, 3, 4, 8):
        for seed in range(20):
            faults = fs.default_schedule(peers, 60, seed, partition_s=60)
            assert fs.check_schedule(faults, peers, 60) == "", (peers, seed)
    assert [fs.kills_for(n) for n in (1, 3, 4, 8, 10)] == [1, 1, 2, 3, 3]


def test_schedule_file_round_trip_and_bad_schedules(tmp_path):
    faults = fs.default_schedule(3, 120, seed=3)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(fs.as_data(faults)))
    assert fs.load_schedule(path) == faults
    bad = tmp_path / "bad.json"
    bad.write_text('[{"at": 1}]')
    with pytest.raises(ValueError, match="not a schedule"):
        fs.load_schedule(bad)
    assert "unknown action" in fs.check_schedule([fs.Fault(1, "explode", "peer0")], 3, 60)
    assert "outside the run" in fs.check_schedule([fs.Fault(61, "kill_peer", "peer0")], 3, 60)
    assert "no peer of this run" in fs.check_schedule([fs.Fault(1, "kill_peer", "peer7")], 3, 60)
    assert "new name" in fs.check_schedule([fs.Fault(1, "join_peer", "peer0")], 3, 60)
    assert fs.check_schedule([fs.Fault(1, "join_peer", "x"), fs.Fault(2, "link_down", "x")], 3, 60) == ""


def test_straggler_duty_cycle_runs_a_tenth_of_the_time():
    running = [fs.running_now((t + 0.5) / 100) for t in range(1000)]  # 10 s in steps of 10 ms
    assert sum(running) == 100


@pytest.mark.slow
def test_soak_cli_refuses_bad_input(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps([{"at_s": 1, "action": "kill_peer", "target": "peer9"}]))
    run = subprocess.run([sys.executable, "-m", "benchmarks", "soak", "--peers", "3", "--minutes", "1", "--schedule",
                          str(bad), "--out", str(tmp_path / "o.json")], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "error: schedule: kill_peer targets 'peer9'" in run.stderr
    assert not (tmp_path / "o.json").exists()


# -- the figures, by hand ----------------------------------------------------------------------------
def _epoch(t, samples, loss=None, compute=0.0):
    return {"event": "epoch", "time": t, "samples": samples, "metrics": {"loss": loss}, "compute_seconds": compute}


def test_goodput_counts_epochs_inside_the_window():
    peers = [sm.PeerLog("a", [_epoch(5, 100), _epoch(15, 100), _epoch(25, 100)], None),
             sm.PeerLog("b", [_epoch(12, 50)], 13, killed=True)]
    assert sm.goodput(peers, 10, 20) == pytest.approx(15.0)  # 150 samples in 10 s


def test_longest_wait_subtracts_compute_and_counts_a_hang_until_the_end():
    ev = [{"event": "started", "time": 0}, _epoch(10, 32, compute=8.0), _epoch(14, 32, compute=1.0),
          {"event": "finished", "time": 15, "samples": 64, "metrics": {"loss": 1.0}}]
    assert sm.longest_wait([sm.PeerLog("a", ev, 15)], since=0) == {"seconds": 3.0, "peer": "a", "after": "epoch",
                                                                    "before": "epoch"}
    hung = [{"event": "started", "time": 0}, _epoch(2, 32)]  # no event after t=2 until stopped at t=50
    wait = sm.longest_wait([sm.PeerLog("a", ev, 15), sm.PeerLog("h", hung, 50)], since=0)
    assert wait == {"seconds": 48.0, "peer": "h", "after": "epoch", "before": "stopped"}
    assert sm.longest_wait([sm.PeerLog("h", hung, 50)], since=60)["seconds"] == 0.0  # before the window


def test_final_loss_is_the_median_of_peers_alive_at_the_end():
    alive = sm.PeerLog("a", [_epoch(1, 32, 2.0), {"event": "finished", "time": 2, "samples": 32,
                                                   "metrics": {"loss": 1.0}}], 2)
    no_finish = sm.PeerLog("b", [_epoch(1, 32, 3.0)], 2)
    killed = sm.PeerLog("k", [_epoch(1, 32, 9.0)], 1, killed=True)
    assert sm.final_loss([alive, no_finish, killed]) == 2.0
    assert sm.ratio(1.1, 1.0) == 1.1 and sm.ratio(None, 1.0) is None and sm.ratio(1.0, 0) is None


def test_acknowledged_reports_against_the_ledger(tmp_path):
    outbox = sqlite3.connect(tmp_path / "outbox.sqlite")
    outbox.execute("CREATE TABLE outbox (report_id TEXT PRIMARY KEY, created REAL, payload BLOB, acked REAL, error TEXT)")
    outbox.executemany("INSERT INTO outbox VALUES (?, 0, x'', ?, ?)",
                       [("r1", 1.0, None), ("r2", 1.0, None), ("r3", None, None), ("r4", 1.0, "INVALID: x")])
    outbox.commit()
    ledger = sqlite3.connect(tmp_path / "ledger.sqlite")
    ledger.execute("CREATE TABLE reports (report_id TEXT PRIMARY KEY, compute_seconds REAL)")
    ledger.execute("INSERT INTO reports VALUES ('r1', 2.5)")
    ledger.commit()
    assert sm.acknowledged_ids(tmp_path) == {"r1", "r2"}
    assert sm.acknowledged_ids(tmp_path) - sm.ledger_report_ids(tmp_path / "ledger.sqlite") == {"r2"}
    assert sm.outbox_counts(tmp_path) == {"pending": 1, "acknowledged": 2, "rejected": 1}
    assert sm.compute_by_report(tmp_path / "ledger.sqlite") == {"r1": 2.5}


def test_goodput_leaves_out_what_a_peer_trained_alone():
    peers = [sm.PeerLog("a", [{**_epoch(1, 100), "peers": 3}, {**_epoch(2, 40), "peers": 1}], None)]
    assert sm.window_samples(peers, 0, 10) == 100 and sm.window_samples(peers, 0, 10, solo=True) == 40
    assert sm.goodput(peers, 0, 10) == pytest.approx(10.0)


# -- real processes: a shortened soak, and Ctrl-C --------------------------------------------------------
SHORT_SCHEDULE = [  # a 30 s window: every kind of fault, each shortened
    {"at_s": 1, "action": "kill_peer", "target": "peer0"},
    {"at_s": 2, "action": "join_peer", "target": "peer0-r"},
    {"at_s": 2, "action": "throttle_start", "target": "peer1"},
    {"at_s": 5, "action": "link_down", "target": "peer2"},
    {"at_s": 13, "action": "kill_coordinator", "target": "coordinator"},
    {"at_s": 13, "action": "link_up", "target": "peer2"},
    {"at_s": 18, "action": "restart_coordinator", "target": "coordinator"},
    {"at_s": 24, "action": "throttle_stop", "target": "peer1"},
]


def _soak(tmp_path: Path, *args: str) -> subprocess.Popen:
    log = open(tmp_path / "soak.log", "w")
    return subprocess.Popen([sys.executable, "-m", "benchmarks", "soak", *args, "--workdir", str(tmp_path / "work"),
                             "--out", str(tmp_path / "out.json")], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes() and "Z" not in (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return found


def _wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
@needs_root
@pytest.mark.timeout(600)
def test_short_soak_of_both_strategies_loses_no_report_and_leaves_nothing(tmp_path):
    """Both strategies at once (--concurrent), 3 peers, a 30 s window with every fault shortened. About 3-4
    minutes on 2 loaded cores, most of it starting 4 coordinators and 14 peers: the one real soak of the suite."""
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps(SHORT_SCHEDULE))
    soak = _soak(tmp_path, "--peers", "3", "--minutes", "0.5", "--strategy", "both", "--concurrent",
                 "--inner-steps", "10", "--schedule", str(schedule))
    try:
        soak.wait(timeout=540)
    finally:
        if soak.poll() is None:
            os.killpg(soak.pid, signal.SIGKILL)
    output = (tmp_path / "soak.log").read_text()
    assert soak.returncode == 0, output[-4000:]
    results = json.loads((tmp_path / "out.json").read_text())
    print(json.dumps({s: {k: results[s][k] for k in ("goodput_ratio", "loss_ratio", "longest_wait_s")}
                      for s in ("sync", "diloco")}))
    for strategy in ("sync", "diloco"):
        result = results[strategy]
        assert "failed" not in result, result
        assert result["acknowledged_reports_lost"] == 0, result["faulted"]["lost_report_ids"]
        assert result["ledger_verify"] == "ok", result["faulted"]["ledger_verify"]
        assert result["leftovers"] == {"processes": [], "namespaces": []}
        assert [d["action"] for d in result["faulted"]["faults_done"]] == [f["action"] for f in SHORT_SCHEDULE]
        assert result["faulted"]["reports_in_ledger"] > 0 and result["fault_free"]["reports_in_ledger"] > 0
        for key in ("goodput_ratio", "loss_ratio", "longest_wait_s", "goals"):
            assert key in result, key
    assert results["meta"]["mode"] == "netns"
    assert existing_namespaces(f"plk-{soak.pid}-") == []
    _wait_until(lambda: _processes_mentioning(str(tmp_path / "work")) == [], 15, "every process it started to end")


@pytest.mark.slow
@needs_root
@pytest.mark.timeout(400)
@pytest.mark.parametrize("moment", ["starting", "faults in effect"])
def test_ctrl_c_of_the_soak_leaves_no_process_or_namespace(tmp_path, moment):
    """SIGINT while the swarms start, or while a straggler is SIGSTOPped, a link is down and the
    coordinator is dead: every process group is killed and every namespace deleted all the same."""
    schedule = tmp_path / "schedule.json"
    schedule.write_text(json.dumps([{"at_s": 0, "action": "throttle_start", "target": "peer0"},
                                    {"at_s": 0, "action": "link_down", "target": "peer1"},
                                    {"at_s": 0.5, "action": "kill_coordinator", "target": "coordinator"}]))
    soak = _soak(tmp_path, "--peers", "2", "--minutes", "2", "--strategy", "sync", "--schedule", str(schedule))
    prefix = f"plk-{soak.pid}-"
    try:
        if moment == "starting":
            _wait_until(lambda: len(existing_namespaces(prefix)) >= 3 and
                        len(_processes_mentioning(str(tmp_path / "work"))) >= 2, 120, "the soak to start its swarms")
        else:
            _wait_until(lambda: "kill_coordinator" in (tmp_path / "soak.log").read_text(), 300,
                        "the faults to be in effect")
        os.kill(soak.pid, signal.SIGINT)
        soak.wait(timeout=90)
    finally:
        if soak.poll() is None:
            os.killpg(soak.pid, signal.SIGKILL)
    assert soak.returncode == 130, (tmp_path / "soak.log").read_text()[-3000:]
    assert existing_namespaces(prefix) == []
    _wait_until(lambda: _processes_mentioning(str(tmp_path / "work")) == [], 15, "every process it started to end")
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["meta"]["interrupted"] is True
    assert results["sync"]["leftovers"] == {"processes": [], "namespaces": []}


def test_capacity_is_what_the_faults_alone_take_away():
    assert fs.capacity([], 4, 100) == 1.0
    faults = [fs.Fault(50, "kill_peer", "peer0"), fs.Fault(60, "join_peer", "peer0-r"),  # 10 of 400 peer-s
              fs.Fault(0, "throttle_start", "peer1"), fs.Fault(50, "throttle_stop", "peer1"),  # 45
              fs.Fault(20, "link_down", "peer2"), fs.Fault(40, "link_up", "peer2")]  # 20
    assert fs.capacity(faults, 4, 100) == pytest.approx((400 - 10 - 45 - 20) / 400, abs=0.002)


# -- the fault mechanics on a stand-in process (seconds, no swarm) --------------------------------------
def _state(pid: int) -> str:
    return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]


def _swarm_with_a_sleeper(tmp_path, lab):
    from benchmarks.procs import Processes
    from benchmarks.soak import PeerProc, SoakConfig, Swarm

    processes = Processes(tmp_path / "logs")
    swarm = Swarm("t", lab, processes, tmp_path / "t", SoakConfig(peers=1, seconds=60), SoakConfig().arm("sync"))
    host = lab.add_host(20.0)
    sleeper = processes.start(host.command(["sleep", "60"]), "sleeper")
    swarm.peers["peer0"] = PeerProc("peer0", host, tmp_path, sleeper)
    swarm.t0 = time.time()
    return swarm, processes, sleeper


def test_straggler_and_partition_on_loopback(tmp_path):
    from benchmarks.netns import LoopbackLab

    swarm, processes, sleeper = _swarm_with_a_sleeper(tmp_path, LoopbackLab())
    try:
        assert swarm.port != swarm.dht_port  # loopback: free ports, not the namespaces' fixed ones
        swarm.throttle_start("peer0", time.time())
        states = set()
        deadline = time.time() + 3
        while time.time() < deadline:  # the duty cycle: stopped most of each second, running a tenth
            swarm.tick(time.time())
            states.add(_state(sleeper.pid))
            time.sleep(0.01)
        assert "T" in states and states - {"T"}
        swarm.throttle_stop("peer0", time.time())
        _wait_until(lambda: _state(sleeper.pid) != "T", 5, "the straggler to run again")
        assert "SIGSTOP" in swarm.link_down("peer0", time.time())
        _wait_until(lambda: _state(sleeper.pid) == "T", 5, "the cut-off peer to stop")
        swarm.link_up("peer0", time.time())
        _wait_until(lambda: _state(sleeper.pid) != "T", 5, "the peer to run again")
        swarm.kill_peer("peer0", time.time())
        _wait_until(lambda: sleeper.poll() is not None, 10, "the killed peer to end")
    finally:
        processes.close()


@needs_root
def test_partition_takes_the_link_down_and_back(tmp_path):
    from benchmarks.netns import NetnsLab

    lab = NetnsLab(prefix=f"plk-{os.getpid()}-s-")
    swarm, processes, sleeper = _swarm_with_a_sleeper(tmp_path, lab)
    host = swarm.peers["peer0"].host

    def link_state() -> str:
        shown = subprocess.run(["ip", "-n", lab.hub, "link", "show", host.hub_interface], capture_output=True,
                               text=True).stdout
        return "DOWN" if "state DOWN" in shown or "NO-CARRIER" in shown.split(">")[0] else "UP"

    try:
        assert (swarm.port, swarm.dht_port) == (7000, 7001)
        swarm.link_down("peer0", time.time())
        assert link_state() == "DOWN"
        swarm.release()  # what the end of a run does: the link comes back
        assert link_state() == "UP"
    finally:
        processes.close()
        assert lab.close() == []


def test_loopback_fallback_is_said_in_the_json(monkeypatch, tmp_path):
    from benchmarks import soak

    monkeypatch.setattr(soak, "namespaces_available", lambda: (False, "not root (test)"))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        results = soak.run([], soak.SoakConfig(peers=2, seconds=1), tmp_path, log=lambda line: None)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert results["meta"]["mode"] == "loopback"
    assert any("loopback mode: not root (test)" in note for note in results["meta"]["notes"])
