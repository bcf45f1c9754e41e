"""A DiLoCo run is checkpointed (anchor + outer momentum) and resumed after every peer died.

Real coordinator (its observer writes the checkpoint) and real `peer join` processes. Two peers
train until a checkpoint exists, both are killed, two new peers resume: the first from the
checkpoint (no peer left), the second from the first's state; they average together and end with
equal parameters. What a resumed run loses: each old peer's local progress since its last round.
"""

from __future__ import annotations

import signal

import torch

from conftest import events, load_model, start_coordinator, start_peer, wait_until, write_run
from coordinator.checkpoints import list_checkpoints, load_training_state
from peer.checkpoint import MOMENTUM_PREFIX, state_fingerprint

PEER_EXIT = 150


def test_a_diloco_run_resumes_from_its_checkpoint_with_equal_peers(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=0, strategy="diloco", inner_steps=4, matchmaking_time=1.0,
                    every=2, keep=2, heartbeat_interval=0.5, peer_timeout=3.0)
    data_dir = tmp_path / "c"
    coordinator = start_coordinator(procs, data_dir, run)
    first = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("a", "b")]
    wait_until(lambda: list_checkpoints(data_dir), 150, "a DiLoCo checkpoint")
    for peer in first:
        peer.signal_group(signal.SIGKILL)
        peer.wait(10)
    latest = list_checkpoints(data_dir)[0]
    assert latest.holds == "anchor + outer momentum", latest
    saved = load_training_state(data_dir, latest)
    assert saved.strategy == "diloco" and any(m.abs().sum() > 0 for m in saved.momentum.values())
    wait_until(lambda: not any(p["alive"] for p in coordinator.status()["peers"]), 30, "the dead peers to time out")

    resumed = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "c1", "--max-epochs", "2")
    # the second joins once the first holds the checkpoint's state (it then loads it from the first)
    wait_until(lambda: any(e["event"] == "checkpoint_loaded" for e in events(tmp_path / "c1")), 60,
               "the first new peer to load the checkpoint")
    joiner = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "c2", "--max-epochs", "2")
    for peer in (resumed, joiner):
        assert peer.wait(PEER_EXIT) == 0, peer.log()[-3000:]

    [loaded] = [e for e in events(tmp_path / "c1") if e["event"] == "checkpoint_loaded"]
    assert loaded["epoch"] == latest.epoch and loaded["sha256"] == latest.sha256
    # the outer momentum the peer holds after the restore is the checkpoint's, bit for bit
    assert loaded["restored_fingerprint"] == state_fingerprint(
        {f"{MOMENTUM_PREFIX}{name}": m for name, m in saved.momentum.items()})
    assert [e["epoch"] for e in events(tmp_path / "c2") if e["event"] == "state_loaded"] == [latest.epoch]
    # both went on from the checkpoint's epoch, averaged together, and ended with the same parameters
    for name in ("c1", "c2"):
        applied = [e for e in events(tmp_path / name) if e["event"] == "round" and e["applied"]]
        assert applied and applied[0]["epoch"] == latest.epoch and applied[0]["group_size"] == 2, applied
    ends = [load_model(tmp_path / name) for name in ("c1", "c2")]
    assert ends[0]["epoch"] == ends[1]["epoch"] > latest.epoch
    assert all(torch.equal(ends[0]["state_dict"][key], ends[1]["state_dict"][key]) for key in ends[0]["state_dict"])
