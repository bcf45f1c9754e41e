"""What a volunteer types to reach a coordinator (HOST:PORT, the certificate's fingerprint), checked
with nothing but the standard library, so a typo is answered before torch or gRPC is imported."""

from __future__ import annotations

from peer.errors import UserError


def normalize_fingerprint(text: str) -> str:
    """Accept 'sha256:AB:CD...', 'abcd...' and the like; return 64 lowercase hex digits."""
    value = text.strip().lower()
    value = value.removeprefix("sha256:").replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise UserError(
            f"--fingerprint must be the coordinator certificate's SHA-256 (64 hex digits, as printed by "
            f"'coordinator serve'), got {text!r}"
        )
    return value


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) with a port from 1 to 65535."""
    host, _, port = address.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"coordinator address {address!r} must be HOST:PORT with a port from 1 to 65535, "
                        f"e.g. 127.0.0.1:7450")
    return host.strip("[]"), int(port)
