"""Joining under churn: admission is in effect before the Join reply, and every wait is bounded."""

from __future__ import annotations

import json
import sys
import time

import pytest

from conftest import Proc, pin, start_coordinator, wait_until, write_run

JOINS = 20
JOIN_EXIT = 120  # seconds one join (with its bounded bootstrap retries) may take
HEARTBEAT_INTERVAL = 2.0  # examples/digits/run.toml
LOAD_SLACK = 5.0  # seconds of scheduling delay allowed on a loaded 2-core box
CONCURRENT = 4  # joins in flight at once: admissions overlap, as when volunteers arrive together


def join_only(procs, coordinator, data_dir, name):
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc([sys.executable, "-m", "tests.variants.join_only", "join", coordinator.address, "--token",
                 coordinator.token, *pin(coordinator.address), "--data-dir", str(data_dir), "--threads", "1",
                 "--progress", "plain"], data_dir.parent / f"{name}.log")
    procs.append(proc)
    return proc


def test_twenty_peers_join_in_a_row_and_none_fails(procs, tmp_path):
    """20 joins against one coordinator, CONCURRENT at a time (a new one starts as one ends)."""
    coordinator = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml", min_peers=1))
    started = time.monotonic()
    running: list[tuple[int, Proc]] = []
    next_index, results = 0, {}
    while len(results) < JOINS:
        while next_index < JOINS and len(running) < CONCURRENT:
            running.append((next_index, join_only(procs, coordinator, tmp_path / f"p{next_index}", f"p{next_index}")))
            next_index += 1
        done = wait_until(lambda: [(i, p) for i, p in running if p.popen.poll() is not None], JOIN_EXIT,
                          f"one of joins {[i for i, _ in running]} to end")
        for index, proc in done:
            running.remove((index, proc))
            log = proc.log()
            assert proc.popen.returncode == 0, f"join {index} failed (exit {proc.popen.returncode}):\n{log[-3000:]}"
            assert "Traceback" not in log, log[-3000:]
            results[index] = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
            # the swarm answered: the store was acknowledged, or the peer read other peers' records
            # (hivemind's store can report False under load when departed peers' nodes time out)
            assert (results[index]["stored"] and results[index]["seen"] >= 1) or results[index]["seen"] >= 2, \
                results[index]
    status = coordinator.status()
    assert len(status["peers"]) == JOINS
    assert not any(peer["alive"] for peer in status["peers"]), "a peer that left still shows alive"
    print(f"{JOINS} joins in {time.monotonic() - started:.0f}s")


def test_unreachable_bootstrap_ends_with_one_error_line_and_leaves(procs, tmp_path):
    coordinator = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml", min_peers=1))
    data_dir = tmp_path / "lost"
    data_dir.mkdir()
    proc = Proc([sys.executable, "-m", "tests.variants.unreachable_bootstrap", "join", coordinator.address,
                 "--token", coordinator.token, *pin(coordinator.address), "--data-dir", str(data_dir),
                 "--threads", "1", "--progress", "plain"], tmp_path / "lost.log")
    procs.append(proc)
    assert proc.wait(JOIN_EXIT) == 2, proc.log()
    log = proc.log()
    assert "Traceback" not in log, log
    assert "waiting for the swarm's bootstrap node" in log, log
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not join the swarm" in errors[0], log
    status = coordinator.status()
    assert [peer["alive"] for peer in status["peers"]] == [False], "the peer that gave up still shows alive"


def slow_donor(procs, coordinator, data_dir, *extra):
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc([sys.executable, "-m", "tests.variants.slow_donor", "join", coordinator.address, "--token",
                 coordinator.token, *pin(coordinator.address), "--data-dir", str(data_dir), "--threads", "1",
                 "--progress", "plain", *extra], data_dir.parent / f"{data_dir.name}.log")
    procs.append(proc)
    return proc


def serving_since(data_dir, since: float) -> bool:
    try:
        return any(float(line) > since for line in (data_dir / "serving_state").read_text().split())
    except FileNotFoundError:
        return False


def test_state_donor_killed_mid_transfer(procs, tmp_path):
    """The late peer's donor dies (kill -9) while sending state: the late peer loads from the other
    donor, or ends with one clear error line; it never hangs."""
    from conftest import epochs_reported, events, start_peer

    coordinator = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml", epochs=60))
    donors = {name: slow_donor(procs, coordinator, tmp_path / name) for name in ("d1", "d2")}
    wait_until(lambda: len(epochs_reported(tmp_path / "d1")) >= 2, 120, "the donors to finish 2 epochs")
    asked = time.time()
    late = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "late", "--max-epochs", "1")
    # the current peers' averaging gates accept the newcomer within one heartbeat (+ one call) of its Join
    from peer import timeouts
    from peer.swarm import swarm_peer_id

    identity_file = tmp_path / "late" / "swarm_identity.key"
    newcomer = wait_until(lambda: identity_file.exists() and swarm_peer_id(tmp_path / "late"), 60, "the late peer's id")
    joined_at = wait_until(lambda: next((e["time"] for e in events(tmp_path / "late") if e["event"] == "joined"), None),
                           60, "the late peer's Join")
    accepted_at = wait_until(lambda: all(newcomer in json.loads((tmp_path / name / "swarm_access.json").read_text())
                                         ["allow"] for name in donors) and time.time(), 60,
                             "the donors to admit the newcomer")
    bound = HEARTBEAT_INTERVAL + timeouts.CALL
    assert accepted_at - joined_at < bound + LOAD_SLACK, f"gates took {accepted_at - joined_at:.1f}s, bound {bound}s"
    print(f"donors' gates accepted the newcomer {accepted_at - joined_at:.1f}s after its Join (bound {bound:.0f}s)")
    victim = wait_until(lambda: next((name for name in donors if serving_since(tmp_path / name, asked)), None), 120,
                        "a donor to start sending its state to the late peer")
    donors[victim].kill()
    code = late.wait(timeouts_bound())
    log = late.log()
    loaded = [event for event in events(tmp_path / "late") if event["event"] == "state_loaded"]
    if code == 0:
        assert loaded and loaded[0]["epoch"] >= 2, log[-3000:]
        survivor = next(name for name in donors if name != victim)
        assert serving_since(tmp_path / survivor, asked), "the state came from nowhere"
    else:
        assert code == 2, log[-3000:]
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "state" in errors[0], log[-3000:]
    print(f"victim {victim}; late peer exit {code}; loaded {loaded}")


def timeouts_bound() -> float:
    """The longest the late peer may take: the state download's bound plus start-up and one epoch."""
    from peer import timeouts

    return timeouts.STATE_DOWNLOAD + 120


def test_a_downloaded_state_is_checked_before_use():
    """What a donor sends is refused when its epoch, count, shapes or values are wrong."""
    from types import SimpleNamespace

    import torch

    from peer.state_download import check_state

    weight, bias = torch.zeros(3, 2), torch.zeros(3)
    averager = SimpleNamespace(local_epoch=4, extra_tensors=(),
                               optimizer=SimpleNamespace(param_groups=[{"params": [weight, bias]}]))
    good = {"epoch": 5, "optimizer_metadata": []}
    assert check_state(averager, (good, [torch.ones(3, 2), torch.ones(3), torch.ones(1)])) is None
    assert "behind" in check_state(averager, ({**good, "epoch": 3}, [torch.ones(3, 2), torch.ones(3)]))
    assert "no epoch" in check_state(averager, ({"optimizer_metadata": []}, [torch.ones(3, 2), torch.ones(3)]))
    assert "tensors" in check_state(averager, (good, [torch.ones(3, 2)]))
    assert "shape" in check_state(averager, (good, [torch.ones(1), torch.ones(3)]))  # would broadcast on copy_
    assert "non-finite" in check_state(averager, (good, [torch.ones(3, 2), torch.tensor([1.0, float("nan"), 0.0])]))


def test_no_donor_left_ends_with_one_error_line(procs, tmp_path):
    """The only donor dies mid-transfer: after the (shortened) bound the late peer says so and leaves."""
    from conftest import epochs_reported

    coordinator = start_coordinator(procs, tmp_path / "c", write_run(tmp_path / "run.toml", epochs=0, min_peers=1))  # no end: the lone donor must still run when the late peer arrives
    donor = slow_donor(procs, coordinator, tmp_path / "d1")
    wait_until(lambda: len(epochs_reported(tmp_path / "d1")) >= 2, 120, "the donor to finish 2 epochs")
    asked = time.time()
    data_dir = tmp_path / "late"
    data_dir.mkdir()
    late = Proc([sys.executable, "-m", "tests.variants.impatient_peer", "join", coordinator.address, "--token",
                 coordinator.token, *pin(coordinator.address), "--data-dir", str(data_dir), "--threads", "1",
                 "--progress", "plain"], tmp_path / "late.log")
    procs.append(late)
    # the late peer must ask the donor; if it ends or trains instead, its log says why
    wait_until(lambda: serving_since(tmp_path / "d1", asked) or late.popen.poll() is not None
               or epochs_reported(data_dir), 120, "the donor to start sending its state")
    assert serving_since(tmp_path / "d1", asked), f"the late peer never asked the donor:\n{late.log()[-3000:]}"
    donor.kill()
    assert late.wait(20 + 120) == 2, late.log()[-3000:]
    log = late.log()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not load the swarm's state within 20s" in errors[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    late_peer = next(p for p in coordinator.status()["peers"] if p["id"] != donor_id(tmp_path / "d1"))
    assert not late_peer["alive"], "the peer that gave up still shows alive"


def donor_id(data_dir) -> str:
    from conftest import events

    return next(event["peer_id"] for event in events(data_dir) if event["event"] == "joined")


def test_backoff_is_jittered_doubling_and_capped():
    from peer import timeouts

    for attempt in range(8):
        waits = {timeouts.backoff(attempt, 0.5, 10.0) for _ in range(50)}
        most = min(0.5 * 2 ** attempt, 10.0)
        assert all(most / 2 <= wait <= most for wait in waits) and len(waits) > 1


@pytest.mark.slow
def test_bootstrap_retries_then_starts_or_gives_up_with_one_error():
    import pytest

    from peer.bootstrap import start_with_retry
    from peer.errors import UserError

    said, tries = [], []

    def flaky():
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeError("DHTNode bootstrap failed: none of the initial_peers responded to a ping.")
        return "dht"

    assert start_with_retry(flaky, "/ip4/x", said.append, bound=30) == "dht"
    assert len(said) == 2 and all("waiting for the swarm's bootstrap node /ip4/x" in line for line in said)

    def never():
        raise RuntimeError("ControlFailure: Connect failed ... dial backoff")

    with pytest.raises(UserError, match="did not accept this peer within 1s"):
        start_with_retry(never, "/ip4/x", said.append, bound=1)
