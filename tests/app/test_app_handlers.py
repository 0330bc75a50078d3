"""The app's handler logic (app/chat.py) with a fake backend and both stores: no browser, no server, no torch."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from app.chat import ChatApp, UserError, WrongUser, model_history, new_session, owner_for
from app.decoding import BEAM, DEFAULT_DECODING, SAMPLING, controls_from_settings, settings_from_controls
from app.render import chat_messages
from app.backend import ReplyStats
from app.fakes import FakeBackend, MemoryStore
from app.store import ConversationStore
from conftest import load_app_py


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
    # NaN and infinity (a JSON client can send them) fall back to the defaults instead of reaching the model
    s = settings_from_controls(mode=SAMPLING, temperature=float("nan"), top_p=float("nan"), max_new_tokens=float("inf"))
    assert (s["temperature"], s["top_p"], s["max_new_tokens"]) == (
        DEFAULT_DECODING["temperature"], DEFAULT_DECODING["top_p"], DEFAULT_DECODING["max_new_tokens"])


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
    module = load_app_py()
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


# -- robustness: text, sessions, history bounds, streaming saves, uploads ---------------------------------------
@pytest.mark.parametrize("text, why", [
    ("what is \ud800 this?", "broken character"),  # a lone surrogate: the tokenizer and drivers choke on it
    ("nul \x00 inside", "NUL"),  # PostgreSQL refuses it
    ("x" * 4001, "too long"),
])
def test_unusable_text_is_refused_before_anything_changes(app, store, text, why):
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "first"))
    before = [dict(t) for t in s["turns"]]
    saved = [m.text for m in store.get_conversation(s["owner"], s["conversation_id"]).messages]
    calls = len(app.backend.calls)
    with pytest.raises(UserError, match=why):
        drain(app.send(s, text))
    with pytest.raises(UserError, match=why):
        list(app.one_shot(png(), text))
    with pytest.raises(UserError, match=why):
        app.rename(s, s["conversation_id"], text)
    assert s["turns"] == before and len(app.backend.calls) == calls
    assert [m.text for m in store.get_conversation(s["owner"], s["conversation_id"]).messages] == saved


def test_message_length_limit_is_configurable():
    app = ChatApp(FakeBackend(), MemoryStore(), max_message_chars=10)
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "x" * 10))
    with pytest.raises(UserError, match="too long .11 characters.; the limit is 10"):
        drain(app.send(s, "x" * 11))
    s["turns"][-2]["text"] = "y" * 11  # a question saved under a higher limit: refused, and not undone
    with pytest.raises(UserError, match="too long"):
        drain(app.regenerate(s))
    assert s["turns"][-2]["text"] == "y" * 11


def test_history_sent_to_the_model_is_bounded(store):
    app = ChatApp(FakeBackend(words=2), store, max_history_turns=2)
    s = session_for()
    app.set_image(s, png(), "x.png")
    for q in ("q1", "q2", "q3", "q4"):
        drain(app.send(s, q))
    assert [h[0] for h in app.backend.calls[-1]["history"]] == ["q2", "q3"]
    app.max_history_turns, app.max_history_chars = 10, 2 * len(s["turns"][-1]["text"]) + 6
    drain(app.send(s, "q5"))
    assert [h[0] for h in app.backend.calls[-1]["history"]] == ["q3", "q4"]  # what fits in the characters


def test_session_belongs_to_the_user_who_started_it(app):
    s = new_session()
    app.ensure_owner(s, "alice")
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "alice's secret"))
    before = json.dumps(s, default=repr)
    calls = len(app.backend.calls)
    for intruder in ("bob", None):
        with pytest.raises(WrongUser, match="belongs to another user"):
            app.ensure_owner(s, intruder)
    assert json.dumps(s, default=repr) == before and len(app.backend.calls) == calls
    app.new_conversation(s)  # the tie survives a new conversation and opening an old one
    with pytest.raises(WrongUser):
        app.ensure_owner(s, "bob")
    assert app.ensure_owner(s, "alice") == "user:alice"
    anonymous = new_session()
    app.ensure_owner(anonymous, None)
    with pytest.raises(WrongUser):
        app.ensure_owner(anonymous, "mallory")


def test_reply_is_not_saved_without_its_question():
    class UserRowsFail(MemoryStore):
        def add_message(self, owner, cid, role, text, **kw):
            if role == "user":
                raise ValueError("invalid byte sequence")  # what a driver says about text it cannot store
            return super().add_message(owner, cid, role, text, **kw)

    store = UserRowsFail()
    app = ChatApp(FakeBackend(), store)
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q"))
    assert "to:q" in s["turns"][-1]["text"]  # the chat still answers
    roles = [m.role for m in store.get_conversation(s["owner"], s["conversation_id"]).messages]
    assert roles == ["system"]  # no answer to a question that is not there


def test_model_failure_is_said_plainly(app, store):
    s = session_for()
    app.set_image(s, png(), "x.png")

    def boom(*a, **k):
        raise RuntimeError("CUDA error: device-side assert triggered at 0x7f3a")

    app.backend.chat = boom
    steps = [dict(step["turns"][-1]) for step in app.send(s, "q")]
    assert steps[-1]["status"] == "error" and "could not answer" in steps[-1]["text"]
    assert "0x7f3a" not in s["turns"][-1]["text"]  # internals go to the log and the saved row only
    assert "0x7f3a" in store.get_conversation(s["owner"], s["conversation_id"]).messages[-1].error
    with pytest.raises(UserError, match="could not answer"):
        list(app.one_shot(png(), "q"))


class CountingStore(MemoryStore):
    def __init__(self):
        super().__init__()
        self.updates = []

    def update_message(self, owner, message_id, **kw):
        self.updates.append(kw)
        return super().update_message(owner, message_id, **kw)


def test_streaming_reply_is_saved_every_few_seconds_not_every_chunk():
    store = CountingStore()
    app = ChatApp(FakeBackend(words=40), store)  # streams 43 chunks well within SAVE_EVERY_S
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q"))
    assert len(store.updates) == 1 and store.updates[0]["status"] == "done"  # only the final save

    app = ChatApp(FakeBackend(words=40), store, save_every_s=0.0)  # due at every chunk
    gen = app.send(s, "q2")
    for i, _ in enumerate(gen):
        if i == 10:
            break
    saved = store.get_conversation(s["owner"], s["conversation_id"]).messages[-1]
    assert saved.status == "streaming" and saved.text and saved.text == s["turns"][-1]["text"]
    gen.close()


KILLED_MID_ANSWER = """
import os, signal, sys
from app.chat import ChatApp, new_session
from app.fakes import FakeBackend
from app.store import ConversationStore

store = ConversationStore(data_dir=sys.argv[1])
app = ChatApp(FakeBackend(delay=0.02, words=500), store, save_every_s=0.1)
s = new_session()
app.ensure_owner(s, "alice")
app.set_image(s, bytes.fromhex(sys.argv[2]), "x.png")
for i, _ in enumerate(app.send(s, "tell me everything")):
    if i == 40:
        print(s["conversation_id"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no final save: as a crash or kill -9
"""


def test_reply_cut_off_by_a_kill_is_interrupted_after_restart(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_ANSWER, str(tmp_path / "data"), png().hex()],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    cid = proc.stdout.strip()
    with ConversationStore(data_dir=tmp_path / "data") as store:  # the app starting again
        last = store.get_conversation("user:alice", cid).messages[-1]
        assert last.role == "assistant" and last.status == "interrupted"
        assert last.text.startswith("answer ") and len(last.text.split()) >= 10  # saved while it streamed
        app = ChatApp(FakeBackend(), store)
        s = session_for("user:alice")
        app.open_conversation(s, cid)
        assert "interrupted" in chat_messages(s)[-1]["content"] and last.text in chat_messages(s)[-1]["content"]
        drain(app.send(s, "and then?"))  # the conversation goes on
        assert app.backend.calls[-1]["history"] == [("tell me everything", last.text)]


def test_upload_sweep_deletes_old_files_and_caps_the_total(tmp_path):
    import os
    import time

    from app.uploads import sweep

    root = tmp_path / "uploads"
    now = time.time()

    def put(rel, size, age_s):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age_s, now - age_s))
        return path

    old = put("aaa/old.png", 100, 7200)
    a = put("bbb/a.png", 300, 300)
    b = put("ccc/b.png", 300, 200)
    c = put("ccc/c.png", 300, 100)
    stored = tmp_path / "images" / "ab" / "cdef"  # the store's images live elsewhere: never looked at
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"y" * 1000)
    os.utime(stored, (now - 10**6, now - 10**6))

    result = sweep(root, max_age_s=3600, max_bytes=10_000, now=now)
    assert (result.deleted, result.freed_bytes, result.kept_bytes) == (1, 100, 900)
    assert not old.exists() and not old.parent.exists() and a.exists()  # its emptied folder went too

    result = sweep(root, max_age_s=3600, max_bytes=650, now=now)  # over the cap: oldest first
    assert not a.exists() and b.exists() and c.exists() and result.kept_bytes == 600
    assert not a.parent.exists() and b.parent.exists()
    assert sweep(root, max_age_s=3600, max_bytes=0, now=now).kept_bytes == 0
    assert root.is_dir() and list(root.iterdir()) == [] and stored.exists()


def test_swept_upload_gets_a_message_not_a_crash(app, tmp_path):
    s = session_for()
    assert not app.set_image_file(s, str(tmp_path / "gone.png"))
    assert "upload it again" in s["turns"][-1]["text"]


def test_app_py_points_gradio_at_a_swept_folder_of_its_own(monkeypatch, tmp_path):
    import os

    module = load_app_py()
    monkeypatch.setenv("GRADIO_TEMP_DIR", "/somewhere/else")
    monkeypatch.setenv("BLIP2_UPLOAD_TTL_MINUTES", "5")
    args = module.parse_args(["--data-dir", str(tmp_path / "data"), "--upload-max-mb", "10"])
    assert args.max_message_chars == 4000
    sweeper = module.upload_sweeper(args)
    assert sweeper.folder == (tmp_path / "data" / "uploads").resolve()
    assert os.environ["GRADIO_TEMP_DIR"] == str(sweeper.folder)
    assert (sweeper.max_age_s, sweeper.max_bytes) == (300, 10 * 2**20)
    with pytest.raises(SystemExit, match="must not contain the data dir"):
        module.upload_sweeper(module.parse_args(["--data-dir", str(tmp_path / "d"), "--upload-dir", str(tmp_path)]))
    with pytest.raises(SystemExit):
        module.parse_args(["--max-message-chars", "0"])
    monkeypatch.setenv("BLIP2_MAX_MESSAGE_CHARS", "123")
    assert module.parse_args([]).max_message_chars == 123


# -- the chat page: what it shows and what its controls do (app/page.py, app/presets.py, app/icons.py) ------------
EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "assets" / "examples"


def control_values(**overrides):
    from app.decoding import CONTROL_NAMES, default_controls

    values = {**default_controls(), **overrides}
    return [values[n] for n in CONTROL_NAMES]


@pytest.fixture
def page(tmp_path):
    from app.page import ChatPage

    return ChatPage(ChatApp(FakeBackend(), MemoryStore()), image_dir=tmp_path / "thumbs", files_root=tmp_path,
                    examples_dir=EXAMPLES)


def test_same_picture_again_keeps_the_context(app, store):
    s = session_for()
    assert app.set_image(s, png(), "a.png")
    drain(app.send(s, "q1"))
    assert app.set_image(s, png(), "a-again.png")  # the same bytes: an example clicked twice, a file sent again
    drain(app.send(s, "q2"))
    assert app.backend.calls[-1]["history"][0][0] == "q1"  # the conversation about it goes on
    assert sum(1 for t in s["turns"] if t.get("image")) == 1
    saved = store.get_conversation(s["owner"], s["conversation_id"]).messages
    assert [m.role for m in saved].count("system") == 1
    assert app.set_image(s, png("blue"), "b.png")  # a different picture still starts afresh
    assert "earlier turns are not sent" in s["turns"][-1]["text"]


def test_reply_cut_at_the_length_limit_says_so(app, store):
    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "long", dict(DEFAULT_DECODING, max_new_tokens=4)))
    assert s["turns"][-1]["cut"] == 4
    assert "cut at the length limit of 4 tokens" in chat_messages(s)[-1]["content"]
    saved = store.get_conversation(s["owner"], s["conversation_id"]).messages[-1]
    assert saved.text == s["turns"][-1]["text"] and "cut" not in saved.text  # the answer alone is saved and sent
    drain(app.send(s, "short", dict(DEFAULT_DECODING, max_new_tokens=64)))
    assert not s["turns"][-1].get("cut") and "cut at" not in chat_messages(s)[-1]["content"]


def test_regenerate_with_deterministic_settings_samples_anew_and_says_so(app, store):
    s = session_for()
    app.set_image(s, png(), "x.png")
    greedy = dict(DEFAULT_DECODING)
    drain(app.send(s, "q", greedy))
    drain(app.regenerate(s, greedy))
    first = app.backend.calls[-1]["settings"]
    assert first["do_sample"] and first["num_beams"] == 1 and isinstance(first["seed"], int)
    assert "sampling with seed" in chat_messages(s)[-1]["content"] and "greedy" in chat_messages(s)[-1]["content"]
    beams = dict(greedy, num_beams=4)
    drain(app.regenerate(s, beams))
    second = app.backend.calls[-1]["settings"]
    assert second["do_sample"] and second["seed"] != first["seed"] and "beam search" in chat_messages(s)[-1]["content"]
    assert s["settings"] == beams  # the person's settings are unchanged, here and in the history
    remembered = store.get_conversation(s["owner"], s["conversation_id"]).settings
    assert remembered["do_sample"] is False and remembered["num_beams"] == 4 and remembered["seed"] is None
    drain(app.regenerate(s, dict(greedy, do_sample=True, seed=7)))  # a fixed seed would repeat itself too
    assert app.backend.calls[-1]["settings"]["seed"] != 7 and "fixed seed" in chat_messages(s)[-1]["content"]
    drain(app.regenerate(s, dict(greedy, do_sample=True)))  # sampling with a random seed varies already
    assert app.backend.calls[-1]["settings"]["seed"] is None and "regenerated" not in chat_messages(s)[-1]["content"]


def test_deleted_conversation_can_be_restored(app, store):
    s = session_for()
    app.set_image(s, png("red"), "a.png")
    drain(app.send(s, "q1"))
    app.set_image(s, png("blue"), "b.png")
    drain(app.send(s, "q2", dict(DEFAULT_DECODING, max_new_tokens=9)))
    cid = s["conversation_id"]
    before = store.get_conversation(s["owner"], cid)
    deleted = app.delete(s, cid)
    assert app.conversations(s) == [] and s["conversation_id"] is None
    with pytest.raises(UserError):  # what one person deleted, no one else can bring back
        app.restore(session_for("anon:mallory-mmmmmmmmmmmmmmmmmm"), deleted)
    restored = app.restore(s, deleted)
    after = store.get_conversation(s["owner"], restored)
    assert (after.title, after.settings) == (before.title, before.settings)
    assert [(m.role, m.text, m.status, m.image_hash, m.token_ids) for m in after.messages] == \
        [(m.role, m.text, m.status, m.image_hash, m.token_ids) for m in before.messages]
    app.open_conversation(s, restored)
    assert s["image"] == png("blue")
    drain(app.send(s, "q3"))
    assert app.backend.calls[-1]["history"][0][0] == "q2"


def test_chat_shows_the_picture_and_draws_no_emoji(app):
    from app.chat import turn
    from app.icons import EMOJI_RANGES
    from app.ui import card_markdown

    s = session_for()
    app.set_image(s, png(), "x.png")
    drain(app.send(s, "q"))
    msgs = chat_messages(s, picture=lambda t: "/thumbs/x.jpg")
    assert msgs[0] == {"role": "user", "content": {"path": "/thumbs/x.jpg"}}  # the picture in the user's message
    assert msgs[1]["role"] == "assistant" and "New picture: x.png" in msgs[1]["content"]
    s["turns"] += [turn("note", "⚠️ History could not be saved.", s["context"]),
                   turn("note", "ℹ️ A notice.", s["context"]), turn("assistant", "half", s["context"], status="stopped")]
    shown = [m["content"] for m in chat_messages(s) if isinstance(m["content"], str)]
    assert all(not EMOJI_RANGES.search(text) for text in shown), shown
    assert 'class="icon i-warning"' in shown[-3] and "(stopped)" in shown[-1]  # drawn, not a font's emoji
    assert not EMOJI_RANGES.search(card_markdown(FakeBackend(untrained=True).card))
    s["turns"].append(turn("assistant", "", s["context"], status="streaming"))
    assert 'class="typing"' in chat_messages(s)[-1]["content"]  # a reply on its way shows it is being written


def test_presets_and_examples_fit_the_model(tmp_path):
    import dataclasses

    from app.presets import examples_for, presets_for

    big, small = FakeBackend().card, dataclasses.replace(FakeBackend().card, source="default")
    inventive = {"Tell a story", "Romantic message", "Ingredients", "History of the place"}
    assert inventive <= set(presets_for(big)) and not inventive & set(presets_for(small))
    assert "What shape is this?" in presets_for(small).values()
    cards = examples_for(small, EXAMPLES)
    assert [e.question for e, _ in cards] == ["What shape is this?", "What colour is the shape?",
                                              "Is there a triangle?"]
    assert all(path.is_file() for _, path in cards) and examples_for(big, EXAMPLES)
    assert examples_for(small, tmp_path) == []  # no pictures there, no cards


def test_seed_control():
    assert settings_from_controls(mode=SAMPLING, seed=42)["seed"] == 42
    assert settings_from_controls(mode=SAMPLING, seed=None)["seed"] is None  # empty: random every time
    assert settings_from_controls(seed="")["seed"] is None and settings_from_controls(seed=-5)["seed"] == 0
    assert controls_from_settings(dict(DEFAULT_DECODING, seed=9))["seed"] == 9


def test_page_structure():
    import gradio as gr

    from app.icons import EMOJI_RANGES
    from app.ui import build_ui

    demo = build_ui(FakeBackend(), MemoryStore())
    by_id = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["message"].file_types == ["image"]  # the file picker offers pictures only
    assert by_id["chat"].show_label is False  # no label over the first message
    assert isinstance(by_id["history-sidebar"], gr.Sidebar) and isinstance(by_id["settings-sidebar"], gr.Sidebar)
    assert len(by_id["chat"].examples) == 3  # the empty chat offers example cards
    texts = [str(getattr(b, "value", "") or "") + str(getattr(b, "label", "") or "") for b in demo.blocks.values()]
    assert not [t for t in texts if EMOJI_RANGES.search(t)]
    assert "BLIP-2 chat" in demo.launch_defaults["auth_message"]  # the login page says what it is


def test_stop_shows_the_stopped_reply_at_once(page):
    s, ui = session_for(), page.new_ui_state()
    page.chat.backend.words = 50
    page.chat.set_image(s, png(), "x.png")
    page._accept(s, ui, "long answer please")
    run = page.generate(None, s, ui, *control_values())
    for i, (chatbot, status, _) in enumerate(run):
        if i == 4:
            break
    assert "Writing" in status
    run.close()  # what Gradio does on Stop
    box, chatbot, status = page.stop(None, {"text": "", "files": []}, s, ui)
    assert "(stopped)" in chatbot[-1]["content"] and status == ""
    assert box["submit_btn"] is True and box["stop_btn"] is False  # ready to send again


def test_enter_while_answering_is_queued_and_shown(page):
    import gradio as gr

    s, ui = session_for(), page.new_ui_state()
    page.chat.set_image(s, png(), "x.png")
    preset = page.accept_preset("Write a short caption for this image.")(None, s, ui)
    assert preset[-1] != gr.skip()  # the first message starts a run
    run = page.generate(None, s, ui, *control_values())
    next(run)
    next(run)
    box, chatbot, _, status, kick = page.accept_box(None, {"text": "second", "files": []}, s, ui)
    assert kick == gr.skip()  # no second run: the one running answers it next
    assert "second" in chatbot[-1]["content"] and "waiting" in chatbot[-1]["content"]
    assert "1 message waiting" in status and box["stop_btn"] and box["value"] == {"text": "", "files": []}
    drain(run)
    assert [t["text"] for t in s["turns"] if t["role"] == "user"] == ["Write a short caption for this image.",
                                                                       "second"]
    assert "to:second" in s["turns"][-1]["text"] and not ui["queued"] and not page.busy(ui)


def test_stop_returns_waiting_messages_to_the_box(page):
    s, ui = session_for(), page.new_ui_state()
    page.chat.set_image(s, png(), "x.png")
    page._accept(s, ui, "first")
    page._accept(s, ui, "second")
    box, chatbot, status = page.stop(None, {"text": "typed", "files": []}, s, ui)
    assert box["value"]["text"] == "first\n\nsecond\n\ntyped" and not ui["queued"]  # nothing typed is lost
    assert not any("waiting" in m["content"] for m in chatbot if isinstance(m["content"], str))


def test_bad_picture_is_a_toast_and_the_box_keeps_its_text(page, tmp_path):
    import gradio as gr

    s, ui = session_for(), page.new_ui_state()
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture at all")
    with pytest.warns(UserWarning, match="could not be used"):  # a toast in the browser
        out = page.accept_box(None, {"text": "what is it?", "files": [str(bad)]}, s, ui)
    assert all(o == gr.skip() for o in out)  # the box keeps its text and file
    assert s["turns"] == [] and not ui["queued"]  # the chat is as it was


def test_reload_reopens_the_last_conversation(page):
    from types import SimpleNamespace

    owner, token = owner_for(None, None)
    s = session_for(owner)
    page.chat.set_image(s, png(), "x.png")
    drain(page.chat.send(s, "q"))
    cid = s["conversation_id"]
    fresh = new_session()
    out = page.load(None, token, cid, fresh, page.new_ui_state())
    assert fresh["conversation_id"] == cid and any("to:q" in str(m["content"]) for m in out[1])
    stranger = new_session()  # someone else's browser with that id: nothing opens
    page.load(None, "", cid, stranger, page.new_ui_state())
    assert stranger["conversation_id"] is None and stranger["turns"] == []
    signed_in = page.load(SimpleNamespace(username="bob"), "", "", new_session(), page.new_ui_state())
    assert "bob" in signed_in[7] and 'href="logout"' in signed_in[7]


def test_settings_panel_shows_what_applies_to_the_mode():
    from app.page import ChatPage

    temperature, top_p, seed, beams, length_penalty = ChatPage.visible_controls(SAMPLING, 1)
    assert temperature["visible"] and top_p["visible"] and seed["visible"] and not beams["visible"]
    temperature, top_p, seed, beams, length_penalty = ChatPage.visible_controls(BEAM, 1)
    assert not temperature["visible"] and beams["visible"] and not length_penalty["visible"]  # greedy: no penalty
    assert ChatPage.visible_controls(BEAM, 3)[-1]["visible"]
    precise = dict(zip(__import__("app.decoding").decoding.CONTROL_NAMES, ChatPage.style("Precise")()))
    creative = dict(zip(__import__("app.decoding").decoding.CONTROL_NAMES, ChatPage.style("Creative")()))
    assert precise["mode"] == BEAM and precise["num_beams"] == 1 and creative["mode"] == SAMPLING


def test_messages_no_run_will_answer_go_back_to_the_box(page):
    s, ui = session_for(), page.new_ui_state()
    page.chat.set_image(s, png(), "x.png")
    ui["queued"].append("sent while the last run failed")  # queued, and no run on its way
    chatbot, status, box, *_ = page.settle(None, {"text": "", "files": []}, s, ui)
    assert box["value"]["text"] == "sent while the last run failed" and not ui["queued"] and box["submit_btn"]
    drain(page.regenerate(None, s, ui, *control_values()))  # a retry answers what was sent meanwhile too
    page._accept(s, ui, "q")
    ui["pending"] = False  # as if the retry were running when it came
    drain(page.regenerate(None, s, ui, *control_values()))
    assert any("to:q" in t["text"] for t in s["turns"] if t["role"] == "assistant") and not ui["queued"]
