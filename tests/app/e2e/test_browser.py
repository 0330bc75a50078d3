"""One end-to-end run in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser download):
upload a picture, ask, watch the answer stream in, reload, find the conversation in the sidebar and resume it."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from PIL import Image

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("BLIP2_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app_url(tmp_path):
    from app.fakes import FakeBackend
    from app.store import ConversationStore
    from app.ui import build_ui

    store = ConversationStore(data_dir=tmp_path / "data")
    # The fake streams one word every 0.15 s, slow enough to watch the reply grow.
    demo = build_ui(FakeBackend(delay=0.15, words=10), store, browser_secret="e2e-secret-e2e-secret")
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url
    demo.close()
    store.close()


@pytest.fixture
def page():
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set BLIP2_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser.new_page()
        browser.close()


def bot_texts(page) -> list[str]:
    return [el.inner_text() for el in page.query_selector_all('#chat [data-testid="bot"]')]


def test_upload_ask_stream_reload_resume(app_url, page, tmp_path):
    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    page.goto(app_url)
    page.wait_for_selector("#message textarea", timeout=30_000)
    assert "fake" in page.inner_text("#model-card")  # model, precision and device are shown

    page.set_input_files("#message input[type=file]", str(picture))
    page.fill("#message textarea", "What colour is it?")
    page.press("#message textarea", "Enter")

    seen = []  # the reply as it grows
    deadline = time.time() + 30
    while time.time() < deadline:
        texts = bot_texts(page)
        if texts and "to:What colour is it?" in texts[-1] and texts[-1] not in seen:
            seen.append(texts[-1])
        if seen and seen[-1].count("word") == 10:
            break
        time.sleep(0.05)
    assert seen and seen[-1].count("word") == 10, seen
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    assert any("New picture: red.png" in t for t in bot_texts(page))

    page.reload()
    page.wait_for_selector("#message textarea", timeout=30_000)
    entry = page.locator("#history label", has_text="What colour is it?")
    entry.wait_for(timeout=15_000)  # the same browser finds its conversation after a reload
    assert bot_texts(page) == []
    entry.click()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#chat [data-testid=\"bot\"]')].some(e => e.innerText.includes('word'))",
        timeout=15_000)
    page.wait_for_selector("#current-picture img", timeout=15_000)  # the picture came back too
