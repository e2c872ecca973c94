"""Transport security and caller identity over real mutual TLS (checklist items 1 to 5).

Every test talks to a real uvicorn server through Python's ssl module: the handshake
rules (TLS 1.2+, a client certificate chaining to the CA), the certificate -> SAE ID
mappings (subject CN, SAN with a prefix, pinned fingerprint), per-request identity on a
keep-alive connection, the KME ID in the server certificate, and trusted-proxy mode.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kme import pki
from kme.lab import LabSAE
from tests import kmetest
from tests.conftest import KMEFactory
from tests.kmetest import KME_ID, RunningKME, client_context

STATUS_B = "/api/v1/keys/SAE_B/status"
STATUS_A = "/api/v1/keys/SAE_A/status"
# What a refused connection may look like to httpx. With TLS 1.3 the server checks the
# client certificate after the client has finished its side of the handshake, so the
# refusal can surface on the first read rather than on connect.
REFUSED = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, ssl.SSLError)
OLD_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1, id="TLSv1.0"),
    pytest.param(ssl.TLSVersion.TLSv1_1, id="TLSv1.1"),
]


@contextmanager
def old_tls_allowed() -> Iterator[None]:
    """Python itself deprecates TLSVersion.TLSv1/TLSv1_1 (a DeprecationWarning on every
    use, outside our control); the tests below must use them to prove the server refuses."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"ssl\.TLSVersion\.TLSv1(_1)? is deprecated", DeprecationWarning
        )
        yield


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def pem(sae: LabSAE) -> str:
    return sae.cert.read_text()


def local_port(response: httpx.Response) -> int:
    """The client-side port of the TCP connection that carried `response`."""
    stream = response.extensions["network_stream"]
    port: int = stream.get_extra_info("client_addr")[1]
    return port


def tls_version(response: httpx.Response) -> str | None:
    ssl_object: ssl.SSLObject = response.extensions["network_stream"].get_extra_info("ssl_object")
    return ssl_object.version()


async def master_of(client: httpx.AsyncClient) -> str:
    """The master_SAE_ID the KME reports for the caller (Get status for slave SAE_B)."""
    response = await client.get(STATUS_B)
    assert response.status_code == 200, response.text
    master: str = response.json()["master_SAE_ID"]
    return master


async def negotiated_with_permissive_server(
    test_pki: kmetest.RunPKI, context: ssl.SSLContext
) -> str:
    """The version `context` negotiates with a server that accepts TLS 1.0 and newer.

    Proof that a client context really offers an old protocol version, so a refusal by
    the KME is the KME's doing and not the client's.
    """
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.set_ciphers("DEFAULT:@SECLEVEL=0")
    with old_tls_allowed():
        server_context.minimum_version = ssl.TLSVersion.TLSv1
    server_context.load_cert_chain(test_pki.server_cert, test_pki.server_key)

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
        version = writer.get_extra_info("ssl_object").version()
        writer.close()
        # The peer may already have closed its side; nothing more to read or say.
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(version, str)
    return version


# -- Item 1: TLS 1.2 or newer -----------------------------------------------------------


@pytest.mark.parametrize("version", OLD_VERSIONS)
async def test_old_tls_versions_are_refused(kme: RunningKME, version: ssl.TLSVersion) -> None:
    """Item 1: a client capped at TLS 1.0 or TLS 1.1 gets no response, only a failed
    handshake. The very same client context does negotiate that version with a permissive
    server, so the refusal is the KME's, not the client's."""
    with old_tls_allowed():
        context = client_context(kme.pki, kme.pki.saes["SAE_A"], minimum=version, maximum=version)
    expected = {ssl.TLSVersion.TLSv1: "TLSv1", ssl.TLSVersion.TLSv1_1: "TLSv1.1"}[version]
    assert await negotiated_with_permissive_server(kme.pki, context) == expected

    async with httpx.AsyncClient(base_url=kme.base_url, verify=context, timeout=10) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(STATUS_B)


@pytest.mark.parametrize(
    ("version", "name"),
    [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")],
    ids=["TLSv1.2", "TLSv1.3"],
)
async def test_tls_1_2_and_1_3_are_accepted(
    kme: RunningKME, version: ssl.TLSVersion, name: str
) -> None:
    """Item 1: a client limited to exactly TLS 1.2, or exactly TLS 1.3, is served (200),
    and the connection really used that version."""
    client = kme.client("SAE_A", minimum=version, maximum=version)
    response = await client.get(STATUS_B)
    assert response.status_code == 200, response.text
    assert tls_version(response) == name
    assert response.json()["master_SAE_ID"] == "SAE_A"


# -- Item 2: mutual TLS -----------------------------------------------------------------


@pytest.mark.parametrize(
    "maximum",
    [pytest.param(None, id="TLSv1.3"), pytest.param(ssl.TLSVersion.TLSv1_2, id="TLSv1.2")],
)
async def test_no_client_certificate_gets_no_response(
    kme: RunningKME, maximum: ssl.TLSVersion | None
) -> None:
    """Item 2: a client presenting no certificate gets no HTTP response at all, over
    TLS 1.3 (refused after the handshake) and TLS 1.2 (refused during it)."""
    client = kme.client(None, maximum=maximum)
    with pytest.raises(REFUSED):
        await client.get(STATUS_B)
    with pytest.raises(REFUSED):
        await client.post("/api/v1/keys/SAE_B/enc_keys", json={})


@pytest.mark.parametrize(
    "maximum",
    [pytest.param(None, id="TLSv1.3"), pytest.param(ssl.TLSVersion.TLSv1_2, id="TLSv1.2")],
)
async def test_foreign_ca_certificate_gets_no_response(
    kme: RunningKME, maximum: ssl.TLSVersion | None
) -> None:
    """Item 2: a certificate named SAE_A (a registered SAE) but issued by another CA is
    refused by the handshake: no response, not even a 401."""
    client = kme.client(kme.pki.foreign, maximum=maximum)
    with pytest.raises(REFUSED):
        await client.get(STATUS_B)


async def test_server_only_certificate_is_not_a_client_certificate(kme: RunningKME) -> None:
    """Item 2: a certificate that chains to the CA but is issued for server
    authentication only (the KME's own, EKU serverAuth) is not accepted as a client
    certificate, even when an SAE with its CN is registered."""
    await kme.register(KME_ID)
    client = kme.client(LabSAE(KME_ID, kme.pki.server_cert, kme.pki.server_key))
    with pytest.raises(REFUSED):
        await client.get(STATUS_B)


# -- Item 3: the caller's ID comes from the verified certificate -------------------------


async def test_unregistered_certificate_gets_401_on_every_method(kme: RunningKME) -> None:
    """Items 3, 16: a certificate that chains to the CA but names no registered SAE
    passes the handshake and then gets 401 (status code only) from all three methods."""
    client = kme.client(kme.pki.stranger)
    key_id = str(uuid.uuid4())
    responses = [
        await client.get(STATUS_B),
        await client.get("/api/v1/keys/SAE_B/enc_keys"),
        await client.post("/api/v1/keys/SAE_B/enc_keys", json={"number": 1}),
        await client.get("/api/v1/keys/SAE_A/dec_keys", params={"key_ID": key_id}),
        await client.post("/api/v1/keys/SAE_A/dec_keys", json={"key_IDs": [{"key_ID": key_id}]}),
    ]
    assert [r.status_code for r in responses] == [401] * len(responses)
    assert await kme.stored_blocks() == 1000


async def test_status_echoes_the_certificate_identity(kme: RunningKME) -> None:
    """Items 3, 58: Status reports the caller's certificate CN as master_SAE_ID and the
    path ID as slave_SAE_ID, whichever SAE asks about whichever other."""
    for caller, slave in [("SAE_A", "SAE_B"), ("SAE_B", "SAE_A"), ("SAE_C", "SAE D/x")]:
        response = await kme.client(caller).get(f"/api/v1/keys/{quote(slave, safe='')}/status")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["master_SAE_ID"], body["slave_SAE_ID"]) == (caller, slave)
        assert body["source_KME_ID"] == KME_ID


async def test_identity_headers_are_ignored_without_trusted_proxy_mode(kme: RunningKME) -> None:
    """Item 3 and trusted-proxy mode off by default: x-ssl-client-cert (a valid,
    URL-encoded SAE_B certificate), X-SAE-ID and X-Forwarded-* headers sent directly do
    not change who the caller is, and do not make an unregistered certificate an SAE."""
    headers = {
        "x-ssl-client-cert": quote(pem(kme.pki.saes["SAE_B"])),
        "X-SAE-ID": "SAE_B",
        "X-Forwarded-For": "10.0.0.1",
        "X-Forwarded-Client-Cert": quote(pem(kme.pki.saes["SAE_B"])),
    }
    as_a = kme.client("SAE_A")
    response = await as_a.get("/api/v1/keys/SAE_C/status", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["master_SAE_ID"] == "SAE_A"

    stranger = kme.client(kme.pki.stranger)
    assert (await stranger.get(STATUS_A, headers=headers)).status_code == 401


async def test_identity_never_comes_from_the_body(kme: RunningKME) -> None:
    """Items 3, 46: SAE IDs written into request bodies (or an X-SAE-ID header) do not
    authorise anyone: SAE_C, claiming to be the slave SAE_B, gets 401 for SAE_B's key,
    and SAE_B, the real slave, then receives it."""
    master = kme.client("SAE_A")
    got = await master.post(
        "/api/v1/keys/SAE_B/enc_keys", json={"number": 1, "master_SAE_ID": "SAE_C"}
    )
    assert got.status_code == 200, got.text
    key_id = got.json()["keys"][0]["key_ID"]
    forged = {
        "key_IDs": [{"key_ID": key_id, "master_SAE_ID": "SAE_A", "slave_SAE_ID": "SAE_B"}],
        "slave_SAE_ID": "SAE_B",
        "SAE_ID": "SAE_B",
    }
    intruder = kme.client("SAE_C")
    denied = await intruder.post(
        "/api/v1/keys/SAE_A/dec_keys", json=forged, headers={"X-SAE-ID": "SAE_B"}
    )
    assert denied.status_code == 401
    back = await kme.client("SAE_B").post("/api/v1/keys/SAE_A/dec_keys", json=forged)
    assert back.status_code == 200, back.text
    assert back.json()["keys"] == got.json()["keys"]


# -- Item 3: the configurable mappings ---------------------------------------------------


async def test_san_uri_mapping(make_kme: KMEFactory) -> None:
    """Item 3: with identity source "san", san_type "uri" and san_prefix
    "urn:qkd:sae:", a certificate whose CN is something else is the SAE named by its
    prefixed URI SAN; certificates without such a SAN (CN=SAE_A only, a URI with another
    prefix, a DNS SAN with the prefix) get 401."""
    identity = {"source": "san", "san_type": "uri", "san_prefix": "urn:qkd:sae:"}
    async with make_kme(identity=identity, fill=10) as kme:
        mapped = kme.pki.issue(
            unique("san-a"),
            "not-an-sae",
            ["host.example", "urn:other:SAE_C", "urn:qkd:sae:SAE_A"],
        )
        assert await master_of(kme.client(mapped)) == "SAE_A"

        unmatched = [
            kme.pki.saes["SAE_A"],  # CN=SAE_A, no SAN at all
            kme.pki.issue(unique("san-other"), "SAE_A", ["urn:other:SAE_A"]),
            kme.pki.issue(unique("san-unknown"), "SAE_A", ["urn:qkd:sae:SAE_NOBODY"]),
        ]
        for sae in unmatched:
            response = await kme.client(sae).get(STATUS_B)
            assert response.status_code == 401, sae


async def test_san_dns_mapping(make_kme: KMEFactory) -> None:
    """Item 3: san_type "dns" reads DNS SAN entries only; with an empty prefix the whole
    entry is the SAE ID, and a URI SAN naming an SAE does not count."""
    async with make_kme(identity={"source": "san", "san_type": "dns"}, fill=10) as kme:
        dns = kme.pki.issue(unique("san-dns"), "someone", ["SAE_C"])
        assert await master_of(kme.client(dns)) == "SAE_C"
        uri_only = kme.pki.issue(unique("san-uri"), "SAE_C", ["urn:SAE_C"])
        assert (await kme.client(uri_only).get(STATUS_B)).status_code == 401


async def test_fingerprint_mapping(make_kme: KMEFactory) -> None:
    """Item 3: with identity source "fingerprint", the SAE is the one whose pinned
    SHA-256 matches the certificate, whatever its CN; a certificate pinned to no SAE
    (even one with CN=SAE_A, a registered SAE) gets 401."""
    async with make_kme(identity={"source": "fingerprint"}, fill=10) as kme:
        pinned = kme.pki.issue(unique("fp"), "SAE_C")  # the CN names another SAE
        await kme.register("SAE_PINNED", cert_sha256=pki.file_sha256(pinned.cert))
        assert await master_of(kme.client(pinned)) == "SAE_PINNED"

        assert (await kme.client("SAE_A").get(STATUS_B)).status_code == 401
        assert (await kme.client("SAE_C").get(STATUS_B)).status_code == 401


async def test_cn_mapping_with_pinned_fingerprint(kme: RunningKME) -> None:
    """Item 3: with the default CN mapping and a fingerprint pinned on SAE_A, a second
    CA-issued certificate with CN=SAE_A gets 401, while the pinned one still works."""
    pinned = kme.pki.saes["SAE_A"]
    await kme.unregister("SAE_A")
    await kme.register("SAE_A", cert_sha256=pki.file_sha256(pinned.cert))

    impostor = kme.pki.issue(unique("cn-a"), "SAE_A")
    assert (await kme.client(impostor).get(STATUS_B)).status_code == 401
    assert await master_of(kme.client(pinned)) == "SAE_A"


# -- Item 4: identity per request --------------------------------------------------------


async def test_identity_is_checked_on_every_request_of_a_connection(kme: RunningKME) -> None:
    """Item 4: on one keep-alive connection (same client, same local port), a request
    succeeds, the SAE is unregistered, the next request gets 401, and after registering
    it again the following request succeeds: identity is looked up per request."""
    client = kme.client("SAE_A")
    first = await client.get(STATUS_B)
    assert first.status_code == 200, first.text
    port = local_port(first)

    await kme.unregister("SAE_A")
    second = await client.get(STATUS_B)
    assert second.status_code == 401
    assert local_port(second) == port

    await kme.register("SAE_A")
    third = await client.get(STATUS_B)
    assert third.status_code == 200, third.text
    assert local_port(third) == port


# -- Item 5: the KME ID in the server certificate ----------------------------------------


async def read_server_certificate(
    kme: RunningKME, server_hostname: str
) -> tuple[x509.Certificate, str]:
    """The certificate the KME presents in the handshake (hostname checked by ssl)."""
    context = client_context(kme.pki, kme.pki.saes["SAE_A"])
    assert context.check_hostname
    _, writer = await asyncio.open_connection(
        "127.0.0.1", kme.port, ssl=context, server_hostname=server_hostname
    )
    try:
        ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        version = ssl_object.version()
    finally:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    assert der is not None
    assert version is not None
    return x509.load_der_x509_certificate(der), version


async def test_server_certificate_carries_the_kme_id(kme: RunningKME) -> None:
    """Item 5 (and clients.md item 6): the certificate the KME presents has the KME ID
    as its subject CN and SANs for localhost, 127.0.0.1 and ::1; a hostname-checking
    client accepts it under each of those names."""
    cert, _ = await read_server_certificate(kme, "localhost")
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [name.value for name in common_names] == [KME_ID]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    addresses = san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in addresses
    assert ipaddress.ip_address("::1") in addresses

    for name in ("127.0.0.1", "::1"):
        again, _ = await read_server_certificate(kme, name)
        assert again == cert


# -- Trusted-proxy mode ------------------------------------------------------------------


def make_expired_client(test_pki: kmetest.RunPKI, common_name: str) -> str:
    """PEM of a client certificate from the test CA that expired yesterday."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(test_pki.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now - dt.timedelta(days=1))
        .sign(test_pki.ca.key, hashes.SHA256())
    )
    return pki.Issued(cert, key).cert_pem().decode()


def make_impostor_ca_client(test_pki: kmetest.RunPKI, common_name: str) -> str:
    """PEM of a client certificate from a CA with the test CA's name but another key."""
    impostor = pki.make_ca("kme test CA")
    assert impostor.certificate.subject == test_pki.ca.certificate.subject
    return pki.issue_client(impostor, common_name).cert_pem().decode()


def proxy_mode(test_pki: kmetest.RunPKI, networks: list[str]) -> dict[str, Any]:
    """Trusted-proxy settings with the stranger's certificate pinned as the proxy's."""
    return {
        "trusted_proxies": networks,
        "trusted_proxy_certs": [pki.file_sha256(test_pki.stranger.cert)],
    }


async def test_an_sae_behind_a_trusted_address_cannot_forward_another_sae(
    make_kme: KMEFactory,
    test_pki: kmetest.RunPKI,
) -> None:
    """Trusted-proxy mode (item 3): a registered SAE connecting from the proxy's address
    with its own (unpinned) certificate cannot pose as another SAE by pasting that SAE's
    public certificate into the header: it stays itself."""
    async with make_kme(server=proxy_mode(test_pki, ["127.0.0.1/32"]), fill=10) as kme:
        header = {"x-ssl-client-cert": quote(pem(kme.pki.saes["SAE_B"]))}
        response = await kme.client("SAE_C").get(STATUS_A, headers=header)
        assert response.status_code == 200, response.text
        assert response.json()["master_SAE_ID"] == "SAE_C"


def test_proxy_addresses_without_pinned_proxy_certificates_are_refused() -> None:
    """Trusted-proxy mode is refused in configuration unless the proxies' certificates
    are pinned next to their addresses."""
    from pydantic import ValidationError

    from kme.config import ServerSettings

    with pytest.raises(ValidationError, match="trusted_proxy_certs"):
        ServerSettings(trusted_proxies=["127.0.0.1/32"])  # type: ignore[list-item]


async def test_trusted_proxy_forwards_the_sae_certificate(
    make_kme: KMEFactory, test_pki: kmetest.RunPKI
) -> None:
    """Trusted-proxy mode (items 3, 4): with trusted_proxies = 127.0.0.1/32, a
    connection authenticated as a proxy certificate (the unregistered stranger) that
    forwards SAE_B's URL-encoded PEM in x-ssl-client-cert is SAE_B; the next request on
    the same connection forwarding SAE_C is SAE_C; without the header the connection's
    own certificate never counts (401)."""
    async with make_kme(server=proxy_mode(test_pki, ["127.0.0.1/32"]), fill=10) as kme:
        proxy = kme.client(kme.pki.stranger)
        as_b = await proxy.get(
            STATUS_A, headers={"x-ssl-client-cert": quote(pem(kme.pki.saes["SAE_B"]))}
        )
        assert as_b.status_code == 200, as_b.text
        assert as_b.json()["master_SAE_ID"] == "SAE_B"

        as_c = await proxy.get(
            STATUS_A, headers={"X-SSL-Client-Cert": quote(pem(kme.pki.saes["SAE_C"]))}
        )
        assert as_c.status_code == 200, as_c.text
        assert as_c.json()["master_SAE_ID"] == "SAE_C"
        assert local_port(as_c) == local_port(as_b)

        assert (await proxy.get(STATUS_A)).status_code == 401


async def test_trusted_proxy_rejects_invalid_forwarded_certificates(
    make_kme: KMEFactory, test_pki: kmetest.RunPKI
) -> None:
    """Trusted-proxy mode: a forwarded certificate the KME cannot verify itself gets
    401: one from the foreign CA, one from a CA that copies our CA's name, an expired
    one from our CA, text that is no certificate, and two copies of the header (even
    of a valid certificate)."""
    async with make_kme(server=proxy_mode(test_pki, ["127.0.0.1/32"]), fill=10) as kme:
        proxy = kme.client(kme.pki.stranger)
        valid_b = quote(pem(kme.pki.saes["SAE_B"]))
        bad_values = {
            "foreign CA": quote(pem(kme.pki.foreign)),
            "impostor CA": quote(make_impostor_ca_client(kme.pki, "SAE_B")),
            "expired": quote(make_expired_client(kme.pki, "SAE_B")),
            "garbage": quote("-----BEGIN CERTIFICATE-----\nnot a cert\n-----END CERTIFICATE-----"),
        }
        for label, value in bad_values.items():
            response = await proxy.get(STATUS_A, headers={"x-ssl-client-cert": value})
            assert response.status_code == 401, label

        twice = await proxy.get(
            STATUS_A, headers=[("x-ssl-client-cert", valid_b), ("x-ssl-client-cert", valid_b)]
        )
        assert twice.status_code == 401

        # The same connection still works for a single valid header afterwards.
        once = await proxy.get(STATUS_A, headers={"x-ssl-client-cert": valid_b})
        assert once.status_code == 200, once.text
        assert once.json()["master_SAE_ID"] == "SAE_B"


async def test_forwarded_certificate_ignored_from_untrusted_address(
    make_kme: KMEFactory,
    test_pki: kmetest.RunPKI,
) -> None:
    """Trusted-proxy mode: with trusted_proxies = 10.9.9.9/32, the header from
    127.0.0.1 is ignored: an SAE connection stays itself, and an unregistered
    connection certificate stays unauthorised (401)."""
    async with make_kme(server=proxy_mode(test_pki, ["10.9.9.9/32"]), fill=10) as kme:
        header = {"x-ssl-client-cert": quote(pem(kme.pki.saes["SAE_B"]))}
        response = await kme.client("SAE_C").get(STATUS_A, headers=header)
        assert response.status_code == 200, response.text
        assert response.json()["master_SAE_ID"] == "SAE_C"

        stranger = kme.client(kme.pki.stranger)
        assert (await stranger.get(STATUS_A, headers=header)).status_code == 401
