"""Test support: a lab PKI made for the test run, real databases, a real uvicorn server.

Everything here is real: certificates signed by a CA made for the run, TLS handshakes
through Python's ssl module, uvicorn serving the app on a loopback port, and SQLite
files or PostgreSQL databases migrated with the project's Alembic scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from kme import pki, saes
from kme.app import create_app
from kme.config import IdentitySettings, KeySettings, LinkSettings, ServerSettings, Settings
from kme.db import Database, migrate
from kme.keys import pool, supply
from kme.keys.models import DeliveredKey, KeyRecipient, Link, PoolBlock
from kme.lab import LabSAE, sae_paths
from kme.server import build_server

PG_ENV = "KME_TEST_POSTGRES_URL"
KME_ID = "KME_TEST"
SAE_IDS = ("SAE_A", "SAE_B", "SAE_C", "SAE D/x")


@dataclass
class RunPKI:
    root: Path
    ca: pki.Issued
    ca_file: Path
    server_cert: Path
    server_key: Path
    saes: dict[str, LabSAE]
    stranger: LabSAE  # chains to the CA, belongs to no registered SAE
    foreign: LabSAE  # issued by another CA with the same SAE name as SAE_A
    foreign_ca_file: Path

    def issue(self, name: str, common_name: str, alt_names: list[str] | None = None) -> LabSAE:
        """A further client certificate from the test CA, written under `name`."""
        paths = sae_paths(self.root / "extra", name)
        pki.write(pki.issue_client(self.ca, common_name, alt_names), paths.cert, paths.key)
        return LabSAE(common_name, paths.cert, paths.key)


def make_test_pki(root: Path) -> RunPKI:
    ca = pki.make_ca("kme test CA")
    pki.write(ca, root / "ca.pem", root / "ca.key")
    server = pki.issue_server(ca, KME_ID, pki.default_server_names())
    pki.write(server, root / "kme.pem", root / "kme.key")
    issued: dict[str, LabSAE] = {}
    for sae_id in SAE_IDS:
        paths = sae_paths(root / "saes", sae_id)
        pki.write(pki.issue_client(ca, sae_id), paths.cert, paths.key)
        issued[sae_id] = paths
    stranger = sae_paths(root / "stranger", "SAE_STRANGER")
    pki.write(pki.issue_client(ca, "SAE_STRANGER"), stranger.cert, stranger.key)
    other_ca = pki.make_ca("some other CA")
    pki.write(other_ca, root / "other-ca.pem", root / "other-ca.key")
    foreign = sae_paths(root / "foreign", "SAE_A")
    pki.write(pki.issue_client(other_ca, "SAE_A"), foreign.cert, foreign.key)
    return RunPKI(
        root,
        ca,
        root / "ca.pem",
        root / "kme.pem",
        root / "kme.key",
        issued,
        stranger,
        foreign,
        root / "other-ca.pem",
    )


def client_context(
    test_pki: RunPKI,
    sae: LabSAE | None,
    *,
    ca_file: Path | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file or test_pki.ca_file))
    if minimum is not None or maximum is not None:
        # Let the client offer old protocol versions, so that only the server can refuse.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if minimum is not None:
            context.minimum_version = minimum
        if maximum is not None:
            context.maximum_version = maximum
    if sae is not None:
        context.load_cert_chain(sae.cert, sae.key)
    return context


class DatabaseTemplates:
    """Migrate once per run, then give each test a fresh copy (file copy or TEMPLATE)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sqlite_template: Path | None = None
        self.pg_template: str | None = None

    async def sqlite(self, target: Path) -> str:
        if self.sqlite_template is None:
            template = self.root / "template.db"
            await asyncio.to_thread(migrate, f"sqlite+aiosqlite:///{template}")
            self.sqlite_template = template
        shutil.copyfile(self.sqlite_template, target)
        return f"sqlite+aiosqlite:///{target}"

    async def postgres(self, admin_url: str) -> str:
        import asyncpg

        dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://")
        if self.pg_template is None:
            name = f"kme_tmpl_{os.getpid()}"
            conn = await asyncpg.connect(dsn)
            try:
                await _drop_orphans(conn)
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()
            await asyncio.to_thread(migrate, _with_database(admin_url, name))
            self.pg_template = name
        name = f"kme_t_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.pg_template}"')
        finally:
            await conn.close()
        return _with_database(admin_url, name)

    @staticmethod
    async def drop_postgres(admin_url: str, url: str) -> None:
        import asyncpg

        name = url.rsplit("/", 1)[1]
        conn = await asyncpg.connect(admin_url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def drop_all(self, admin_url: str | None) -> None:
        if self.pg_template and admin_url:
            import asyncpg

            async def drop() -> None:
                conn = await asyncpg.connect(
                    admin_url.replace("postgresql+asyncpg://", "postgresql://")
                )
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_template}" WITH (FORCE)')
                finally:
                    await conn.close()

            asyncio.run(drop())


async def _drop_orphans(conn: Any) -> None:
    """Drop test databases left by runs that were killed (their process is gone)."""
    rows = await conn.fetch(
        "SELECT datname FROM pg_database WHERE datname LIKE 'kme\\_tmpl\\_%' "
        "OR datname LIKE 'kme\\_t\\_%'"
    )
    for row in rows:
        owner = row["datname"].split("_")[2]
        if owner.isdigit() and not _alive(int(owner)):
            await conn.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _with_database(url: str, name: str) -> str:
    base = url.split("?", 1)[0].rsplit("/", 1)[0]
    return f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)


def make_settings(
    test_pki: RunPKI,
    database_url: str,
    *,
    keys: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    link: dict[str, Any] | None = None,
) -> Settings:
    return Settings(
        kme_id=KME_ID,
        database_url=database_url,
        server=ServerSettings(
            host="127.0.0.1",
            port=0,
            certfile=test_pki.server_cert,
            keyfile=test_pki.server_key,
            ca_file=test_pki.ca_file,
            access_log=False,
            **(server or {}),
        ),
        identity=IdentitySettings(**(identity or {})),
        keys=KeySettings(**(keys or {})),
        # The emulated link is off unless a test asks: pool figures stay exact.
        link=LinkSettings(**({"rate_bps": 0} | (link or {}))),
    )


@dataclass
class RunningKME:
    settings: Settings
    database: Database
    pki: RunPKI
    port: int
    link_id: int
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, sae: str | LabSAE | None = "SAE_A", **context: Any) -> httpx.AsyncClient:
        """An HTTPS client presenting `sae`'s certificate (None: no certificate)."""
        if isinstance(sae, str):
            sae = self.pki.saes[sae]
        client = httpx.AsyncClient(
            base_url=self.base_url,
            verify=client_context(self.pki, sae, **context),
            timeout=30.0,
        )
        self.clients.append(client)
        return client

    async def stored_blocks(self) -> int:
        async with self.database.session() as session:
            link = await session.get(Link, self.link_id)
            assert link is not None
            return link.stored_blocks

    async def pool_rows(self) -> int:
        return await self._count(PoolBlock)

    async def delivered_rows(self) -> int:
        return await self._count(DeliveredKey)

    async def recipient_rows(self) -> int:
        return await self._count(KeyRecipient)

    async def _count(self, model: type[Any]) -> int:
        async with self.database.session() as session:
            return int(
                (await session.execute(select(func.count()).select_from(model))).scalar_one()
            )

    async def fill(self, count: int) -> int:
        return await supply.add_keys(self.database, self.settings, self.link_id, count)

    async def register(self, sae_id: str, **kwargs: Any) -> None:
        async with self.database.session() as session:
            await saes.add(session, sae_id, kwargs.pop("kme_id", KME_ID), **kwargs)
            await session.commit()

    async def unregister(self, sae_id: str) -> None:
        async with self.database.session() as session:
            await saes.remove(session, sae_id)
            await session.commit()


@contextlib.asynccontextmanager
async def running_kme(
    settings: Settings,
    test_pki: RunPKI,
    *,
    register: Iterable[str] = SAE_IDS,
    fill: int = 1000,
) -> AsyncIterator[RunningKME]:
    """Serve `settings` with uvicorn on a free loopback port until the block ends."""
    database = Database(settings.database_url)
    async with database.session() as session:
        link = await pool.ensure_link(session, KME_ID, KME_ID, settings.keys.key_size)
        for sae_id in register:
            await saes.add(session, sae_id, KME_ID)
        await session.commit()
        link_id = link.id
    if fill:
        await supply.add_keys(database, settings, link_id, fill)

    server = build_server(
        create_app(settings, database=database), settings.server, host="127.0.0.1", port=0
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    running = RunningKME(settings, database, test_pki, port, link_id)
    try:
        yield running
    finally:
        for client in running.clients:
            await client.aclose()
        server.should_exit = True
        await task
        await database.dispose()
