"""Admitted peers that cheat on what the swarm believes, in a real swarm (CLI processes, TLS, auditor).

Each attacker is tests/cheating_peer.py: the real `peer join` with one of its own functions swapped
from outside. Each test shows the attack made harmless and the honest peers unharmed.
"""

from __future__ import annotations

import statistics

import pytest

from conftest import epochs_reported, events, load_model, start_coordinator, start_peer, wait_until, write_run
from test_cheaters_swarm import start_cheater

TARGET = 768


def test_progress_liar_cannot_shorten_the_epochs(procs, tmp_path):
    """A peer claiming the whole target batch at a huge rate (inside the epoch slack) would make every
    peer step after one micro-batch; its records count for one fair share, so epochs keep their size."""
    run = write_run(tmp_path / "run.toml", epochs=4, target_batch_size=TARGET, min_peers=2)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    honest = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("h1", "h2")]
    start_cheater(procs, coordinator, tmp_path / "liar", "progress_lie")
    for peer in honest:
        assert peer.wait(400) == 0, peer.log()
    per_epoch = [e["samples"] for name in ("h1", "h2") for e in events(tmp_path / name) if e["event"] == "epoch"]
    print("honest samples per epoch:", per_epoch)
    # a fair share of one epoch is TARGET / 3 = 256 samples; one micro-batch is 32
    assert statistics.median(per_epoch) >= TARGET / 3 / 2, per_epoch
    assert epochs_reported(tmp_path / "h1")[-1] == epochs_reported(tmp_path / "h2")[-1] == 3
    first, second = load_model(tmp_path / "h1"), load_model(tmp_path / "h2")
    assert first["epoch"] == second["epoch"] == 4


def binding_checks(coordinator) -> list[dict]:
    import sqlite3

    db = sqlite3.connect(f"file:{coordinator.data_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in db.execute("SELECT * FROM binding_checks")]
    finally:
        db.close()


@pytest.mark.timeout(600)  # the waits below: the ban, then each honest peer's exit (CI once took over 300 s)
def test_a_poisoner_with_honest_reports_is_bound_to_what_it_averaged(procs, tmp_path):
    """The poisoner (tests/variants/poisoning_peer.py) sends sign-flipped x10 gradients into the
    all-reduce while its reports describe its honest work. Its own averager's records of what it sent
    contradict its report: the coordinator's binding check fails it and bans it; every honest peer
    passes the same check, keeps its credit and is never struck."""
    import sys

    from conftest import Proc, pin
    from test_cheaters_swarm import credit_rows, peer_id

    # min_peers waits at every round (issue 14): 3, so the honest peers go on once the poisoner is banned;
    # the poisoner starts first, so it is in the swarm from the first round
    run = write_run(tmp_path / "run.toml", epochs=6, min_peers=3)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    names = ("h1", "h2", "h3")
    (tmp_path / "bad").mkdir()
    procs.append(Proc([sys.executable, "-m", "tests.variants.poisoning_peer", "join", coordinator.address,
                       "--token", coordinator.token, *pin(coordinator.address), "--data-dir", str(tmp_path / "bad"),
                       "--threads", "1", "--progress", "plain"], tmp_path / "bad.log"))
    honest = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in names]
    ids = {name: peer_id(tmp_path / name) for name in (*names, "bad")}
    wait_until(lambda: credit_rows(coordinator).get(ids["bad"], {}).get("banned"), 240, "the poisoner banned")
    for peer in honest:
        assert peer.wait(240) == 0, peer.log()[-3000:]
    checks = binding_checks(coordinator)
    own = [c for c in checks if c["check_kind"] == "own_report"] or checks
    print({(c["check_kind"], c["verdict"]) for c in checks})
    rows = credit_rows(coordinator)
    for name in names:
        row = rows[ids[name]]
        assert row["strikes"] == 0 and not row["banned"] and row["audits_failed"] == 0, (name, row)
    assert not any(c["verdict"] == "fail" and c["subject"] != ids["bad"] for c in checks), checks
    assert any(c["verdict"] == "pass" for c in own), checks
    bad = rows[ids["bad"]]
    assert bad["banned"] and bad["samples_settled"] == 0 and bad["samples_provisional"] == 0, bad
