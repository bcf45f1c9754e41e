"""Sketches: short random projections of a gradient or of parameters, so work can be checked cheaply.

A peer sends, per micro-batch, the norm of its gradient and a ``dims``-long signed count sketch
(every coordinate is added, with a random sign, into one of ``dims`` buckets). The sketch is
linear, so ``||S(a - b)|| / ||S b||`` estimates the relative L2 error ``||a - b|| / ||b||``; an
auditor that recomputes the micro-batch compares the two sketches without either side sending the
gradient itself.

Bucket and sign come from a polynomial hash of (seed, coordinate index) computed with integer
tensor ops on the gradient's own device: the same numbers on CPU and GPU, no random matrix to
store, O(parameters) work. The seed is per (run, epoch, peer, micro-batch); it is known in
advance, which is fine for credit (producing the sketch still needs the gradient), not for binding
an averaged vector (see VERIFICATION.md, "The projection seed").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

PRIME = (1 << 31) - 1  # hash arithmetic stays below 2**62, so int64 never overflows
CHUNK = 1 << 24  # coordinates hashed at a time, to bound the temporary memory on huge tensors


def _seed(*parts) -> int:
    digest = hashlib.blake2b("|".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def gradient_seed(run_seed: int, epoch: int, peer_id: str, micro_batch: int) -> int:
    return _seed("gradient-sketch", run_seed, epoch, peer_id, micro_batch)


def parameter_seed(run_seed: int, epoch: int) -> int:
    """The same for every peer of an epoch, so parameter fingerprints are comparable across peers."""
    return _seed("parameter-sketch", run_seed, epoch)


def _coefficients(seed: int) -> list[int]:
    digest = hashlib.blake2b(str(seed).encode(), digest_size=48, person=b"potluck-sketch").digest()
    return [int.from_bytes(digest[i : i + 8], "little") % PRIME for i in range(0, 48, 8)]


@dataclass(frozen=True)
class Sketch:
    """The L2 norm of a vector and its count sketch (float64 for comparisons)."""

    norm: float
    projection: tuple[float, ...]


@torch.no_grad()
def count_sketch(tensors, seed: int, dims: int) -> Sketch:
    """Sketch the concatenation of ``tensors`` (any devices, float dtypes) into ``dims`` buckets."""
    a1, b1, a2, b2, c2, d2 = _coefficients(seed)
    out, norm_sq, offset = None, 0.0, 0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).float()
        if out is None:
            out = torch.zeros(dims, dtype=torch.float64, device=flat.device)
        norm_sq += float(flat.double().square().sum())
        for start in range(0, flat.numel(), CHUNK):
            part = flat[start : start + CHUNK]
            index = torch.arange(offset + start, offset + start + part.numel(), device=part.device, dtype=torch.int64)
            index = index % PRIME
            bucket = ((a1 * index + b1) % PRIME) % dims
            # a cubic polynomial: 4-wise independent signs, as the count sketch's variance bound assumes
            h = (a2 * index + b2) % PRIME
            h = (h * index + c2) % PRIME
            h = (h * index + d2) % PRIME
            signs = 1.0 - 2.0 * (h & 1).to(torch.float64)
            out.index_add_(0, bucket, part.double() * signs)
        offset += flat.numel()
    if out is None:
        out = torch.zeros(dims, dtype=torch.float64)
    return Sketch(math.sqrt(norm_sq), tuple(out.cpu().tolist()))


def gradient_sketch(model: torch.nn.Module, seed: int, dims: int) -> Sketch:
    """Sketch of the gradient now held in model's parameters (missing grads count as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return count_sketch(grads, seed, dims)


def parameter_fingerprint(model: torch.nn.Module, seed: int, dims: int) -> Sketch:
    return count_sketch(list(model.parameters()), seed, dims)


def relative_error(claimed: Sketch, reference: Sketch) -> float:
    """Relative L2 error of the claimed sketch against the reference (inf when the reference is zero)."""
    a, b = torch.tensor(claimed.projection, dtype=torch.float64), torch.tensor(reference.projection, dtype=torch.float64)
    if a.shape != b.shape:
        return math.inf
    denominator = float(b.norm())
    if denominator == 0.0:
        return 0.0 if float(a.norm()) == 0.0 else math.inf
    return float((a - b).norm()) / denominator


def norm_ratio(claimed: Sketch, reference: Sketch) -> float:
    if reference.norm == 0.0:
        return 1.0 if claimed.norm == 0.0 else math.inf
    return claimed.norm / reference.norm
