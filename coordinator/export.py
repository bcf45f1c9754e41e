"""`coordinator export`: the latest checkpoint as a file for use outside potluck (safetensors or torch)."""

from __future__ import annotations

import io
from pathlib import Path

from coordinator.checkpoints import Manifest, load_checkpoint, require_latest, write_atomically
from peer.checkpoint import state_to_bytes
from peer.errors import UserError


def export_latest(data_dir: Path, out: Path, format: str) -> Manifest:
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"cannot write {out}: the directory {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a file name, e.g. {out / 'model.safetensors'}")
    manifest = require_latest(data_dir)
    state = load_checkpoint(data_dir, manifest)
    if format == "safetensors":
        data = state_to_bytes(state, {"epoch": str(manifest.epoch), "run_id": manifest.run_id,
                                      "run_config_hash": manifest.run_config_hash})
    elif format == "torch":
        import torch

        buffer = io.BytesIO()
        torch.save({"epoch": manifest.epoch, "run_id": manifest.run_id, "state_dict": state}, buffer)
        data = buffer.getvalue()
    else:
        raise UserError(f"unknown export format {format!r}; use safetensors or torch")
    write_atomically(out, data)
    return manifest
