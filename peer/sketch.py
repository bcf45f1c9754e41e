"""Sketches: short random projections of a gradient or of parameters, so work can be checked cheaply.

A peer sends, per micro-batch, the norm of its gradient and a ``dims``-long sketch ``S g``: every
coordinate gets a random sign and is added into one of ``dims`` buckets (a count sketch). ``S`` is
linear with E[S^T S] = I, so ``||S(a - b)|| / ||S b||`` estimates the relative L2 error
``||a - b|| / ||b||``; an auditor that recomputes the micro-batch compares the two sketches without
either side sending the gradient itself.

Cheap for big models: the flattened vector is laid out in rows of ``ROW`` coordinates; the sign of
coordinate (r, c) is ``row_sign[r] * column_sign[c]`` and its bucket is ``c mod dims``. So the sketch
is one matrix-vector product over the gradient (``row_sign @ rows``) plus O(ROW) work, on the
gradient's own device. The signs come from torch's CPU generator, seeded per (run, epoch, peer,
micro-batch): the same numbers on every machine. A seed known in advance is fine for credit
(producing the sketch still needs the gradient), not for binding an averaged vector (see
VERIFICATION.md, "The projection seed").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

ROW = 4096  # coordinates per row; a multiple of every allowed sketch size (powers of two up to 1024)


def _seed(*parts) -> int:
    digest = hashlib.blake2b("|".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def gradient_seed(run_seed: int, epoch: int, peer_id: str = "", micro_batch: int = 0) -> int:
    """One seed per (run, epoch), whatever the peer and micro-batch: sketches of one epoch add up
    (peer and micro-batch stay in the signature: the callers name the work they sketch)."""
    return _seed("gradient-sketch", run_seed, epoch)


def parameter_seed(run_seed: int, epoch: int) -> int:
    """The same for every peer of an epoch, so parameter fingerprints are comparable across peers."""
    return _seed("parameter-sketch", run_seed, epoch)


@dataclass(frozen=True)
class Sketch:
    """The L2 norm of a vector and its count sketch (float64 for comparisons)."""

    norm: float
    projection: tuple[float, ...]


def _signs(generator: torch.Generator, count: int, device) -> torch.Tensor:
    return (torch.randint(0, 2, (count,), generator=generator, dtype=torch.int8) * 2 - 1).to(device, torch.float32)


@torch.no_grad()
def count_sketch(tensors, seed: int, dims: int) -> Sketch:
    """Sketch the concatenation of ``tensors`` (any devices, float dtypes) into ``dims`` buckets."""
    if dims <= 0 or ROW % dims:
        raise ValueError(f"sketch size must divide {ROW}, got {dims}")
    generator = torch.Generator().manual_seed(seed)
    column_signs, acc, norm_sq = None, None, 0.0
    for tensor in tensors:
        flat = tensor.detach().reshape(-1).float()
        if acc is None:
            column_signs = _signs(generator, ROW, flat.device)
            acc = torch.zeros(ROW, dtype=torch.float32, device=flat.device)
        norm_sq += float(torch.linalg.vector_norm(flat)) ** 2
        rows, tail = divmod(flat.numel(), ROW)
        row_signs = _signs(generator, rows + 1, flat.device)
        if rows:
            acc += row_signs[:rows] @ flat[: rows * ROW].view(rows, ROW)
        if tail:
            acc[:tail] += row_signs[rows] * flat[rows * ROW:]
    if acc is None:
        return Sketch(0.0, (0.0,) * dims)
    projection = (acc * column_signs).view(ROW // dims, dims).sum(0, dtype=torch.float64)
    return Sketch(math.sqrt(norm_sq), tuple(projection.cpu().tolist()))


@torch.no_grad()
def slice_sketch(values: torch.Tensor, offset: int, sizes: list[int], seed: int, dims: int) -> Sketch:
    """The count sketch of a slice of the concatenation of tensors of ``sizes`` elements.

    ``values`` holds coordinates ``offset .. offset + len(values)`` of that flattened concatenation.
    The signs and buckets are those :func:`count_sketch` gives the same coordinates, so the
    projections of the slices of a partition add up to ``count_sketch`` of the whole (up to float
    rounding): what a reducer sees of one sender's vector can be compared with that sender's claim.
    """
    if dims <= 0 or ROW % dims:
        raise ValueError(f"sketch size must divide {ROW}, got {dims}")
    flat = values.detach().reshape(-1).to("cpu", torch.float64)
    end = offset + flat.numel()
    if offset < 0 or end > sum(sizes):
        raise ValueError(f"slice {offset}..{end} is outside a vector of {sum(sizes)} coordinates")
    generator = torch.Generator().manual_seed(seed)
    column_signs = _signs(generator, ROW, "cpu").double()
    projection = torch.zeros(dims, dtype=torch.float64)
    start = 0
    for size in sizes:
        rows = size // ROW
        row_signs = _signs(generator, rows + 1, "cpu").double()  # drawn for every tensor, as count_sketch does
        low, high = max(offset, start), min(end, start + size)
        if low < high:
            local = torch.arange(low - start, high - start)
            signs = row_signs[local // ROW] * column_signs[local % ROW]
            projection.index_add_(0, (local % ROW) % dims, signs * flat[low - offset: high - offset])
        start += size
        if start >= end:
            break
    return Sketch(float(torch.linalg.vector_norm(flat)), tuple(projection.tolist()))


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
