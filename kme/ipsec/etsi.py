"""A small ETSI GS QKD 014 client: what a gateway's adapter needs from any compliant KME."""

from __future__ import annotations

import base64
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx


class KMEClientError(Exception):
    """The KME did not give the key; `reason` says why in one line (no key material)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class QKDKey:
    key_id: str
    material: bytes = field(repr=False)


def mutual_tls_context(ca_file: Path, certfile: Path, keyfile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


class ETSIClient:
    def __init__(self, url: str, context: ssl.SSLContext, *, timeout: float = 10.0) -> None:
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/api/v1/keys", verify=context, timeout=timeout
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def enc_keys(
        self, slave_sae_id: str, *, number: int = 1, size: int = 256
    ) -> list[QKDKey]:
        body = await self._call(
            "POST", f"/{quote(slave_sae_id, safe='')}/enc_keys", {"number": number, "size": size}
        )
        keys = _keys(body)
        if len(keys) != number or any(len(key.material) != size // 8 for key in keys):
            raise KMEClientError(
                f"the KME answered enc_keys with other than {number} keys of {size} bits"
            )
        return keys

    async def dec_keys(self, master_sae_id: str, key_ids: list[str]) -> list[QKDKey]:
        body = await self._call(
            "POST",
            f"/{quote(master_sae_id, safe='')}/dec_keys",
            {"key_IDs": [{"key_ID": key_id} for key_id in key_ids]},
        )
        keys = _keys(body)
        if [key.key_id.lower() for key in keys] != [key_id.lower() for key_id in key_ids]:
            raise KMEClientError("the KME answered dec_keys with other key_IDs than asked")
        if any(not key.material for key in keys):
            raise KMEClientError("the KME answered dec_keys with an empty key")
        return keys

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self.http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise KMEClientError(f"KME unreachable: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            try:
                message = str(response.json().get("message", ""))
            except ValueError:
                message = ""
            raise KMEClientError(
                f"KME answered {response.status_code}" + (f" ({message})" if message else ""),
                response.status_code,
            )
        try:
            document = response.json()
        except ValueError:
            raise KMEClientError("KME answered 200 with a body that is not JSON") from None
        if not isinstance(document, dict):
            raise KMEClientError("KME answered 200 with a body that is not a Key container")
        return document


def _keys(body: dict[str, Any]) -> list[QKDKey]:
    try:
        return [
            QKDKey(str(item["key_ID"]), base64.b64decode(item["key"], validate=True))
            for item in body["keys"]
        ]
    except (KeyError, TypeError, ValueError):
        raise KMEClientError("KME answered with a malformed Key container") from None
