"""The remote backend (app/remote.py) against a small fake OpenAI-compatible server: the request it sends, the
stream it reads, stop, and every way a server fails. No model, no torch; tests/serving/ does the same against a
real vLLM."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from app.backend import BackendUnavailable, BadImage
from app.chat import MODEL_FAILED, ChatApp, UserError, new_session
from app.decoding import DEFAULT_DECODING, SAMPLING, settings_from_controls
from app.fakes import MemoryStore
from app.remote import RemoteBackend, build_messages, image_data_url, sampling_fields

ROOT = Path(__file__).resolve().parents[2]


def png(color="red", size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def decode_url(url: str) -> tuple[str, bytes]:
    head, data = url.split(",", 1)
    return head, base64.b64decode(data)


class FakeServer:
    """An OpenAI-compatible chat server in a thread. ``mode`` picks its behaviour for chat requests:
    ok | error500 | hang | drop (closes the connection after two chunks) | too_long (400 while the prompt holds
    earlier turns) | bad_request. ``requests`` records each chat request's body; ``disconnects`` counts streams the
    client closed before the end."""

    def __init__(self, words=("a", " red", " square", " on", " white"), delay=0.0, mode="ok"):
        self.words, self.delay, self.mode = list(words), delay, mode
        self.requests: list[dict] = []
        self.disconnects = 0
        self.finished = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet test output
                pass

            def _json(self, code, payload):
                body = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.close_connection = True  # so a stopped server is gone for the client's pool too
                if self.path == "/health":
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.send_header("Connection", "close")
                    self.end_headers()
                elif self.path == "/v1/models":
                    self._json(200, {"object": "list", "data": [{"id": "tiny-blip2", "max_model_len": 512}]})
                else:
                    self._json(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                mode = server.mode
                if mode == "error500":
                    return self._json(500, {"error": {"message": "engine dead"}})
                if mode == "bad_request":
                    return self._json(400, {"error": {"message": "temperature must be non-negative"}})
                if mode == "too_long" and len(body["messages"]) > 1:
                    return self._json(400, {"error": {"message": "This model's maximum context length is 512"}})
                if mode == "hang":
                    time.sleep(3)
                    return
                if not body.get("stream"):
                    text = "".join(server.words)
                    return self._json(200, {"choices": [{"message": {"role": "assistant", "content": text},
                                                         "finish_reason": "stop", "token_ids": [1, 2, 3]}],
                                            "usage": {"prompt_tokens": 40, "completion_tokens": 3}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for i, word in enumerate(server.words):
                        if mode == "drop" and i == 2:
                            self.connection.shutdown(socket.SHUT_RDWR)
                            return
                        time.sleep(server.delay)
                        chunk = {"choices": [{"index": 0, "delta": {"content": word}, "token_ids": [100 + i],
                                              "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                    last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
                    usage = {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": len(server.words)}}
                    for event in (last, usage):
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                    server.finished += 1
                except (BrokenPipeError, ConnectionResetError):
                    server.disconnects += 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.stop()


def dead_url() -> str:
    with socket.socket() as s:  # a port nothing listens on (closed again at once)
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def session_with_image(app):
    s = new_session()
    s["owner"] = "anon:alice-xxxxxxxxxxxxxxxxxxxxxx"
    assert app.set_image(s, png(), "red.png")
    return s


# -- the request ----------------------------------------------------------------------------------------------------
def test_decoding_settings_map_to_api_fields():
    greedy = sampling_fields(dict(DEFAULT_DECODING, max_new_tokens=20))
    assert greedy == {"max_tokens": 20, "temperature": 0.0}  # neutral settings add nothing a plain server refuses
    sampled = sampling_fields(settings_from_controls(mode=SAMPLING, temperature=0.7, top_p=0.8, seed=7,
                                                     repetition_penalty=1.3, min_new_tokens=3))
    assert sampled["temperature"] == 0.7 and sampled["top_p"] == 0.8 and sampled["seed"] == 7
    assert sampled["repetition_penalty"] == 1.3 and sampled["min_tokens"] == 3
    # Beam search has no field: the beam count and length penalty are not sent (the card's notes say so).
    beams = sampling_fields(dict(DEFAULT_DECODING, num_beams=4, length_penalty=2.0))
    assert beams == {"max_tokens": DEFAULT_DECODING["max_new_tokens"], "temperature": 0.0}


def test_messages_carry_turns_and_one_image_in_the_first_user_message():
    messages = build_messages("data:image/png;base64,AAA", [("q1", "a1"), ("q2", "a2", [5, 6])], "q3")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
                                      {"type": "text", "text": "q1"}]
    assert [m["content"] for m in messages[1:]] == ["a1", "q2", "a2", "q3"]


def test_images_are_checked_and_normalised_with_pillow_only():
    head, data = decode_url(image_data_url(png()))
    assert head == "data:image/png;base64" and data == png()  # a plain PNG travels as it is
    transparent = png(color=(0, 0, 0, 0), mode="RGBA")
    head, data = decode_url(image_data_url(transparent))
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # over white
    buf = io.BytesIO()
    img = Image.new("RGB", (4, 8), "blue")
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° to display
    img.save(buf, "JPEG", exif=exif)
    _, data = decode_url(image_data_url(buf.getvalue()))
    assert Image.open(io.BytesIO(data)).size == (8, 4)  # sent upright
    with pytest.raises(BadImage, match="could not be read"):
        image_data_url(b"not an image")
    tiff = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiff, "TIFF")
    with pytest.raises(BadImage, match="Unsupported image format TIFF"):
        image_data_url(tiff.getvalue())


def test_a_16_bit_picture_reaches_the_server_as_blip2_would_see_it():
    import numpy as np

    from blip2.images import load_image  # the reference: what a local model sees

    samples = np.array([[0, 257, 40000, 65535]] * 3, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(samples).save(buf, "PNG")  # decodes as mode I;16 / I
    _, data = decode_url(image_data_url(buf.getvalue()))
    sent = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    expected = np.asarray(load_image(buf.getvalue()))
    assert np.array_equal(sent, expected)
    assert sent[0, 2].tolist() == [156, 156, 156]  # 40000 / 257, not clipped to white


# -- answers --------------------------------------------------------------------------------------------------------
def test_streams_a_reply_and_sends_what_vllm_needs(server):
    backend = RemoteBackend(server.url, timeout=5)
    assert backend.model == "tiny-blip2" and backend.card.context_length == 512  # from /v1/models
    assert "beam search" in backend.card.notes[0] and server.url in backend.card.notes[0]
    stream = backend.chat(png(), [("q1", "a1")], "What is it?", dict(DEFAULT_DECODING, max_new_tokens=5))
    chunks = list(stream)
    assert chunks == server.words
    body = server.requests[-1]
    assert body["stream"] is True and body["add_special_tokens"] is True  # BOS, as transformers' prompt has
    assert body["model"] == "tiny-blip2" and body["max_tokens"] == 5 and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][-1] == {"role": "user", "content": "What is it?"}
    reply = stream.reply
    assert reply.text == "".join(server.words) and reply.prompt_tokens == 40 and reply.new_tokens == 5
    assert reply.token_ids == [100, 101, 102, 103, 104] and not reply.cancelled
    assert reply.extra["finish_reason"] == "length"


def test_whole_answers_when_streaming_is_off(server):
    backend = RemoteBackend(server.url, "tiny-blip2", timeout=5, streaming=False)
    stream = backend.chat(png(), [], "q", dict(DEFAULT_DECODING))
    assert list(stream) == ["".join(server.words)]
    assert server.requests[-1]["stream"] is False and "stream_options" not in server.requests[-1]
    assert stream.reply.new_tokens == 3 and stream.reply.token_ids == [1, 2, 3]


def test_a_model_the_server_does_not_serve_is_refused_at_start(server):
    with pytest.raises(ValueError, match="serves tiny-blip2, not 'other'"):
        RemoteBackend(server.url, "other")


def test_stop_closes_the_stream_and_the_next_request_works(server):
    server.words, server.delay = [f" w{i}" for i in range(40)], 0.05
    backend = RemoteBackend(server.url, timeout=5)
    stream = backend.chat(png(), [], "q", dict(DEFAULT_DECODING))
    chunks = iter(stream)
    got = [next(chunks), next(chunks)]
    stream.cancel()
    chunks.close()  # what the chat does on Stop: the HTTP stream is closed, the server sees the client go
    deadline = time.time() + 5
    while server.disconnects == 0 and time.time() < deadline:
        time.sleep(0.05)
    assert server.disconnects == 1 and server.finished == 0
    assert got == [" w0", " w1"] and stream.reply.cancelled and stream.reply.text == " w0 w1"
    server.words, server.delay = ["ok"], 0.0
    assert list(backend.chat(png(), [], "again", dict(DEFAULT_DECODING))) == ["ok"]


def test_a_conversation_too_long_for_the_server_drops_its_oldest_turns(server):
    server.mode = "too_long"
    backend = RemoteBackend(server.url, timeout=5)
    stream = backend.chat(png(), [("q1", "a1"), ("q2", "a2")], "q3", dict(DEFAULT_DECODING))
    assert "".join(stream) == "".join(server.words)
    assert [len(r["messages"]) for r in server.requests] == [5, 3, 1]
    assert "oldest 2 turn" in stream.reply.notice
    # The image survives the trimming: it moves to the first message that is left.
    assert server.requests[-1]["messages"][0]["content"][0]["type"] == "image_url"


# -- failures -----------------------------------------------------------------------------------------------------
def test_server_failures_become_plain_errors(server):
    backend = RemoteBackend(server.url, timeout=1)
    server.mode = "error500"
    with pytest.raises(BackendUnavailable, match=r"failed \(HTTP 500: engine dead\)"):
        list(backend.chat(png(), [], "q", dict(DEFAULT_DECODING)))
    server.mode = "bad_request"  # a request the server refuses is said as a fixable problem, not an outage
    with pytest.raises(ValueError, match="temperature must be non-negative"):
        list(backend.chat(png(), [], "q", dict(DEFAULT_DECODING)))
    server.mode = "hang"
    with pytest.raises(BackendUnavailable, match="did not answer within 1 s"):
        list(backend.chat(png(), [], "q", dict(DEFAULT_DECODING)))
    server.mode = "drop"
    stream = backend.chat(png(), [], "q", dict(DEFAULT_DECODING))
    got = []
    with pytest.raises(BackendUnavailable, match="lost during the answer"):
        for chunk in stream:
            got.append(chunk)
    assert got == server.words[:2] and stream.reply.cancelled


def test_a_server_that_is_down_keeps_the_users_turn_in_chat_and_history():
    url = dead_url()
    with pytest.raises(BackendUnavailable, match="--served-model"):
        RemoteBackend(url)  # unnamed, the model can only come from the server
    backend = RemoteBackend(url, "tiny-blip2", timeout=2)  # named: the app starts and says the server is down
    assert backend.health() == (False, "server down")
    store = MemoryStore()
    app = ChatApp(backend, store)
    s = session_with_image(app)
    list(app.send(s, "What is it?"))
    user, reply = s["turns"][-2], s["turns"][-1]
    assert user["role"] == "user" and user["text"] == "What is it?"
    assert reply["status"] == "error" and "cannot be reached" in reply["text"] and MODEL_FAILED not in reply["text"]
    saved = store.get_conversation(s["owner"], s["conversation_id"]).messages
    assert [(m.role, m.text) for m in saved if m.role == "user"] == [("user", "What is it?")]
    assert saved[-1].status == "error"
    with pytest.raises(UserError, match="cannot be reached"):  # the one-shot API says the same
        list(app.one_shot(png(), "q"))


def test_server_killed_mid_answer_through_the_chat(server):
    store = MemoryStore()
    app = ChatApp(RemoteBackend(server.url, timeout=2), store)
    s = session_with_image(app)
    list(app.send(s, "first"))
    assert s["turns"][-1]["status"] == "done"
    server.mode = "drop"
    list(app.send(s, "second"))
    assert s["turns"][-2]["text"] == "second" and "lost during the answer" in s["turns"][-1]["text"]
    assert [m.text for m in store.get_conversation(s["owner"], s["conversation_id"]).messages
            if m.role == "user"] == ["first", "second"]
    server.mode = "ok"
    list(app.send(s, "third"))  # the conversation goes on once the server answers again
    assert s["turns"][-1]["status"] == "done"
    sent = server.requests[-1]["messages"]
    assert sent[0]["content"][1]["text"] == "first" and sent[1]["content"] == "".join(server.words)
    assert sent[-1]["content"] == "third"


def test_health_follows_the_server():
    server = FakeServer()
    backend = RemoteBackend(server.url, timeout=2)
    assert backend.health() == (True, "server up")
    server.stop()
    backend._health = None  # skip the few-second cache
    assert backend.health() == (False, "server down")


def test_app_py_server_url_starts_without_torch_or_blip2(server):
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('app_main', {str(ROOT / 'app.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"args = m.parse_args(['--server-url', {server.url!r}, '--server-timeout', '5'])\n"
        "backend = m.remote_backend(args)\n"
        "from app.ui import build_ui\n"
        "build_ui(backend, None)\n"
        "print(backend.model, 'torch' in sys.modules, 'blip2' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-3:] == ["tiny-blip2", "False", "False"]
    assert "Answering through" in out.stdout and "server up" in out.stdout


def test_env_vars_configure_the_server(monkeypatch):
    from conftest import load_app_py

    monkeypatch.setenv("BLIP2_SERVER_URL", "http://h:1/v1")
    monkeypatch.setenv("BLIP2_SERVED_MODEL", "m")
    monkeypatch.setenv("BLIP2_SERVER_TIMEOUT", "7.5")
    args = load_app_py().parse_args([])
    assert (args.server_url, args.served_model, args.server_timeout) == ("http://h:1/v1", "m", 7.5)
    assert load_app_py().parse_args(["--server-url", "http://x/v1"]).server_url == "http://x/v1"
