"""The adapters' peer channel: mutual TLS, and only the configured peer may hand over keys."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from kme.ipsec.etsi import mutual_tls_context
from kme.ipsec.peer import PeerClient, PeerError, responder_app
from kme.server import mutual_tls_server, mutual_tls_server_context
from tests import kmetest

KEY_ID = "3f0c2b1e-8a4d-4c55-9a70-1f2e3d4c5b6a"


@asynccontextmanager
async def responder(
    pki: kmetest.RunPKI,
    calls: list[tuple[str, str]],
    fail: str | None = None,
    not_ready: str | None = None,
) -> AsyncIterator[str]:
    """A peer channel served with SAE_B's certificate, accepting only SAE_A."""

    async def on_key(connection: str, key_id: str) -> None:
        if fail:
            raise PeerError(fail)
        calls.append((connection, key_id))

    async def on_retire(connection: str, key_ids: list[str]) -> None:
        calls.extend((connection, f"retired {key_id}") for key_id in key_ids)

    async def on_health(connection: str) -> None:
        calls.append((connection, "health"))
        if not_ready:
            raise PeerError(not_ready, status=503)

    sae_b = pki.saes["SAE_B"]
    context = mutual_tls_server_context(sae_b.cert, sae_b.key, pki.ca_file, fields=("c", "k", "a"))
    server = mutual_tls_server(
        responder_app("SAE_A", on_key, on_retire, on_health), context, host="127.0.0.1", port=0
    )
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def client_for(pki: kmetest.RunPKI, sae: str, url: str, identity: str = "SAE_B") -> PeerClient:
    cert = pki.saes[sae]
    return PeerClient(url, mutual_tls_context(pki.ca_file, cert.cert, cert.key), identity, 10.0)


async def test_the_configured_peer_hands_over_and_retires_key_ids(test_pki: kmetest.RunPKI) -> None:
    """Issue 3 item 1: the initiator's adapter (SAE_A's certificate) delivers a key_ID and
    retires it; the responder sees both calls."""
    calls: list[tuple[str, str]] = []
    async with responder(test_pki, calls) as url:
        client = client_for(test_pki, "SAE_A", url)
        try:
            await client.deliver("qkd", KEY_ID)
            await client.retire("qkd", [KEY_ID])
        finally:
            await client.aclose()
    assert calls == [("qkd", KEY_ID), ("qkd", f"retired {KEY_ID}")]


async def test_only_the_configured_peer_may_hand_over_keys(test_pki: kmetest.RunPKI) -> None:
    """Issue 3 item 1: the responder accepts key_IDs only from the configured peer identity:
    another SAE of the same CA gets 403 and nothing happens; no certificate, no channel."""
    calls: list[tuple[str, str]] = []
    async with responder(test_pki, calls) as url:
        intruder = client_for(test_pki, "SAE_C", url)
        try:
            with pytest.raises(PeerError, match="403"):
                await intruder.deliver("qkd", KEY_ID)
            with pytest.raises(PeerError, match="403"):
                await intruder.retire("qkd", [KEY_ID])
        finally:
            await intruder.aclose()
        anonymous = ssl.create_default_context(cafile=str(test_pki.ca_file))
        anonymous.check_hostname = False
        async with httpx.AsyncClient(verify=anonymous) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.post(f"{url}/v1/keys", json={"connection": "qkd", "key_ID": KEY_ID})
    assert calls == []


async def test_the_initiator_pins_the_responder_by_certificate(test_pki: kmetest.RunPKI) -> None:
    """Issue 3 item 1: the channel is mutually authenticated: an initiator expecting another
    peer identity than the certificate the responder presents refuses the answer."""
    calls: list[tuple[str, str]] = []
    async with responder(test_pki, calls) as url:
        client = client_for(test_pki, "SAE_A", url, identity="SAE_C")
        try:
            with pytest.raises(PeerError, match="presented 'SAE_B'"):
                await client.deliver("qkd", KEY_ID)
        finally:
            await client.aclose()


async def test_refusals_and_bad_requests_carry_their_reason(test_pki: kmetest.RunPKI) -> None:
    """Issue 3 item 1, faults: a responder that cannot take the key says why (its KME's
    answer reaches the initiator's log); a malformed key_ID is a 400."""
    async with responder(
        test_pki, [], fail="responder's KME refused the key: KME answered 401"
    ) as url:
        client = client_for(test_pki, "SAE_A", url)
        try:
            with pytest.raises(PeerError, match="KME answered 401"):
                await client.deliver("qkd", KEY_ID)
            with pytest.raises(PeerError, match="400"):
                await client.deliver("qkd", "not-a-uuid")
        finally:
            await client.aclose()


async def test_health_reports_whether_the_responder_can_take_a_key(
    test_pki: kmetest.RunPKI,
) -> None:
    """Issue 3 item 1, faults: before spending a key, the initiator asks the responder
    whether its charon is ready for the connection; a not-ready answer carries the reason."""
    calls: list[tuple[str, str]] = []
    async with responder(test_pki, calls) as url:
        client = client_for(test_pki, "SAE_A", url)
        try:
            await client.health("qkd")
        finally:
            await client.aclose()
    assert calls == [("qkd", "health")]
    async with responder(test_pki, [], not_ready="responder's charon is not ready") as url:
        client = client_for(test_pki, "SAE_A", url)
        try:
            with pytest.raises(PeerError, match=r"not ready.*charon is not ready"):
                await client.health("qkd")
        finally:
            await client.aclose()


def test_back_off_grows_to_its_cap_and_never_overflows() -> None:
    """Issue 3 item 1, faults: retries back off exponentially up to retry_max, and keep
    doing so after any number of failures (2.0**1024 would overflow)."""
    from kme.ipsec.adapter import backoff_delay

    assert [backoff_delay(n, 0.5, 30.0) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0
