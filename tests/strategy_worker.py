"""One DiLoCo peer for tests/test_strategies.py, run as its own OS process.

    python tests/strategy_worker.py ROLE WORKDIR CODEC ROUNDS WIDTH

Peer "a" starts the swarm and writes its address to WORKDIR/a.maddrs; peer "b" joins it. Each
sets its model to anchor - delta(ROLE, round), a known pseudo-gradient, runs ROUNDS rounds and
writes anchor, momentum, the averaged pseudo-gradient and each round's outcome to WORKDIR/ROLE.json,
then serves its state until WORKDIR/done exists. A peer "late" joins afterwards, downloads the
state from them and writes what it got to WORKDIR/late.json. A peer "alone" has no partner: it
sends delta("a", 0) in every round, and every round fails.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DIGITS_RUN = Path(__file__).resolve().parents[1] / "examples" / "digits" / "run.toml"


def join_swarm(role: str, workdir: Path):
    """Member "a" starts the DHT and writes its addresses to WORKDIR/a.maddrs; the others join it."""
    import hivemind

    if role == "a":
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        (workdir / "a.maddrs.tmp").write_text(json.dumps([str(m) for m in dht.get_visible_maddrs()]))
        (workdir / "a.maddrs.tmp").rename(workdir / "a.maddrs")
        return dht
    while not (workdir / "a.maddrs").exists():
        time.sleep(0.1)
    peers = json.loads((workdir / "a.maddrs").read_text())
    return hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=peers, start=True)


def wait_for_done(workdir: Path, timeout: float = 60.0) -> None:
    """Keep serving (state, parts) until the test writes WORKDIR/done, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not (workdir / "done").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def wait_for_members(role: str, workdir: Path, count: int, timeout: float = 120.0) -> None:
    """Members start their first round together: on a loaded machine one process can take longer
    than a whole averaging window to import torch and start its averagers."""
    (workdir / f"{role}.ready").touch()
    deadline = time.monotonic() + timeout
    while len(list(workdir.glob("*.ready"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def known_delta(role: str, round_index: int, shapes) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(ord(role) * 100 + round_index)
    return [torch.randn(shape, generator=generator) * 0.01 for shape in shapes]


def tiny_model(width: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(width, width)


def main(role: str, workdir: Path, codec: str, rounds: int, width: int) -> None:
    torch.set_num_threads(1)
    from peer.diloco import DiLoCo
    from peer.runconfig import parse_run_config
    from peer.swarm import use_fork_start_method

    use_fork_start_method()
    text = DIGITS_RUN.read_text().split("[averaging]")[0]
    text += f'[averaging]\nstrategy = "diloco"\ncompression = "{codec}"\n'
    text = text.replace("matchmaking_time = 2.0", "matchmaking_time = 1.0")
    if role == "alone":  # no partner: every round fails, soon
        text = text.replace("averaging_timeout = 20.0", "averaging_timeout = 2.0")
    config = parse_run_config(text)
    dht = join_swarm("a" if role == "alone" else role, workdir)
    model = tiny_model(width)
    diloco = DiLoCo(dht, config, model, prefix="strategytest")
    if role == "late":
        loaded = diloco.load_state_from_peers(timeout=30)
        result = {"loaded": loaded, "epoch": diloco.epoch, "anchor": [a.tolist() for a in diloco.anchor],
                  "momentum": [m.tolist() for m in diloco.momentum], "model": [p.tolist() for p in model.parameters()]}
        (workdir / "late.json").write_text(json.dumps(result))
        (workdir / "done").touch()
        diloco.shutdown()
        dht.shutdown()
        return
    if role in ("a", "b"):
        wait_for_members(role, workdir, 2)
    result = {"rounds": []}
    shapes = [p.shape for p in model.parameters()]
    for round_index in range(rounds):
        with torch.no_grad():
            deltas = known_delta("a", 0, shapes) if role == "alone" else known_delta(role, round_index, shapes)
            for param, anchor, delta in zip(model.parameters(), diloco.anchor, deltas):
                param.copy_(anchor - delta)
        diloco.launch_round(expected_group=2)
        outcome = diloco.complete_round(final=round_index == rounds - 1 and rounds > 1)
        result["rounds"].append({
            "applied": outcome.applied, "group_size": outcome.group_size, "reason": outcome.reason,
            "resynced": outcome.resynced, "epoch": diloco.epoch,
            "mean_delta": [d.tolist() for d in diloco.deltas],
            "residual": None if diloco.feedback is None else [r.tolist() for r in diloco.feedback.residual],
            "payload_bytes": outcome.payload_bytes,
        })
    result["anchor"] = [a.tolist() for a in diloco.anchor]
    result["momentum"] = [m.tolist() for m in diloco.momentum]
    result["model"] = [p.tolist() for p in model.parameters()]
    (workdir / f"{role}.json").write_text(json.dumps(result))
    wait_for_done(workdir)
    diloco.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
