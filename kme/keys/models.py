"""Tables of the key pool.

Keys belong to a *link* between two KME IDs. The emulated QKD link puts fixed-size
blocks of secret bits into ``pool_block``; enc_keys turns blocks into keys with fresh
random key_IDs (``delivered_key``), kept only until every authorised slave SAE has
fetched them (``key_recipient``). With one KME the link joins the KME to itself.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Double, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from kme.db import Base

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit id.
BlockId = BigInteger().with_variant(Integer(), "sqlite")


class Link(Base):
    __tablename__ = "link"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    local_kme_id: Mapped[str] = mapped_column(String(255))
    remote_kme_id: Mapped[str] = mapped_column(String(255))
    block_bits: Mapped[int] = mapped_column(Integer)
    # Kept in step with pool_block in the same transaction, so that Get status answers
    # stored_key_count without counting rows (issue 2: O(1) per request).
    stored_blocks: Mapped[int] = mapped_column(BigInteger, default=0)
    # Wall-clock time up to which the emulated link has produced its bits. Kept in the
    # database so that several kme processes on one pool share one link's rate.
    banked_at: Mapped[float | None] = mapped_column(Double, default=None)

    __table_args__ = (Index("uq_link_kme_pair", "local_kme_id", "remote_kme_id", unique=True),)


class PoolBlock(Base):
    __tablename__ = "pool_block"

    id: Mapped[int] = mapped_column(BlockId, primary_key=True, autoincrement=True)
    link_id: Mapped[int] = mapped_column(ForeignKey("link.id", ondelete="CASCADE"), index=True)
    material: Mapped[bytes] = mapped_column(LargeBinary)

    def __repr__(self) -> str:
        return f"PoolBlock(id={self.id}, link_id={self.link_id})"


class DeliveredKey(Base):
    """A key handed to its master and waiting for its slaves (checklist items 49, 52)."""

    __tablename__ = "delivered_key"

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(ForeignKey("link.id", ondelete="CASCADE"))
    master_sae_id: Mapped[str] = mapped_column(String(255))
    size_bits: Mapped[int] = mapped_column(Integer)
    material: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double, index=True)

    def __repr__(self) -> str:
        return f"DeliveredKey(key_id={self.key_id!r}, master={self.master_sae_id!r})"


class KeyRecipient(Base):
    """One authorised slave of a delivered key, and whether it has fetched it."""

    __tablename__ = "key_recipient"

    key_id: Mapped[str] = mapped_column(
        ForeignKey("delivered_key.key_id", ondelete="CASCADE"), primary_key=True
    )
    slave_sae_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    delivered_at: Mapped[float | None] = mapped_column(Double, default=None)
