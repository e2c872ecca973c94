"""The application factory: routers, the one error renderer, and lifespan state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kme import __version__
from kme.config import Settings
from kme.db import Database
from kme.errors import ConfigError, KMEError
from kme.identity import ProxyTrust
from kme.keys import pool, supply
from kme.keys.router import router as keys_router
from kme.keys.schemas import Error, KeyIDs, KeyRequest
from kme.keys.service import KeyService

log = logging.getLogger("kme")


def create_app(settings: Settings, *, database: Database | None = None) -> FastAPI:
    """Build a KME app. Nothing touches the database until the lifespan starts."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = database or Database(settings.database_url)
        app.state.database = db
        async with db.session() as session:
            link = await pool.ensure_link(
                session, settings.kme_id, settings.kme_id, settings.keys.key_size
            )
            link_id, block_bits = link.id, link.block_bits
            await session.commit()
        tasks = [
            asyncio.create_task(
                supply.run_link(db, settings, link_id, block_bits), name="kme-link"
            ),
            asyncio.create_task(supply.run_sweeper(db), name="kme-sweeper"),
        ]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if database is None:
                await db.dispose()

    app = FastAPI(
        title="kme",
        version=__version__,
        summary="ETSI GS QKD 014 V1.1.1 key delivery API",
        lifespan=lifespan,
        # Exactly the spec's paths (item 10): no /docs pages, no slash redirects (a 307
        # with no body is not the Error format of item 12). /openapi.json stays.
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.key_service = KeyService(settings)
    try:
        ca_pem = settings.server.ca_file.read_bytes() if settings.server.trusted_proxies else None
    except OSError as exc:
        raise ConfigError(
            f"field 'server.ca_file': cannot read {settings.server.ca_file} ({exc.strerror})"
        ) from None
    app.state.proxy_trust = ProxyTrust(settings.server, ca_pem)
    app.include_router(keys_router)
    _install_error_handlers(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(RawPathRouting)
    app.add_middleware(UnexpectedErrors)
    return app


def _error(exc: KMEError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def kme_error(_: Request, exc: Exception) -> JSONResponse:
        return _error(cast(KMEError, exc))

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        exc = cast(StarletteHTTPException, exc)
        if exc.status_code == 404:
            return _error(KMEError(NOT_FOUND_MESSAGE, status=404))
        if exc.status_code == 405:
            allowed = ", ".join(_allowed_methods(request))
            return _error(
                KMEError("method not allowed", [{"allowed_methods": allowed}], status=405),
                headers={"Allow": allowed},
            )
        return _error(KMEError(str(exc.detail), status=exc.status_code), headers=exc.headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        exc = cast(RequestValidationError, exc)
        fields = [".".join(str(p) for p in e["loc"]) for e in exc.errors()]
        return _error(KMEError("bad request format", [{"fields": fields}], status=400))

    app.add_exception_handler(KMEError, kme_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


NOT_FOUND_MESSAGE = (
    "not found: this KME serves /api/v1/keys/{SAE_ID}/status, /enc_keys and /dec_keys"
)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette reports only the first route's).

    The API's routes are read from their own router: FastAPI wraps included routers in an
    object that does not list them.
    """
    methods: set[str] = set()
    for route in (*request.app.router.routes, *keys_router.routes):
        if isinstance(route, BaseRoute) and getattr(route, "methods", None):
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                methods.update(route.methods)  # type: ignore[attr-defined]
    return sorted(methods)


class UnexpectedErrors:
    """Any exception no handler took becomes a 503 in the Error format (item 18).

    Inside Starlette's ServerErrorMiddleware, which would answer 500, re-raise, and have
    uvicorn drop the keep-alive connection. Only the exception's type and where it was
    raised are logged: its text could quote request data.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            where = f" at {frame.filename}:{frame.lineno}" if frame else ""
            log.error("unexpected %s%s while serving a request", type(exc).__name__, where)
            if started:
                raise
            response = _error(KMEError("internal error on the KME", status=503))
            await response(scope, receive, send)


class RawPathRouting:
    """Route on the still-encoded path, so `%2F` inside an SAE ID stays in its segment.

    uvicorn decodes `scope["path"]`, which would turn `SAE%2FX` into two segments; the
    router decodes each path parameter itself (kme.keys.router.sae_id_from_path).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path")
        if scope["type"] == "http" and raw:
            scope = dict(scope)
            scope["path"] = raw.decode("latin-1").split("?", 1)[0]
        await self.app(scope, receive, send)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, made to say what the server really does: no 422 anywhere."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(
        title=app.title, version=app.version, summary=app.summary, routes=app.routes
    )
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
            # Path parameters are SAE IDs, percent-encoded.
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path":
                    parameter["description"] = "SAE ID, percent-encoded"
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for model in (KeyRequest, KeyIDs, Error):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    app.openapi_schema = document
    return document
