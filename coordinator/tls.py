"""The coordinator's TLS certificate: self-signed on first start, or the operator's own.

Peers pin the certificate by its SHA-256 fingerprint (printed in the join command), so a
self-signed certificate is as trustworthy as the channel the operator used to hand out the join
command. Rotating: stop serve, delete tls.crt/tls.key (or pass new --cert/--key), start again and
hand out the new join command; peers with the old fingerprint refuse the new certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peer.errors import UserError
from peer.files import replace_file
from peer.transport import fingerprint_of_pem

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CERT_NAME = "potluck-coordinator"  # the DNS name in a self-signed certificate; peers expect it
VALIDITY_DAYS = 825


@dataclass(frozen=True)
class TlsMaterial:
    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint_of_pem(self.cert_pem)


def _self_signed(host: str) -> TlsMaterial:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CERT_NAME)])
    alt_names: list[x509.GeneralName] = [x509.DNSName(CERT_NAME), x509.DNSName("localhost")]
    try:
        alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return TlsMaterial(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def load_or_create(data_dir: Path, host: str, cert: Path | None = None, key: Path | None = None) -> TlsMaterial:
    """The operator's --cert/--key when given, else the data dir's self-signed pair (created once)."""
    if (cert is None) != (key is None):
        raise UserError("--cert and --key go together: pass both (PEM files) or neither")
    if cert is not None:
        try:
            material = TlsMaterial(Path(cert).read_bytes(), Path(key).read_bytes())
            x509.load_pem_x509_certificate(material.cert_pem)
            serialization.load_pem_private_key(material.key_pem, password=None)
        except (OSError, ValueError, TypeError) as error:
            raise UserError(f"cannot use --cert {cert} / --key {key}: {error}; pass PEM files without a password") from None
        return material
    cert_path, key_path = Path(data_dir) / CERT_FILE, Path(data_dir) / KEY_FILE
    if cert_path.exists() and key_path.exists():
        return TlsMaterial(cert_path.read_bytes(), key_path.read_bytes())
    material = _self_signed(host)
    replace_file(key_path, material.key_pem, mode=0o600, durable=True)
    cert_path.write_bytes(material.cert_pem)
    return material
