"""A peer's identity: an Ed25519 key created once under its data dir (mode 0600) and reused.

The peer id is derived from the public key, so it is stable across restarts and cannot be
claimed without the key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_FILE = "identity.key"


@dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def peer_id(self) -> str:
        return peer_id_of(self.public_bytes)


def peer_id_of(public_key: bytes) -> str:
    return "p-" + hashlib.sha256(public_key).hexdigest()[:16]


def load_or_create_identity(data_dir: Path, file_name: str = KEY_FILE) -> Identity:
    """Load the Ed25519 key DATA_DIR/file_name, creating it (mode 0600) on first use."""
    path = Path(data_dir) / file_name
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        return Identity(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    return Identity(key)
