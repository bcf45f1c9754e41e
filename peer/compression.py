"""Wire codecs for averaged tensors, chosen by name in run.toml (``[averaging] compression``).

- ``none``: fp32 as is;
- ``fp16``: half precision, 2x fewer bytes, relative error ~1e-3;
- ``uint8``: hivemind's uniform 8-bit quantization (a 256-entry codebook per tensor part), 4x fewer bytes;
- ``sparse`` (DiLoCo only): top-k of each chunk with low-bit values and error feedback (peer.sparse_codec),
  ~40x fewer bytes than fp16 at density 1/32 and 4 bits.

hivemind 1.1.12 decodes 8-bit tensors with ``int(np.frombuffer(buffer, count=1))``, which numpy >= 2.4
refuses (a 1-element array is no longer converted by ``int``). The reducer then drops the failed part
and still reports a full group: averaged values are silently wrong (HIVEMIND_NOTES trap 1). Importing
this module patches ``Quantization.extract`` once, in this one place, with the fix hivemind made
after the release (``.item()``); tests check averaged values across real processes, not a log line.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
)
from hivemind.compression import quantization as _quantization
from hivemind.proto import runtime_pb2

from peer import sparse_codec

# Worst relative L2 error of one encode/decode, with margin (tests/test_strategies.py holds the codecs
# to it): uint8 is ~0.015 on Gaussian values but ~0.15 on heavy-tailed ones (values beyond 3 sigma are
# clipped to the outermost bucket), e.g. pseudo-gradients where a few weights moved a lot.
RELATIVE_ERROR_BOUND = {"none": 0.0, "fp16": 1e-3, "uint8": 0.2}


def _extract_8bit(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
    """hivemind's ``Quantization.extract`` with the numpy >= 2.4 fix (``.item()`` instead of ``int(...)``)."""
    codebook_size = np.frombuffer(serialized_tensor.buffer, count=1, dtype=np.int64).item()
    codebook = np.frombuffer(serialized_tensor.buffer, offset=8, count=codebook_size, dtype=self.codebook_dtype)
    quantized = np.frombuffer(serialized_tensor.buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
    quantized = torch.as_tensor(quantized, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
    codebook = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
    return codebook[quantized].requires_grad_(serialized_tensor.requires_grad)


_quantization.Quantization.extract = _extract_8bit

_CODECS = {"none": NoCompression, "fp16": Float16Compression, "uint8": Uniform8BitQuantization}


def make_compression(name: str, chunk: int = 256, bits: int = 4, density: float = 1 / 32) -> CompressionBase:
    """The hivemind codec called ``name`` (none, fp16, uint8, or sparse with its chunk, bits and density)."""
    if name == "sparse":
        return sparse_codec.SparseCodec(chunk=chunk, bits=bits, density=density)
    try:
        return _CODECS[name]()
    except KeyError:
        raise ValueError(f"unknown compression {name!r}; choose one of {', '.join(_CODECS)}, sparse") from None


def codec_of(averaging) -> CompressionBase:
    """The codec an ``[averaging]`` section (peer.runconfig.AveragingConfig) names, with its parameters."""
    return make_compression(averaging.compression, chunk=averaging.sparse_chunk, bits=averaging.sparse_bits,
                            density=averaging.sparse_density)


def round_trip(tensor: torch.Tensor, codec: str | CompressionBase) -> tuple[torch.Tensor, int]:
    """Encode and decode ``tensor`` as the wire would; returns the decoded tensor and the payload bytes."""
    from hivemind.compression import deserialize_torch_tensor

    codec = make_compression(codec) if isinstance(codec, str) else codec
    message = codec.compress(tensor, CompressionInfo.from_tensor(tensor))
    return deserialize_torch_tensor(message), len(message.buffer)


def error_figure(codec: CompressionBase, tensors: list[torch.Tensor]) -> float:
    """What a member tells its group about the codec's error on the vector it sends (see error_bound)."""
    if isinstance(codec, sparse_codec.SparseCodec):
        return sparse_codec.error_figure(tensors, codec.chunk)
    if isinstance(codec, NoCompression):
        return 0.0
    return math.sqrt(sum(float((round_trip(t, codec)[0] - t).double().pow(2).sum()) for t in tensors))


def error_bound(codec: CompressionBase, figures: list[float]) -> float:
    """L2 error the all-reduce may add to the group's aggregate, from the members' error figures.

    hivemind codecs: a member's figure is the loss of one encode/decode of its vector; the parts going
    up lose at most the largest of them, the aggregate coming down about twice that. sparse: the
    uplink is lossless, the downlink bounded by peer.sparse_codec.average_error_bound.
    """
    if isinstance(codec, sparse_codec.SparseCodec):
        return sparse_codec.average_error_bound(figures, codec.chunk, codec.density, codec.bits)
    return 3 * max(figures, default=0.0)
