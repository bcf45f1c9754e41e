"""hivemind's TensorPartReducer, aggregating each part with a robust rule (peer.robust) instead of a running sum.

hivemind's reducer adds every sender's part into one accumulator as it arrives, so it can only ever
compute a weighted mean. This one keeps the parts of the current part index until every sender still
in the round has sent it (or failed), then applies the configured rule once, and remembers per
sender the evidence (weight, score, clipped) for the attestation records. Written against hivemind
1.1.12's TensorPartReducer (pinned): the waiting, banning and finalizing logic is its own.
"""

from __future__ import annotations

import asyncio

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

from peer.robust import AveragingRule, aggregate


class RobustTensorPartReducer(TensorPartReducer):
    def __init__(self, part_shapes, num_senders: int, rule: AveragingRule, keep_parts: bool = False):
        self.rule, self.keep_parts = rule, keep_parts
        self._current: list[tuple[int, torch.Tensor, float]] = []
        # per part index: [(sender_index, part or None, weight, score, clipped)] once aggregated
        self.received: list[list[tuple]] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        super().reset_accumulators()
        self.accumulator = None  # no running sum: the parts are kept until all have arrived
        self._current = []

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        """Keep this sender's part, wait for the others, return the part's robust aggregate."""
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait({self.current_part_future, asyncio.create_task(self.finished.wait())},
                               return_when=asyncio.FIRST_COMPLETED)
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {self.__class__.__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            # our own part is a view of the averaged tensor, overwritten once the round completes: keep a copy
            kept = tensor_part.detach().clone() if self.keep_parts else tensor_part
            self._current.append((sender_index, kept, float(weight)))
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await current_part_future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            if self._current:
                senders, parts, weights = zip(*self._current)
                result = aggregate(self.rule, list(parts), list(weights))
                value = result.value
                self.received.append([
                    (s, p if self.keep_parts else None, w, score, clipped)
                    for s, p, w, score, clipped in zip(senders, parts, weights, result.scores, result.clipped)])
            else:
                value = torch.zeros(self.part_shapes[self.current_part_index])
                self.received.append([])
            self.current_part_future.set_result(value)
            self.reset_accumulators()
