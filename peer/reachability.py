"""Reachability self-test at join: can other peers dial this one?

Before its swarm node starts, the peer listens on the port that node will use and asks the
coordinator (StatusProbe) to connect to it, the way another peer would. The coordinator dials only
the address the request came from (so an announced address other than that cannot be confirmed)
and answers only whether the listener's fresh nonce greeted it. When the test fails, the peer prints
a numbered fix-it message and still trains, in client mode: it dials out to the others and takes
part in averaging without hosting any part of it. A coordinator that cannot run the test (an older
one, or unreachable) is not a failure: the peer goes on as a full peer, as before.
"""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import dataclass

import grpc

from peer.client import status_probe
from peer.errors import UserError
from protos import coordinator_pb2 as pb

PROBE_CALL_TIMEOUT = 10.0


def probe_greeting(nonce: str) -> bytes:
    """What this peer's listener says first; the coordinator compares it and answers only pass/fail."""
    return f"potluck-probe {nonce}\n".encode()


@dataclass(frozen=True)
class Reachability:
    checked: bool  # False: the coordinator could not run the test
    reachable: bool
    host: str
    port: int
    detail: str = ""


def free_port(host: str) -> int:
    """A port that is free on ``host`` now, so the swarm node can be told which port to use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class _GreetingListener:
    """Accepts connections on host:port for a moment and greets each with the nonce."""

    def __init__(self, host: str, port: int, nonce: str):
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self._socket.listen(4)
        self._socket.settimeout(0.2)
        self._greeting = probe_greeting(nonce)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="reachability-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            with connection:
                try:
                    connection.sendall(self._greeting)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._socket.close()


def check_reachability(endpoint, identity, run_id: str, peer_id: str, session: str, listen_host: str,
                       announce_host: str, port: int) -> Reachability:
    """Listen on listen_host:port and ask the coordinator at ``endpoint`` to dial announce_host:port."""
    nonce = secrets.token_hex(8)
    try:
        listener = _GreetingListener(listen_host, port, nonce)
    except OSError as error:
        raise UserError(f"cannot listen on {listen_host}:{port} for the swarm ({error.strerror}); "
                        f"pick another --port, or 0 for a free one") from None
    try:
        reply = status_probe(endpoint, identity, run_id, pb.StatusProbeRequest(
            peer_id=peer_id, session=session, host=announce_host, port=port, nonce=nonce), PROBE_CALL_TIMEOUT)
    except (grpc.RpcError, UserError) as error:
        detail = error.details() if isinstance(error, grpc.RpcError) else str(error)
        return Reachability(False, True, announce_host, port, f"coordinator could not test: {detail}")
    finally:
        listener.close()
    if not reply.greeted:
        return Reachability(True, False, announce_host, port, reply.detail or "no connection")
    return Reachability(True, True, announce_host, port)


def fix_it_message(result: Reachability) -> str:
    """What a volunteer can do about an unreachable peer, most likely fix first (after Petals' message)."""
    return "\n".join([
        f"warning: other peers cannot reach this peer at {result.host}:{result.port} ({result.detail}).",
        "It will still train, in client mode: it connects out to the others but cannot host part of the "
        "averaging, so the swarm leans on the peers that can.",
        "To contribute fully, do one of these and join again:",
        f"  1. Allow incoming TCP connections to port {result.port} (firewall; on a home router, forward the port "
        f"to this machine), and keep that port with --port {result.port}.",
        "  2. If other peers must use another address for this machine (a public IP, or a VPN address), pass "
        "--public-ip ADDRESS, and --host 0.0.0.0 so the swarm node listens on every interface.",
        "  3. If this machine can never accept connections (NAT without port forwarding), pass --client-mode: "
        "it skips this test and trains as a client (relays are not supported yet).",
    ])
