"""Persisted conversations: SQLite by default, PostgreSQL when given a `postgresql+psycopg://` URL.

One `ConversationStore` per process; every public method is one short transaction and takes the caller's `owner`
(a username, or a random per-browser-session id without auth). Rows of another owner behave exactly like rows that
do not exist (`NotFound`), so ids leak nothing. Images are stored once by content (sha256) under
`<data_dir>/images/ab/cdef...`; the database records which conversations and messages reference them.

Failures the chat can live with (database locked, server down) surface as `StoreUnavailable` after a short retry:
the UI keeps chatting and tells the user that history is not being saved. The tables are in app/tables.py; the
store brings the database to the newest Alembic revision (app/migrate.py) when it first connects.

No torch here (tests/test_boundaries.py): the app talks to the model through app/backend.py.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, delete, event, exists, func, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from app.migrate import upgrade
from app.tables import MAX_OWNER, MAX_TITLE, ROLES, STATUSES, Base, Conversation, Generation, Image, Message

__all__ = [
    "StoreError", "NotFound", "StoreUnavailable",
    "MessageView", "ConversationSummary", "ConversationView", "ConversationStore",
]

log = logging.getLogger(__name__)

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_MIME_RE = re.compile(r"image/[a-z0-9][a-z0-9.+-]{0,60}")
# PostgreSQL refuses NUL in text and no driver can encode a lone surrogate: both become U+FFFD before saving.
_UNSAVABLE_RE = re.compile("[\x00\ud800-\udfff]")
_UNSET: Any = object()


# ---------------------------------------------------------------------------------------------------------- errors

class StoreError(Exception):
    """Base class; the message is meant for the user."""


class NotFound(StoreError):
    """Unknown id, or an id that belongs to another owner (deliberately indistinguishable)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or stays locked: the chat still works, history is not saved."""


# ----------------------------------------------------------------------------------------------------------- views

@dataclass
class MessageView:
    id: str
    role: str
    text: str
    status: str
    error: str | None
    image_hash: str | None
    created_at: datetime
    token_ids: list[int] | None = None  # what the model generated for `text`; None when unknown


@dataclass
class ConversationSummary:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime
    message_count: int


@dataclass
class ConversationView:
    id: str
    title: str
    settings: dict
    image_hash: str | None
    messages: list[MessageView]
    created_at: datetime
    updated_at: datetime


# ----------------------------------------------------------------------------------------------------------- store

T = TypeVar("T")


def _guarded(action: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Run a store method with retries; transient database failures become `StoreUnavailable`.

    `action` completes "History could not be ...". Each attempt is a fresh transaction, so a retry never sees half
    of a failed one."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(self: ConversationStore, *args: Any, **kwargs: Any) -> T:
            last: Exception | None = None
            for attempt in range(self.retries + 1):
                if attempt:
                    time.sleep(min(0.05 * 4 ** (attempt - 1), 1.0))
                try:
                    self._ensure_schema()
                    return method(self, *args, **kwargs)
                except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
                    last = exc
                    log.warning("store: %s failed (attempt %d/%d): %s", method.__name__, attempt + 1,
                                self.retries + 1, _reason(exc))
                except sa_exc.DBAPIError as exc:
                    if not exc.connection_invalidated:
                        raise StoreError(f"History could not be {action}: {_reason(exc)}") from exc
                    last = exc
            raise StoreUnavailable(f"History could not be {action}: {_reason(last)}") from last

        return wrapper

    return decorate


def _reason(exc: BaseException | None) -> str:
    """One readable line from a driver error (never the URL, so never a password)."""
    orig = getattr(exc, "orig", None) or exc
    msg = " ".join(str(orig).split()) or type(orig).__name__
    if isinstance(exc, sa_exc.TimeoutError):
        msg = "no free database connection (pool timeout)"
    return msg[:300]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits, 22 url-safe characters


def _check_owner(owner: str) -> None:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER:
        raise ValueError(f"owner must be a non-empty string of at most {MAX_OWNER} characters")


def _clean_text(text: str | None) -> str | None:
    """``text`` with the characters no backend can store replaced by U+FFFD (the same on SQLite and PostgreSQL)."""
    return _UNSAVABLE_RE.sub("\ufffd", text) if isinstance(text, str) else text


def _clean_title(title: str) -> str:
    title = _clean_text(title).strip() if isinstance(title, str) else ""
    if not 1 <= len(title) <= MAX_TITLE:
        raise ValueError(f"A title needs 1 to {MAX_TITLE} characters.")
    return title


def _clean_settings(settings: dict | None) -> dict:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ValueError("settings must be a dict")
    try:
        return json.loads(json.dumps(settings, allow_nan=False))  # a JSON-only deep copy
    except (TypeError, ValueError) as exc:
        raise ValueError(f"settings must be JSON-serialisable: {exc}") from None


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _clean_token_ids(token_ids: list[int] | None) -> list[int] | None:
    if token_ids is None:
        return None
    if not isinstance(token_ids, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in token_ids):
        raise ValueError("token_ids must be a list of ints or None")
    return [int(i) for i in token_ids]


class ConversationStore:
    """Conversations, messages, images and generation records, filtered by owner in every method.

    `db_url` defaults to the SQLite file `<data_dir>/blip2.sqlite3`; PostgreSQL: `postgresql+psycopg://user:pw@host/db`.
    `busy_timeout_ms` is how long one SQLite attempt waits for a lock; `retries` how often a failed attempt is
    repeated before `StoreUnavailable` (worst case ≈ (retries + 1) × busy_timeout, 10 s by default; a refused
    connection fails at once). `connect_timeout_s` bounds connecting to PostgreSQL (an unreachable host).

    The schema is created or upgraded (Alembic, `upgrade head`) in the constructor. If the database is unreachable
    then, the constructor still succeeds and every call raises `StoreUnavailable` until the database is back.
    """

    def __init__(self, db_url: str | None = None, data_dir: str | Path = "data", *, busy_timeout_ms: int = 5000,
                 retries: int = 1, connect_timeout_s: float = 5.0, max_image_bytes: int = 50 * 1024 * 1024):
        self.data_dir = Path(data_dir)
        self.images_dir = self.data_dir / "images"
        self.retries = retries
        self.max_image_bytes = max_image_bytes
        if db_url is None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            url = URL.create("sqlite", database=str((self.data_dir / "blip2.sqlite3").resolve()))
        else:
            url = make_url(db_url)
        self.url = url
        self.engine = self._make_engine(url, busy_timeout_ms, connect_timeout_s)
        # Writes on SQLite start with BEGIN IMMEDIATE (see _make_engine); reads stay deferred so they never wait.
        self._write_engine = self.engine.execution_options(blip2_write=True)
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._started = _now()  # replies still streaming from before this moment were cut off (_mark_interrupted)
        try:
            self._ensure_schema()
        except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
            log.warning("store: database unavailable at start, history is not saved until it is back: %s",
                        _reason(exc))

    # ------------------------------------------------------------------------------------------------ setup

    @staticmethod
    def _make_engine(url: URL, busy_timeout_ms: int, connect_timeout_s: float) -> Engine:
        backend = url.get_backend_name()
        if backend == "sqlite":
            memory = url.database in (None, "", ":memory:")
            kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}}
            if memory:
                kwargs["poolclass"] = StaticPool
            elif url.database:
                Path(url.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, pool_pre_ping=True, **kwargs)

            @event.listens_for(engine, "connect")
            def _sqlite_connect(dbapi_conn, _record):
                # We emit BEGIN ourselves (below); pysqlite's implicit transactions would defeat BEGIN IMMEDIATE.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                try:
                    cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                    cur.execute("PRAGMA foreign_keys = ON")
                    if not memory:
                        cur.execute("PRAGMA journal_mode = WAL")
                        cur.execute("PRAGMA synchronous = FULL")  # a commit survives power loss, not only crashes
                finally:
                    cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn):
                # A writer takes the write lock up front: a deferred transaction that reads and then writes can fail
                # with "database is locked" without ever waiting (its snapshot went stale).
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("blip2_write") else "BEGIN")

            return engine
        if backend == "postgresql":
            connect_args = {}
            if "connect_timeout" not in url.query:
                connect_args["connect_timeout"] = max(1, round(connect_timeout_s))
            return create_engine(url, pool_pre_ping=True, pool_recycle=1800, connect_args=connect_args)
        return create_engine(url, pool_pre_ping=True)

    def _ensure_schema(self) -> None:
        if self._schema_ready:
            return
        from alembic.util import CommandError

        with self._schema_lock:
            if self._schema_ready:
                return
            try:
                upgrade(self._write_engine)
                self._mark_interrupted()
            except CommandError as exc:  # e.g. the database's revision is unknown: written by a newer app
                raise StoreError(f"The history database has a schema this version of the app does not know ({exc})."
                                 " Upgrade the app, or point it at another database.") from exc
            except (sa_exc.OperationalError, sa_exc.InterfaceError):
                raise  # transient: the caller retries or reports StoreUnavailable
            except sa_exc.DBAPIError as exc:  # e.g. no CREATE privilege on PostgreSQL
                raise StoreError(f"The history tables could not be created or upgraded: {_reason(exc)}") from exc
            self._schema_ready = True

    def _mark_interrupted(self) -> None:
        """Replies left 'streaming' (or 'pending') by a process that died mid-answer (crash, kill -9) become
        'interrupted', keeping the text saved so far (the chat saves a streaming reply every few seconds).

        Runs once, when the store first reaches its database, for rows created before the store was. Where several
        app processes share one PostgreSQL database, a reply another process is streaming at that moment is marked
        too; its final save sets its real status, so the mark only shows if that process dies as well."""
        with self._write_engine.begin() as conn:
            n = conn.execute(update(Message)
                             .where(Message.status.in_(("pending", "streaming")), Message.created_at < self._started)
                             .values(status="interrupted")).rowcount
        if n:
            log.warning("store: %d unfinished repl%s from before this start marked 'interrupted'", n,
                        "y" if n == 1 else "ies")

    @contextmanager
    def _tx(self, write: bool) -> Iterator[Session]:
        with Session(self._write_engine if write else self.engine, expire_on_commit=False) as session:
            with session.begin():
                yield session

    # ------------------------------------------------------------------------------------------------ lookups

    @staticmethod
    def _conversation(session: Session, owner: str, conversation_id: str, lock: bool = False) -> Conversation:
        _check_owner(owner)
        stmt = select(Conversation).where(Conversation.id == conversation_id, Conversation.owner == owner)
        if lock:
            stmt = stmt.with_for_update()  # PostgreSQL: serialises writers of one conversation (message seq)
        conv = session.scalars(stmt).one_or_none() if isinstance(conversation_id, str) else None
        if conv is None:
            raise NotFound("Conversation not found.")
        return conv

    @staticmethod
    def _message(session: Session, owner: str, message_id: str) -> tuple[Message, Conversation]:
        _check_owner(owner)
        row = session.execute(
            select(Message, Conversation).join(Conversation, Message.conversation_id == Conversation.id)
            .where(Message.id == message_id, Conversation.owner == owner)
        ).one_or_none() if isinstance(message_id, str) else None
        if row is None:
            raise NotFound("Message not found.")
        return row[0], row[1]

    @staticmethod
    def _owner_references(session: Session, owner: str, image_hash: str) -> bool:
        in_conv = exists().where(Conversation.owner == owner, Conversation.image_hash == image_hash)
        in_msg = (exists().where(Message.image_hash == image_hash, Message.conversation_id == Conversation.id,
                                 Conversation.owner == owner))
        return bool(session.scalar(select(in_conv | in_msg)))

    def _image_path(self, image_hash: str) -> Path:
        if not isinstance(image_hash, str) or not _HASH_RE.fullmatch(image_hash):
            raise NotFound("Image not found.")
        return self.images_dir / image_hash[:2] / image_hash[2:]

    # ------------------------------------------------------------------------------------------------ conversations

    @_guarded("saved")
    def create_conversation(self, owner: str, title: str = "New conversation", settings: dict | None = None) -> str:
        _check_owner(owner)
        title, settings = _clean_title(title), _clean_settings(settings)
        now = _now()
        conv = Conversation(id=_new_id(), owner=owner, title=title, settings=settings, image_hash=None,
                            created_at=now, updated_at=now)
        with self._tx(write=True) as s:
            s.add(conv)
        return conv.id

    @_guarded("loaded")
    def list_conversations(self, owner: str, limit: int | None = None) -> list[ConversationSummary]:
        """The owner's conversations, most recently updated first."""
        _check_owner(owner)
        count = (select(func.count()).where(Message.conversation_id == Conversation.id)
                 .correlate(Conversation).scalar_subquery())
        stmt = (select(Conversation, count).where(Conversation.owner == owner)
                .order_by(Conversation.updated_at.desc(), Conversation.created_at.desc(), Conversation.id)
                .limit(limit))
        with self._tx(write=False) as s:
            return [ConversationSummary(c.id, c.title, c.created_at, c.updated_at, n) for c, n in s.execute(stmt)]

    @_guarded("loaded")
    def get_conversation(self, owner: str, conversation_id: str) -> ConversationView:
        with self._tx(write=False) as s:
            c = self._conversation(s, owner, conversation_id)
            msgs = s.scalars(select(Message).where(Message.conversation_id == c.id).order_by(Message.seq)).all()
            return ConversationView(c.id, c.title, dict(c.settings or {}), c.image_hash,
                                    [_message_view(m) for m in msgs], c.created_at, c.updated_at)

    @_guarded("saved")
    def rename_conversation(self, owner: str, conversation_id: str, title: str) -> None:
        title = _clean_title(title)
        with self._tx(write=True) as s:
            c = self._conversation(s, owner, conversation_id, lock=True)
            c.title, c.updated_at = title, _now()

    @_guarded("saved")
    def update_settings(self, owner: str, conversation_id: str, settings: dict) -> None:
        """Replace (not merge) the conversation's remembered decoding settings."""
        settings = _clean_settings(settings)
        with self._tx(write=True) as s:
            c = self._conversation(s, owner, conversation_id, lock=True)
            c.settings, c.updated_at = settings, _now()

    @_guarded("deleted")
    def delete_conversation(self, owner: str, conversation_id: str) -> None:
        """Delete the conversation, its messages and generation records; image files no longer used by any
        conversation are deleted too."""
        with self._tx(write=True) as s:
            c = self._conversation(s, owner, conversation_id, lock=True)
            hashes = set(s.scalars(select(Message.image_hash).where(Message.conversation_id == c.id,
                                                                    Message.image_hash.is_not(None))))
            if c.image_hash:
                hashes.add(c.image_hash)
            # Explicit child deletes: the result does not depend on the backend enforcing ON DELETE CASCADE.
            msg_ids = select(Message.id).where(Message.conversation_id == c.id).scalar_subquery()
            s.execute(delete(Generation).where(Generation.message_id.in_(msg_ids)))
            s.execute(delete(Message).where(Message.conversation_id == c.id))
            s.execute(delete(Conversation).where(Conversation.id == c.id))
            self._collect_images(s, hashes)

    def _collect_images(self, s: Session, hashes: set[str]) -> None:
        """Delete images (row and file) that nothing references any more; inside the caller's transaction.

        The image row is locked first, so a concurrent save_image of the same content waits for us and then
        writes the file again (PostgreSQL; SQLite writers are serialised anyway). The file goes before the commit:
        if the commit then fails, an unreferenced row without a file is left, and save_image rewrites the file."""
        for h in sorted(hashes):
            if s.scalars(select(Image.hash).where(Image.hash == h).with_for_update()).one_or_none() is None:
                continue
            used = s.scalar(select(exists().where(Conversation.image_hash == h)
                                   | exists().where(Message.image_hash == h)))
            if used:
                continue
            s.execute(delete(Image).where(Image.hash == h))
            with suppress(FileNotFoundError):
                self._image_path(h).unlink()

    # ------------------------------------------------------------------------------------------------ images

    @_guarded("saved")
    def save_image(self, owner: str, conversation_id: str, data: bytes, mime: str) -> str:
        """Store image bytes by content and make them the conversation's current image; returns the sha256 hex.

        The file is written once (atomically: temp file, fsync, rename) under a path derived only from the hash.
        The image it replaces is deleted if nothing references it (uploaded, then replaced before being sent)."""
        import hashlib

        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise ValueError("image data must be non-empty bytes")
        data = bytes(data)
        if len(data) > self.max_image_bytes:
            raise ValueError(f"image is larger than {self.max_image_bytes // (1024 * 1024)} MB")
        mime = (mime or "").strip().lower()
        if not _MIME_RE.fullmatch(mime):
            raise ValueError(f"not an image MIME type: {mime!r}")
        digest = hashlib.sha256(data).hexdigest()
        with self._tx(write=True) as s:
            c = self._conversation(s, owner, conversation_id, lock=True)
            s.execute(_insert_ignore(s, Image, dict(hash=digest, mime=mime, size=len(data), created_at=_now())))
            s.scalars(select(Image.hash).where(Image.hash == digest).with_for_update()).one()
            try:
                self._write_file(digest, data)
            except OSError as exc:
                raise StoreUnavailable(f"History could not be saved: cannot write image file: {exc}") from exc
            previous = c.image_hash
            c.image_hash, c.updated_at = digest, _now()
            if previous and previous != digest:
                s.flush()
                self._collect_images(s, {previous})  # an upload that was replaced before it was ever sent
        return digest

    def _write_file(self, digest: str, data: bytes) -> None:
        path = self._image_path(digest)
        if path.is_file() and path.stat().st_size == len(data):
            return  # same content already there (the name is its hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @_guarded("loaded")
    def image_bytes(self, owner: str, image_hash: str) -> bytes:
        """The image's bytes, if one of the owner's conversations or messages references it; else NotFound."""
        path = self._image_path(image_hash)
        _check_owner(owner)
        with self._tx(write=False) as s:
            if not self._owner_references(s, owner, image_hash):
                raise NotFound("Image not found.")
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"The image file {image_hash[:12]}... is missing from {self.images_dir}.") from None

    @_guarded("loaded")
    def image_mime(self, owner: str, image_hash: str) -> str:
        """The MIME type recorded for an image the owner references; else NotFound."""
        self._image_path(image_hash)
        _check_owner(owner)
        with self._tx(write=False) as s:
            if not self._owner_references(s, owner, image_hash):
                raise NotFound("Image not found.")
            return s.scalars(select(Image.mime).where(Image.hash == image_hash)).one()

    # ------------------------------------------------------------------------------------------------ messages

    @_guarded("saved")
    def add_message(self, owner: str, conversation_id: str, role: str, text: str, *, status: str = "done",
                    error: str | None = None, image_hash: str | None = None,
                    token_ids: list[int] | None = None) -> str:
        """Append a message; `image_hash` must be an image this owner already saved (save_image), `token_ids` the
        ids the model generated for `text`, if known."""
        _check_choice("role", role, ROLES)
        _check_choice("status", status, STATUSES)
        if not isinstance(text, str):
            raise ValueError("text must be a string")
        text, error = _clean_text(text), _clean_text(error)
        token_ids = _clean_token_ids(token_ids)
        with self._tx(write=True) as s:
            c = self._conversation(s, owner, conversation_id, lock=True)
            if image_hash is not None:
                self._image_path(image_hash)
                if not self._owner_references(s, owner, image_hash):
                    raise NotFound("Image not found.")  # else any owner could attach (and then read) any hash
            seq = (s.scalar(select(func.max(Message.seq)).where(Message.conversation_id == c.id)) or 0) + 1
            now = _now()
            msg = Message(id=_new_id(), conversation_id=c.id, seq=seq, role=role, text=text, status=status,
                          error=error, image_hash=image_hash, token_ids=token_ids, created_at=now)
            s.add(msg)
            c.updated_at = now
        return msg.id

    @_guarded("saved")
    def update_message(self, owner: str, message_id: str, *, text: str | None = None, status: str | None = None,
                       error: str | None = _UNSET, token_ids: list[int] | None = _UNSET) -> None:
        """Change a message's text and/or status; `error=None` passed explicitly clears the error.

        `token_ids` belong to the text: a new text without them drops the old ones (they would quote the old text)."""
        if status is not None:
            _check_choice("status", status, STATUSES)
        if text is not None and not isinstance(text, str):
            raise ValueError("text must be a string")
        text = _clean_text(text)
        if error is not _UNSET:
            error = _clean_text(error)
        if token_ids is not _UNSET:
            token_ids = _clean_token_ids(token_ids)
        elif text is not None:
            token_ids = None
        with self._tx(write=True) as s:
            msg, conv = self._message(s, owner, message_id)
            if text is not None:
                msg.text = text
            if token_ids is not _UNSET:
                msg.token_ids = token_ids
            if status is not None:
                msg.status = status
            if error is not _UNSET:
                msg.error = error
            s.execute(update(Conversation).where(Conversation.id == conv.id).values(updated_at=_now()))

    @_guarded("saved")
    def record_generation(self, owner: str, message_id: str, *, model: str, precision: str, device: str,
                          settings: dict, prompt_tokens: int, new_tokens: int, latency_s: float,
                          first_token_s: float | None) -> str:
        """Record how a message was generated; returns the record's id."""
        settings = _clean_settings(settings)
        with self._tx(write=True) as s:
            msg, _ = self._message(s, owner, message_id)
            gen = Generation(id=_new_id(), message_id=msg.id, model=str(model), precision=str(precision),
                             device=str(device), settings=settings, prompt_tokens=int(prompt_tokens),
                             new_tokens=int(new_tokens), latency_s=float(latency_s),
                             first_token_s=None if first_token_s is None else float(first_token_s),
                             created_at=_now())
            s.add(gen)
        return gen.id

    @_guarded("saved")
    def delete_last_turn(self, owner: str, conversation_id: str) -> int:
        """Undo: remove the last user message and everything after it; returns how many messages went (0 when
        there is no user message)."""
        with self._tx(write=True) as s:
            c = self._conversation(s, owner, conversation_id, lock=True)
            last_user = s.scalar(select(func.max(Message.seq))
                                 .where(Message.conversation_id == c.id, Message.role == "user"))
            if last_user is None:
                return 0
            doomed = select(Message.id).where(Message.conversation_id == c.id, Message.seq >= last_user)
            hashes = set(s.scalars(select(Message.image_hash).where(Message.id.in_(doomed.scalar_subquery()),
                                                                    Message.image_hash.is_not(None))))
            s.execute(delete(Generation).where(Generation.message_id.in_(doomed.scalar_subquery())))
            n = s.execute(delete(Message).where(Message.conversation_id == c.id, Message.seq >= last_user)).rowcount
            c.updated_at = _now()
            self._collect_images(s, hashes)
            return n

    # ------------------------------------------------------------------------------------------------ export

    @_guarded("loaded")
    def export_json(self, owner: str, conversation_id: str) -> dict:
        """The conversation as JSON-ready data: settings, messages with their generation records, and the images
        it uses by hash (fetch bytes with image_bytes). Datetimes are ISO 8601 strings in UTC."""
        with self._tx(write=False) as s:
            c = self._conversation(s, owner, conversation_id)
            msgs = s.scalars(select(Message).where(Message.conversation_id == c.id).order_by(Message.seq)).all()
            gens = s.scalars(select(Generation).join(Message, Generation.message_id == Message.id)
                             .where(Message.conversation_id == c.id)
                             .order_by(Generation.created_at, Generation.id)).all()
            hashes = {h for h in [c.image_hash, *(m.image_hash for m in msgs)] if h}
            images = s.scalars(select(Image).where(Image.hash.in_(hashes)).order_by(Image.hash)).all()
        by_msg: dict[str, list[dict]] = {}
        for g in gens:
            by_msg.setdefault(g.message_id, []).append({
                "id": g.id, "model": g.model, "precision": g.precision, "device": g.device,
                "settings": g.settings, "prompt_tokens": g.prompt_tokens, "new_tokens": g.new_tokens,
                "latency_s": g.latency_s, "first_token_s": g.first_token_s, "created_at": g.created_at.isoformat(),
            })
        return {
            "format": "blip2-conversation",
            "version": 1,
            "exported_at": _now().isoformat(),
            "conversation": {"id": c.id, "title": c.title, "settings": c.settings, "image_hash": c.image_hash,
                             "created_at": c.created_at.isoformat(), "updated_at": c.updated_at.isoformat()},
            "messages": [
                # token_ids stay out: they mean something only to the tokenizer that produced them.
                {**{k: v for k, v in asdict(_message_view(m)).items() if k not in ("created_at", "token_ids")},
                 "seq": m.seq, "created_at": m.created_at.isoformat(), "generations": by_msg.get(m.id, [])}
                for m in msgs
            ],
            "images": [{"hash": i.hash, "mime": i.mime, "size": i.size} for i in images],
        }

    def export_markdown(self, owner: str, conversation_id: str) -> str:
        """The conversation as readable Markdown (images by hash, errors and stopped replies marked)."""
        data = self.export_json(owner, conversation_id)
        conv = data["conversation"]
        lines = [f"# {conv['title']}", "", f"*Created {_fmt(conv['created_at'])}, "
                 f"last updated {_fmt(conv['updated_at'])}.*", ""]
        if conv["settings"]:
            lines += ["Settings: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in conv["settings"].items()), ""]
        for m in data["messages"]:
            lines += [f"### {m['role'].capitalize()} · {_fmt(m['created_at'])}", ""]
            if m["image_hash"]:
                lines += [f"*[image sha256:{m['image_hash']}]*", ""]
            if m["text"]:
                lines += [m["text"], ""]
            if m["status"] == "error":
                lines += [f"> **Error:** {m['error'] or 'generation failed'}", ""]
            elif m["status"] == "stopped":
                lines += ["*(stopped)*", ""]
            elif m["status"] == "interrupted":
                lines += ["*(interrupted: the app stopped while this reply was being written)*", ""]
            elif m["status"] in ("pending", "streaming"):
                lines += ["*(incomplete)*", ""]
            for g in m["generations"]:
                first = f", first token {g['first_token_s']:.2f} s" if g["first_token_s"] is not None else ""
                lines += [f"<sub>{g['model']} · {g['precision']} · {g['device']} · {g['new_tokens']} tokens in "
                          f"{g['latency_s']:.2f} s{first}</sub>", ""]
        return "\n".join(lines).rstrip() + "\n"

    # ------------------------------------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message_view(m: Message) -> MessageView:
    token_ids = list(m.token_ids) if m.token_ids is not None else None
    return MessageView(m.id, m.role, m.text, m.status, m.error, m.image_hash, m.created_at, token_ids)


def _fmt(iso: str) -> str:
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")


def _insert_ignore(s: Session, model: type[Base], values: dict):
    """INSERT ... ON CONFLICT DO NOTHING for the two dialects we support."""
    name = s.get_bind().dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        raise StoreError(f"unsupported database backend {name!r} (use SQLite or PostgreSQL)")
    return insert(model).values(**values).on_conflict_do_nothing()
