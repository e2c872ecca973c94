"""Validation: every kind of bad input gets the spec's Error and changes nothing.

Each table below is one kind of bad input (checklist items 11, 12, 21, 26, 30 to 32, 37,
38, 42, 45, 47, 50, 57). Every case runs as a subtest against one real KME per test (real
uvicorn, real mutual TLS), through a fresh connection, and proves three things:

* the status code is the expected one (never 422) and the body is the spec's Error
  (items 6, 19): `Content-Type: application/json`, a string `message`, and `details`, when
  present, a list of objects; mandated messages are compared byte for byte (item 21);
* the pool is untouched: stored blocks, pool rows, delivered keys and their recipients
  are the same before and after the request;
* where a table has a valid counterpart, a control request without the defect
  succeeds afterwards, so the 400s are due to the defects and not to the setup.

Cases run as subtests (pytest >= 9) rather than separate parametrized tests: one KME per
test keeps the module fast on both databases.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.kmetest import RunningKME

KMEFactory = Callable[..., AbstractAsyncContextManager[RunningKME]]

# The spec's mandated strings (item 21), written out here so a paraphrase in kme/ fails.
MULTIPLE_OF_8 = "size shall be a multiple of 8"
MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MANDATORY_UNMET = "not all extension_mandatory request options could be met"
OPTIONAL_UNHANDLED = "not all extension_optional request options handled"
NOT_FOUND = "one or more keys specified are not found on KME"

KEYS = "/api/v1/keys"
STATUS = f"{KEYS}/SAE_B/status"
ENC = f"{KEYS}/SAE_B/enc_keys"  # called by SAE_A
DEC = f"{KEYS}/SAE_A/dec_keys"  # called by SAE_B
KEY_BYTES = 256 // 8  # the harness's default key_size, in bytes

NO_BODY: Any = object()


@dataclass(frozen=True)
class Case:
    """One request that must fail: `body` is JSON-serialised unless it is bytes."""

    id: str
    method: str
    url: str
    body: Any = NO_BODY
    status: int = 400
    message: str | None = None
    details: list[dict[str, Any]] | None = None


# -- helpers -----------------------------------------------------------------------------


async def snapshot(kme: RunningKME) -> dict[str, int]:
    """The pool's state: what any accepted request would change."""
    return {
        "stored_blocks": await kme.stored_blocks(),
        "pool_rows": await kme.pool_rows(),
        "delivered_rows": await kme.delivered_rows(),
        "recipient_rows": await kme.recipient_rows(),
    }


async def send(
    kme: RunningKME, caller: str, method: str, url: str, body: Any = NO_BODY
) -> httpx.Response:
    """One request on a fresh connection, so no case can disturb the next one."""
    client = kme.client(caller)
    try:
        if body is NO_BODY:
            return await client.request(method, url)
        # json.dumps escapes lone surrogates (ensure_ascii), which httpx's json= cannot send.
        content = body if isinstance(body, bytes) else json.dumps(body).encode("ascii")
        return await client.request(
            method, url, content=content, headers={"Content-Type": "application/json"}
        )
    finally:
        await client.aclose()


def assert_error(
    response: httpx.Response,
    status: int,
    message: str | None = None,
    details: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The response is `status` with the spec's Error body (items 6, 19, 21)."""
    assert response.status_code != 422, response.text
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    content_type = response.headers.get("content-type", "")
    assert content_type.split(";")[0].strip() == "application/json", content_type
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) <= {"message", "details"}, body
    assert isinstance(body.get("message"), str), body
    assert body["message"], body
    if "details" in body:
        assert isinstance(body["details"], list), body
        assert all(isinstance(entry, dict) for entry in body["details"]), body
    if message is not None:
        assert body["message"] == message
    if details is not None:
        assert body.get("details") == details
    return body


async def expect_rejected(
    kme: RunningKME, caller: str, case: Case, *, secrets: Sequence[str] = ()
) -> dict[str, Any]:
    """Send `case` as `caller`: it fails as expected and leaves the pool as it was."""
    before = await snapshot(kme)
    response = await send(kme, caller, case.method, case.url, case.body)
    after = await snapshot(kme)
    body = assert_error(response, case.status, case.message, case.details)
    for secret in secrets:
        assert secret not in response.text, "key material in an error body (item 54)"
    assert after == before, "a rejected request changed the key pool"
    return body


async def run_cases(
    kme: RunningKME,
    subtests: pytest.Subtests,
    caller: str,
    cases: Sequence[Case],
    *,
    secrets: Sequence[str] = (),
) -> None:
    ids = [case.id for case in cases]
    assert len(set(ids)) == len(ids), "case ids must be unique"
    for case in cases:
        with subtests.test(case.id):
            await expect_rejected(kme, caller, case, secrets=secrets)


async def take_keys(kme: RunningKME, number: int = 1) -> list[dict[str, str]]:
    """SAE_A takes `number` keys for SAE_B."""
    response = await send(kme, "SAE_A", "POST", ENC, {"number": number})
    assert response.status_code == 200, response.text
    keys: list[dict[str, str]] = response.json()["keys"]
    return keys


async def expect_one_default_key(
    kme: RunningKME, caller: str, method: str, url: str, body: Any = NO_BODY
) -> dict[str, Any]:
    """The request succeeds with one key of key_size bits and takes one key from the pool."""
    before = await kme.stored_blocks()
    response = await send(kme, caller, method, url, body)
    assert response.status_code == 200, response.text
    container = response.json()
    assert len(container["keys"]) == 1, container
    assert len(base64.b64decode(container["keys"][0]["key"])) == KEY_BYTES
    assert await kme.stored_blocks() == before - 1
    result: dict[str, Any] = container
    return result


# -- Get key: number and size ------------------------------------------------------------

GET_ENC_QUERIES: list[tuple[str, str, str | None]] = [
    ("size-0", "size=0", None),
    ("size-minus-8", "size=-8", None),
    ("size-abc01", "size=abc01", None),
    ("size-100", "size=100", MULTIPLE_OF_8),
    ("size-260", "size=260", MULTIPLE_OF_8),
    ("size-below-min", "size=56", None),
    ("size-above-max", "size=8200", None),
    ("size-float", "size=256.0", None),
    ("size-exponent", "size=2.56e2", None),
    ("size-hex", "size=0x100", None),
    ("size-plus-sign", "size=%2B256", None),
    ("size-leading-space", "size=%20256", None),
    ("size-arabic-indic-digits", "size=%D9%A2%D9%A5%D9%A6", None),
    ("size-empty", "size=", None),
    ("size-bare", "size", None),
    ("number-0", "number=0", None),
    ("number-minus-8", "number=-8", None),
    ("number-abc01", "number=abc01", None),
    ("number-over-max", "number=129", None),
    ("number-3.0", "number=3.0", None),
    ("number-space-3", "number=%203", None),
    ("number-3-space", "number=3%20", None),
    ("number-empty", "number=", None),
    ("number-huge", "number=99999999999999999999999", None),
    ("number-true", "number=true", None),
    ("number-fine-size-100", "number=2&size=100", MULTIPLE_OF_8),
    ("unknown-parameter", "count=3", None),
    ("wrong-case-parameter", "Number=3", None),
    ("additional-slaves-as-query", "additional_slave_SAE_IDs=SAE_C", None),
    ("extension-as-query", "extension_mandatory=kme_route_type", None),
    ("repeated-number", "number=1&number=1", None),
    ("repeated-size", "size=256&size=256", None),
]


async def test_get_enc_keys_bad_query(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 30, 31, 32, 57, 21: GET enc_keys refuses every bad `number`/`size` query
    (zero, negative, non-integer text such as "3.0" or " 3", out of range, unknown or
    repeated parameters) with 400 and changes nothing; a size that is not a multiple of 8
    gets exactly "size shall be a multiple of 8"."""
    cases = [
        Case(name, "GET", f"{ENC}?{query}", message=msg) for name, query, msg in GET_ENC_QUERIES
    ]
    await run_cases(kme, subtests, "SAE_A", cases)
    await expect_one_default_key(kme, "SAE_A", "GET", f"{ENC}?number=1&size=256")


POST_ENC_BODIES: list[tuple[str, dict[str, Any], str | None]] = [
    ("size-0", {"size": 0}, None),
    ("size-minus-8", {"size": -8}, None),
    ("size-abc01", {"size": "abc01"}, None),
    ("size-string-8", {"size": "8"}, None),
    ("size-string-256", {"size": "256"}, None),
    ("size-3.5", {"size": 3.5}, None),
    ("size-true", {"size": True}, None),
    ("size-false", {"size": False}, None),
    ("size-array", {"size": [256]}, None),
    ("size-object", {"size": {"bits": 256}}, None),
    ("size-100", {"size": 100}, MULTIPLE_OF_8),
    ("size-260", {"size": 260}, MULTIPLE_OF_8),
    ("size-below-min", {"size": 56}, None),
    ("size-above-max", {"size": 8200}, None),
    ("size-huge", {"size": 8 * 10**30}, None),
    ("number-0", {"number": 0}, None),
    ("number-minus-8", {"number": -8}, None),
    ("number-abc01", {"number": "abc01"}, None),
    ("number-string-3", {"number": "3"}, None),
    ("number-3.5", {"number": 3.5}, None),
    ("number-true", {"number": True}, None),
    ("number-array", {"number": [1]}, None),
    ("number-object", {"number": {"n": 1}}, None),
    ("number-over-max", {"number": 129}, None),
    ("number-huge", {"number": 10**30}, None),
    ("number-fine-size-100", {"number": 2, "size": 100}, MULTIPLE_OF_8),
]


async def test_post_enc_keys_bad_number_and_size(
    kme: RunningKME, subtests: pytest.Subtests
) -> None:
    """Items 29, 31, 32, 57, 21: POST enc_keys refuses every bad `number`/`size` (zero,
    negative, strings such as "8", fractions, booleans, out of range) with 400 and changes
    nothing; a size that is not a multiple of 8 gets exactly
    "size shall be a multiple of 8"."""
    cases = [Case(name, "POST", ENC, body, message=msg) for name, body, msg in POST_ENC_BODIES]
    await run_cases(kme, subtests, "SAE_A", cases)
    await expect_one_default_key(kme, "SAE_A", "POST", ENC, {"number": 1, "size": 256})


# -- Get key: additional_slave_SAE_IDs ---------------------------------------------------

EXTRA_SAES = [f"SAE_M{i}" for i in range(1, 9)]  # with SAE_C: nine valid slaves, max is 8

ADDITIONAL_SLAVES: list[tuple[str, Any]] = [
    ("empty-array", []),
    ("blank-entry", ["  "]),
    ("empty-entry", [""]),
    ("tab-entry", ["\t"]),
    ("blank-after-valid", ["SAE_C", "  "]),
    ("duplicates", ["SAE_C", "SAE_C"]),
    ("duplicates-with-space-in-id", ["SAE D/x", "SAE D/x"]),
    ("path-slave", ["SAE_B"]),
    ("path-slave-after-valid", ["SAE_C", "SAE_B"]),
    ("calling-master", ["SAE_A"]),
    ("more-than-max", ["SAE_C", *EXTRA_SAES]),
    ("unknown-sae", ["SAE_NOBODY"]),
    ("unknown-after-valid", ["SAE_C", "SAE_NOBODY"]),
    ("wrong-case-sae", ["sae_c"]),
    ("nul-in-id", ["SAE\u0000"]),
    ("lone-surrogate", ["\ud800"]),
    ("integer-entry", [1]),
    ("null-entry", [None]),
    ("boolean-entry", [True]),
    ("float-entry", [1.5]),
    ("array-entry", [["SAE_C"]]),
    ("object-entry", [{"SAE_ID": "SAE_C"}]),
    ("string-not-array", "SAE_C"),
    ("object-not-array", {"SAE_C": True}),
    ("number-not-array", 1),
]


async def test_additional_slave_sae_ids_rejected(
    kme: RunningKME, subtests: pytest.Subtests
) -> None:
    """Items 42, 57, 41: additional_slave_SAE_IDs that is empty, holds a blank, duplicate,
    unknown or non-string entry, repeats the path slave or names the calling master, or
    has more entries than max_SAE_ID_count, gets 400 with an Error body and changes
    nothing. Eight valid entries (exactly max_SAE_ID_count) are accepted."""
    for sae_id in EXTRA_SAES:
        await kme.register(sae_id)
    cases = [
        Case(name, "POST", ENC, {"additional_slave_SAE_IDs": ids})
        for name, ids in ADDITIONAL_SLAVES
    ]
    await run_cases(kme, subtests, "SAE_A", cases)
    await expect_one_default_key(kme, "SAE_A", "POST", ENC, {"additional_slave_SAE_IDs": ["SAE_C"]})
    await expect_one_default_key(
        kme, "SAE_A", "POST", ENC, {"additional_slave_SAE_IDs": EXTRA_SAES}
    )


async def test_additional_slaves_when_multicast_is_off(
    make_kme: KMEFactory, subtests: pytest.Subtests
) -> None:
    """Items 41, 42: with max_sae_id_count = 0 any additional_slave_SAE_IDs entry gets 400
    and changes nothing, while Status says max_SAE_ID_count 0 and a plain request works."""
    async with make_kme(keys={"max_sae_id_count": 0}, fill=10) as kme:
        status = await send(kme, "SAE_A", "GET", STATUS)
        assert status.status_code == 200, status.text
        assert status.json()["max_SAE_ID_count"] == 0
        cases = [
            Case("one-entry", "POST", ENC, {"additional_slave_SAE_IDs": ["SAE_C"]}),
            Case("two-entries", "POST", ENC, {"additional_slave_SAE_IDs": ["SAE_C", "SAE D/x"]}),
            Case("empty-array", "POST", ENC, {"additional_slave_SAE_IDs": []}),
        ]
        await run_cases(kme, subtests, "SAE_A", cases)
        await expect_one_default_key(kme, "SAE_A", "POST", ENC, {"number": 1})


# -- SAE IDs in the path -----------------------------------------------------------------

BAD_PATH_SAES: list[tuple[str, str]] = [
    ("blank-space", "%20"),
    ("blank-spaces", "%20%20%20"),
    ("blank-tab", "%09"),
    ("blank-no-break-space", "%C2%A0"),
    ("master-equals-slave", "SAE_A"),
    ("unknown-slave", "SAE_NOBODY"),
    ("wrong-case-slave", "sae_b"),
    ("invalid-utf8", "%FF"),
    ("encoded-surrogate", "%ED%A0%80"),
    ("nul-in-id", "SAE%00"),
]


@pytest.mark.parametrize(
    ("method", "route"),
    [("GET", "status"), ("GET", "enc_keys"), ("POST", "enc_keys")],
    ids=["status", "get-enc_keys", "post-enc_keys"],
)
async def test_bad_slave_in_path(
    kme: RunningKME, subtests: pytest.Subtests, method: str, route: str
) -> None:
    """Items 7, 10, 26, 57: a blank slave SAE ID in the path, the caller's own ID
    (master == slave), an unknown SAE, or a segment that is not percent-encoded UTF-8
    gets 400 with an Error body on status and on both forms of enc_keys, and changes
    nothing."""
    body = {} if method == "POST" else NO_BODY
    cases = [
        Case(name, method, f"{KEYS}/{segment}/{route}", body) for name, segment in BAD_PATH_SAES
    ]
    await run_cases(kme, subtests, "SAE_A", cases)
    control = await send(kme, "SAE_A", method, f"{KEYS}/SAE_B/{route}", body)
    assert control.status_code == 200, control.text


# -- Get key: extensions -----------------------------------------------------------------


def _unsupported(*names: str) -> list[dict[str, Any]]:
    return [{"extension_mandatory_unsupported": f"{name} is not supported"} for name in names]


EXTENSION_CASES: list[Case] = [
    Case(
        "mandatory-unsupported",
        "POST",
        ENC,
        {"extension_mandatory": [{"abc_route_type": "direct"}]},
        message=MANDATORY_UNSUPPORTED,
        details=_unsupported("abc_route_type"),
    ),
    Case(
        "mandatory-unsupported-beside-supported",
        "POST",
        ENC,
        {"extension_mandatory": [{"kme_route_type": "direct"}, {"abc_route_type": "direct"}]},
        message=MANDATORY_UNSUPPORTED,
        details=_unsupported("abc_route_type"),
    ),
    Case(
        "mandatory-two-unsupported-in-one-entry",
        "POST",
        ENC,
        {"extension_mandatory": [{"abc_transfer_method": "qkd", "abc_max_age": 30000}]},
        message=MANDATORY_UNSUPPORTED,
        details=_unsupported("abc_transfer_method", "abc_max_age"),
    ),
    Case(
        "mandatory-unsupported-wins-over-unmet",
        "POST",
        ENC,
        {"extension_mandatory": [{"kme_route_type": "indirect"}, {"abc_max_age": 30000}]},
        message=MANDATORY_UNSUPPORTED,
        details=_unsupported("abc_max_age"),
    ),
    Case(
        # A lone surrogate cannot be carried in UTF-8: the body is refused as JSON.
        "mandatory-lone-surrogate-name",
        "POST",
        ENC,
        {"extension_mandatory": [{"\ud800": 1}]},
        message="request body is not valid JSON in UTF-8",
    ),
    *(
        Case(
            f"mandatory-unmet-{label}",
            "POST",
            ENC,
            {"extension_mandatory": [{"kme_route_type": value}]},
            message=MANDATORY_UNMET,
        )
        for label, value in [
            ("indirect", "indirect"),
            ("uppercase-direct", "DIRECT"),
            ("null", None),
            ("number", 1),
            ("array", ["direct"]),
        ]
    ),
    Case("mandatory-string", "POST", ENC, {"extension_mandatory": "kme_route_type"}),
    Case("mandatory-object", "POST", ENC, {"extension_mandatory": {"kme_route_type": "direct"}}),
    Case("mandatory-number-entry", "POST", ENC, {"extension_mandatory": [1]}),
    Case("mandatory-string-entry", "POST", ENC, {"extension_mandatory": ["kme_route_type"]}),
    Case("mandatory-null-entry", "POST", ENC, {"extension_mandatory": [None]}),
    Case("optional-string", "POST", ENC, {"extension_optional": "abc_route_type"}),
    Case("optional-number-entry", "POST", ENC, {"extension_optional": [1]}),
]


async def test_extension_mandatory_rejected(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 37, 21, 20: an unsupported extension_mandatory parameter gets exactly
    "not all extension_mandatory parameters are supported" with details naming each one
    (`abc_route_type is not supported`), even beside an unmeetable one; a supported but
    unmeetable one (kme_route_type other than "direct") gets exactly
    "not all extension_mandatory request options could be met"; malformed extension
    lists get 400. Nothing changes."""
    await run_cases(kme, subtests, "SAE_A", EXTENSION_CASES)


async def test_extensions_accepted(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 37, 38: a meetable mandatory extension ({"kme_route_type": "direct"}), an
    empty or null list, and any extension_optional (by default ignored) give 200 with one
    key of key_size."""
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("mandatory-direct", {"extension_mandatory": [{"kme_route_type": "direct"}]}),
        ("mandatory-empty", {"extension_mandatory": []}),
        ("mandatory-null", {"extension_mandatory": None}),
        ("optional-unsupported", {"extension_optional": [{"abc_route_type": "direct"}]}),
        ("optional-unmeetable", {"extension_optional": [{"kme_route_type": "indirect"}]}),
        ("optional-empty", {"extension_optional": []}),
        (
            "both",
            {
                "extension_mandatory": [{"kme_route_type": "direct"}],
                "extension_optional": [{"abc_max_age": 30000}, {"abc_transfer_method": "qkd"}],
            },
        ),
    ]
    for name, body in bodies:
        with subtests.test(name):
            await expect_one_default_key(kme, "SAE_A", "POST", ENC, body)


async def test_strict_optional_extensions(make_kme: KMEFactory, subtests: pytest.Subtests) -> None:
    """Items 38, 21: with strict_optional_extensions an extension_optional the KME does not
    act on (unknown, or kme_route_type "indirect") gets 400 with exactly
    "not all extension_optional request options handled" and changes nothing; one it
    handles ({"kme_route_type": "direct"}) and an empty list still give 200."""
    async with make_kme(keys={"strict_optional_extensions": True}, fill=10) as kme:
        cases = [
            Case(
                "optional-unsupported",
                "POST",
                ENC,
                {"extension_optional": [{"abc_route_type": "direct"}]},
                message=OPTIONAL_UNHANDLED,
            ),
            Case(
                "optional-unmeetable",
                "POST",
                ENC,
                {"extension_optional": [{"kme_route_type": "indirect"}]},
                message=OPTIONAL_UNHANDLED,
            ),
            Case(
                "optional-handled-beside-unsupported",
                "POST",
                ENC,
                {"extension_optional": [{"kme_route_type": "direct"}, {"abc_max_age": 30000}]},
                message=OPTIONAL_UNHANDLED,
            ),
        ]
        await run_cases(kme, subtests, "SAE_A", cases)
        for body in (
            {"extension_optional": [{"kme_route_type": "direct"}]},
            {"extension_optional": []},
        ):
            await expect_one_default_key(kme, "SAE_A", "POST", ENC, body)


# -- Get key with key IDs ----------------------------------------------------------------


def _dec_cases(real: str, unknown: str) -> list[Case]:
    """Bad dec_keys requests from SAE_B for SAE_A's key `real` (and a never-issued UUID)."""
    q = f"{DEC}?key_ID="
    entry = {"key_ID": real}
    too_many = [{"key_ID": str(uuid.uuid4())} for _ in range(129)]
    return [
        # GET form (item 45): exactly one key_ID parameter, by that exact name, a UUID.
        Case("get-non-uuid", "GET", f"{q}non-uuid"),
        Case("get-empty-key-id", "GET", q),
        Case("get-no-hyphens", "GET", q + real.replace("-", "")),
        Case("get-braces", "GET", f"{q}%7B{real}%7D"),
        Case("get-urn", "GET", f"{q}urn:uuid:{real}"),
        Case("get-trailing-space", "GET", f"{q}{real}%20"),
        Case("get-nul", "GET", f"{q}%00"),
        Case("get-no-query", "GET", DEC),
        Case("get-lowercase-name", "GET", f"{DEC}?key_id={real}"),
        Case("get-uppercase-name", "GET", f"{DEC}?KEY_ID={real}"),
        Case("get-plural-name", "GET", f"{DEC}?key_IDs={real}"),
        Case("get-repeated", "GET", f"{q}{real}&key_ID={real}"),
        Case("get-two-ids", "GET", f"{q}{real}&key_ID={unknown}"),
        Case("get-extra-parameter", "GET", f"{q}{real}&number=1"),
        Case("get-unknown-uuid", "GET", q + unknown, message=NOT_FOUND),
        Case("get-wrong-master", "GET", f"{KEYS}/SAE_C/dec_keys?key_ID={real}", message=NOT_FOUND),
        Case(
            "get-unknown-master",
            "GET",
            f"{KEYS}/SAE_NOBODY/dec_keys?key_ID={real}",
            message=NOT_FOUND,
        ),
        Case("get-caller-is-master", "GET", f"{KEYS}/SAE_B/dec_keys?key_ID={real}"),
        Case("get-blank-master", "GET", f"{KEYS}/%20/dec_keys?key_ID={real}"),
        Case("get-invalid-utf8-master", "GET", f"{KEYS}/%FF/dec_keys?key_ID={real}"),
        # POST form (item 44).
        Case("post-non-uuid", "POST", DEC, {"key_IDs": [{"key_ID": "non-uuid"}]}),
        Case("post-duplicates", "POST", DEC, {"key_IDs": [entry, entry]}),
        Case(
            "post-duplicates-differing-case",
            "POST",
            DEC,
            {"key_IDs": [entry, {"key_ID": real.upper()}]},
        ),
        Case("post-empty-array", "POST", DEC, {"key_IDs": []}),
        Case("post-empty-object", "POST", DEC, {}),
        Case("post-no-body", "POST", DEC),
        Case("post-empty-body", "POST", DEC, b""),
        Case("post-whitespace-body", "POST", DEC, b" \r\n"),
        Case("post-key-ids-null", "POST", DEC, {"key_IDs": None}),
        Case("post-key-ids-string", "POST", DEC, {"key_IDs": real}),
        Case("post-key-ids-object", "POST", DEC, {"key_IDs": entry}),
        Case("post-string-entries", "POST", DEC, {"key_IDs": [real]}),
        Case("post-key-id-number", "POST", DEC, {"key_IDs": [{"key_ID": 123}]}),
        Case("post-key-id-null", "POST", DEC, {"key_IDs": [{"key_ID": None}]}),
        Case("post-entry-without-key-id", "POST", DEC, {"key_IDs": [{}]}),
        Case("post-lowercase-member", "POST", DEC, {"key_IDs": [{"key_id": real}]}),
        Case(
            "post-key-ids-extension-string",
            "POST",
            DEC,
            {"key_IDs": [entry], "key_IDs_extension": "x"},
        ),
        Case(
            "post-key-id-extension-string",
            "POST",
            DEC,
            {"key_IDs": [{"key_ID": real, "key_ID_extension": "x"}]},
        ),
        Case("post-more-than-max-key-per-request", "POST", DEC, {"key_IDs": too_many}),
        Case(
            "post-unknown-uuid",
            "POST",
            DEC,
            {"key_IDs": [{"key_ID": unknown}]},
            message=NOT_FOUND,
        ),
        Case(
            "post-real-then-unknown",
            "POST",
            DEC,
            {"key_IDs": [entry, {"key_ID": unknown}]},
            message=NOT_FOUND,
        ),
        Case(
            "post-wrong-master",
            "POST",
            f"{KEYS}/SAE_C/dec_keys",
            {"key_IDs": [entry]},
            message=NOT_FOUND,
        ),
        Case("post-caller-is-master", "POST", f"{KEYS}/SAE_B/dec_keys", {"key_IDs": [entry]}),
        Case("post-blank-master", "POST", f"{KEYS}/%20/dec_keys", {"key_IDs": [entry]}),
        Case("post-with-query", "POST", f"{q}{real}", {"key_IDs": [entry]}),
    ]


async def test_dec_keys_rejected(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 44, 45, 47, 50, 57, 54: dec_keys refuses a key_ID that is not a UUID, a
    missing, empty, repeated or wrongly named (`key_id`) key_ID, malformed Key IDs
    bodies, duplicates, a path naming the caller or a blank ID, with 400; unknown UUIDs
    and a wrong path master get exactly "one or more keys specified are not found on KME".
    Nothing changes, no error carries the key, and the slave still gets the key after."""
    (issued,) = await take_keys(kme)
    real, material = issued["key_ID"], issued["key"]
    await run_cases(kme, subtests, "SAE_B", _dec_cases(real, str(uuid.uuid4())), secrets=[material])
    # The master itself may not collect through its own ID either (item 50).
    master_cases = [
        Case("master-get", "GET", f"{DEC}?key_ID={real}"),
        Case("master-post", "POST", DEC, {"key_IDs": [{"key_ID": real}]}),
    ]
    await run_cases(kme, subtests, "SAE_A", master_cases, secrets=[material])
    got = await send(kme, "SAE_B", "GET", f"{DEC}?key_ID={real}")
    assert got.status_code == 200, got.text
    assert got.json() == {"keys": [issued]}


@pytest.mark.parametrize("real_first", [True, False], ids=["real-first", "unknown-first"])
async def test_dec_keys_all_or_nothing(kme: RunningKME, real_first: bool) -> None:
    """Items 47, 54: a request for one real and one unknown key gets 400 with exactly
    "one or more keys specified are not found on KME", no partial container and no key
    material in the error; nothing is delivered, so the real key is still fetchable."""
    (issued,) = await take_keys(kme)
    entries = [{"key_ID": issued["key_ID"]}, {"key_ID": str(uuid.uuid4())}]
    if not real_first:
        entries.reverse()
    before = await snapshot(kme)
    response = await send(kme, "SAE_B", "POST", DEC, {"key_IDs": entries})
    assert_error(response, 400, NOT_FOUND)
    assert "keys" not in response.json()
    assert issued["key"] not in response.text
    assert base64.b64decode(issued["key"]).hex() not in response.text
    assert await snapshot(kme) == before
    got = await send(kme, "SAE_B", "POST", DEC, {"key_IDs": [{"key_ID": issued["key_ID"]}]})
    assert got.status_code == 200, got.text
    assert got.json() == {"keys": [issued]}


# -- bodies and query strings ------------------------------------------------------------


def _bad_bodies(valid: dict[str, Any]) -> dict[str, bytes]:
    """Bodies that are not a JSON object in UTF-8; `valid` would be accepted as such."""
    text = json.dumps(valid)
    return {
        "not-json": b"not json",
        "json-array": f"[{text}]".encode(),
        "json-string": json.dumps(text).encode(),
        "json-number": b"42",
        "json-null": b"null",
        "json-true": b"true",
        "single-quotes": text.replace('"', "'").encode(),
        "truncated": text[:-1].encode(),
        "trailing-garbage": f"{text} x".encode(),
        "comment": f"{text[:-1]} /* c */}}".encode(),
        "invalid-utf8": b"\xff\xfe\xfd",
        "invalid-utf8-in-string": text[:-1].encode() + b', "x": "\xff"}',
        "nan-literal": f'{text[:-1]}, "x": NaN}}'.encode(),
        "infinity-literal": f'{text[:-1]}, "x": -Infinity}}'.encode(),
        "utf16-with-bom": text.encode("utf-16"),
        "utf16le-without-bom": text.encode("utf-16-le"),
        "utf32": text.encode("utf-32"),
        "huge-integer-literal": b'{"x": ' + b"1" * 5000 + b"}",
        "deep-nesting": b'{"x": ' + b"[" * 100_000,
        # Which value would win is up to the parser: refuse rather than guess.
        "repeated-member": b'{"x": 1, "x": 2}',
    }


@pytest.mark.parametrize("route", ["enc_keys", "dec_keys"])
async def test_malformed_bodies(kme: RunningKME, subtests: pytest.Subtests, route: str) -> None:
    """Items 6, 15, 19: a POST body that is not a JSON object in UTF-8 (not JSON, an
    array, a string, invalid UTF-8, UTF-16/32, NaN, truncated, nested too deep, a number
    too long to convert) gets 400 with an Error body (never 422 or 503) on both POST
    routes, and changes nothing. The same object sent as UTF-8 JSON is accepted.

    On dec_keys each case asks for a key of its own, so a body wrongly accepted by one
    case cannot turn the next case's answer into "not found"."""
    caller, url = ("SAE_A", ENC) if route == "enc_keys" else ("SAE_B", DEC)

    async def valid_body() -> tuple[dict[str, Any], list[str]]:
        if route == "enc_keys":
            return {"number": 1}, []
        (issued,) = await take_keys(kme)
        return {"key_IDs": [{"key_ID": issued["key_ID"]}]}, [issued["key"]]

    for name in _bad_bodies({}):
        with subtests.test(name):
            valid, secrets = await valid_body()
            case = Case(name, "POST", url, _bad_bodies(valid)[name])
            await expect_rejected(kme, caller, case, secrets=secrets)
    with subtests.test("control"):
        valid, _ = await valid_body()
        control = await send(kme, caller, "POST", url, valid)
        assert control.status_code == 200, control.text


async def test_default_requests(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 29, 30, 58, clients.md 5: GET without a query, a POST without a body, with
    an empty or whitespace body, `{}`, explicit nulls, or unknown members are default
    requests: 200 with exactly one key of key_size bits."""
    requests: list[tuple[str, str, Any]] = [
        ("get-no-query", "GET", NO_BODY),
        ("post-no-body", "POST", NO_BODY),
        ("post-empty-body", "POST", b""),
        ("post-whitespace-body", "POST", b" \r\n\t"),
        ("post-empty-object", "POST", {}),
        (
            "post-explicit-nulls",
            "POST",
            {
                "number": None,
                "size": None,
                "additional_slave_SAE_IDs": None,
                "extension_mandatory": None,
                "extension_optional": None,
            },
        ),
        ("post-unknown-members", "POST", {"abc_vendor": {"x": 1}, "master_SAE_ID": "SAE_A"}),
    ]
    for name, method, body in requests:
        with subtests.test(name):
            await expect_one_default_key(kme, "SAE_A", method, ENC, body)


async def test_dec_keys_ignores_unknown_members(kme: RunningKME) -> None:
    """clients.md items 3, 5 (item 44): a `master_SAE_ID` member inside a key_IDs entry
    and unknown top-level members are ignored (200), and an uppercase key_ID is the
    same key."""
    first, second = await take_keys(kme, 2)
    body = {
        "key_IDs": [{"key_ID": first["key_ID"], "master_SAE_ID": "SAE_A", "abc_x": [1]}],
        "abc_vendor": True,
    }
    got = await send(kme, "SAE_B", "POST", DEC, body)
    assert got.status_code == 200, got.text
    assert got.json() == {"keys": [first]}
    got = await send(kme, "SAE_B", "GET", f"{DEC}?key_ID={second['key_ID'].upper()}")
    assert got.status_code == 200, got.text
    assert got.json() == {"keys": [second]}


async def test_query_parameters_rejected(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 22, 30: query parameters on a POST (which carries its request in the body)
    and any query parameter on status get 400 with an Error body and change nothing."""
    cases = [
        Case("post-enc-number-query", "POST", f"{ENC}?number=2", {}),
        Case("post-enc-size-query", "POST", f"{ENC}?size=256", {"number": 1}),
        Case("post-enc-no-body-query", "POST", f"{ENC}?number=1"),
        Case("post-enc-unknown-query", "POST", f"{ENC}?foo=bar", {}),
        Case("status-number", "GET", f"{STATUS}?number=1"),
        Case("status-unknown", "GET", f"{STATUS}?foo=bar"),
        Case("status-bare", "GET", f"{STATUS}?foo"),
    ]
    await run_cases(kme, subtests, "SAE_A", cases)


# -- paths and methods outside the API ---------------------------------------------------

UNKNOWN_PATHS = [
    f"{KEYS}/SAE_B/STATUS",
    f"{KEYS}/SAE_B/Status",
    "/api/V1/keys/SAE_B/status",
    "/API/v1/keys/SAE_B/status",
    "/api/v1/Keys/SAE_B/enc_keys",
    f"{KEYS}/SAE_B/ENC_KEYS",
    f"{KEYS}/SAE_B/enc_Keys",
    f"{KEYS}/SAE_A/Dec_keys",
    "/api/v2/keys/SAE_B/status",
    "/api/v1/key/SAE_B/status",
    f"{KEYS}/SAE_B",
    f"{KEYS}/SAE_B/status/extra",
    f"{KEYS}/SAE_B/status/",
    f"{KEYS}/SAE_B/enc_keys/",
    f"{KEYS}//status",
    f"{KEYS}/SAE_B/keys",
    "/",
]


async def test_unknown_paths(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Items 10, 11, 12: any path other than the three (wrong case in `v1`, `keys`,
    `status`, `enc_keys`, `dec_keys`; missing or extra segments; a trailing slash) gets
    404 with an Error body, for GET and POST, and changes nothing."""
    cases = [
        Case(f"{method} {path}", method, path, {} if method == "POST" else NO_BODY, status=404)
        for path in UNKNOWN_PATHS
        for method in ("GET", "POST")
    ]
    await run_cases(kme, subtests, "SAE_A", cases)


WRONG_METHODS: list[tuple[str, str, set[str]]] = [
    ("POST", STATUS, {"GET"}),
    ("PUT", STATUS, {"GET"}),
    ("DELETE", STATUS, {"GET"}),
    ("PUT", ENC, {"GET", "POST"}),
    ("PATCH", ENC, {"GET", "POST"}),
    ("DELETE", ENC, {"GET", "POST"}),
    ("DELETE", DEC, {"GET", "POST"}),
    ("PUT", DEC, {"GET", "POST"}),
    ("PATCH", DEC, {"GET", "POST"}),
]


async def test_wrong_methods(kme: RunningKME, subtests: pytest.Subtests) -> None:
    """Item 12: a method the route does not take (POST on status, PUT/PATCH/DELETE on
    enc_keys and dec_keys) gets 405 with an Error body and an Allow header listing the
    route's methods, and changes nothing."""
    for method, url, allowed in WRONG_METHODS:
        with subtests.test(f"{method} {url}"):
            before = await snapshot(kme)
            response = await send(kme, "SAE_A", method, url)
            assert_error(response, 405)
            assert await snapshot(kme) == before
            assert "allow" in response.headers
            offered = {m.strip() for m in response.headers["allow"].split(",") if m.strip()}
            assert allowed <= offered, f"Allow: {response.headers['allow']!r}"
            assert method not in offered
