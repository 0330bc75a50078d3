"""A launched app driven through gradio_client: the tiny real model (conftest's ``our_checkpoint``) behind
``app.py``'s Blip2Backend for the endpoints and bad uploads; the fake backend where timing must be controlled
(stop/cancel, a full queue)."""

from __future__ import annotations

import importlib.util
import io
import socket
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app.fakes import FakeBackend, MemoryStore
from app.store import ConversationStore
from app.ui import build_ui

ROOT = Path(__file__).resolve().parents[2]


def load_app_module():
    """``app.py`` (the top-level script; the name ``app`` is the package)."""
    if "blip2_app_main" not in sys.modules:
        spec = importlib.util.spec_from_file_location("blip2_app_main", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["blip2_app_main"] = module
        spec.loader.exec_module(module)
    return sys.modules["blip2_app_main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo):
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    return url


@pytest.fixture(scope="module")
def real_app(our_checkpoint, tmp_path_factory):
    import blip2

    module = load_app_module()
    backend = module.Blip2Backend(blip2.load(str(our_checkpoint), precision="fp32", device="cpu"))
    store = ConversationStore(data_dir=tmp_path_factory.mktemp("app-data"))
    demo = build_ui(backend, store, max_concurrency=1, queue_size=16)
    url = launch(demo)
    yield url, demo
    demo.close()
    store.close()


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


def test_blip2_backend_maps_bad_images(real_app):
    from app.backend import BadImage

    module = load_app_module()
    demo = real_app[1]
    backend = demo.chat_app.backend
    assert isinstance(backend, module.Blip2Backend)
    assert backend.card.device == "cpu" and backend.card.precision == "fp32"
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
