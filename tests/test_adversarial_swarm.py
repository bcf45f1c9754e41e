"""Admitted peers that cheat on what the swarm believes, in a real swarm (CLI processes, TLS, auditor).

Each attacker is tests/cheating_peer.py: the real `peer join` with one of its own functions swapped
from outside. Each test shows the attack made harmless and the honest peers unharmed.
"""

from __future__ import annotations

import statistics

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
