"""Signed coordinator RPCs: every request a peer sends carries an Ed25519 signature by its identity key.

The signature covers the method, a hash of the exact request bytes, the run id, a timestamp and a
random nonce, so the coordinator can reject a tampered body, a request meant for another run or
method, a stale request and a replayed one. The signature travels in gRPC metadata; the body is
signed as serialized, so nothing is re-encoded before checking.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

KEY_HEADER = "x-potluck-key"
TIME_HEADER = "x-potluck-time"
NONCE_HEADER = "x-potluck-nonce"
RUN_HEADER = "x-potluck-run"
SIGNATURE_HEADER = "x-potluck-signature"
HEADERS = (KEY_HEADER, TIME_HEADER, NONCE_HEADER, RUN_HEADER, SIGNATURE_HEADER)


def canonical(method: str, body: bytes, run_id: str, timestamp: str, nonce: str) -> bytes:
    """The exact bytes signed for one request (fields are newline-free by construction)."""
    return "\n".join(
        ["potluck-rpc-v1", method, hashlib.sha256(body).hexdigest(), run_id, timestamp, nonce]
    ).encode()


def sign_request(identity, method: str, body: bytes, run_id: str, now: float | None = None) -> list[tuple[str, str]]:
    """gRPC metadata that authenticates `body` as sent by `identity` to `method` of run `run_id`."""
    timestamp = f"{time.time() if now is None else now:.3f}"
    nonce = secrets.token_hex(16)
    signature = identity.private_key.sign(canonical(method, body, run_id, timestamp, nonce))
    return [
        (KEY_HEADER, identity.public_bytes.hex()),
        (TIME_HEADER, timestamp),
        (NONCE_HEADER, nonce),
        (RUN_HEADER, run_id),
        (SIGNATURE_HEADER, signature.hex()),
    ]


class SignatureError(Exception):
    """A request whose signature headers are missing, malformed or do not verify."""


def verify_request(metadata: dict[str, str], method: str, body: bytes) -> tuple[bytes, float, str, str]:
    """Check the signature headers of a request; returns (public key, timestamp, nonce, run id)."""
    missing = [name for name in HEADERS if name not in metadata]
    if missing:
        raise SignatureError(f"unsigned request (missing {', '.join(missing)}); use a current potluck peer")
    try:
        public_key = bytes.fromhex(metadata[KEY_HEADER])
        signature = bytes.fromhex(metadata[SIGNATURE_HEADER])
        timestamp = float(metadata[TIME_HEADER])
    except ValueError:
        raise SignatureError("malformed signature headers") from None
    nonce, run_id = metadata[NONCE_HEADER], metadata[RUN_HEADER]
    if len(public_key) != 32 or len(signature) != 64 or not 16 <= len(nonce) <= 64 or len(run_id) > 128:
        raise SignatureError("malformed signature headers")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(
            signature, canonical(method, body, run_id, metadata[TIME_HEADER], nonce)
        )
    except InvalidSignature:
        raise SignatureError("bad request signature (tampered body or wrong key)") from None
    return public_key, timestamp, nonce, run_id
