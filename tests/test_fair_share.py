"""The fair-share hold's decisions (peer/fair_share.py), on a fake progress tracker.

The real swarm's batch per epoch is checked in tests/test_swarm_batch.py; here: a hold that ran
out is not repeated within its epoch (a killed peer's record made every micro-batch past the share
pay the bound), and the share grows back when a silent peer's record expires.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

from peer.fair_share import ShareHold, count_peers, hold_until_swarm_batch, share_of

TARGET = 512


def record(epoch: int, samples: int, peer: bytes) -> SimpleNamespace:
    return SimpleNamespace(value={"peer_id": peer, "epoch": epoch, "samples_accumulated": samples})


class FakeDHT:
    """The run's progress key as a dict of records; ``expire_after`` gets drop the record ``expiring``."""

    def __init__(self, records: dict, expiring: str | None = None, expire_after: int = 0):
        self.records, self.expiring, self.expire_after, self.gets = records, expiring, expire_after, 0
        self.peer_id = SimpleNamespace(to_bytes=lambda: b"me")

    def get(self, key, latest=True):
        self.gets += 1
        if self.expiring and self.gets > self.expire_after:
            self.records.pop(self.expiring, None)
        return SimpleNamespace(value=dict(self.records)) if self.records else None


class FakeTracker:
    """What hold_until_swarm_batch and count_peers use of hivemind's ProgressTracker: the epoch ends
    when the records of the current epoch add up to the target."""

    training_progress_key = "run_progress"
    target_batch_size = TARGET

    def __init__(self, dht: FakeDHT, epoch: int):
        self.dht, self.lock_global_progress = dht, threading.Lock()
        self.local_progress = SimpleNamespace(epoch=epoch)
        self.global_progress = SimpleNamespace(epoch=epoch, samples_accumulated=0)

    def _parse_swarm_progress_data(self, metadata):
        values = [item.value for item in (metadata or {}).values()]
        epoch = max([v["epoch"] for v in values] + [self.local_progress.epoch])
        return SimpleNamespace(epoch=epoch, samples_accumulated=sum(v["samples_accumulated"] for v in values
                                                                    if v["epoch"] == epoch))

    def report_local_progress(self, epoch: int, samples: int) -> None:
        self.dht.records["me"] = record(epoch, samples, b"me")
        self.global_progress = self._parse_swarm_progress_data(self.dht.records)

    @property
    def ready_to_update_epoch(self) -> bool:
        return self.global_progress.samples_accumulated >= self.target_batch_size


def swarm(records: dict, epoch: int = 3, **dht) -> tuple[FakeTracker, object]:
    tracker = FakeTracker(FakeDHT(records, **dht), epoch)
    count = count_peers(tracker)
    tracker._parse_swarm_progress_data(tracker.dht.get(tracker.training_progress_key).value)  # the tracker's fetch
    return tracker, count


def test_a_hold_that_ran_out_is_not_repeated_within_its_epoch():
    hold = ShareHold(TARGET)
    assert not hold.due(3, 224, peers=2) and hold.due(3, 256, peers=2)
    assert not hold.due(3, 512, peers=1)  # alone: hivemind's own count is the swarm's
    hold.ended(3, "share grew")
    assert hold.due(3, 288, peers=2)  # only a hold that ran out ends the holding for the epoch
    hold.ended(3, "bound")
    assert not hold.due(3, 288, peers=2) and not hold.due(3, 480, peers=2)
    assert hold.due(4, 256, peers=2)  # the next epoch holds again


def test_a_killed_peers_record_makes_the_hold_run_to_its_bound_once():
    # the killed peer stopped at epoch 2; its record lives on, so the survivor's share is for two
    tracker, count = swarm({"ghost": record(2, 160, b"ghost")})
    assert count.peers == 2 and share_of(TARGET, count.peers) == 256
    hold = ShareHold(TARGET)
    assert hold.due(3, 256, count.peers)
    why = hold_until_swarm_batch(tracker, count, TARGET, 256, threading.Event(), bound=0.3)
    assert why == "bound"
    hold.ended(3, why)
    assert [hold.due(3, samples, count.peers) for samples in range(288, TARGET, 32)] == [False] * 7


def test_the_share_grows_back_when_a_silent_peers_record_expires():
    tracker, count = swarm({"ghost": record(2, 160, b"ghost")}, expiring="ghost", expire_after=1)
    why = hold_until_swarm_batch(tracker, count, TARGET, 256, threading.Event(), bound=60)
    assert why == "share grew" and count.peers == 1 and share_of(TARGET, count.peers) == TARGET
    assert not ShareHold(TARGET).due(3, 288, count.peers)


def test_the_hold_ends_when_the_swarms_records_add_up_or_the_peer_stops():
    tracker, count = swarm({"other": record(3, 256, b"other")})
    assert hold_until_swarm_batch(tracker, count, TARGET, 256, threading.Event(), bound=60) == "ready"
    assert tracker.dht.records["me"].value["samples_accumulated"] == 256  # announced before waiting
    tracker, count = swarm({"other": record(3, 64, b"other")})
    stop = threading.Event()
    stop.set()
    assert hold_until_swarm_batch(tracker, count, TARGET, 256, stop, bound=60) == "stopped"


def test_a_dht_that_does_not_answer_leaves_the_bound_in_force():
    tracker, count = swarm({"ghost": record(2, 160, b"ghost")})

    def broken(*_, **__):
        raise TimeoutError("no answer")

    tracker.dht.get = broken
    assert hold_until_swarm_batch(tracker, count, TARGET, 256, threading.Event(), bound=0.3) == "bound"
