"""Cheaters in a real swarm: honest peers and cheating variants of the real peer, one coordinator.

Every cheater is tests/cheating_peer.py: the real `peer join` with one function swapped. The
auditor (started by `coordinator serve`) must catch and ban each, forfeit its credit, and leave the
honest peers' credit settled.
"""

from __future__ import annotations

import json
import sys

from conftest import ROOT, Proc, cli, load_model, pin, start_coordinator, start_peer, wait_until, write_run

VERIFY = """
[verification]
snapshot_rate = 1.0
audit_rate_new = 0.5
audit_floor = 2
window_epochs = 2
"""


def start_cheater(procs, coordinator, data_dir, cheat: str) -> Proc:
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = Proc([sys.executable, str(ROOT / "tests" / "cheating_peer.py"), cheat, "join", coordinator.address,
                 "--token", coordinator.token, *pin(coordinator.address), "--data-dir", str(data_dir), "--threads", "1",
                 "--progress", "plain"],
                data_dir.parent / f"{data_dir.name}.log")
    procs.append(proc)
    return proc


def credit_rows(coordinator) -> dict:
    result = cli("coordinator", "ledger", "--data-dir", str(coordinator.data_dir), "--format", "json")
    assert result.returncode == 0, result.stderr
    return {row["peer"]: row for row in json.loads(result.stdout)}


def peer_id(data_dir) -> str:
    return cli("peer", "id", "--data-dir", str(data_dir)).stdout.strip()


def test_cheaters_are_caught_in_a_real_swarm(procs, tmp_path):
    run = write_run(tmp_path / "run.toml", epochs=5, target_batch_size=1024)
    run.write_text(run.read_text() + VERIFY)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    honest = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("h1", "h2")]
    # sign flip, stale parameters and the rest are caught at replay level (tests/test_verification.py);
    # here the cheats that need the swarm or the real service path, with few enough peers for 2 cores
    cheats = ["free_rider", "forged", "epoch_lie"]
    cheaters = {cheat: start_cheater(procs, coordinator, tmp_path / cheat, cheat) for cheat in cheats}
    for peer in honest:
        assert peer.wait(300) == 0, peer.log()
    ids = {name: peer_id(tmp_path / name) for name in ["h1", "h2", *cheats]}

    def settled():
        rows = credit_rows(coordinator)
        return rows if all(rows.get(ids[n], {}).get("samples_settled", 0) > 0 for n in ("h1", "h2")) and \
            all(rows.get(ids[c], {}).get("banned") for c in cheats) else None

    rows = wait_until(settled, 90, "honest credit settled and every cheater banned")
    print(json.dumps(rows, indent=1))
    for name in ("h1", "h2"):
        row = rows[ids[name]]
        print(name, {k: row[k] for k in ("samples_provisional", "samples_settled", "samples_unverified",
                                         "audits_passed", "audits_inconclusive")},
              [(w["window"], w["state"], w["audited"], w["micro_batches"], w["confidence"]) for w in row["windows"]])
        assert row["audits_failed"] == 0 and row["strikes"] == 0 and not row["banned"], row
        assert row["audits_passed"] > 0
        # settled windows reached the confidence rule
        assert all(w["confidence"] >= 0.99 for w in row["windows"] if w["state"] == "settled"), row["windows"]
    for cheat in cheats:
        row = rows[ids[cheat]]
        assert row["banned"] and row["samples_settled"] == 0 and row["samples_provisional"] == 0, (cheat, row)
    assert "epoch lie" in rows[ids["epoch_lie"]]["ban_reason"]
    # a ban reaches the token that admitted the cheater (here the default org's, which everyone used:
    # the honest peers stay admitted, new identities need a new token) and strikes its org
    orgs = json.loads(cli("coordinator", "org", "list", "--data-dir", str(coordinator.data_dir), "--format",
                          "json").stdout)
    assert {o["name"]: o["strikes"] for o in orgs}["default"] == len(cheats)
    # the swarm recovered from the lie: honest peers finished every epoch, with the same parameters
    assert load_model(tmp_path / "h1")["epoch"] == 5 == load_model(tmp_path / "h2")["epoch"]
    assert cli("coordinator", "ledger", "verify", "--data-dir", str(coordinator.data_dir)).returncode == 0
