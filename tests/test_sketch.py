"""Sketch algebra the binding of averaged vectors rests on: slices of a partition add up to the whole."""

from __future__ import annotations

import pytest
import torch

from peer.sketch import ROW, count_sketch, gradient_seed, slice_sketch


def _tensors():
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(size, generator=generator) for size in (3, ROW + 5, 2 * ROW, 17)]


def test_slices_of_a_partition_add_up_to_the_whole():
    tensors = _tensors()
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    whole = count_sketch(tensors, seed=11, dims=64)
    cuts = [0, 2, 4, ROW + 8, 5000, flat.numel()]  # across tensor and row boundaries
    total = torch.zeros(64, dtype=torch.float64)
    for low, high in zip(cuts, cuts[1:]):
        total += torch.tensor(slice_sketch(flat[low:high], low, sizes, seed=11, dims=64).projection, dtype=torch.float64)
    assert torch.allclose(total, torch.tensor(whole.projection, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    full = slice_sketch(flat, 0, sizes, seed=11, dims=64)
    assert full.norm == pytest.approx(whole.norm, rel=1e-6)


def test_slice_sketch_by_hand():
    # one tensor of 4 coordinates in 2 buckets: bucket c mod 2, sign row_sign[0] * column_sign[c]
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    generator = torch.Generator().manual_seed(5)
    column = torch.randint(0, 2, (ROW,), generator=generator, dtype=torch.int8).double() * 2 - 1
    row = torch.randint(0, 2, (1,), generator=generator, dtype=torch.int8).double() * 2 - 1
    signs = row[0] * column[:4]
    expected = [float(signs[0] * 1 + signs[2] * 3), float(signs[1] * 2 + signs[3] * 4)]
    got = slice_sketch(values[1:3], 1, [4], seed=5, dims=2).projection
    assert got == pytest.approx([float(signs[2] * 3), float(signs[1] * 2)])
    assert slice_sketch(values, 0, [4], seed=5, dims=2).projection == pytest.approx(expected)


def test_slice_outside_the_vector_is_refused():
    with pytest.raises(ValueError, match="outside"):
        slice_sketch(torch.ones(3), 2, [4], seed=1, dims=2)


def test_micro_batch_sketches_of_an_epoch_add_up():
    seeds = {gradient_seed(1, 5, peer, mb) for peer in ("p-a", "p-b") for mb in range(3)}
    assert len(seeds) == 1 and gradient_seed(1, 6) not in seeds
