"""The chat page: its layout and what each control does. ``build_page`` runs inside ``build_ui``'s Blocks (app/ui.py
keeps the API endpoints); the work behind each event is done by ``ChatApp`` (app/chat.py).

Chat first, as in ChatGPT, Claude or HF chat-ui: the conversation fills the window and is the only part that
scrolls; the composer is pinned under it with a thumbnail of the current picture beside it; saved conversations
live in a sidebar on the left (closed on phones, so the page opens on the chat) and the decoding settings in one on
the right.

How a message travels. Enter (or a preset, or an example card) first *accepts* it: a short step, in a concurrency
group of its own so it never waits behind the model, that clears the box and shows the message at once (marked as
waiting while another reply is still being written). Then one *generate* run in the model queue answers every
waiting message in order. Accept starts that run (by changing the ``kick`` State) only when none is running or on
its way, so there is never more than one: Gradio's Stop cancels only the latest run of an event, and it must reach
the one that is working. Last, *settle* shows the final state; it runs after Stop too. While anything is running or
waiting, the send button is a stop button and a status line says what is happening and for how long.
"""

from __future__ import annotations

import html
import io
import re
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr

from app import icons
from app.chat import ChatApp, UserError, owner_for, read_upload
from app.decoding import (BEAM, CONTROL_NAMES, MAX_SEED, SAMPLING, controls_from_settings, default_controls,
                          settings_from_controls)
from app.presets import STYLES, examples_for, presets_for, small_model
from app.render import chat_messages

CSS_PATH = Path(__file__).with_name("theme.css")
PHONE_MAX_WIDTH = 768  # Gradio's sidebars cover the whole screen up to this width
LAST_KEY = "blip2-chat-last-conversation"
HEALTH_POLL_S = 10  # how often an open page re-reads a model server's health (app/remote.py caches it 5 s)

# Runs once when the page loads: the elapsed-time counter of the status line (counted in the browser, so it moves
# during beam search too, when the server has nothing to send until the end), and the history sidebar opened on
# screens wide enough to show it beside the chat.
PAGE_JS = """
() => {
  const starts = new Map();
  setInterval(() => {
    for (const el of document.querySelectorAll('.elapsed[data-key]')) {
      if (!starts.has(el.dataset.key)) starts.set(el.dataset.key, performance.now());
      el.textContent = ((performance.now() - starts.get(el.dataset.key)) / 1000).toFixed(1) + ' s';
    }
  }, 200);
  const openHistory = (tries) => {
    const toggle = document.querySelector('#history-sidebar .toggle-button');
    if (!toggle) { if (tries > 0) setTimeout(() => openHistory(tries - 1), 100); return; }
    if (window.innerWidth > %d && !document.querySelector('#history-sidebar.open')) toggle.click();
  };
  openHistory(100);
}
""" % PHONE_MAX_WIDTH


def Slider(*args, **kw):  # noqa: N802 - a component
    """A slider without Gradio's reset button (its arrow glyph needs a symbol font; Precise / Creative reset)."""
    return gr.Slider(*args, buttons=[], **kw)


def _toggle_js(sidebar: str, close_on_phone: bool = False) -> str:
    """JS that opens or closes a sidebar by clicking its own toggle (so Gradio's state follows). With
    ``close_on_phone`` it only closes it, and only on a phone, where the sidebar covers the chat."""
    when = (f"window.innerWidth <= {PHONE_MAX_WIDTH} && document.querySelector('#{sidebar}.open')"
            if close_on_phone else "true")
    return (f"(...args) => {{ const t = document.querySelector('#{sidebar} .toggle-button'); "
            f"if (t && {when}) t.click(); return args; }}")


def _plain(text: str) -> str:
    """A chat note as a toast: no Markdown markers, no emoji."""
    text = icons.EMOJI_RANGES.sub("", text)
    return re.sub(r"\*\*|\*|`", "", text).strip()


class ChatPage:
    """The page's handlers. ``claim(session, request)`` checks who may use a session and returns its owner;
    ``checked(text)`` returns a message fit to send (both raise ``gr.Error`` to refuse; build_ui's API endpoints
    use them too); ``image_dir`` holds the thumbnails the chat shows, ``files_root`` the exports."""

    def __init__(self, chat: ChatApp, *, image_dir: Path, files_root: Path,
                 examples_dir: Path | None = None, card_text: str = ""):
        self.chat = chat
        self.card = chat.backend.card
        self.image_dir, self.files_root = Path(image_dir), Path(files_root)
        self.examples = examples_for(self.card, examples_dir)
        if self.examples:  # served from where they are: copies in the upload folder would be swept (app/uploads.py)
            gr.set_static_paths([p for _, p in self.examples])
        self.presets = presets_for(self.card)
        self.card_text = card_text
        self._guard = threading.Lock()  # the per-session queue and flags below change under it (tiny sections)

    # -- model server status ---------------------------------------------------------------------------------
    @property
    def has_health(self) -> bool:
        return callable(getattr(self.chat.backend, "health", None))

    def health_html(self) -> str:
        """The header's server status: a backend with ``health()`` (a model server) says whether it answers."""
        up, line = self.chat.backend.health()
        return (f'<span class="badge health {"up" if up else "down"}" role="status" '
                f'title="Model server: {html.escape(line)}">{"●" if up else "○"} {html.escape(line)}</span>')

    # -- who may use a session, and what may be sent -------------------------------------------------------------
    def claim(self, session: dict, request) -> str:
        """The session's owner; a request from another user than the session's gets an error toast and changes
        nothing (see chat.claim_session)."""
        try:
            return self.chat.ensure_owner(session, username(request))
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    def checked(self, text) -> str:
        try:
            return self.chat.check_message(text)
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    # -- view -------------------------------------------------------------------------------------------------
    @staticmethod
    def new_ui_state() -> dict:
        # queued: messages accepted but not yet answered; pending: a generate run is on its way (kicked, not yet
        # started); running: a run is answering; gen: counts answers, so the status line's timer restarts.
        return dict(queued=[], pending=False, running=False, gen=0, deleted=None)

    def picture_path(self, session: dict, t: dict) -> str | None:
        """A thumbnail file for a picture turn (made once; made again if the upload sweep removed it)."""
        digest = t.get("digest")
        if not digest:
            return None
        path = self.image_dir / f"{digest}.jpg"
        if path.exists():
            return str(path)
        data = session["image"] if session.get("image") is not None and t["context"] == session["context"] \
            else self.chat.picture_bytes(session, digest)
        return _thumbnail(data, path) if data else None

    def messages(self, session: dict, ui: dict) -> list[dict]:
        out = chat_messages(session, lambda t: self.picture_path(session, t))
        for text in ui["queued"]:
            out.append({"role": "user", "content": html.escape(text) + ' <span class="tag queued">'
                        + icons.glyph("clock") + " waiting: sent when the current answer is done</span>"})
        return out

    def preview(self, session: dict):
        """The pinned thumbnail of the current picture (hidden without one)."""
        current = next((t for t in reversed(session["turns"]) if t.get("image") and t.get("digest")), None)
        path = self.picture_path(session, current) if current and session.get("image") is not None else None
        return gr.update(value=path, visible=path is not None)

    @staticmethod
    def busy(ui: dict) -> bool:
        return bool(ui["running"] or ui["pending"] or ui["queued"])

    @staticmethod
    def composer(busy: bool, **kw):
        """The composer's send button turns into a stop button while anything is running or waiting."""
        return gr.update(submit_btn=not busy, stop_btn=busy, **kw)

    def status(self, session: dict, ui: dict) -> str:
        """The line above the composer: what is being done and for how long, and how many messages wait."""
        parts = []
        if ui["running"]:
            s = session["settings"]
            elapsed = f'<span class="elapsed" data-key="{ui["gen"]}">0.0 s</span>'
            reply = next((t for t in reversed(session["turns"]) if t["role"] == "assistant"), None)
            if not s["do_sample"] and s["num_beams"] > 1:
                parts.append(f'<span class="spinner"></span> Searching with {s["num_beams"]} beams · {elapsed} · '
                             'the answer appears when the search ends<span class="bar"></span>')
            elif reply is not None and reply.get("status") == "streaming" and reply["text"]:
                parts.append(f'<span class="spinner"></span> Writing · {elapsed}')
            else:
                parts.append(f'<span class="spinner"></span> Looking at the picture · {elapsed}')
        if ui["queued"]:
            n = len(ui["queued"])
            parts.append(f"{n} message{'s' if n > 1 else ''} waiting")
        if not parts:
            return ""
        return '<div class="gen-status" role="status">' + " · ".join(parts) + " · Stop with the square button</div>"

    def conv_update(self, session: dict):
        choices = self.chat.conversations(session)
        ids = {cid for _, cid in choices}
        return gr.update(choices=choices,
                         value=session["conversation_id"] if session["conversation_id"] in ids else None)

    def title_of(self, session: dict) -> str:
        cid = session["conversation_id"]
        return next((r.title for r in self.chat.conversation_rows(session) if r.id == cid), "") if cid else ""

    def settings_of(self, values) -> dict:
        return settings_from_controls(**dict(zip(CONTROL_NAMES, values)))

    # -- sending ------------------------------------------------------------------------------------------------
    def _accept(self, session: dict, ui: dict, text: str | None):
        """Queue ``text`` (if any); returns the kick for the generate run, or gr.skip() when one is already on its
        way or running (it answers every waiting message, this one included)."""
        with self._guard:
            if text:
                ui["queued"].append(text)
            if not ui["queued"] or ui["running"] or ui["pending"]:
                return gr.skip()
            ui["pending"] = True
            ui["gen"] += 1
            return ui["gen"]

    def accept_box(self, request: gr.Request, value, session, ui):
        """Enter in the composer: attach the picture (if any) and queue the text. A file that is not a usable
        picture or a message that cannot be sent is refused with a toast (a warning, not an error: nothing broke), and
        the box keeps its text and file."""
        self.claim(session, request)
        value = value or {}
        unchanged = (gr.skip(),) * 5
        try:
            text = self.checked(value.get("text"))
        except gr.Error as exc:
            gr.Warning(str(exc.message), title="Message not sent")
            return unchanged
        files, preview = value.get("files") or [], gr.skip()
        if files:
            path = files[-1] if isinstance(files[-1], str) else files[-1].get("path")
            before = len(session["turns"])
            if not self.chat.set_image_file(session, path):
                note = session["turns"][before:]
                del session["turns"][before:]  # said in the toast instead; nothing else changed
                gr.Warning(_plain(note[-1]["text"]) if note else "That file could not be used.",
                           title="Picture not used")
                return unchanged
            preview = self.preview(session)
        kick = self._accept(session, ui, text)
        busy = self.busy(ui)
        return (self.composer(busy, value={"text": "", "files": []}), self.messages(session, ui), preview,
                self.status(session, ui), kick)

    def accept_preset(self, prompt: str):
        def handler(request: gr.Request, session, ui):
            self.claim(session, request)
            kick = self._accept(session, ui, prompt)
            return (self.composer(self.busy(ui)), self.messages(session, ui), gr.skip(), self.status(session, ui),
                    kick)
        return handler

    def accept_example(self, request: gr.Request, evt: gr.SelectData, session, ui):
        """An example card: its picture becomes the current one and its question is asked."""
        self.claim(session, request)
        example, path = self.examples[evt.index]
        self.chat.set_image(session, read_upload(path), path.name)
        kick = self._accept(session, ui, example.question)
        return (self.composer(self.busy(ui)), self.messages(session, ui), self.preview(session),
                self.status(session, ui), kick)

    def generate(self, request: gr.Request, session, ui, *controls):
        """Answer the waiting messages, oldest first, streaming each reply."""
        self.claim(session, request)
        yield from self._run(session, ui, controls, first=None)

    def regenerate(self, request: gr.Request, session, ui, *controls):
        """The Chatbot's retry button: answer the last question again (differently; see ChatApp.regenerate), then
        any message sent meanwhile."""
        self.claim(session, request)
        yield from self._run(session, ui, controls,
                             first=lambda: self.chat.regenerate(session, self.settings_of(controls)))

    def _run(self, session, ui, controls, first):
        with self._guard:
            ui["pending"], ui["running"] = False, True
            ui["gen"] += 1
        try:
            if first is not None:
                yield from self._stream(session, ui, first())
            while True:
                with self._guard:
                    if not ui["queued"]:
                        ui["running"] = False
                        break
                    text = ui["queued"].pop(0)
                    ui["gen"] += 1
                yield from self._stream(session, ui, self.chat.send(session, text, self.settings_of(controls)))
        finally:
            with self._guard:
                ui["running"] = False
        yield self.messages(session, ui), self.status(session, ui), self.composer(self.busy(ui))

    def _stream(self, session, ui, steps):
        first = True
        try:
            for _ in steps:
                yield (self.messages(session, ui), self.status(session, ui),
                       self.composer(True) if first else gr.skip())
                first = False
        except UserError as exc:
            raise gr.Error(str(exc)) from None
        finally:
            steps.close()  # on Stop or a closed page too: stops the model at its next token
        reply = next((t for t in reversed(session["turns"]) if t["role"] == "assistant"), None)
        if reply is not None and reply.get("status") == "error":
            gr.Warning(_plain(reply["text"]), title="No answer")

    def settle(self, request: gr.Request, value, session, ui):
        """After a run ends (done, failed or stopped): the final view, the composer ready again, the sidebar
        refreshed (titles and message counts change as a chat goes on). Messages left waiting with no run to
        answer them (the run failed) go back into the box, unsent."""
        self.claim(session, request)
        deadline = time.monotonic() + 30  # a stopped run finishes its current step first
        while ui["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._guard:
            orphans = [] if ui["running"] or ui["pending"] else list(ui["queued"])
            del ui["queued"][:len(orphans)]
        box = {"value": _unsent(orphans, value)} if orphans else {}
        return (self.messages(session, ui), self.status(session, ui), self.composer(self.busy(ui), **box),
                self.conv_update(session), self.title_of(session))

    def stop(self, request: gr.Request, value, session, ui):
        """Stop: the running reply ends (Gradio closes its run; the partial answer is kept and marked stopped)
        and messages still waiting go back into the box, unsent, so nothing typed is lost."""
        self.claim(session, request)
        with self._guard:
            waiting, ui["queued"][:] = list(ui["queued"]), []
            ui["pending"] = False
        deadline = time.monotonic() + 5
        while ui["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        box = {"value": _unsent(waiting, value)} if waiting else {}
        return self.composer(self.busy(ui), **box), self.messages(session, ui), self.status(session, ui)

    # -- chat-level actions ---------------------------------------------------------------------------------------
    def view(self, session, ui):
        """Chat, pinned picture, status line and composer, after a change of conversation."""
        return self.messages(session, ui), self.preview(session), self.status(session, ui), \
            self.composer(self.busy(ui))

    def load(self, request: gr.Request, token, last, session, ui):
        """Page load: who this is, their conversations, and the one they had open last (reopened)."""
        self.claim(session, request)
        session["owner"], token = owner_for(username(request), token)
        if last and not session["turns"]:
            try:
                self.chat.open_conversation(session, last)
            except UserError:  # deleted meanwhile, or from another account: start empty
                pass
        controls = controls_from_settings(session["settings"])
        return (token, *self.view(session, ui), self.conv_update(session), self.title_of(session),
                _user_html(username(request)), *[controls[n] for n in CONTROL_NAMES])

    def undo(self, request: gr.Request, session, ui):
        self.claim(session, request)
        self.chat.undo(session)
        return (*self.view(session, ui), self.conv_update(session))

    def new_chat(self, request: gr.Request, session, ui):
        self.claim(session, request)
        self.chat.new_conversation(session)
        return (*self.view(session, ui), self.conv_update(session), "")

    def open(self, request: gr.Request, conversation_id, session, ui):
        self.claim(session, request)
        try:
            self.chat.open_conversation(session, conversation_id)
        except UserError as exc:
            gr.Warning(str(exc))
            return (*self.view(session, ui), self.conv_update(session), gr.skip(),
                    *[gr.skip()] * len(CONTROL_NAMES))
        controls = controls_from_settings(session["settings"])
        return (*self.view(session, ui), self.conv_update(session), self.title_of(session),
                *[controls[n] for n in CONTROL_NAMES])

    def rename(self, request: gr.Request, conversation_id, title, session):
        self.claim(session, request)
        try:
            self.chat.rename(session, conversation_id, title)
        except (UserError, ValueError) as exc:
            gr.Warning(str(exc))
        return self.conv_update(session)

    def ask_delete(self, request: gr.Request, conversation_id, session):
        """Delete asks first, naming the conversation."""
        self.claim(session, request)
        title = next((r.title for r in self.chat.conversation_rows(session) if r.id == conversation_id), None)
        if title is None:
            gr.Warning("Pick a conversation to delete.")
            return gr.update(visible=False), gr.skip()
        return gr.update(visible=True), f"Delete **{_md_escape(title)}**?"

    def delete(self, request: gr.Request, conversation_id, session, ui):
        self.claim(session, request)
        was_open = session["conversation_id"] == conversation_id
        try:
            deleted = self.chat.delete(session, conversation_id)
        except UserError as exc:
            gr.Warning(str(exc))
            return (*self.view(session, ui), self.conv_update(session), gr.skip(), gr.update(visible=False),
                    gr.update(visible=False), gr.skip())
        ui["deleted"] = dict(deleted, was_open=was_open)
        return (*self.view(session, ui), self.conv_update(session), "" if was_open else gr.skip(),
                gr.update(visible=False), gr.update(visible=True),
                f"Deleted **{_md_escape(deleted['view'].title)}**.")

    def undo_delete(self, request: gr.Request, session, ui):
        """Undo a delete: the conversation comes back (under a new id) and reopens if it was open."""
        self.claim(session, request)
        deleted, ui["deleted"] = ui["deleted"], None
        if deleted is None:
            return (*self.view(session, ui), self.conv_update(session), gr.skip(), gr.update(visible=False),
                    *[gr.skip()] * len(CONTROL_NAMES))
        try:
            cid = self.chat.restore(session, deleted)
            if deleted["was_open"] and not session["turns"]:
                self.chat.open_conversation(session, cid)
        except UserError as exc:
            gr.Warning(str(exc))
        controls = controls_from_settings(session["settings"])
        return (*self.view(session, ui), self.conv_update(session), self.title_of(session),
                gr.update(visible=False), *[controls[n] for n in CONTROL_NAMES])

    def export(self, request: gr.Request, conversation_id, session):
        self.claim(session, request)
        try:
            files = self.chat.export(session, conversation_id,
                                     folder=tempfile.mkdtemp(prefix="blip2-export-", dir=self.files_root))
        except UserError as exc:
            gr.Warning(str(exc))
            return gr.update(value=None, visible=False)
        return gr.update(value=files, visible=True)

    # -- settings panel -------------------------------------------------------------------------------------------
    @staticmethod
    def visible_controls(mode, num_beams):
        """Only the settings that do something in the chosen mode: temperature, top-p and seed for sampling;
        beams for beam search, and the length penalty only with more than one beam."""
        sampling = mode == SAMPLING
        try:
            beams = int(num_beams or 1)
        except (TypeError, ValueError):
            beams = 1
        return (gr.update(visible=sampling), gr.update(visible=sampling), gr.update(visible=sampling),
                gr.update(visible=not sampling), gr.update(visible=not sampling and beams > 1))

    @staticmethod
    def style(name: str):
        values = {**default_controls(), **STYLES[name]}
        return lambda: [values[n] for n in CONTROL_NAMES]

    # -- layout and wiring ----------------------------------------------------------------------------------------
    def build(self, demo: gr.Blocks, *, model_events: dict, browser_secret: str | None, browser_key: str):
        """Lay the page out in the current Blocks and wire its events; returns the session State (the API
        endpoints use it too)."""
        defaults = default_controls()
        private = dict(api_visibility="private")
        quick = dict(queue=False, **private)
        session = gr.State(_new_session())
        ui = gr.State(self.new_ui_state())
        kick = gr.State(0)  # changed by an accept step when a generate run must start
        token = gr.BrowserState("", storage_key=browser_key, secret=browser_secret)
        last = gr.BrowserState("", storage_key=LAST_KEY, secret=browser_secret)

        with gr.Sidebar(label="Conversations", open=False, elem_id="history-sidebar", width=300):
            gr.HTML(f'<div class="side-title">{icons.svg("history")} Your conversations</div>')
            conv_list = gr.Radio(choices=[], show_label=False, elem_id="history", container=False)
            with gr.Column(elem_id="selected-conv", elem_classes="side-box"):
                title_box = gr.Textbox(label="Selected conversation", placeholder="Title", elem_id="conv-title",
                                       max_lines=1)
                with gr.Row(elem_classes="icon-row"):
                    rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                    export_btn = gr.Button("Export", size="sm", elem_id="export")
                    delete_btn = gr.Button("Delete", size="sm", elem_id="delete")
            with gr.Column(visible=False, elem_id="confirm-delete", elem_classes="side-box") as confirm_box:
                confirm_text = gr.Markdown()
                gr.Markdown("Its messages and pictures are removed from the history.", elem_classes="muted")
                with gr.Row(elem_classes="icon-row"):
                    confirm_yes = gr.Button("Delete", variant="stop", size="sm", elem_id="confirm-delete-yes")
                    confirm_no = gr.Button("Cancel", size="sm", elem_id="confirm-delete-no")
            with gr.Column(visible=False, elem_id="deleted", elem_classes="side-box") as undo_box:
                undo_text = gr.Markdown()
                undo_delete_btn = gr.Button("Undo", size="sm", elem_id="undo-delete")
            export_files = gr.File(label="Exported files (JSON and Markdown)", file_count="multiple",
                                   interactive=False, elem_id="export-files", visible=False)

        with gr.Sidebar(label="Settings", open=False, position="right", elem_id="settings-sidebar", width=320):
            gr.HTML(f'<div class="side-title">{icons.svg("sliders")} Answer settings</div>')
            gr.Markdown("Remembered per conversation.", elem_classes="muted")
            with gr.Row(elem_classes="icon-row"):
                precise_btn = gr.Button("Precise", size="sm", elem_id="style-precise")
                creative_btn = gr.Button("Creative", size="sm", elem_id="style-creative")
            c = {
                "mode": gr.Radio([("Greedy / beam search", BEAM), ("Sampling", SAMPLING)], value=defaults["mode"],
                                 label="Decoding", elem_id="mode",
                                 info="Greedy (1 beam) gives the model's most likely answer; sampling varies it"),
                "temperature": Slider(0.05, 2.0, value=defaults["temperature"], step=0.05, label="Temperature",
                                         visible=False, elem_id="temperature",
                                         info="lower: safer words; higher: more varied"),
                "top_p": Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p", visible=False,
                                   elem_id="top-p"),
                "seed": gr.Number(value=defaults["seed"], label="Seed", precision=0, minimum=0, maximum=MAX_SEED,
                                  visible=False, elem_id="seed", placeholder="random",
                                  info="empty: a new random seed every time; a number repeats an answer"),
                "num_beams": Slider(1, 8, value=defaults["num_beams"], step=1, label="Beams", elem_id="beams",
                                       info="1 is greedy and streams; more search longer and answer at the end"),
                "length_penalty": Slider(-2.0, 2.0, value=defaults["length_penalty"], step=0.1,
                                            label="Length penalty", visible=False, elem_id="length-penalty",
                                            info="> 0 favours longer answers"),
                "max_new_tokens": Slider(1, 512, value=defaults["max_new_tokens"], step=1,
                                            label="Max new tokens", elem_id="max-new-tokens",
                                            info="answers stop here (and say so)"),
                "min_new_tokens": Slider(0, 256, value=defaults["min_new_tokens"], step=1,
                                            label="Min length (tokens)", elem_id="min-new-tokens"),
                "repetition_penalty": Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.05,
                                                label="Repetition penalty", elem_id="repetition-penalty"),
            }
            controls = [c[n] for n in CONTROL_NAMES]
            gr.Markdown(self.card_text, elem_id="model-details")

        with gr.Column(elem_id="main-col"):
            with gr.Row(elem_id="topbar", equal_height=True):
                # Icon buttons keep their words (read out by screen readers), drawn at size 0 (theme.css).
                history_btn = gr.Button("Conversations", elem_id="open-history", scale=0, min_width=40, size="sm")
                gr.HTML(f'<div class="brand">{icons.svg("image", 20)}<span>BLIP-2 chat</span></div>',
                        elem_id="brand")
                summary = html.escape(self.card.summary)
                gr.HTML(f'<span class="badge" title="The model answering: {summary}">{summary}</span>',
                        elem_id="model-card")
                # A model server (app/remote.py) can go down while the page is open: its health shows here.
                health_box = gr.HTML(self.health_html(), elem_id="server-health") if self.has_health else None
                user_box = gr.HTML("", elem_id="user-box")
                new_btn = gr.Button("New chat", elem_id="new-chat", scale=0, min_width=40, size="sm")
                settings_btn = gr.Button("Settings", elem_id="open-settings", scale=0, min_width=40, size="sm")
            if self.card.untrained:
                gr.Markdown("**This model is untrained:** it answers fluently but ignores the picture. "
                            "Load trained weights with `--model` for real answers.", elem_id="untrained-banner")
            chatbot = gr.Chatbot(
                show_label=False, elem_id="chat", buttons=["copy"], height="100%", autoscroll=True,
                placeholder=self.placeholder(), examples=[
                    dict(text=e.question, display_text=e.label, files=[str(p)]) for e, p in self.examples],
                feedback_options=None, layout="bubble", latex_delimiters=[], allow_file_downloads=False)
            with gr.Row(elem_id="presets"):
                preset_btns = [(gr.Button(name, size="sm", elem_classes="chip"), prompt)
                               for name, prompt in self.presets.items()]
            status = gr.HTML("", elem_id="gen-status")
            with gr.Row(elem_id="composer", equal_height=True):
                preview = gr.Image(type="filepath", interactive=False, show_label=False, container=False,
                                   visible=False, elem_id="current-picture", buttons=["fullscreen"], height=56,
                                   width=56, scale=0, min_width=56)
                box = gr.MultimodalTextbox(
                    placeholder="Ask about the picture…", file_count="single",
                    file_types=["image"], sources=["upload"], show_label=False, elem_id="message", autofocus=True,
                    submit_btn=True, stop_btn=False, scale=1, max_lines=8)

        # -- events ----------------------------------------------------------------------------------------------
        view = [chatbot, preview, status, box]
        gen_in, gen_out = [session, ui, *controls], [chatbot, status, box]
        accept_out = [box, chatbot, preview, status, kick]
        settle_out = [chatbot, status, box, conv_list, title_box]

        demo.load(self.load, [token, last, session, ui], [token, *view, conv_list, title_box, user_box, *controls],
                  show_progress="hidden", **private)
        demo.load(None, js=PAGE_JS, **private)
        if health_box is not None:  # polled outside the model queue: a busy server must not hide its own status
            gr.Timer(HEALTH_POLL_S).tick(self.health_html, None, health_box, show_progress="hidden", **quick)
        history_btn.click(None, js=_toggle_js("history-sidebar"), **private)
        settings_btn.click(None, js=_toggle_js("settings-sidebar"), **private)

        # Accept (quick, outside the queue) -> one generate run (model queue) -> settle.
        # Accept steps go through the queue (a State's change event is only dispatched after a queued event), in
        # the default concurrency group: they never wait behind the model.
        # The status line and the stop button show progress; Gradio's own spinners would repeat it.
        accept = dict(show_progress="hidden", **private)
        box.submit(self.accept_box, [box, session, ui], accept_out, **accept)
        for btn, prompt in preset_btns:
            btn.click(self.accept_preset(prompt), [session, ui], accept_out, **accept)
        chatbot.example_select(self.accept_example, [session, ui], accept_out, **accept)
        generate = kick.change(self.generate, gen_in, gen_out, **model_events, **accept)
        retry = chatbot.retry(self.regenerate, gen_in, gen_out, **model_events, **accept)
        for run in (generate, retry):
            run.then(self.settle, [box, session, ui], settle_out, **quick)
        # The cancel first, on its own: the browser runs a trigger's listeners in order and waits for each, and
        # self.stop waits for the cancelled run to end.
        box.stop(None, cancels=[generate, retry], **private)
        box.stop(self.stop, [box, session, ui], [box, chatbot, status], **quick)

        chatbot.undo(self.undo, [session, ui], [*view, conv_list], **private)
        for clear in (new_btn.click, chatbot.clear):
            clear(self.new_chat, [session, ui], [*view, conv_list, title_box], **private)
        conv_list.input(self.open, [conv_list, session, ui], [*view, conv_list, title_box, *controls], **private)
        conv_list.input(None, js=_toggle_js("history-sidebar", close_on_phone=True), **private)  # back to the chat
        conv_list.change(lambda cid: cid or "", [conv_list], [last], **quick)  # reopened after a reload
        rename_btn.click(self.rename, [conv_list, title_box, session], [conv_list], **private)
        delete_btn.click(self.ask_delete, [conv_list, session], [confirm_box, confirm_text], **private)
        confirm_no.click(lambda: gr.update(visible=False), None, [confirm_box], **quick)
        confirm_yes.click(self.delete, [conv_list, session, ui],
                          [*view, conv_list, title_box, confirm_box, undo_box, undo_text], **private)
        undo_delete_btn.click(self.undo_delete, [session, ui],
                              [*view, conv_list, title_box, undo_box, *controls], **private)
        export_btn.click(self.export, [conv_list, session], [export_files], **private)

        shown = [c["temperature"], c["top_p"], c["seed"], c["num_beams"], c["length_penalty"]]
        for control in (c["mode"], c["num_beams"]):
            control.change(self.visible_controls, [c["mode"], c["num_beams"]], shown, **quick)
        precise_btn.click(self.style("Precise"), None, controls, **quick)
        creative_btn.click(self.style("Creative"), None, controls, **quick)
        return session

    @staticmethod
    def css() -> str:
        """The page's style sheet: theme.css plus the buttons' icons."""
        return CSS_PATH.read_text() + "\n" + icons.stylesheet({
            "#open-history": "history", "#new-chat": "plus", "#open-settings": "sliders", "#rename": "pencil",
            "#export": "download", "#delete": "trash", "#confirm-delete-yes": "trash", "#undo-delete": "undo"})

    def placeholder(self) -> str:
        """The empty chat: what to do, and what this model is good at."""
        if small_model(self.card):
            hint = ("This small model knows simple drawn shapes: ask what shape something is, its colour, or a "
                    "yes/no question (\"Is there a triangle?\"). Photos and stories are beyond it.")
        else:
            hint = "Ask for a caption, a description, or anything about what is in the picture."
        return (f'<div class="empty"><span class="empty-icon">{icons.glyph("image")}</span>'
                "<h3>Chat about a picture</h3>"
                f"<p>Attach, paste or drop a picture below, then ask about it. Or start with an example:</p>"
                f'<p class="muted">{hint}</p></div>')


def _unsent(texts: list[str], value) -> dict:
    """The composer's value with unsent messages put back before whatever is being typed."""
    typed = ((value or {}).get("text") or "").strip()
    return {"text": "\n\n".join(texts + ([typed] if typed else [])), "files": (value or {}).get("files") or []}


def _new_session() -> dict:
    from app.chat import new_session

    return new_session()


def username(request) -> str | None:
    return getattr(request, "username", None) or None


def _user_html(name: str | None) -> str:
    """The header's account corner when logging in is on: who is signed in, and a way out (Gradio's /logout)."""
    if not name:
        return ""
    return (f'<span class="user">{icons.svg("user")} {html.escape(name)}</span> '
            f'<a class="logout" href="logout">{icons.svg("logout")} Log out</a>')


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+!|<>~-])", r"\\\1", text)


def _thumbnail(data: bytes, path: Path, side: int = 384) -> str | None:
    """A small JPEG of ``data`` at ``path`` (the chat shows pictures small; a 20 MB upload need not travel back)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (side, side))  # JPEG: decode at a reduced size right away
            img = img.convert("RGB")
            img.thumbnail((side, side))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            img.save(tmp, "JPEG", quality=85)
            tmp.replace(path)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return str(path)
