"""A sync peer does its share of the swarm's batch, then waits: ``target_batch_size`` is the swarm's.

hivemind 1.1.12's tracker adds this peer's own samples to the swarm's count at once but reads the
other peers' counts only when it fetches their records (every 0.5-10 s). A peer computing 512
samples faster than that ended the epoch on its own samples alone: measured on digits
(target 512, micro-batch 32), every peer did 512 samples per epoch, so the swarm did 1,024 with
2 peers and 1,536 with 3. So a peer computes at most its share, ``ceil(target / peers)``, tells the
swarm at once that it has (its progress record), and holds its last micro-batch's step until the
swarm's records add up to the target (or hivemind's ETA, or another peer's step, ends the epoch).
A peer that leaves withdraws its record (hivemind stores None at shutdown); a killed one stops
publishing and its record expires: either way the others' count drops at their next read of the
records (every poll while they hold), their share grows and they go back to computing.

A killed peer's record lives on for PROGRESS_EXPIRATION (peer/swarm.py): until then the survivor's
share is computed for two and the swarm's count may never add up, so the hold can run to its bound.
Measured when every micro-batch past the share held again: each paid the full bound and a survivor
took over 120 s for 3 epochs. So a hold that ran out is not repeated within the epoch
(:class:`ShareHold`): the peer computes on to the target as hivemind alone would.
"""

from __future__ import annotations

import math
import threading
import time

POLL = 0.25  # seconds between two reads of the swarm's records while holding the step


def share_of(target_batch_size: int, peers: int) -> int:
    """Samples one of ``peers`` equal peers computes for an epoch of ``target_batch_size`` samples."""
    return math.ceil(target_batch_size / max(peers, 1))


def peers_in(metadata, own_id: bytes) -> int:
    """How many peers the (cleaned) progress records name, this peer included even before it published."""
    ids = {value.get("peer_id") for item in (metadata or {}).values()
           if isinstance(value := getattr(item, "value", None), dict)}
    return len(ids | {own_id})


def count_peers(tracker) -> "PeerCount":
    """Keep a count of the peers behind the records ``tracker`` parses (install before the progress guard,
    so the count is of the records the guard kept)."""
    count = PeerCount()
    parse = tracker._parse_swarm_progress_data  # hivemind 1.1.12, pinned
    own_id = tracker.dht.peer_id.to_bytes()

    def counting(metadata):
        count.peers = peers_in(metadata if isinstance(metadata, dict) else {}, own_id)
        return parse(metadata)

    tracker._parse_swarm_progress_data = counting
    return count


class PeerCount:
    peers: int = 1


class ShareHold:
    """Whether a peer holds before its coming step: at its share, and not again in an epoch whose hold ran out."""

    def __init__(self, target_batch_size: int):
        self.target = target_batch_size
        self.ran_out: int | None = None  # the epoch whose hold reached its bound

    def due(self, epoch: int, accumulated: int, peers: int) -> bool:
        """``accumulated``: this peer's samples of ``epoch`` including the micro-batch about to be stepped."""
        return peers > 1 and epoch != self.ran_out and accumulated >= share_of(self.target, peers)

    def ended(self, epoch: int, why: str) -> None:
        if why == "bound":
            self.ran_out = epoch


def refetch(tracker) -> None:
    """Read the swarm's records now (hivemind's own fetch may be seconds away)."""
    found = tracker.dht.get(tracker.training_progress_key, latest=True)
    progress = tracker._parse_swarm_progress_data(getattr(found, "value", None))
    with tracker.lock_global_progress:
        if progress.epoch >= tracker.global_progress.epoch:
            tracker.global_progress = progress


def hold_until_swarm_batch(tracker, count: PeerCount, target: int, done_samples: int, stop: threading.Event,
                           bound: float) -> str:
    """Before the step that completes this peer's share: announce it, then wait for the swarm's batch.

    Returns why the wait ended: "ready" (the epoch ends at the coming step), "share grew" (peers left:
    compute more), "stopped", or "bound" (``bound`` seconds passed; hivemind's own rules take over).
    """
    epoch = tracker.local_progress.epoch
    tracker.report_local_progress(epoch, done_samples)  # the others count our full share from now on
    deadline = time.monotonic() + bound
    while True:
        if tracker.ready_to_update_epoch:
            return "ready"
        if done_samples < share_of(target, count.peers):
            return "share grew"
        if stop.is_set():
            return "stopped"
        if time.monotonic() > deadline:
            return "bound"
        stop.wait(POLL)
        try:
            refetch(tracker)
        except Exception:  # the DHT did not answer: the tracker's own view stands, the bound still holds
            pass
