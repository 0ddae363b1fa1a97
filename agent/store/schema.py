"""The provenance database's tables as SQLAlchemy 2 models; `migrations/` creates and changes them
(records/README.md, "Storage", lists what each holds)."""

from __future__ import annotations

from sqlalchemy import (Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, LargeBinary, MetaData, String,
                        Text, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    # named constraints, so that later migrations (batch mode on SQLite) can refer to them
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    created: Mapped[str] = mapped_column(String(32))
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))  # Ed25519, raw 32 bytes
    # the chain head as of the last append: a tripwire for truncation, not a proof (unsigned)
    head_seq: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    head_hash: Mapped[str | None] = mapped_column(String(64))
    # NULL: the shipped default model. users and models refer to each other: use_alter lets the
    # metadata order the two tables
    active_model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL", use_alter=True))

    keys: Mapped[list[KeyRow]] = relationship(back_populates="user", cascade="all, delete-orphan")


class KeyRow(Base):
    __tablename__ = "keys"
    __table_args__ = (UniqueConstraint("user_id", "key_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    key_id: Mapped[str] = mapped_column(String(16))
    created: Mapped[str] = mapped_column(String(32))
    active: Mapped[bool] = mapped_column(Boolean)

    user: Mapped[UserRow] = relationship(back_populates="keys")


class ModelRow(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)  # of the (plaintext) weights file
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    encrypted: Mapped[bool] = mapped_column(Boolean)
    created: Mapped[str] = mapped_column(String(32))
    file: Mapped[str | None] = mapped_column(String(200))  # under $AGENT_HOME/models; NULL: shipped
    report: Mapped[str | None] = mapped_column(Text)  # JSON: how it was made and measured


class PairingCodeRow(Base):
    """A one-time code printed by `agent pair`; only its SHA-256 is stored."""
    __tablename__ = "pairing_codes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created: Mapped[str] = mapped_column(String(32))
    expires: Mapped[str] = mapped_column(String(32))


class TokenRow(Base):
    """A paired extension's bearer token, bound to the extension origin that paired; stored hashed."""
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    origin: Mapped[str | None] = mapped_column(String(200))
    label: Mapped[str | None] = mapped_column(String(200))
    created: Mapped[str] = mapped_column(String(32))
    last_used: Mapped[str | None] = mapped_column(String(32))
    revoked: Mapped[str | None] = mapped_column(String(32))


class ProtectionRow(Base):
    __tablename__ = "protections"
    __table_args__ = (
        UniqueConstraint("user_id", "seq"),
        CheckConstraint("source IN ('cli', 'extension')", name="source"),
        Index(None, "time"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)  # the record format's version
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"))
    seq: Mapped[int] = mapped_column(Integer)
    time: Mapped[str] = mapped_column(String(32))
    source: Mapped[str] = mapped_column(String(16))
    file_name_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    site_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    original_sha256: Mapped[str] = mapped_column(String(64), index=True)
    protected_sha256: Mapped[str] = mapped_column(String(64), index=True)
    phash: Mapped[str] = mapped_column(String(16))
    original_width: Mapped[int] = mapped_column(Integer)
    original_height: Mapped[int] = mapped_column(Integer)
    working_width: Mapped[int] = mapped_column(Integer)
    working_height: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    model_sha256: Mapped[str] = mapped_column(String(64))
    rgan_key_id: Mapped[str] = mapped_column(String(16))
    params: Mapped[str] = mapped_column(Text)
    psnr: Mapped[float | None] = mapped_column(Float)
    self_check_asr: Mapped[float | None] = mapped_column(Float)
    prev_hash: Mapped[str | None] = mapped_column(String(64))
    record_hash: Mapped[str] = mapped_column(String(64), index=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))

    user: Mapped[UserRow] = relationship()


JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


class JobRow(Base):
    """A background job (`agent/service/jobs.py`): a user's fine-tuning run, its progress and its outcome."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="state"),
        Index(None, "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    state: Mapped[str] = mapped_column(String(16))
    created: Mapped[str] = mapped_column(String(32))
    started: Mapped[str | None] = mapped_column(String(32))
    finished: Mapped[str | None] = mapped_column(String(32))
    params: Mapped[str] = mapped_column(Text)  # JSON: what to train on and how
    progress: Mapped[str | None] = mapped_column(Text)  # JSON: epoch, losses, ETA, as last reported
    result: Mapped[str | None] = mapped_column(Text)  # JSON: the model stored and its quality report
    error: Mapped[str | None] = mapped_column(Text)

    user: Mapped[UserRow] = relationship()
