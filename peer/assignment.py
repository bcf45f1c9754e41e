"""Deterministic data assignment: which samples a peer trains on, recomputable by anyone.

The indices of micro-batch ``m`` of peer ``p`` in epoch ``e`` derive only from
hash(run seed, e, p, m). A peer chooses nothing, so an auditor can replay exactly the samples a
peer claims to have trained on, and two peers never share an assignment by accident.
"""

from __future__ import annotations

import hashlib

import torch


def micro_batch_seed(run_seed: int, epoch: int, peer_id: str, micro_batch: int) -> int:
    digest = hashlib.blake2b(f"{run_seed}|{epoch}|{peer_id}|{micro_batch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def micro_batch_indices(
    run_seed: int, epoch: int, peer_id: str, micro_batch: int, dataset_size: int, batch_size: int
) -> torch.Tensor:
    """Sample indices (without replacement within the micro-batch) for one micro-batch."""
    generator = torch.Generator().manual_seed(micro_batch_seed(run_seed, epoch, peer_id, micro_batch))
    return torch.randperm(dataset_size, generator=generator)[: min(batch_size, dataset_size)]
