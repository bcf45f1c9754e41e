"""Download the swarm's training state for a sync peer: bounded, donors in turn, checked before use.

hivemind 1.1.12's ``Optimizer.load_state_from_peers`` loops forever on failure and its state
averager copies whatever arrives into the parameters (HIVEMIND_NOTES trap 8; a wrong-shaped tensor
may even broadcast silently). Here one *try* asks hivemind's averager to fetch state, which walks
the donors it finds in the DHT in order of their epoch (a donor silent for ``matchmaking_time``
between two chunks, or gone, is dropped for the next one) within ``timeouts.STATE_TRY``. What a try
returns is checked (epoch, tensor count, every shape, every value finite) before anything is
written; a failed try is retried with jittered backoff until ``timeouts.STATE_DOWNLOAD`` has
passed, then :class:`StateUnavailable` says what went wrong.

The apply step mirrors hivemind 1.1.12's ``TrainingStateAverager.load_state_from_peers`` and
``Optimizer.load_state_from_peers`` (private attributes, pinned by our exact hivemind version).
"""

from __future__ import annotations

import time
from itertools import chain

import torch

from peer import timeouts
from peer.errors import UserError


class StateUnavailable(UserError):
    """No donor delivered a usable state within the bound: the peer leaves (``error:`` line, exit 2)."""


def check_state(averager, loaded) -> str | None:
    """What is wrong with ``loaded`` = (metadata, tensors) for this state averager, or None."""
    metadata, tensors = loaded
    if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int):
        return "the donor sent no epoch"
    if metadata["epoch"] < averager.local_epoch:
        return f"the donor is behind (epoch {metadata['epoch']} < ours {averager.local_epoch})"
    if "optimizer_metadata" not in metadata:
        return "the donor sent no optimizer state"
    local = _parameters_and_extras(averager)
    if len(tensors) < len(local):
        return f"the donor sent {len(tensors)} tensors, at least {len(local)} expected"
    for index, (mine, theirs) in enumerate(zip(local, tensors)):
        if tuple(theirs.shape) != tuple(mine.shape):
            return f"tensor {index} has shape {tuple(theirs.shape)}, expected {tuple(mine.shape)}"
    for index, tensor in enumerate(tensors):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return f"tensor {index} has non-finite values"
    return None


def _parameters_and_extras(averager) -> tuple:
    parameters = tuple(param for group in averager.optimizer.param_groups for param in group["params"])
    return tuple(chain(parameters, averager.extra_tensors))


def _apply(averager, loaded) -> None:
    """Write a checked state into the optimizer and parameters (TrainingStateAverager's own steps)."""
    from hivemind.optim.state_averager import load_optimizer_state

    metadata, tensors = loaded
    local = _parameters_and_extras(averager)
    with torch.no_grad(), averager.lock_averaged_tensors:
        load_optimizer_state(averager.optimizer, metadata["optimizer_metadata"], tensors[len(local):])
        for mine, theirs in zip(local, tensors):
            mine.copy_(theirs, non_blocking=True)
    if averager.offload_optimizer:
        averager._apply_optimizer_parameters_()
    if not averager.reuse_tensors:
        averager._load_local_tensors_into_averager_()
    averager.local_epoch = metadata["epoch"]
    averager._update_scheduler()


def _anyone_ahead(opt) -> bool:
    """Whether the swarm's progress records, read now, still put a peer ahead of this one."""
    from peer.progress_reread import reread_swarm_progress

    try:
        return reread_swarm_progress(opt.tracker, paused=True).epoch > opt.local_epoch  # inside pause_updates
    except Exception:  # the DHT did not answer: keep trying the donors until the bound
        return True


def _fetch(averager, timeout: float):
    """One try over the donors; (metadata, tensors), or None when no donor delivered."""
    from hivemind.averaging import DecentralizedAverager

    # the base class's method only downloads; the subclass's would also apply, unchecked
    return DecentralizedAverager.load_state_from_peers(averager, timeout=timeout)


def load_state(opt, say=lambda text: None, bound: float | None = None) -> int:
    """Bring a hivemind.Optimizer to the swarm's state; returns the tries it took.

    Raises:
        StateUnavailable: after ``bound`` seconds (default ``timeouts.STATE_DOWNLOAD``) without a
            usable state, naming the last problem.
    """
    bound = timeouts.STATE_DOWNLOAD if bound is None else bound
    averager = opt.state_averager
    # as hivemind does: tag along in a round already scheduled, so the others need not restart matchmaking
    if opt.scheduled_grads is not None and not opt.scheduled_grads.done():
        opt._tag_along_with_zero_weight(opt.scheduled_grads)
        opt.scheduled_grads = None
    averager.step(wait_for_delayed_updates=True)
    deadline = time.monotonic() + bound
    tries, problem = 0, "no donor found"
    with opt.tracker.pause_updates():
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StateUnavailable(
                    f"could not load the swarm's state within {bound:.0f}s ({tries} tries over the donors "
                    f"announced in the swarm; last: {problem}); join again later")
            tries += 1
            try:
                loaded = _fetch(averager, min(timeouts.STATE_TRY, left))
            except Exception as error:  # a timeout, a donor gone mid-transfer, a p2p failure
                loaded, problem = None, f"{type(error).__name__}: {' '.join(str(error).split())[:120]}"
            else:
                problem = "no donor delivered a state" if loaded is None else check_state(averager, loaded)
            if loaded is not None and problem is None:
                _apply(averager, loaded)
                break
            # the tracker's updates are paused here: a donor that died (its progress record expires after
            # PROGRESS_EXPIRATION) kept a peer resumed from the run's checkpoint "behind", retrying until the
            # bound and leaving. A peer with trained state (epoch > 0) trains on from it once nobody is
            # ahead; a fresh one (initial weights) must not, and leaves after the bound as before.
            if opt.local_epoch > 0 and not _anyone_ahead(opt):
                say(f"no peer ahead of epoch {opt.local_epoch} is left in the swarm: training on from this state")
                return tries
            wait = min(timeouts.backoff(tries - 1, 1.0, 8.0), max(deadline - time.monotonic(), 0))
            say(f"state download try {tries} failed ({problem}); trying the donors again in {wait:.1f}s")
            time.sleep(wait)
        # what hivemind's Optimizer does after a download
        global_epoch = opt.tracker.global_epoch
        if global_epoch - 1 <= opt.local_epoch < global_epoch:
            averager.local_epoch = global_epoch
        opt.tracker.report_local_progress(local_epoch=opt.local_epoch, samples_accumulated=0)
        if not opt.client_mode:
            averager.state_sharing_priority = opt.local_epoch
        if opt.use_gradient_averaging:
            opt.grad_averager.reset_accumulated_grads_()
            if not opt.client_mode:
                opt.grad_averager.state_sharing_priority = opt.local_epoch
    return tries
