"""The Gradio app: the chat page (app/page.py: layout and event wiring) and the API endpoints. What each event does
lives in ``app/chat.py`` (plain functions).

``build_ui(backend, store)`` returns a ``gr.Blocks`` whose ``launch()`` applies this app's safe defaults (upload
limit, no run history, no monitoring, no extra allowed paths, queue bounds). Named API endpoints for
``gradio_client``: ``/caption`` (image -> text), ``/ask`` (image, question -> text), ``/chat`` (image or None,
message -> streamed text, multi-turn per client session), ``/history`` (the caller's own conversations) and
``/conversation`` (one of them, as JSON).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402
from gradio.utils import get_upload_folder  # noqa: E402

from app.backend import Backend, ModelCard  # noqa: E402
from app.chat import MAX_MESSAGE_CHARS, ChatApp, UserError, read_upload  # noqa: E402
from app.page import ChatPage  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
MAX_UPLOAD = "25mb"  # Gradio refuses bigger uploads outright; 20-25 MB get blip2's own message in the chat
BROWSER_KEY = "blip2-chat-owner"
LOGIN_MESSAGE = "<strong>BLIP-2 chat</strong>: sign in to chat about your pictures."


def card_markdown(card: ModelCard) -> str:
    """The always-visible model line, plus a plain statement of what an untrained model can and cannot do."""
    text = (f"**Model:** `{card.source}` · **precision:** `{card.precision}` · **device:** `{card.device}`"
            f" · LLM: {card.llm_family}")
    if card.untrained:
        text += ("\n\n> **This model is untrained.** Its Q-Former (the part that looks at the picture) has "
                 "random weights, so the language model answers fluently but **ignores the image**: answers "
                 "about what is in the picture are guesses. The app itself (upload, chat, history, settings) "
                 "works fully. Load trained weights with `--model` for real answers.")
    for note in card.notes:
        text += f"\n\n{note}"
    return text


class Blip2Blocks(gr.Blocks):
    """A Blocks whose ``launch()`` defaults to this app's safe settings (callers may still override them)."""

    launch_defaults: dict = {}

    def launch(self, **kwargs):  # type: ignore[override]
        return super().launch(**{**self.launch_defaults, **kwargs})


def build_ui(backend: Backend, store=None, *, auth=None, max_concurrency: int = 1, queue_size: int = 16,
             browser_secret: str | None = None, examples_dir: Path = EXAMPLES_DIR,
             max_message_chars: int = MAX_MESSAGE_CHARS) -> gr.Blocks:
    """The app. ``auth``: None, [(user, password), ...] or a callable; with auth the owner of conversations is
    the username, without it a random id kept in the browser (``gr.BrowserState``). ``max_concurrency``
    generations run at once (all model endpoints share one limit); ``queue_size`` more wait; past that, callers
    are told the queue is full. ``browser_secret`` keeps the browser's id readable across restarts.
    ``max_message_chars`` caps one message (longer ones are refused with a message saying so).

    Pictures shown in the image panel and exports are written under Gradio's upload folder (``GRADIO_TEMP_DIR``),
    next to the uploads, so the sweep that bounds that folder (app/uploads.py, started by app.py) covers them."""
    chat = ChatApp(backend, store, max_message_chars=max_message_chars)
    files_root = Path(get_upload_folder())
    files_root.mkdir(parents=True, exist_ok=True)
    image_dir = Path(tempfile.mkdtemp(prefix="blip2-app-", dir=files_root))  # thumbnails the chat shows
    model_events = dict(concurrency_id="model", concurrency_limit=max_concurrency)

    # The page's session and text checks, shared by the API endpoints below.
    page = ChatPage(chat, image_dir=image_dir, files_root=files_root, examples_dir=examples_dir,
                    card_text=card_markdown(backend.card))
    claim, checked = page.claim, page.checked

    # -- API-only handlers ------------------------------------------------------------------------------------
    def _bytes(path) -> bytes:
        if not path:
            raise gr.Error("Send a picture (gradio_client.handle_file(path)).")
        try:
            return read_upload(path)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def _one_shot(path, question):
        # A generator, so Stop/disconnect close it and the model stops (a plain function could not be cancelled).
        try:
            yield from chat.one_shot(_bytes(path), question)
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    def api_caption(image):
        """Caption a picture (streamed: the text so far)."""
        yield from _one_shot(image, None)

    def api_ask(image, question):
        """Answer one question about a picture, without history (streamed: the text so far)."""
        question = checked(question)  # before the picture is read: the cheaper check first
        if not question:
            raise gr.Error("Ask a question.")
        yield from _one_shot(image, question)

    def api_chat(image, message, session, request: gr.Request):
        """Multi-turn chat, streamed: the reply so far after every chunk. Send a picture with the first message
        (later messages may send None to keep it, or a new picture to start a new visual context). The
        conversation is saved under this client's session."""
        claim(session, request)
        message = checked(message)  # before the picture: a refused message changes nothing
        if image:
            before = len(session["turns"])
            if not chat.set_image_file(session, image):
                raise gr.Error(session["turns"][-1]["text"] if len(session["turns"]) > before else "Bad picture.")
        if session["image"] is None:
            raise gr.Error("Send a picture with your first message.")
        if not message:
            raise gr.Error("Send a message.")
        reply, last = "", None
        for _ in chat.send(session, message, None):
            last = next(t for t in reversed(session["turns"]) if t["role"] == "assistant")
            reply = last["text"]
            yield reply
        if last is not None and last.get("status") == "error":  # a client must see an error, not a reply
            raise gr.Error(reply.removeprefix("⚠️").strip())
        notes = [t["text"] for t in session["turns"][-2:] if t["role"] == "note"]
        if notes:
            yield reply + "\n\n" + "\n".join(notes)

    def api_history(session, request: gr.Request):
        """Your saved conversations: [{id, title}]."""
        claim(session, request)
        return [dict(id=r.id, title=r.title, messages=r.message_count, updated_at=str(r.updated_at))
                for r in chat.conversation_rows(session)]

    def api_conversation(conversation_id, session, request: gr.Request):
        """One of your conversations as JSON."""
        claim(session, request)
        try:
            return chat._owned(chat.store.export_json, session, conversation_id) if chat.store else {}
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    # -- the page (app/page.py) -------------------------------------------------------------------------------
    with Blip2Blocks(title="BLIP-2 chat", analytics_enabled=False, fill_height=True, fill_width=True) as demo:
        session = page.build(demo, model_events=model_events, browser_secret=browser_secret, browser_key=BROWSER_KEY)
        with gr.Column(visible=False):  # the API endpoints' inputs and outputs
            api_image = gr.File(type="filepath", label="image")
            api_text = gr.Textbox(label="message")
            api_id = gr.Textbox(label="conversation_id")
            api_out = gr.Textbox(label="reply")
            api_json = gr.JSON(label="data")
            api_trigger = gr.Button()

        api_trigger.click(api_caption, [api_image], [api_out], api_name="caption", **model_events)
        api_trigger.click(api_ask, [api_image, api_text], [api_out], api_name="ask", **model_events)
        api_trigger.click(api_chat, [api_image, api_text, session], [api_out], api_name="chat", **model_events)
        api_trigger.click(api_history, [session], [api_json], api_name="history")
        api_trigger.click(api_conversation, [api_id, session], [api_json], api_name="conversation")

    demo.queue(max_size=queue_size, default_concurrency_limit=4)
    demo.launch_defaults = dict(
        auth=auth, max_file_size=MAX_UPLOAD, allowed_paths=None, enable_monitoring=False, run_history=False,
        ssr_mode=False, show_error=False, footer_links=["api", "gradio"], mcp_server=False,
        css=page.css(), auth_message=LOGIN_MESSAGE,
    )
    demo.chat_app, demo.page = chat, page  # for tests
    return demo
