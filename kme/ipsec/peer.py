"""The adapter-to-adapter channel: the initiator hands key_IDs to the responder.

Mutual TLS both ways. The responder serves two calls and accepts them only from the
certificate whose CN is the configured peer identity; the initiator pins the
responder's certificate the same way (by CN under the configured CA, not by host
name, so adapters need no server certificates of their own). Only key_IDs cross this
channel, never key material: each side fetches the key from its own KME.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kme.identity import certificate_from_scope, parse_pem

UUID_TEXT = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


class PeerError(Exception):
    """The peer adapter did not take the key; `reason` says why (no key material)."""

    def __init__(self, reason: str, status: int = 502) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


OnKey = Callable[[str, str], Awaitable[None]]
OnRetire = Callable[[str, list[str]], Awaitable[None]]
OnHealth = Callable[[str], Awaitable[None]]


async def _always_ready(connection: str) -> None:
    return None


def responder_app(
    peer_identity: str, on_key: OnKey, on_retire: OnRetire, on_health: OnHealth = _always_ready
) -> FastAPI:
    """The responder's side: POST /v1/keys (fetch and load a PPK), POST /v1/retire, and
    GET /v1/health?connection=NAME (ready to take a key for that connection?)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"message": message}, status_code=status)

    def caller_ok(request: Request) -> bool:
        cert = certificate_from_scope(dict(request.scope))
        return cert is not None and cert.common_name == peer_identity

    async def body(request: Request) -> dict[str, Any] | None:
        try:
            document = await request.json()
        except ValueError:
            return None
        return document if isinstance(document, dict) else None

    @app.post("/v1/keys")
    async def take_key(request: Request) -> JSONResponse:
        if not caller_ok(request):
            return error(403, "only the configured peer adapter may deliver key_IDs")
        document = await body(request)
        if document is None:
            return error(400, "body must be a JSON object")
        connection, key_id = document.get("connection"), document.get("key_ID")
        if (
            not isinstance(connection, str)
            or not isinstance(key_id, str)
            or not UUID_TEXT.fullmatch(key_id)
        ):
            return error(400, "connection (string) and key_ID (UUID) are required")
        try:
            await on_key(connection, key_id)
        except PeerError as exc:
            return error(exc.status, exc.reason)
        return JSONResponse({"key_ID": key_id, "loaded": True})

    @app.post("/v1/retire")
    async def retire(request: Request) -> JSONResponse:
        if not caller_ok(request):
            return error(403, "only the configured peer adapter may retire keys")
        document = await body(request)
        ids = document.get("key_IDs") if document else None
        connection = document.get("connection") if document else None
        if (
            not isinstance(connection, str)
            or not isinstance(ids, list)
            or not all(isinstance(i, str) for i in ids)
        ):
            return error(400, "connection and key_IDs (strings) are required")
        await on_retire(connection, ids)
        return JSONResponse({"retired": ids})

    @app.get("/v1/health")
    async def health(request: Request) -> JSONResponse:
        if not caller_ok(request):
            return error(403, "only the configured peer adapter may ask")
        try:
            await on_health(request.query_params.get("connection", ""))
        except PeerError as exc:
            return error(exc.status, exc.reason)
        return JSONResponse({"ok": True})

    return app


class PeerClient:
    """The initiator's side of the channel."""

    def __init__(self, url: str, context: ssl.SSLContext, identity: str, timeout: float) -> None:
        # The responder is pinned by certificate CN (checked on every response) instead
        # of by host name.
        context.check_hostname = False
        self.identity = identity
        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), verify=context, timeout=timeout)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def deliver(self, connection: str, key_id: str) -> None:
        """Hand over a key_ID and wait until the responder holds the PPK."""
        await self._post("/v1/keys", {"connection": connection, "key_ID": key_id})

    async def retire(self, connection: str, key_ids: list[str]) -> None:
        await self._post("/v1/retire", {"connection": connection, "key_IDs": key_ids})

    async def health(self, connection: str) -> None:
        """Is the right peer adapter there, with its charon ready for `connection`? Asked
        before a key is spent on a delivery."""
        response = await self._call("GET", "/v1/health", params={"connection": connection})
        if response.status_code != 200:
            raise PeerError(
                f"peer adapter not ready ({response.status_code}): {_message(response)}",
                response.status_code,
            )

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        response = await self._call("POST", path, json=body)
        if response.status_code != 200:
            raise PeerError(
                f"peer adapter answered {response.status_code}: {_message(response)}",
                response.status_code,
            )

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise PeerError(f"peer adapter unreachable: {type(exc).__name__}: {exc}") from None
        self._check_identity(response)
        return response

    def _check_identity(self, response: httpx.Response) -> None:
        ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        name = parse_pem(ssl.DER_cert_to_PEM_cert(der)).common_name if der else None
        if name != self.identity:
            raise PeerError(f"peer adapter presented {name!r}, not {self.identity!r}")


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json().get("message", ""))
    except ValueError:
        return response.text[:200]
