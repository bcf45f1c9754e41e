"""Resuming a run from the coordinator's checkpoint: what the peer says, and restoring the optimizer.

Nobody is left to load state from when a peer resumes from a checkpoint (peer/cli.py), so what
it says decides whether anyone notices that the run went back: a checkpoint older than the run's
epoch, a checkpoint of the first format (model only), or no checkpoint at all although the run has
trained. Each is one plain line.

A sync checkpoint carries the optimizer's state in hivemind's flat form (peer/checkpoint.py); it is
checked against this peer's own optimizer (peer/optimizer_state.py) and written through the same
steps as a state downloaded from a peer (peer/state_download.py), so a resumed Adam keeps its
moments and step count instead of restarting them (which cost the digits run 0.96 -> 0.69 accuracy
in its first epoch).
"""

from __future__ import annotations

from peer.checkpoint import TrainingState
from peer.errors import UserError


def resume_lines(reply, state: TrainingState | None, strategy: str) -> list[str]:
    """What a joining peer tells its volunteer about where it starts (empty: nothing to say)."""
    run_epoch = int(reply.epoch)
    if state is None:
        if getattr(reply, "swarm_empty", False) and run_epoch > 0:
            return [f"warning: no peer is left and the run has no checkpoint: starting from the initial "
                    f"weights, although the run had reached epoch {run_epoch}"]
        return []
    epoch = int(reply.checkpoint_epoch)
    if epoch < run_epoch:
        lines = [f"resuming from the run's checkpoint at epoch {epoch}, older than the run's epoch {run_epoch} "
                 f"(no peer is left; epochs {epoch}-{run_epoch} are trained again)"]
    else:
        lines = [f"starting from the run's checkpoint at epoch {epoch}"]
    if not state.strategy:
        fresh = "outer momentum" if strategy == "diloco" else "optimizer state"
        lines.append(f"the checkpoint is of the first format (parameters only): the {fresh} starts fresh")
    elif state.strategy != strategy:
        lines.append(f"the checkpoint was taken by a {state.strategy} run: only its parameters are used")
    return lines


def optimizer_fingerprint(flat_tensors) -> str:
    """peer.checkpoint.state_fingerprint of a flat optimizer state, its tensors named as in a checkpoint."""
    from peer.checkpoint import OPTIMIZER_PREFIX, state_fingerprint

    return state_fingerprint({f"{OPTIMIZER_PREFIX}{index:05d}": t for index, t in enumerate(flat_tensors)})


def restore_optimizer(opt, epoch: int, optimizer_state) -> str:
    """Write a checkpoint's flat optimizer state into a fresh hivemind.Optimizer (checked first);
    returns the fingerprint of the state the optimizer holds afterwards, read back from it."""
    from peer.optimizer_state import check_flat_state, flat_state
    from peer.state_download import _apply, _parameters_and_extras

    averager = opt.state_averager
    flat_metadata, tensors = optimizer_state
    problem = check_flat_state(flat_metadata, tensors, flat_state(averager.optimizer))
    if problem:
        raise UserError(f"the run's checkpoint does not fit this task's optimizer: {problem}")
    with averager.lock_averaged_tensors:
        local = [tensor.detach().cpu().clone() for tensor in _parameters_and_extras(averager)]
    # the parameters are the model's, already loaded from the same checkpoint
    _apply(averager, ({"epoch": epoch, "optimizer_metadata": flat_metadata}, [*local, *tensors]))
    return optimizer_fingerprint(flat_state(averager.optimizer)[1])
