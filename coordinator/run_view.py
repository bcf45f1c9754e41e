"""The run as the dashboard, /api/v1/state and /metrics show it: one JSON-ready dict built from the ledger.

It adds to Ledger.snapshot what operators and partners look at: credit and audit status per peer
(coordinator/accounting.py), a per-org leaderboard with shares of the run, the loss and throughput
history per epoch, the latest checkpoint, and recent audits and bans.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.accounting import accounts, recent_audits, recent_bans
from coordinator.checkpoints import latest_checkpoint
from coordinator.ledger import Ledger

HISTORY_EPOCHS = 500  # the charts show at most this many recent epochs


def epoch_history(ledger: Ledger, limit: int = HISTORY_EPOCHS) -> dict[str, list]:
    """Per epoch: sample-weighted training loss, mean held-out accuracy, samples, when it ended, samples/s.

    An epoch ends when its last report arrives; its throughput is its samples over the time since
    the previous epoch ended (the first epoch counts from the first join).
    """
    rows = ledger.query(
        """SELECT epoch, SUM(samples) AS samples, SUM(samples * loss) / MAX(SUM(samples), 1) AS loss,
                  AVG(json_extract(metrics, '$.accuracy')) AS accuracy, MAX(received) AS ended
           FROM reports GROUP BY epoch ORDER BY epoch DESC LIMIT ?""",
        (limit + 1,),
    )[::-1]
    first_join = ledger.query("SELECT MIN(joined) AS t FROM peers")[0]["t"]
    history = {"epoch": [], "loss": [], "accuracy": [], "samples": [], "time": [], "samples_per_second": []}
    previous_end = first_join
    for index, row in enumerate(rows):
        if index == 0 and len(rows) > limit:  # only there to give the next epoch its start time
            previous_end = row["ended"]
            continue
        elapsed = max(row["ended"] - (previous_end if previous_end is not None else row["ended"]), 1e-3)
        history["epoch"].append(row["epoch"])
        history["loss"].append(row["loss"])
        history["accuracy"].append(row["accuracy"])
        history["samples"].append(row["samples"])
        history["time"].append(round(row["ended"], 3))
        history["samples_per_second"].append(round(row["samples"] / elapsed, 2))
        previous_end = row["ended"]
    return history


def run_state(ledger: Ledger, peer_timeout: float, data_dir: Path | None = None) -> dict:
    """Everything the dashboard shows, JSON-ready."""
    state = ledger.snapshot(peer_timeout)
    books = accounts(ledger.query)
    for peer in state["peers"]:
        account = books.get(peer["id"])
        peer.update(account.as_dict() if account else {"credit": float(peer["samples"]), "credit_verified": False,
                                                        "audits_passed": 0, "audits_failed": 0, "audits_pending": 0,
                                                        "banned": False, "audit_status": "not audited"})
    total_credit = sum(peer["credit"] for peer in state["peers"]) or 0.0
    for org in state["orgs"]:
        members = [peer for peer in state["peers"] if peer["org"] == org["name"]]
        org["live_peers"] = sum(peer["alive"] for peer in members)
        org["credit"] = sum(peer["credit"] for peer in members)
        org["share"] = org["credit"] / total_credit if total_credit else 0.0
    state["orgs"].sort(key=lambda org: (-org["credit"], org["name"]))
    state["live_peers"] = sum(peer["alive"] for peer in state["peers"])
    state["credit_verified"] = any(peer["credit_verified"] for peer in state["peers"])
    state["history"] = epoch_history(ledger)
    checkpoint = latest_checkpoint(data_dir) if data_dir is not None else None
    state["checkpoint"] = None if checkpoint is None else {
        "epoch": checkpoint.epoch, "sha256": checkpoint.sha256, "bytes": checkpoint.bytes, "created": checkpoint.created,
    }
    state["audits"] = recent_audits(ledger.query)
    state["bans"] = recent_bans(ledger.query)
    state["generated"] = time.time()
    return state
