"""A launched app driven through gradio_client. The endpoints and bad uploads run twice (``real_app``'s params): on
the tiny real model (conftest's ``our_checkpoint``) behind ``app.py``'s Blip2Backend, and on a real vLLM serving a
tiny official BLIP-2 OPT checkpoint behind app/remote.py's RemoteBackend (``python app.py --server-url``; one server
for the module, skipped without ``.venv-vllm``, as tests/serving/ is). The fake backend where timing must be
controlled (stop/cancel, a full queue)."""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import struct
import sys
import time
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app.fakes import FakeBackend, MemoryStore
from app.remote import RemoteBackend
from app.store import ConversationStore
from app.ui import build_ui
from conftest import load_app_py

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "serving"))  # the serving tests' helpers, as benchmarks/bench_serving.py
from vllm_server import NO_VLLM, SERVED_NAME, VLLM_PYTHON, build_servable, running  # noqa: E402




def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo):
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    return url


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """A real vLLM (CPU) serving a tiny official BLIP-2 OPT checkpoint, once for the module."""
    checkpoint = build_servable(tmp_path_factory.mktemp("blip2-opt-servable"))
    with running(checkpoint, tmp_path_factory.mktemp("vllm")) as server:
        yield server


# "vllm" is marked as tests/serving/ is (slow) and skipped where that venv is missing; pytest runs every "local" test
# before the first "vllm" one (a module-scoped param), so the server starts once.
@pytest.fixture(scope="module", params=["local", pytest.param("vllm", marks=[
    pytest.mark.slow, pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=NO_VLLM)])])
def real_app(request, tmp_path_factory):
    """(url, demo) of a launched app on a real model: in-process ("local", ``python app.py --model``) or through a
    model server ("vllm", ``python app.py --server-url URL --served-model NAME``)."""
    if request.param == "local":
        import blip2

        model = blip2.load(str(request.getfixturevalue("our_checkpoint")), precision="fp32", device="cpu")
        backend = load_app_py().Blip2Backend(model)
    else:
        backend = RemoteBackend(request.getfixturevalue("vllm").url, SERVED_NAME, timeout=60)
    store = ConversationStore(data_dir=tmp_path_factory.mktemp("app-data"))
    demo = build_ui(backend, store, max_concurrency=1, queue_size=16)
    url = launch(demo)
    yield url, demo
    demo.close()
    store.close()
    if isinstance(backend, RemoteBackend):
        backend.close()


def write(tmp_path, name, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def picture(seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def bomb_png(width=30000, height=30000) -> bytes:
    """A small PNG whose header claims 900 megapixels (decompressed it would be gigabytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = zlib.compress(b"\0" * (width + 1) * 8, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def test_backend_maps_bad_images(real_app, request):
    from app.backend import BadImage

    demo = real_app[1]
    backend = demo.chat_app.backend
    if request.node.callspec.params["real_app"] == "local":
        assert isinstance(backend, load_app_py().Blip2Backend)
        assert backend.card.device == "cpu" and backend.card.precision == "fp32"
    else:  # a server's card names the server and its model: the device and precision are the server's to choose
        assert isinstance(backend, RemoteBackend) and backend.model == SERVED_NAME
        assert backend.card.device.startswith("vLLM at 127.0.0.1:") and backend.card.precision == "server"
    with pytest.raises(BadImage):
        backend.check_image(b"not an image")
    with pytest.raises(BadImage):
        backend.chat(b"not an image", [], "hi", {})


def test_caption_and_ask(real_app, tmp_path):
    url, _ = real_app
    client = Client(url, verbose=False)
    path = write(tmp_path, "p.png", encode(picture(), "PNG"))
    caption = client.predict(handle_file(path), api_name="/caption")
    answer = client.predict(handle_file(path), "What is in the picture?", api_name="/ask")
    assert isinstance(caption, str) and caption.strip()
    assert isinstance(answer, str) and answer.strip()


def test_chat_streams_and_is_multi_turn(real_app, tmp_path):
    url, _ = real_app
    client = Client(url, verbose=False)
    path = write(tmp_path, "p.png", encode(picture(1), "PNG"))
    job = client.submit(handle_file(path), "Describe the picture.", api_name="/chat")
    updates = [u for u in job if u]
    assert len(set(updates)) >= 3, updates  # several partial updates, each extending the last
    assert all(updates[-1].startswith(u) for u in updates)
    second = client.predict(None, "And the colours?", api_name="/chat")  # keeps the picture
    assert second.strip()
    history = client.predict(api_name="/history")
    assert len(history) == 1 and history[0]["messages"] == 5  # picture note + 2 questions + 2 answers
    data = client.predict(history[0]["id"], api_name="/conversation")
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_sessions_are_isolated(real_app, tmp_path):
    url, _ = real_app
    alice, mallory = Client(url, verbose=False), Client(url, verbose=False)
    path = write(tmp_path, "p.png", encode(picture(2), "PNG"))
    alice.predict(handle_file(path), "my secret question", api_name="/chat")
    [conv] = alice.predict(api_name="/history")
    assert mallory.predict(api_name="/history") == []
    with pytest.raises(Exception, match="does not exist"):
        mallory.predict(conv["id"], api_name="/conversation")
    with pytest.raises(Exception):  # the UI's own handlers are not callable through the API
        mallory.predict(conv["id"], api_name="/on_open")


@pytest.mark.parametrize("name, data, ok", [
    ("text.png", b"this is not a picture at all", False),
    ("truncated.png", encode(picture(), "PNG")[:60], False),
    ("bomb.png", bomb_png(), False),
    ("one.png", encode(Image.new("RGB", (1, 1), "red"), "PNG"), True),
    ("cmyk.jpg", encode(Image.new("CMYK", (32, 32), (10, 200, 30, 0)), "JPEG"), True),
    ("deep.png", encode(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG"), True),
    ("anim.gif", encode(Image.new("P", (16, 16)), "GIF", save_all=True,
                        append_images=[Image.new("P", (16, 16), 3)], duration=100, loop=0), True),
    ("huge.png", encode(picture(), "PNG") + b"\0" * (21 * 1024 * 1024), False),
])
def test_uploads(real_app, tmp_path, name, data, ok):
    url, _ = real_app
    client = Client(url, verbose=False)
    path = write(tmp_path, name, data)
    if ok:
        assert client.predict(handle_file(path), "What is it?", api_name="/ask").strip()
    else:
        with pytest.raises(Exception) as info:
            client.predict(handle_file(path), "What is it?", api_name="/ask")
        message = str(info.value).lower()
        print(name, "->", info.value)
        assert any(w in message for w in ("image", "large", "pixels", "truncated", "file")), message
        # the app still answers afterwards
        good = write(tmp_path, "good.png", encode(picture(), "PNG"))
        assert client.predict(handle_file(good), api_name="/caption").strip()


@pytest.fixture
def fake_app():
    backend = FakeBackend(delay=0.05, words=200)
    demo = build_ui(backend, MemoryStore(), max_concurrency=1, queue_size=1)
    url = launch(demo)
    yield url, backend
    demo.close()


def test_cancel_stops_generation(fake_app, tmp_path):
    url, backend = fake_app
    client = Client(url, verbose=False)
    path = write(tmp_path, "p.png", encode(picture(), "PNG"))
    job = client.submit(handle_file(path), "go on forever", api_name="/chat")
    deadline = time.time() + 20
    while len(job.outputs()) < 3 and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    deadline = time.time() + 10
    while not (backend.streams and backend.streams[-1].cancelled) and time.time() < deadline:
        time.sleep(0.05)
    stream = backend.streams[-1]
    assert stream.cancelled, "the generator was not closed on cancel"
    time.sleep(0.3)
    assert stream.closed and len(stream.reply.text.split()) < 200


def test_full_queue_says_busy(fake_app, tmp_path):
    url, backend = fake_app
    backend.words = 10  # about half a second per answer
    path = write(tmp_path, "p.png", encode(picture(), "PNG"))
    clients = [Client(url, verbose=False) for _ in range(4)]
    jobs = [c.submit(handle_file(path), "q", api_name="/ask") for c in clients]
    errors = []
    for job in jobs:
        try:
            job.result(timeout=60)
        except Exception as exc:  # noqa: BLE001
            errors.append(str(exc))
    assert errors and all("queue is full" in e.lower() for e in errors), errors
    assert len(errors) < len(jobs)  # the ones that fit were answered


def test_auth_owner_is_the_username(tmp_path):
    demo = build_ui(FakeBackend(), MemoryStore(), auth=[("alice", "pw1"), ("bob", "pw2")])
    url = launch(demo)
    try:
        path = write(tmp_path, "p.png", encode(picture(), "PNG"))
        alice = Client(url, auth=("alice", "pw1"), verbose=False)
        alice.predict(handle_file(path), "hello", api_name="/chat")
        assert len(Client(url, auth=("alice", "pw1"), verbose=False).predict(api_name="/history")) == 1
        assert Client(url, auth=("bob", "pw2"), verbose=False).predict(api_name="/history") == []
        with pytest.raises(Exception):
            Client(url, auth=("alice", "wrong"), verbose=False)
    finally:
        demo.close()


def test_load_benchmark_has_no_errors_or_leaks():
    spec = importlib.util.spec_from_file_location("load_app", ROOT / "benchmarks" / "load_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--sessions", "4", "--turns", "2", "--json"])
    assert report["requests"] == 8 and report["errors"] == 0 and report["leaks"] == 0, report


class FailingStream:
    """Starts answering, then the model fails (as a CUDA error would)."""

    reply = None

    def __iter__(self):
        yield "half "
        raise RuntimeError("CUDA error: an illegal memory access was encountered at 0xdead")

    def cancel(self):
        pass


class FailingBackend(FakeBackend):
    def _stream(self, image, *_):
        self.check_image(image)
        return FailingStream()


def test_generation_failure_is_an_error_for_the_client(tmp_path):
    store = MemoryStore()
    demo = build_ui(FailingBackend(), store)
    url = launch(demo)
    try:
        client = Client(url, verbose=False)
        path = write(tmp_path, "p.png", encode(picture(), "PNG"))
        for args, api in [((handle_file(path), "What is it?"), "/chat"), ((handle_file(path), "What?"), "/ask"),
                          ((handle_file(path),), "/caption")]:
            with pytest.raises(Exception, match="could not answer") as info:  # not "" and not {"error": null}
                client.predict(*args, api_name=api)
            assert "0xdead" not in str(info.value)
        [conv] = client.predict(api_name="/history")
        data = client.predict(conv["id"], api_name="/conversation")
        assert [(m["role"], m["status"]) for m in data["messages"]] == [
            ("system", "done"), ("user", "done"), ("assistant", "error")]  # the question is kept with its error
    finally:
        demo.close()


def call_by_index(url: str, cookies: dict, fn_index: int, data: list, session_hash: str) -> dict:
    """Run the event numbered ``fn_index`` as the browser does (queue/join, then the queue's event stream) and
    return its process_completed message. The event data is what a select event needs; other events ignore it."""
    import httpx

    base = url.rstrip("/")
    with httpx.Client(cookies=cookies, timeout=30) as http:
        http.post(f"{base}/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash":
                                                         session_hash, "trigger_id": None,
                                                         "event_data": {"index": 0, "value": None}}
                  ).raise_for_status()
        with http.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session_hash}) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and '"process_completed"' in line:
                    return json.loads(line[5:])
    raise AssertionError("no process_completed message")


def call_raw(url: str, api: str, body: dict) -> str:
    """POST /gradio_api/call/<api> with ``body`` as ASCII JSON (escapes such as a lone surrogate, which
    gradio_client cannot encode, arrive as sent) and return the text of the result's event stream."""
    import httpx

    r = httpx.post(f"{url.rstrip('/')}/gradio_api/call/{api}", content=json.dumps(body, ensure_ascii=True),
                   headers={"content-type": "application/json"}, timeout=30)
    r.raise_for_status()
    return httpx.get(f"{url.rstrip('/')}/gradio_api/call/{api}/{r.json()['event_id']}", timeout=60).text


@pytest.mark.parametrize("message, why", [("what is \ud800?", "broken character"), ("nul\x00", "NUL"),
                                          ("x" * 4001, "too long")])
def test_unusable_messages_are_refused_with_a_reason(fake_app, tmp_path, message, why):
    url, backend = fake_app
    path = write(tmp_path, "p.png", encode(picture(), "PNG"))
    client = Client(url, verbose=False)
    for api in ("chat", "ask"):
        events = call_raw(url, api, {"data": [None, message]})
        assert "event: error" in events and why in events, events
    if "\ud800" not in message:  # gradio_client itself cannot send a lone surrogate
        for api in ("/chat", "/ask"):
            with pytest.raises(Exception, match=why):
                client.predict(handle_file(path), message, api_name=api)
    assert backend.calls == [] and client.predict(api_name="/history") == []  # nothing was asked or saved


def test_another_user_cannot_take_over_a_session(tmp_path):
    """With --auth, a session hash (it is in every queue URL) is not enough to use someone else's chat."""
    backend = FakeBackend()
    demo = build_ui(backend, MemoryStore(), auth=[("alice", "pw1"), ("bob", "pw2")])
    url = launch(demo)
    try:
        path = write(tmp_path, "p.png", encode(picture(), "PNG"))
        alice = Client(url, auth=("alice", "pw1"), verbose=False)
        alice.predict(handle_file(path), "my secret plan", api_name="/chat")
        bob = Client(url, auth=("bob", "pw2"), verbose=False)
        bob.session_hash = alice.session_hash  # learnt from a URL
        calls = len(backend.calls)
        with pytest.raises(Exception, match="belongs to another user"):
            bob.predict(None, "Repeat my previous question.", api_name="/chat")
        with pytest.raises(Exception, match="belongs to another user"):
            bob.predict(api_name="/history")
        assert len(backend.calls) == calls  # the model never saw bob's request with alice's turns
        # The page's own events are numbered, not named, and a client can call them by number too: every event
        # that gets the session refuses bob.
        session_state = next(fn for fn in demo.fns.values() if fn.api_name == "chat").inputs[2]
        page_events = [i for i, fn in demo.fns.items() if fn.fn is not None and fn.api_visibility == "private"
                       and any(c is session_state for c in fn.inputs)]
        assert len(page_events) >= 5
        for index in page_events:
            data = [None if isinstance(c, gr.State) else c.value for c in demo.fns[index].inputs]  # the defaults
            result = call_by_index(url, bob.cookies, index, data, alice.session_hash)
            assert "my secret plan" not in json.dumps(result)
            assert result["success"] is False and "belongs to another user" in result["output"]["error"], \
                demo.fns[index].name
        alice.predict(None, "and then?", api_name="/chat")  # alice's session is untouched
        assert backend.calls[-1]["history"][0][0] == "my secret plan"
        assert len(alice.predict(api_name="/history")) == 1
    finally:
        demo.close()


def test_uploads_land_in_a_folder_the_sweep_bounds(monkeypatch, tmp_path):
    from app.uploads import sweep

    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))  # what app.py sets (upload_sweeper)
    demo = build_ui(FakeBackend(), MemoryStore())
    url = launch(demo)
    try:
        client = Client(url, verbose=False)
        path = write(tmp_path, "p.png", encode(picture(), "PNG"))
        assert client.predict(handle_file(path), "What?", api_name="/ask")
        uploaded = [p for p in uploads.rglob("*") if p.is_file()]
        assert any(p.read_bytes() == Path(path).read_bytes() for p in uploaded)
        assert sweep(uploads, max_age_s=3600, max_bytes=0).kept_bytes == 0
        assert not any(p.is_file() and p.stat().st_size for p in uploads.rglob("*"))
        assert client.predict(handle_file(path), "Again?", api_name="/ask")  # later uploads still work
    finally:
        demo.close()
