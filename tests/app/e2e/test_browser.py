"""The chat page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser download), at a
desktop (1400x900) and a phone (390x844) viewport, against the fake backend: the flows a person goes through, and a
screenshot of each main state in $BLIP2_SCREENSHOTS (default runs/screenshots/, not committed) for a reviewer."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from app.icons import EMOJI_RANGES as EMOJI  # emoji and symbols that need a font of their own
from conftest import load_app_py

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")

ROOT = Path(__file__).resolve().parents[3]
CHROMIUM = os.environ.get("BLIP2_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORTS = {"desktop": dict(width=1400, height=900), "phone": dict(width=390, height=844)}
SHOTS = Path(os.environ.get("BLIP2_SCREENSHOTS") or ROOT / "runs" / "screenshots")
T = 15_000  # ms: how long a step may take on a busy machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tmp_path, **kw):
    from app.fakes import FakeBackend
    from app.store import ConversationStore
    from app.ui import build_ui

    store = ConversationStore(data_dir=tmp_path / "data")
    # The fake streams one word every 0.15 s: slow enough to watch a reply grow, to stop it, to type meanwhile.
    demo = build_ui(FakeBackend(delay=0.15, words=10), store, browser_secret="e2e-secret-e2e-secret", **kw)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    return url, demo, store


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    url, demo, store = serve(tmp_path_factory.mktemp("e2e"))
    yield url
    demo.close()
    store.close()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set BLIP2_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


def open_page(browser, viewport: str, url: str | None = None):
    """A fresh browser profile (so a new anonymous user) at ``viewport``."""
    context = browser.new_context(viewport=VIEWPORTS[viewport])
    page = context.new_page()
    page.viewport_name = viewport
    if url:
        page.goto(url)
        page.wait_for_selector("#message textarea", timeout=30_000)
    return page


@pytest.fixture(params=list(VIEWPORTS))
def page(request, browser, app_url):
    page = open_page(browser, request.param, app_url)
    yield page
    page.context.close()


@pytest.fixture
def desktop(browser, app_url):
    page = open_page(browser, "desktop", app_url)
    yield page
    page.context.close()


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.3)  # let transitions (sidebars, toasts) settle
    page.screenshot(path=str(SHOTS / f"{page.viewport_name}-{name}.png"))


def bot_texts(page) -> list[str]:
    return [el.inner_text() for el in page.query_selector_all('#chat [data-testid="bot"]')]


def user_texts(page) -> list[str]:
    return [el.inner_text() for el in page.query_selector_all('#chat [data-testid="user"]')]


def wait_for_bot(page, predicate: str, timeout=T) -> None:
    """Wait until the last bot message's text satisfies ``predicate`` (JS, on the variable ``t``)."""
    page.wait_for_function(
        "() => { const b = [...document.querySelectorAll('#chat [data-testid=\"bot\"]')];"
        f" const t = b.length ? b[b.length - 1].innerText : ''; return {predicate}; }}", timeout=timeout)


def wait_idle(page) -> None:
    """The reply is done: the composer offers to send again."""
    page.wait_for_selector('#message button[aria-label="Stop"]', state="detached", timeout=T)
    page.wait_for_selector("#chat .typing", state="detached", timeout=T)


def ask(page, text: str, picture: Path | None = None) -> None:
    if picture is not None:
        page.set_input_files("#message input[type=file]", str(picture))
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def red_png(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(path)
    return path


def open_history(page) -> None:
    if not page.query_selector("#history-sidebar.open"):
        page.click("#open-history")
    page.wait_for_selector("#history-sidebar.open", timeout=T)


def test_chat_first_layout(page):
    """The chat fills the window with the composer pinned at the bottom; the page itself does not scroll; a phone
    opens on the chat (history sidebar closed), a desktop shows the history beside it."""
    assert "fake" in page.inner_text("#model-card")  # model, precision and device are shown
    page.wait_for_selector("#chat button.example", timeout=T)  # the empty chat offers example cards
    assert len(page.query_selector_all("#chat button.example")) == 3
    if page.viewport_name == "desktop":
        page.wait_for_selector("#history-sidebar.open", timeout=T)
    else:
        time.sleep(1)
        assert not page.query_selector("#history-sidebar.open")
    sizes = page.evaluate("""() => ({
        scroll: document.scrollingElement.scrollHeight, height: window.innerHeight,
        composer: document.querySelector('#message').getBoundingClientRect().bottom,
        chat: document.querySelector('#chat').getBoundingClientRect().height })""")
    assert sizes["scroll"] <= sizes["height"] + 1, sizes  # only the chat scrolls
    assert sizes["composer"] <= sizes["height"] and sizes["chat"] > sizes["height"] * 0.45, sizes
    label = page.query_selector('#chat [data-testid="block-label"]')
    assert label is None or not label.is_visible()  # no label over the first message
    assert "image" in page.get_attribute("#message input[type=file]", "accept")  # the picker offers pictures
    text = page.inner_text("body")
    assert not EMOJI.findall(text), EMOJI.findall(text)  # nothing relies on an emoji font
    shot(page, "empty")


def test_upload_ask_stream_reload_resume(page, tmp_path):
    ask(page, "What colour is it?", red_png(tmp_path))
    page.wait_for_selector('#message button[aria-label="Stop"]', timeout=T)  # send has turned into stop
    page.wait_for_selector("#gen-status .elapsed", timeout=T)  # and a status line counts the time
    seen = []  # the reply as it grows
    deadline = time.time() + 30
    while time.time() < deadline:
        texts = bot_texts(page)
        if texts and "to:What colour is it?" in texts[-1] and texts[-1] not in seen:
            seen.append(texts[-1])
            if len(seen) == 2:
                shot(page, "streaming")
        if seen and seen[-1].count("word") == 10:
            break
        time.sleep(0.05)
    assert seen and seen[-1].count("word") == 10, seen
    assert len(seen) >= 3, f"the answer did not stream: {seen}"
    wait_idle(page)
    assert any("New picture: red.png" in t for t in bot_texts(page))
    assert page.query_selector('#chat [data-testid="user"] img')  # the picture is in the user's message
    page.wait_for_selector("#current-picture img", timeout=T)  # and pinned beside the composer
    shot(page, "chat")

    page.reload()  # reload reopens the last conversation
    page.wait_for_selector("#message textarea", timeout=30_000)
    wait_for_bot(page, "t.includes('word')")
    page.wait_for_selector("#current-picture img", timeout=T)

    page.click("#new-chat")
    page.wait_for_selector("#chat button.example", timeout=T)
    assert bot_texts(page) == []
    open_history(page)
    entry = page.locator("#history label", has_text="What colour is it?")
    entry.wait_for(timeout=T)  # the same browser finds its conversation
    shot(page, "history")
    entry.click()
    wait_for_bot(page, "t.includes('word')")
    page.wait_for_selector("#current-picture img", timeout=T)  # the picture came back too
    if page.viewport_name == "phone":  # picking a conversation on a phone goes back to the chat
        page.wait_for_selector("#history-sidebar.open", state="detached", timeout=T)


def test_stop_is_shown_at_once(desktop, tmp_path):
    page = desktop
    ask(page, "Tell me everything", red_png(tmp_path))
    wait_for_bot(page, "t.includes('to:Tell me everything')")
    page.click('#message button[aria-label="Stop"]')
    wait_for_bot(page, "t.includes('(stopped)')", timeout=5_000)  # on screen now, not only after a reload
    page.wait_for_selector('#message button[aria-label="Stop"]', state="detached", timeout=T)
    assert bot_texts(page)[-1].count("word") < 10
    shot(page, "stopped")


def test_enter_while_a_preset_answers_is_queued(desktop):
    page = desktop
    page.click("#chat button.example >> nth=0")  # an example card: its picture and its question
    wait_for_bot(page, "t.includes('word')")
    wait_idle(page)
    assert page.query_selector('#chat [data-testid="user"] img')
    page.click("#presets button >> nth=0")  # a preset ...
    wait_for_bot(page, "t.includes('to:Write a short capt')")
    ask(page, "And the colours?")  # ... and Enter while it answers
    page.wait_for_function("() => [...document.querySelectorAll('#chat [data-testid=\"user\"]')]"
                           ".some(e => e.innerText.includes('And the colours?') && e.innerText.includes('waiting'))",
                           timeout=2_000)  # shown at once, marked as waiting
    assert page.input_value("#message textarea") == ""
    assert "1 message waiting" in page.inner_text("#gen-status")
    shot(page, "queued")
    wait_for_bot(page, "t.includes('to:And the colours?') && t.split('word').length == 11")
    wait_idle(page)
    assert not any("waiting" in t for t in user_texts(page))


def test_settings_cut_answers_and_regenerate(desktop, tmp_path):
    page = desktop
    page.click("#open-settings")
    page.wait_for_selector("#settings-sidebar.open", timeout=T)
    assert not page.is_visible("#temperature") and page.is_visible("#beams")  # greedy: no temperature
    page.click("#mode label:has-text('Sampling')")
    page.wait_for_selector("#temperature", state="visible", timeout=T)
    assert page.is_visible("#seed") and not page.is_visible("#beams")
    shot(page, "settings")
    page.click("#style-precise")
    page.wait_for_selector("#temperature", state="hidden", timeout=T)
    page.fill("#max-new-tokens input[type=number]", "5")
    page.press("#max-new-tokens input[type=number]", "Enter")
    page.click("#settings-sidebar .toggle-button")
    page.wait_for_selector("#settings-sidebar.open", state="detached", timeout=T)

    ask(page, "Describe it", red_png(tmp_path))
    wait_for_bot(page, "t.includes('cut at the length limit of 5 tokens')")  # a cut answer says so
    wait_idle(page)
    page.click('#chat button[aria-label="Retry"]')
    wait_for_bot(page, "t.includes('sampling with seed')")  # greedy would repeat itself: it samples, and says so
    wait_idle(page)
    shot(page, "regenerated")

    page.click("#open-settings")
    page.fill("#beams input[type=number]", "3")
    page.press("#beams input[type=number]", "Enter")
    page.wait_for_selector("#length-penalty", state="visible", timeout=T)  # it applies with beams only
    page.click("#settings-sidebar .toggle-button")
    ask(page, "Once more")
    page.wait_for_function("() => document.querySelector('#gen-status').innerText.includes('3 beams')",
                           timeout=T)  # beam search says the answer comes at the end
    wait_idle(page)


def test_delete_asks_first_and_can_be_undone(desktop, tmp_path):
    page = desktop
    ask(page, "Keep this one", red_png(tmp_path))
    wait_idle(page)
    open_history(page)
    entry = page.locator("#history label", has_text="Keep this one")
    entry.wait_for(timeout=T)
    page.click("#delete")
    page.wait_for_selector("#confirm-delete", state="visible", timeout=T)
    assert "Keep this one" in page.inner_text("#confirm-delete")
    shot(page, "delete-confirm")
    page.click("#confirm-delete-no")
    page.wait_for_selector("#confirm-delete", state="hidden", timeout=T)
    assert entry.count() == 1
    page.click("#delete")
    page.click("#confirm-delete-yes")
    entry.wait_for(state="detached", timeout=T)
    page.wait_for_selector("#undo-delete", state="visible", timeout=T)
    shot(page, "deleted")
    page.click("#undo-delete")
    page.locator("#history label", has_text="Keep this one").wait_for(timeout=T)  # back again
    wait_for_bot(page, "t.includes('to:Keep this one')")


def test_unusable_file_is_a_plain_toast(desktop, tmp_path):
    page = desktop
    bad = tmp_path / "notes.png"
    bad.write_text("these are notes, not a picture")
    ask(page, "What is this?", bad)
    toast = page.wait_for_selector('[data-testid="toast-body"]', timeout=T)
    assert "could not be used" in toast.inner_text() and "not an image" in toast.inner_text()
    assert page.input_value("#message textarea") == "What is this?"  # nothing typed is lost
    assert bot_texts(page) == []
    shot(page, "error")


@pytest.fixture(scope="module")
def default_model_url(tmp_path_factory):
    """The app as ``python app.py`` serves it: the offline default model (a few seconds to load on a CPU)."""

    import blip2
    from app.store import ConversationStore
    from app.ui import build_ui

    backend = load_app_py().Blip2Backend(blip2.load("default", precision="fp32", device="cpu"))
    store = ConversationStore(data_dir=tmp_path_factory.mktemp("e2e-default") / "data")
    demo = build_ui(backend, store, browser_secret="e2e-secret-e2e-secret")
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield url
    demo.close()
    store.close()


@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_the_default_model_in_the_chat(browser, default_model_url, viewport):
    """The real default model: the page offers what it answers well (simple drawn shapes), not invention; its
    screenshots are the ones the README shows (assets/screenshots/chat.png is a copy of desktop-default-chat.png)."""
    page = open_page(browser, viewport, default_model_url)
    try:
        page.wait_for_selector("#chat button.example", timeout=T)
        cards = page.inner_text("#chat .examples")
        assert "What shape is this?" in cards and "Is there a triangle?" in cards
        presets = page.inner_text("#presets")
        assert "What shape?" in presets and "Tell a story" not in presets and "Romantic" not in presets
        shot(page, "default-empty")
        page.click("#chat button.example >> nth=0")  # the triangle: "What shape is this?"
        wait_for_bot(page, "t.toLowerCase().includes('triangle')")  # docs/model-card.md: shapes 98% right
        wait_idle(page)
        ask(page, "Is there a triangle?", ROOT / "assets" / "examples" / "shapes.jpg")  # a new picture
        page.wait_for_function("() => document.querySelectorAll('#chat [data-testid=\"user\"] img').length == 2",
                               timeout=T)
        wait_for_bot(page, "t.includes('New picture: shapes.jpg') == false && t.trim().length > 0")
        wait_idle(page)
        shot(page, "default-chat")
    finally:
        page.context.close()


def test_login_page_and_signed_in_header(browser, tmp_path):
    url, demo, store = serve(tmp_path, auth=[("alice", "pw1")])
    try:
        page = open_page(browser, "desktop")
        page.goto(url)
        page.wait_for_selector("input[type=password]", timeout=30_000)
        assert "BLIP-2 chat" in page.inner_text("body")  # the login page says what it is
        shot(page, "login")
        page.fill("input[type=text]", "alice")
        page.fill("input[type=password]", "pw1")
        page.keyboard.press("Enter")
        page.wait_for_selector("#message textarea", timeout=30_000)
        page.wait_for_function("() => document.querySelector('#user-box').innerText.includes('alice')", timeout=T)
        assert page.get_attribute("#user-box a", "href") == "logout"
        shot(page, "signed-in")
        page.click("#user-box a")
        page.wait_for_selector("input[type=password]", timeout=T)  # logged out
        page.context.close()
    finally:
        demo.close()
        store.close()
