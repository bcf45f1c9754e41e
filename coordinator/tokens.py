"""Join tokens: org-scoped, expiring, use-limited, and signed by the coordinator's Ed25519 key.

A token reads ``plk1.<payload>.<signature>`` (base64url). The payload names its id, org, run,
expiry and the most peer identities it may admit. The signature makes a token unforgeable without
the coordinator key; the ledger row with the same id makes it revocable.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

PREFIX = "plk1"
MAX_TOKEN_CHARS = 1024
DURATION = re.compile(r"^(\d+)\s*([smhdw])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class TokenError(Exception):
    """A token that is not one of ours (malformed, forged) or expired."""


@dataclass(frozen=True)
class TokenClaims:
    id: str
    org: str
    run_id: str
    expires: float  # unix seconds; 0 means never
    max_peers: int  # 0 means no limit

    def payload(self) -> bytes:
        return json.dumps(
            {"v": 1, "id": self.id, "org": self.org, "run": self.run_id, "exp": self.expires, "max": self.max_peers},
            sort_keys=True, separators=(",", ":"),
        ).encode()


def parse_duration(text: str) -> float:
    """'90s', '30m', '12h', '7d', '2w' -> seconds; 'never' -> 0."""
    if text.strip().lower() == "never":
        return 0.0
    match = DURATION.match(text.strip().lower())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: use a number and a unit s, m, h, d or w (e.g. 7d), or 'never'")
    return float(int(match.group(1)) * UNITS[match.group(2)])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode(claims: TokenClaims, private_key) -> str:
    payload = claims.payload()
    return f"{PREFIX}.{_b64(payload)}.{_b64(private_key.sign(payload))}"


def decode(token: str, public_key: bytes, now: float | None = None) -> TokenClaims:
    """Verify a token's signature and expiry; the caller still checks revocation in the ledger."""
    parts = token.strip().split(".")
    if len(token) > MAX_TOKEN_CHARS or len(parts) != 3 or parts[0] != PREFIX:
        raise TokenError("unknown join token (not a potluck token); ask the run's operator for a valid token")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, payload)
        data = json.loads(payload)
        claims = TokenClaims(str(data["id"]), str(data["org"]), str(data["run"]), float(data["exp"]), int(data["max"]))
    except (ValueError, KeyError, TypeError, InvalidSignature):
        raise TokenError("unknown join token (bad signature: forged, truncated or for another coordinator); "
                         "ask the run's operator for a valid token") from None
    now = time.time() if now is None else now
    if claims.expires and now > claims.expires:
        raise TokenError(f"this join token expired at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(claims.expires))}; "
                         f"ask the run's operator for a new one")
    return claims


def issue(ledger, private_key, run_id: str, org: str, ttl: float, max_peers: int) -> tuple[str, TokenClaims]:
    """Record a new token for `org` in the ledger and return it signed, with its claims."""
    if max_peers < 0:
        raise ValueError(f"--max-peers must be >= 0 (0: no limit), got {max_peers}")
    claims = TokenClaims(
        id=secrets.token_hex(6), org=org.strip(), run_id=run_id,
        expires=round(time.time() + ttl, 3) if ttl else 0.0, max_peers=max_peers,
    )
    ledger.add_token(claims.id, claims.org, claims.expires, claims.max_peers)
    return encode(claims, private_key), claims
