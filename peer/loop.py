"""The run loop of one peer, for every averaging strategy: micro-batches, proofs, reports, eviction, save.

The loop owns everything that is not about combining work: stop handling, the gate (training
pauses below ``min_peers``, at the start and at every round after, peer/company.py), the
micro-batch (always :func:`peer.work.do_micro_batch`, so the auditor can replay any strategy's
work), the meter, the progress display, evaluation, the signed reports with their proof, eviction
and the final save. A strategy (peer/strategies/) says only how the swarm combines the work: which
data epoch the next micro-batch belongs to, what follows a micro-batch (a hivemind step, an inner
step, a round), and what came of it (see :class:`Outcome`).

Proof chains. Work is kept as chains keyed by data epoch (the epoch a micro-batch's data and
sketch seed come from): a chain starts with the parameters' fingerprint where its first micro-batch
started and gathers one sketch per micro-batch, indices 0, 1, 2, ... A strategy *seals* the chains
when their work goes into a vector sent to the swarm; a round that *applied* that vector turns each
sealed chain into one report (report epoch = chain epoch); a chain whose label comes up again
before it was reported (a round that failed) is reopened and continues with the next indices; a
*discard* (state downloaded, anchors resynced) throws all local work away.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peer.company import CompanyCount, too_few, wait_for_company
from peer.pace import hold_for_run
from peer.errors import UserError
from peer.events import EventLog
from peer.progress import Progress, ProgressDisplay
from peer import timeouts
from peer.runconfig import RunConfig
from peer.work import EpochProof, autocast_context, do_micro_batch

MODEL_FILE = "model.pt"


@dataclass
class TrainOptions:
    data_dir: Path
    device: torch.device
    max_epochs: int  # 0: until the run ends or the peer is stopped
    progress: str
    # (epoch, TrainingState, sha256) of a checkpoint to start from when the swarm has no peer left
    initial_state: tuple | None = None
    client_mode: bool = False  # this peer cannot be dialled: average without hosting (same bool as the DHT's)


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


class EpochMeter:
    """Samples, loss and compute time of some work (a chain, a phase)."""

    def __init__(self):
        self.samples, self.loss_sum, self.compute_seconds = 0, 0.0, 0.0

    def add(self, samples: int, loss: float, seconds: float) -> None:
        self.samples += samples
        self.loss_sum += loss * samples
        self.compute_seconds += seconds

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / max(self.samples, 1)


@dataclass
class Outcome:
    """What a strategy's step did to the work done so far (applied in this order: seal, then the rest)."""

    seal: bool = False  # the work done so far went into a vector sent to the swarm
    applied: bool = False  # the sealed work entered the swarm's model: report it
    discard: bool = False  # local work was thrown away (state downloaded, resync)
    epoch: int = 0  # the swarm epoch this outcome belongs to (events)
    peers: int = 0  # how many peers combined their work in it
    message: str = ""  # for the volunteer's display
    event: dict | None = None  # (name, fields...) of a strategy event, e.g. a DiLoCo round


@dataclass
class Chain:
    proof: EpochProof
    meter: EpochMeter = field(default_factory=EpochMeter)
    sealed: bool = False


class WorkBook:
    """The work done since the last report, as proof chains keyed by data epoch."""

    def __init__(self):
        self.chains: dict[int, Chain] = {}

    def chain(self, label: int, start) -> tuple[Chain, bool]:
        """The open chain of ``label`` (reopened if sealed but not reported); start(): a new EpochProof."""
        chain = self.chains.get(label)
        if chain is None:
            chain = self.chains[label] = Chain(start())
            return chain, True
        chain.sealed = False
        return chain, False

    def seal(self) -> None:
        for chain in self.chains.values():
            chain.sealed = True

    def take_sealed(self) -> list[Chain]:
        sealed = [chain for chain in self.chains.values() if chain.sealed]
        self.chains = {label: chain for label, chain in self.chains.items() if not chain.sealed}
        return sorted(sealed, key=lambda chain: chain.proof.epoch)

    def discard(self) -> int:
        samples = sum(chain.meter.samples for chain in self.chains.values())
        self.chains = {}
        return samples


def wait_for_peers(count, min_peers: int, stop: threading.Event, display: ProgressDisplay, over=lambda: False) -> None:
    """Hold training until ``count()`` (the strategy's view of the swarm) reaches min_peers, or until
    ``over()`` (the run finished or this peer was evicted meanwhile: a peer joining a finished run leaves)."""
    display.message(f"waiting for {min_peers} peers in the swarm before training starts")
    while not stop.is_set() and count() < min_peers and not over():
        stop.wait(0.2)
    display.message(f"{count()} peers in the swarm: training")


def run(config: RunConfig, task, peer_id: str, strategy, model, make_link, events: EventLog,
        options: TrainOptions) -> dict:
    """Train with ``strategy`` until the run ends, --max-epochs, eviction or SIGINT/SIGTERM; returns a summary.

    ``strategy`` was built (its hivemind processes forked) before this is called: make_link() starts
    the coordinator link's gRPC thread, which must not exist at fork time.
    """
    device = options.device
    stop = install_stop_handlers()
    link = make_link().start()
    # a peer asked to stop no longer heartbeats: should its leaving hang (in hivemind's shutdown, say),
    # the coordinator stops counting it as a live peer after peer_timeout instead of waiting on it
    link.leaving = stop
    inputs, targets = task.train_data()
    eval_inputs, eval_targets = (t.to(device) for t in task.eval_data())
    autocast = autocast_context(device)
    sketch_dims = config.verification.sketch_dims
    progress = Progress(client_mode=options.client_mode)
    book, speed = WorkBook(), EpochMeter()
    epochs_done, total_samples, reason = 0, 0, "stopped"
    failure = None  # a UserError that ended the loop: the CLI prints it as its error line

    def evaluate() -> dict:
        model.eval()
        metrics = task.evaluate(model, eval_inputs, eval_targets)
        model.train()
        return metrics

    def report(outcome: Outcome) -> None:
        nonlocal epochs_done, total_samples, speed
        chains = book.take_sealed()
        metrics = evaluate()
        for chain in chains:
            meter = chain.meter
            report_id = link.report(chain.proof.epoch, meter.samples, meter.mean_loss, meter.compute_seconds, metrics,
                                    chain.proof)
            events.emit("epoch", epoch=chain.proof.epoch, samples=meter.samples, loss=meter.mean_loss,
                        metrics=metrics, report_id=report_id, peers=outcome.peers, credit=link.view.credit,
                        credit_verified=link.view.credit_verified, audits_passed=link.view.audits_passed,
                        audits_failed=link.view.audits_failed)
            total_samples += meter.samples
            progress.loss = meter.mean_loss
        epochs_done += 1
        progress.accuracy, progress.samples = metrics.get("accuracy"), total_samples
        progress.epoch = link.epoch = strategy.epoch
        display.epoch_done(progress)
        speed = EpochMeter()

    def handle(outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            if outcome.event is not None:
                events.emit(**outcome.event)
            if outcome.seal:
                book.seal()
            if outcome.discard:
                events.emit("state_loaded", epoch=strategy.epoch, discarded_samples=book.discard())
            if outcome.applied:
                report(outcome)
            if outcome.message:
                display.message(outcome.message)

    def run_over() -> bool:
        """The run ended for this peer (finished, or evicted): no wait should outlast it."""
        return link.view.run_finished or bool(link.evicted)

    counted = CompanyCount(trust_after=timeouts.COMPANY_TRUST * config.averaging_timeout)

    def company() -> int | None:
        return counted(link.view_is_fresh(), link.view.live_peers, strategy.swarm_peers())

    def others_finished() -> bool:
        """The others completed the run's epochs (and left): no company will come for the last ones.

        The coordinator's run epoch, a quorum of the live peers, can stay below the end then (the
        peers that finished left), so this peer would wait for company forever."""
        top = strategy.swarm_epoch()
        return bool(config.epochs) and top is not None and top >= config.epochs

    def pause_for_company() -> None:
        """Below min_peers after training started: hold, state kept, until enough peers are back."""
        events.emit("waiting", epoch=strategy.epoch, peers=company(), min_peers=config.min_peers)
        present = wait_for_company(company, config.min_peers, stop, display.message,
                                   over=lambda: run_over() or others_finished())
        if not stop.is_set() and not link.view.run_finished and not link.evicted:
            events.emit("resumed", epoch=strategy.epoch, peers=present)
            display.message("the others finished the run: training its last epochs alone" if others_finished()
                            else f"{present} peers in the swarm: training")

    with ProgressDisplay(peer_id, config.run_id, options.progress) as display:
        started = strategy.start(link, stop, display, events)
        events.emit("started", epoch=strategy.epoch, device=str(device), strategy=strategy.name, **started)
        gated = config.min_peers <= 1 or not strategy.needs_gate()
        if not gated and not strategy.gate_after_first_step:
            wait_for_peers(lambda: strategy.peers(link), config.min_peers, stop, display,
                           over=run_over)
            gated = True
        held = None  # the epoch this peer last held before (peer/pace.py)
        while True:
            if stop.is_set():
                break
            if link.evicted:
                reason = link.evicted
                break
            if (config.epochs and strategy.epoch >= config.epochs) or link.view.run_finished:
                reason = "run finished"
                break
            if options.max_epochs and epochs_done >= options.max_epochs:
                reason = f"{options.max_epochs} epochs done"
                break
            try:
                caught_up = strategy.catch_up(display)
            except UserError as error:  # a bounded wait passed (e.g. no donor's state): leave, said once
                reason, failure = str(error), str(error)
                break
            if caught_up:
                handle(caught_up)
                continue
            if gated and config.min_peers > 1 and too_few(company(), config.min_peers) and not others_finished():
                pause_for_company()
                continue
            if strategy.label() not in book.chains and strategy.label() != held and hold_for_run(
                    strategy.label, lambda: link.epoch_limit(config.verification.epoch_slack), stop,
                    display.message, over=run_over, nudge=link.refresh,
                    bound=config.averaging_timeout):
                held = strategy.label()  # at most one (bounded) hold per epoch
                continue  # the swarm may have moved (state to load, run finished): look again

            label = strategy.label()
            chain, new = book.chain(label, lambda: EpochProof.start(model, config.seed, label, sketch_dims, device))
            if new:
                strategy.chain_started()
            began = time.perf_counter()
            done = do_micro_batch(task, model, inputs, targets, run_seed=config.seed, epoch=label, peer_id=peer_id,
                                  micro_batch=len(chain.proof.micro_batches),
                                  micro_batch_size=config.micro_batch_size, sketch_dims=sketch_dims, device=device,
                                  autocast=autocast)
            compute = time.perf_counter() - began
            chain.proof.micro_batches.append(done)
            chain.meter.add(done.samples, done.loss, compute)
            speed.add(done.samples, done.loss, compute)
            try:
                outcomes = strategy.after_micro_batch(done, link)
            except UserError as error:  # a bounded wait inside the strategy's step passed: leave
                reason, failure = str(error), str(error)
                break
            if not gated:  # after one step, so hivemind announces this peer (sync)
                wait_for_peers(lambda: strategy.peers(link), config.min_peers, stop, display,
                           over=run_over)
                gated = True

            link.samples_per_second = progress.local_samples_per_second = (
                speed.samples / max(speed.compute_seconds, 1e-9))
            progress.swarm_samples_per_second = link.view.swarm_samples_per_second
            progress.peers = strategy.peers(link)
            progress.coordinator_reachable = link.view.reachable
            progress.credit, progress.credit_verified = link.view.credit, link.view.credit_verified
            progress.audits_passed, progress.audits_failed = link.view.audits_passed, link.view.audits_failed
            progress.epoch = link.epoch = strategy.epoch
            display.update(progress)
            handle(outcomes)

    if reason != "stopped" and not link.evicted and failure is None:
        link.wait_for_peers_to_catch_up(timeout=timeouts.FINAL_CATCH_UP * config.averaging_timeout)
    torch.save({"epoch": strategy.epoch, "state_dict": model.state_dict()}, Path(options.data_dir) / MODEL_FILE)
    model.eval()
    final = task.evaluate(model, eval_inputs, eval_targets)
    events.emit("finished", epoch=strategy.epoch, reason=reason, samples=total_samples, metrics=final,
                credit=link.view.credit, credit_verified=link.view.credit_verified,
                audits_passed=link.view.audits_passed, audits_failed=link.view.audits_failed)
    link.close(reason)
    strategy.shutdown()
    return {"epoch": strategy.epoch, "reason": reason, "samples": total_samples, "metrics": final, "error": failure}
