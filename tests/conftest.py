"""Fixtures: a real PKI, real databases (SQLite always, PostgreSQL when configured), and a
real uvicorn server over mutual TLS."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.kmetest import (
    PG_ENV,
    DatabaseTemplates,
    RunningKME,
    RunPKI,
    make_settings,
    make_test_pki,
    running_kme,
)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> RunPKI:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseTemplates]:
    made = DatabaseTemplates(tmp_path_factory.mktemp("db-templates"))
    yield made
    made.drop_all(os.environ.get(PG_ENV))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, templates: DatabaseTemplates
) -> AsyncIterator[str]:
    """A freshly migrated, empty database: SQLite, and PostgreSQL when KME_TEST_POSTGRES_URL is set."""
    if request.param == "sqlite":
        yield await templates.sqlite(tmp_path / "kme.db")
        return
    admin_url = os.environ.get(PG_ENV)
    if not admin_url:
        pytest.skip(
            f"PostgreSQL tests need {PG_ENV} (for example postgresql://postgres@127.0.0.1/test)"
        )
    url = await templates.postgres(admin_url)
    try:
        yield url
    finally:
        await templates.drop_postgres(admin_url, url)


@pytest.fixture
async def kme(database_url: str, test_pki: RunPKI) -> AsyncIterator[RunningKME]:
    """A KME with default settings, SAEs SAE_A, SAE_B, SAE_C and 'SAE D/x', 1000 keys."""
    async with running_kme(make_settings(test_pki, database_url), test_pki) as running:
        yield running


KMEFactory = Callable[..., AbstractAsyncContextManager[RunningKME]]


@pytest.fixture
def make_kme(database_url: str, test_pki: RunPKI) -> KMEFactory:
    """Start a KME with custom settings: ``async with make_kme(keys={...}, fill=10) as kme``."""

    def factory(
        *, fill: int = 1000, register: Any = None, **sections: Any
    ) -> AbstractAsyncContextManager[RunningKME]:
        settings = make_settings(test_pki, database_url, **sections)
        kwargs: dict[str, Any] = {"fill": fill}
        if register is not None:
            kwargs["register"] = register
        return running_kme(settings, test_pki, **kwargs)

    return factory
