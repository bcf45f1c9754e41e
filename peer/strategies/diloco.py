"""``[averaging] strategy = "diloco"``: phases of ``inner_steps`` local steps, then one round (peer.diloco).

An epoch is one outer round. The loop's micro-batch leaves its gradient in the model and the
inner optimizer (the task's own) steps on it; after ``inner_steps`` of them the phase's
pseudo-gradient goes to the swarm (:meth:`DiLoCo.launch_round`) and the round's result is applied,
at once or, with ``overlap``, after the next phase. The swarm's size comes from the coordinator's
heartbeat, so the DHT stays quiet between rounds.

Replayable phases. A phase's micro-batches are labelled with the epoch of the round they feed
(the anchor's epoch, +1 while an overlapped round is in flight). Without overlap a phase starts
at the anchor; with ``inner_state = "reset"`` (the default) the inner optimizer is also fresh
whenever a new proof chain starts (see peer/loop.py), so the work behind one report is a
deterministic function of (anchor, assigned data) and an auditor holding the anchor replays steps
0..j (coordinator/phase_replay.py). After a failed round the chain goes on (no reset), so it stays
one trajectory from the anchor. ``inner_state = "keep"`` carries the optimizer's state across
phases, as DiLoCo's paper does: better held-out loss on digits (2 peers, H=16, 10,240 samples,
in-process, 5 seeds: 0.46 against 0.97 with reset; H=50: 0.27 against 0.38; ``python -m
benchmarks.inner_reset``; on bytelm, H=50, reset costs nothing: 2.40 against 2.43), but only each
phase's first step can then be replayed. With overlap a
phase starts from where the last one ended, not from an anchor: its sketches are reported, and
only epoch 0 (the initial model) can be replayed.
"""

from __future__ import annotations

import time

from peer import timeouts
from peer.diloco import STATE_DOWNLOAD_TIMEOUT, DiLoCo
from peer.loop import Outcome

FIRST_HEARTBEAT_TIMEOUT = timeouts.FIRST_HEARTBEAT  # learning the swarm's epoch from the coordinator


class DiLoCoStrategy:
    name = "diloco"
    gate_after_first_step = False  # the coordinator counts live peers: gate before any work

    def __init__(self, dht, config, model, task, max_rounds: int = 0, data_dir=None):
        self.config, self.model, self.task = config, model, task
        self.settings = config.averaging
        self.max_rounds = max_rounds  # --max-epochs: the last round is completed at once and resynced
        started = time.monotonic()
        self.diloco = DiLoCo(dht, config, model, data_dir=data_dir)  # forks hivemind's averager processes: before any gRPC thread
        self.averagers_seconds = time.monotonic() - started
        self.setup_started = started
        self.inner = task.make_optimizer(model.parameters())
        self.steps = 0  # inner steps in the current phase
        self.rounds_applied = 0
        self.resumed = False

    @property
    def epoch(self) -> int:
        return self.diloco.epoch

    def start_at(self, epoch: int, state=None) -> str | None:
        """Continue from a checkpoint at ``epoch``: the model (the checkpoint's anchor) was loaded
        before the anchor was taken; a DiLoCo checkpoint's outer momentum is restored too. Returns
        a fingerprint of the momentum as restored (peer.checkpoint.state_fingerprint), or None."""
        momentum = state.momentum if state is not None and state.strategy == "diloco" else None
        self.diloco.start_at(epoch, momentum)
        self.resumed = True  # nobody was left to load state from when the coordinator said so
        return self.diloco.momentum_fingerprint() if momentum else None

    def start(self, link, stop, display, events) -> dict:
        # the coordinator's epoch says whether the swarm has moved past the initial weights
        deadline = time.monotonic() + FIRST_HEARTBEAT_TIMEOUT
        while not link.view.updated and time.monotonic() < deadline and not stop.is_set():
            stop.wait(0.1)
        if not self.resumed and link.view.epoch > 0:
            if self.diloco.load_state_from_peers(timeout=STATE_DOWNLOAD_TIMEOUT):
                events.emit("state_loaded", epoch=self.diloco.epoch, discarded_samples=0)
                display.message(f"loaded the swarm's state at epoch {self.diloco.epoch}")
            else:  # never silently from the initial weights once the run has trained
                display.message(f"could not load the swarm's state (the run is at epoch {link.view.epoch}): "
                                f"starting from this peer's own weights; the first round resyncs to the swarm's")
        return {"averagers_seconds": round(self.averagers_seconds, 2),
                "setup_seconds": round(time.monotonic() - self.setup_started, 2)}

    def needs_gate(self) -> bool:
        return True

    def peers(self, link) -> int:
        return link.view.live_peers

    def swarm_peers(self) -> None:
        """No count of its own (the DHT stays quiet between rounds): with a stale view, train on."""
        return None

    def swarm_epoch(self) -> None:
        """No view of the others' epochs between rounds."""
        return None

    def catch_up(self, display) -> list[Outcome]:
        return []  # a peer behind is caught up inside a round (resync), see peer.diloco

    def label(self) -> int:
        return self.diloco.epoch + (1 if self.diloco.pending else 0)

    def chain_started(self) -> None:
        if self.settings.inner_state == "reset":
            self.inner = self.task.make_optimizer(self.model.parameters())

    def after_micro_batch(self, done, link) -> list[Outcome]:
        self.inner.step()  # on the gradient do_micro_batch left in the model
        self.steps += 1
        if self.steps < self.settings.inner_steps:
            return []
        self.steps = 0
        outcomes = []
        if self.diloco.pending:  # overlap: the previous round ran while this phase computed
            outcomes += self._finish(final=False)
        rounds_left = self.config.epochs - self.diloco.epoch if self.config.epochs else None
        final = rounds_left == 1 or bool(self.max_rounds and self.rounds_applied + 1 >= self.max_rounds)
        self.diloco.launch_round(expected_group=link.view.live_peers)
        outcomes.append(Outcome(seal=True))
        if not self.settings.overlap or final:
            outcomes += self._finish(final=final)
        return outcomes

    def _finish(self, final: bool) -> list[Outcome]:
        result = self.diloco.complete_round(final=final)
        event = dict(event="round", epoch=result.epoch, applied=result.applied, group_size=result.group_size,
                     resynced=result.resynced, reason=result.reason, payload_bytes=result.payload_bytes,
                     seconds=round(result.seconds, 3))
        if result.applied:
            self.rounds_applied += 1
            return [Outcome(applied=True, epoch=result.epoch, peers=result.group_size, event=event)]
        if result.resynced:  # the anchors were averaged and the model restarted from them: local work is gone
            return [Outcome(discard=True, epoch=self.diloco.epoch, peers=result.group_size, event=event,
                            message=f"round {result.epoch}: {result.reason}; restarted from the swarm's anchor")]
        return [Outcome(epoch=result.epoch, peers=result.group_size, event=event,
                        message=f"round {result.epoch}: {result.reason}; local progress kept")]

    def shutdown(self) -> None:
        self.diloco.shutdown()
