"""DiLoCo: many local steps, then one compressed all-reduce of where they led (low-communication averaging).

Each peer keeps an *anchor* ``g`` (the parameters the swarm agreed on last) and outer momentum ``m``,
both identical on every peer. A phase is ``inner_steps`` (H) local steps of the task's own optimizer
on the peer's deterministic micro-batches, starting from its model ``x``. Then a *round*:

1. the pseudo-gradient ``delta = g - x`` is all-reduced (mean over the group) with the configured
   codec, through a hivemind ``DecentralizedAverager`` driven directly (no hivemind.Optimizer: its
   progress tracker writes a DHT record on every step and its matchmaking polls continuously; here
   the swarm is silent between rounds, except a state-sharing announcement every 30 s);
2. an outer Nesterov SGD step (``outer_lr`` 0.7, ``outer_momentum`` 0.9) moves ``g`` by the mean
   pseudo-gradient, identically on every peer, and ``x`` restarts from the new ``g``.

Overlap (``overlap = true``): the round's all-reduce runs in the background while the next phase
computes from where the last one ended; its outer step is applied one phase late, and the local
progress made meanwhile is kept on top of the new anchor (``x = g_new + (x - x_at_launch)``), as in
streaming / one-step-delayed DiLoCo. The last round of a run is always completed at once.

Round numbers. The epoch of a peer is the number of outer steps its anchor has received; it is not
negotiated through hivemind's progress tracker. Peers meet for a round by time (matchmaking among
those that finished their phase within ``averaging_timeout`` of each other), and every peer sends
its epoch plus a fingerprint (a fixed random projection) of its anchor and momentum in the round's
gather. The all-reduce hands every member the same decoded average (peer.same_result_allreduce; with
hivemind's own, each member would get its own codec error and the anchors would drift apart). A peer
that was behind (a missed or rejected round) shows a different fingerprint, everyone in the group sees it, and the group
immediately runs a *resync* round: anchor and momentum are averaged uncompressed over the peers at
the group's highest epoch (the others take weight 0), and every member adopts that epoch. The run's
last round is always followed by a resync, so peers finish with the same parameters.

Group formation. Before each round the averagers are told the coordinator's count of live peers as
the target group size, so the all-reduce starts as soon as they have all joined, instead of after
hivemind's whole matchmaking window (which stays the upper bound when a peer is missing).

Checks (HIVEMIND_NOTES traps 13, 14, 8). Every round has a matchmaking deadline and an all-reduce
timeout, and the wait for its result is bounded too. What comes back is checked before use: a group
of at least two, finite values, and the projection of the averaged pseudo-gradient must equal the
mean of the projections the members sent (the projection is linear, so a dropped or corrupted part
shows up), within the codec's error. With a robust ``[averaging] aggregator`` (the default) the
average is not the mean, and the check only bounds it (each part's norm is at most sqrt(n) times the
largest member's); the reducers' rule (peer.robust) is what limits a poisoning member there. A failed or rejected round changes nothing: ``x`` keeps its
local progress, which the next round's pseudo-gradient then carries. A late joiner downloads the
anchor, momentum and epoch from a peer (bounded by a timeout; shapes, finiteness and metadata
checked) before its first phase.

Sparse codec and error feedback (``[averaging] compression = "sparse"``, peer.sparse_codec). The
peer sends ``sparsify(delta + residual)`` (top-k of each chunk, low-bit values; the wire carries it
losslessly) and keeps ``residual = delta + residual - sent``, so what one round drops is sent in a
later one. The residual lives in this object across rounds, beside the anchor and momentum, but
unlike them it is the peer's own (never averaged, shared or checkpointed):
- a round that is not applied (no group, a failed or rejected average) restores the residual from
  before its launch, since the model keeps that phase's progress and the next delta carries it again;
- a resync (anchors differed, and the run's last round) and a late joiner's state download set it
  to zero: the model restarts from the swarm's anchor and the local work behind the residual is
  dropped with the rest of the local progress; a restarted or resumed peer starts from zero too.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch

from peer import timeouts
from peer.compression import codec_of, error_bound, error_figure
from peer.runconfig import RunConfig
from peer.sparse_codec import ErrorFeedback, SparseCodec

log = logging.getLogger("potluck.diloco")

SKETCH_DIM = 4  # random projections per fingerprint
SKETCH_SEED = 20261128
# Relative distance between two peers' anchors (momenta) that triggers a resync. Every member gets the
# same decoded average, bit for bit (peer.same_result_allreduce), so same-epoch anchors are equal; the
# tolerance is only a margin.
ANCHOR_TOLERANCE = 1e-4
MOMENTUM_TOLERANCE = 1e-3
SKETCH_SIGMAS = 6.0  # a projection of independent codec errors stays within this many standard deviations
REQUEST_TIMEOUT = timeouts.REQUEST  # named deadlines: peer/timeouts.py
STATE_DOWNLOAD_TIMEOUT = timeouts.STATE_TRY  # one try; passed -> go on from own state, a round resyncs it


class Sketch:
    """A fixed random linear projection of a list of tensors to SKETCH_DIM numbers (float64)."""

    def __init__(self, tensors: list[torch.Tensor], seed: int = SKETCH_SEED):
        generator = torch.Generator().manual_seed(seed)
        self.vectors = [torch.randn(SKETCH_DIM, t.numel(), generator=generator) for t in tensors]

    def __call__(self, tensors: list[torch.Tensor]) -> list[float]:
        total = torch.zeros(SKETCH_DIM, dtype=torch.float64)
        for vectors, tensor in zip(self.vectors, tensors):
            total += (vectors @ tensor.detach().reshape(-1).float()).double()
        return total.tolist()


def norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def outer_step_reference(anchor, momentum, mean_delta, lr: float, mu: float):
    """The outer Nesterov SGD step written out (what torch.optim.SGD(nesterov=True) does); for tests."""
    momentum = [mu * m + d for m, d in zip(momentum, mean_delta)]
    anchor = [a - lr * (d + mu * m) for a, d, m in zip(anchor, mean_delta, momentum)]
    return anchor, momentum


def restart_on_anchor(params, anchor, launched) -> None:
    """x = new anchor + what was learnt since the round's launch (nothing, without overlap).

    Written as ``anchor + (x - x_at_launch)``, not ``x + (anchor - x_at_launch)``: without overlap the
    learnt part is exactly zero and the model *is* the anchor, bit for bit. The other order rounds
    wherever anchor and x are far apart (a parameter crossing zero), and an auditor replaying the next
    phase from the anchor then diverges from the peer within a few Adam steps: an honest peer failed
    its audit that way (relative error 0.016 at the sixth step).
    """
    for param, new, x in zip(params, anchor, launched):
        param.copy_((new + (param.detach().cpu().to(new.dtype) - x.to(new.dtype))).to(param.device, param.dtype))


def _make_averager_class():
    from hivemind.averaging import DecentralizedAverager
    from hivemind.utils import MPFuture

    from peer.averagers import PotluckAveraging

    class GroupSizedAverager(PotluckAveraging, DecentralizedAverager):
        """A DecentralizedAverager whose expected group size can change between rounds.

        Its all-reduce is potluck's (peer.averagers): robust rule, same decoded result on every member.

        hivemind's leader waits the whole matchmaking window unless the group reaches
        ``target_group_size``, fixed at construction. The coordinator knows how many peers are
        alive, so before each round the group is declared full at that size and all-reduce starts
        as soon as everyone has joined; the window is then only the upper bound for a missing peer.
        """

        def set_target_group_size(self, size: int | None) -> None:
            future = MPFuture()
            self._outer_pipe.send(("_set_target_group_size", [], dict(size=size, future=future)))
            future.result(timeout=REQUEST_TIMEOUT * 5)

        async def _set_target_group_size(self, size, future):  # runs in the averager's process
            self._matchmaking.target_group_size = size
            self._matchmaking.potential_leaders.target_group_size = size
            future.set_result(None)

    class StateAverager(GroupSizedAverager):
        """Averages and shares anchor + outer momentum; the metadata a joiner downloads holds the epoch."""

        epoch = 0

        def get_current_state(self):
            with self.get_tensors() as tensors:
                return {"epoch": int(self.epoch)}, [t.clone() for t in tensors], self.tensor_infos

    return GroupSizedAverager, StateAverager


@dataclass
class RoundOutcome:
    """What one round did, for the report and the event log."""

    epoch: int  # the epoch the round's outer step belongs to
    applied: bool  # the outer step was applied
    group_size: int = 0
    resynced: bool = False
    reason: str = ""
    payload_bytes: int = 0  # bytes of this peer's compressed pseudo-gradient (one copy)
    seconds: float = 0.0  # from launch to result: matchmaking + all-reduce (+ the overlapped phase)


class DiLoCo:
    """The outer loop's state and rounds for one peer; the caller runs the inner steps on ``model``."""

    def __init__(self, dht, config: RunConfig, model: torch.nn.Module, prefix: str | None = None,
                 data_dir=None):
        from peer.attestations import Attestations

        GroupSizedAverager, StateAverager = _make_averager_class()
        settings = config.averaging
        self.config = config
        self._named_parameters = list(model.named_parameters())
        self.params = [p for _, p in self._named_parameters]
        self.anchor = [p.detach().cpu().clone() for p in self.params]  # plain leaves: the averager adds in place
        self.outer = torch.optim.SGD(self.anchor, lr=settings.outer_lr, momentum=settings.outer_momentum,
                                     nesterov=settings.outer_momentum > 0)
        self.momentum = []
        for tensor in self.anchor:
            buffer = torch.zeros_like(tensor)  # created now so it can be shared and averaged from round 0
            self.outer.state[tensor]["momentum_buffer"] = buffer
            self.momentum.append(buffer)
        self.deltas = [torch.zeros_like(t) for t in self.anchor]
        self.sketch = Sketch(self.anchor)
        self.codec = codec_of(settings)
        # the peer's own residual of the sparse codec (see the module docstring), None for dense codecs
        self.feedback = None if not isinstance(self.codec, SparseCodec) else ErrorFeedback(
            [t.shape for t in self.anchor], self.codec.chunk, self.codec.density, self.codec.bits)
        self._sent_bytes = 0  # the sparse encoding of the last pseudo-gradient sent, measured
        prefix = prefix or config.run_id
        common = dict(
            dht=dht, start=True, min_matchmaking_time=config.matchmaking_time,
            request_timeout=min(REQUEST_TIMEOUT, config.matchmaking_time / 2),
            allreduce_timeout=config.averaging_timeout, next_chunk_timeout=config.averaging_timeout / 2,
            min_group_size=2, client_mode=False, rule=settings.rule,
        )
        self.robust = settings.aggregator != "mean"
        attestations = None if data_dir is None else Attestations(
            data_dir, "diloco_delta", config.seed, config.verification.sketch_dims)
        self.delta_averager = GroupSizedAverager(
            self.deltas, prefix=f"{prefix}_diloco_delta_{settings.aggregator}",
            compression=self.codec, allow_state_sharing=False, attestations=attestations, **common,
        )
        self.state_averager = StateAverager(
            [*self.anchor, *self.momentum], prefix=f"{prefix}_diloco_state", allow_state_sharing=True, **common,
        )
        self.epoch = 0
        self._pending = None  # (control, snapshot of x at launch, sent gather, launch time)
        self._target_group_size = None

    # -- epoch ---------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self.state_averager.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.state_averager.epoch = value

    # -- state of a late joiner ----------------------------------------------------------------

    def load_state_from_peers(self, timeout: float = STATE_DOWNLOAD_TIMEOUT) -> bool:
        """Download anchor, momentum and epoch from a peer (bounded, checked); False when none was usable."""
        try:
            loaded = self.state_averager.load_state_from_peers(timeout=timeout)
        except Exception as error:  # a timeout or a peer that went away: train from our own state
            log.warning("could not load state from peers: %r", error)
            return False
        if loaded is None:
            return False
        metadata, tensors = loaded
        expected = [*self.anchor, *self.momentum]
        epoch = metadata.get("epoch") if isinstance(metadata, dict) else None
        if not isinstance(epoch, int) or epoch < 0 or len(tensors) != len(expected):
            log.warning("state from peers rejected: bad metadata or tensor count")
            return False
        for have, got in zip(expected, tensors):
            if got.shape != have.shape or not torch.isfinite(got).all():
                log.warning("state from peers rejected: wrong shape or non-finite values")
                return False
        with torch.no_grad(), self.state_averager.get_tensors():
            for have, got in zip(expected, tensors):
                have.copy_(got)
            self.epoch = epoch
        self._restart_from_anchor()
        if self.feedback is not None:
            self.feedback.reset()
        return True

    def start_at(self, epoch: int, momentum: dict | None = None) -> None:
        """Continue a run from a checkpoint: the model (hence the anchor) holds the checkpoint's anchor;
        ``momentum`` (parameter name -> tensor, as the coordinator's observer saved it) is the outer
        momentum. What a resumed run loses: each peer's local progress since the last round, an
        overlapped round in flight, and the inner optimizer's state (fresh each phase with
        ``inner_state = "reset"``, so that one only matters with "keep")."""
        from peer.errors import UserError

        if momentum:
            names = [name for name, _ in self._named_parameters]
            if set(momentum) != set(names):
                raise UserError("the run's checkpoint does not fit this task's model (momentum tensor names)")
            for name, have in zip(names, self.momentum):
                got = momentum[name]
                if got.shape != have.shape or got.dtype != have.dtype or not torch.isfinite(got).all():
                    raise UserError(f"the run's checkpoint has an unusable momentum for {name}")
            with torch.no_grad(), self.state_averager.get_tensors():
                for name, have in zip(names, self.momentum):
                    have.copy_(momentum[name])
        self.epoch = epoch

    def momentum_fingerprint(self) -> str:
        """peer.checkpoint.state_fingerprint of the outer momentum, named as in a checkpoint."""
        from peer.checkpoint import MOMENTUM_PREFIX, state_fingerprint

        with self.state_averager.get_tensors():
            return state_fingerprint({f"{MOMENTUM_PREFIX}{name}": m.clone()
                                      for (name, _), m in zip(self._named_parameters, self.momentum)})

    def _restart_from_anchor(self) -> None:
        with torch.no_grad():
            for param, anchor in zip(self.params, self.anchor):
                param.copy_(anchor.to(param.device, param.dtype))

    # -- rounds --------------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def launch_round(self, expected_group: int = 0) -> None:
        """Start averaging this phase's pseudo-gradient (in the background).

        expected_group: how many peers should meet (e.g. the coordinator's live count); when >= 2,
        the round starts as soon as that many have joined instead of waiting the whole window.
        """
        assert self._pending is None, "complete the previous round first"
        target = expected_group if expected_group >= 2 else None
        if target != self._target_group_size:
            for averager in (self.delta_averager, self.state_averager):
                averager.set_target_group_size(target)
            self._target_group_size = target
        snapshot = [p.detach().cpu().clone() for p in self.params]
        with torch.no_grad(), self.delta_averager.get_tensors() as deltas:
            for delta, anchor, x in zip(deltas, self.anchor, snapshot):
                delta.copy_(anchor - x.to(anchor.dtype))
            if self.feedback is not None:  # what goes on the wire: the sparsified delta + residual
                for delta, out in zip(deltas, self.feedback.compress(deltas)):
                    delta.copy_(out)
                self._sent_bytes = sum(len(self.codec.compress(d).buffer) for d in deltas)
            sent = {
                "epoch": self.epoch,
                "anchor": self.sketch(self.anchor), "anchor_norm": norm(self.anchor),
                "momentum": self.sketch(self.momentum), "momentum_norm": norm(self.momentum),
                "delta": self.sketch(deltas), "delta_norm": norm(deltas), "delta_error": self._codec_error(deltas),
            }
        control = self.delta_averager.step(gather=sent, weight=1.0, timeout=self.config.averaging_timeout,
                                           allow_retries=True, wait=False)
        self._pending = (control, snapshot, sent, time.monotonic())

    def complete_round(self, final: bool = False) -> RoundOutcome:
        """Wait (bounded) for the launched round, check it, apply the outer step or keep local params."""
        control, snapshot, sent, launched = self._pending
        self._pending = None
        epoch = self.epoch
        wait = 3 * self.config.averaging_timeout + 2 * self.config.matchmaking_time
        try:
            gathered = control.result(timeout=wait)
        except Exception as error:  # no group, a timeout, a peer that failed mid-round
            control.cancel()
            if self.feedback is not None:
                self.feedback.restore()
            return RoundOutcome(epoch, applied=False, reason=f"round failed: {type(error).__name__}",
                                seconds=time.monotonic() - launched)
        outcome = self._apply(gathered, snapshot, sent, epoch)
        if self.feedback is not None and not outcome.applied and not outcome.resynced:
            self.feedback.restore()
        outcome.seconds = time.monotonic() - launched
        if final and outcome.group_size >= 2:
            outcome.resynced = self._resync() or outcome.resynced
        return outcome

    def _apply(self, gathered, snapshot, sent, epoch) -> RoundOutcome:
        if not isinstance(gathered, dict) or len(gathered) < 2:
            return RoundOutcome(epoch, applied=False, reason="no group")
        members = [g for g in gathered.values() if _well_formed(g)]
        if len(members) != len(gathered):
            return RoundOutcome(epoch, applied=False, group_size=len(gathered), reason="malformed gather")
        anchor_tolerance, momentum_tolerance = ANCHOR_TOLERANCE, MOMENTUM_TOLERANCE
        consistent = all(
            m["epoch"] == sent["epoch"]
            and _close(m["anchor"], sent["anchor"], anchor_tolerance * max(m["anchor_norm"], sent["anchor_norm"]))
            and _close(m["momentum"], sent["momentum"],
                       momentum_tolerance * max(m["momentum_norm"], sent["momentum_norm"], 1e-12))
            for m in members
        )
        if not consistent:
            resynced = self._resync(group=members)
            return RoundOutcome(self.epoch, applied=False, group_size=len(members), resynced=resynced,
                                reason="anchors differed: resync")
        with self.delta_averager.get_tensors() as deltas:
            mean_delta = [d.clone() for d in deltas]
        problem = self._check_average(mean_delta, members)
        if problem:
            return RoundOutcome(epoch, applied=False, group_size=len(members), reason=problem)
        with torch.no_grad(), self.state_averager.get_tensors():
            for anchor, delta in zip(self.anchor, mean_delta):
                anchor.grad = delta
            self.outer.step()
            for anchor in self.anchor:
                anchor.grad = None
            self.epoch = epoch + 1
            restart_on_anchor(self.params, self.anchor, snapshot)
        return RoundOutcome(epoch, applied=True, group_size=len(members),
                            payload_bytes=self.payload_bytes())

    def _codec_error(self, tensors: list[torch.Tensor]) -> float:
        """This member's figure of the codec's error on what it sends (peer.compression.error_figure)."""
        return error_figure(self.codec, tensors)

    def _check_average(self, mean_delta, members) -> str:
        if not all(torch.isfinite(d).all() for d in mean_delta):
            return "non-finite average"
        expected = [sum(m["delta"][i] for m in members) / len(members) for i in range(SKETCH_DIM)]
        largest = max(m["delta_norm"] for m in members)
        # the codec's loss going up and coming down (peer.compression.error_bound); each projection of
        # it is ~N(0, loss^2)
        codec_loss = error_bound(self.codec, [m["delta_error"] for m in members])
        tolerance = SKETCH_SIGMAS * (codec_loss + 1e-5 * largest) + 1e-9
        if self.robust:  # a robust aggregate is not the mean; it is bounded (each part's norm <= sqrt(n) x largest)
            tolerance += SKETCH_SIGMAS * (math.sqrt(len(members)) + 1) * largest
        if not _close(self.sketch(mean_delta), expected, tolerance):
            return "averaged pseudo-gradient does not match what the group sent"
        return ""

    def _resync(self, group: list[dict] | None = None) -> bool:
        """Average anchor and momentum (uncompressed) over the group, weighted to its highest epoch."""
        top = max([m["epoch"] for m in group or []] + [self.epoch])
        weight = 1.0 if self.epoch == top else 0.0
        try:
            gathered = self.state_averager.step(gather={"epoch": self.epoch, "weight": weight}, weight=weight,
                                                timeout=self.config.averaging_timeout, allow_retries=True)
        except Exception as error:
            log.warning("resync failed: %r", error)
            return False
        if not isinstance(gathered, dict) or len(gathered) < 2:
            return False
        epochs = [g.get("epoch") for g in gathered.values() if isinstance(g, dict) and g.get("weight", 0) > 0]
        if not epochs or not all(isinstance(e, int) for e in epochs):
            return False
        with torch.no_grad(), self.state_averager.get_tensors():
            if not all(torch.isfinite(t).all() for t in [*self.anchor, *self.momentum]):
                raise RuntimeError("resync produced non-finite anchor values")
            self.epoch = max(epochs)
        self._restart_from_anchor()  # local progress since the last applied round is dropped: rare, and simple
        if self.feedback is not None:
            self.feedback.reset()  # ... and so is the residual of that local work
        return True

    def payload_bytes(self) -> int:
        """Bytes of one compressed copy of the pseudo-gradient (what a peer uploads per round, ~2(N-1)/N x)."""
        if self.feedback is not None:
            return self._sent_bytes
        bits = {"none": 32, "fp16": 16, "uint8": 8}[self.config.averaging.compression]
        return sum(t.numel() for t in self.anchor) * bits // 8

    def shutdown(self) -> None:
        if self._pending is not None:
            self._pending[0].cancel()
            self._pending = None
        for averager in (self.delta_averager, self.state_averager):
            try:
                averager.shutdown()
            except Exception:  # shutdown is best effort (HIVEMIND_NOTES trap 10)
                pass


def _well_formed(gathered) -> bool:
    if not isinstance(gathered, dict) or not isinstance(gathered.get("epoch"), int):
        return False
    for key in ("anchor", "momentum", "delta"):
        value = gathered.get(key)
        if not (isinstance(value, list) and len(value) == SKETCH_DIM and all(isinstance(v, float) and math.isfinite(v)
                                                                             for v in value)):
            return False
    numbers = [gathered.get(key) for key in ("anchor_norm", "momentum_norm", "delta_norm", "delta_error")]
    return all(isinstance(value, float) and math.isfinite(value) and value >= 0 for value in numbers)


def _close(first: list[float], second: list[float], tolerance: float) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(first, second))
