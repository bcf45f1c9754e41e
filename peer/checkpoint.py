"""Model checkpoints as safetensors bytes: safe to load from anywhere (no pickle), checked before use.

The coordinator writes them (coordinator/checkpoints.py); a peer that starts a run from a checkpoint
receives the bytes over gRPC and checks them here against the sha256 its Join reply announced, then
against the task's model (every key, shape and dtype, finite values).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from peer.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are handled: CLIs that only read files stay fast
    import torch


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_to_bytes(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}, metadata=metadata)


def state_from_bytes(data: bytes, expected_sha256: str, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Parse safetensors bytes whose sha256 must be ``expected_sha256``; UserError when they differ."""
    from safetensors.torch import load

    if sha256_hex(data) != expected_sha256:
        raise UserError(f"the {what} arrived corrupted (sha256 mismatch); try again")
    try:
        return load(data)
    except Exception as error:  # safetensors raises its own error types for malformed headers
        raise UserError(f"the {what} is not a valid safetensors file: {error}") from None


def load_into_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Load a state dict that must match the model exactly and hold only finite values."""
    import torch
    expected = model.state_dict()
    if set(expected) != set(state_dict):
        raise UserError(f"the {what} does not fit this task's model (different tensor names)")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise UserError(f"the {what} does not fit this task's model ({name}: {tuple(tensor.shape)}, "
                            f"{tensor.dtype}; expected {tuple(expected[name].shape)}, {expected[name].dtype})")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"the {what} holds non-finite values in {name}")
    model.load_state_dict(state_dict, strict=True)


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A sha256 over names, shapes and exact values: equal fingerprints mean bit-identical parameters."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
