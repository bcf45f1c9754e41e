"""The soak's figures, from what the peers and the coordinator left on disk (pure functions, so the
definitions are tested by hand-made inputs).

- goodput: samples of the peers' ``epoch`` events (a report is emitted only once a round put its
  work into the model) inside the measured window, per second, counting only epochs whose work was
  combined with at least one other peer (``peers`` >= 2): a peer cut off from the swarm that trains
  alone grows a fork, not the swarm's model (its samples are counted apart, ``solo_samples``);
- longest wait: the longest stretch a peer went without any event (joined, started, epoch, round,
  state_loaded, finished), less the compute of the epochs that closed it; a peer that stopped
  writing events counts until it was killed or stopped, so a hang shows;
- final loss: the median held-out loss of the peers alive at the end (their ``finished`` event,
  else their last epoch's);
- acknowledged reports lost: ids a peer's outbox holds as acknowledged (without error) that the
  ledger's reports table lacks.
"""

from __future__ import annotations

import sqlite3
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class PeerLog:
    name: str
    events: list[dict]
    ended_at: float | None  # when the harness killed or stopped it (None: still running)
    killed: bool = False  # SIGKILLed by the schedule (not alive at the end)


def window_samples(peers: list[PeerLog], start: float, end: float, solo: bool = False) -> int:
    """Samples reported inside [start, end] by epochs combined with others (solo: by epochs alone)."""
    return sum(e.get("samples", 0) for p in peers for e in p.events
               if e["event"] == "epoch" and start <= e["time"] <= end and (e.get("peers", 2) < 2) == solo)


def goodput(peers: list[PeerLog], start: float, end: float) -> float:
    return window_samples(peers, start, end) / max(end - start, 1e-9)


def longest_wait(peers: list[PeerLog], since: float) -> dict:
    """{"seconds", "peer", "after", "before"} of the longest wait that ended after ``since``."""
    best = {"seconds": 0.0, "peer": None, "after": None, "before": None}
    for peer in peers:
        events = sorted(peer.events, key=lambda e: e["time"])
        if not events:
            continue
        marks = [(e["time"], e["event"]) for e in events]
        finished = any(e["event"] == "finished" for e in events)
        if peer.ended_at is not None and not finished and peer.ended_at > marks[-1][0]:
            marks.append((peer.ended_at, "killed" if peer.killed else "stopped"))
        epochs = [(e["time"], e.get("compute_seconds") or 0.0) for e in events if e["event"] == "epoch"]
        for (t_a, a), (t_b, b) in zip(marks, marks[1:]):
            if t_b <= since:
                continue
            # the compute of the epochs reported at (or just after) the end of this stretch
            compute = sum(c for t, c in epochs if t_a < t <= t_b + 1.0)
            wait = max(t_b - t_a - compute, 0.0)
            if wait > best["seconds"]:
                best = {"seconds": round(wait, 2), "peer": peer.name, "after": a, "before": b}
    return best


def final_loss(peers: list[PeerLog]) -> float | None:
    losses = []
    for peer in peers:
        if peer.killed:
            continue
        finished = [e for e in peer.events if e["event"] == "finished" and e.get("samples")]
        epochs = [e for e in peer.events if e["event"] == "epoch"]
        source = finished[-1] if finished else (epochs[-1] if epochs else None)
        loss = (source or {}).get("metrics", {}).get("loss")
        if loss is not None:
            losses.append(loss)
    return statistics.median(losses) if losses else None


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 3)


def acknowledged_ids(data_dir: Path) -> set[str]:
    """Report ids this peer's outbox holds as acknowledged by the coordinator (no error)."""
    path = Path(data_dir) / "outbox.sqlite"
    if not path.exists():
        return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT report_id FROM outbox WHERE acked IS NOT NULL AND error IS NULL")}
    finally:
        db.close()


def outbox_counts(data_dir: Path) -> dict:
    """pending / acknowledged / rejected reports of one peer's outbox."""
    path = Path(data_dir) / "outbox.sqlite"
    if not path.exists():
        return {"pending": 0, "acknowledged": 0, "rejected": 0}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT SUM(acked IS NULL), SUM(acked IS NOT NULL AND error IS NULL), "
                         "SUM(error IS NOT NULL) FROM outbox").fetchone()
        return {"pending": row[0] or 0, "acknowledged": row[1] or 0, "rejected": row[2] or 0}
    finally:
        db.close()


def ledger_report_ids(ledger: Path) -> set[str]:
    if not Path(ledger).exists():
        return set()
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT report_id FROM reports")}
    finally:
        db.close()


def compute_by_report(ledger: Path) -> dict[str, float]:
    if not Path(ledger).exists():
        return {}
    db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        return dict(db.execute("SELECT report_id, compute_seconds FROM reports"))
    finally:
        db.close()
