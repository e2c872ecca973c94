"""The three API methods as domain operations: validate, route, reserve or collect.

Routers hand over parsed requests and the authenticated caller; this module decides
everything the spec leaves to the KME (checklist items 26, 31 to 33, 37, 38, 42, 50) and
calls kme.keys.pool for the atomic part. It never commits.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from kme import saes
from kme.config import Settings
from kme.errors import (
    INSUFFICIENT_KEYS,
    MANDATORY_EXTENSION_NOT_MET,
    MANDATORY_EXTENSION_UNSUPPORTED,
    OPTIONAL_EXTENSION_NOT_HANDLED,
    SIZE_NOT_MULTIPLE_OF_8,
    BadRequest,
    KMEError,
)
from kme.keys import pool
from kme.keys.models import Link
from kme.keys.schemas import KeyContainer, KeyIDs, KeyOut, KeyRequest, Status
from kme.saes import SAE

log = logging.getLogger("kme.keys")

UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

# Extensions this KME understands. `kme_route_type` follows the spec's `abc_route_type`
# example (item 39): every key here comes straight over one link, so "direct" is met
# and "indirect" never can be.
ROUTE_TYPE = "kme_route_type"
SUPPORTED_EXTENSIONS = frozenset({ROUTE_TYPE})


class KeyService:
    def __init__(self, settings: Settings) -> None:
        self.kme_id = settings.kme_id
        self.keys = settings.keys

    # -- Get status (§5.2) -------------------------------------------------------------

    async def status(self, session: AsyncSession, caller: SAE, slave_sae_id: str) -> Status:
        slave = await self._slave(session, caller, slave_sae_id)
        link = await self._link(session, slave)
        cfg = self.keys
        per_key = pool.blocks_per_key(cfg.key_size, link.block_bits)
        capacity = pool.capacity_blocks(cfg.max_key_count, cfg.key_size, link.block_bits)
        return Status(
            source_KME_ID=self.kme_id,
            target_KME_ID=slave.kme_id,
            master_SAE_ID=caller.sae_id,
            slave_SAE_ID=slave.sae_id,
            key_size=cfg.key_size,
            stored_key_count=min(pool.keys_available(link, cfg.key_size), capacity // per_key),
            max_key_count=capacity // per_key,
            max_key_per_request=cfg.max_key_per_request,
            max_key_size=cfg.max_key_size,
            min_key_size=cfg.min_key_size,
            max_SAE_ID_count=cfg.max_sae_id_count,
        )

    # -- Get key (§5.3) ----------------------------------------------------------------

    async def enc_keys(
        self, session: AsyncSession, caller: SAE, slave_sae_id: str, request: KeyRequest
    ) -> KeyContainer:
        number = self._number(request.number)
        size = self._size(request.size, caller)
        self._check_extensions(request.extension_mandatory, request.extension_optional)
        slave = await self._slave(session, caller, slave_sae_id)
        extra = await self._additional_slaves(
            session, caller, slave, request.additional_slave_SAE_IDs
        )
        link = await self._link(session, slave)
        slaves = [slave.sae_id, *(sae.sae_id for sae in extra)]
        try:
            keys = await pool.reserve(
                session,
                link,
                master_sae_id=caller.sae_id,
                slave_sae_ids=slaves,
                number=number,
                size_bits=size,
                ttl_seconds=self.keys.undelivered_key_ttl,
            )
        except pool.InsufficientKeys:
            log.info(
                "enc_keys: %s asked %d keys of %d bits for %s; too few stored",
                caller.sae_id,
                number,
                size,
                slave.sae_id,
            )
            raise KMEError(
                INSUFFICIENT_KEYS,
                [{"requested": number, "available": pool.keys_available(link, size)}],
                status=self.keys.insufficient_keys_status,
            ) from None
        log.info(
            "enc_keys: %s -> %s: %d keys of %d bits, key_IDs %s",
            caller.sae_id,
            ",".join(slaves),
            number,
            size,
            [key.key_id for key in keys],
        )
        return _container(keys)

    # -- Get key with key IDs (§5.4) ---------------------------------------------------

    async def dec_keys(
        self, session: AsyncSession, caller: SAE, master_sae_id: str, request: KeyIDs
    ) -> KeyContainer:
        _require_id("master_SAE_ID", master_sae_id)
        if master_sae_id == caller.sae_id:
            raise BadRequest("master_SAE_ID must name the master SAE, not the caller")
        if len(request.key_IDs) > self.keys.max_key_per_request:
            raise BadRequest(
                f"at most {self.keys.max_key_per_request} key_IDs may be asked for at once"
            )
        key_ids = [canonical_key_id(entry.key_ID) for entry in request.key_IDs]
        if len(set(key_ids)) != len(key_ids):
            raise BadRequest("key_IDs must not repeat a key_ID")
        keys = await pool.collect(
            session, caller_sae_id=caller.sae_id, master_sae_id=master_sae_id, key_ids=key_ids
        )
        log.info("dec_keys: %s took key_IDs %s of %s", caller.sae_id, key_ids, master_sae_id)
        return _container(keys)

    # -- validation --------------------------------------------------------------------

    def _number(self, number: int | None) -> int:
        if number is None:
            return 1
        if not 1 <= number <= self.keys.max_key_per_request:
            raise BadRequest(
                f"number must be between 1 and max_key_per_request "
                f"({self.keys.max_key_per_request})",
                [{"number": number}],
            )
        return number

    def _size(self, size: int | None, caller: SAE) -> int:
        cfg = self.keys
        if size is None:
            return cfg.key_size
        if caller.size_in_bytes:
            log.info(
                "enc_keys: %s sent size=%d, taken as bytes (%d bits) by its compatibility switch",
                caller.sae_id,
                size,
                size * 8,
            )
            size *= 8
        if size <= 0:
            raise BadRequest("size must be a positive number of bits", [{"size": size}])
        if size % 8:
            raise BadRequest(SIZE_NOT_MULTIPLE_OF_8, [{"size": size}])
        if not cfg.min_key_size <= size <= cfg.max_key_size:
            raise BadRequest(
                f"size must be between min_key_size ({cfg.min_key_size}) "
                f"and max_key_size ({cfg.max_key_size}) bits",
                [{"size": size}],
            )
        return size

    def _check_extensions(
        self,
        mandatory: Sequence[dict[str, Any]] | None,
        optional: Sequence[dict[str, Any]] | None,
    ) -> None:
        wanted = _extension_pairs(mandatory or ())
        unsupported = [name for name, _ in wanted if name not in SUPPORTED_EXTENSIONS]
        if unsupported:
            raise BadRequest(
                MANDATORY_EXTENSION_UNSUPPORTED,
                [
                    {"extension_mandatory_unsupported": f"{name} is not supported"}
                    for name in unsupported
                ],
            )
        unmet = [name for name, value in wanted if not _can_meet(name, value)]
        if unmet:
            raise BadRequest(
                MANDATORY_EXTENSION_NOT_MET,
                [{"extension_mandatory_unmet": f"{name} cannot be met"} for name in unmet],
            )
        offered = _extension_pairs(optional or ())
        ignored = [
            name
            for name, value in offered
            if name not in SUPPORTED_EXTENSIONS or not _can_meet(name, value)
        ]
        if ignored and self.keys.strict_optional_extensions:
            raise BadRequest(
                OPTIONAL_EXTENSION_NOT_HANDLED,
                [{"extension_optional_unhandled": name} for name in ignored],
            )

    async def _slave(self, session: AsyncSession, caller: SAE, slave_sae_id: str) -> SAE:
        _require_id("slave_SAE_ID", slave_sae_id)
        if slave_sae_id == caller.sae_id:
            raise BadRequest("slave_SAE_ID must differ from the calling master SAE")
        slave = await saes.get(session, slave_sae_id)
        if slave is None:
            raise BadRequest("slave_SAE_ID is not a known SAE", [{"slave_SAE_ID": slave_sae_id}])
        return slave

    async def _additional_slaves(
        self, session: AsyncSession, caller: SAE, slave: SAE, ids: list[str] | None
    ) -> list[SAE]:
        if ids is None:
            return []
        limit = self.keys.max_sae_id_count
        if not ids:
            raise BadRequest("additional_slave_SAE_IDs must not be an empty array")
        if len(ids) > limit:
            raise BadRequest(
                f"additional_slave_SAE_IDs holds more than max_SAE_ID_count ({limit}) entries"
            )
        if len(set(ids)) != len(ids):
            raise BadRequest("additional_slave_SAE_IDs must not repeat an SAE ID")
        found: list[SAE] = []
        for sae_id in ids:
            _require_id("additional_slave_SAE_IDs entry", sae_id)
            if sae_id == slave.sae_id:
                raise BadRequest("additional_slave_SAE_IDs must not repeat the path's slave SAE")
            if sae_id == caller.sae_id:
                raise BadRequest("additional_slave_SAE_IDs must not name the calling master SAE")
            extra = await saes.get(session, sae_id)
            if extra is None:
                raise BadRequest(
                    "additional_slave_SAE_IDs names an unknown SAE", [{"SAE_ID": sae_id}]
                )
            if extra.kme_id != slave.kme_id:
                raise BadRequest(
                    "every slave SAE of one request must be attached to the same KME",
                    [{"SAE_ID": sae_id, "KME_ID": extra.kme_id}],
                )
            found.append(extra)
        return found

    async def _link(self, session: AsyncSession, slave: SAE) -> Link:
        link = await pool.get_link(session, self.kme_id, slave.kme_id)
        if link is None:
            raise BadRequest(
                "no key link from this KME to the slave SAE's KME",
                [{"target_KME_ID": slave.kme_id}],
            )
        return link


def canonical_key_id(value: str) -> str:
    """Lowercase canonical UUID text; any other spelling of a UUID is refused (item 50)."""
    if not UUID_TEXT.fullmatch(value):
        raise BadRequest("key_ID must be a UUID in canonical text form", [{"key_ID": value[:64]}])
    return value.lower()


def _require_id(what: str, value: str) -> None:
    try:
        saes.validate_sae_id(value)
    except ValueError as exc:
        raise BadRequest(f"{what}: {exc}") from None


def _extension_pairs(entries: Sequence[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(name, value) for entry in entries for name, value in entry.items()]


def _can_meet(name: str, value: Any) -> bool:
    if name == ROUTE_TYPE:
        return bool(value == "direct")
    return False


def _container(keys: Sequence[pool.Key]) -> KeyContainer:
    return KeyContainer(
        keys=[
            KeyOut(key_ID=key.key_id, key=base64.b64encode(key.material).decode("ascii"))
            for key in keys
        ]
    )
