"""The run as the dashboard, /api/v1/state and /metrics show it: one JSON-ready dict built from the ledger.

It adds to Ledger.snapshot what operators and partners look at: each peer's account (credit settled
and pending, audit status: coordinator/books/accounting.py), a per-org leaderboard with shares of the
run, the loss and throughput history per epoch, the latest checkpoint, and recent audits and bans.
"""

from __future__ import annotations

import time
from pathlib import Path

from coordinator.books import views
from coordinator.books.accounting import Account
from coordinator.books.ledger import Ledger
from coordinator.checkpoints import last_failure, latest_checkpoint

HISTORY_EPOCHS = 500  # the charts show at most this many recent epochs
THROUGHPUT_WINDOW = 5  # epochs averaged into one throughput point


def epoch_history(ledger: Ledger, limit: int = HISTORY_EPOCHS) -> dict[str, list]:
    """Per epoch: sample-weighted training loss, mean held-out accuracy, samples, when it ended, samples/s.

    An epoch ends when its last report arrives (never before the previous epoch's end). Reports can
    arrive in bursts (a peer flushes its outbox after a delay), so throughput is a moving average:
    the samples of the last THROUGHPUT_WINDOW epochs over the time they took (from the first join
    for the first epochs).
    """
    rows = views.epoch_totals(ledger, limit + THROUGHPUT_WINDOW)
    first_join = views.first_join(ledger)
    ends: list[float] = []
    for row in rows:
        ends.append(max(row["ended"], ends[-1]) if ends else row["ended"])
    history = {"epoch": [], "loss": [], "accuracy": [], "samples": [], "time": [], "samples_per_second": []}
    skipped = max(len(rows) - limit, 0)  # the oldest rows only give the window its start
    for index, row in enumerate(rows):
        if index < skipped:
            continue
        start = index - THROUGHPUT_WINDOW
        began = ends[start] if start >= 0 else (first_join if first_join is not None else ends[0])
        window_samples = sum(r["samples"] for r in rows[max(start + 1, 0):index + 1])
        history["epoch"].append(row["epoch"])
        history["loss"].append(row["loss"])
        history["accuracy"].append(row["accuracy"])
        history["samples"].append(row["samples"])
        history["time"].append(round(ends[index], 3))
        history["samples_per_second"].append(round(window_samples / max(ends[index] - began, 1e-3), 2))
    return history


def with_accounts(ledger: Ledger, state: dict) -> dict:
    """Ledger.snapshot's state with each peer's account (credit settled and pending, audits) added."""
    books = ledger.accounts()
    for peer in state["peers"]:  # every peer in the snapshot has an account (both read the peers table)
        peer.update(books.get(peer["id"], Account()).as_dict())
    return state


def run_state(ledger: Ledger, peer_timeout: float, data_dir: Path | None = None) -> dict:
    """Everything the dashboard shows, JSON-ready."""
    state = with_accounts(ledger, ledger.snapshot(peer_timeout))
    total_credit = sum(peer["credit"] for peer in state["peers"]) or 0.0
    total_samples = sum(peer["samples"] for peer in state["peers"]) or 0
    for org in state["orgs"]:
        members = [peer for peer in state["peers"] if peer["org"] == org["name"]]
        org["live_peers"] = sum(peer["alive"] for peer in members)
        org["credit"] = sum(peer["credit"] for peer in members)
        # shares follow credit (settled and pending); reported samples while nobody has any (no report checked)
        if total_credit:
            org["share"] = org["credit"] / total_credit
        else:
            org["share"] = org["samples"] / total_samples if total_samples else 0.0
    state["orgs"].sort(key=lambda org: (-org["credit"], org["name"]))
    state["live_peers"] = sum(peer["alive"] for peer in state["peers"])
    state["credit_verified"] = bool(state["peers"]) and all(peer["credit_verified"] for peer in state["peers"])
    state["history"] = epoch_history(ledger)
    checkpoint = latest_checkpoint(data_dir) if data_dir is not None else None
    state["checkpoint"] = None if checkpoint is None else {
        "epoch": checkpoint.epoch, "sha256": checkpoint.sha256, "bytes": checkpoint.bytes, "created": checkpoint.created,
    }
    # a failed checkpoint not yet followed by a saved one: the dashboard shows it as an alert
    state["checkpoint_failure"] = last_failure(data_dir) if data_dir is not None else None
    state["audits"] = ledger.recent_audits()
    state["bans"] = ledger.recent_bans()
    state["generated"] = time.time()
    return state
