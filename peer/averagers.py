"""potluck's hivemind averagers: every all-reduce that moves the model runs the robust, same-result runner.

- :class:`PotluckAveraging`, a mixin for any hivemind DecentralizedAverager: runs
  peer.same_result_allreduce with the run's :class:`~peer.robust.AveragingRule` (and attestation
  records where given), and folds the rule into hivemind's schema hash, so a leader refuses a joiner
  with another rule: peers with different aggregators never average together.
- sync mode: :func:`make_potluck_optimizer` builds a hivemind.Optimizer whose gradient averager and
  state (parameter) averager are potluck averagers. The gradient averager labels its gather with the
  optimizer's local epoch (``{"epoch": e}``), the sender's epoch that the attestation records carry.

hivemind names RPC handlers after the serving class (``PREFIX::ClassName.rpc_...``), and the
coordinator's observer downloads state from ``TrainingStateAverager`` handlers under
``{run_id}_state_averager``: the state averager here keeps that class name and prefix.
"""

from __future__ import annotations

from functools import partial

from peer.attestations import Attestations
from peer.robust import AveragingRule, agreed_schema_hash


class PotluckAveraging:
    """Mixin (before a DecentralizedAverager subclass): robust runner, attestations, rule in the schema hash."""

    # hivemind caches RPC handlers and stubs per class; a subclass must collect its own, or a parent
    # collected first in the process would name stubs after the parent
    _rpc_handlers = None
    _stub_type = None

    def __init__(self, *args, rule: AveragingRule, attestations: Attestations | None = None, start: bool = False,
                 **kwargs):
        self.rule, self.attestations = rule, attestations
        super().__init__(*args, start=False, **kwargs)
        self.schema_hash = agreed_schema_hash(self.schema_hash, rule)  # before the process forks
        if start:
            self.run_in_background(await_ready=True)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        from peer.same_result_allreduce import run_allreduce_inplace

        await run_allreduce_inplace(self, tensors, group_info, group_id, rule=self.rule,
                                    attestations=self.attestations, **kwargs)


def _sync_classes():
    from hivemind.optim.grad_averager import GradientAverager
    from hivemind.optim.optimizer import Optimizer
    from hivemind.optim.state_averager import TrainingStateAverager as HivemindStateAverager

    class PotluckGradientAverager(PotluckAveraging, GradientAverager):
        """Gradient averager whose gather carries the optimizer's epoch (the sender's label in records)."""

        def __init__(self, *args, epoch_source, **kwargs):
            import torch

            self.epoch_source = epoch_source
            # the epoch whose gradient the averaging buffer holds, -1 once a round has replaced it with an
            # average; shared with the averager's process, which forks in super().__init__
            self._fresh_epoch = torch.full((1,), -1, dtype=torch.int64).share_memory_()
            super().__init__(*args, **kwargs)

        def load_accumulators_into_averager_(self):
            super().load_accumulators_into_averager_()
            self._fresh_epoch[0] = int(self.epoch_source())

        async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
            from peer.same_result_allreduce import gathered_epochs

            # hivemind can put a buffer into a round that is not the gradient its gather names: a peer
            # tagging along while it loads state, a pre-scheduled round triggered in a later epoch, a
            # buffer that already holds the last average. Such a vector takes part with weight 0: it
            # has no influence, and the binding check does not hold it against the peer's report.
            if int(self._fresh_epoch[0]) != gathered_epochs(self, group_info).get(self.peer_id):
                kwargs["weight"] = 0.0
            await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
            self._fresh_epoch[0] = -1  # the buffer now holds the average

        def schedule_step(self, scheduled_time=None, **kwargs):
            # hivemind can keep a pre-scheduled round across epochs and use it later: its gather then names
            # an older epoch than the gradient it averages, and _run_allreduce_inplace_ gives it weight 0.
            # It is not cancelled: a control may already be in a group, and cancelling it there broke the
            # partners' round (they applied an average this peer did not: the parameters drifted apart).
            gather = kwargs.pop("gather", None)
            gather = dict(gather) if isinstance(gather, dict) else {}
            gather["epoch"] = int(self.epoch_source())
            return super().schedule_step(scheduled_time, gather=gather, **kwargs)

    class TrainingStateAverager(PotluckAveraging, HivemindStateAverager):
        """hivemind's state averager with the robust runner; keeps its class name (RPC handler names)."""

    class PotluckOptimizer(Optimizer):
        """hivemind.Optimizer whose gradient and parameter all-reduces are potluck's (robust) ones."""

        def __init__(self, *, rule: AveragingRule, attestations: Attestations | None = None, **kwargs):
            self._rule = rule
            factory = partial(PotluckGradientAverager, rule=rule, attestations=attestations,
                              epoch_source=self._epoch_for_gather)
            super().__init__(grad_averager_factory=factory, **kwargs)

        def _epoch_for_gather(self) -> int:
            return self.state_averager.local_epoch

        def _make_gradient_averager(self, factory, **kwargs):
            # the rule in the prefix too: peers with another rule do not even meet in matchmaking
            return super()._make_gradient_averager(partial(_with_prefix_suffix, factory, self._rule), **kwargs)

        def _make_state_averager(self, **kwargs):
            return TrainingStateAverager(
                rule=self._rule, dht=self.dht, prefix=f"{self.run_id}_state_averager",
                min_matchmaking_time=self.matchmaking_time, allreduce_timeout=self.allreduce_timeout,
                shutdown_timeout=self.shutdown_timeout, offload_optimizer=self.offload_optimizer,
                custom_gradients=self.offload_optimizer, status_loglevel=self.status_loglevel,
                next_chunk_timeout=self.next_chunk_timeout, client_mode=self.client_mode,
                auxiliary=self.auxiliary, start=True, **kwargs,
            )

    return PotluckGradientAverager, TrainingStateAverager, PotluckOptimizer


def _with_prefix_suffix(factory, rule: AveragingRule, *, prefix: str, **kwargs):
    return factory(prefix=f"{prefix}_{rule.aggregator}", **kwargs)


def make_potluck_optimizer(*, rule: AveragingRule, attestations: Attestations | None = None, **kwargs):
    """A hivemind.Optimizer (same arguments) whose averaging is robust and attested."""
    _, _, PotluckOptimizer = _sync_classes()
    return PotluckOptimizer(rule=rule, attestations=attestations, **kwargs)
