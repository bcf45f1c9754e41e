"""Admission in a live swarm: eviction from coordinator and swarm, a rogue peer, a token-less DHT process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import (
    ROOT, Proc, cli, epochs_reported, events, pin, start_coordinator, start_peer, wait_until, write_run,
)
from coordinator.books.ledger import Ledger
from peer.attestations import read_records

PEER_EXIT = 240


def stranger_reads(initial_peer: str, key: str, *coordinator_dir: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "tests.variants.stranger_dht", initial_peer, key, *coordinator_dir],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"stranger_dht printed nothing:\n{result.stdout}\n{result.stderr[-3000:]}"
    return json.loads(lines[-1])


def token_id_of(coordinator, org: str) -> str:
    listed = json.loads(cli("coordinator", "token", "list", "--data-dir", str(coordinator.data_dir),
                            "--format", "json").stdout)
    return [t["id"] for t in listed if t["org"] == org][-1]


def test_eviction_reaches_coordinator_and_swarm(procs, tmp_path):
    # no end: the peers train until stopped; min_peers = 1 so that the cut-off rogue (and the honest peer
    # left alone) may go on training rather than wait for company (tests/test_company.py)
    run = write_run(tmp_path / "run.toml", epochs=0, min_peers=1)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    info = json.loads((coordinator.data_dir / "coordinator.json").read_text())
    partner_token, rogue_token = coordinator.issue_token("partner"), coordinator.issue_token("rogue")
    honest = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "honest")
    partner = start_peer(procs, coordinator.address, partner_token, tmp_path / "partner")
    rogue = Proc(
        [sys.executable, "-m", "tests.variants.rogue_peer", "join", coordinator.address, "--token", rogue_token,
         *pin(coordinator.address), "--data-dir", str(tmp_path / "rogue"), "--threads", "1", "--progress", "plain"],
        tmp_path / "rogue.log",
    )
    procs.append(rogue)
    wait_until(lambda: len(epochs_reported(tmp_path / "rogue")) >= 2 and len(epochs_reported(tmp_path / "honest")) >= 2,
               120, "all peers to train two epochs together")

    # a process without an access token learns nothing from the swarm's DHT; one with a token does
    key = "digits-demo_state_averager.all_averagers"  # where peers announce that they share state
    assert stranger_reads(info["dht_maddrs"][0], key, str(coordinator.data_dir)) == {"started": True, "found": True}
    assert stranger_reads(info["dht_maddrs"][0], key).get("found") is not True

    # revoke the rogue's token: the coordinator refuses it at once, the honest peers deny it in the swarm
    revoked = cli("coordinator", "token", "revoke", token_id_of(coordinator, "rogue"),
                  "--data-dir", str(coordinator.data_dir))
    assert revoked.returncode == 0 and "1 peer(s) evicted" in revoked.stdout, revoked.stdout + revoked.stderr
    rogue_swarm_id = (tmp_path / "rogue" / "swarm_identity.key").exists() and _swarm_id(tmp_path / "rogue")
    bound = 2 * 2.0 + 2  # two heartbeat intervals plus slack: the documented eviction bound
    wait_until(lambda: rogue_swarm_id in _deny_list(tmp_path / "honest"), bound * 3,
               "the honest peer to deny the evicted rogue in the swarm")

    # removing an org evicts its (well-behaved) peer: it stops and says why
    removed = cli("coordinator", "org", "remove", "partner", "--data-dir", str(coordinator.data_dir))
    assert removed.returncode == 0 and "1 peer(s) evicted" in removed.stdout, removed.stdout + removed.stderr
    assert partner.wait(PEER_EXIT) == 3, partner.log()[-3000:]
    assert "evicted from the run" in partner.log()

    # the rogue is cut off: once the honest peer denies it, no round of the honest peer includes it
    # (its attestation records name every sender and reducer of each round it averaged)
    cut_off = time.time()
    wait_until(lambda: sum(1 for e in events(tmp_path / "honest") if e["event"] == "epoch" and e["time"] > cut_off) >= 2,
               120, "the honest peer to train on after the eviction")
    late_rounds = [r for r in read_records(tmp_path / "honest") if r.get("time", 0) > cut_off]
    assert not any(rogue_swarm_id in (r.get("sender"), r.get("reducer")) for r in late_rounds), late_rounds[:3]
    for proc in (honest, rogue):
        proc.popen.send_signal(signal.SIGTERM)
    assert honest.wait(PEER_EXIT) == 0, honest.log()[-3000:]
    rogue.wait(PEER_EXIT)
    state = Ledger.open_existing(coordinator.data_dir).snapshot(60)
    by_org = {p["org"]: p for p in state["peers"]}
    assert by_org["rogue"]["evicted"] and by_org["partner"]["evicted"] and not by_org["default"]["evicted"]
    assert by_org["rogue"]["reports"] < len(epochs_reported(tmp_path / "rogue")), \
        "the rogue's reports after its eviction must be refused"


def _last_peer_count(data_dir) -> int | None:
    from conftest import events

    counts = [e["peers"] for e in events(data_dir) if e["event"] == "epoch"]
    return counts[-1] if counts else None


def _swarm_id(data_dir) -> str:
    from peer.swarm import swarm_peer_id

    return swarm_peer_id(data_dir)


def _deny_list(data_dir) -> list[str]:
    try:
        return json.loads((data_dir / "swarm_access.json").read_text())["deny"]
    except (FileNotFoundError, json.JSONDecodeError):
        return []
