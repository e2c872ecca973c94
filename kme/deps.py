"""Request-scoped dependencies: the one transaction, the caller, the services.

The session dependency has ``scope="function"``: its exit (commit or rollback) runs when
the endpoint returns and *before* the response is sent, so a delivery is durable before
any key leaves, and a failed commit turns into a 503 that carries no key.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from kme.config import Settings
from kme.db import Database
from kme.errors import KEY_DATA_ACCESS_ERROR, ServiceUnavailable
from kme.identity import ProxyTrust, authenticate
from kme.keys.service import KeyService
from kme.saes import SAE

log = logging.getLogger("kme.db")


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    database: Database = request.app.state.database
    async with database.session() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        try:
            await session.commit()
        except Exception as exc:  # whatever broke the commit, no key leaves
            # Rolled back, except in the rare case of a connection lost during COMMIT
            # itself, where the database may have committed: then a slave's copy is spent.
            log.error("commit failed (%s): answering 503 without keys", type(exc).__name__)
            await session.rollback()
            raise ServiceUnavailable(KEY_DATA_ACCESS_ERROR) from None


SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]


async def _caller(request: Request, session: SessionDep) -> SAE:
    settings: Settings = request.app.state.settings
    proxy: ProxyTrust = request.app.state.proxy_trust
    scope = dict(request.scope)
    cert = proxy.caller_certificate(scope)
    return await authenticate(session, cert, settings.identity)


CallerDep = Annotated[SAE, Depends(_caller, scope="function")]


def _key_service(request: Request) -> KeyService:
    service: KeyService = request.app.state.key_service
    return service


KeyServiceDep = Annotated[KeyService, Depends(_key_service)]
