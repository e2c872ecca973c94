"""Key-pool integrity under concurrency and failure (checklist items 49, 52, 53; issue item 3)."""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, select

from kme.db import sqlite_path as sqlite_file
from kme.keys.models import PoolBlock
from tests.conftest import KMEFactory
from tests.kmetest import RunningKME

ENC = "/api/v1/keys/{}/enc_keys"
DEC = "/api/v1/keys/{}/dec_keys"
STATUS = "/api/v1/keys/{}/status"

MASTERS = 32
REQUESTS_PER_MASTER = 64


@contextmanager
def failing_commits(kme: RunningKME) -> Iterator[list[int]]:
    """Make every COMMIT on the app's engine fail, as a database that dies at commit would."""
    failures: list[int] = []

    def refuse(_connection: Any) -> None:
        failures.append(1)
        raise RuntimeError("injected commit failure")

    engine = kme.database.engine.sync_engine
    event.listen(engine, "commit", refuse)
    try:
        yield failures
    finally:
        event.remove(engine, "commit", refuse)


async def test_concurrent_masters_never_share_a_key(kme: RunningKME) -> None:
    """Item 53, issue item 3: 32 masters, 2048 concurrent enc_keys calls: no key_ID or key twice,
    and the pool's counter, rows and deliveries add up exactly."""
    await kme.fill(3000)  # 4000 blocks in all
    masters = []
    for i in range(MASTERS):
        sae_id = f"MASTER_{i:02d}"
        masters.append(kme.pki.issue(sae_id, sae_id))
        await kme.register(sae_id)
    before = await kme.stored_blocks()

    async def master_run(sae: Any, index: int) -> list[dict[str, Any]]:
        client = kme.client(sae)
        got: list[dict[str, Any]] = []
        for n in range(REQUESTS_PER_MASTER):
            # Mix the GET and POST forms and 1 or 2 keys per call.
            if (index + n) % 2:
                response = await client.post(ENC.format("SAE_B"), json={"number": 2})
            else:
                response = await client.get(ENC.format("SAE_B"))
            assert response.status_code == 200, response.text
            got.extend(response.json()["keys"])
        return got

    results = await asyncio.gather(*(master_run(sae, i) for i, sae in enumerate(masters)))
    keys = [key for batch in results for key in batch]
    expected = sum(
        2 if (i + n) % 2 else 1 for i in range(MASTERS) for n in range(REQUESTS_PER_MASTER)
    )
    assert len(keys) == expected
    assert len({key["key_ID"] for key in keys}) == expected
    assert len({key["key"] for key in keys}) == expected
    assert await kme.stored_blocks() == before - expected
    assert await kme.pool_rows() == before - expected
    assert await kme.delivered_rows() == expected
    status = (await kme.client("SAE_A").get(STATUS.format("SAE_B"))).json()
    assert status["stored_key_count"] == before - expected


async def test_concurrent_dec_keys_for_one_key_yield_exactly_one_200(kme: RunningKME) -> None:
    """Item 53: two (here: four) simultaneous dec_keys for the same key by the same slave give
    exactly one 200 and the rest 'not found'."""
    got = (await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 50})).json()
    slaves = [kme.client("SAE_B") for _ in range(4)]

    async def fetch(client: Any, key_id: str) -> int:
        response = await client.get(DEC.format("SAE_A"), params={"key_ID": key_id})
        return int(response.status_code)

    codes = await asyncio.gather(
        *(fetch(client, key["key_ID"]) for key in got["keys"] for client in slaves)
    )
    per_key = [collections.Counter(codes[i * 4 : (i + 1) * 4]) for i in range(50)]
    assert all(counts == {200: 1, 400: 3} for counts in per_key), per_key
    assert await kme.delivered_rows() == 0


async def test_failed_commit_on_enc_keys_delivers_nothing(kme: RunningKME) -> None:
    """Issue item 3: if the delivery cannot be committed, the caller gets 503 and no key,
    and the pool is exactly as before."""
    before = await kme.stored_blocks()
    client = kme.client("SAE_A")
    with failing_commits(kme) as failures:
        response = await client.post(ENC.format("SAE_B"), json={"number": 3})
    assert failures
    assert response.status_code == 503
    assert set(response.json()) <= {"message", "details"}
    assert "keys" not in response.text
    assert await kme.stored_blocks() == before
    assert await kme.pool_rows() == before
    assert await kme.delivered_rows() == 0
    # The same connection works again once the database does.
    assert (await client.post(ENC.format("SAE_B"), json={"number": 3})).status_code == 200


async def test_failed_commit_on_dec_keys_loses_no_key(kme: RunningKME) -> None:
    """Issue item 3: a slave whose delivery cannot be committed gets 503 and can fetch later."""
    got = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()
    key = got["keys"][0]
    slave = kme.client("SAE_B")
    with failing_commits(kme):
        response = await slave.get(DEC.format("SAE_A"), params={"key_ID": key["key_ID"]})
    assert response.status_code == 503
    assert key["key"] not in response.text
    assert await kme.delivered_rows() == 1
    again = await slave.get(DEC.format("SAE_A"), params={"key_ID": key["key_ID"]})
    assert again.json() == got


async def test_database_failure_mid_request_is_503_and_changes_nothing(kme: RunningKME) -> None:
    """Items 17, 18: a database error half-way through enc_keys is a 503 in the Error
    format (never a 500), and the transaction leaves the pool as it was."""
    before = await kme.stored_blocks()

    def break_inserts(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO DELIVERED_KEY"):
            raise RuntimeError("injected database failure")

    engine = kme.database.engine.sync_engine
    client = kme.client("SAE_A")
    event.listen(engine, "before_cursor_execute", break_inserts)
    try:
        response = await client.post(ENC.format("SAE_B"), json={"number": 2})
    finally:
        event.remove(engine, "before_cursor_execute", break_inserts)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert isinstance(response.json()["message"], str)
    assert await kme.stored_blocks() == before
    assert await kme.pool_rows() == before
    assert await kme.delivered_rows() == 0
    # The keep-alive connection survives the failure.
    again = await client.post(ENC.format("SAE_B"), json={"number": 2})
    assert again.status_code == 200
    assert again.extensions["network_stream"] is response.extensions["network_stream"]


async def test_database_errors_keep_key_material_out_of_logs(
    kme: RunningKME, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 54: a real database error on the statement that stores key material (a key_ID
    collision forced by fixing uuid4) is a 503, changes nothing, and no log record holds
    the material of the blocks the failed request had taken."""
    from kme.keys import pool

    fixed = uuid.UUID("00000000-0000-4000-8000-000000000001")
    monkeypatch.setattr(pool.uuid, "uuid4", lambda: fixed)
    first = await kme.client("SAE_A").get(ENC.format("SAE_B"))
    assert first.status_code == 200
    async with kme.database.session() as session:
        next_block = (
            await session.execute(select(PoolBlock.material).order_by(PoolBlock.id).limit(1))
        ).scalar_one()
    before = await kme.stored_blocks()
    caplog.set_level(logging.DEBUG)

    second = await kme.client("SAE_A").get(ENC.format("SAE_B"))

    assert second.status_code == 503
    assert await kme.stored_blocks() == before
    assert await kme.delivered_rows() == 1
    assert "IntegrityError" in caplog.text or "UniqueViolation" in caplog.text
    for spelling in (
        repr(next_block)[2:-1],
        next_block.hex(),
        base64.b64encode(next_block).decode(),
    ):
        assert spelling not in caplog.text
        assert spelling not in second.text


async def test_status_cost_does_not_depend_on_the_pool(kme: RunningKME) -> None:
    """Issue item 3: stored_key_count is read from the link's counter, never by scanning the
    pool: no statement a status request runs touches pool_block."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    engine = kme.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        response = await kme.client("SAE_A").get(STATUS.format("SAE_B"))
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert response.status_code == 200
    assert statements
    assert not [s for s in statements if "pool_block" in s or "count(" in s.lower()]


async def test_undelivered_keys_expire_after_their_ttl(make_kme: KMEFactory) -> None:
    """Item 49: a delivery whose slave does not come within the TTL is destroyed."""
    from kme.keys import pool

    async with make_kme(keys={"undelivered_key_ttl": 0.3}) as kme:
        got = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()
        await asyncio.sleep(0.5)
        late = await kme.client("SAE_B").get(
            DEC.format("SAE_A"), params={"key_ID": got["keys"][0]["key_ID"]}
        )
        assert late.status_code == 400
        assert late.json()["message"] == "one or more keys specified are not found on KME"
        async with kme.database.session() as session:
            assert await pool.purge_expired(session) == 1
            await session.commit()
        assert await kme.delivered_rows() == 0
        assert await kme.recipient_rows() == 0


async def wait_for_blocks(kme: RunningKME, count: int, seconds: float = 10.0) -> None:
    """Poll (bounded) until the pool holds at least `count` blocks."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):
        if await kme.stored_blocks() >= count or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.05)


async def test_emulated_link_fills_up_to_capacity(make_kme: KMEFactory) -> None:
    """Issue item 5: the emulated link banks keys at its rate and stops at max_key_count."""
    async with make_kme(
        fill=0,
        keys={"max_key_count": 40},
        link={"rate_bps": 256 * 400, "tick_seconds": 0.02},
    ) as kme:
        await wait_for_blocks(kme, 40)
        await asyncio.sleep(0.2)  # keep running: it must not pass capacity
        assert await kme.stored_blocks() == 40
        assert await kme.pool_rows() == 40
        status = (await kme.client("SAE_A").get(STATUS.format("SAE_B"))).json()
        assert status["stored_key_count"] == status["max_key_count"] == 40
        # Spent keys are replaced.
        got = await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 10})
        assert got.status_code == 200
        assert all(len(base64.b64decode(k["key"])) == 32 for k in got.json()["keys"])
        await wait_for_blocks(kme, 40)
        assert await kme.stored_blocks() == 40


async def test_sweep_destroys_every_expired_key_in_batches(make_kme: KMEFactory) -> None:
    """Item 49: more expired deliveries than one batch (and than PostgreSQL's parameter
    limit would allow in one statement) are all destroyed; on SQLite none of their material
    is left in the database file or its WAL afterwards."""
    from kme.keys import pool, supply

    count = pool.PURGE_BATCH * 2 + 7
    async with make_kme(fill=count + 5, keys={"undelivered_key_ttl": 0.2}) as kme:
        async with kme.database.session() as session:
            link = await pool.get_link(session, "KME_TEST", "KME_TEST")
            assert link is not None
            keys = await pool.reserve(
                session,
                link,
                master_sae_id="SAE_A",
                slave_sae_ids=["SAE_B", "SAE_C"],
                number=count,
                size_bits=256,
                ttl_seconds=0.2,
            )
            await session.commit()
        fresh = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()  # not expired
        await asyncio.sleep(0.3)
        fresh_deadline = await kme.client("SAE_A").get(ENC.format("SAE_B"))  # made after
        assert fresh_deadline.status_code == 200
        assert await supply.sweep(kme.database) >= count
        remaining = await kme.delivered_rows()
        assert remaining == 1  # only the key made after the TTL ran out for the others
        assert await kme.recipient_rows() == 1
        assert fresh["keys"][0]["key_ID"] not in fresh_deadline.text
        path = sqlite_file(kme.settings.database_url)
        if path is not None:
            stored = b"".join(
                candidate.read_bytes()
                for candidate in (path, path.with_name(path.name + "-wal"))
                if candidate.exists()
            )
            leaked = [key.key_id for key in keys[:200] if key.material in stored]
            assert not leaked


async def test_sweep_and_collect_on_the_same_keys_do_not_deadlock(make_kme: KMEFactory) -> None:
    """Item 49, 53: sweeping expired keys while slaves collect other keys at the same time
    finishes without a deadlock or a 503, and every collect gets its keys."""
    from kme.keys import supply

    async with make_kme(fill=300, keys={"undelivered_key_ttl": 2.0}) as kme:
        doomed = await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 100})
        assert doomed.status_code == 200
        await asyncio.sleep(2.1)
        live = (await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 100})).json()
        slave = kme.client("SAE_B")

        async def take(key_id: str) -> int:
            response = await slave.get(DEC.format("SAE_A"), params={"key_ID": key_id})
            return int(response.status_code)

        results = await asyncio.gather(
            supply.sweep(kme.database), *(take(key["key_ID"]) for key in live["keys"])
        )
        assert results[0] == 100
        assert set(results[1:]) == {200}
        assert await kme.delivered_rows() == 0


async def test_processes_sharing_a_pool_share_one_link_rate(make_kme: KMEFactory) -> None:
    """Issue 2 item 5: the emulated link's production is accounted in the database, so two
    kme processes banking for the same span of time add one link's worth of keys, not two;
    fractions of a block carry over, and a full pool loses the surplus."""
    from kme.db import Database
    from kme.keys import pool

    async with make_kme(fill=0) as kme:
        other = Database(kme.settings.database_url)  # a second process's engine
        try:

            async def bank(database: Database, now: float, capacity: int = 1000) -> int:
                async with database.session() as session:
                    added = await pool.bank(
                        session, kme.link_id, rate_bps=2560, capacity=capacity, now=now
                    )
                    await session.commit()
                    return added

            t0 = 1_000_000.0
            assert await bank(kme.database, t0) == 0  # starts the clock
            first, second = await asyncio.gather(bank(kme.database, t0 + 1), bank(other, t0 + 1))
            assert first + second == 10  # 2560 bit/s for 1 s, in 256-bit blocks
            assert await bank(other, t0 + 1.05) == 0  # half a block: carried over
            assert await bank(kme.database, t0 + 1.11) == 1  # the carried half, completed
            assert await bank(kme.database, t0 + 100, capacity=20) == 9  # full at 20
            assert await bank(other, t0 + 100.1) == 0  # the surplus was lost, not owed
            assert await kme.stored_blocks() == await kme.pool_rows() == 20
        finally:
            await other.dispose()
