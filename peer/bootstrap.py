"""Start this peer's DHT node against the swarm's bootstrap node(s), retrying within a bound.

A fresh peer's first DHT request can fail for reasons that pass within seconds: the bootstrap
node's ping-back to the newcomer times out on a loaded machine, or libp2p keeps a "dial backoff"
after an earlier failed dial. hivemind raises (``DHTNode bootstrap failed``, ``ControlFailure``);
here every such failure is retried with jittered backoff, saying what the peer waits for, until
``peer.timeouts.BOOTSTRAP`` has passed; then it is one UserError (``error:`` line, exit 2).
"""

from __future__ import annotations

import time

from peer import timeouts
from peer.errors import UserError


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:160]


def start_with_retry(start, what: str, say, bound: float | None = None):
    """``start()`` until it returns (the DHT); on failure wait (jittered backoff) and try again.

    Args:
        start: builds and starts the DHT, raising when its bootstrap failed.
        what: the bootstrap node(s), for the messages.
        say: prints one line for the volunteer.
        bound: seconds for all tries together (default ``timeouts.BOOTSTRAP``); passed -> UserError.
    """
    bound = timeouts.BOOTSTRAP if bound is None else bound
    deadline = time.monotonic() + bound
    attempt = 0
    while True:
        try:
            return start()
        except Exception as error:  # hivemind raises bare RuntimeErrors and p2p ControlFailures here
            left = deadline - time.monotonic()
            if left <= 0:
                raise UserError(
                    f"could not join the swarm: its bootstrap node {what} did not accept this peer within "
                    f"{bound:.0f}s ({attempt + 1} tries; last: {_short(error)}); check that this machine can "
                    f"reach it, then join again"
                ) from None
            wait = min(timeouts.backoff(attempt, timeouts.BOOTSTRAP_RETRY, 8.0), left)
            say(f"waiting for the swarm's bootstrap node {what} to accept this peer "
                f"(try {attempt + 1} failed: {_short(error)}); retrying in {wait:.1f}s, "
                f"{left:.0f}s left")
            time.sleep(wait)
            attempt += 1
