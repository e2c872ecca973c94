"""The Alembic migrations build exactly the schema the models describe, on each database."""

from __future__ import annotations

import asyncio

from alembic import command
from alembic.config import Config

from kme.db import migrations_dir, normalise_url


async def test_migrated_schema_matches_the_models(database_url: str) -> None:
    """Issue 2 item 3: `alembic check` finds nothing to generate after upgrading to head,
    so the models and the migrations in migrations/ agree."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["database_url"] = normalise_url(database_url)
    await asyncio.to_thread(command.check, config)
