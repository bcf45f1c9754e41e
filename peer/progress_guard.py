"""Ignore impossible progress records: one peer's epoch lie must not derail the swarm.

hivemind 1.1.12 takes the swarm's epoch as the max of the epochs peers publish (HIVEMIND_NOTES
trap 4): a single record claiming epoch 1000 sends every honest peer into an endless "behind the
swarm, load state" loop. The coordinator knows how far the run has really got; while its view is
fresh, records beyond that epoch plus a slack are dropped before hivemind reads them. The
coordinator bans the liar separately.
"""

from __future__ import annotations

from typing import Callable


def guard_swarm_epoch(tracker, epoch_limit: Callable[[], int | None]) -> None:
    """Filter the progress records ``tracker`` parses (a pinned private method of hivemind 1.1.12)."""
    parse = tracker._parse_swarm_progress_data

    def parse_plausible(metadata):
        limit = epoch_limit()
        if limit is not None and isinstance(metadata, dict):
            metadata = {key: item for key, item in metadata.items() if not _beyond(item, limit)}
        return parse(metadata)

    tracker._parse_swarm_progress_data = parse_plausible


def _beyond(item, limit: int) -> bool:
    value = getattr(item, "value", None)
    epoch = value.get("epoch") if isinstance(value, dict) else None
    return isinstance(epoch, int) and epoch > limit
