"""A lab PKI: one CA, the KME's server certificate, and a client certificate per SAE.

All keys are ECDSA P-256. The KME ID is the server certificate's subject CN (checklist
item 5); an SAE's ID is its client certificate's subject CN (item 3's default mapping).
Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=825)
MAX_COMMON_NAME = 64  # RFC 5280 ub-common-name
CA_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sha256(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex()


def _name(common_name: str, org: str = "kme lab") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def make_ca(common_name: str = "kme lab CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


def _general_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if "://" in value or value.startswith("urn:"):
        return x509.UniformResourceIdentifier(value)
    if "@" in value:
        return x509.RFC822Name(value)
    return x509.DNSName(value)


def default_server_names(extra: list[str] | None = None) -> list[str]:
    """localhost, 127.0.0.1, ::1, this host's name, and every `extra` (issue 2)."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *(extra or [])]
    return list(dict.fromkeys(name for name in names if name))


def _leaf(
    ca: Issued,
    common_name: str,
    *,
    usage: list[x509.ObjectIdentifier],
    alt_names: list[str],
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in alt_names]), critical=False
        )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def issue_server(ca: Issued, kme_id: str, names: list[str]) -> Issued:
    return _leaf(ca, kme_id, usage=[ExtendedKeyUsageOID.SERVER_AUTH], alt_names=names)


def issue_client(ca: Issued, sae_id: str, alt_names: list[str] | None = None) -> Issued:
    # serverAuth too: a gateway's PPK adapter serves its peer channel with its SAE's
    # certificate (kme.ipsec.peer pins the peer by CN, so it cannot pose as the KME).
    return _leaf(
        ca,
        sae_id,
        usage=[ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        alt_names=alt_names or [],
    )


def write(issued: Issued, cert_path: Path, key_path: Path) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(issued.cert_pem())
    write_secret(key_path, issued.key_pem())


def write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def load(cert_path: Path, key_path: Path) -> Issued:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: the lab CA key must be an EC key")
    return Issued(cert, key)


def file_sha256(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()
