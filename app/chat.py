"""What the app does, as plain functions over a per-browser-session ``dict``: no Gradio, no torch.

``app/ui.py`` wires these to Gradio events; tests drive them directly with a fake backend and store. A session
holds who the user is (``owner``), the open conversation, the current picture and the turns shown in the chat.
Every store call goes through :meth:`ChatApp._save`, so a database that is down or locked never stops the chat:
the reply still streams and a note says the history could not be saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mimetypes
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from app.backend import Backend, BackendUnavailable, BadImage, HistoryTurn
from app.decoding import DEFAULT_DECODING, varied_settings
from app.store import NotFound, StoreError, StoreUnavailable

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # blip2's own limit; Gradio's upload limit is set a little higher (ui.py)
TITLE_CHARS = 60
_OWNER_TOKEN = re.compile(r"^[A-Za-z0-9_-]{22,64}$")
SAVE_FAILED = "⚠️ History could not be saved ({reason}). The chat still works, but this part may be missing later."
MODEL_FAILED = "The model could not answer this time because of an internal error. Please try again."
# One message holds a model slot for as long as it takes to read, so its length is capped (app.py:
# --max-message-chars); the history sent with it is bounded too, so the work per turn does not grow with the chat.
MAX_MESSAGE_CHARS = 4000
MAX_HISTORY_TURNS = 8
MAX_HISTORY_CHARS = 16000
SAVE_EVERY_S = 1.5  # a streaming reply is saved this often, so a crash loses at most this much of it
_SURROGATE = re.compile("[\ud800-\udfff]")


class UserError(ValueError):
    """A message for the user, shown as is: something they can fix, or a plain account of what failed."""


class WrongUser(UserError):
    """A request for a session that another logged-in user started (its session hash leaked)."""


# -- sessions -----------------------------------------------------------------------------------------------------
def new_session() -> dict:
    # user: the login name of whoever first used the session ("" without auth); None until then.
    return dict(owner=None, user=None, conversation_id=None, image=None, image_hash=None, image_name=None,
                context=0, turns=[], settings=dict(DEFAULT_DECODING), save_failed=False)


def claim_session(session: dict, username: str | None) -> None:
    """Tie ``session`` to the user of its first request; refuse anyone else (WrongUser) without touching it.

    Gradio finds a session by its hash alone, and the hash travels in every queue URL: without this, another
    logged-in user who learns it could continue the chat and have the model read its turns back to them."""
    user = username or ""
    if session.get("user") is None:
        session["user"] = user
    elif session["user"] != user:
        raise WrongUser("This chat session belongs to another user, so it cannot be used here. "
                        "Reload the page to start your own.")


def check_text(text, limit: int = MAX_MESSAGE_CHARS, what: str = "message") -> str:
    """``text`` stripped, or UserError saying plainly what is wrong with it. Run before anything is saved or sent:
    a lone surrogate (half of an emoji) breaks the tokenizer and the database driver, PostgreSQL refuses NUL
    characters, and a very long message holds a model slot for everyone waiting."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise UserError(f"The {what} must be text.")
    text = text.strip()
    if "\x00" in text:
        raise UserError(f"The {what} contains a NUL character (\\0), which cannot be saved. Please remove it.")
    if _SURROGATE.search(text):
        raise UserError(f"The {what} contains a broken character (half of an emoji or symbol). "
                        "Please retype or remove it.")
    if len(text) > limit:
        raise UserError(f"The {what} is too long ({len(text):,} characters); the limit is {limit:,}. "
                        "Please shorten it.")
    return text


def new_owner_token() -> str:
    return secrets.token_urlsafe(24)


def owner_for(username: str | None, browser_token: str | None) -> tuple[str, str]:
    """(owner, browser token). Logged-in users are their username; anonymous browsers a random token kept in the
    browser. The prefixes keep the two namespaces apart, so no token can pose as a user."""
    token = browser_token if isinstance(browser_token, str) and _OWNER_TOKEN.match(browser_token) else new_owner_token()
    if username:
        return f"user:{username}", token
    return f"anon:{token}", token


def turn(role: str, text: str, context: int, **extra) -> dict:
    """A chat entry. role: user | assistant | note (image changes, errors, notices: shown, never sent to the model)."""
    return dict(role=role, text=text, context=context, **extra)


def model_history(session: dict, max_turns: int | None = None, max_chars: int | None = None) -> list[HistoryTurn]:
    """The current picture's turns for the backend: (user, assistant), or (user, assistant, token_ids) where the
    model's ids for that reply are known (they ride along with this conversation's own replies only).

    At most the last ``max_turns`` turns, and only as many of the latest as fit in ``max_chars`` characters: the
    model could not attend to more anyway, and tokenizing a long chat again on every turn would grow without bound."""
    pairs, pending = [], None
    for t in session["turns"]:
        if t["context"] != session["context"] or t["role"] == "note":
            continue
        if t["role"] == "user":
            pending = t["text"]
        elif t["role"] == "assistant" and pending is not None:
            if t["text"]:
                ids = t.get("token_ids")
                pairs.append((pending, t["text"]) if ids is None else (pending, t["text"], list(ids)))
            pending = None
    if max_turns is not None:
        pairs = pairs[-max_turns:] if max_turns > 0 else []
    if max_chars is not None:
        kept, total = [], 0
        for pair in reversed(pairs):
            total += len(pair[0]) + len(pair[1])
            if total > max_chars:
                break
            kept.append(pair)
        pairs = kept[::-1]
    return pairs


def read_upload(path: str | os.PathLike, limit: int = MAX_IMAGE_BYTES) -> bytes:
    """An uploaded file's bytes, refusing oversized files before reading them."""
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise BadImage(f"The file is too large ({size / 2**20:.1f} MiB); the limit is {limit / 2**20:.0f} MiB.")
        return Path(path).read_bytes()
    except FileNotFoundError:  # swept from the upload folder (app/uploads.py) before it was used
        raise BadImage("The uploaded file is no longer on the server. Please upload it again.") from None


def guess_mime(name: str | None, data: bytes) -> str:
    magic = {b"\x89PNG": "image/png", b"\xff\xd8": "image/jpeg", b"GIF8": "image/gif", b"RIFF": "image/webp",
             b"BM": "image/bmp", b"II*\x00": "image/tiff", b"MM\x00*": "image/tiff"}
    for prefix, mime in magic.items():
        if data.startswith(prefix):
            return mime
    mime = mimetypes.guess_type(name or "")[0] or ""
    return mime if mime.startswith("image/") else "image/unknown"


class ChatApp:
    """The handlers. ``backend`` is an :class:`app.backend.Backend`, ``store`` a ``ConversationStore`` or None."""

    def __init__(self, backend: Backend, store=None, *, max_image_bytes: int = MAX_IMAGE_BYTES,
                 max_message_chars: int = MAX_MESSAGE_CHARS, max_history_turns: int = MAX_HISTORY_TURNS,
                 max_history_chars: int = MAX_HISTORY_CHARS, save_every_s: float = SAVE_EVERY_S):
        self.backend = backend
        self.store = store
        self.max_image_bytes = max_image_bytes
        self.max_message_chars = max_message_chars
        self.max_history_turns = max_history_turns
        self.max_history_chars = max_history_chars
        self.save_every_s = save_every_s

    def check_message(self, text) -> str:
        """The message stripped, or UserError (see check_text)."""
        return check_text(text, self.max_message_chars)

    # -- persistence, failure-tolerant ---------------------------------------------------------------------------
    def _save(self, session: dict, method: str, *args, **kwargs):
        """Call ``store.method(owner, ...)``; on StoreError note it once in the chat and return None."""
        if self.store is None:
            return None
        try:
            result = getattr(self.store, method)(session["owner"], *args, **kwargs)
        except NotFound:
            raise
        except (StoreError, OSError, ValueError) as exc:  # ValueError: data the store refuses
            if not session["save_failed"]:
                reason = "the database is unavailable" if isinstance(exc, StoreUnavailable) else "storage error"
                session["turns"].append(turn("note", SAVE_FAILED.format(reason=reason), session["context"]))
            session["save_failed"] = True
            return None
        session["save_failed"] = False
        return result

    def ensure_owner(self, session: dict, username: str | None = None) -> str:
        """The session's owner, after checking that ``username`` may use the session (claim_session: WrongUser)."""
        claim_session(session, username)
        if session["owner"] is None or (username and session["owner"] != f"user:{username}"):
            session["owner"], _ = owner_for(username, None)
        return session["owner"]

    def _ensure_conversation(self, session: dict, title: str) -> str | None:
        if session["conversation_id"] is None:
            session["conversation_id"] = self._save(session, "create_conversation", _title(title),
                                                    settings=session["settings"])
        return session["conversation_id"]

    def _add_message(self, session: dict, role: str, text: str, **kwargs):
        cid = session["conversation_id"]
        if cid is None:
            return None
        try:
            return self._save(session, "add_message", cid, role, text, **kwargs)
        except NotFound:  # deleted in another tab: carry on in a fresh conversation
            session["conversation_id"] = None
            return None

    # -- pictures ----------------------------------------------------------------------------------------------
    def set_image(self, session: dict, data: bytes, name: str | None = None) -> bool:
        """Make ``data`` the current picture: a new visual context, noted in the chat. A bad file only adds a note
        saying why (the current picture and the conversation stay)."""
        name = os.path.basename(name or "") or "picture"
        try:
            if len(data) > self.max_image_bytes:
                raise BadImage(f"The file is too large ({len(data) / 2**20:.1f} MiB); "
                               f"the limit is {self.max_image_bytes / 2**20:.0f} MiB.")
            self.backend.check_image(data)
        except BadImage as exc:
            session["turns"].append(turn("note", f"⚠️ **{name}** could not be used: {exc} "
                                                 "Nothing else changed; try another file.", session["context"]))
            return False
        had_image = session["image"] is not None
        if had_image and data == session["image"]:
            # The same picture again (the same example clicked twice, a file attached once more): the model would
            # see the same thing, so the conversation about it goes on rather than starting over.
            return True
        session["image"], session["image_name"] = data, name
        session["context"] += 1
        session["image_hash"] = None
        session["turns"].append(turn(
            "note", f"🖼️ **New picture: {name}.** " + ("From here on the model looks at this picture; "
                                                      "earlier turns are not sent with it." if had_image else
                                                      "Ask anything about it, or pick a preset."),
            session["context"], image=True, digest=hashlib.sha256(data).hexdigest()))
        if self._ensure_conversation(session, f"Picture: {name}"):
            digest = self._save_image(session, data, name)
            session["image_hash"] = digest
            self._add_message(session, "system", session["turns"][-1]["text"], image_hash=digest)
        return True

    def _save_image(self, session, data, name):
        try:
            return self._save(session, "save_image", session["conversation_id"], data, guess_mime(name, data))
        except NotFound:
            session["conversation_id"] = None
            return None

    def set_image_file(self, session: dict, path: str) -> bool:
        try:
            data = read_upload(path, self.max_image_bytes)
        except BadImage as exc:
            name = os.path.basename(path)
            session["turns"].append(turn("note", f"⚠️ **{name}** could not be used: {exc}", session["context"]))
            return False
        return self.set_image(session, data, os.path.basename(path))

    # -- chatting ----------------------------------------------------------------------------------------------
    def send(self, session: dict, text: str, settings: dict | None = None) -> Iterator[dict]:
        """Ask ``text`` about the current picture; yields after every streamed chunk (the reply grows in
        ``session["turns"][-1]``). Closing the generator (Stop, a client that went away) cancels generation.
        A message that cannot be used (check_text) raises UserError before anything changes."""
        text = self.check_message(text)
        if not text:
            return
        if settings is not None:
            self._remember_settings(session, settings)
        if session["image"] is None:
            session["turns"].append(turn("user", text, session["context"]))
            session["turns"].append(turn("note", "🖼️ Please add a picture first: attach, paste or drop one "
                                                 "(or click an example).", session["context"]))
            yield session
            return
        history = model_history(session, self.max_history_turns, self.max_history_chars)
        first_question = not any(t["role"] == "user" for t in session["turns"])
        self._ensure_conversation(session, text)
        if first_question and session["conversation_id"] is not None:  # titled by its first question
            try:
                self._save(session, "rename_conversation", session["conversation_id"], _title(text))
            except NotFound:
                session["conversation_id"] = None
        session["turns"].append(turn("user", text, session["context"]))
        saved = self._add_message(session, "user", text) is not None
        # A reply whose question could not be saved is not saved either: the history never shows an answer to
        # nothing (the chat itself still answers).
        yield from self._reply(session, history, text, save=saved)

    def _reply(self, session: dict, history, text: str, save: bool = True) -> Iterator[dict]:
        reply = turn("assistant", "", session["context"], status="streaming")
        session["turns"].append(reply)
        message_id = self._add_message(session, "assistant", "", status="streaming") if save else None
        yield session
        stream, chunks, status, error = None, None, "stopped", None
        t0 = last_save = time.perf_counter()
        try:
            stream = self.backend.chat(session["image"], history, text, dict(session["settings"]))
            chunks = iter(stream)
            for chunk in chunks:
                reply["text"] += chunk
                # Every few seconds, not every chunk: a crash then loses little and the database is not hammered.
                if message_id is not None and time.perf_counter() - last_save >= self.save_every_s:
                    message_id = self._save_partial(session, message_id, reply["text"])
                    last_save = time.perf_counter()
                yield session
            status = "done"
        except BadImage as exc:
            status, error = "error", str(exc)
            reply["text"] = f"⚠️ The picture could not be read: {exc}"
        except (ValueError, TypeError) as exc:  # invalid decoding settings, prompt that cannot fit
            status, error = "error", str(exc)
            reply["text"] = f"⚠️ {exc}"
        except BackendUnavailable as exc:  # a model server down or too slow: its plain message says so
            log.warning("chat: model unavailable: %s", exc)
            status, error = "error", str(exc)
            reply["text"] = f"⚠️ {exc}"
        except Exception as exc:  # noqa: BLE001 - one failed reply must not take the chat down
            # The details go to the log and the saved row; the person chatting gets a plain sentence.
            log.exception("chat: generation failed")
            status, error = "error", f"{type(exc).__name__}: {exc}"
            reply["text"] = f"⚠️ {MODEL_FAILED}"
        finally:
            # Runs on Stop and on client disconnect too (Gradio closes the generator): stop the model first.
            if stream is not None:
                stream.cancel()
            if chunks is not None and hasattr(chunks, "close"):
                chunks.close()
            self._finish(session, reply, message_id, stream, status, error, time.perf_counter() - t0)
        if reply.get("notice") or status == "error":  # the error text replaced what was last shown
            yield session

    def _save_partial(self, session: dict, message_id: str, text: str) -> str | None:
        """Save a streaming reply's text so far (its status stays 'streaming'; a store that starts after a crash
        marks it 'interrupted'). Quiet on failure: the final save reports it. None once the message is gone."""
        try:
            self.store.update_message(session["owner"], message_id, text=text)
        except NotFound:  # deleted in another tab
            return None
        except (StoreError, OSError, ValueError) as exc:
            log.warning("chat: partial reply not saved: %s", exc)
        return message_id

    def _finish(self, session, reply, message_id, stream, status, error, seconds):
        stats = getattr(stream, "reply", None) if stream is not None else None
        if stats is not None and stats.cancelled and status == "done":
            status = "stopped"
        reply["status"] = status
        limit = session["settings"].get("max_new_tokens")
        if status == "done" and stats is not None and limit and stats.new_tokens >= limit:
            reply["cut"] = limit  # it ended because it ran out of tokens, not because the answer was complete
        token_ids = _reply_ids(stats, reply["text"], status)
        if token_ids is not None:
            reply["token_ids"] = token_ids
        if stats is not None and stats.notice:
            reply["notice"] = stats.notice
            session["turns"].append(turn("note", f"ℹ️ {stats.notice}", session["context"]))
        if message_id is None or self.store is None:
            return
        try:
            self._save(session, "update_message", message_id, text=reply["text"], status=status, error=error,
                       token_ids=token_ids)
            if stats is not None:
                card = self.backend.card
                self._save(session, "record_generation", message_id, model=card.source, precision=card.precision,
                           device=card.device, settings=dict(session["settings"]),
                           prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                           latency_s=stats.seconds or seconds, first_token_s=stats.first_token_seconds)
        except NotFound:
            session["conversation_id"] = None

    def regenerate(self, session: dict, settings: dict | None = None) -> Iterator[dict]:
        """Answer the last question again (with the current settings), differently where those settings would
        repeat the same words: greedy and beam search are deterministic, and so is sampling with a fixed seed, so
        this one reply samples with a fresh seed instead, and says so under it. The settings stay as they are."""
        last = _last_user_index(session)
        if last is None or session["turns"][last]["context"] != session["context"] or session["image"] is None:
            session["turns"].append(turn("note", "Nothing to regenerate yet.", session["context"]))
            yield session
            return
        text = self.check_message(session["turns"][last]["text"])  # before undo: a refused text must not be lost
        if settings is not None:
            self._remember_settings(session, settings)
        chosen = session["settings"]
        varied, why = varied_settings(chosen)
        self.undo(session)
        start = len(session["turns"])
        session["settings"] = varied  # for this reply only (its generation record shows what was used)
        try:
            for step in self.send(session, text, None):
                reply = next((t for t in session["turns"][start:] if t["role"] == "assistant"), None)
                if why and reply is not None:
                    reply["varied"] = why
                yield step
        finally:
            session["settings"] = chosen

    def undo(self, session: dict) -> bool:
        """Remove the last question and everything after it, here and in the history (as the store's
        ``delete_last_turn`` does). Only within the current picture: a picture change is never undone."""
        last = _last_user_index(session)
        if last is None or session["turns"][last]["context"] != session["context"]:
            return False
        del session["turns"][last:]
        if session["conversation_id"] is not None:
            try:
                self._save(session, "delete_last_turn", session["conversation_id"])
            except NotFound:
                session["conversation_id"] = None
        return True

    def _remember_settings(self, session: dict, settings: dict) -> None:
        if settings == session["settings"]:
            return
        session["settings"] = dict(settings)
        if session["conversation_id"] is not None:
            try:
                self._save(session, "update_settings", session["conversation_id"], dict(settings))
            except NotFound:
                session["conversation_id"] = None

    # -- conversations -----------------------------------------------------------------------------------------
    def new_conversation(self, session: dict) -> None:
        owner, user, settings = session["owner"], session.get("user"), session["settings"]
        session.clear()
        session.update(new_session(), owner=owner, user=user, settings=settings)

    def conversation_rows(self, session: dict) -> list:
        """The owner's conversation summaries, newest first; [] when the store is unavailable."""
        if self.store is None or session["owner"] is None:
            return []
        try:
            rows = self._save(session, "list_conversations") or []
        except NotFound:
            return []
        return sorted(rows, key=lambda r: r.updated_at or r.created_at, reverse=True)

    def conversations(self, session: dict) -> list[tuple[str, str]]:
        """(label, id) pairs for the sidebar."""
        return [(f"{r.title} ({r.message_count})", r.id) for r in self.conversation_rows(session)]

    def open_conversation(self, session: dict, conversation_id: str) -> None:
        """Resume: picture, turns and settings restored. Unknown or someone else's id -> UserError."""
        if self.store is None or not conversation_id:
            raise UserError("There is no saved history.")
        try:
            view = self.store.get_conversation(session["owner"], conversation_id)
        except NotFound:
            raise UserError("That conversation does not exist (or was deleted).") from None
        except StoreError:
            raise UserError("History is unavailable right now (the database cannot be reached).") from None
        turns, context, image_hash = [], 0, None
        for m in view.messages:
            if m.image_hash:
                context += 1
                image_hash = m.image_hash
                turns.append(turn("note", m.text or "🖼️ Picture", context, image=True, digest=m.image_hash))
            elif m.role == "system":
                turns.append(turn("note", m.text, context))
            elif m.role in ("user", "assistant"):
                text = m.text if m.status != "error" else (m.text or f"⚠️ {m.error}")
                ids = {"token_ids": list(m.token_ids)} if m.token_ids is not None and m.status == "done" else {}
                turns.append(turn(m.role, text, context, status=m.status, **ids))
        image_hash = image_hash or view.image_hash
        image = None
        if image_hash:
            try:
                image = self.store.image_bytes(session["owner"], image_hash)
            except StoreError:
                turns.append(turn("note", "⚠️ The picture of this conversation could not be loaded.", context))
        settings = {**DEFAULT_DECODING, **(view.settings or {})}
        owner, user = session["owner"], session.get("user")
        session.clear()
        session.update(new_session(), owner=owner, user=user, conversation_id=view.id, image=image,
                       image_hash=image_hash, image_name="picture", context=context, turns=turns, settings=settings)

    def rename(self, session: dict, conversation_id: str, title: str) -> None:
        title = _title(check_text(title, self.max_message_chars, what="title"))
        if not conversation_id or not title:
            raise UserError("Pick a conversation and type a new title.")
        self._owned(self.store.rename_conversation, session, conversation_id, title)

    def delete(self, session: dict, conversation_id: str) -> dict:
        """Delete a conversation; returns what ``restore`` needs to put it back (Undo), kept by the caller only."""
        if not conversation_id:
            raise UserError("Pick a conversation to delete.")
        view = self._owned(self.store.get_conversation, session, conversation_id)
        images = {}
        for digest in {m.image_hash for m in view.messages if m.image_hash}:
            images[digest] = self.picture_bytes(session, digest)  # read now: deleting frees unused image files
        self._owned(self.store.delete_conversation, session, conversation_id)
        if session["conversation_id"] == conversation_id:
            self.new_conversation(session)
        return dict(owner=session["owner"], view=view, images=images)

    def restore(self, session: dict, deleted: dict) -> str:
        """Put a deleted conversation back from what ``delete`` returned: its title, settings, pictures and messages
        (with their token ids), under a new id. Returns the id."""
        if self.store is None or deleted.get("owner") != session["owner"]:
            raise UserError("That conversation cannot be restored here.")
        view, owner = deleted["view"], session["owner"]
        try:
            cid = self.store.create_conversation(owner, view.title, settings=view.settings)
            for m in view.messages:
                data, digest = deleted["images"].get(m.image_hash), None
                if data is not None:
                    digest = self.store.save_image(owner, cid, data, guess_mime(None, data))
                self.store.add_message(owner, cid, m.role, m.text, error=m.error, image_hash=digest,
                                       status="stopped" if m.status == "streaming" else m.status,
                                       token_ids=m.token_ids)
        except (StoreError, NotFound, OSError, ValueError):
            raise UserError("The conversation could not be restored (the history is unavailable).") from None
        return cid

    def picture_bytes(self, session: dict, digest: str) -> bytes | None:
        """One of the owner's saved pictures, or None when it cannot be read."""
        if self.store is None or not digest:
            return None
        try:
            return self.store.image_bytes(session["owner"], digest)
        except (StoreError, NotFound, OSError):
            return None

    def export(self, session: dict, conversation_id: str, folder: str | None = None) -> list[str]:
        """Write the conversation as JSON and Markdown files; returns their paths."""
        if not conversation_id:
            raise UserError("Pick a conversation to export.")
        data = self._owned(self.store.export_json, session, conversation_id)
        markdown = self._owned(self.store.export_markdown, session, conversation_id)
        folder = Path(folder or tempfile.mkdtemp(prefix="blip2-export-"))
        stem = "conversation-" + re.sub(r"[^A-Za-z0-9_-]", "", str(conversation_id))[:16]
        json_path, md_path = folder / f"{stem}.json", folder / f"{stem}.md"
        json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str))
        md_path.write_text(markdown)
        return [str(json_path), str(md_path)]

    def _owned(self, method, session, conversation_id, *args):
        if self.store is None:
            raise UserError("There is no saved history.")
        try:
            return method(session["owner"], conversation_id, *args)
        except NotFound:
            raise UserError("That conversation does not exist (or was deleted).") from None
        except StoreError:
            raise UserError("History is unavailable right now (the database cannot be reached).") from None

    # -- one-shot API (no history) ------------------------------------------------------------------------------
    def one_shot(self, data: bytes, question: str | None, settings: dict | None = None) -> Iterator[str]:
        """Cumulative text of a caption (``question`` None) or an answer. Every failure is a UserError: the
        message itself for bad input (picture, question, settings), MODEL_FAILED for anything else."""
        settings = dict(settings or DEFAULT_DECODING)
        if question is not None:
            question = self.check_message(question)
            if not question:
                raise UserError("Ask a question.")
        try:
            if len(data) > self.max_image_bytes:
                raise BadImage(f"The file is too large; the limit is {self.max_image_bytes / 2**20:.0f} MiB.")
            self.backend.check_image(data)
            stream = (self.backend.caption(data, settings) if question is None
                      else self.backend.chat(data, [], question, settings))
        except (BadImage, ValueError, BackendUnavailable) as exc:
            raise UserError(str(exc)) from None
        except Exception:  # noqa: BLE001 - said plainly to the caller; the details go to the log
            log.exception("one-shot: generation failed to start")
            raise UserError(MODEL_FAILED) from None
        text, chunks = "", iter(stream)
        try:
            for chunk in chunks:
                text += chunk
                yield text
        except BackendUnavailable as exc:
            raise UserError(str(exc)) from None
        except Exception:  # noqa: BLE001 - as above
            log.exception("one-shot: generation failed")
            raise UserError(MODEL_FAILED) from None
        finally:
            stream.cancel()
            if hasattr(chunks, "close"):
                chunks.close()


def _reply_ids(stats, shown: str, status: str) -> list[int] | None:
    """The model's ids for a finished reply, when they are known to spell exactly the text that was shown (and
    saved): a stopped, failed or otherwise different reply gets None, and the next turn re-tokenizes its text."""
    ids = getattr(stats, "token_ids", None)
    if status != "done" or ids is None or stats.text.strip() != shown.strip():
        return None
    return list(ids)


def _last_user_index(session: dict) -> int | None:
    for i in range(len(session["turns"]) - 1, -1, -1):
        if session["turns"][i]["role"] == "user":
            return i
    return None


def _title(text: str) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"
