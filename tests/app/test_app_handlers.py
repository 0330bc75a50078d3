"""The app's handler logic (app/chat.py) with a fake backend and both stores: no browser, no server, no torch."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from app.chat import (BEAM, DEFAULT_DECODING, SAMPLING, ChatApp, UserError, chat_messages, controls_from_settings,
                      model_history, new_session, owner_for, settings_from_controls)
from app.backend import ReplyStats
from app.fakes import FakeBackend, MemoryStore
from app.store import ConversationStore


def png(color="red", size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path):
    if request.param == "memory":
        yield MemoryStore()
    else:
        s = ConversationStore(data_dir=tmp_path / "data")
        yield s
        s.close()


@pytest.fixture
def app(store):
    return ChatApp(FakeBackend(), store)


def session_for(owner="anon:alice-xxxxxxxxxxxxxxxxxxxxxx"):
    s = new_session()
    s["owner"] = owner
    return s


def drain(gen):
    for _ in gen:
        pass


def test_decoding_defaults_mirror_blip2():
    import blip2

    assert DEFAULT_DECODING == blip2.Decoding().to_dict()


def test_controls_round_trip_and_clamping():
    settings = settings_from_controls(**controls_from_settings(DEFAULT_DECODING))
    assert settings == DEFAULT_DECODING
    s = settings_from_controls(mode=SAMPLING, temperature=0.7, top_p=0.8, max_new_tokens=20, min_new_tokens=50,
                               length_penalty=0, repetition_penalty=1.2, num_beams=5)
    assert s["do_sample"] and s["num_beams"] == 1 and s["min_new_tokens"] == 20 and s["temperature"] == 0.7
    s = settings_from_controls(mode=BEAM, num_beams=4, max_new_tokens="nonsense", temperature=-3)
    assert not s["do_sample"] and s["num_beams"] == 4 and s["max_new_tokens"] == 64 and s["temperature"] > 0


def test_owner_ids():
    owner, token = owner_for(None, None)
    assert owner == f"anon:{token}" and len(token) >= 22
    assert owner_for(None, token) == (owner, token)  # the browser keeps its id
    assert owner_for(None, "short")[1] != "short"  # a forged/garbled id gets a fresh one
    assert owner_for("bob", token)[0] == "user:bob"  # logged in: the username, whatever the browser says


def test_chat_streams_persists_and_keeps_history(app, store):
    s = session_for()
    assert app.set_image(s, png(), "red.png")
    steps = list(app.send(s, "What is it?", dict(DEFAULT_DECODING)))
    assert len(steps) >= 5  # one yield per streamed chunk
    assert s["turns"][-1]["role"] == "assistant" and "to:What is it?" in s["turns"][-1]["text"]
    assert s["turns"][-1]["status"] == "done"
    drain(app.send(s, "And then?"))
    assert app.backend.calls[-1]["history"] == [("What is it?", s["turns"][-3]["text"])]
    view = store.get_conversation(s["owner"], s["conversation_id"])
    assert [m.role for m in view.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert view.messages[0].image_hash and view.messages[2].status == "done"
    assert store.image_bytes(s["owner"], view.messages[0].image_hash) == png()
    msgs = chat_messages(s)
    assert msgs[0]["role"] == "assistant" and "New picture" in msgs[0]["content"]


def test_reply_token_ids_come_back_in_later_turns(store):
    app = ChatApp(FakeBackend(report_ids=True), store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q1"))
    first = app.backend.streams[-1].reply
    assert first.token_ids  # the fake reports ids, like a backend that can quote its own replies
    drain(app.send(s, "q2"))
    assert app.backend.calls[-1]["history"] == [("q1", first.text, first.token_ids)]
    saved = store.get_conversation(s["owner"], s["conversation_id"]).messages
    assert [m.token_ids for m in saved if m.role == "assistant"] == [first.token_ids,
                                                                     app.backend.streams[-1].reply.token_ids]


def test_reply_token_ids_survive_a_store_reopen(tmp_path):
    store = ConversationStore(data_dir=tmp_path / "data")
    app = ChatApp(FakeBackend(report_ids=True), store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q1"))
    drain(app.send(s, "q2"))
    replies = [stream.reply for stream in app.backend.streams]
    store.close()

    with ConversationStore(data_dir=tmp_path / "data") as reopened:  # an app restart
        app = ChatApp(FakeBackend(report_ids=True), reopened)
        resumed = session_for(s["owner"])
        app.open_conversation(resumed, s["conversation_id"])
        drain(app.send(resumed, "q3"))
        assert app.backend.calls[-1]["history"] == [("q1", replies[0].text, replies[0].token_ids),
                                                    ("q2", replies[1].text, replies[1].token_ids)]


def test_stopped_reply_sends_no_token_ids(store):
    app = ChatApp(FakeBackend(report_ids=True, words=50), store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    gen = app.send(s, "long answer please")
    for i, _ in enumerate(gen):
        if i == 4:
            break
    gen.close()
    stopped = app.backend.streams[-1].reply
    assert stopped.cancelled and stopped.token_ids  # the model knows them, but they end mid-reply
    assert store.get_conversation(s["owner"], s["conversation_id"]).messages[-1].token_ids is None
    drain(app.send(s, "and?"))
    assert app.backend.calls[-1]["history"] == [("long answer please", stopped.text)]


def test_token_ids_of_a_different_text_are_not_sent(store):
    """Ids are kept only when they spell the text that was shown and saved."""
    class DifferentFinalText:  # streams one text, reports ids for another
        reply = None

        def __iter__(self):
            yield "shown text"
            self.reply = ReplyStats(text="final text", prompt_tokens=3, new_tokens=2, seconds=0.1, token_ids=[1, 2])

        def cancel(self):
            pass

    class Backend(FakeBackend):
        def chat(self, image, history, message, settings):
            super().chat(image, history, message, settings)  # records the call
            return DifferentFinalText()

    app = ChatApp(Backend(), store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q1"))
    drain(app.send(s, "q2"))
    assert app.backend.calls[-1]["history"] == [("q1", "shown text")]
    assert all(m.token_ids is None for m in store.get_conversation(s["owner"], s["conversation_id"]).messages)


def test_new_image_starts_new_visual_context(app):
    s = session_for()
    app.set_image(s, png("red"), "a.png")
    drain(app.send(s, "first"))
    app.set_image(s, png("blue"), "b.png")
    assert "earlier turns are not sent" in s["turns"][-1]["text"]
    drain(app.send(s, "second"))
    assert app.backend.calls[-1]["history"] == []  # the old picture's turns are not sent with the new one
    assert model_history(s) == [("second", s["turns"][-1]["text"])]


@pytest.mark.parametrize("data, why", [
    (b"hello, not an image", "not an image"),
    (b"\x89PNG\r\n", "truncated"),
])
def test_bad_upload_is_a_note_and_nothing_is_lost(app, data, why):
    s = session_for()
    app.set_image(s, png(), "good.png")
    drain(app.send(s, "q"))
    before = [dict(t) for t in s["turns"]]
    assert not app.set_image(s, data, "bad.bin")
    assert s["turns"][:-1] == before and s["image"] == png()
    assert why in s["turns"][-1]["text"] and "bad.bin" in s["turns"][-1]["text"]


def test_oversized_upload_refused_before_the_backend(app, tmp_path):
    app.max_image_bytes = 1000
    path = tmp_path / "big.png"
    path.write_bytes(png(size=(400, 400)) + b"\0" * 2000)
    s = session_for()
    assert not app.set_image_file(s, str(path))
    assert "too large" in s["turns"][-1]["text"] and not app.backend.calls


def test_message_without_picture_asks_for_one(app):
    s = session_for()
    drain(app.send(s, "hello"))
    assert "add a picture" in s["turns"][-1]["text"] and not app.backend.calls


def test_stop_cancels_stream_and_saves_partial_reply(app, store):
    s = session_for()
    app.backend.words = 50
    app.set_image(s, png(), "x.png")
    gen = app.send(s, "long answer please")
    for i, _ in enumerate(gen):
        if i == 4:
            break
    gen.close()  # what Gradio does on Stop or when the client goes away
    stream = app.backend.streams[-1]
    assert stream.cancelled and stream.closed
    reply = s["turns"][-1]
    assert reply["status"] == "stopped" and 0 < len(reply["text"]) < 200
    saved = store.get_conversation(s["owner"], s["conversation_id"]).messages[-1]
    assert saved.status == "stopped" and saved.text == reply["text"]
    assert "(stopped)" in chat_messages(s)[-1]["content"]


def test_regenerate_and_undo(app, store):
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q1"))
    drain(app.send(s, "q2"))
    drain(app.regenerate(s, dict(DEFAULT_DECODING, do_sample=True)))
    assert app.backend.calls[-1]["message"] == "q2" and app.backend.calls[-1]["settings"]["do_sample"]
    assert [t["text"] for t in s["turns"] if t["role"] == "user"] == ["q1", "q2"]
    assert app.undo(s)
    assert [t["text"] for t in s["turns"] if t["role"] == "user"] == ["q1"]
    roles = [m.role for m in store.get_conversation(s["owner"], s["conversation_id"]).messages]
    assert roles == ["system", "user", "assistant"]
    # settings are remembered per conversation
    assert store.get_conversation(s["owner"], s["conversation_id"]).settings["do_sample"] is True


def test_undo_never_removes_a_picture_change(app):
    s = session_for()
    app.set_image(s, png("red"), "a.png")
    drain(app.send(s, "q1"))
    app.set_image(s, png("blue"), "b.png")
    assert not app.undo(s)
    assert s["turns"][-1].get("image")


def test_resume_restores_picture_turns_and_settings(app, store):
    s = session_for()
    app.set_image(s, png("green"), "g.png")
    drain(app.send(s, "q1", dict(DEFAULT_DECODING, max_new_tokens=12)))
    cid = s["conversation_id"]
    app.new_conversation(s)
    assert s["image"] is None and s["turns"] == [] and s["conversation_id"] is None
    app.open_conversation(s, cid)
    assert s["image"] == png("green") and s["settings"]["max_new_tokens"] == 12
    drain(app.send(s, "q2"))
    assert app.backend.calls[-1]["history"][0][0] == "q1"  # context restored


def test_rename_delete_export(app, store, tmp_path):
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q1"))
    cid = s["conversation_id"]
    app.rename(s, cid, "My picture")
    assert app.conversations(s)[0] == ("My picture (3)", cid)
    json_path, md_path = app.export(s, cid, folder=str(tmp_path))
    assert json.loads(open(json_path).read())["conversation"]["title"] == "My picture"
    assert "My picture" in open(md_path).read()
    app.delete(s, cid)
    assert app.conversations(s) == [] and s["conversation_id"] is None


def test_another_owner_cannot_see_or_touch(app):
    alice, mallory = session_for("anon:alice-aaaaaaaaaaaaaaaaaaaaa"), session_for("anon:mallory-mmmmmmmmmmmmmmmmmm")
    app.set_image(alice, png(), "x.png")
    drain(app.send(alice, "secret"))
    cid = alice["conversation_id"]
    assert app.conversations(mallory) == []
    for action in (lambda: app.open_conversation(mallory, cid), lambda: app.rename(mallory, cid, "mine"),
                   lambda: app.delete(mallory, cid), lambda: app.export(mallory, cid)):
        with pytest.raises(UserError, match="does not exist"):
            action()
    assert len(app.conversations(alice)) == 1


def test_store_down_chat_still_answers():
    store = MemoryStore()
    app = ChatApp(FakeBackend(), store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    store.down = True
    drain(app.send(s, "still there?"))
    texts = [t["text"] for t in s["turns"]]
    assert any("History could not be saved" in t for t in texts)
    assert s["turns"][-1]["role"] == "assistant" and "to:still there?" in s["turns"][-1]["text"]
    assert sum("could not be saved" in t for t in texts) == 1  # said once, not after every call
    store.down = False
    drain(app.send(s, "and now?"))
    assert s["save_failed"] is False


def test_store_down_from_the_start(tmp_path):
    app = ChatApp(FakeBackend(), MemoryStore())
    app.store.down = True
    s = session_for()
    assert app.set_image(s, png(), "x.png")
    drain(app.send(s, "hi"))
    assert "to:hi" in s["turns"][-1]["text"] and app.conversations(s) == []


def test_notice_is_shown(store):
    app = ChatApp(FakeBackend(notice="The conversation was too long for the model: your message was cut short."),
                  store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "x" * 1000))
    assert "too long" in s["turns"][-1]["text"] and s["turns"][-1]["role"] == "note"


def test_backend_errors_become_messages(app):
    s = session_for()
    app.set_image(s, png(), "x.png")

    def boom(*a, **k):
        raise ValueError("temperature must be > 0")

    app.backend.chat = boom
    drain(app.send(s, "q"))
    assert s["turns"][-1]["status"] == "error" and "temperature" in s["turns"][-1]["text"]


def test_one_shot(app):
    assert "to:caption" in list(app.one_shot(png(), None))[-1]
    assert "to:why" in list(app.one_shot(png(), "why"))[-1]
    with pytest.raises(UserError, match="not an image"):
        list(app.one_shot(b"nope", "why"))


def test_card_markdown_says_what_an_untrained_model_can_do():
    from app.ui import card_markdown

    text = card_markdown(FakeBackend(untrained=True).card)
    assert "fake" in text and "fp32" in text and "cpu" in text
    assert "untrained" in text and "ignores the image" in text
    assert "untrained" not in card_markdown(FakeBackend().card)


def test_ui_does_not_import_torch_or_blip2():
    import subprocess
    import sys

    code = "import app.ui, app.chat, app.store, sys; print(sorted(m for m in ('torch', 'blip2') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=__import__("pathlib").Path(__file__).resolve().parents[2]).stdout
    assert out.strip() == "[]"


def test_app_py_options(monkeypatch, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("blip2_app_options", Path(__file__).resolve().parents[2] / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("BLIP2_MODEL", "some/folder")
    monkeypatch.setenv("BLIP2_QUEUE_SIZE", "3")
    args = module.parse_args(["--precision", "fp32", "--auth", "a:b"])
    assert args.model == "some/folder" and args.precision == "fp32" and args.queue_size == 3
    assert args.host == "127.0.0.1" and args.port == 7860
    auth_file = tmp_path / "users"
    auth_file.write_text("# users\nbob:pw:with:colons\n")
    assert module.parse_auth(["a:b"], str(auth_file)) == [("a", "b"), ("bob", "pw:with:colons")]
    monkeypatch.setenv("BLIP2_AUTH", "x:1,y:2")
    assert module.parse_auth(None, None) == [("x", "1"), ("y", "2")]
    with pytest.raises(SystemExit):
        module.parse_auth(["nopassword"], None)
    secret = module.browser_secret(tmp_path / "d")
    assert secret == module.browser_secret(tmp_path / "d") and len(secret) > 20


def test_real_store_unreachable_chat_still_answers(tmp_path):
    store = ConversationStore(db_url="postgresql+psycopg://u:p@127.0.0.1:1/none", data_dir=tmp_path,
                              retries=0, connect_timeout_s=1)
    try:
        app = ChatApp(FakeBackend(), store)
        s = session_for()
        assert app.set_image(s, png(), "x.png")
        drain(app.send(s, "hello?"))
        assert "to:hello?" in s["turns"][-1]["text"]
        assert any("History could not be saved" in t["text"] for t in s["turns"])
        assert app.conversations(s) == []
    finally:
        store.close()
