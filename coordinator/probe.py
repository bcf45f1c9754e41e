"""The reachability probe's dialer: it dials back only the address a request came from.

A peer asks "can others reach me at HOST:PORT?". Dialing whatever HOST a peer names would make the
coordinator a port scanner for its own network, so it dials the request's source IP (gRPC's
``context.peer()``) at the named port, and only when HOST is that IP (or the unspecified address,
or a name resolving to it). It sends nothing, reads at most the length of the expected greeting,
and answers pass/fail: the bytes it read never leave this module.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass

from peer.reachability import probe_greeting


@dataclass(frozen=True)
class ProbeResult:
    connected: bool  # a TCP connection to the requester's own IP at the port succeeded
    greeted: bool  # and what answered there was the requester's listener (its nonce)
    detail: str = ""


def source_ip(grpc_peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a gRPC peer string such as 'ipv4:10.0.0.5:51234' or 'ipv6:[::1]:51234' (None: unix, unknown)."""
    kind, _, rest = urllib.parse.unquote(grpc_peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def names_source(host: str, source) -> bool:
    """Whether the announced ``host`` is the requester's own address."""
    try:
        address = ipaddress.ip_address(host)
        return address.is_unspecified or (getattr(address, "ipv4_mapped", None) or address) == source
    except ValueError:
        pass
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (OSError, UnicodeError):
        return False
    return str(source) in resolved


def probe_requester(grpc_peer: str, host: str, port: int, nonce: str, timeout: float) -> ProbeResult:
    source = source_ip(grpc_peer)
    if source is None:
        return ProbeResult(False, False, "the coordinator cannot tell which address this request came from")
    if not names_source(host, source):
        return ProbeResult(False, False, f"this peer announces {host} but talks to the coordinator from {source}; "
                                         f"the coordinator only dials the address a request came from")
    expected = probe_greeting(nonce)
    try:
        with socket.create_connection((str(source), port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            received = b""
            while len(received) < len(expected):
                try:
                    chunk = connection.recv(len(expected) - len(received))
                except TimeoutError:
                    break
                if not chunk:
                    break
                received += chunk
    except OSError as error:
        return ProbeResult(False, False, error.strerror or type(error).__name__)
    if received != expected:
        return ProbeResult(True, False, "another service answered on that port")
    return ProbeResult(True, True)
