"""The sparse codec of DiLoCo pseudo-gradients: top-k of each chunk, low-bit values, error feedback.

As in SparseLoCo / DeMo, each peer sends only the ``k = density x chunk`` largest-magnitude values of
every chunk of ``chunk`` consecutive values of each tensor, each as a ``bits``-bit integer times the
chunk's power-of-two step, and keeps what it did not send (the *residual*) to add to its next
pseudo-gradient (:class:`ErrorFeedback`).

Two halves, because hivemind's all-reduce cuts the vector into parts by peer and each reducer
averages the senders' parts:

- the *sender* sparsifies and quantizes the whole pseudo-gradient (:func:`sparsify`), so the values
  outside the top-k are exact zeros and the kept ones lie on the quantization grid; the residual is
  exactly what the swarm will not see;
- the *wire* codec (:class:`SparseCodec`, a hivemind codec) encodes any tensor part as the gaps
  between its nonzero positions (one byte each, 255 = "add 255 and read on"; or a bitmap where that is
  smaller), one exponent byte per chunk and the packed ``bits``-bit values. hivemind cuts a tensor into
  parts of ``2**21`` values (``estimate_compression_ratio`` is 1/16 of fp32 against 512 KiB parts),
  a multiple of the chunk, so a part's chunks are the sender's chunks and re-encoding a sparsified
  part is lossless: a reducer receives exactly what the sender computed.

The averaged part a reducer sends back (the union of the senders' supports, values off the grid) is
encoded the same way, which rounds each value to its chunk's grid: at most ``max|chunk| / qmax``
per value (:func:`average_error_bound`). Every member decodes the same bytes
(peer.same_result_allreduce), so that error is identical everywhere; it is not fed back.

Steps are powers of two so that a decoded value is exact in fp32 and encoding is idempotent (the
largest value of a chunk always codes to more than qmax / 2, so re-encoding finds the same step).

hivemind picks a decoder by the message's CompressionType, an enum potluck cannot extend. This codec
travels as ``MEANSTD_16BIT`` (unused by potluck) with the marker :data:`MARKER` in the message's
dtype field; importing this module makes that slot's decoder read sparse messages and hand every
other message to hivemind's own ScaledFloat16 decoder, as before.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.compression import serialization as _serialization
from hivemind.compression.floating import ScaledFloat16Compression
from hivemind.proto import runtime_pb2

MARKER = "potluck_sparse_v1"
BITS = (2, 4, 8)
_HEADER = struct.Struct("<IIBBI")  # numel, chunk, bits, mode, nnz
_GAPS, _BITMAP = 0, 1
_MIN_EXPONENT, _MAX_EXPONENT = -128, 127  # one signed byte per chunk


def qmax_of(bits: int) -> int:
    """Largest code magnitude: symmetric signed codes in ``bits`` bits (2 bits: -1, 0, 1)."""
    return 2 ** (bits - 1) - 1


def kept_per_chunk(chunk: int, density: float) -> int:
    return max(1, round(chunk * density))


def _blocks(flat: torch.Tensor, chunk: int) -> torch.Tensor:
    """``flat`` as rows of ``chunk`` values, the last one padded with zeros."""
    padding = (-flat.numel()) % chunk
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return flat.reshape(-1, chunk)


def _exponents(blocks: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per row, the smallest e with max|row| <= qmax * 2**e (float64, clamped to a signed byte)."""
    largest = blocks.abs().amax(dim=1).double()
    safe = torch.where(largest > 0, largest, torch.ones_like(largest))
    e = torch.ceil(torch.log2(safe / qmax))
    e = e + (safe > qmax * torch.exp2(e)).double()  # float rounding of log2, either way
    e = e - (safe <= qmax * torch.exp2(e - 1)).double()
    e = torch.where(largest > 0, e, torch.zeros_like(e))
    return e.clamp(_MIN_EXPONENT, _MAX_EXPONENT).to(torch.int64)


def quantize(flat: torch.Tensor, chunk: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64, one per value, padded to whole chunks) and the exponent of each chunk."""
    qmax = qmax_of(bits)
    blocks = _blocks(flat.detach().reshape(-1).double(), chunk)
    e = _exponents(blocks, qmax)
    codes = torch.round(blocks / torch.exp2(e.double())[:, None]).clamp(-qmax, qmax).to(torch.int64)
    return codes, e


def dequantize(codes: torch.Tensor, e: torch.Tensor, numel: int) -> torch.Tensor:
    """fp32 values of ``codes`` (rows of a chunk) with each chunk's step ``2**e``: exact."""
    values = codes.double() * torch.exp2(e.double())[:, None]
    return values.reshape(-1)[:numel].float()


def sparsify(tensor: torch.Tensor, chunk: int, density: float, bits: int) -> torch.Tensor:
    """What the sender puts on the wire: top-k magnitudes of each chunk, on the chunk's grid; zeros elsewhere."""
    flat = tensor.detach().reshape(-1).float()
    blocks = _blocks(flat, chunk)
    k = min(kept_per_chunk(chunk, density), chunk)
    top = blocks.abs().topk(k, dim=1).indices
    kept = torch.zeros_like(blocks).scatter_(1, top, blocks.gather(1, top))
    codes, e = quantize(kept.reshape(-1), chunk, bits)
    return dequantize(codes, e, flat.numel()).reshape(tensor.shape)


class ErrorFeedback:
    """A peer's residual: what its codec dropped so far, added to the next pseudo-gradient.

    ``compress(delta)`` returns the vector to send, ``sparsify(delta + residual)``, and sets the
    residual to ``delta + residual - sent``. A round that is not applied must not count its delta
    twice (the model keeps that progress, so the next delta contains it again): ``restore()`` puts
    back the residual from before the last ``compress``. ``reset()`` drops it (see peer.diloco for when).
    """

    def __init__(self, shapes, chunk: int, density: float, bits: int):
        self.chunk, self.density, self.bits = chunk, density, bits
        self.residual = [torch.zeros(shape) for shape in shapes]
        self._before = None

    def compress(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        self._before = [r.clone() for r in self.residual]
        sent = []
        for delta, residual in zip(deltas, self.residual):
            accumulated = delta.detach().float() + residual
            out = sparsify(accumulated, self.chunk, self.density, self.bits)
            residual.copy_(accumulated - out)
            sent.append(out)
        return sent

    def restore(self) -> None:
        if self._before is not None:
            for residual, before in zip(self.residual, self._before):
                residual.copy_(before)
            self._before = None

    def reset(self) -> None:
        for residual in self.residual:
            residual.zero_()
        self._before = None

    def norm(self) -> float:
        return math.sqrt(sum(float(r.double().pow(2).sum()) for r in self.residual))


# -- the wire --------------------------------------------------------------------------------------

def _pack(codes: np.ndarray, bits: int) -> bytes:
    per = 8 // bits
    codes = np.concatenate([codes, np.zeros((-len(codes)) % per, dtype=codes.dtype)]).reshape(-1, per)
    shifts = (bits * np.arange(per)).astype(np.uint16)
    return (codes.astype(np.uint16) << shifts).sum(axis=1).astype(np.uint8).tobytes()


def _unpack(buffer: bytes, bits: int, count: int) -> np.ndarray:
    per = 8 // bits
    packed = np.frombuffer(buffer, dtype=np.uint8)
    shifts = (bits * np.arange(per)).astype(np.uint8)
    return ((packed[:, None] >> shifts) & (2 ** bits - 1)).reshape(-1)[:count].astype(np.int64)


def _encode_gaps(positions: np.ndarray) -> bytes:
    gaps = np.diff(positions, prepend=-1) - 1  # >= 0
    lengths = gaps // 255 + 1
    out = np.full(int(lengths.sum()), 255, dtype=np.uint8)
    out[np.cumsum(lengths) - 1] = gaps % 255
    return out.tobytes()


def _decode_gaps(buffer: bytes) -> np.ndarray:
    data = np.frombuffer(buffer, dtype=np.uint8)
    final = np.flatnonzero(data != 255)
    escapes_before = np.cumsum(data == 255)[final]  # 255s up to each final byte
    escapes = np.diff(escapes_before, prepend=0)
    gaps = escapes * 255 + data[final].astype(np.int64)
    return np.cumsum(gaps + 1) - 1


class SparseCodec(CompressionBase):
    """hivemind codec: nonzero positions (gaps or bitmap) + per-chunk exponent + packed low-bit codes."""

    compression_type = runtime_pb2.CompressionType.MEANSTD_16BIT

    def __init__(self, chunk: int = 256, bits: int = 4, density: float = 1 / 32):
        self.chunk, self.bits, self.density = chunk, bits, density

    def compress(self, tensor: torch.Tensor, info: CompressionInfo | None = None,
                 allow_inplace: bool = False) -> runtime_pb2.Tensor:
        if info is not None and info.part_size is not None and info.part_size % self.chunk:
            raise ValueError(f"sparse codec: all-reduce parts of {info.part_size} values do not align with chunks "
                             f"of {self.chunk}")
        flat = tensor.detach().reshape(-1).float()
        if not torch.isfinite(flat).all():
            raise ValueError("sparse codec: non-finite values")
        codes, e = quantize(flat, self.chunk, self.bits)
        codes = codes.reshape(-1)[:flat.numel()].numpy()
        positions = np.flatnonzero(codes)
        gaps = _encode_gaps(positions)
        bitmap_bytes = (flat.numel() + 7) // 8
        if len(gaps) <= bitmap_bytes:
            mode, where = _GAPS, gaps
        else:
            mask = np.zeros(flat.numel(), dtype=bool)
            mask[positions] = True
            mode, where = _BITMAP, np.packbits(mask).tobytes()
        buffer = b"".join([
            _HEADER.pack(flat.numel(), self.chunk, self.bits, mode, len(positions)),
            e.numpy().astype(np.int8).tobytes(),
            struct.pack("<I", len(where)), where,
            _pack(codes[positions] + qmax_of(self.bits), self.bits),
        ])
        return runtime_pb2.Tensor(compression=self.compression_type, buffer=buffer, size=tensor.shape,
                                  dtype=MARKER, requires_grad=tensor.requires_grad)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        return extract_sparse(serialized_tensor)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        return 1 / 16  # a power of two: parts hold 2**21 values, whole chunks (see the module docstring)


def extract_sparse(message: runtime_pb2.Tensor) -> torch.Tensor:
    """Decode a :class:`SparseCodec` message (self-describing: chunk and bits travel in its header)."""
    buffer = message.buffer
    numel, chunk, bits, mode, nnz = _HEADER.unpack_from(buffer, 0)
    if bits not in BITS or chunk < 1 or numel != math.prod(message.size):
        raise ValueError("sparse codec: malformed header")
    offset = _HEADER.size
    blocks = -(-numel // chunk)
    e = np.frombuffer(buffer, dtype=np.int8, count=blocks, offset=offset).astype(np.int64)
    offset += blocks
    (where_len,) = struct.unpack_from("<I", buffer, offset)
    offset += 4
    where = buffer[offset:offset + where_len]
    offset += where_len
    if mode == _GAPS:
        positions = _decode_gaps(where)
    else:
        positions = np.flatnonzero(np.unpackbits(np.frombuffer(where, dtype=np.uint8))[:numel])
    codes = _unpack(buffer[offset:], bits, nnz) - qmax_of(bits)
    if len(positions) != nnz or len(codes) != nnz or (nnz and positions[-1] >= numel):
        raise ValueError("sparse codec: malformed positions or values")
    dense = np.zeros(blocks * chunk, dtype=np.int64)
    dense[positions] = codes
    values = dequantize(torch.from_numpy(dense).reshape(blocks, chunk), torch.from_numpy(e), numel)
    return values.reshape(tuple(message.size))


class _ScaledFloat16OrSparse(ScaledFloat16Compression):
    """The MEANSTD_16BIT slot's decoder: sparse messages by their marker, anything else as hivemind did."""

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        if serialized_tensor.dtype == MARKER:
            return extract_sparse(serialized_tensor)
        return super().extract(serialized_tensor)


_serialization._BASE_COMPRESSION_TYPES["MEANSTD_16BIT"] = _ScaledFloat16OrSparse()


def error_figure(tensors: list[torch.Tensor], chunk: int) -> float:
    """A member's figure for :func:`average_error_bound`: sqrt(sum over chunks of max|chunk|^2)."""
    total = 0.0
    for tensor in tensors:
        largest = _blocks(tensor.detach().reshape(-1).double(), chunk).abs().amax(dim=1)
        total += float(largest.pow(2).sum())
    return math.sqrt(total)


def average_error_bound(figures: list[float], chunk: int, density: float, bits: int) -> float:
    """Largest L2 error the downlink encoding of the group's aggregate can add (uplink is lossless).

    Every aggregate value lies within the senders' values at its position (mean, trimmed mean and
    centered clip all do), so a chunk's max is at most the senders' largest max there, and a chunk
    holds at most min(chunk, n k) nonzeros, each off by less than max|chunk| / qmax:
    error^2 <= min(chunk, n k) / qmax^2 * sum_i figure_i^2.
    """
    nonzeros = min(chunk, len(figures) * kept_per_chunk(chunk, density))
    return math.sqrt(nonzeros) / qmax_of(bits) * math.sqrt(sum(f * f for f in figures))
