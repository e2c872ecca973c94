"""The atomic heart: take blocks from the pool, deliver keys, destroy spent material.

Every function here works inside the caller's transaction and only flushes; the request
boundary commits (kme.keys.router). Two properties hold under any concurrency:

* a pool block is turned into a key at most once: the link's counter is decremented
  with a guarded UPDATE (a row lock on PostgreSQL, the database lock on SQLite) before
  blocks are taken with DELETE ... RETURNING;
* a delivered key reaches each authorised slave at most once: the key's row is locked
  before its recipients are checked and marked, and the material is deleted in the same
  transaction as the last delivery.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from kme.errors import (
    KEY_DATA_ACCESS_ERROR,
    KEYS_NOT_FOUND,
    BadRequest,
    ServiceUnavailable,
    Unauthorized,
)
from kme.keys.models import DeliveredKey, KeyRecipient, Link, PoolBlock

log = logging.getLogger("kme.pool")

FILL_CHUNK = 2_000


@dataclass(frozen=True, slots=True)
class Key:
    key_id: str
    material: bytes = field(repr=False)


class InsufficientKeys(Exception):
    """Fewer keys are stored than a request asks for."""


def blocks_per_key(size_bits: int, block_bits: int) -> int:
    return math.ceil(size_bits / block_bits)


def keys_available(link: Link, size_bits: int) -> int:
    """How many keys of `size_bits` the link's pool can give now (checklist item 27)."""
    return link.stored_blocks // blocks_per_key(size_bits, link.block_bits)


def capacity_blocks(max_key_count: int, key_size: int, block_bits: int) -> int:
    return max_key_count * blocks_per_key(key_size, block_bits)


async def get_link(session: AsyncSession, local_kme_id: str, remote_kme_id: str) -> Link | None:
    result = await session.execute(
        select(Link).where(Link.local_kme_id == local_kme_id, Link.remote_kme_id == remote_kme_id)
    )
    return result.scalar_one_or_none()


async def ensure_link(
    session: AsyncSession, local_kme_id: str, remote_kme_id: str, block_bits: int
) -> Link:
    """The link between two KMEs, created with `block_bits` blocks if it does not exist."""
    link = await get_link(session, local_kme_id, remote_kme_id)
    if link is not None:
        return link
    try:
        async with session.begin_nested():
            link = Link(
                local_kme_id=local_kme_id,
                remote_kme_id=remote_kme_id,
                block_bits=block_bits,
                stored_blocks=0,
            )
            session.add(link)
    except IntegrityError:  # another process created it first
        link = await get_link(session, local_kme_id, remote_kme_id)
        if link is None:
            raise
    return link


async def fill(session: AsyncSession, link_id: int, count: int, capacity: int) -> int:
    """Add up to `count` fresh random blocks without passing `capacity`; return how many."""
    row = (
        await session.execute(
            select(Link.stored_blocks, Link.block_bits).where(Link.id == link_id).with_for_update()
        )
    ).one()
    return await _add_blocks(
        session, link_id, min(count, max(0, capacity - row.stored_blocks)), row.block_bits
    )


async def bank(
    session: AsyncSession, link_id: int, *, rate_bps: int, capacity: int, now: float
) -> int:
    """The emulated link's production since it last banked, up to `capacity`; returns
    the blocks added. Bits made while the pool is full are lost, as on a real link."""
    row = (
        await session.execute(
            select(Link.stored_blocks, Link.block_bits, Link.banked_at)
            .where(Link.id == link_id)
            .with_for_update()
        )
    ).one()
    if row.banked_at is None or now < row.banked_at:
        await _set_banked_at(session, link_id, now)
        return 0
    made = int(rate_bps * (now - row.banked_at) // row.block_bits)
    if made <= 0:
        return 0  # keep banked_at: the fraction of a block carries over
    room = max(0, capacity - row.stored_blocks)
    added = await _add_blocks(session, link_id, min(made, room), row.block_bits)
    # Time for exactly the blocks made; with the pool full, the rest is lost.
    banked_at = now if made > room else row.banked_at + made * row.block_bits / rate_bps
    await _set_banked_at(session, link_id, banked_at)
    return added


async def _set_banked_at(session: AsyncSession, link_id: int, when: float) -> None:
    await session.execute(
        update(Link)
        .where(Link.id == link_id)
        .values(banked_at=when)
        .execution_options(synchronize_session=False)
    )


async def _add_blocks(session: AsyncSession, link_id: int, count: int, block_bits: int) -> int:
    """Insert `count` random blocks and raise the link's counter (row already locked)."""
    remaining = count
    while remaining:
        chunk = min(remaining, FILL_CHUNK)
        await session.execute(
            insert(PoolBlock),
            [
                {"link_id": link_id, "material": secrets.token_bytes(block_bits // 8)}
                for _ in range(chunk)
            ],
        )
        remaining -= chunk
    if count:
        await session.execute(
            update(Link)
            .where(Link.id == link_id)
            .values(stored_blocks=Link.stored_blocks + count)
            .execution_options(synchronize_session=False)
        )
    return count


async def reserve(
    session: AsyncSession,
    link: Link,
    *,
    master_sae_id: str,
    slave_sae_ids: Sequence[str],
    number: int,
    size_bits: int,
    ttl_seconds: float,
) -> list[Key]:
    """Turn pool blocks into `number` keys of `size_bits` for the master and its slaves.

    Raises InsufficientKeys, leaving the pool untouched, when the pool is too small.
    """
    per_key = blocks_per_key(size_bits, link.block_bits)
    need = number * per_key
    taken = await session.execute(
        update(Link)
        .where(Link.id == link.id, Link.stored_blocks >= need)
        .values(stored_blocks=Link.stored_blocks - need)
        .returning(Link.stored_blocks)
        .execution_options(synchronize_session=False)
    )
    if taken.first() is None:
        raise InsufficientKeys

    # The counter UPDATE above holds the link row's lock until commit, so reservations on
    # a link run one at a time; SKIP LOCKED is a second fence, and the length check below
    # the real backstop.
    oldest = (
        select(PoolBlock.id)
        .where(PoolBlock.link_id == link.id)
        .order_by(PoolBlock.id)
        .limit(need)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = (
        await session.execute(
            delete(PoolBlock)
            .where(PoolBlock.id.in_(oldest))
            .returning(PoolBlock.id, PoolBlock.material)
            .execution_options(synchronize_session=False)
        )
    ).all()
    rows = sorted(rows, key=lambda row: int(row[0]))
    if len(rows) != need:
        # The counter promised blocks the table does not hold: refuse rather than guess.
        log.error("pool counter of link %s is out of step with its blocks", link.id)
        raise ServiceUnavailable(KEY_DATA_ACCESS_ERROR)

    size_bytes = size_bits // 8
    now = time.time()
    keys: list[Key] = []
    for i in range(number):
        material = b"".join(row[1] for row in rows[i * per_key : (i + 1) * per_key])
        # key_IDs are random, never derived from material (issue 2, item 4).
        keys.append(Key(key_id=str(uuid.uuid4()), material=material[:size_bytes]))

    await session.execute(
        insert(DeliveredKey),
        [
            {
                "key_id": key.key_id,
                "link_id": link.id,
                "master_sae_id": master_sae_id,
                "size_bits": size_bits,
                "material": key.material,
                "created_at": now,
                "expires_at": now + ttl_seconds,
            }
            for key in keys
        ],
    )
    await session.execute(
        insert(KeyRecipient),
        [{"key_id": key.key_id, "slave_sae_id": slave} for key in keys for slave in slave_sae_ids],
    )
    return keys


async def collect(
    session: AsyncSession, *, caller_sae_id: str, master_sae_id: str, key_ids: Sequence[str]
) -> list[Key]:
    """Give the slave `caller_sae_id` the keys `key_ids` made for `master_sae_id`: all or none.

    Checks run in the checklist's order (item 51): authorisation (401) for every key that
    exists, then existence (400). A key already fetched by this slave, one made for
    another master, and one past its TTL are all "not found".
    """
    now = time.time()
    found = {
        key.key_id: key
        for key in (
            await session.execute(
                select(DeliveredKey)
                .where(DeliveredKey.key_id.in_(key_ids), DeliveredKey.expires_at > now)
                .order_by(DeliveredKey.key_id)
                .with_for_update()
            )
        ).scalars()
    }
    recipients: dict[str, dict[str, float | None]] = {key_id: {} for key_id in found}
    for recipient in (
        await session.execute(select(KeyRecipient).where(KeyRecipient.key_id.in_(list(found))))
    ).scalars():
        recipients[recipient.key_id][recipient.slave_sae_id] = recipient.delivered_at

    for key_id in found:
        if caller_sae_id not in recipients[key_id]:
            # The spec wants 401 here, which confirms that the key_ID exists (item 51).
            log.warning(
                "dec_keys: SAE %r asked for key %s, which was not made for it",
                caller_sae_id,
                key_id,
            )
            raise Unauthorized("a requested key was not issued to this SAE")

    for key_id in key_ids:
        key = found.get(key_id)
        if (
            key is None
            or key.master_sae_id != master_sae_id
            or recipients[key_id][caller_sae_id] is not None
        ):
            raise BadRequest(KEYS_NOT_FOUND)

    await session.execute(
        update(KeyRecipient)
        .where(KeyRecipient.key_id.in_(key_ids), KeyRecipient.slave_sae_id == caller_sae_id)
        .values(delivered_at=now)
        .execution_options(synchronize_session=False)
    )
    spent = [
        key_id
        for key_id in key_ids
        if all(at is not None for slave, at in recipients[key_id].items() if slave != caller_sae_id)
    ]
    if spent:
        await destroy(session, spent)
    return [Key(key_id=key_id, material=found[key_id].material) for key_id in key_ids]


async def destroy(session: AsyncSession, key_ids: Sequence[str]) -> None:
    """Delete delivered keys (their recipients go by ON DELETE CASCADE): the material is
    gone with the row. Callers hold the rows' locks already (collect)."""
    await session.execute(
        delete(KeyRecipient)
        .where(KeyRecipient.key_id.in_(key_ids))
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        delete(DeliveredKey)
        .where(DeliveredKey.key_id.in_(key_ids))
        .execution_options(synchronize_session=False)
    )


async def forget_sae(session: AsyncSession, sae_id: str) -> int:
    """Destroy what an unregistered SAE could still fetch: the keys it made as master, and
    its copies as a slave (a multicast key stays for its other slaves). Returns how many
    keys were destroyed."""
    mastered = (
        (
            await session.execute(
                select(DeliveredKey.key_id).where(DeliveredKey.master_sae_id == sae_id)
            )
        )
        .scalars()
        .all()
    )
    awaited = (
        (
            await session.execute(
                select(KeyRecipient.key_id).where(KeyRecipient.slave_sae_id == sae_id)
            )
        )
        .scalars()
        .all()
    )
    await session.execute(
        delete(KeyRecipient)
        .where(KeyRecipient.slave_sae_id == sae_id)
        .execution_options(synchronize_session=False)
    )
    still_wanted = set(
        (
            await session.execute(
                select(KeyRecipient.key_id).where(
                    KeyRecipient.key_id.in_(awaited), KeyRecipient.delivered_at.is_(None)
                )
            )
        )
        .scalars()
        .all()
    )
    doomed = sorted(set(mastered) | (set(awaited) - still_wanted))
    for start in range(0, len(doomed), PURGE_BATCH):
        await destroy(session, doomed[start : start + PURGE_BATCH])
    return len(doomed)


PURGE_BATCH = 1000


async def purge_expired(session: AsyncSession, now: float | None = None) -> int:
    """Destroy one batch of deliveries whose slaves did not come within the TTL (item 49).

    Locks keys in key_ID order, as collect does, and skips keys a collect holds, so the
    two never deadlock; a batch stays far below any driver's parameter limit. Call it
    until it returns less than PURGE_BATCH.
    """
    cutoff = time.time() if now is None else now
    expired = (
        select(DeliveredKey.key_id)
        .where(DeliveredKey.expires_at <= cutoff)
        .order_by(DeliveredKey.key_id)
        .limit(PURGE_BATCH)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    purged = (
        await session.execute(
            delete(DeliveredKey)
            .where(DeliveredKey.key_id.in_(expired))
            .returning(DeliveredKey.key_id)
            .execution_options(synchronize_session=False)
        )
    ).all()
    return len(purged)


async def undelivered_count(session: AsyncSession) -> int:
    """Deliveries still waiting for a slave (an operator's figure, not on a request path)."""
    return int((await session.execute(select(func.count()).select_from(DeliveredKey))).scalar_one())
