"""The three API methods doing what the spec says, end to end over mutual TLS.

Each test names the checklist items of ../shared/spec/etsi-gs-qkd-014.md it proves.
"""

from __future__ import annotations

import base64
import logging
import uuid
from typing import Any

import pytest

from tests.conftest import KMEFactory
from tests.kmetest import KME_ID, RunningKME

ENC = "/api/v1/keys/{}/enc_keys"
DEC = "/api/v1/keys/{}/dec_keys"
STATUS = "/api/v1/keys/{}/status"

STATUS_INTEGERS = (
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)


def key_ids(container: dict[str, Any]) -> list[str]:
    return [key["key_ID"] for key in container["keys"]]


def decoded(key: dict[str, Any]) -> bytes:
    return base64.b64decode(key["key"], validate=True)


async def test_status_fields_and_invariants(kme: RunningKME) -> None:
    """Items 22, 23, 25, 58: every Status field present and typed; caller is master, path is slave."""
    response = await kme.client("SAE_A").get(STATUS.format("SAE_B"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    status = response.json()
    assert status["source_KME_ID"] == KME_ID
    assert status["target_KME_ID"] == KME_ID
    assert status["master_SAE_ID"] == "SAE_A"
    assert status["slave_SAE_ID"] == "SAE_B"
    for name in STATUS_INTEGERS:
        assert type(status[name]) is int, name
    assert status["key_size"] == 256
    assert status["stored_key_count"] == 1000
    assert 0 <= status["stored_key_count"] <= status["max_key_count"]
    assert status["min_key_size"] <= status["key_size"] <= status["max_key_size"]
    assert status["max_key_per_request"] >= 1
    assert status["max_SAE_ID_count"] >= 0


async def test_status_has_no_side_effects(kme: RunningKME) -> None:
    """Item 22: calling status repeatedly changes nothing in the pool."""
    client = kme.client("SAE_A")
    before = await kme.stored_blocks()
    for _ in range(5):
        assert (await client.get(STATUS.format("SAE_B"))).status_code == 200
    assert await kme.stored_blocks() == before
    assert await kme.delivered_rows() == 0


async def test_encoded_sae_ids_round_trip(kme: RunningKME) -> None:
    """Item 10: an SAE ID with a space and a '/' is percent-decoded from the path, both ways."""
    master = kme.client("SAE_A")
    status = await master.get(STATUS.format("SAE%20D%2Fx"))
    assert status.status_code == 200, status.text
    assert status.json()["slave_SAE_ID"] == "SAE D/x"

    got = await master.get(ENC.format("SAE%20D%2Fx"))
    assert got.status_code == 200, got.text
    back = await kme.client("SAE D/x").get(
        DEC.format("SAE_A"), params={"key_ID": key_ids(got.json())[0]}
    )
    assert back.json() == got.json()

    # ... and as the master in dec_keys' path.
    got = await kme.client("SAE D/x").get(ENC.format("SAE_B"))
    back = await kme.client("SAE_B").get(
        DEC.format("SAE%20D%2Fx"), params={"key_ID": key_ids(got.json())[0]}
    )
    assert back.status_code == 200, back.text
    assert back.json() == got.json()


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("GET", {}),
        ("POST", {}),
        ("POST", {"json": {}}),
        ("POST", {"content": b"   "}),
    ],
    ids=["get-no-query", "post-no-body", "post-empty-object", "post-blank-body"],
)
async def test_default_request_gives_one_key_of_key_size(
    kme: RunningKME, method: str, kwargs: dict[str, Any]
) -> None:
    """Items 29, 30, 58: a request with no parameters returns one key of Status.key_size bits."""
    response = await kme.client("SAE_A").request(method, ENC.format("SAE_B"), **kwargs)
    assert response.status_code == 200, response.text
    keys = response.json()["keys"]
    assert len(keys) == 1
    assert len(decoded(keys[0])) == 256 // 8


@pytest.mark.parametrize("form", ["GET", "POST"])
async def test_number_and_size_are_honoured(kme: RunningKME, form: str) -> None:
    """Items 14, 28, 30, 34, 35, 58: a 200 Key container of `number` keys of `size` bits,
    UUIDv4 lowercase IDs, padded base64, over the GET and the POST form."""
    client = kme.client("SAE_A")
    if form == "GET":
        response = await client.get(ENC.format("SAE_B"), params={"number": 3, "size": 1024})
    else:
        response = await client.post(ENC.format("SAE_B"), json={"number": 3, "size": 1024})
    assert response.status_code == 200, response.text
    keys = response.json()["keys"]
    assert len(keys) == 3
    for key in keys:
        parsed = uuid.UUID(key["key_ID"])
        assert parsed.version == 4
        assert key["key_ID"] == str(parsed)  # canonical and lowercase
        material = decoded(key)
        assert len(material) == 128
        assert base64.b64encode(material).decode() == key["key"]  # standard alphabet, padded
    assert len(set(key_ids(response.json()))) == 3
    assert len({key["key"] for key in keys}) == 3


@pytest.mark.parametrize(("size", "blocks"), [(64, 1), (256, 1), (264, 2), (8192, 32)])
async def test_any_multiple_of_8_within_bounds(kme: RunningKME, size: int, blocks: int) -> None:
    """Issue item 4, checklist 27: sizes other than key_size work and cost whole pool blocks."""
    before = await kme.stored_blocks()
    response = await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"size": size})
    assert response.status_code == 200, response.text
    assert len(decoded(response.json()["keys"][0])) == size // 8
    assert await kme.stored_blocks() == before - blocks
    assert await kme.pool_rows() == before - blocks
    status = (await kme.client("SAE_A").get(STATUS.format("SAE_B"))).json()
    assert status["stored_key_count"] == before - blocks


async def test_delivered_keys_leave_the_pool(kme: RunningKME) -> None:
    """Item 36: two calls in a row return disjoint keys and stored_key_count falls by number."""
    client = kme.client("SAE_A")
    first = (await client.post(ENC.format("SAE_B"), json={"number": 5})).json()
    second = (await client.post(ENC.format("SAE_B"), json={"number": 5})).json()
    assert not set(key_ids(first)) & set(key_ids(second))
    assert not {k["key"] for k in first["keys"]} & {k["key"] for k in second["keys"]}
    status = (await client.get(STATUS.format("SAE_B"))).json()
    assert status["stored_key_count"] == 1000 - 10
    # Another master gets none of them either.
    third = (await kme.client("SAE_C").post(ENC.format("SAE_B"), json={"number": 5})).json()
    assert not set(key_ids(third)) & (set(key_ids(first)) | set(key_ids(second)))


async def test_dec_keys_post_returns_identical_container_in_requested_order(
    kme: RunningKME,
) -> None:
    """Items 13, 43, 44, 50, 59: the slave, naming the master in the path, gets the same
    keys and IDs, in the order it asked."""
    got = (await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 4})).json()
    wanted = list(reversed(key_ids(got)))
    back = await kme.client("SAE_B").post(
        DEC.format("SAE_A"), json={"key_IDs": [{"key_ID": key_id} for key_id in wanted]}
    )
    assert back.status_code == 200, back.text
    assert key_ids(back.json()) == wanted
    by_id = {key["key_ID"]: key["key"] for key in got["keys"]}
    assert all(key["key"] == by_id[key["key_ID"]] for key in back.json()["keys"])


async def test_dec_keys_get_single_id_matches_case_insensitively(kme: RunningKME) -> None:
    """Items 45, issue item 4: GET ?key_ID= works, and an uppercase key_ID finds the key."""
    got = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()
    upper = key_ids(got)[0].upper()
    back = await kme.client("SAE_B").get(DEC.format("SAE_A"), params={"key_ID": upper})
    assert back.status_code == 200, back.text
    assert back.json() == got


async def test_second_fetch_by_the_same_slave_is_not_found(kme: RunningKME) -> None:
    """Items 48, 52: a key is delivered once per slave; its material is then destroyed."""
    got = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()
    slave = kme.client("SAE_B")
    params = {"key_ID": key_ids(got)[0]}
    assert (await slave.get(DEC.format("SAE_A"), params=params)).status_code == 200
    assert await kme.delivered_rows() == 0
    assert await kme.recipient_rows() == 0
    again = await slave.get(DEC.format("SAE_A"), params=params)
    assert again.status_code == 400
    assert again.json()["message"] == "one or more keys specified are not found on KME"


async def test_an_sae_that_is_no_slave_gets_401_and_changes_nothing(kme: RunningKME) -> None:
    """Items 46, 59: a third SAE gets 401; the rightful slave can still fetch the key."""
    got = (await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 2})).json()
    body = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids(got)]}
    intruder = await kme.client("SAE_C").post(DEC.format("SAE_A"), json=body)
    assert intruder.status_code == 401
    for key in got["keys"]:
        assert key["key"] not in intruder.text
    assert await kme.delivered_rows() == 2
    back = await kme.client("SAE_B").post(DEC.format("SAE_A"), json=body)
    assert back.status_code == 200
    assert back.json() == got


async def test_wrong_master_in_path_is_not_found(kme: RunningKME) -> None:
    """Item 50: a path master other than the key's master means 'not found'; nothing is spent."""
    got = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()
    params = {"key_ID": key_ids(got)[0]}
    wrong = await kme.client("SAE_B").get(DEC.format("SAE_C"), params=params)
    assert wrong.status_code == 400
    assert wrong.json()["message"] == "one or more keys specified are not found on KME"
    right = await kme.client("SAE_B").get(DEC.format("SAE_A"), params=params)
    assert right.json() == got


async def test_multicast_delivers_identical_keys_to_every_slave(kme: RunningKME) -> None:
    """Items 41, 46, 49, 56: additional slaves get the same material; it is destroyed after the last."""
    got = await kme.client("SAE_A").post(
        ENC.format("SAE_B"), json={"number": 2, "additional_slave_SAE_IDs": ["SAE_C", "SAE D/x"]}
    )
    assert got.status_code == 200, got.text
    body = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids(got.json())]}
    for slave in ("SAE_C", "SAE_B"):
        back = await kme.client(slave).post(DEC.format("SAE_A"), json=body)
        assert back.status_code == 200, back.text
        assert back.json() == got.json()
        assert await kme.delivered_rows() == 2  # a slave is still waiting
    last = await kme.client("SAE D/x").post(DEC.format("SAE_A"), json=body)
    assert last.json() == got.json()
    assert await kme.delivered_rows() == 0
    assert await kme.recipient_rows() == 0
    # Every slave has had its copy now: a repeat is 'not found' for each of them.
    again = await kme.client("SAE_C").post(DEC.format("SAE_A"), json=body)
    assert again.status_code == 400


async def test_insufficient_keys_is_503_and_delivers_nothing(make_kme: KMEFactory) -> None:
    """Items 33, 17: asking for more keys than stored is 503 with an Error body, no partial set."""
    async with make_kme(fill=2) as kme:
        client = kme.client("SAE_A")
        response = await client.post(ENC.format("SAE_B"), json={"number": 3})
        assert response.status_code == 503
        assert response.json()["message"] == "insufficient keys available"
        assert await kme.stored_blocks() == 2
        assert await kme.pool_rows() == 2
        assert await kme.delivered_rows() == 0
        # Two keys of double size need four blocks: also too many.
        assert (
            await client.post(ENC.format("SAE_B"), json={"size": 512, "number": 2})
        ).status_code == 503
        ok = await client.post(ENC.format("SAE_B"), json={"number": 2})
        assert ok.status_code == 200
        assert (await client.get(STATUS.format("SAE_B"))).json()["stored_key_count"] == 0


async def test_insufficient_keys_status_is_configurable(make_kme: KMEFactory) -> None:
    """Item 33: integrators who expect 400 for an empty pool can have it."""
    async with make_kme(fill=0, keys={"insufficient_keys_status": 400}) as kme:
        response = await kme.client("SAE_A").get(ENC.format("SAE_B"))
        assert response.status_code == 400
        assert response.json()["message"] == "insufficient keys available"


async def test_size_in_bytes_compatibility_switch(
    kme: RunningKME, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue item 4, clients.md item 2: an SAE flagged as sending bytes gets size*8 bits, logged."""
    quirky = kme.pki.issue("SAE_QURSA", "SAE_QURSA")
    await kme.register("SAE_QURSA", size_unit="bytes")
    caplog.set_level(logging.INFO, logger="kme")
    response = await kme.client(quirky).get(ENC.format("SAE_B"), params={"size": 32})
    assert response.status_code == 200, response.text
    assert len(decoded(response.json()["keys"][0])) == 32
    assert "taken as bytes (256 bits)" in caplog.text
    # Other SAEs keep the spec's bits.
    normal = await kme.client("SAE_A").get(ENC.format("SAE_B"), params={"size": 64})
    assert len(decoded(normal.json()["keys"][0])) == 8


async def test_supported_mandatory_extension_is_honoured(kme: RunningKME) -> None:
    """Items 37, 39: a mandatory extension the KME supports and can meet gives keys."""
    response = await kme.client("SAE_A").post(
        ENC.format("SAE_B"), json={"extension_mandatory": [{"kme_route_type": "direct"}]}
    )
    assert response.status_code == 200, response.text


async def test_key_material_never_reaches_the_logs(
    kme: RunningKME, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 54: with every logger at DEBUG, no delivered key appears in any log record."""
    caplog.set_level(logging.DEBUG)
    got = (await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 3})).json()
    body = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids(got)]}
    await kme.client("SAE_C").post(DEC.format("SAE_A"), json=body)  # 401, logged
    await kme.client("SAE_B").post(DEC.format("SAE_A"), json=body)
    await kme.client("SAE_B").post(DEC.format("SAE_A"), json=body)  # 400, not found
    assert caplog.records
    for key in got["keys"]:
        material = decoded(key)
        for spelling in (key["key"], material.hex(), repr(material)[2:-1]):
            assert spelling not in caplog.text


async def test_status_reports_configured_limits(make_kme: KMEFactory) -> None:
    """Items 24, 25, 27: the spec's example limits (a key_size that is no power of two,
    multicast off) are served as configured, and stored_key_count counts keys of key_size."""
    limits = {
        "key_size": 352,
        "max_key_count": 100_000,
        "max_key_per_request": 128,
        "max_key_size": 1024,
        "min_key_size": 64,
        "max_sae_id_count": 0,
    }
    async with make_kme(keys=limits, fill=25) as kme:
        status = (await kme.client("SAE_A").get(STATUS.format("SAE_B"))).json()
        assert status["key_size"] == 352
        assert status["stored_key_count"] == 25
        assert status["max_key_count"] == 100_000
        assert status["max_key_per_request"] == 128
        assert status["max_key_size"] == 1024
        assert status["min_key_size"] == 64
        assert status["max_SAE_ID_count"] == 0
        got = await kme.client("SAE_A").get(ENC.format("SAE_B"))
        assert len(decoded(got.json()["keys"][0])) == 44


async def test_containers_carry_only_what_the_kme_filled_in(kme: RunningKME) -> None:
    """Items 34, 40: with no extension handled, containers hold `keys` with `key_ID` and
    `key` only; the optional extension members are omitted rather than null."""
    got = (await kme.client("SAE_A").post(ENC.format("SAE_B"), json={"number": 2})).json()
    assert set(got) == {"keys"}
    assert all(set(key) == {"key_ID", "key"} for key in got["keys"])
    back = (
        await kme.client("SAE_B").get(DEC.format("SAE_A"), params={"key_ID": key_ids(got)[0]})
    ).json()
    assert set(back) == {"keys"}
    assert set(back["keys"][0]) == {"key_ID", "key"}


async def test_dec_keys_checks_syntax_then_authorisation_then_existence(kme: RunningKME) -> None:
    """Item 51: a malformed key_ID is 400 even beside a key the caller may not have; a key
    the caller may not have is 401 even beside an unknown key; nothing is spent."""
    got = (await kme.client("SAE_A").get(ENC.format("SAE_B"))).json()
    theirs = key_ids(got)[0]
    unknown = str(uuid.uuid4())
    intruder = kme.client("SAE_C")

    syntax = await intruder.post(
        DEC.format("SAE_A"), json={"key_IDs": [{"key_ID": theirs}, {"key_ID": "non-uuid"}]}
    )
    assert syntax.status_code == 400
    authorisation = await intruder.post(
        DEC.format("SAE_A"), json={"key_IDs": [{"key_ID": unknown}, {"key_ID": theirs}]}
    )
    assert authorisation.status_code == 401
    existence = await kme.client("SAE_B").post(
        DEC.format("SAE_A"), json={"key_IDs": [{"key_ID": theirs}, {"key_ID": unknown}]}
    )
    assert existence.status_code == 400
    assert existence.json()["message"] == "one or more keys specified are not found on KME"
    final = await kme.client("SAE_B").get(DEC.format("SAE_A"), params={"key_ID": theirs})
    assert final.json() == got


async def test_oversized_bodies_are_refused_without_change(kme: RunningKME) -> None:
    """Items 15, 18: a body past the size limit is a 400 in the Error format (never 413)
    and takes no key."""
    before = await kme.stored_blocks()
    padding = "x" * (70 * 1024)
    response = await kme.client("SAE_A").post(
        ENC.format("SAE_B"), content=f'{{"number": 1, "pad": "{padding}"}}'.encode()
    )
    assert response.status_code == 400
    assert "exceeds" in response.json()["message"]
    assert await kme.stored_blocks() == before


async def test_removing_an_sae_destroys_what_it_could_still_fetch(kme: RunningKME) -> None:
    """Issue 2 item 3: keys waiting for an SAE that is unregistered are destroyed, so an SAE
    registered later under the same ID cannot take them; a multicast key stays for its other
    slave."""
    from kme.keys import pool

    solo = (await kme.client("SAE_A").get(ENC.format("SAE_C"))).json()
    shared = (
        await kme.client("SAE_A").post(
            ENC.format("SAE_B"), json={"additional_slave_SAE_IDs": ["SAE_C"]}
        )
    ).json()
    await kme.unregister("SAE_C")
    async with kme.database.session() as session:
        assert await pool.forget_sae(session, "SAE_C") == 1
        await session.commit()
    await kme.register("SAE_C")
    for container in (solo, shared):
        late = await kme.client("SAE_C").get(
            DEC.format("SAE_A"), params={"key_ID": key_ids(container)[0]}
        )
        assert late.status_code in (400, 401)
    kept = await kme.client("SAE_B").get(DEC.format("SAE_A"), params={"key_ID": key_ids(shared)[0]})
    assert kept.json() == shared
    assert await kme.delivered_rows() == 0
