"""The training loop of one peer: deterministic micro-batches, hivemind averaging, per-epoch reports."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.checkpoint import load_into_model, state_fingerprint
from peer.client import CoordinatorLink
from peer.events import EventLog
from peer.progress import Progress, ProgressDisplay
from peer.progress_guard import guard_swarm_epoch
from peer.runconfig import RunConfig
from peer.swarm import FIRST_FETCH_TIMEOUT, load_state, make_optimizer, needs_state_from_peers, start_at_epoch
from peer.work import EpochProof, autocast_context, do_micro_batch

MODEL_FILE = "model.pt"


@dataclass
class TrainOptions:
    data_dir: Path
    device: torch.device
    max_epochs: int  # 0: until the run ends or the peer is stopped
    progress: str
    # (epoch, state_dict, sha256) of a checkpoint to start from when the swarm has no peer left
    initial_state: tuple[int, dict, str] | None = None
    client_mode: bool = False  # this peer cannot be dialled: average without hosting (same bool as the DHT's)


def pick_device(choice: str) -> torch.device:
    from peer.errors import UserError

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(choice)


def install_stop_handlers() -> threading.Event:
    """SIGINT and SIGTERM ask the loop to stop after the current step, so the peer leaves cleanly;
    a second one exits at once, should a hivemind shutdown path hang."""
    stop = threading.Event()

    def handle(signum, frame):
        if stop.is_set():
            os._exit(128 + signum)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)
    return stop


def wait_for_peers(opt, min_peers: int, stop: threading.Event, display: ProgressDisplay) -> None:
    """Hold training after the first micro-batch until min_peers are in the swarm, so nobody runs the
    first epochs alone. hivemind announces a peer only once it has accumulated samples, hence the
    first micro-batch."""
    display.message(f"waiting for {min_peers} peers in the swarm before training starts")
    while not stop.is_set() and opt.tracker.global_progress.num_peers < min_peers:
        stop.wait(0.2)
    display.message(f"{opt.tracker.global_progress.num_peers} peers in the swarm: training")


class EpochMeter:
    """Samples, loss and compute time of this peer within the current epoch."""

    def __init__(self):
        self.samples, self.loss_sum, self.compute_seconds = 0, 0.0, 0.0

    def add(self, samples: int, loss: float, seconds: float) -> None:
        self.samples += samples
        self.loss_sum += loss * samples
        self.compute_seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)


def train(config: RunConfig, task, peer_id: str, dht, make_link, events: EventLog, options: TrainOptions) -> dict:
    """Train until the run ends, --max-epochs is reached or SIGINT/SIGTERM; returns a summary.

    make_link() builds the coordinator link; it is called only after hivemind has forked its
    processes, so no gRPC thread exists at fork time. ``[averaging] strategy`` picks the loop:
    this one (sync) or peer.diloco_trainer's.
    """
    if config.averaging.strategy == "diloco":
        from peer.diloco_trainer import train_diloco

        return train_diloco(config, task, peer_id, dht, make_link, events, options)
    device = options.device
    model = task.build_model(config.seed)
    if options.initial_state is not None:
        load_into_model(model, options.initial_state[1], what="run's checkpoint")
    model = model.to(device)
    opt = make_optimizer(dht, config, model, task, client_mode=options.client_mode, data_dir=options.data_dir)
    if options.initial_state is not None:
        start_at_epoch(opt, options.initial_state[0])
        events.emit("checkpoint_loaded", epoch=options.initial_state[0], sha256=options.initial_state[2],
                    fingerprint=state_fingerprint(model.state_dict()))
    stop = install_stop_handlers()
    link: CoordinatorLink = make_link().start()
    guard_swarm_epoch(opt.tracker, lambda: link.epoch_limit(config.verification.epoch_slack))
    inputs, targets = task.train_data()
    eval_inputs, eval_targets = (t.to(device) for t in task.eval_data())
    autocast = autocast_context(device)
    sketch_dims = config.verification.sketch_dims
    progress = Progress()
    epoch, micro_batch, epochs_done, total_samples = opt.local_epoch, 0, 0, 0
    meter, proof = EpochMeter(), None
    events.emit("started", epoch=epoch, device=str(device))
    reason = "stopped"

    with ProgressDisplay(peer_id, config.run_id, options.progress) as display:
        # learn the swarm's epoch first, so a late joiner loads state before computing anything
        opt.tracker.fetched_global_progress_this_epoch.wait(FIRST_FETCH_TIMEOUT)
        gated = config.min_peers <= 1 or opt.tracker.global_epoch > 0
        while True:
            if stop.is_set():
                break
            if link.evicted:
                reason = link.evicted
                break
            if (config.epochs and opt.local_epoch >= config.epochs) or link.view.run_finished:
                reason = "run finished"
                break
            if options.max_epochs and epochs_done >= options.max_epochs:
                reason = f"{options.max_epochs} epochs done"
                break
            if needs_state_from_peers(opt):
                display.message(f"behind the swarm (epoch {opt.local_epoch} < {opt.tracker.global_epoch}): "
                                f"loading state from peers")
                load_state(opt, model)
                events.emit("state_loaded", epoch=opt.local_epoch, discarded_samples=meter.samples)
                epoch, micro_batch, meter, proof = opt.local_epoch, 0, EpochMeter(), None
                continue

            if proof is None:  # the parameters this epoch starts from, fixed until the epoch's step
                proof = EpochProof.start(model, config.seed, epoch, sketch_dims, device)
            started = time.perf_counter()
            done = do_micro_batch(task, model, inputs, targets, run_seed=config.seed, epoch=epoch, peer_id=peer_id,
                                  micro_batch=micro_batch, micro_batch_size=config.micro_batch_size,
                                  sketch_dims=sketch_dims, device=device, autocast=autocast)
            compute = time.perf_counter() - started
            proof.micro_batches.append(done)
            # the averaging weight is the sample count hivemind accumulates: pass the true one
            opt.step(batch_size=done.samples)
            opt.zero_grad()
            meter.add(done.samples, done.loss, compute)
            micro_batch += 1
            if not gated:  # after one step, so hivemind announces this peer; see wait_for_peers
                wait_for_peers(opt, config.min_peers, stop, display)
                gated = True

            link.samples_per_second = progress.local_samples_per_second = meter.samples / max(meter.compute_seconds, 1e-9)
            progress.swarm_samples_per_second = link.view.swarm_samples_per_second
            progress.peers = opt.tracker.global_progress.num_peers
            progress.coordinator_reachable = link.view.reachable
            progress.credit, progress.credit_verified = link.view.credit, link.view.credit_verified
            progress.audits_passed, progress.audits_failed = link.view.audits_passed, link.view.audits_failed
            progress.client_mode = options.client_mode
            progress.epoch = link.epoch = opt.local_epoch
            display.update(progress)

            if opt.local_epoch != epoch:
                model.eval()
                metrics = task.evaluate(model, eval_inputs, eval_targets)
                model.train()
                report_id = link.report(epoch, meter.samples, meter.mean_loss, meter.compute_seconds, metrics, proof)
                events.emit("epoch", epoch=epoch, samples=meter.samples, loss=meter.mean_loss,
                            metrics=metrics, report_id=report_id, peers=progress.peers,
                            credit=link.view.credit, credit_verified=link.view.credit_verified,
                            audits_passed=link.view.audits_passed)
                total_samples += meter.samples
                epochs_done += 1
                progress.loss, progress.accuracy, progress.samples = meter.mean_loss, metrics.get("accuracy"), total_samples
                display.epoch_done(progress)
                epoch, micro_batch, meter, proof = opt.local_epoch, 0, EpochMeter(), None

    if reason != "stopped" and not link.evicted:
        link.wait_for_peers_to_catch_up(timeout=config.averaging_timeout)
    torch.save({"epoch": opt.local_epoch, "state_dict": model.state_dict()}, Path(options.data_dir) / MODEL_FILE)
    model.eval()
    final = task.evaluate(model, eval_inputs, eval_targets)
    events.emit("finished", epoch=opt.local_epoch, reason=reason, samples=total_samples, metrics=final)
    link.close(reason)
    opt.shutdown()
    return {"epoch": opt.local_epoch, "reason": reason, "samples": total_samples, "metrics": final}
