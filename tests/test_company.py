"""Training waits for company (peer/company.py): below min_peers a peer pauses at every round, keeps its
state, and resumes when enough peers are back."""

from __future__ import annotations

import signal
import threading
import time

from conftest import events, start_coordinator, start_peer, wait_until, write_run
from peer.company import CompanyCount, peers_present, too_few, wait_for_company


def test_the_smaller_view_decides_and_a_stale_coordinator_view_defers_to_the_swarm():
    assert peers_present(True, 1, 3) == 1  # the coordinator dropped a killed peer before its record expired
    assert peers_present(True, 2, 1) == 1  # a newcomer heartbeats before it is in the swarm
    assert peers_present(True, 2, None) == 2  # DiLoCo: the coordinator's view alone
    assert peers_present(False, 1, 2) == 2  # coordinator unreachable: the swarm's own count
    assert peers_present(False, 0, None) is None  # nothing trustworthy: do not pause a healthy swarm
    assert too_few(1, 2) and not too_few(2, 2) and not too_few(None, 2)


def test_the_swarm_count_overrules_a_larger_coordinator_count_only_for_a_while():
    now = [0.0]
    count = CompanyCount(trust_after=60.0, clock=lambda: now[0])
    assert count(True, 2, 1) == 1  # a newcomer heartbeats before it is in the swarm
    now[0] = 59.0
    assert count(True, 2, 1) == 1
    now[0] = 60.0
    assert count(True, 2, 1) == 2  # for a minute: the coordinator's count decides
    assert count(True, 1, 2) == 1  # a killed peer's record outlives it: the smaller one, at once
    now[0] = 61.0
    assert count(True, 2, 1) == 1  # the disagreement began again
    assert count(False, 3, 1) == 1  # no fresh view: the swarm's count alone
    now[0] = 200.0
    assert count(True, 2, 1) == 1  # a stale view in between restarted the clock


def test_waiting_says_the_count_and_ends_when_enough_peers_are_back():
    counts, said = iter([1, 1, 1, 2]), []
    present = wait_for_company(lambda: next(counts), 2, threading.Event(), said.append, poll=0)
    assert present == 2 and said == ["waiting for peers: 1 of 2"]


def test_waiting_ends_on_stop():
    stop, said = threading.Event(), []
    stop.set()
    wait_for_company(lambda: 1, 2, stop, said.append)
    assert said == []


def epochs_of(data_dir) -> list[int]:
    return [e["epoch"] for e in events(data_dir) if e["event"] == "epoch"]


def test_a_peer_whose_partner_is_killed_pauses_and_resumes_with_a_new_one(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=0, min_peers=2, heartbeat_interval=1.0, peer_timeout=4.0)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    first = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "a")
    second = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "b")
    wait_until(lambda: len(epochs_of(tmp_path / "a")) >= 2, 240, "two epochs trained together")
    second.kill()
    waiting = wait_until(lambda: [e for e in events(tmp_path / "a") if e["event"] == "waiting"], 60,
                         "the survivor to pause")[0]
    assert waiting["peers"] == 1 and waiting["min_peers"] == 2, waiting
    assert "waiting for peers: 1 of 2" in first.log()
    paused_at = epochs_of(tmp_path / "a")
    # while alone it stays put: watched over several heartbeats (the coordinator keeps saying 1 of 2)
    seen = coordinator.status()["epoch"]
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert epochs_of(tmp_path / "a") == paused_at
        assert not [e for e in events(tmp_path / "a") if e["event"] == "resumed"]
        assert coordinator.status()["epoch"] <= seen + 1
    start_peer(procs, coordinator.address, coordinator.token, tmp_path / "c2")
    wait_until(lambda: [e for e in events(tmp_path / "a") if e["event"] == "resumed"], 120, "the survivor to resume")
    wait_until(lambda: len(epochs_of(tmp_path / "a")) > len(paused_at), 120, "the survivor to train again")
    wait_until(lambda: epochs_of(tmp_path / "c2"), 120, "the newcomer to train")
    # it kept the run's progress: the newcomer loaded the survivor's state, and whatever the survivor
    # loads back (the newcomer may end the first epoch together first) is at or past where it paused
    assert [e["epoch"] for e in events(tmp_path / "c2") if e["event"] == "state_loaded"][0] >= paused_at[-1]
    assert all(e["epoch"] >= paused_at[-1] for e in events(tmp_path / "a") if e["event"] == "state_loaded")
    assert epochs_of(tmp_path / "a")[len(paused_at)] > paused_at[-1]
    first.popen.send_signal(signal.SIGTERM)
    assert first.wait(60) == 0
