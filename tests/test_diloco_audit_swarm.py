"""DiLoCo audited in a real swarm: two DiLoCo peers via the CLI, `coordinator serve` with its auditor.

The auditor downloads the swarm's anchors from the DiLoCo state averager, matches each report to one
by fingerprint, replays chosen inner steps, and settles the honest peers' windows.
"""

from __future__ import annotations

import signal

from conftest import cli, start_coordinator, start_peer, wait_until, write_run
from test_cheaters_swarm import VERIFY, credit_rows, peer_id


def test_honest_diloco_credit_settles_in_a_real_swarm(procs, tmp_path):
    # no end: DiLoCo rounds on digits take well under a second here, faster than the auditor's poll and
    # download on a loaded machine, so it catches only some anchors; the peers train until a window past
    # the first (window 0 is settled from the initial parameters alone) settles from a downloaded anchor
    run = write_run(tmp_path / "run.toml", epochs=0, strategy="diloco", inner_steps=8, matchmaking_time=1.0)
    run.write_text(run.read_text() + VERIFY)
    coordinator = start_coordinator(procs, tmp_path / "c", run)
    peers = [start_peer(procs, coordinator.address, coordinator.token, tmp_path / name) for name in ("h1", "h2")]
    ids = {name: peer_id(tmp_path / name) for name in ("h1", "h2")}

    def settled():
        rows = credit_rows(coordinator)
        return rows if all(any(w["window"] > 0 and w["state"] == "settled" for w in rows.get(ids[n], {}).get(
            "windows", [])) for n in ids) else None

    rows = wait_until(settled, 240, "honest DiLoCo credit settled past window 0")
    for peer in peers:
        peer.popen.send_signal(signal.SIGTERM)
    for name in ids:
        row = rows[ids[name]]
        print(name, {k: row[k] for k in ("samples_provisional", "samples_settled", "samples_unverified",
                                         "audits_passed", "audits_inconclusive")},
              [(w["window"], w["state"], w["audited"], w["micro_batches"], w["confidence"]) for w in row["windows"]])
        assert row["audits_failed"] == 0 and row["strikes"] == 0 and not row["banned"], row
        assert row["audits_passed"] > 0 and row["samples_settled"] > 0
        assert all(w["confidence"] >= 0.99 for w in row["windows"] if w["state"] == "settled"), row["windows"]
    assert cli("coordinator", "ledger", "verify", "--data-dir", str(coordinator.data_dir)).returncode == 0
