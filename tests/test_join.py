"""Joining under churn: admission is in effect before the Join reply, and every wait is bounded."""

from __future__ import annotations

import json
import sys
import time

from conftest import Proc, pin, start_coordinator, wait_until, write_run

JOINS = 20
JOIN_EXIT = 120  # seconds one join (with its bounded bootstrap retries) may take
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
            assert results[index]["stored"] and results[index]["seen"] >= 1, results[index]
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
