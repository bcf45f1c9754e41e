"""Read the swarm's progress records as evidence, not as facts: one peer's numbers must not steer the swarm.

hivemind 1.1.12's progress tracker believes every record a peer publishes (HIVEMIND_NOTES trap 4):
- the swarm's epoch is the max of the published epochs: one record claiming epoch 1000 sends every
  honest peer into an endless "behind the swarm, load state" loop;
- an epoch ends when the published ``samples_accumulated`` add up to ``target_batch_size``, or when
  the ETA estimated from the published ``samples_per_second`` and ``time`` has passed: one record
  claiming the whole target, a huge rate or an old timestamp makes every peer step after one
  micro-batch (measured: the run trained a third of its samples).

So before hivemind reads them, records are cleaned:
- epochs beyond the run's epoch as the coordinator last said it, plus ``epoch_slack``, are dropped
  (the coordinator's epoch is a quorum of reports and lags a busy swarm: a bound of one epoch dropped
  honest records and left a peer averaging alone);
- so are epochs that fewer than half of the peers have reached: one peer inside the slack cannot move
  the swarm's epoch either (with two peers a liar and a peer really ahead look alike: the max stands);
- each peer's samples count for at most its fair share of the target (target / peers at that epoch),
  its rate for at most twice the swarm's median rate, and its timestamp is kept recent enough that
  hivemind's extrapolation stays within that share;
- a record of this peer's own that is ahead of its local epoch (left by its previous life) is dropped.
An honest swarm of equal peers is unchanged by this (a fast peer's surplus samples still train, they
just do not end the epoch for the others); a liar can at most claim the share of the work it would
have done honestly. The coordinator bans egregious epoch liars separately (coordinator/auditor.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

from peer.progress_reread import reread_swarm_progress
from peer.swarm import PROGRESS_EXPIRATION  # a record's lifetime

RATE_FACTOR = 2.0  # a peer's rate counts for at most this multiple of the median rate


@dataclasses.dataclass
class HighestEpoch:
    """The highest swarm epoch the guarded records ever showed. The records of peers that finished the
    run and left expire after PROGRESS_EXPIRATION: a peer that was busy then (a failed round lasts up to
    2 x averaging_timeout) must still know that the others completed the run's epochs."""
    epoch: int = -1


def guard_swarm_epoch(tracker, epoch_limit: Callable[[], int | None]) -> HighestEpoch:
    """Clean the progress records ``tracker`` parses (a pinned private method of hivemind 1.1.12);
    returns what keeps the highest swarm epoch they showed."""
    parse = tracker._parse_swarm_progress_data
    own_id = tracker.dht.peer_id.to_bytes()
    highest = HighestEpoch()

    def parse_plausible(metadata):
        if isinstance(metadata, dict):
            metadata = without_own_past(metadata, own_id, tracker.local_progress.epoch)
            metadata = plausible_records(metadata, epoch_limit(), tracker.target_batch_size, time.time())
        progress = parse(metadata)
        highest.epoch = max(highest.epoch, progress.epoch)
        return progress

    tracker._parse_swarm_progress_data = parse_plausible
    # the tracker read the records once when it was made, unguarded: when that read put the swarm ahead
    # of us (a restarted peer read the ghost of its previous life there and went looking for a donor
    # that was itself), read them again, guarded
    if tracker.global_progress.epoch > tracker.local_progress.epoch:
        reread_swarm_progress(tracker)
    return highest


def without_own_past(metadata: dict, own_id: bytes, local_epoch: int) -> dict:
    """``metadata`` without a record of this peer's own that is ahead of its local epoch.

    A live peer publishes its record after updating its local progress, so such a record is the
    ghost of this peer's previous life (killed at epoch 38, restarted from the run's checkpoint at
    30): hivemind would read it as "the swarm is at 38" and the restarted peer, alone, would wait for
    a donor that is itself. A record only claiming our id changes nothing we do not know better.
    """
    return {key: item for key, item in metadata.items()
            if not (isinstance(value := getattr(item, "value", None), dict) and value.get("peer_id") == own_id
                    and isinstance(value.get("epoch"), int) and value["epoch"] > local_epoch)}


def plausible_records(metadata: dict, limit: int | None, target_batch_size: int, now: float) -> dict:
    """The records of ``metadata`` (subkey -> ValueWithExpiration of a progress dict), cleaned."""
    parsed = ((key, item, _progress(item)) for key, item in metadata.items())
    records = [(key, item, value) for key, item, value in parsed
               if value is not None and (limit is None or value["epoch"] <= limit)]
    top_epoch = _majority_epoch([value for _, _, value in records])
    records = [record for record in records if record[2]["epoch"] <= top_epoch]
    if not records:
        return {}
    rates = sorted(value["samples_per_second"] for _, _, value in records)
    rate_cap = RATE_FACTOR * rates[(len(rates) - 1) // 2]  # the lower median: one liar of two cannot raise it
    at_top = sum(1 for _, _, value in records if value["epoch"] == top_epoch)
    share = math.ceil(target_batch_size / max(at_top, 1))
    cleaned = {}
    for key, item, original in records:
        value = dict(original)
        value["samples_per_second"] = min(float(value["samples_per_second"]), rate_cap)
        value["samples_accumulated"] = min(value["samples_accumulated"], share)
        # hivemind extrapolates samples + (now - time) * rate: keep that within the share too
        headroom = max(share - value["samples_accumulated"], 0) / max(value["samples_per_second"], 1e-9)
        value["time"] = float(min(max(value["time"], now - PROGRESS_EXPIRATION, now - headroom), now))
        cleaned[key] = dataclasses.replace(item, value=value)
    return cleaned


def _majority_epoch(values: list[dict]) -> int:
    """The highest epoch that at least half of the (non-client) records have reached.

    hivemind takes the max; a peer alone ahead of the others is either one that has just stepped
    (the rest follow on their own counts within moments) or a liar that would make every honest peer
    "load state" in a loop. With two peers the two cannot be told apart, and the max stands.
    """
    epochs = sorted((v["epoch"] for v in values if not v.get("client_mode")), reverse=True)
    if not epochs:
        epochs = sorted((v["epoch"] for v in values), reverse=True)
    if not epochs:
        return -1
    return epochs[max(math.ceil(len(epochs) / 2), 1) - 1]


def _progress(item) -> dict | None:
    """The progress dict of one record, or None when it is not a well-formed one."""
    value = getattr(item, "value", None)
    if not isinstance(value, dict):
        return None
    epoch, samples, rate, stamp = (value.get(k) for k in ("epoch", "samples_accumulated", "samples_per_second", "time"))
    if not (isinstance(epoch, int) and isinstance(samples, int) and epoch >= 0 and samples >= 0):
        return None
    if not (isinstance(rate, (int, float)) and isinstance(stamp, (int, float))
            and math.isfinite(rate) and math.isfinite(stamp) and rate >= 0):
        return None
    return value
