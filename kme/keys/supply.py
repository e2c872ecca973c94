"""Where keys come from: the emulated QKD link, and the sweeper of undelivered keys.

The link produces secret bits at `link.rate_bps` from the operating system's CSPRNG and
banks them as blocks of the link's block size, up to the pool's capacity. Bits produced
while the pool is full are lost, as on a real link whose KME has no room.
"""

from __future__ import annotations

import asyncio
import logging
import time

from kme.config import Settings
from kme.db import Database
from kme.keys import pool
from kme.keys.models import Link

log = logging.getLogger("kme.supply")

SWEEP_SECONDS = 30.0


async def add_keys(database: Database, settings: Settings, link_id: int, count: int) -> int:
    """Bank `count` keys of `key_size` bits now (`kme pool fill`); return how many fit."""
    async with database.session() as session:
        link = await session.get(Link, link_id)
        if link is None:
            raise LookupError(f"no link {link_id}")
        per_key = pool.blocks_per_key(settings.keys.key_size, link.block_bits)
        capacity = pool.capacity_blocks(
            settings.keys.max_key_count, settings.keys.key_size, link.block_bits
        )
        added = await pool.fill(session, link_id, count * per_key, capacity)
        await session.commit()
    return added // per_key


async def run_link(database: Database, settings: Settings, link_id: int, block_bits: int) -> None:
    """Run the emulated link until cancelled.

    Production is accounted in the link's row (pool.bank), so any number of kme
    processes sharing one database together produce at the configured rate.
    """
    rate = settings.link.rate_bps
    if rate <= 0:
        return
    capacity = pool.capacity_blocks(settings.keys.max_key_count, settings.keys.key_size, block_bits)
    while True:
        try:
            async with database.session() as session:
                await pool.bank(session, link_id, rate_bps=rate, capacity=capacity, now=time.time())
                await session.commit()
        except Exception:
            log.exception("emulated link %s could not bank keys; retrying next tick", link_id)
        await asyncio.sleep(settings.link.tick_seconds)


async def sweep(database: Database) -> int:
    """Destroy every expired undelivered key, batch by batch; return how many."""
    total = 0
    while True:
        async with database.session() as session:
            purged = await pool.purge_expired(session)
            await session.commit()
        total += purged
        if purged < pool.PURGE_BATCH:
            break
    if database.is_sqlite:
        # The WAL keeps copies of deleted pages (with key material) until a checkpoint.
        async with database.engine.connect() as connection:
            autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    return total


async def run_sweeper(database: Database, every: float = SWEEP_SECONDS) -> None:
    """Destroy expired undelivered keys until cancelled."""
    while True:
        await asyncio.sleep(every)
        try:
            purged = await sweep(database)
            if purged:
                log.info("destroyed %d keys whose slaves did not fetch them in time", purged)
        except Exception:
            log.exception("sweeping expired keys failed; retrying")
