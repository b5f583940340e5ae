"""Tables of the HTTP side: the admin audit log, dashboard sessions, and the blob store's records."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow


class AdminAction(Base):
    """Every admin action, with time, action, target, reason and outcome."""

    __tablename__ = "admin_actions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    action: Mapped[str] = mapped_column(String(64), nullable=False)
    target: Mapped[str] = mapped_column(String(200), nullable=False)
    reason: Mapped[str] = mapped_column(String(500), nullable=False)
    outcome: Mapped[str] = mapped_column(String(500), nullable=False)


class AdminSession(Base):
    """A signed-in dashboard session; deleting the row (logout, expiry) ends it on every replica."""

    __tablename__ = "admin_sessions"

    # HMAC-SHA256 of the session cookie keyed by the admin token: the cookie itself is never
    # stored, and a new admin token matches no row (everyone is signed out).
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)


class BlobObject(Base):
    """A blob in the store (one file named by its SHA-256); its row goes with its file."""

    __tablename__ = "blob_objects"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class BlobUpload(Base):
    """Who uploaded a blob and for which job (``""``: no job); the expiry and the quotas read these."""

    __tablename__ = "blob_uploads"

    sha256: Mapped[str] = mapped_column(
        String(64), ForeignKey("blob_objects.sha256", ondelete="CASCADE"), primary_key=True
    )
    uploader: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    uploaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_blob_uploads_uploader", "uploader"), Index("ix_blob_uploads_job", "job_id"))
