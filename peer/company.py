"""Training waits for company: below ``min_peers`` a peer pauses, at every round, and resumes with its state.

A peer whose partners left would otherwise race through "global epochs" alone (measured: 40 epochs in
13 s without averaging). Who is there comes from two views, and the smaller one decides:
- the coordinator's heartbeat view (live peers): it drops a killed peer within ``peer_timeout``, while
  the peer's progress record lives on in the DHT until it expires;
- the strategy's own count of the swarm, where it has one (sync: the progress records, this peer
  included): a newcomer heartbeats long before it can average (it is still starting its DHT node,
  loading state), and training with it counted raced through epochs alone (measured: 11 epochs in 8 s).
The coordinator may be briefly unreachable: a stale view must not stop a healthy swarm, so then the
swarm's count decides alone, and a strategy without one (DiLoCo, whose DHT is quiet) trains on.
The swarm's count overrules a larger coordinator count only for a while (:class:`CompanyCount`): a
newcomer is in the swarm within seconds, while two live peers that each counted only itself in the
records (measured once under load, after one loaded the other's state at the pacing bound) waited
for each other for good.
"""

from __future__ import annotations

import threading
import time


def peers_present(fresh_view: bool, live_peers: int, swarm_peers: int | None) -> int | None:
    """The number of peers to compare with ``min_peers``; None: nothing trustworthy says, do not pause."""
    if fresh_view:
        return live_peers if swarm_peers is None else min(live_peers, swarm_peers)
    return swarm_peers


class CompanyCount:
    """:func:`peers_present`, except that once the fresh coordinator view has said *more* peers than the
    swarm's count for ``trust_after`` seconds in a row, the coordinator's figure decides."""

    def __init__(self, trust_after: float, clock=time.monotonic):
        self.trust_after, self.clock = trust_after, clock
        self._since: float | None = None  # when the coordinator began to count more than the swarm

    def __call__(self, fresh_view: bool, live_peers: int, swarm_peers: int | None) -> int | None:
        present = peers_present(fresh_view, live_peers, swarm_peers)
        if not (fresh_view and swarm_peers is not None and swarm_peers < live_peers):
            self._since = None
            return present
        now = self.clock()
        if self._since is None:
            self._since = now
        return live_peers if now - self._since >= self.trust_after else present


def too_few(present: int | None, min_peers: int) -> bool:
    return present is not None and present < min_peers


def wait_for_company(count, min_peers: int, stop: threading.Event, say, over=lambda: False, poll: float = 0.2) -> int:
    """Hold until ``count()`` is not below ``min_peers`` (or None), ``stop`` or ``over()``; returns the last count.

    ``say(text)`` is called when the count changes, e.g. "waiting for peers: 1 of 2".
    """
    shown = None
    while not stop.is_set() and not over():
        present = count()
        if not too_few(present, min_peers):
            return present if present is not None else min_peers
        if present != shown:
            say(f"waiting for peers: {present} of {min_peers}")
            shown = present
        stop.wait(poll)
    return count() or 0
