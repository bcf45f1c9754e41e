"""The training loop of a peer under ``[averaging] strategy = "diloco"``: phases of local steps, one round each.

An epoch here is one outer round (see peer.diloco). The loop is the sync loop's twin: the same
deterministic micro-batches (epoch = the round the phase feeds), the same per-epoch report through
the CoordinatorLink, the same display and stop handling. The swarm's size comes from the
coordinator's heartbeat, so the DHT stays quiet between rounds.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from peer.assignment import micro_batch_indices
from peer.client import CoordinatorLink
from peer.diloco import STATE_DOWNLOAD_TIMEOUT, DiLoCo
from peer.events import EventLog
from peer.progress import Progress, ProgressDisplay
from peer.runconfig import RunConfig
from peer.trainer import MODEL_FILE, EpochMeter, TrainOptions, install_stop_handlers
from peer.work import autocast_context

FIRST_HEARTBEAT_TIMEOUT = 15.0  # seconds to learn the swarm's epoch from the coordinator before starting


def wait_for_live_peers(link: CoordinatorLink, min_peers: int, stop, display: ProgressDisplay) -> None:
    """Hold the first phase until the coordinator counts min_peers live peers (no DHT polling)."""
    if min_peers <= 1:
        return
    display.message(f"waiting for {min_peers} peers in the swarm before training starts")
    while not stop.is_set() and link.view.live_peers < min_peers:
        stop.wait(0.2)
    display.message(f"{link.view.live_peers} peers in the swarm: training")


def train_diloco(config: RunConfig, task, peer_id: str, dht, make_link, events: EventLog,
                 options: TrainOptions) -> dict:
    """Train until the run ends, --max-epochs is reached or SIGINT/SIGTERM; returns a summary."""
    settings = config.averaging
    device = options.device
    model = task.build_model(config.seed).to(device)
    setup_started = time.monotonic()
    diloco = DiLoCo(dht, config, model, data_dir=options.data_dir)  # forks hivemind's averager processes: before any gRPC thread
    averagers_seconds = time.monotonic() - setup_started
    stop = install_stop_handlers()
    link: CoordinatorLink = make_link().start()
    inner = task.make_optimizer(model.parameters())
    inputs, targets = task.train_data()
    eval_inputs, eval_targets = (t.to(device) for t in task.eval_data())
    autocast = autocast_context(device)
    progress = Progress()
    epochs_done, total_samples, reason = 0, 0, "stopped"
    launched_meter: EpochMeter | None = None  # the phase whose round is in flight (overlap)
    credit = EpochMeter()  # work of failed rounds, credited when a later round carries it

    with ProgressDisplay(peer_id, config.run_id, options.progress) as display:
        # the coordinator's epoch says whether the swarm has moved past the initial weights
        first_heartbeat = time.monotonic() + FIRST_HEARTBEAT_TIMEOUT
        while not link.view.updated and time.monotonic() < first_heartbeat and not stop.is_set():
            stop.wait(0.1)
        if link.view.epoch > 0 and diloco.load_state_from_peers(timeout=STATE_DOWNLOAD_TIMEOUT):
            events.emit("state_loaded", epoch=diloco.epoch, discarded_samples=0)
            display.message(f"loaded the swarm's state at epoch {diloco.epoch}")
        events.emit("started", epoch=diloco.epoch, device=str(device), strategy="diloco",
                    averagers_seconds=round(averagers_seconds, 2),
                    setup_seconds=round(time.monotonic() - setup_started, 2))
        wait_for_live_peers(link, config.min_peers, stop, display)

        def finish_round(final: bool) -> None:
            nonlocal epochs_done, total_samples, launched_meter, credit
            outcome = diloco.complete_round(final=final)
            meter, launched_meter = launched_meter, None
            events.emit("round", epoch=outcome.epoch, applied=outcome.applied, group_size=outcome.group_size,
                        resynced=outcome.resynced, reason=outcome.reason, payload_bytes=outcome.payload_bytes,
                        seconds=round(outcome.seconds, 3))
            credit.add(meter.samples, meter.mean_loss, meter.compute_seconds)
            if not outcome.applied:
                if outcome.resynced:
                    events.emit("state_loaded", epoch=diloco.epoch, discarded_samples=credit.samples)
                    credit = EpochMeter()
                display.message(f"round {outcome.epoch}: {outcome.reason}; local progress kept")
                return
            model.eval()
            metrics = task.evaluate(model, eval_inputs, eval_targets)
            model.train()
            report_id = link.report(outcome.epoch, credit.samples, credit.mean_loss, credit.compute_seconds, metrics)
            events.emit("epoch", epoch=outcome.epoch, samples=credit.samples, loss=credit.mean_loss,
                        metrics=metrics, report_id=report_id, peers=outcome.group_size)
            total_samples += credit.samples
            epochs_done += 1
            progress.loss, progress.accuracy, progress.samples = credit.mean_loss, metrics.get("accuracy"), total_samples
            progress.epoch = link.epoch = diloco.epoch
            display.epoch_done(progress)
            credit = EpochMeter()

        while True:
            if stop.is_set():
                break
            if (config.epochs and diloco.epoch >= config.epochs) or link.view.run_finished:
                reason = "run finished"
                break
            if options.max_epochs and epochs_done >= options.max_epochs:
                reason = f"{options.max_epochs} epochs done"
                break

            phase_epoch = diloco.epoch + (1 if diloco.pending else 0)
            meter = EpochMeter()
            for micro_batch in range(settings.inner_steps):
                if stop.is_set():
                    break
                started = time.perf_counter()
                index = micro_batch_indices(config.seed, phase_epoch, peer_id, micro_batch, len(inputs),
                                            config.micro_batch_size)
                with autocast():
                    loss = task.loss(model, inputs[index].to(device), targets[index].to(device))
                loss.backward()
                inner.step()
                inner.zero_grad()
                meter.add(len(index), loss.item(), time.perf_counter() - started)
                link.samples_per_second = progress.local_samples_per_second = (
                    meter.samples / max(meter.compute_seconds, 1e-9))
                progress.swarm_samples_per_second = link.view.swarm_samples_per_second
                progress.peers = link.view.live_peers
                progress.coordinator_reachable = link.view.reachable
                display.update(progress)
            if stop.is_set():
                break

            if diloco.pending:  # overlap: the previous round ran while this phase computed
                finish_round(final=False)
            rounds_left_in_run = config.epochs - diloco.epoch if config.epochs else None
            final = rounds_left_in_run == 1 or bool(options.max_epochs and epochs_done + 1 >= options.max_epochs)
            diloco.launch_round(expected_group=link.view.live_peers)
            launched_meter = meter
            if not settings.overlap or final:
                finish_round(final=final)

    if reason != "stopped":
        link.wait_for_peers_to_catch_up(timeout=config.averaging_timeout)
    diloco.shutdown()
    torch.save({"epoch": diloco.epoch, "state_dict": model.state_dict()}, Path(options.data_dir) / MODEL_FILE)
    model.eval()
    final_metrics = task.evaluate(model, eval_inputs, eval_targets)
    events.emit("finished", epoch=diloco.epoch, reason=reason, samples=total_samples, metrics=final_metrics)
    link.close(reason)
    return {"epoch": diloco.epoch, "reason": reason, "samples": total_samples, "metrics": final_metrics}
