"""`coordinator serve --store postgresql://...` with real processes: a peer joins, trains and reports, and
every table it touched is in the PostgreSQL database (the auditor writes there too); the data dir holds
keys and checkpoints but no ledger file. The server comes from tests/postgres.py (skips without binaries).
Two serve processes on one database (scale-out) are not tested yet."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import cli, epochs_reported, start_coordinator, start_peer, wait_until, write_run  # noqa: E402
from postgres import postgres_server, postgres_url  # noqa: E402,F401  (fixtures)

pytestmark = pytest.mark.swarm
PEER_EXIT = 180


def test_a_peer_joins_and_reports_to_a_coordinator_on_postgresql(procs, tmp_path, postgres_url):
    run = write_run(tmp_path / "run.toml", epochs=2, min_peers=1, every=0, target_batch_size=256)
    data_dir = tmp_path / "c"
    coordinator = start_coordinator(procs, data_dir, run, extra=("--store", postgres_url))
    assert "new ledger postgresql://" in coordinator.proc.log()
    peer = start_peer(procs, coordinator.address, coordinator.token, tmp_path / "p")
    assert peer.wait(PEER_EXIT) == 0, peer.log()
    assert epochs_reported(tmp_path / "p") == [0, 1]

    store = ["--store", postgres_url, "--data-dir", str(data_dir)]
    state = json.loads(cli("coordinator", "status", "--format", "json", *store).stdout)
    assert state["epoch"] == 2 and [p["reports"] for p in state["peers"]] == [2]
    # the credit tables (serve's cheap checks) and the auditor's verdicts are in the database too
    rows = wait_until(lambda: [r for r in json.loads(cli("coordinator", "ledger", "--format", "json", *store).stdout)
                               if r["audits_passed"] + r["audits_failed"] > 0], 120, "the auditor's first verdict")
    assert rows[0]["audits_failed"] == 0 and not rows[0]["banned"]
    verified = cli("coordinator", "ledger", "verify", *store)
    assert verified.returncode == 0 and "intact" in verified.stdout
    assert not (data_dir / "ledger.sqlite").exists() and not (data_dir / "nonces.sqlite").exists()
