"""The Gradio UI: layout and event wiring. What each event does lives in ``app/chat.py`` (plain functions).

``build_ui(backend, store)`` returns a ``gr.Blocks`` whose ``launch()`` applies this app's safe defaults (upload
limit, no run history, no monitoring, no extra allowed paths, queue bounds). Named API endpoints for
``gradio_client``: ``/caption`` (image -> text), ``/ask`` (image, question -> text), ``/chat`` (image or None,
message -> streamed text, multi-turn per client session), ``/history`` (the caller's own conversations) and
``/conversation`` (one of them, as JSON).
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry

import hashlib  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from app.backend import Backend, ModelCard  # noqa: E402
from app.chat import (BEAM, CONTROL_NAMES, PRESETS, SAMPLING, ChatApp, UserError, chat_messages,  # noqa: E402
                      controls_from_settings, default_controls, guess_mime, new_session, owner_for, read_upload,
                      settings_from_controls)

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
MAX_UPLOAD = "25mb"  # Gradio refuses bigger uploads outright; 20-25 MB get blip2's own message in the chat
BROWSER_KEY = "blip2-chat-owner"


def card_markdown(card: ModelCard) -> str:
    """The always-visible model line, plus a plain statement of what an untrained model can and cannot do."""
    text = (f"**Model:** `{card.source}` · **precision:** `{card.precision}` · **device:** `{card.device}`"
            f" · LLM: {card.llm_family}")
    if card.untrained:
        text += ("\n\n> ⚠️ **This model is untrained.** Its Q-Former (the part that looks at the picture) has "
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
             browser_secret: str | None = None, examples_dir: Path = EXAMPLES_DIR) -> gr.Blocks:
    """The app. ``auth``: None, [(user, password), ...] or a callable; with auth the owner of conversations is
    the username, without it a random id kept in the browser (``gr.BrowserState``). ``max_concurrency``
    generations run at once (all model endpoints share one limit); ``queue_size`` more wait; past that, callers
    are told the queue is full. ``browser_secret`` keeps the browser's id readable across restarts."""
    chat = ChatApp(backend, store)
    examples = sorted(Path(examples_dir).glob("*.jpg")) if examples_dir else []
    image_dir = Path(tempfile.mkdtemp(prefix="blip2-app-"))  # resumed pictures, shown in the image panel
    model_events = dict(concurrency_id="model", concurrency_limit=max_concurrency)

    def username(request: gr.Request | None) -> str | None:
        return getattr(request, "username", None) or None

    def image_file(session: dict):
        data = session["image"]
        if data is None:
            return None
        suffix = "." + guess_mime(None, data).split("/")[1].replace("unknown", "bin")
        path = image_dir / (hashlib.sha256(data).hexdigest() + suffix)
        if not path.exists():
            path.write_bytes(data)
        return str(path)

    def conv_update(session: dict):
        choices = chat.conversations(session)
        ids = {cid for _, cid in choices}
        return gr.update(choices=choices, value=session["conversation_id"] if session["conversation_id"] in ids
                         else None)

    def settings_of(values) -> dict:
        return settings_from_controls(**dict(zip(CONTROL_NAMES, values)))

    # -- handlers (thin: the work is in ChatApp) ----------------------------------------------------------------
    # Gradio injects gr.Request only into positional parameters: with *controls it must come first.
    def on_load(token, session, request: gr.Request):
        session["owner"], token = owner_for(username(request), token)
        return token, session, conv_update(session), chat_messages(session), image_file(session)

    def on_submit(request: gr.Request, value, session, *controls):
        chat.ensure_owner(session, username(request))
        value = value or {}
        text, files = (value.get("text") or "").strip(), value.get("files") or []
        image_out = gr.skip()
        if files:
            path = files[-1] if isinstance(files[-1], str) else files[-1].get("path")
            if not chat.set_image_file(session, path):
                # Nothing lost: the text goes back into the box, picture and conversation stay.
                yield {"text": text, "files": []}, chat_messages(session), gr.skip(), session, gr.skip()
                return
            image_out = image_file(session)
        yield {"text": "", "files": []}, chat_messages(session), image_out, session, gr.skip()
        if text:
            for _ in chat.send(session, text, settings_of(controls)):
                yield gr.skip(), chat_messages(session), gr.skip(), session, gr.skip()
        yield gr.skip(), chat_messages(session), gr.skip(), session, conv_update(session)

    def on_preset(prompt):
        # A closure, not functools.partial: Gradio finds gr.Request through type hints, which a partial hides.
        def handler(request: gr.Request, session, *controls):
            chat.ensure_owner(session, username(request))
            for _ in chat.send(session, prompt, settings_of(controls)):
                yield chat_messages(session), session
            yield chat_messages(session), session
        return handler

    def on_regenerate(request: gr.Request, session, *controls):
        chat.ensure_owner(session, username(request))
        for _ in chat.regenerate(session, settings_of(controls)):
            yield chat_messages(session), session
        yield chat_messages(session), session

    def on_undo(session, request: gr.Request):
        chat.ensure_owner(session, username(request))
        chat.undo(session)
        return chat_messages(session), session, conv_update(session)

    def on_new(session, request: gr.Request):
        chat.ensure_owner(session, username(request))
        chat.new_conversation(session)
        return chat_messages(session), None, session, conv_update(session)

    def on_example(path):
        def handler(session, request: gr.Request):
            chat.ensure_owner(session, username(request))
            chat.set_image(session, read_upload(path), Path(path).name)
            return chat_messages(session), image_file(session), session, conv_update(session)
        return handler

    def on_open(conversation_id, session, request: gr.Request):
        chat.ensure_owner(session, username(request))
        try:
            chat.open_conversation(session, conversation_id)
        except UserError as exc:
            gr.Warning(str(exc))
            return (chat_messages(session), gr.skip(), session, conv_update(session), "",
                    *[gr.skip()] * len(CONTROL_NAMES))
        title = next((r.title for r in chat.conversation_rows(session) if r.id == conversation_id), "")
        controls = controls_from_settings(session["settings"])
        return (chat_messages(session), image_file(session), session, conv_update(session),
                title, *[controls[n] for n in CONTROL_NAMES])

    def on_rename(conversation_id, title, session, request: gr.Request):
        chat.ensure_owner(session, username(request))
        try:
            chat.rename(session, conversation_id, title)
        except (UserError, ValueError) as exc:
            gr.Warning(str(exc))
        return conv_update(session)

    def on_delete(conversation_id, session, request: gr.Request):
        chat.ensure_owner(session, username(request))
        try:
            chat.delete(session, conversation_id)
        except UserError as exc:
            gr.Warning(str(exc))
        return chat_messages(session), image_file(session), session, conv_update(session)

    def on_export(conversation_id, session, request: gr.Request):
        chat.ensure_owner(session, username(request))
        try:
            return chat.export(session, conversation_id)
        except UserError as exc:
            gr.Warning(str(exc))
            return None

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
        if not (question or "").strip():
            raise gr.Error("Ask a question.")
        yield from _one_shot(image, question)

    def api_chat(image, message, session, request: gr.Request):
        """Multi-turn chat, streamed: the reply so far after every chunk. Send a picture with the first message
        (later messages may send None to keep it, or a new picture to start a new visual context). The
        conversation is saved under this client's session."""
        chat.ensure_owner(session, username(request))
        if image:
            before = len(session["turns"])
            if not chat.set_image_file(session, image):
                raise gr.Error(session["turns"][-1]["text"] if len(session["turns"]) > before else "Bad picture.")
        if session["image"] is None:
            raise gr.Error("Send a picture with your first message.")
        if not (message or "").strip():
            raise gr.Error("Send a message.")
        reply = ""
        for _ in chat.send(session, message, None):
            last = next(t for t in reversed(session["turns"]) if t["role"] == "assistant")
            reply = last["text"]
            yield reply
        notes = [t["text"] for t in session["turns"][-2:] if t["role"] == "note"]
        if notes:
            yield reply + "\n\n" + "\n".join(notes)

    def api_history(session, request: gr.Request):
        """Your saved conversations: [{id, title}]."""
        chat.ensure_owner(session, username(request))
        return [dict(id=r.id, title=r.title, messages=r.message_count, updated_at=str(r.updated_at))
                for r in chat.conversation_rows(session)]

    def api_conversation(conversation_id, session, request: gr.Request):
        """One of your conversations as JSON."""
        chat.ensure_owner(session, username(request))
        try:
            return chat._owned(chat.store.export_json, session, conversation_id) if chat.store else {}
        except UserError as exc:
            raise gr.Error(str(exc)) from None

    # -- layout -----------------------------------------------------------------------------------------------
    defaults = default_controls()
    with Blip2Blocks(title="BLIP-2 chat", analytics_enabled=False, fill_width=True) as demo:
        session = gr.State(new_session())
        token = gr.BrowserState("", storage_key=BROWSER_KEY, secret=browser_secret)
        gr.Markdown("## BLIP-2: chat about your pictures")
        gr.Markdown(card_markdown(backend.card), elem_id="model-card")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                new_btn = gr.Button("➕ New conversation", variant="secondary")
                conv_list = gr.Radio(choices=[], label="Your conversations", elem_id="history")
                title_box = gr.Textbox(label="Title", placeholder="Rename the selected conversation")
                with gr.Row():
                    rename_btn = gr.Button("Rename", size="sm")
                    delete_btn = gr.Button("Delete", size="sm", variant="stop")
                    export_btn = gr.Button("Export", size="sm")
                export_files = gr.File(label="Export (JSON and Markdown)", file_count="multiple", interactive=False)
            with gr.Column(scale=3):
                with gr.Row():
                    image_view = gr.Image(label="Current picture", type="filepath", interactive=False, height=220,
                                          elem_id="current-picture")
                    with gr.Column():
                        gr.Markdown("**Example pictures**")
                        example_btns = [(gr.Button(p.stem, size="sm"), str(p)) for p in examples]
                chatbot = gr.Chatbot(label="Chat", height=440, elem_id="chat", buttons=["copy"])
                box = gr.MultimodalTextbox(
                    placeholder="Attach, paste or drop a picture, then ask about it…", file_count="single",
                    sources=["upload"], show_label=False, elem_id="message", autofocus=True)
                with gr.Row():
                    stop_btn = gr.Button("⏹ Stop", variant="stop", size="sm")
                    regen_btn = gr.Button("🔄 Regenerate", size="sm")
                    undo_btn = gr.Button("↩️ Undo last turn", size="sm")
                with gr.Row():
                    preset_btns = [(gr.Button(name, size="sm"), prompt) for name, prompt in PRESETS.items()]
                with gr.Accordion("Decoding settings (remembered per conversation)", open=False):
                    controls = [
                        gr.Radio([BEAM, SAMPLING], value=defaults["mode"], label="Decoding",
                                 info="Beam search with 1 beam is greedy; sampling uses temperature and top-p"),
                        gr.Slider(0.05, 2.0, value=defaults["temperature"], step=0.05, label="Temperature"),
                        gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p"),
                        gr.Slider(1, 512, value=defaults["max_new_tokens"], step=1, label="Max new tokens"),
                        gr.Slider(0, 256, value=defaults["min_new_tokens"], step=1, label="Min length (tokens)"),
                        gr.Slider(-2.0, 2.0, value=defaults["length_penalty"], step=0.1, label="Length penalty",
                                  info="beam search: > 0 favours longer answers"),
                        gr.Slider(1.0, 2.0, value=defaults["repetition_penalty"], step=0.05,
                                  label="Repetition penalty"),
                        gr.Slider(1, 8, value=defaults["num_beams"], step=1, label="Beams",
                                  info="more than 1: the answer appears at the end, not streamed"),
                    ]
        with gr.Column(visible=False):  # the API endpoints' inputs and outputs
            api_image = gr.File(type="filepath", label="image")
            api_text = gr.Textbox(label="message")
            api_id = gr.Textbox(label="conversation_id")
            api_out = gr.Textbox(label="reply")
            api_json = gr.JSON(label="data")
            api_trigger = gr.Button()

        private = dict(api_visibility="private")
        demo.load(on_load, [token, session], [token, session, conv_list, chatbot, image_view], **private)
        gen_events = [
            box.submit(on_submit, [box, session, *controls], [box, chatbot, image_view, session, conv_list],
                       **model_events, **private),
            regen_btn.click(on_regenerate, [session, *controls], [chatbot, session], **model_events, **private),
        ]
        for btn, prompt in preset_btns:
            gen_events.append(btn.click(on_preset(prompt), [session, *controls], [chatbot, session],
                                        **model_events, **private))
        for evt in list(gen_events):  # refresh the sidebar once a reply is done
            evt.then(conv_update, [session], [conv_list], **private)
        stop_btn.click(None, None, None, cancels=gen_events, **private)
        undo_btn.click(on_undo, [session], [chatbot, session, conv_list], **private)
        chatbot.clear(on_new, [session], [chatbot, image_view, session, conv_list], **private)  # its trash icon
        new_btn.click(on_new, [session], [chatbot, image_view, session, conv_list], **private)
        for btn, path in example_btns:
            btn.click(on_example(path), [session], [chatbot, image_view, session, conv_list], **private)
        conv_list.input(on_open, [conv_list, session],
                        [chatbot, image_view, session, conv_list, title_box, *controls], **private)
        rename_btn.click(on_rename, [conv_list, title_box, session], [conv_list], **private)
        delete_btn.click(on_delete, [conv_list, session], [chatbot, image_view, session, conv_list], **private)
        export_btn.click(on_export, [conv_list, session], [export_files], **private)

        api_trigger.click(api_caption, [api_image], [api_out], api_name="caption", **model_events)
        api_trigger.click(api_ask, [api_image, api_text], [api_out], api_name="ask", **model_events)
        api_trigger.click(api_chat, [api_image, api_text, session], [api_out], api_name="chat", **model_events)
        api_trigger.click(api_history, [session], [api_json], api_name="history")
        api_trigger.click(api_conversation, [api_id, session], [api_json], api_name="conversation")

    demo.queue(max_size=queue_size, default_concurrency_limit=4)
    demo.launch_defaults = dict(
        auth=auth, max_file_size=MAX_UPLOAD, allowed_paths=None, enable_monitoring=False, run_history=False,
        ssr_mode=False, show_error=False, footer_links=["api", "gradio"], mcp_server=False,
    )
    demo.chat_app = chat  # for tests
    return demo
