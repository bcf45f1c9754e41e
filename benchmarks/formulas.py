"""The bounds and ratios of BENCHMARKS.md, as plain functions of measured numbers (unit-tested by hand).

Rates are in bits per second, sizes in bytes, times in seconds.
"""

from __future__ import annotations

import statistics

TBF_EFFICIENCY = 0.96  # one TCP stream through tbf delivers ~96% of the shaped rate (headers)


def sparse_bits(density: float = 1 / 32, bits: int = 4, chunk: int = 256) -> float:
    """Bits per parameter of peer.sparse_codec's uplink at its defaults: per sent value one gap byte and
    its code, per chunk one exponent byte (an estimate: gaps over 255 and the header are left out)."""
    return density * (8 + bits) + 8 / chunk


BITS = {"none": 32, "fp32": 32, "fp16": 16, "bf16": 16, "uint8": 8, "int8": 8, "fp4": 4, "sparse": sparse_bits()}


def allreduce_bytes(peers: int, payload_bytes: float) -> float:
    """Bytes each peer sends (and receives) in a byte-optimal all-reduce: 2(N-1)/N * S."""
    return 2 * (peers - 1) / peers * payload_bytes if peers > 1 else 0.0


def allreduce_bound_seconds(peers: int, payload_bytes: float, rate_bps: float, efficiency: float = 1.0) -> float:
    """Figure (b): T_bound = 2(N-1)/N * S / B (efficiency 1); figure (a) uses 0.96 * B."""
    return allreduce_bytes(peers, payload_bytes) * 8 / (efficiency * rate_bps)


def round_efficiency(bound_seconds: float, round_seconds: float) -> float:
    """Figure (b): T_bound / T_round."""
    return bound_seconds / round_seconds


def compute_utilization(compute_seconds: list[float], wall_seconds: float) -> float:
    """Figure (a): CU = sum of compute time / (N x wall time)."""
    return sum(compute_seconds) / (len(compute_seconds) * wall_seconds)


def blocking_cu_bound(compute_per_round: float, peers: int, bytes_per_round: float, rate_bps: float) -> float:
    """Figure (a) bound for blocking averaging: C / (C + 2(N-1)/N * bytes / (0.96 B)), where C is
    the compute between rounds (H * t_c for DiLoCo) and bytes the payload averaged per round
    (for sync: gradients plus parameters). With overlapped averaging the bound is 1."""
    comm = allreduce_bound_seconds(peers, bytes_per_round, rate_bps, TBF_EFFICIENCY)
    return compute_per_round / (compute_per_round + comm)


def payload_bytes(parameters: int, compression: str = "none") -> float:
    return parameters * BITS[compression] / 8


def diloco_reduction(inner_steps: int, compression: str) -> float:
    """Figure (c) analytic reduction vs per-step fp32 data parallel: H x (32 / bits sent)."""
    return inner_steps * 32 / BITS[compression]


def data_parallel_bytes_per_sample(peers: int, parameters: int, micro_batch: int) -> float:
    """Figure (c) reference: per-step fp32 data parallel, an all-reduce of all gradients after every
    micro-batch of every peer, counted once per byte on the wire (each peer's upload)."""
    return peers * allreduce_bytes(peers, parameters * 4) / (peers * micro_batch)


def speedup(single_seconds: float, swarm_seconds: float) -> float:
    """Figure (d): S = time of one process to the target / time of the swarm to the target."""
    return single_seconds / swarm_seconds


def transfer_bound_seconds(size_bytes: float, rate_bps: float) -> float:
    """Figure (g): the time the model alone takes over the joining peer's link."""
    return size_bytes * 8 / (TBF_EFFICIENCY * rate_bps)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
