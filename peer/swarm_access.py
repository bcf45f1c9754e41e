"""Who may take part in the swarm: coordinator-issued access tokens and the admitted-peer lists.

Two gates, both fed by the coordinator through the peer's heartbeats:

1. The DHT. Every DHT request and response carries a short-lived access token, signed by the
   coordinator's Ed25519 key and bound to the sender's hivemind peer id and its request-signing
   key (hivemind's ``TokenAuthorizerBase``). A process without a token cannot bootstrap or store
   progress; an evicted peer's token is refused at once (deny list) and can no longer be renewed.
2. Averaging. hivemind's authorizer does not cover the averager's RPCs (HIVEMIND_NOTES trap 3), so
   the averager's handlers are wrapped here: join-group, all-reduce parts and state download are
   served only to peers on the allow list, and a peer only follows leaders on it. libp2p
   authenticates the remote peer id of every connection, so the list cannot be spoofed.

When admission takes effect. The coordinator's Join handler writes the new lists for its own
(bootstrap) DHT node before it replies, and the Join reply carries them to the newcomer, so both
ends of the newcomer's first contact already agree. Current peers learn of a newcomer from their
next heartbeat reply (the lists ride along whenever their version changed): their averaging
gates accept it within one ``heartbeat_interval`` plus one call (``peer.timeouts.CALL``) of its
Join, 7 s with the defaults. Until then a round the newcomer tries to join with them is refused
and it tries the next one; its DHT requests are never refused (that gate checks tokens only).

hivemind runs the DHT and averagers in forked processes, so the tokens and lists travel from the
main process to them through two small files in the peer's data dir, replaced atomically.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from peer.files import replace_file

log = logging.getLogger("potluck.swarm")

TOKEN_FILE = "swarm_access.token"
LISTS_FILE = "swarm_access.json"
REFRESH_FRACTION = 0.5  # renew once half of a token's lifetime has passed


def _canonical(username: str, rsa_public_key: bytes, expiration_time: str) -> bytes:
    return b"\n".join([b"potluck-swarm-access-v1", username.encode(), rsa_public_key, expiration_time.encode()])


def issue_access_token(private_key, username: str, rsa_public_key: bytes, ttl: float, now: float | None = None):
    """An AccessToken (hivemind's protobuf) for `username`, signed by the coordinator key."""
    from hivemind.proto.auth_pb2 import AccessToken

    expires = f"{(time.time() if now is None else now) + ttl:.3f}"
    return AccessToken(
        username=username, public_key=rsa_public_key, expiration_time=expires,
        signature=private_key.sign(_canonical(username, rsa_public_key, expires)),
    )


def access_token_valid(token, coordinator_public_key: bytes, now: float | None = None) -> bool:
    try:
        expires = float(token.expiration_time)
        Ed25519PublicKey.from_public_bytes(coordinator_public_key).verify(
            token.signature, _canonical(token.username, token.public_key, token.expiration_time)
        )
    except (ValueError, InvalidSignature):
        return False
    return (time.time() if now is None else now) < expires


class AccessFiles:
    """The token and lists handed from the main process to hivemind's forked processes."""

    def __init__(self, data_dir: Path):
        self.token_path = Path(data_dir) / TOKEN_FILE
        self.lists_path = Path(data_dir) / LISTS_FILE
        self._cache: tuple[float, dict] | None = None

    def write_token(self, token_bytes: bytes) -> None:
        replace_file(self.token_path, token_bytes, mode=0o600)

    def read_token(self):
        from hivemind.proto.auth_pb2 import AccessToken

        return AccessToken.FromString(self.token_path.read_bytes())  # protobuf, never pickle

    def write_lists(self, version: str, allow: list[str], deny: list[str]) -> None:
        replace_file(self.lists_path, json.dumps({"version": version, "allow": allow, "deny": deny}).encode())

    def lists(self) -> dict:
        """The latest lists, re-read only when the file changed."""
        try:
            mtime = self.lists_path.stat().st_mtime_ns
        except FileNotFoundError:
            return {"version": "", "allow": [], "deny": []}
        if self._cache is None or self._cache[0] != mtime:
            data = json.loads(self.lists_path.read_text())
            self._cache = (mtime, {"version": data["version"], "allow": set(data["allow"]), "deny": set(data["deny"])})
        return self._cache[1]

    def version(self) -> str:
        return self.lists()["version"]


def make_authorizer(data_dir: Path, coordinator_public_key: bytes):
    """A hivemind DHT authorizer that admits only holders of a valid, non-revoked potluck token.

    A peer creates it before Join (the coordinator binds the access token to its signing key) and
    sets ``coordinator_public_key`` from the Join reply, before the DHT starts.
    """
    from hivemind.utils.auth import TokenAuthorizerBase

    class PotluckAuthorizer(TokenAuthorizerBase):
        def __init__(self):
            super().__init__()
            self.files = AccessFiles(data_dir)
            self.loaded_at = 0.0
            self.coordinator_public_key = coordinator_public_key

        async def get_token(self):
            self.loaded_at = time.time()
            return self.files.read_token()

        def is_token_valid(self, access_token) -> bool:
            if not access_token_valid(access_token, self.coordinator_public_key):
                return False
            return access_token.username not in self.files.lists()["deny"]

        def does_token_need_refreshing(self, access_token) -> bool:
            """Reload when the main process wrote a renewed token, or close to expiry."""
            try:
                renewed = self.files.token_path.stat().st_mtime > self.loaded_at
            except FileNotFoundError:
                renewed = False
            return renewed or time.time() > float(access_token.expiration_time) - 5

    return PotluckAuthorizer()


def rsa_public_key(authorizer) -> bytes:
    """The key the DHT authorizer signs requests with; the coordinator binds tokens to it."""
    return authorizer.local_public_key.to_bytes()


def install_averaging_guard(data_dir: Path) -> None:
    """Serve averaging RPCs only to admitted peers, and follow only admitted leaders (trap 3).

    Patches hivemind 1.1.12's DecentralizedAverager class in this process, before
    any averager is created (they run in forked children, which inherit the patch).
    """
    from hivemind.proto import averaging_pb2
    from hivemind.averaging.averager import DecentralizedAverager

    if getattr(DecentralizedAverager, "_potluck_guarded", False):
        return
    files = AccessFiles(data_dir)

    def admitted(peer_id) -> bool:
        lists = files.lists()
        return peer_id.to_base58() in lists["allow"] and peer_id.to_base58() not in lists["deny"]

    from hivemind.p2p import P2PHandlerError

    join_group, aggregate_part, download_state = (
        DecentralizedAverager.rpc_join_group, DecentralizedAverager.rpc_aggregate_part,
        DecentralizedAverager.rpc_download_state,
    )
    get_stub = DecentralizedAverager.get_stub.__func__

    # hivemind reads each handler's argument names and type hints: keep both (functools.wraps, same names)
    @functools.wraps(join_group)
    async def guarded_join_group(self, request, context):
        if not admitted(context.remote_id):
            log.warning("refused averaging join from unadmitted peer %s", context.remote_id)
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in join_group(self, request, context):
            yield message

    @functools.wraps(aggregate_part)
    async def guarded_aggregate_part(self, stream, context):
        if not admitted(context.remote_id):
            log.warning("refused averaging data from unadmitted peer %s", context.remote_id)
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in aggregate_part(self, stream, context):
            yield message

    @functools.wraps(download_state)
    async def guarded_download_state(self, _request, _context):
        if not admitted(_context.remote_id):
            log.warning("refused state download by unadmitted peer %s", _context.remote_id)
            return
        async for message in download_state(self, _request, _context):
            yield message

    def guarded_get_stub(cls, p2p, peer, *, namespace=None):
        """Every outgoing averaging call (join a leader, send parts, download state) goes through here."""
        if not admitted(peer):
            raise P2PHandlerError(f"peer {peer} is not admitted to this run")
        return get_stub(cls, p2p, peer, namespace=namespace)

    DecentralizedAverager.rpc_join_group = guarded_join_group
    DecentralizedAverager.rpc_aggregate_part = guarded_aggregate_part
    DecentralizedAverager.rpc_download_state = guarded_download_state
    DecentralizedAverager.get_stub = classmethod(guarded_get_stub)
    DecentralizedAverager._potluck_guarded = True
