"""The history database's tables, as SQLAlchemy models.

These describe the newest schema; Alembic revisions in app/migrations/versions/ bring an existing database to it
(app/migrate.py), and tests/app/test_store.py checks that the two agree. Changing a model here therefore means
writing a revision too.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ROLES = ("user", "assistant", "system")
# interrupted: still streaming when the app stopped (crash, kill -9); the store marks such rows when it starts.
STATUSES = ("pending", "streaming", "done", "stopped", "error", "interrupted")
MAX_TITLE = 200
MAX_OWNER = 255


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive text; we read it back as UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), float: Double()}


class Image(Base):
    """One stored file per distinct content; shared by every conversation (of any owner) that uses it."""

    __tablename__ = "images"
    hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex; file at images/ab/cdef...
    mime: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # secrets.token_urlsafe(16): not guessable
    owner: Mapped[str] = mapped_column(String(MAX_OWNER))
    title: Mapped[str] = mapped_column(String(MAX_TITLE))
    settings: Mapped[dict[str, Any]]  # decoding settings remembered for this conversation
    image_hash: Mapped[str | None] = mapped_column(ForeignKey("images.hash"), index=True)  # current image
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    __table_args__ = (Index("ix_conversations_owner_updated_at", "owner", "updated_at"),)


class Message(Base):
    __tablename__ = "messages"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    seq: Mapped[int]  # 1, 2, 3... within the conversation
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    image_hash: Mapped[str | None] = mapped_column(ForeignKey("images.hash"), index=True)
    # The token ids the model generated for `text`, so a later turn can quote the reply exactly as the model wrote
    # it (re-tokenizing the text can split it differently). NULL when unknown; never kept for a changed text.
    token_ids: Mapped[list[int] | None] = mapped_column(JSON)
    created_at: Mapped[datetime]
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq"),  # also the index for "messages of a conversation in order"
        CheckConstraint("role IN ('user', 'assistant', 'system')", name="role"),
        CheckConstraint("status IN ('pending', 'streaming', 'done', 'stopped', 'error', 'interrupted')",
                        name="status"),
    )


class Generation(Base):
    """How an assistant message was produced: model, precision, device, decoding settings, tokens, timings."""

    __tablename__ = "generations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    model: Mapped[str] = mapped_column(String(500))
    precision: Mapped[str] = mapped_column(String(32))
    device: Mapped[str] = mapped_column(String(100))
    settings: Mapped[dict[str, Any]]
    prompt_tokens: Mapped[int]
    new_tokens: Mapped[int]
    latency_s: Mapped[float]
    first_token_s: Mapped[float | None]
    created_at: Mapped[datetime]
