"""Persisted resume points ("cursors") for incoming streams.

LND's invoice ``add_index``/``settle_index`` and each relay's last ``created_at``
are stored here so that a restarted service resumes where it stopped instead of
missing or replaying history. A cursor only moves forward: ``advance`` is a
compare-and-set that ignores a value lower than the stored one, so two tasks or
replicas reporting out of order can never move it back.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, rowcount, utcnow


class Cursor(Base):
    __tablename__ = "cursors"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


async def get(session: AsyncSession, name: str, default: int = 0) -> int:
    value = await session.scalar(select(Cursor.position).where(Cursor.name == name))
    return default if value is None else int(value)


async def advance(session: AsyncSession, name: str, position: int) -> bool:
    """Move cursor ``name`` forward to ``position``; return True if it moved.

    Flushes but does not commit: the caller's transaction decides.
    """
    if position < 0:
        raise ValueError(f"cursor position must be >= 0, got {position}")
    res = await session.execute(
        update(Cursor)
        .where(Cursor.name == name, Cursor.position < position)
        .values(position=position, updated_at=utcnow())
    )
    if rowcount(res):
        return True
    if await session.scalar(select(Cursor.name).where(Cursor.name == name)) is not None:
        # The row may have been created by a writer that committed after our UPDATE ran (it
        # matched nothing then): run the forward-only UPDATE again, now that the row exists.
        res = await session.execute(
            update(Cursor)
            .where(Cursor.name == name, Cursor.position < position)
            .values(position=position, updated_at=utcnow())
        )
        return bool(rowcount(res))
    try:
        async with session.begin_nested():
            session.add(Cursor(name=name, position=position, updated_at=utcnow()))
    except IntegrityError:  # another writer created it first: retry the forward-only update
        res = await session.execute(
            update(Cursor)
            .where(Cursor.name == name, Cursor.position < position)
            .values(position=position, updated_at=utcnow())
        )
        return bool(rowcount(res))
    return True
