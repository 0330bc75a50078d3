"""Stand-ins for tests and the load benchmark: a backend that streams canned words and an in-memory store with
the ``ConversationStore`` API. No torch, no database."""

from __future__ import annotations

import copy
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from app.backend import BadImage, ModelCard, ReplyStats
from app.store import ConversationSummary, ConversationView, MessageView, NotFound, StoreUnavailable
from app.tables import ROLES, STATUSES

IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


class FakeStream:
    def __init__(self, words: list[str], delay: float, notice: str | None = None, report_ids: bool = False):
        self.words, self.delay, self.notice, self.report_ids = words, delay, notice, report_ids
        self.reply: ReplyStats | None = None
        self.cancelled = False
        self.closed = False
        self._t0 = time.perf_counter()

    def __iter__(self):
        sent = []
        try:
            for word in self.words:
                if self.cancelled:
                    break
                time.sleep(self.delay)
                sent.append(word)
                yield word
        finally:
            self.closed = True
            text = "".join(sent)
            self.reply = ReplyStats(text=text, prompt_tokens=10, new_tokens=len(sent),
                                    seconds=time.perf_counter() - self._t0, first_token_seconds=self.delay,
                                    notice=self.notice, cancelled=self.cancelled or len(sent) < len(self.words),
                                    token_ids=fake_token_ids(sent) if self.report_ids else None)

    def cancel(self):
        self.cancelled = True


def fake_token_ids(words: list[str]) -> list[int]:
    """Stand-in token ids for a reply: one per word, derived from the word, so a test can tell replies apart."""
    return [int.from_bytes(hashlib.sha256(w.encode()).digest()[:3], "big") for w in words]


class FakeBackend:
    """Streams an answer that names the question and the picture's hash, so tests can see what was asked.
    ``calls`` records what each call received (history included); ``report_ids=True`` makes replies carry token
    ids (``fake_token_ids``), as a backend that can quote its own replies does."""

    def __init__(self, *, delay: float = 0.0, words: int = 6, untrained: bool = False, notice: str | None = None,
                 report_ids: bool = False):
        self.card = ModelCard(source="fake", precision="fp32", device="cpu", llm_family="chat", untrained=untrained,
                              notes=("a fake backend for tests",) if untrained else (), context_length=2048)
        self.delay, self.words, self.notice, self.report_ids = delay, words, notice, report_ids
        self.calls: list[dict] = []
        self.streams: list[FakeStream] = []

    def check_image(self, image: bytes) -> None:
        if not image.startswith(IMAGE_MAGIC):
            raise BadImage("This file is not an image (or its format is not supported).")
        if len(image) < 16:
            raise BadImage("The image file is truncated.")

    def _stream(self, image, text, settings):
        self.check_image(image)
        tag = hashlib.sha256(image).hexdigest()[:8]
        words = [f"{w} " for w in (["answer", f"img-{tag}", f"to:{text[:20]}"] + ["word"] * self.words)][: 3 + self.words]
        words = words[: settings.get("max_new_tokens") or None]  # one word per token, so the limit cuts as a model's
        stream = FakeStream(words, self.delay, self.notice, self.report_ids)
        self.streams.append(stream)
        return stream

    def chat(self, image, history, message, settings):
        self.calls.append(dict(kind="chat", history=copy.deepcopy(list(history)), message=message,
                               settings=dict(settings)))
        return self._stream(image, message, settings)

    def caption(self, image, settings):
        self.calls.append(dict(kind="caption", settings=dict(settings)))
        return self._stream(image, "caption", settings)


@dataclass
class _Conversation:
    id: str
    owner: str
    title: str
    settings: dict | None
    created_at: datetime
    updated_at: datetime
    image_hash: str | None = None
    messages: list = field(default_factory=list)


def _now():
    return datetime.now(timezone.utc)


def _copy_ids(token_ids):
    return None if token_ids is None else [int(i) for i in token_ids]


_UNSET = object()


class MemoryStore:
    """The ``ConversationStore`` API in memory. ``down = True`` makes every call raise StoreUnavailable."""

    def __init__(self):
        self._lock = threading.Lock()
        self._conversations: dict[str, _Conversation] = {}
        self._images: dict[tuple[str, str], bytes] = {}
        self._messages: dict[int, tuple[str, MessageView]] = {}
        self._next_id = 1
        self.generations: list[dict] = []
        self.down = False

    def _check(self):
        if self.down:
            raise StoreUnavailable("database is locked")

    def _conv(self, owner, cid) -> _Conversation:
        conv = self._conversations.get(cid)
        if conv is None or conv.owner != owner:
            raise NotFound("no such conversation")
        return conv

    def create_conversation(self, owner, title="New conversation", settings=None):
        self._check()
        with self._lock:
            cid = secrets.token_urlsafe(16)
            self._conversations[cid] = _Conversation(cid, owner, title, copy.deepcopy(settings), _now(), _now())
            return cid

    def list_conversations(self, owner):
        self._check()
        return [ConversationSummary(c.id, c.title, c.created_at, c.updated_at, len(c.messages))
                for c in self._conversations.values() if c.owner == owner]

    def get_conversation(self, owner, cid):
        self._check()
        c = self._conv(owner, cid)
        return ConversationView(c.id, c.title, copy.deepcopy(c.settings), c.image_hash, list(c.messages),
                                c.created_at, c.updated_at)

    def rename_conversation(self, owner, cid, title):
        self._check()
        self._conv(owner, cid).title = title

    def delete_conversation(self, owner, cid):
        self._check()
        self._conv(owner, cid)
        del self._conversations[cid]

    def update_settings(self, owner, cid, settings):
        self._check()
        self._conv(owner, cid).settings = copy.deepcopy(settings)

    def save_image(self, owner, cid, data, mime):
        self._check()
        conv = self._conv(owner, cid)
        digest = hashlib.sha256(data).hexdigest()
        self._images[(owner, digest)] = bytes(data)
        conv.image_hash = digest
        return digest

    def image_bytes(self, owner, digest):
        self._check()
        try:
            return self._images[(owner, digest)]
        except KeyError:
            raise NotFound("no such image") from None

    def add_message(self, owner, cid, role, text, *, status="done", error=None, image_hash=None, token_ids=None):
        self._check()
        if role not in ROLES or status not in STATUSES:
            raise ValueError(f"bad role or status: {role!r}, {status!r}")
        with self._lock:
            conv = self._conv(owner, cid)
            mid = f"m{self._next_id}"
            self._next_id += 1
            view = MessageView(mid, role, text, status, error, image_hash, _now(), _copy_ids(token_ids))
            conv.messages.append(view)
            conv.updated_at = _now()
            self._messages[mid] = (cid, view)
            return mid

    def update_message(self, owner, message_id, *, text=None, status=None, error=None, token_ids=_UNSET):
        self._check()
        cid, view = self._messages.get(message_id, (None, None))
        if view is None:
            raise NotFound("no such message")
        self._conv(owner, cid)
        if text is not None:
            view.text = text
            view.token_ids = None  # as ConversationStore: ids belong to the text they were generated as
        if token_ids is not _UNSET:
            view.token_ids = _copy_ids(token_ids)
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"bad status {status!r}")
            view.status = status
        if error is not None:
            view.error = error

    def record_generation(self, owner, message_id, **record):
        self._check()
        cid, _ = self._messages.get(message_id, (None, None))
        self._conv(owner, cid)
        self.generations.append(dict(message_id=message_id, **record))

    def delete_last_turn(self, owner, cid):
        self._check()
        conv = self._conv(owner, cid)
        users = [i for i, m in enumerate(conv.messages) if m.role == "user"]
        if users:
            del conv.messages[users[-1]:]

    def export_json(self, owner, cid):
        self._check()
        c = self._conv(owner, cid)
        return {"format": "blip2-conversation", "version": 1,
                "conversation": dict(id=c.id, title=c.title, settings=c.settings, image_hash=c.image_hash),
                "messages": [dict(id=m.id, role=m.role, text=m.text, status=m.status, error=m.error,
                                  image_hash=m.image_hash) for m in c.messages]}

    def export_markdown(self, owner, cid):
        self._check()
        c = self._conv(owner, cid)
        return f"# {c.title}\n\n" + "\n\n".join(f"**{m.role}:** {m.text}" for m in c.messages)

    def close(self):
        pass
