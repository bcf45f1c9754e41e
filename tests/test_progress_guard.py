"""Progress records are cleaned before hivemind's tracker believes them (peer/progress_guard.py).

The tracker's own parser (hivemind 1.1.12, pinned) runs on the cleaned records, so these tests show
what an honest peer would decide: when its epoch ends and which epoch the swarm is at.
"""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.timed_storage import ValueWithExpiration

from peer.progress_guard import plausible_records

TARGET = 512


def record(peer: str, epoch: int, samples: int, rate: float = 100.0, stamp: float | None = None):
    value = {"peer_id": peer.encode(), "epoch": epoch, "samples_accumulated": samples,
             "samples_per_second": rate, "time": time.time() if stamp is None else stamp, "client_mode": False}
    return ValueWithExpiration(value, time.time() + 15)


def tracker_view(metadata: dict, limit: int | None = None, local_epoch: int = 3):
    """What hivemind's own parser makes of the records, after cleaning."""
    me = SimpleNamespace(
        local_progress=SimpleNamespace(epoch=local_epoch, samples_accumulated=0), target_batch_size=TARGET,
        performance_ema=SimpleNamespace(samples_per_second=100.0, eps=1e-9), default_refresh_period=3,
        status_loglevel=logging.DEBUG, expected_drift_peers=3, expected_drift_rate=0.2,
        min_refresh_period=0.5, max_refresh_period=30, prefix="test")
    cleaned = plausible_records(metadata, limit, TARGET, time.time())
    return ProgressTracker._parse_swarm_progress_data(me, cleaned)


def honest(n: int, samples: int = 64):
    return {f"k{i}": record(f"p{i}", 3, samples) for i in range(n)}


def test_honest_records_are_unchanged():
    metadata = honest(3)
    cleaned = plausible_records(metadata, 5, TARGET, time.time())
    assert {k: v.value["samples_accumulated"] for k, v in cleaned.items()} == {"k0": 64, "k1": 64, "k2": 64}
    view = tracker_view(metadata)
    assert view.epoch == 3 and view.samples_accumulated == 192
    assert view.eta_next_epoch > time.time() + 1  # 320 samples to go at 300 samples/s


def test_claiming_the_whole_target_counts_as_a_fair_share():
    metadata = {**honest(3), "liar": record("liar", 3, TARGET)}
    view = tracker_view(metadata)
    assert view.samples_accumulated == 3 * 64 + TARGET // 4  # not >= TARGET: nobody steps early


def test_a_huge_rate_or_an_old_timestamp_does_not_end_the_epoch():
    for liar in (record("liar", 3, 64, rate=1e9), record("liar", 3, 64, stamp=0.0)):
        view = tracker_view({**honest(3), "liar": liar})
        assert view.eta_next_epoch > time.time() + 0.3, liar


def test_an_epoch_beyond_the_limit_is_dropped_and_within_it_is_capped():
    view = tracker_view({**honest(3), "liar": record("liar", 1000, TARGET)}, limit=6)
    assert view.epoch == 3 and view.num_peers == 3
    # within the slack, one peer alone ahead cannot move the swarm's epoch either
    view = tracker_view({**honest(3), "liar": record("liar", 5, TARGET)}, limit=6)
    assert view.epoch == 3 and view.samples_accumulated == 192


def test_an_epoch_most_peers_reached_stands():
    # a late joiner at epoch 0 sees the swarm at 3 and loads state; a peer that has just stepped is
    # followed when half the swarm is there
    assert tracker_view(honest(3), local_epoch=0).epoch == 3
    ahead = {**honest(2), "k2": record("p2", 4, 0), "k3": record("p3", 4, 0)}
    assert tracker_view(ahead).epoch == 4


def test_malformed_records_are_dropped():
    bad = ValueWithExpiration({"epoch": "x"}, time.time() + 15)
    nan = record("nan", 3, 64, rate=float("nan"))
    view = tracker_view({**honest(2), "bad": bad, "nan": nan})
    assert view.num_peers == 2


def test_a_record_of_our_own_previous_life_does_not_put_us_behind():
    from peer.progress_guard import without_own_past

    ghost = {"ghost": record("me", 38, 0)}  # this peer, killed at 38, restarted from a checkpoint at 30
    assert without_own_past(ghost, b"me", local_epoch=30) == {}
    assert tracker_view(without_own_past(ghost, b"me", local_epoch=30), local_epoch=30).epoch == 30
    # another peer's record ahead, and our own record at our epoch, stay
    kept = {**ghost, "other": record("other", 38, 0), "now": record("me", 30, 64)}
    assert set(without_own_past(kept, b"me", local_epoch=30)) == {"other", "now"}
