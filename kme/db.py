"""Engine and session factories, the declarative Base, and Alembic migrations.

SQLite is the embedded default; every SQLite transaction starts with BEGIN IMMEDIATE so
that writers queue on the database lock up front instead of failing on a lock upgrade
half-way through a key reservation. PostgreSQL uses row locks (see kme.keys.pool).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import MetaData, event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SQLITE_BUSY_TIMEOUT_MS = 10_000


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for other databases and in-memory SQLite."""
    url = normalise_url(url)
    if not is_sqlite(url):
        return None
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    if not rest or rest.startswith(":memory:"):
        return None
    return Path(rest.split("?", 1)[0])


def normalise_url(url: str) -> str:
    """Accept plain `postgresql://` and `sqlite:///` URLs; kme always talks async."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    return url


def create_engine(url: str, *, pool_size: int = 5) -> AsyncEngine:
    """An async engine; `pool_size` applies to PostgreSQL (SQLite uses one connection).

    hide_parameters: SQLAlchemy puts a failed statement's parameters into the exception
    text, and those parameters can be key material (checklist item 54).
    """
    url = normalise_url(url)
    if not is_sqlite(url):
        return create_async_engine(
            url,
            hide_parameters=True,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
        )

    engine = create_async_engine(
        url,
        hide_parameters=True,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "isolation_level": None},
        # One connection: SQLite lets one writer in at a time anyway, and queueing for the
        # connection in asyncio is cheaper than SQLite's sleeping busy handler.
        pool_size=1,
        max_overflow=0,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: with NORMAL a committed delivery can roll back after a power loss, and the
        # restored pool blocks would then be handed out a second time.
        cursor.execute("PRAGMA synchronous=FULL")
        # Deleted key material is overwritten in the database file, whatever the build's
        # default (the sweeper also truncates the WAL, which holds copies).
        cursor.execute("PRAGMA secure_delete=ON")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Connection) -> None:
        if connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return  # maintenance outside a transaction (the WAL checkpoint)
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class Database:
    """The engine and the session factory of one running app (built in its lifespan)."""

    def __init__(self, url: str, *, pool_size: int = 5) -> None:
        self.url = normalise_url(url)
        self.engine = create_engine(self.url, pool_size=pool_size)
        self.sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    def session(self) -> AsyncSession:
        return self.sessions()

    async def dispose(self) -> None:
        await self.engine.dispose()


def migrations_dir() -> Path:
    """Alembic's folder: inside the installed package, or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RuntimeError("kme's Alembic migrations are missing from this installation")


def migrate(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision`.

    Blocking, and Alembic's async env.py runs an event loop of its own: from async code
    call it through ``asyncio.to_thread``.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = normalise_url(url)
    command.upgrade(config, revision)
