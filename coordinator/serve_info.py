"""What a serving coordinator leaves in its data dir: file names, coordinator.json, the join command.

Kept apart from coordinator/server.py (which imports gRPC and, through the service, torch) so the
commands that only read these answer at once.
"""

from __future__ import annotations

import json
from pathlib import Path

INFO_FILE = "coordinator.json"
KEY_FILE = "coordinator.key"  # the coordinator's Ed25519 identity: signs join tokens and swarm access tokens
LOCK_FILE = "serve.lock"  # held by serve for its lifetime: one coordinator per data dir


def join_command(address: str, token: str, fingerprint: str | None) -> str:
    pin = f"--fingerprint {fingerprint}" if fingerprint else "--insecure"
    return f"peer join {address} --token {token} {pin}"


def read_info(data_dir: Path) -> dict | None:
    try:
        return json.loads((Path(data_dir) / INFO_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
