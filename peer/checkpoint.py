"""Model checkpoints as safetensors bytes: safe to load from anywhere (no pickle), checked before use.

The coordinator writes them (coordinator/checkpoints.py); a peer that starts a run from a checkpoint
receives the bytes over gRPC and checks them here against the sha256 its Join reply announced, then
against the task's model (every key, shape and dtype, finite values).

A checkpoint holds the whole training state a strategy needs to go on where the swarm was, not
only the model: the model's tensors under their state-dict names (so any safetensors reader gets
the model), plus, under names no module can have (they contain ``/``), a sync run's optimizer state
(``optimizer/NNNNN``, hivemind's flat form, its structure as JSON in the file's metadata;
peer/optimizer_state.py) or a DiLoCo run's outer momentum (``momentum/<parameter name>``; the
model's parameters are then the anchor). Files of the first format hold the model only; they load,
and the peer says that its optimizer starts fresh.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from peer.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are handled: CLIs that only read files stay fast
    import torch


STATE_FORMAT = "2"  # "potluck_format" in a file's metadata; files without it are format 1 (model only)
OPTIMIZER_PREFIX = "optimizer/"
MOMENTUM_PREFIX = "momentum/"


@dataclass
class TrainingState:
    """What a checkpoint restores: the model, and what the run's strategy keeps beside it."""

    model: dict  # state-dict name -> tensor (DiLoCo: the parameters are the anchor)
    strategy: str = ""  # "sync" or "diloco"; "" for a file of the first format (model only)
    optimizer: tuple[list, list] | None = None  # sync: hivemind's flat optimizer state (metadata, tensors)
    momentum: dict = field(default_factory=dict)  # diloco: outer momentum, parameter name -> tensor

    def holds(self) -> str:
        """The parts beside the model, in words (for manifests and messages)."""
        if self.optimizer is not None:
            return "parameters + optimizer state"
        if self.momentum:
            return "anchor + outer momentum"
        return "parameters only"


def training_state_to_bytes(state: TrainingState, metadata: dict[str, str]) -> bytes:
    tensors = dict(state.model)
    extra = {"potluck_format": STATE_FORMAT, "strategy": state.strategy}
    if state.optimizer is not None:
        flat_metadata, flat_tensors = state.optimizer
        tensors.update({f"{OPTIMIZER_PREFIX}{index:05d}": t for index, t in enumerate(flat_tensors)})
        extra["optimizer_metadata"] = json.dumps(list(flat_metadata))
    tensors.update({f"{MOMENTUM_PREFIX}{name}": t for name, t in state.momentum.items()})
    return state_to_bytes(tensors, {**metadata, **extra})


def training_state_from_bytes(data: bytes, expected_sha256: str, what: str = "checkpoint") -> TrainingState:
    """Parse a checkpoint of either format (sha256 checked first); shapes are checked where it is used."""
    tensors = state_from_bytes(data, expected_sha256, what)
    metadata = _safetensors_metadata(data)
    if "potluck_format" not in metadata:
        return TrainingState(model=tensors)
    if metadata["potluck_format"] != STATE_FORMAT:
        raise UserError(f"the {what} has format {metadata['potluck_format']!r}, this version reads "
                        f"{STATE_FORMAT!r} and the first; update potluck")
    model = {name: t for name, t in tensors.items() if "/" not in name}
    optimizer = None
    if "optimizer_metadata" in metadata:
        try:
            flat_metadata = json.loads(metadata["optimizer_metadata"])
        except ValueError:
            raise UserError(f"the {what} has unreadable optimizer metadata") from None
        count = sum(name.startswith(OPTIMIZER_PREFIX) for name in tensors)
        try:
            optimizer = (flat_metadata, [tensors[f"{OPTIMIZER_PREFIX}{index:05d}"] for index in range(count)])
        except KeyError:
            raise UserError(f"the {what} has gaps in its optimizer tensors") from None
    momentum = {name[len(MOMENTUM_PREFIX):]: t for name, t in tensors.items() if name.startswith(MOMENTUM_PREFIX)}
    return TrainingState(model=model, strategy=metadata.get("strategy", ""), optimizer=optimizer, momentum=momentum)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes that already parsed (8-byte length, then a JSON header)."""
    length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8:8 + length]).get("__metadata__") or {}
    return {str(key): str(value) for key, value in metadata.items()}


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
