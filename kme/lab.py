"""Creating and managing a deployment on disk: `kme init`, `kme sae`, `kme pool`.

A lab directory holds everything one KME needs::

    DIR/kme.toml               configuration
    DIR/kme.db                 the SQLite key pool (unless database_url says otherwise)
    DIR/certs/ca.pem, ca.key   the lab CA
    DIR/certs/kme.pem, .key    the KME's server certificate (CN = KME ID)
    DIR/certs/<SAE>.pem, .key  each SAE's client certificate (CN = SAE ID)
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from kme import pki, saes
from kme.config import Settings, load_settings
from kme.db import Database, migrate, sqlite_path
from kme.errors import ConfigError
from kme.keys import pool, supply

DEFAULT_SAES = ("SAE_A", "SAE_B")
DEFAULT_KME_ID = "KME_LAB"


@dataclass(frozen=True)
class LabSAE:
    sae_id: str
    cert: Path
    key: Path


def sae_file_stem(sae_id: str) -> str:
    """The SAE ID as a file name: itself, with only '%', '/' and a leading '.' encoded."""
    stem = sae_id.replace("%", "%25").replace("/", "%2F").replace("\0", "%00")
    return "%2E" + stem[1:] if stem.startswith(".") else stem


def sae_paths(certs: Path, sae_id: str) -> LabSAE:
    stem = sae_file_stem(sae_id)
    return LabSAE(sae_id, certs / f"{stem}.pem", certs / f"{stem}.key")


def render_config(kme_id: str, *, port: int = 8443, fill_rate_bps: int = 256_000) -> str:
    q = json.dumps  # TOML basic strings share JSON's escapes for what we write
    return f"""# kme configuration. Every field can be overridden by an environment variable:
# KME_<FIELD>, or KME_<SECTION>__<FIELD> (for example KME_SERVER__PORT=9443).
# Relative paths are relative to this file's folder.

kme_id = {q(kme_id)}                  # the server certificate's CN carries it too
database_url = "sqlite+aiosqlite:///kme.db"   # or postgresql+asyncpg://user@host/db
log_level = "info"

[server]
host = "127.0.0.1"
port = {port}
certfile = "certs/kme.pem"
keyfile = "certs/kme.key"
ca_file = "certs/ca.pem"           # client certificates must chain to this CA
trusted_proxies = []               # e.g. ["10.0.0.5/32"], with trusted_proxy_certs:
trusted_proxy_certs = []           # the proxies' certificate SHA-256s (see README)
proxy_cert_header = "x-ssl-client-cert"
access_log = true

[identity]
source = "cn"                      # cn | san | fingerprint
san_type = "uri"                   # with source = "san": dns | uri | email
san_prefix = ""                    # with source = "san": e.g. "urn:qkd:sae:"

[keys]
key_size = 256                     # bits; Status.key_size and the pool's block size
min_key_size = 64
max_key_size = 8192
max_key_per_request = 128
max_key_count = 100000
max_sae_id_count = 8               # 0 turns multicast off
insufficient_keys_status = 503     # or 400
strict_optional_extensions = false
undelivered_key_ttl = 86400        # seconds a delivered key waits for its slaves

[link]
rate_bps = {fill_rate_bps}                 # emulated QKD link: secret bits per second, 0 = off
tick_seconds = 0.5
"""


def _private_sqlite_file(url: str) -> None:
    """Create the SQLite file owner-only before SQLite does: it will hold key material.

    SQLite gives its -wal and -shm files the database file's permissions.
    """
    path = sqlite_path(url)
    if path is not None and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


async def prepare_database(settings: Settings) -> int:
    """Migrate and make sure the KME's own link exists; return the link's id."""
    _private_sqlite_file(settings.database_url)
    try:
        await asyncio.to_thread(migrate, settings.database_url)
    except (SQLAlchemyError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"field 'database_url': cannot open or migrate the database ({reason})"
        ) from None
    database = Database(settings.database_url, pool_size=1)
    try:
        async with database.session() as session:
            link = await pool.ensure_link(
                session, settings.kme_id, settings.kme_id, settings.keys.key_size
            )
            await session.commit()
            return link.id
    finally:
        await database.dispose()


def init_lab(
    directory: Path,
    *,
    sae_ids: list[str],
    kme_id: str = DEFAULT_KME_ID,
    sans: list[str] | None = None,
    fill: int = 10_000,
    force: bool = False,
) -> Settings:
    config_path = directory / "kme.toml"
    if config_path.exists() and not force:
        raise FileExistsError(f"{config_path} exists already (use --force to replace the lab)")
    for sae_id in sae_ids:
        check_lab_sae_id(sae_id)
    if len(set(sae_ids)) != len(sae_ids):
        raise ValueError("an SAE ID is given twice")
    certs = directory / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    if force:
        for stale in (directory / "kme.db", directory / "kme.db-wal", directory / "kme.db-shm"):
            stale.unlink(missing_ok=True)

    ca = pki.make_ca(f"{kme_id} lab CA")
    pki.write(ca, certs / "ca.pem", certs / "ca.key")
    server = pki.issue_server(ca, kme_id, pki.default_server_names(sans))
    pki.write(server, certs / "kme.pem", certs / "kme.key")
    for sae_id in sae_ids:
        paths = sae_paths(certs, sae_id)
        pki.write(pki.issue_client(ca, sae_id), paths.cert, paths.key)
    config_path.write_text(render_config(kme_id))

    settings = load_settings(config_path)
    asyncio.run(_populate(settings, sae_ids, fill))
    return settings


async def _populate(settings: Settings, sae_ids: list[str], fill: int) -> None:
    link_id = await prepare_database(settings)
    database = Database(settings.database_url, pool_size=1)
    try:
        async with database.session() as session:
            for sae_id in sae_ids:
                await saes.add(session, sae_id, settings.kme_id)
            await session.commit()
        if fill:
            await supply.add_keys(database, settings, link_id, fill)
    finally:
        await database.dispose()


def check_lab_sae_id(sae_id: str) -> None:
    """An SAE ID the lab can issue a certificate for (its CN holds at most 64 characters)."""
    saes.validate_sae_id(sae_id)
    if len(sae_id) > pki.MAX_COMMON_NAME:
        raise ValueError(
            f"a lab certificate's CN holds at most {pki.MAX_COMMON_NAME} characters; "
            f"register a longer SAE ID with --no-cert and a certificate mapped by SAN or fingerprint"
        )


def issue_sae_certificate(config_dir: Path, settings: Settings, sae_id: str) -> LabSAE | None:
    """Issue a client certificate for `sae_id` with the lab CA, if this lab has its key."""
    ca_key = settings.server.ca_file.with_suffix(".key")
    if not ca_key.is_file():
        return None
    ca = pki.load(settings.server.ca_file, ca_key)
    paths = sae_paths(settings.server.ca_file.parent, sae_id)
    pki.write(pki.issue_client(ca, sae_id), paths.cert, paths.key)
    return paths
