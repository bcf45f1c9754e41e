"""A peer never trains further ahead of the run than the coordinator accepts.

The coordinator refuses a report beyond the run's checked epoch + ``epoch_slack``
(coordinator/books/run_epoch.py), and peers ignore progress records beyond the same bound
(peer/progress_guard.py), so work done there is neither credited nor seen. A peer that raced there
(alone for a moment, or simply faster) drifted apart for good: the peers behind no longer saw its
records, so they never loaded its state, while it never waited for them (measured: two honest peers
of two orgs 20 epochs apart after 10 s, averaging never again; a third one that did load the racer's
state jumped 13 epochs and was banned for an impossible report).

So before an epoch's first micro-batch a peer at the bound holds until the run
catches up (the others report, or a stalled voter drops out after ``peer_timeout``). Held at the bound,
its progress record stays visible to the peers behind, who load its state and come level. Only a fresh
view of the coordinator holds a peer (during an outage the swarm trains on), and for at most
``averaging_timeout`` per epoch: peers that loaded the holder's state hold at the same bound, and the
run moves only once their reports (refused for now, counted as their claims) come in.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Callable


def ahead_of_run(label: int, limit: int | None) -> bool:
    """Whether training epoch ``label`` would go too far: ``limit`` is the run epoch + slack (None: no
    fresh view). The bound is one short of what the coordinator accepts, because a peer that loads
    this one's state after it finishes ``label`` reports ``label + 1`` next."""
    return limit is not None and label >= limit


def hold_for_run(label: Callable[[], int], limit: Callable[[], int | None], stop: threading.Event, say,
                 over=lambda: False, nudge=lambda: None, poll: float = 0.2, bound: float = math.inf) -> bool:
    """Hold while ``ahead_of_run(label(), limit())``, unless ``stop`` or ``over()``; True if it held.

    ``say(text)`` is called once; ``nudge()`` asks the coordinator for a fresh view (once: the
    heartbeat brings the next ones).
    """
    if not ahead_of_run(label(), limit()):
        return False
    nudge()
    say(f"epoch {label()} is as far ahead of the run as the coordinator accepts: waiting for the swarm")
    deadline = time.monotonic() + bound
    while not stop.is_set() and not over() and ahead_of_run(label(), limit()) and time.monotonic() < deadline:
        stop.wait(poll)
    return True
