"""One member of a real all-reduce for tests/test_robust.py, run as its own OS process.

    python tests/robust_worker.py ROLE WORKDIR GROUP AGGREGATOR CODEC SCALE [REDUCER [PROTOCOL]]

Member "a" starts the DHT and writes its address to WORKDIR/a.maddrs; the others join it. Each holds
the known vector ``known_vector(ROLE)`` times SCALE (a poisoner is an honest member with SCALE -10),
averages it once in a group of GROUP through potluck's averager (peer.averagers.PotluckAveraging:
robust rule, attestation records in WORKDIR/ROLE/), and writes the result to WORKDIR/ROLE.json.
With REDUCER = 1, the member's reducer returns -10 x its robust result to everyone (the
product's ``peer.robust_reducer.aggregate`` wrapped in this process only); with REDUCER = drop, it
returns no averaged part to the other senders (the runner's own ``_accumulate_parts_streaming``
wrapped), the round is tried once, and each member records the round's error if it fails.
With PROTOCOL, the member speaks that averaging protocol version (peer.protocol's constant set in
this process only) and tries its round for 15 s (a test of skewed versions, where none forms).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategy_worker import join_swarm, wait_for_done, wait_for_members  # noqa: E402  (tests/ is this script's folder)

SHAPES = [(40, 30), (30,), (7, 5)]  # 1,465 coordinates in three tensors
EPOCH = 5
RUN_SEED = 99
DIMS = 16


def known_vector(role: str) -> list[torch.Tensor]:
    """A shared signal plus a member's own noise, as honest gradients look."""
    common = torch.Generator().manual_seed(1)
    own = torch.Generator().manual_seed(ord(role))
    return [torch.randn(shape, generator=common) + 0.3 * torch.randn(shape, generator=own) for shape in SHAPES]


def lie_as_reducer() -> None:
    import peer.robust_reducer

    honest = peer.robust_reducer.aggregate

    def lying(rule, parts, weights):
        result = honest(rule, parts, weights)
        result.value = -10 * result.value
        return result

    peer.robust_reducer.aggregate = lying


def drop_as_reducer() -> None:
    from peer.same_result_allreduce import SameResultAllReduceRunner

    async def dropping(self, stream, sender_index):
        return  # the others' parts of this reducer never come back
        yield  # (an async generator, as the runner expects)

    SameResultAllReduceRunner._accumulate_parts_streaming = dropping


def main(role: str, workdir: Path, group: int, aggregator: str, codec: str, scale: float, reducer: str = "",
         protocol: str = "") -> None:
    torch.set_num_threads(1)
    import peer.protocol

    if protocol:
        peer.protocol.AVERAGING_PROTOCOL = int(protocol)
    if reducer == "1":
        lie_as_reducer()
    if reducer == "drop":
        drop_as_reducer()
    from hivemind.averaging import DecentralizedAverager

    from peer.attestations import Attestations
    from peer.averagers import PotluckAveraging
    from peer.compression import make_compression
    from peer.robust import AveragingRule
    from peer.swarm import use_fork_start_method

    class Averager(PotluckAveraging, DecentralizedAverager):
        pass

    use_fork_start_method()
    dht = join_swarm(role, workdir)
    data_dir = workdir / role
    data_dir.mkdir(exist_ok=True)
    tensors = [t * scale for t in known_vector(role)]
    averager = Averager(
        [t.clone() for t in tensors], dht=dht, prefix="robusttest", start=True,
        rule=AveragingRule(aggregator), attestations=Attestations(data_dir, "grad", RUN_SEED, DIMS),
        compression=make_compression(codec), part_size_bytes=2048,  # several parts per reducer
        target_group_size=group, min_group_size=group, min_matchmaking_time=3.0, request_timeout=1.0,
        allreduce_timeout=30, next_chunk_timeout=10,
    )
    wait_for_members(role, workdir, group)
    error = ""
    try:
        gathered = averager.step(gather={"epoch": EPOCH}, timeout=15 if protocol else 60,
                                 allow_retries=reducer != "drop")
    except Exception as failure:  # a round that failed (e.g. a dropped part): the values must be unchanged
        gathered, error = None, f"{type(failure).__name__}: {failure}"
    with averager.get_tensors() as result:
        out = {"group": len(gathered or {}), "peer_id": dht.peer_id.to_base58(), "error": error,
               "sent": [t.reshape(-1).tolist() for t in tensors],
               "result": [t.reshape(-1).tolist() for t in result]}
    (workdir / f".{role}.json").write_text(json.dumps(out))
    (workdir / f".{role}.json").rename(workdir / f"{role}.json")  # whole, or not there yet
    wait_for_done(workdir)
    averager.shutdown()
    dht.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], float(sys.argv[6]),
         sys.argv[7] if len(sys.argv) > 7 else "", sys.argv[8] if len(sys.argv) > 8 else "")
