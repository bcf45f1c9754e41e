"""The coordinator's checkpoint store: DATA_DIR/checkpoints/epoch-NNNNNNNN.{safetensors,json}.

Each checkpoint is the swarm's training state as safetensors (the averaged model plus the sync
optimizer's state or DiLoCo's outer momentum, peer/checkpoint.py) and a manifest (epoch, run id, run
config hash, sha256 and size of the file, what it holds). Checkpoints of the first format (model
only) still load; a peer resuming from one says that its optimizer starts fresh. Both are written atomically (temporary file, fsync,
os.replace, fsync of the directory), the manifest last, so a manifest always names a complete file;
only the newest ``keep`` are kept. A checkpoint is loaded only after its sha256 matches its manifest.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peer.checkpoint import TrainingState, sha256_hex, training_state_from_bytes, training_state_to_bytes
from peer.errors import UserError

CHECKPOINT_DIR = "checkpoints"
FAILURE_FILE = "failure.json"  # the last failed checkpoint, until the next one is saved (dashboard alert)
FORMAT = "potluck-checkpoint-2"
FORMATS = ("potluck-checkpoint-1", FORMAT)  # the first format holds the model only

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Manifest:
    epoch: int
    run_id: str
    run_config_hash: str
    file: str  # name of the safetensors file next to the manifest
    sha256: str
    bytes: int
    created: float
    format: str = FORMAT
    holds: str = "parameters only"  # TrainingState.holds(): what a resumed peer gets back


def checkpoint_dir(data_dir: Path) -> Path:
    return Path(data_dir) / CHECKPOINT_DIR


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """All or nothing, durable: readers see the old file or the complete new one, even after a crash."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(data_dir: Path, epoch: int, state: TrainingState, run_id: str,
                    run_config_hash: str, keep: int) -> Manifest:
    directory = checkpoint_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"epoch-{epoch:08d}"
    data = training_state_to_bytes(state, {"epoch": str(epoch), "run_id": run_id, "run_config_hash": run_config_hash})
    manifest = Manifest(epoch=epoch, run_id=run_id, run_config_hash=run_config_hash, file=f"{stem}.safetensors",
                        sha256=sha256_hex(data), bytes=len(data), created=time.time(), holds=state.holds())
    write_atomically(directory / manifest.file, data)
    write_atomically(directory / f"{stem}.json", json.dumps(asdict(manifest), indent=2).encode())
    for old in list_checkpoints(data_dir)[keep:]:
        for name in (old.file, Path(old.file).with_suffix(".json").name):
            (directory / name).unlink(missing_ok=True)
    return manifest


def _read_manifest(path: Path) -> Manifest | None:
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(**raw)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.format not in FORMATS or "/" in manifest.file or not (path.parent / manifest.file).is_file():
        return None
    return manifest


def list_checkpoints(data_dir: Path) -> list[Manifest]:
    """Complete checkpoints, newest first."""
    directory = checkpoint_dir(data_dir)
    if not directory.is_dir():
        return []
    manifests = [m for m in map(_read_manifest, directory.glob("epoch-*.json")) if m is not None]
    return sorted(manifests, key=lambda m: m.epoch, reverse=True)


def latest_checkpoint(data_dir: Path) -> Manifest | None:
    checkpoints = list_checkpoints(data_dir)
    return checkpoints[0] if checkpoints else None


def find_checkpoint(data_dir: Path, sha256: str) -> Manifest | None:
    return next((m for m in list_checkpoints(data_dir) if m.sha256 == sha256), None)


def read_checkpoint_bytes(data_dir: Path, manifest: Manifest) -> bytes:
    return (checkpoint_dir(data_dir) / manifest.file).read_bytes()


def load_training_state(data_dir: Path, manifest: Manifest) -> TrainingState:
    """The checkpoint's training state, after checking the file against the manifest's sha256."""
    return training_state_from_bytes(read_checkpoint_bytes(data_dir, manifest), manifest.sha256,
                                     what=f"checkpoint {manifest.file}")


def load_checkpoint(data_dir: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The checkpoint's model (state dict), after checking the file against the manifest's sha256."""
    return load_training_state(data_dir, manifest).model


def require_latest(data_dir: Path) -> Manifest:
    manifest = latest_checkpoint(data_dir)
    if manifest is None:
        raise UserError(f"no checkpoint in {checkpoint_dir(data_dir)} yet; the coordinator writes one every "
                        f"[checkpoints] every epochs while peers train")
    return manifest


def record_failure(data_dir: Path, epoch: int, why: str) -> None:
    """Remember a failed checkpoint for the dashboard (removed when the next checkpoint is saved)."""
    directory = checkpoint_dir(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    write_atomically(directory / FAILURE_FILE, json.dumps({"epoch": epoch, "why": why, "time": time.time()}).encode())


def clear_failure(data_dir: Path) -> None:
    (checkpoint_dir(data_dir) / FAILURE_FILE).unlink(missing_ok=True)


def last_failure(data_dir: Path) -> dict | None:
    """{"epoch", "why", "time"} of the last failed checkpoint not yet followed by a saved one, or None."""
    try:
        raw = json.loads((checkpoint_dir(data_dir) / FAILURE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("epoch"), int) or not isinstance(raw.get("why"), str):
        return None
    return {"epoch": raw["epoch"], "why": raw["why"], "time": raw.get("time")}
