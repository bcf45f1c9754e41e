"""Every deadline a peer waits under, in one place, with what happens when it passes.

A volunteer's machine may be busy, its link slow, the coordinator restarting and any other
peer gone without a word. So no wait on the network or inside hivemind is open-ended: each has
a named deadline here, and each caller does one of three defined things when it passes:

- RETRY (with jitter, so peers that failed together do not retry in lockstep),
- SKIP (the round or step is abandoned; training goes on from local state),
- LEAVE (one ``error:`` line, exit 2, the coordinator told when it can be).

One wait is open on purpose: a peer holds training while fewer than ``min_peers`` are in the swarm
(peer/loop.py ``wait_for_peers`` at the start, peer/company.py at every round after), saying so on
screen, until peers come or the volunteer stops it; a coordinator that is unreachable does not hold
it (the swarm's own count decides then). A sync peer that did its share of the batch holds its step
for the others at most the run's ``averaging_timeout`` (peer/fair_share.py), then hivemind's rules go on.

Run-specific waits (``matchmaking_time``, ``averaging_timeout``) come from the run config: they
must be the same for the whole swarm. The values here are per peer and may differ between peers.
"""

from __future__ import annotations

import random

# --- the coordinator (gRPC) ---------------------------------------------------------------
CALL = 5.0
"""Any one RPC to the coordinator. A healthy coordinator answers in milliseconds; 5 s rides out a
busy sqlite writer. Passed: Join -> LEAVE (``error:``); reports and heartbeats -> RETRY."""

CONNECT = 10.0
"""Default of ``peer join --connect-timeout``: reaching the coordinator for Join. Passed -> LEAVE."""

RECONNECT_FIRST, RECONNECT_MAX = 0.5, 10.0
"""Backoff of the coordinator link while the coordinator is unreachable: doubles from FIRST up to
MAX, each wait drawn from [half, full] (jitter) so a swarm that lost its coordinator together does
not hammer it in lockstep when it comes back (issue 12). The cap is also at most twice the run's
``heartbeat_interval``, so a peer is seen again within about that long once the coordinator is back."""

CHECKPOINT_FETCH = 300.0
"""The whole checkpoint download at join (megabytes over a slow link). Passed -> LEAVE."""

FIRST_HEARTBEAT = 15.0
"""Learning the run's epoch from the coordinator before the first DiLoCo phase. Passed -> go on
from the initial weights (the next round resyncs a peer that is behind)."""

# --- the swarm's DHT ------------------------------------------------------------------------
DHT_RPC = 3.0
"""One DHT request (hivemind's ``wait_timeout``, also its bootstrap ping). Passed -> hivemind
treats the peer as gone; at bootstrap the whole start is retried, see BOOTSTRAP."""

BOOTSTRAP = 90.0
"""Starting this peer's DHT node against the bootstrap node(s) named in the Join reply, all tries
together. A try fails when the bootstrap node does not answer its ping in DHT_RPC (a loaded
machine, a libp2p dial backoff after an earlier failed dial); RETRY after BOOTSTRAP_RETRY (jitter),
printing what it waits for. Passed -> LEAVE. 90 s covers a coordinator restart."""

BOOTSTRAP_RETRY = 2.0
"""Base wait between bootstrap tries; it doubles (to 8 s at most) and is jittered."""

FIRST_FETCH = 15.0
"""A new sync peer learning the swarm's epoch from the DHT before its first step. Passed -> start
at epoch 0; a peer that turns out to be behind loads state (STATE_DOWNLOAD)."""

# --- the averagers ----------------------------------------------------------------------------
REQUEST = 1.0
"""hivemind's averager ``request_timeout`` (one matchmaking request); capped at half of
``matchmaking_time`` because hivemind warns of deadlocks otherwise (HIVEMIND_NOTES trap 9)."""

STATE_TRY = 60.0
"""One try of a state download over all donors announced in the DHT (hivemind's
``load_state_timeout``). Within a try, a donor silent for ``matchmaking_time`` between two chunks
(hivemind's ``next_chunk_timeout``), or gone, is dropped for the next one. Passed -> RETRY."""

STATE_DOWNLOAD = 180.0
"""The whole state download, all tries together (hivemind's own loop retries forever,
HIVEMIND_NOTES trap 8). Tries RETRY with jitter; each arrival is checked (count, shapes,
finiteness, epoch) before it touches the model (peer/state_download.py). Passed -> LEAVE: a peer
that cannot get the swarm's state would only compute gradients the swarm throws away."""

# --- the run's end and company (multiples of the run's averaging_timeout) ----------------------
FINAL_CATCH_UP = 2.0
"""A peer that finished the run waits up to this many ``averaging_timeout`` for live peers behind
it: a laggard may first sit out a failed round, then downloads this peer's final state
(peer/strategies/sync.py). Passed -> the peer leaves as usual (exit 0)."""

COMPANY_TRUST = 3.0
"""While the coordinator counts more live peers than the swarm's progress records, the records'
count decides whether a peer waits for company (a newcomer is in the swarm seconds after it
heartbeats) for this many ``averaging_timeout``. Passed -> the coordinator's count decides
(peer/company.py)."""

SHUTDOWN_GRACE = 20.0
"""hivemind may take this long to stop (HIVEMIND_NOTES trap 10); then the process exits anyway."""


def jittered(base: float) -> float:
    """A wait drawn uniformly from [base/2, base]: spread, never longer than ``base``."""
    return base * (0.5 + 0.5 * random.random())


def backoff(attempt: int, first: float, most: float) -> float:
    """The jittered wait before retry number ``attempt`` (0-based): first * 2**attempt, capped at most."""
    return jittered(min(first * (2 ** attempt), most))
