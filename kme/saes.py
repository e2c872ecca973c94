"""The SAE registry: which SAEs exist, the KME each belongs to, and how each is recognised."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Sequence
from typing import Literal

from sqlalchemy import Boolean, Double, String, delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from kme.db import Base

SizeUnit = Literal["bits", "bytes"]


class SAE(Base):
    __tablename__ = "sae"

    sae_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    kme_id: Mapped[str] = mapped_column(String(255))
    # Pinned SHA-256 fingerprint (lowercase hex) of the SAE's certificate, or None.
    cert_sha256: Mapped[str | None] = mapped_column(String(64), unique=True, default=None)
    # Compatibility switch for clients that send `size` in bytes (spec/clients.md item 2).
    size_in_bytes: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Double)

    @property
    def size_unit(self) -> SizeUnit:
        return "bytes" if self.size_in_bytes else "bits"


def validate_sae_id(sae_id: str) -> str:
    """Any non-blank printable string of up to 255 characters is an SAE ID (item 7).

    Control characters are refused: PostgreSQL cannot store NUL, and none of them belongs
    in an ID that also names files and appears in logs.
    """
    if not sae_id.strip():
        raise ValueError("an SAE ID must not be blank")
    if len(sae_id) > 255:
        raise ValueError("an SAE ID is at most 255 characters")
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in sae_id):
        raise ValueError("an SAE ID must not contain control characters")
    return sae_id


def normalise_fingerprint(value: str) -> str:
    """Accept `AB:CD:..`, `abcd..`, or `sha256:..`; return 64 lowercase hex digits."""
    digits = value.lower().removeprefix("sha256:").replace(":", "").strip()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("a certificate fingerprint is 32 bytes of SHA-256 in hex")
    return digits


async def get(session: AsyncSession, sae_id: str) -> SAE | None:
    return await session.get(SAE, sae_id)


async def by_fingerprint(session: AsyncSession, sha256: str) -> SAE | None:
    result = await session.execute(select(SAE).where(SAE.cert_sha256 == sha256))
    return result.scalar_one_or_none()


async def list_all(session: AsyncSession) -> Sequence[SAE]:
    return (await session.execute(select(SAE).order_by(SAE.sae_id))).scalars().all()


async def add(
    session: AsyncSession,
    sae_id: str,
    kme_id: str,
    *,
    cert_sha256: str | None = None,
    size_unit: SizeUnit = "bits",
) -> SAE:
    sae = SAE(
        sae_id=validate_sae_id(sae_id),
        kme_id=kme_id,
        cert_sha256=normalise_fingerprint(cert_sha256) if cert_sha256 else None,
        size_in_bytes=size_unit == "bytes",
        created_at=time.time(),
    )
    session.add(sae)
    await session.flush()
    return sae


async def remove(session: AsyncSession, sae_id: str) -> bool:
    result = await session.execute(delete(SAE).where(SAE.sae_id == sae_id))
    return bool(result.rowcount)  # type: ignore[attr-defined]
