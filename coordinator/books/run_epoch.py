"""The run's epoch: one definition, from facts the coordinator can check, never from one peer's claim.

A Report saying "I finished epoch e" is one peer's claim. The run counts epoch e as finished only
when a quorum of the *voters* reported e or later:

- voters: peers not evicted and not gone (no Leave, heard from within ``peer_timeout``) that have
  reported at least once (a peer still loading state does not hold the run back);
- quorum: a majority of the voters, and at least ``min_peers`` of them while that many vote;
- and when the voters come from two or more orgs, the supporters must too.

So one liar among several voters cannot move the run past the highest epoch an honest peer
reported, while a lone peer (the only voter) still moves it. The result is stored (``meta``
key ``run_epoch``) and never goes back, so a restart, an eviction or an org's removal cannot undo
it. Every place that means "the run's epoch" reads ``current``: Join and Heartbeat replies and
their ``run_finished``, ``coordinator status``, the dashboard and /metrics (Ledger.snapshot), the
auditor's settlement and epoch-lie check (Credit.run_epoch / plausible_epoch), the observer's
checkpoint cadence.

Speed is bounded too: a report beyond ``run epoch + epoch_slack`` is impossible and refused
(``judge_report``). It is evidence against the peer when it is also a jump no honest peer makes:
more than slack past the run epoch, the epoch after its own last report (accepted, or refused for
now: an honest peer ahead keeps counting, one epoch at a time) and the epoch after the
highest report accepted from anyone. An honest peer that keeps training while the quorum is stalled
moves one epoch at a time, and one that loads another's state lands where that peer was.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from coordinator.books.connection import dialect_of, greatest, put_meta

KEY = "run_epoch"


@dataclass(frozen=True)
class EpochRule:
    min_peers: int
    peer_timeout: float
    slack: int

    @classmethod
    def of(cls, config) -> "EpochRule":
        return cls(config.min_peers, config.peer_timeout, config.verification.epoch_slack)


@dataclass(frozen=True)
class Verdict:
    refused: bool
    evidence: bool
    reason: str = ""


def current(db: sqlite3.Connection) -> int:
    """The run's checked epoch: how many epochs a quorum has finished (0 before any)."""
    row = db.execute("SELECT value FROM meta WHERE key=?", (KEY,)).fetchone()
    return int(row[0]) if row else 0


def reached(voters: list[tuple[str, int]], min_peers: int) -> int:
    """The epoch a quorum of ``voters`` ((org, highest reported epoch) each) has reached; 0 if none."""
    n = len(voters)
    if n == 0:
        return 0
    quorum = max(n // 2 + 1, min(min_peers, n))
    several_orgs = len({org for org, _ in voters}) >= 2
    for epoch in sorted({top for _, top in voters}, reverse=True):
        supporters = [org for org, top in voters if top >= epoch]
        if len(supporters) >= quorum and (not several_orgs or len(set(supporters)) >= 2):
            return epoch + 1
    return 0


def advance(db: sqlite3.Connection, rule: EpochRule, now: float | None = None) -> int:
    """Recompute the run epoch from the ledger's reports (inside the caller's write transaction)."""
    now = time.time() if now is None else now
    # a voter's top: its highest accepted report, or its claim (a report refused for now, within the
    # bounds of judge_report) when higher: a peer that loaded another's state never reports the epochs it
    # skipped, and without its claim a quorum that needs its org would wait for it forever
    voters = [(row[0], row[1]) for row in db.execute(
        f"SELECT org, top FROM (SELECT p.org AS org, {greatest(dialect_of(db))}("
        "COALESCE((SELECT MAX(r.epoch) FROM reports r WHERE r.peer_id = p.peer_id), -1), "
        "COALESCE((SELECT c.epoch FROM epoch_claims c WHERE c.peer_id = p.peer_id), -1)) AS top "
        "FROM peers p WHERE p.evicted IS NULL AND p.left_at IS NULL AND p.last_seen >= ?) AS v WHERE top >= 0",
        (now - rule.peer_timeout,))]
    stored = current(db)
    epoch = max(stored, reached(voters, rule.min_peers))
    if epoch != stored:
        put_meta(db, KEY, str(epoch))
    return epoch


def next_epoch_of(db: sqlite3.Connection, peer_id: str, default: int = 0) -> int:
    """The epoch after the last one ``peer_id`` reported (``default`` before any)."""
    row = db.execute("SELECT MAX(epoch) FROM reports WHERE peer_id=?", (peer_id,)).fetchone()
    return row[0] + 1 if row and row[0] is not None else default


def judge_report(db: sqlite3.Connection, rule: EpochRule, peer_id: str, epoch: int) -> Verdict:
    """Whether a report of ``epoch`` by ``peer_id`` is possible, and whether refusing it is evidence."""
    run = current(db)
    if epoch < 0:
        return Verdict(True, True, f"epoch {epoch} is negative")
    if epoch <= run + rule.slack:
        return Verdict(False, False)
    own_next = next_epoch_of(db, peer_id, run)
    claimed = db.execute("SELECT epoch FROM epoch_claims WHERE peer_id=?", (peer_id,)).fetchone()
    if claimed is not None:  # its last report refused for now: the one after it is no jump either
        own_next = max(own_next, claimed[0] + 1)
    # a peer that loads another's state continues from that peer's epoch: a jump to just past an
    # accepted report is what an honest catch-up looks like
    swarm_next = db.execute("SELECT MAX(epoch) FROM reports").fetchone()[0]
    swarm_next = run if swarm_next is None else swarm_next + 1
    return Verdict(True, epoch > max(run, own_next, swarm_next) + rule.slack,
                   f"epoch {epoch} is beyond what the run has reached (epoch {run}, at most {rule.slack} ahead)")
