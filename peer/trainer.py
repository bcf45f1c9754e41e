"""A peer's training: build the model and the run's averaging strategy, then run the one loop (peer/loop.py)."""

from __future__ import annotations

import torch

from peer.checkpoint import load_into_model, state_fingerprint
from peer.events import EventLog
from peer.loop import MODEL_FILE, EpochMeter, TrainOptions, install_stop_handlers, run  # noqa: F401 (re-exported)
from peer.runconfig import RunConfig


def pick_device(choice: str) -> torch.device:
    from peer.errors import UserError

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(choice)


def make_strategy(config: RunConfig, task, dht, model, options: TrainOptions):
    """The ``[averaging] strategy`` of the run; forks hivemind's processes (before any gRPC thread)."""
    if config.averaging.strategy == "diloco":
        from peer.strategies.diloco import DiLoCoStrategy

        return DiLoCoStrategy(dht, config, model, task, max_rounds=options.max_epochs, data_dir=options.data_dir)
    from peer.strategies.sync import SyncStrategy

    return SyncStrategy(dht, config, model, task, client_mode=options.client_mode, data_dir=options.data_dir)


def train(config: RunConfig, task, peer_id: str, dht, make_link, events: EventLog, options: TrainOptions) -> dict:
    """Train until the run ends, --max-epochs is reached, the peer is evicted or SIGINT/SIGTERM; returns a summary.

    make_link() builds the coordinator link; it is called only after hivemind has forked its
    processes, so no gRPC thread exists at fork time.
    """
    model = task.build_model(config.seed)
    if options.initial_state is not None:
        load_into_model(model, options.initial_state[1].model, what="run's checkpoint")
    model = model.to(options.device)
    strategy = make_strategy(config, task, dht, model, options)
    if options.initial_state is not None:
        epoch, state, sha256 = options.initial_state
        # the optimizer's state (sync) or the outer momentum (DiLoCo) too; its fingerprint as restored
        restored = strategy.start_at(epoch, state)
        events.emit("checkpoint_loaded", epoch=epoch, sha256=sha256, holds=state.holds(),
                    fingerprint=state_fingerprint(model.state_dict()), restored_fingerprint=restored)
    return run(config, task, peer_id, strategy, model, make_link, events, options)
