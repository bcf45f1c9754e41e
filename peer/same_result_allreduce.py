"""An all-reduce after which every member holds the same averaged values, whatever the codec.

hivemind 1.1.12's reducer sends each sender ``compress(average - that sender's part)``: with a lossy
codec every member ends up with the average plus *its own* codec error. For DiLoCo that is fatal in
the long run: the anchors of the peers, moved by slightly different averages, drift apart by a random
walk (with uint8 on digits, ~10% of a pseudo-gradient per round). Here the reducer sends
``compress(average)`` (the same bytes to every sender, and decodes the same bytes for its own part),
and each receiver turns it into the delta hivemind expects (``decoded average - own part``). The wire
bytes are unchanged; every member's result is the identical decoded average (up to one float
rounding of ``x + (a - x)``).

Only DiLoCo's averagers (peer.diloco) use this runner, and every member of their groups must: they
meet under their own averager prefix. Written against hivemind 1.1.12's AllReduceRunner (pinned).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, attach_event_on_finished, azip
from hivemind.utils.timed_storage import get_dht_time


class SameResultAllReduceRunner(AllReduceRunner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # the raw (uncompressed) local parts each reducer averages, to turn received averages into deltas
        self._raw_parts_by_peer = [
            tuple(part for part, _ in parts) for parts in self.tensor_part_container._input_parts_by_peer
        ]
        self._compression_type = self.tensor_part_container.compression.compression_type

    async def _communicate_with_peer(self, peer_id):
        peer_index = self.ordered_peer_ids.index(peer_id)
        raw_parts = self._raw_parts_by_peer[peer_index]
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            loop = asyncio.get_event_loop()
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
                # decode the very bytes the other senders receive for this part
                decoded = await loop.run_in_executor(None, lambda: deserialize_torch_tensor(
                    serialize_torch_tensor(averaged_part, self._compression_type)))
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded - tensor_part)
            return
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()

            def _try_deserialize(msg):
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                return deserialize_torch_tensor(msg.tensor_part), msg

            part_index = 0
            async for averaged, _msg in amap_in_executor(
                _try_deserialize, aiter_with_timeout(stream, self.reducer_timeout),
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                if part_index >= len(raw_parts) or averaged.shape != raw_parts[part_index].shape:
                    raise AllreduceException(f"{peer_id} sent an unexpected part #{part_index}")
                self.tensor_part_container.register_processed_part(
                    peer_index, part_index, averaged - raw_parts[part_index])
                part_index += 1
            if part_index != self.tensor_part_container.num_parts_by_peer[peer_index]:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, but we expected "
                                         f"{self.tensor_part_container.num_parts_by_peer[peer_index]}")
        except BaseException:
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        part_index = 0
        try:
            loop = asyncio.get_event_loop()
            async for tensor_part, weight, part_compression in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.compression),
                stream, max_prefetch=self.tensor_part_container.prefetch,
            ):
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight)
                    part_index += 1
                except BannedException:
                    break  # sender was banned, we no longer need to aggregate it
                serialized = await loop.run_in_executor(
                    None, lambda: serialize_torch_tensor(averaged_part, self._compression_type))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


async def run_allreduce_inplace(averager, tensors, group_info, group_id=None, **kwargs) -> None:
    """DecentralizedAverager._run_allreduce_inplace_ of hivemind 1.1.12, with SameResultAllReduceRunner."""
    group_id = group_info.group_id if group_id is None else group_id
    runner = SameResultAllReduceRunner(
        p2p=averager._p2p, servicer_type=type(averager), prefix=averager.prefix, tensors=tensors,
        group_id=group_id, ordered_peer_ids=group_info.peer_ids, **kwargs,
    )
    assert group_id in averager._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
    averager._running_groups[group_id].set_result(runner)
    if runner.modes[group_info.peer_ids.index(averager.peer_id)] != AveragingMode.AUX:
        async for tensor, update in azip(as_aiter(*tensors), runner):
            tensor.add_(update, alpha=averager._averaging_alpha)
            averager.last_updated = get_dht_time()
            averager._state_updated.set()
    else:
        async for _ in runner:
            raise ValueError("aux peers should not receive averaged tensors")

