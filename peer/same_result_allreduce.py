"""An all-reduce after which every member holds the same averaged values, whatever the codec.

hivemind 1.1.12's reducer sends each sender ``compress(average - that sender's part)``: with a lossy
codec every member ends up with the average plus *its own* codec error. For DiLoCo that is fatal in
the long run: the anchors of the peers, moved by slightly different averages, drift apart by a random
walk (with uint8 on digits, ~10% of a pseudo-gradient per round). Here the reducer sends
``compress(average)`` (the same bytes to every sender, and decodes the same bytes for its own part),
and each member *copies* the decoded average into its tensors. The wire bytes are unchanged; every
member's result is the identical decoded average, bit for bit. (hivemind adds a delta, ``x + (a - x)``,
which rounds differently on each member wherever ``a`` and ``x`` are far apart: DiLoCo anchors then
differed by an ulp between peers, and an auditor replaying one peer's phase from another's anchor saw
Adam amplify that to a 1.6% gradient error and failed an honest peer. A part whose reducer failed
fails the round: hivemind would silently apply a partial average.)

Each reducer aggregates its part with the run's robust rule (peer.robust_reducer), and, on averagers
that attest (sync gradients, DiLoCo deltas), every member writes what it sent and received as
sketches (peer.attestations). Every potluck averager (DiLoCo's, and the sync Optimizer's gradient
and state averagers, peer.averagers) runs this runner, and every member of a group must: they meet
under a schema hash that includes the rule. Written against hivemind 1.1.12's AllReduceRunner (pinned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.partition import AllreduceException, BannedException
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, as_aiter, attach_event_on_finished, azip
from hivemind.utils.timed_storage import get_dht_time

from peer.attestations import REDUCER_EVIDENCE_FILE, SUSPECT_RATIO, Attestations, RoundRecords, append_lines
from peer.robust import AveragingRule
from peer.robust_reducer import RobustTensorPartReducer

log = logging.getLogger("potluck.allreduce")


class SameResultAllReduceRunner(AllReduceRunner):
    def __init__(self, *args, rule: AveragingRule, attestations: Attestations | None = None,
                 sender_epochs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # outputs are results, not deltas: a failed reducer's parts come back as our own values
        self.tensor_part_container.return_deltas = False
        # the raw (uncompressed) local parts each reducer averages, to turn received averages into deltas
        self._raw_parts_by_peer = [
            tuple(part for part, _ in parts) for parts in self.tensor_part_container._input_parts_by_peer
        ]
        # parts are encoded by the averager's own codec object (a codec with parameters, peer.sparse_codec,
        # is not hivemind's default instance of its CompressionType); decoding goes by the message's type
        self._codec = self.tensor_part_container.compression
        # where each part starts in the flattened concatenation of the tensors (same on every member)
        self._offsets_by_peer, start = [], 0
        for parts in self._raw_parts_by_peer:
            offsets = []
            for part in parts:
                offsets.append(start)
                start += part.numel()
            self._offsets_by_peer.append(offsets)
        self.attestations, self.sender_epochs = attestations, sender_epochs or {}
        # the parts are views of the tensors averaged in place: what we sent must be copied now
        self._sent_parts = None if attestations is None else [
            tuple(part.detach().clone() for part in parts) for parts in self._raw_parts_by_peer]
        self._suspect: list[dict] = []
        hivemind_reducer = self.tensor_part_reducer
        hivemind_reducer.finished.set()  # replaced before use: no "received 0%" warning when collected
        self.tensor_part_reducer = RobustTensorPartReducer(
            hivemind_reducer.part_shapes, hivemind_reducer.num_senders, rule, keep_parts=attestations is not None)

    async def run(self):
        async for result in super().run():
            yield result
        if self.attestations is not None:  # a completed round: write what this member sent and received
            try:
                await asyncio.get_event_loop().run_in_executor(None, self._write_records)
            except Exception as error:  # records are evidence, never a reason to fail the round
                log.warning("could not write attestation records: %r", error)

    def _encode(self, tensor):
        """What serialize_torch_tensor(tensor, codec type) gives, but with this averager's codec object."""
        return self._codec.compress(tensor, CompressionInfo.from_tensor(tensor))

    def _epoch_of(self, peer_id) -> int:
        epoch = self.sender_epochs.get(peer_id)
        return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else -1

    def _write_records(self) -> None:
        sizes = [t.numel() for t in self.tensor_part_container.local_tensors]
        records = RoundRecords(self.attestations, self.group_id.hex(), sizes)
        me, my_index = self.peer_id.to_base58(), self.ordered_peer_ids.index(self.peer_id)
        if self.peer_id in self.sender_peer_ids:
            for reducer_index, reducer in enumerate(self.ordered_peer_ids):
                for part, offset in zip(self._sent_parts[reducer_index], self._offsets_by_peer[reducer_index]):
                    if reducer != self.peer_id:  # what the reducer decodes (our own part reaches us raw)
                        part = deserialize_torch_tensor(self._encode(part))
                    records.add("sent", me, reducer.to_base58(), self._epoch_of(self.peer_id), part, offset,
                                weight=self.weight)
        for part_index, received in enumerate(self.tensor_part_reducer.received):
            offset = self._offsets_by_peer[my_index][part_index]
            for sender_index, part, weight, score, clipped in received:
                sender = self.sender_peer_ids[sender_index]
                records.add("received", sender.to_base58(), me, self._epoch_of(sender), part, offset,
                            weight=weight, score=score, clipped=clipped)
        records.write()
        if self._suspect:
            append_lines(Path(self.attestations.data_dir) / REDUCER_EVIDENCE_FILE,
                         [json.dumps(dict(item, group=self.group_id.hex(), kind=self.attestations.kind,
                                          member=me, time=time.time())) for item in self._suspect])

    def _check_returned(self, peer_id, part_index: int, averaged, raw) -> None:
        """Remember a returned average implausibly far from our own part (a reducer's lie shows here)."""
        own = float(raw.norm())
        distance = float((averaged - raw).norm())
        if own > 0 and distance > SUSPECT_RATIO * own:  # (a member that sends zeros, e.g. weight 0, has no scale)
            self._suspect.append({"reducer": peer_id.to_base58(), "part": part_index, "distance": distance,
                                  "own_norm": own})
            log.warning("reducer %s returned part %d at %.3g from our part (norm %.3g)",
                        peer_id, part_index, distance, own)

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
                    self._encode(averaged_part)))
                self.tensor_part_container.register_processed_part(peer_index, part_index, decoded)
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
                self._check_returned(peer_id, part_index, averaged, raw_parts[part_index])
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
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
                serialized = await loop.run_in_executor(None, lambda: self._encode(averaged_part))
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


def gathered_epochs(averager, group_info) -> dict:
    """Each member's epoch label from the round's gather (``{"epoch": e}`` or a bare int), by peer id."""
    epochs = {}
    for peer_id, raw in zip(group_info.peer_ids, group_info.gathered):
        try:
            user = averager.serializer.loads(averager.serializer.loads(raw)[2])
        except Exception:
            continue
        epochs[peer_id] = user.get("epoch") if isinstance(user, dict) else user
    return epochs


async def run_allreduce_inplace(averager, tensors, group_info, group_id=None, *, rule: AveragingRule,
                                attestations: Attestations | None = None, **kwargs) -> None:
    """DecentralizedAverager._run_allreduce_inplace_ of hivemind 1.1.12, with SameResultAllReduceRunner."""
    group_id = group_info.group_id if group_id is None else group_id
    runner = SameResultAllReduceRunner(
        p2p=averager._p2p, servicer_type=type(averager), prefix=averager.prefix, tensors=tensors,
        group_id=group_id, ordered_peer_ids=group_info.peer_ids, rule=rule, attestations=attestations,
        sender_epochs=gathered_epochs(averager, group_info) if attestations is not None else None, **kwargs,
    )
    assert group_id in averager._running_groups, f"Group id {group_id} was not registered in _register_allreduce_group"
    averager._running_groups[group_id].set_result(runner)
    if runner.modes[group_info.peer_ids.index(averager.peer_id)] != AveragingMode.AUX:
        results = [(tensor, result) async for tensor, result in azip(as_aiter(*tensors), runner)]
        failed = runner.tensor_part_container.failed_size
        if failed:
            # hivemind would apply the average with our own values in the parts a failed reducer
            # dropped: a silent partial result, different on every member. The round fails instead
            # (a sync peer then steps on its own gradients; DiLoCo keeps its local progress).
            raise AllreduceException(f"{failed} of {runner.tensor_part_container.total_size} values came back "
                                     f"from no reducer: the partial average is not applied")
        for tensor, result in results:
            if averager._averaging_alpha == 1.0:
                tensor.copy_(result)  # the decoded average itself: the same bits on every member
            else:
                tensor.lerp_(result.to(tensor.dtype), averager._averaging_alpha)
        averager.last_updated = get_dht_time()
        averager._state_updated.set()
    else:
        async for _ in runner:
            raise ValueError("aux peers should not receive averaged tensors")

