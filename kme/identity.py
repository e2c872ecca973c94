"""Who is calling: the SAE ID from the verified client certificate of *this* request.

The TLS layer (kme.server) verifies the chain during the handshake and puts the peer's
certificate into each request's ASGI scope under the TLS extension
(``scope["extensions"]["tls"]["client_cert_chain"]``). Nothing here trusts a header,
except in trusted-proxy mode and only from the configured proxy addresses.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import AsyncSession

from kme import saes
from kme.config import IdentitySettings, ServerSettings
from kme.errors import Unauthorized
from kme.saes import SAE

log = logging.getLogger("kme.identity")


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    common_name: str | None
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    emails: tuple[str, ...]
    sha256: str


@lru_cache(maxsize=4096)
def parse_pem(pem: str) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    return _describe(cert)


def _describe(cert: x509.Certificate) -> PeerCertificate:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        emails = tuple(san.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        dns, uris, emails = (), (), ()
    fingerprint = hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    return PeerCertificate(common_name, dns, uris, emails, fingerprint)


def certificate_from_scope(scope: dict[str, Any]) -> PeerCertificate | None:
    tls = scope.get("extensions", {}).get("tls") or {}
    chain = tls.get("client_cert_chain") or ()
    return parse_pem(chain[0]) if chain else None


class ProxyTrust:
    """Trusted-proxy mode: off unless proxy addresses and proxy certificates are configured."""

    def __init__(self, server: ServerSettings, ca_pem: bytes | None) -> None:
        self.networks = tuple(server.trusted_proxies)
        self.pinned = frozenset(server.trusted_proxy_certs)
        self.header = server.proxy_cert_header.encode("latin-1")
        self.ca = x509.load_pem_x509_certificate(ca_pem) if ca_pem and self.networks else None

    def caller_certificate(self, scope: dict[str, Any]) -> PeerCertificate | None:
        """The certificate that identifies this request's caller.

        The connection's own, unless the connection is a trusted proxy's (a configured
        address *and* a pinned certificate): then the SAE certificate the proxy forwarded,
        which must be there and must verify against our CA.
        """
        connection = certificate_from_scope(scope)
        if not self._is_proxy(scope, connection):
            return connection
        values = [value for name, value in scope.get("headers", ()) if name == self.header]
        if not values:
            raise Unauthorized("the trusted proxy forwarded no client certificate")
        if len(values) > 1:
            raise Unauthorized("more than one forwarded client certificate")
        try:
            cert = x509.load_pem_x509_certificate(unquote(values[0].decode("latin-1")).encode())
            # The proxy verified the chain; check it again so a proxy bug cannot mint SAEs.
            if self.ca is None:
                raise ValueError("no CA to verify against")
            cert.verify_directly_issued_by(self.ca)
            now = datetime.now(UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise ValueError("outside its validity period")
        except (ValueError, TypeError, InvalidSignature) as exc:
            log.warning("forwarded client certificate rejected: %s", type(exc).__name__)
            raise Unauthorized("forwarded client certificate is not valid") from None
        return _describe(cert)

    def _is_proxy(self, scope: dict[str, Any], connection: PeerCertificate | None) -> bool:
        if not self.networks or connection is None or connection.sha256 not in self.pinned:
            return False
        client = scope.get("client")
        try:
            address = ipaddress.ip_address(client[0]) if client else None
        except ValueError:
            return False
        return address is not None and any(address in network for network in self.networks)


def candidate_id(cert: PeerCertificate, settings: IdentitySettings) -> str | None:
    """The SAE ID a certificate claims under the configured mapping (item 3)."""
    if settings.source == "cn":
        return cert.common_name
    if settings.source == "san":
        values = {"dns": cert.dns_names, "uri": cert.uris, "email": cert.emails}[settings.san_type]
        for value in values:
            if value.startswith(settings.san_prefix):
                return value[len(settings.san_prefix) :]
    return None


async def authenticate(
    session: AsyncSession, cert: PeerCertificate | None, settings: IdentitySettings
) -> SAE:
    """The registered SAE behind `cert`, or 401."""
    if cert is None:
        raise Unauthorized("no client certificate")
    if settings.source == "fingerprint":
        sae = await saes.by_fingerprint(session, cert.sha256)
    else:
        sae_id = candidate_id(cert, settings)
        sae = await saes.get(session, sae_id) if sae_id else None
        if sae is not None and sae.cert_sha256 and sae.cert_sha256 != cert.sha256:
            log.warning("certificate for SAE %r does not match its pinned fingerprint", sae.sae_id)
            sae = None
    if sae is None:
        log.warning("client certificate sha256=%s maps to no registered SAE", cert.sha256)
        raise Unauthorized("certificate belongs to no registered SAE")
    return sae
