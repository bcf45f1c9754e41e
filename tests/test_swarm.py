"""End-to-end runs: a real coordinator and real peers, each its own OS process, on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import time

import torch

from conftest import (
    cli, epochs_reported, events, load_model, start_coordinator, start_peer, wait_until, write_run,
)
from coordinator.books.ledger import Ledger
from examples.digits import TASK
from peer.outbox import Outbox

PEER_EXIT = 180  # seconds a peer may take to finish its epochs


# Peers that average every epoch end within ~1e-5 of each other (float summation order); peers
# that skip even one round differ by ~1e-2 (measured), so 1e-4 separates the two cleanly.
PARAMETER_TOLERANCE = 1e-4


def assert_same_parameters(first: dict, second: dict) -> None:
    assert first["epoch"] == second["epoch"]
    for name, tensor in first["state_dict"].items():
        torch.testing.assert_close(tensor, second["state_dict"][name], atol=PARAMETER_TOLERANCE, rtol=0, msg=name)


def held_out_accuracy(state: dict) -> float:
    model = TASK.build_model(0)
    model.load_state_dict(state["state_dict"])
    return TASK.evaluate(model, *TASK.eval_data())["accuracy"]


def test_two_peers_average_and_learn(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=5)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    partner_token = coordinator.issue_token("acme")
    first = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "a")
    second = start_peer(procs, coordinator.address, partner_token, tmp_path / "b")
    assert first.wait(PEER_EXIT) == 0, first.log()
    assert second.wait(PEER_EXIT) == 0, second.log()

    # each peer trained on its own samples (assignment is per peer id): only averaging makes them equal
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    assert a["epoch"] == 5
    assert_same_parameters(a, b)
    initial = TASK.build_model(20261128).state_dict()
    assert any(not torch.equal(initial[name], a["state_dict"][name]) for name in initial), "nothing was trained"
    assert held_out_accuracy(a) > 0.4  # chance is 0.1; five averaged steps reach ~0.6

    status = coordinator.status()
    assert status["epoch"] == 5
    peers = {peer["org"]: peer for peer in status["peers"]}
    assert set(peers) == {"default", "acme"}
    assert all(peer["samples"] > 0 and peer["reports"] == 5 for peer in peers.values())
    assert {org["name"]: org["samples"] > 0 for org in status["orgs"]} == {"default": True, "acme": True}
    assert status["samples"] == sum(peer["samples"] for peer in peers.values())
    # every report a peer saw acknowledged is in the ledger
    recorded = Ledger.open_existing(tmp_path / "c").report_ids()
    for peer_dir in ("a", "b"):
        acked = Outbox(tmp_path / peer_dir).acked_ids()
        assert len(acked) == 5 and set(acked) <= recorded


def test_late_peer_loads_state_and_contributes(procs, tmp_path):
    # two early peers pace the run (each epoch waits for their averaging round), so it is still
    # going when the third arrives (a loaded machine took the late peer 20-30 s from its
    # start to its first step, while the early peers did 6 epochs)
    run = write_run(tmp_path / "run.toml", epochs=16)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    early = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("e1", "e2")]
    wait_until(lambda: len(epochs_reported(tmp_path / "e1")) >= 2, 90, "the early peers to finish 2 epochs")
    late = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "late")
    for peer in [*early, late]:
        assert peer.wait(PEER_EXIT) == 0, peer.log()

    loaded = [event for event in events(tmp_path / "late") if event["event"] == "state_loaded"]
    assert loaded and loaded[0]["epoch"] >= 2, f"late peer did not load state: {events(tmp_path / 'late')}"
    late_epochs = epochs_reported(tmp_path / "late")
    assert late_epochs and min(late_epochs) >= 2
    assert_same_parameters(load_model(tmp_path / "e1"), load_model(tmp_path / "late"))
    late_id = next(event["peer_id"] for event in events(tmp_path / "late") if event["event"] == "joined")
    samples = {peer["id"]: peer["samples"] for peer in coordinator.status()["peers"]}
    assert samples[late_id] > 0


def test_surviving_peer_goes_on_after_other_is_killed(procs, tmp_path):
    # min_peers = 1: the survivor may train alone (with 2 it waits for company, tests/test_company.py);
    # a run without end, so that neither peer can finish it alone before the other has trained
    run = write_run(tmp_path / "run.toml", epochs=0, averaging_timeout=5.0, min_peers=1)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    survivor = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "survivor")
    victim = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "victim")
    # both: the peer started first may be the last to train (hivemind's start takes seconds under load)
    wait_until(lambda: all(len(epochs_reported(tmp_path / name)) >= 2 for name in ("survivor", "victim")), 90,
               "both peers to train 2 epochs")
    victim.kill()
    at_kill = max(epochs_reported(tmp_path / "survivor"))
    wait_until(lambda: max(epochs_reported(tmp_path / "survivor")) >= at_kill + 3, 120, "the survivor to go on")
    survivor.popen.send_signal(signal.SIGTERM)
    assert survivor.wait(PEER_EXIT) == 0, survivor.log()
    assert load_model(tmp_path / "survivor")["epoch"] == max(epochs_reported(tmp_path / "survivor")) + 1


def test_coordinator_restart_keeps_acknowledged_reports(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=12)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    peer_dirs = [tmp_path / "a", tmp_path / "b"]
    peers = [start_peer(procs, coordinator.address, coordinator.token, d) for d in peer_dirs]
    wait_until(lambda: all(len(Outbox(d).acked_ids()) >= 2 for d in peer_dirs), 90, "2 acknowledged reports each")

    coordinator.proc.signal_group(signal.SIGKILL)
    coordinator.proc.wait(10)
    acked_before = {report for d in peer_dirs for report in Outbox(d).acked_ids()}
    epochs_before = [len(epochs_reported(d)) for d in peer_dirs]
    # the peers train on without the coordinator; their reports wait in the outbox
    wait_until(lambda: all(len(epochs_reported(d)) > n for d, n in zip(peer_dirs, epochs_before)), 60,
               "peers to finish an epoch while the coordinator is down")

    port = int(coordinator.address.rsplit(":", 1)[1])
    restarted = start_coordinator(procs, tmp_path / "c", run, port=port, name="coordinator-restarted")
    assert acked_before <= Ledger.open_existing(tmp_path / "c").report_ids()

    for peer in peers:
        assert peer.wait(PEER_EXIT) == 0, peer.log()
    recorded = Ledger.open_existing(tmp_path / "c").report_ids()
    for d in peer_dirs:
        emitted = {event["report_id"] for event in events(d) if event["event"] == "epoch"}
        assert emitted <= recorded, "reports made while the coordinator was down were not re-sent"
    status = restarted.status()
    assert status["epoch"] == 12
    assert all(peer["reports"] == 12 for peer in status["peers"])


def test_sigterm_leaves_cleanly_and_the_other_peer_goes_on(procs, tmp_path):
    # min_peers = 1: the stayer may train alone (with 2 it waits for company, tests/test_company.py);
    # a run without end, so that neither peer can finish it alone before the other has trained
    run = write_run(tmp_path / "run.toml", epochs=0, averaging_timeout=5.0, min_peers=1)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    stayer = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "stayer")
    leaver = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "leaver")
    wait_until(lambda: all(len(epochs_reported(tmp_path / name)) >= 2 for name in ("stayer", "leaver")), 90,
               "both peers to train 2 epochs")
    leaver.popen.send_signal(signal.SIGTERM)  # the peer process only, as `kill PID` would
    assert leaver.wait(60) == 0, leaver.log()
    leaver_id = next(e["peer_id"] for e in events(tmp_path / "leaver") if e["event"] == "joined")
    assert [e["reason"] for e in events(tmp_path / "leaver") if e["event"] == "left"] == ["stopped"]
    assert not next(p for p in coordinator.status()["peers"] if p["id"] == leaver_id)["alive"]
    at_leave = max(epochs_reported(tmp_path / "stayer"))
    wait_until(lambda: max(epochs_reported(tmp_path / "stayer")) >= at_leave + 3, 120, "the stayer to go on")
    stayer.popen.send_signal(signal.SIGTERM)
    assert stayer.wait(PEER_EXIT) == 0, stayer.log()
    assert load_model(tmp_path / "stayer")["epoch"] == max(epochs_reported(tmp_path / "stayer")) + 1


def test_max_epochs_leaves_after_that_many_epochs(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=0)  # a run without end: only --max-epochs stops the peers
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    peers = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name, "--max-epochs", "3")
             for name in ("a", "b")]
    for peer in peers:
        assert peer.wait(PEER_EXIT) == 0, peer.log()
    for name in ("a", "b"):
        assert len(epochs_reported(tmp_path / name)) == 3
        assert [e["reason"] for e in events(tmp_path / name) if e["event"] == "left"] == ["3 epochs done"]
    assert_same_parameters(load_model(tmp_path / "a"), load_model(tmp_path / "b"))


def averaged_since(data_dir, since: float) -> int:
    """All-reduce rounds this peer completed with a partner after `since` (its attestation records)."""
    path = data_dir / "attestations.jsonl"
    if not path.exists():
        return 0
    groups = set()
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line being written
        if record.get("time", 0) > since:
            groups.add(record.get("group"))
    return len(groups)


OUTAGE = 45.0  # seconds the coordinator stays down (the default access token lives 2 hours)


def test_a_coordinator_outage_does_not_stop_averaging_and_evictions_work_after_it(procs, tmp_path):
    # default [security]: the token outlives the outage; min_peers = 1: the stayer trains on alone after
    # the eviction (with 2 it would rightly wait for company)
    # averaging_timeout = 5: two peers that raced apart at the start (alone, epochs of milliseconds) pay a
    # failed round (grad + state: 2 x the timeout) per epoch until one loads the other's state
    run = write_run(tmp_path / "run.toml", epochs=0, min_peers=1, averaging_timeout=5.0)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    partner_token = coordinator.issue_token("acme")
    stayer = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "a")
    partner = start_peer(procs, coordinator.address, partner_token, tmp_path / "b")
    peer_dirs = [tmp_path / "a", tmp_path / "b"]
    # from a swarm that averages (alone at first, min_peers = 1, each may race through epochs unseen)
    wait_until(lambda: all(len(epochs_reported(d)) >= 2 and averaged_since(d, 0) for d in peer_dirs), 120,
               "both peers to train 2 epochs and average together")

    coordinator.proc.signal_group(signal.SIGKILL)
    coordinator.proc.wait(10)
    down = time.time()
    # well into the outage, both peers still complete all-reduce rounds together
    wait_until(lambda: time.time() > down + OUTAGE - 15 and all(averaged_since(d, down + OUTAGE - 15) for d in peer_dirs),
               OUTAGE + 60, "both peers to average together late in the coordinator's outage")
    assert stayer.popen.poll() is None and partner.popen.poll() is None
    time.sleep(max(0.0, down + OUTAGE - time.time()))  # the fault's length, not a synchronisation

    port = int(coordinator.address.rsplit(":", 1)[1])
    restarted = start_coordinator(procs, tmp_path / "c", run, port=port, name="coordinator-restarted")
    # peers reconnect with jittered backoff; a loaded machine took more than 60 s (a full run beside burn loops)
    wait_until(lambda: sum(p["alive"] for p in restarted.status()["peers"]) == 2, 120, "both peers seen again")
    # an eviction once the coordinator is back takes effect as before the outage
    tokens = json.loads(cli("coordinator", "token", "list", "--data-dir", str(restarted.data_dir),
                            "--format", "json").stdout)
    partner_token_id = next(t["id"] for t in tokens if t["org"] == "acme")
    assert cli("coordinator", "token", "revoke", partner_token_id, "--data-dir", str(restarted.data_dir)).returncode == 0
    revoked = time.time()
    assert partner.wait(60) == 3, partner.log()
    wait_until(lambda: any(e["event"] == "epoch" and e["time"] > revoked for e in events(tmp_path / "a")), 120,
               "the stayer to train on after the eviction")
    assert stayer.popen.poll() is None
