"""``[averaging] strategy = "sync"``: hivemind.Optimizer averages gradients every target batch.

An epoch is hivemind's: it ends when the swarm has accumulated ``target_batch_size`` samples and
the Optimizer's step averaged their gradients (and then the parameters). The loop's micro-batch
leaves its gradient in the model; :meth:`after_micro_batch` hands it to the Optimizer with the
true sample count (the averaging weight). Each peer computes its share of the target and then
holds its step until the swarm's batch is complete (peer/fair_share.py); a hold that ran out is not
repeated within its epoch. The loop's pacing hold (peer/pace.py) is another one, before an epoch.
"""

from __future__ import annotations

import time

from peer.fair_share import ShareHold, count_peers, hold_until_swarm_batch
from peer.loop import Outcome
from peer.progress_guard import guard_swarm_epoch
from peer.progress_reread import reread_swarm_progress
from peer.swarm import FIRST_FETCH_TIMEOUT, load_state, make_optimizer, needs_state_from_peers, start_at_epoch


class SyncStrategy:
    name = "sync"
    gate_after_first_step = True  # hivemind announces a peer only once it has accumulated samples

    def __init__(self, dht, config, model, task, client_mode: bool, data_dir=None):
        self.config, self.model = config, model
        # data_dir: where the averagers write their attestation records (peer/attestations.py)
        self.opt = make_optimizer(dht, config, model, task, client_mode=client_mode, data_dir=data_dir)
        # opt.step() loads state by itself when it finds the peer behind: bounded and checked there too
        self.opt.load_state_from_peers = lambda **_: load_state(self.opt, self.model)

    @property
    def epoch(self) -> int:
        return self.opt.local_epoch

    def start_at(self, epoch: int, state=None) -> str | None:
        """Continue from a checkpoint at ``epoch`` (the model holds its parameters already); a
        checkpoint that carries the optimizer's state (peer/checkpoint.py) restores it too. Returns a
        fingerprint of the optimizer state as restored (peer.resume.optimizer_fingerprint), or None."""
        restored = None
        if state is not None and state.strategy == "sync" and state.optimizer is not None:
            from peer.resume import restore_optimizer

            restored = restore_optimizer(self.opt, epoch, state.optimizer)
        start_at_epoch(self.opt, epoch)
        return restored

    def start(self, link, stop, display, events) -> dict:
        self.stop, self.display, self.events = stop, display, events
        self.share_hold = ShareHold(self.config.target_batch_size)
        self.count = count_peers(self.opt.tracker)  # before the guard: it counts the records the guard kept
        self.highest = guard_swarm_epoch(self.opt.tracker,
                                         lambda: link.epoch_limit(self.config.verification.epoch_slack))
        # learn the swarm's epoch first, so a late joiner loads state before computing anything
        self.opt.tracker.fetched_global_progress_this_epoch.wait(FIRST_FETCH_TIMEOUT)
        return {}

    def needs_gate(self) -> bool:
        return self.opt.tracker.global_epoch == 0

    def peers(self, link) -> int:
        return self.opt.tracker.global_progress.num_peers

    def swarm_epoch(self) -> int:
        """The swarm's epoch as the (guarded) progress records say, or said at their highest (the records
        of peers that finished the run and left expire)."""
        return max(self.opt.tracker.global_epoch, self.highest.epoch)

    def swarm_peers(self) -> int:
        """The swarm's own count: the peers behind the progress records (the guard kept), this one included."""
        return self.count.peers

    def catch_up(self, display) -> list[Outcome]:
        if self._others_ended_the_run():
            return self._load_final_state(display)
        if not needs_state_from_peers(self.opt):
            return []
        display.message(f"behind the swarm (epoch {self.opt.local_epoch} < {self.opt.tracker.global_epoch}): "
                        f"loading state from peers")
        load_state(self.opt, self.model, display.message)  # StateUnavailable after its bound: the loop ends
        return [Outcome(discard=True, epoch=self.opt.local_epoch)]

    def _others_ended_the_run(self) -> bool:
        """Peers still announced in the swarm reached the run's last epoch while this one is behind.

        Its next step would average with nobody (they finished and only wait, bounded, for the
        laggards before leaving): measured, a peer one epoch behind ran its last epoch alone and ended
        with other parameters than the swarm's. It downloads the swarm's final state instead."""
        epochs = self.config.epochs
        return bool(epochs) and self.opt.tracker.global_epoch >= epochs > self.opt.local_epoch

    def _load_final_state(self, display) -> list[Outcome]:
        display.message(f"the others finished the run (epoch {self.opt.tracker.global_epoch}): "
                        f"loading their final state")
        before = self.opt.local_epoch
        load_state(self.opt, self.model, display.message)  # no donor left: trains its last epochs alone
        if self.opt.local_epoch == before:
            return []
        return [Outcome(discard=True, epoch=self.opt.local_epoch)]

    def label(self) -> int:
        return self.opt.local_epoch

    def chain_started(self) -> None:
        pass

    def after_micro_batch(self, done, link) -> list[Outcome]:
        before = self.opt.local_epoch
        self._hold_for_swarm_batch(before, self.opt.grad_averager.local_samples_accumulated + done.samples)
        if self.config.epochs and self.opt.local_epoch == self.config.epochs - 1 and self.opt.tracker.ready_to_update_epoch:
            # the run's last step: read the records now (the tracker's may be seconds old) in case the
            # others already finished it, so this peer loads their state instead of stepping alone
            try:
                reread_swarm_progress(self.opt.tracker)
            except Exception:  # the DHT did not answer: the tracker's view stands
                pass
            if self._others_ended_the_run():
                return self._load_final_state(self.display)
        # the averaging weight is the sample count hivemind accumulates: pass the true one
        self.opt.step(batch_size=done.samples)
        self.opt.zero_grad()
        if self.opt.local_epoch == before:
            return []
        return [Outcome(seal=True, applied=True, epoch=before, peers=self.opt.tracker.global_progress.num_peers)]

    def _hold_for_swarm_batch(self, epoch: int, accumulated: int) -> None:
        """At this peer's share of the target, hold the step until the swarm's batch adds up (peer/fair_share.py)."""
        peers = self.count.peers
        if not self.share_hold.due(epoch, accumulated, peers):
            return
        began = time.monotonic()
        why = hold_until_swarm_batch(self.opt.tracker, self.count, self.config.target_batch_size, accumulated,
                                     self.stop, bound=self.config.averaging_timeout)
        self.share_hold.ended(epoch, why)
        self.events.emit("share_hold", epoch=epoch, samples=accumulated, peers=peers, ended=why,
                         seconds=round(time.monotonic() - began, 3))

    def shutdown(self) -> None:
        self.opt.shutdown()
