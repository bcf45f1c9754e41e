"""Read the swarm's progress records now, outside hivemind's own refresh schedule."""


def reread_swarm_progress(tracker, paused: bool = False):
    """Fetch the progress records now and make them the tracker's view (guarded once guard_swarm_epoch
    ran); returns the new global progress. ``paused``: the caller is inside ``tracker.pause_updates()``,
    which holds the (non-reentrant) lock this takes otherwise."""
    found = tracker.dht.get(tracker.training_progress_key, latest=True)
    progress = tracker._parse_swarm_progress_data(getattr(found, "value", None))
    if paused:
        tracker.global_progress = progress
    else:
        with tracker.lock_global_progress:
            tracker.global_progress = progress
    tracker.fetched_global_progress_this_epoch.set()
    return progress
