"""The channel to the coordinator: TLS pinned to the certificate fingerprint the operator printed.

The coordinator's certificate is usually self-signed, so no CA can vouch for it. Instead the join
command carries the SHA-256 fingerprint of the certificate. Before opening the gRPC channel the
peer fetches the certificate, compares fingerprints, and then trusts exactly that certificate
(as the channel's only root) for the connection. Plaintext only with an explicit --insecure.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from dataclasses import dataclass

import grpc

from peer.address import normalize_fingerprint, split_address  # noqa: F401 (re-exported)
from peer.errors import UserError
from peer.timeouts import backoff

MAX_MESSAGE_BYTES = 1 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def fingerprint_of_pem(pem: bytes | str) -> str:
    text = pem.decode() if isinstance(pem, bytes) else pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(text)).hexdigest()


def fetch_certificate(address: str, timeout: float) -> bytes:
    """The certificate the server at `address` presents (not verified here: the fingerprint is).

    A refused connection (nothing listens yet: a coordinator restarting) is tried again, with jitter,
    until `timeout` has passed; any other failure answers at once.
    """
    host, port = split_address(address)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    deadline, attempt = time.monotonic() + timeout, 0
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.1)) as raw:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True)).encode()
        except ssl.SSLError:
            raise UserError(
                f"the coordinator at {address} does not speak TLS; if its operator really runs it with --insecure, "
                f"join with --insecure too (traffic is then readable and forgeable by anyone on the path)"
            ) from None
        except ConnectionRefusedError as error:
            wait = min(backoff(attempt, 0.25, 2.0), deadline - time.monotonic())
            if wait <= 0:
                raise UserError(f"cannot reach a coordinator at {address} within {timeout:.0f}s "
                                f"({error.strerror or error}); check the address and that 'coordinator serve' "
                                f"is running there") from None
            time.sleep(wait)
            attempt += 1
        except OSError as error:
            raise UserError(
                f"cannot reach a coordinator at {address} ({error.strerror or error}); check the address and that "
                f"'coordinator serve' is running there"
            ) from None


@dataclass(frozen=True)
class Endpoint:
    """How to reach the coordinator: address plus either a pinned fingerprint or explicit plaintext."""

    address: str
    fingerprint: str | None  # None only with insecure
    insecure: bool = False

    def open(self, connect_timeout: float = 10.0) -> grpc.Channel:
        if self.insecure:
            return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        pem = fetch_certificate(self.address, connect_timeout)
        seen = fingerprint_of_pem(pem)
        if seen != self.fingerprint:
            raise UserError(
                f"the coordinator at {self.address} presented a certificate with fingerprint {seen}, not the "
                f"{self.fingerprint} you were given: refusing to connect. Someone may be intercepting the "
                f"connection, or the operator rotated the certificate; ask the operator for the current join command"
            )
        # a self-signed certificate becomes the channel's only trusted root, and its name need not match
        # the address; an operator's CA-issued certificate is checked against the system's roots as well
        self_signed, name = _describe_certificate(pem)
        credentials = grpc.ssl_channel_credentials(root_certificates=pem if self_signed else None)
        options = CHANNEL_OPTIONS + ([("grpc.ssl_target_name_override", name)] if name else [])
        return grpc.secure_channel(self.address, credentials, options=options)


def _describe_certificate(pem: bytes) -> tuple[bool, str | None]:
    """(whether it is self-signed, the DNS name to expect when it is)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(pem)
    if cert.issuer != cert.subject:
        return False, None
    try:
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )
        if dns:
            return True, dns[0]
    except x509.ExtensionNotFound:
        pass
    common = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return True, (common[0].value if common else None)
