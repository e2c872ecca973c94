"""The three ETSI GS QKD 014 endpoints (§5.1 T2): parse, authenticate, delegate. Thin.

Bodies and query strings are parsed here, by hand, so that every malformed request is a
400 in the spec's Error format (never FastAPI's 422), and so that query integers are
read strictly ("3.0" and " 3" are not integers).
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar
from urllib.parse import unquote

from fastapi import APIRouter, Request
from pydantic import BaseModel, ValidationError

from kme.deps import CallerDep, KeyServiceDep, SessionDep
from kme.errors import BadRequest
from kme.keys.schemas import Error, KeyContainer, KeyIDs, KeyRequest, Status

router = APIRouter(prefix="/api/v1/keys", tags=["ETSI GS QKD 014"])

INTEGER = re.compile(r"-?[0-9]{1,18}")
Model = TypeVar("Model", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Error, "description": "Bad request format"},
    401: {"model": Error, "description": "Unauthorized"},
    503: {"model": Error, "description": "Error on the server side"},
}


def _schema_ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _body(model: type[BaseModel], required: bool) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": _schema_ref(model)}},
        }
    }


def sae_id_from_path(raw: str) -> str:
    # The app routes on the raw (still percent-encoded) path, so "%2F" stays inside one
    # segment; decode it here (checklist item 10).
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("an SAE ID in the path must be percent-encoded UTF-8") from None


def _no_query(request: Request) -> None:
    if request.url.query:
        raise BadRequest("query parameters are only accepted with GET")


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise BadRequest(
                f"unknown query parameter: {name[:64]}", [{"allowed": sorted(allowed)}]
            )
        if name in values:
            raise BadRequest(f"query parameter {name} given more than once")
        values[name] = value
    return values


def _query_int(values: dict[str, str], name: str) -> int | None:
    if name not in values:
        return None
    if not INTEGER.fullmatch(values[name]):
        raise BadRequest(f"{name} must be an integer", [{name: values[name][:64]}])
    return int(values[name])


MAX_BODY_BYTES = 64 * 1024  # far above any valid request (128 key_IDs, 8 slave IDs)


async def _json_body(request: Request, model: type[Model], *, empty_ok: bool) -> Model:
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            # 413 is outside the codes the spec allows its methods (item 18).
            raise BadRequest(f"request body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        if empty_ok:
            return model()
        raise BadRequest("a JSON request body is required")
    document = parse_json_object(bytes(raw))
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise BadRequest(_first_problem(exc), _problems(exc)) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Strict RFC 8259 in UTF-8 (checklist item 6): no other encodings, no NaN or Infinity,
    no repeated member names, no lone surrogates; anything else is a 400."""
    try:
        text = raw.decode("utf-8")
        document = json.loads(
            text, parse_constant=_not_json, object_pairs_hook=_no_repeated_members
        )
        # A "\ud800" escape parses to a lone surrogate, which no UTF-8 output can carry.
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except _RepeatedMember as exc:
        raise BadRequest(f"request body repeats the member {str(exc)[:64]!r}") from None
    except (ValueError, RecursionError):  # decode, syntax, constants, surrogates, depth
        raise BadRequest("request body is not valid JSON in UTF-8") from None
    if not isinstance(document, dict):
        raise BadRequest("request body must be a JSON object")
    return document


class _RepeatedMember(ValueError):
    pass


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _no_repeated_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            raise _RepeatedMember(name)
        document[name] = value
    return document


def _location(loc: tuple[int | str, ...]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return (
        f"invalid {_location(error['loc']) or 'body'}: {error['msg'][0].lower()}{error['msg'][1:]}"
    )


def _problems(exc: ValidationError) -> list[dict[str, Any]]:
    # Field paths and pydantic's wording only: never the submitted values.
    return [{"field": _location(error["loc"]), "problem": error["msg"]} for error in exc.errors()]


# -- Get status --------------------------------------------------------------------------


@router.get(
    "/{slave_SAE_ID}/status",
    response_model=Status,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Get status",
)
async def get_status(
    slave_SAE_ID: str, request: Request, caller: CallerDep, session: SessionDep, keys: KeyServiceDep
) -> Status:
    _query(request, set())
    return await keys.status(session, caller, sae_id_from_path(slave_SAE_ID))


# -- Get key -----------------------------------------------------------------------------

_ENC_QUERY = [
    _query_param("number", "Number of keys (default 1)", {"type": "integer", "minimum": 1}),
    _query_param("size", "Size of each key in bits (default key_size)", {"type": "integer"}),
]


@router.get(
    "/{slave_SAE_ID}/enc_keys",
    response_model=KeyContainer,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Get key (simple GET form)",
    openapi_extra={"parameters": _ENC_QUERY},
)
async def get_key_simple(
    slave_SAE_ID: str, request: Request, caller: CallerDep, session: SessionDep, keys: KeyServiceDep
) -> KeyContainer:
    values = _query(request, {"number", "size"})
    key_request = KeyRequest(number=_query_int(values, "number"), size=_query_int(values, "size"))
    return await keys.enc_keys(session, caller, sae_id_from_path(slave_SAE_ID), key_request)


@router.post(
    "/{slave_SAE_ID}/enc_keys",
    response_model=KeyContainer,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Get key",
    openapi_extra=_body(KeyRequest, required=False),
)
async def get_key(
    slave_SAE_ID: str, request: Request, caller: CallerDep, session: SessionDep, keys: KeyServiceDep
) -> KeyContainer:
    _no_query(request)
    key_request = await _json_body(request, KeyRequest, empty_ok=True)
    return await keys.enc_keys(session, caller, sae_id_from_path(slave_SAE_ID), key_request)


# -- Get key with key IDs ----------------------------------------------------------------


@router.get(
    "/{master_SAE_ID}/dec_keys",
    response_model=KeyContainer,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Get key with key IDs (single key_ID GET form)",
    openapi_extra={
        "parameters": [
            {
                "name": "key_ID",
                "in": "query",
                "required": True,
                "description": "The key's UUID",
                "schema": {"type": "string", "format": "uuid"},
            }
        ]
    },
)
async def get_key_with_id(
    master_SAE_ID: str,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    keys: KeyServiceDep,
) -> KeyContainer:
    values = _query(request, {"key_ID"})
    if "key_ID" not in values:
        raise BadRequest("the key_ID query parameter is required")
    key_ids = KeyIDs.model_validate({"key_IDs": [{"key_ID": values["key_ID"]}]})
    return await keys.dec_keys(session, caller, sae_id_from_path(master_SAE_ID), key_ids)


@router.post(
    "/{master_SAE_ID}/dec_keys",
    response_model=KeyContainer,
    response_model_exclude_none=True,
    responses=ERRORS,
    summary="Get key with key IDs",
    openapi_extra=_body(KeyIDs, required=True),
)
async def get_key_with_ids(
    master_SAE_ID: str,
    request: Request,
    caller: CallerDep,
    session: SessionDep,
    keys: KeyServiceDep,
) -> KeyContainer:
    _no_query(request)
    key_ids = await _json_body(request, KeyIDs, empty_ok=False)
    return await keys.dec_keys(session, caller, sae_id_from_path(master_SAE_ID), key_ids)
