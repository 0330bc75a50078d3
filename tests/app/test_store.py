"""app.store: conversations persisted in SQLite and PostgreSQL.

Every test that takes `store` runs on SQLite and, when BLIP2_TEST_POSTGRES_URL is set (`source .ci/postgres.sh`),
on a real PostgreSQL server too; each PostgreSQL test gets its own schema, dropped afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from app.migrate import alembic_config, upgrade
from app.store import ConversationStore, NotFound, StoreError, StoreUnavailable
from app.tables import Base, Generation, Image, Message

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("BLIP2_TEST_POSTGRES_URL")
BACKENDS = [
    "sqlite",
    pytest.param("postgresql", marks=pytest.mark.skipif(
        not PG_URL, reason="BLIP2_TEST_POSTGRES_URL is not set (`source .ci/postgres.sh` starts a local server)")),
]
PNG = b"\x89PNG\r\n\x1a\n" + b"fake image one"
JPEG = b"\xff\xd8\xff\xe0" + b"fake image two"


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """None (the default SQLite file under the data dir) or a PostgreSQL URL pinned to a fresh schema."""
    if request.param == "sqlite":
        yield None
        return
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    url = make_url(PG_URL).update_query_dict({"options": f"-csearch_path={schema}", "application_name": schema})
    yield url.render_as_string(hide_password=False)
    with admin.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def store(db_url, data_dir):
    s = ConversationStore(db_url, data_dir)
    yield s
    s.close()


def count(store: ConversationStore, model) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model)).scalar_one()


def add_turn(store, owner, conv, question, answer, **gen):
    u = store.add_message(owner, conv, "user", question)
    a = store.add_message(owner, conv, "assistant", answer)
    store.record_generation(owner, a, **({"model": "default", "precision": "bf16", "device": "cpu",
                                          "settings": {"max_new_tokens": 64}, "prompt_tokens": 40,
                                          "new_tokens": 5, "latency_s": 1.25, "first_token_s": 0.5} | gen))
    return u, a


# ------------------------------------------------------------------------------------------------------------ CRUD

def test_create_list_get_and_ordering(store):
    c1 = store.create_conversation("alice", "  First  ")
    c2 = store.create_conversation("alice")
    assert [c.id for c in store.list_conversations("alice")] == [c2, c1]  # newest first

    m1 = store.add_message("alice", c1, "user", "What is in the picture?")
    m2 = store.add_message("alice", c1, "assistant", "A red house.", status="streaming")
    summaries = store.list_conversations("alice")
    assert [c.id for c in summaries] == [c1, c2]  # a new message moves a conversation to the top
    assert [(c.title, c.message_count) for c in summaries] == [("First", 2), ("New conversation", 0)]

    view = store.get_conversation("alice", c1)
    assert (view.id, view.title, view.settings, view.image_hash) == (c1, "First", {}, None)
    assert [(m.id, m.role, m.text, m.status, m.error) for m in view.messages] == [
        (m1, "user", "What is in the picture?", "done", None), (m2, "assistant", "A red house.", "streaming", None)]
    assert all(m.created_at.tzinfo is not None for m in view.messages)
    assert view.created_at <= view.messages[0].created_at <= view.messages[1].created_at <= view.updated_at
    assert view.created_at.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - view.created_at).total_seconds()) < 60


def test_rename_validates_title(store):
    c = store.create_conversation("alice")
    store.rename_conversation("alice", c, "  Holiday photos \n")
    assert store.get_conversation("alice", c).title == "Holiday photos"
    store.rename_conversation("alice", c, "x" * 200)
    for bad in ["", "   ", "x" * 201]:
        with pytest.raises(ValueError):
            store.rename_conversation("alice", c, bad)
    with pytest.raises(ValueError):
        store.create_conversation("alice", " ")
    assert store.get_conversation("alice", c).title == "x" * 200


def test_update_message_text_status_and_error(store):
    c = store.create_conversation("alice")
    m = store.add_message("alice", c, "assistant", "", status="pending")
    store.update_message("alice", m, text="A red", status="streaming")
    store.update_message("alice", m, text="A red house", status="error", error="CUDA out of memory")
    (msg,) = store.get_conversation("alice", c).messages
    assert (msg.text, msg.status, msg.error) == ("A red house", "error", "CUDA out of memory")
    store.update_message("alice", m, status="done")  # error untouched unless given
    assert store.get_conversation("alice", c).messages[0].error == "CUDA out of memory"
    store.update_message("alice", m, error=None)  # explicit None clears it
    assert store.get_conversation("alice", c).messages[0].error is None
    with pytest.raises(ValueError, match="status"):
        store.update_message("alice", m, status="finished")
    with pytest.raises(ValueError, match="role"):
        store.add_message("alice", c, "bot", "hi")
    with pytest.raises(ValueError, match="status"):
        store.add_message("alice", c, "user", "hi", status="sent")


def test_settings_json_round_trip(store):
    settings = {"max_new_tokens": 128, "temperature": 0.7, "do_sample": True, "seed": None, "top_k": 0,
                "note": "ünïcödé ✓", "nested": {"list": [1, 2.5, "three"]}}
    c = store.create_conversation("alice", settings=settings)
    assert store.get_conversation("alice", c).settings == settings
    store.update_settings("alice", c, {"num_beams": 5})  # replaces, does not merge
    got = store.get_conversation("alice", c).settings
    assert got == {"num_beams": 5}
    got["num_beams"] = 1  # views are copies
    assert store.get_conversation("alice", c).settings == {"num_beams": 5}
    for bad in [{"x": object()}, {"x": float("nan")}, ["not", "a", "dict"]]:
        with pytest.raises(ValueError):
            store.update_settings("alice", c, bad)


def test_token_ids_belong_to_the_text(db_url, data_dir):
    with ConversationStore(db_url, data_dir) as store:
        c = store.create_conversation("alice")
        a = store.add_message("alice", c, "assistant", "A red house.", token_ids=[71, 2, 3008, 4])
        b = store.add_message("alice", c, "assistant", "", status="streaming")
        store.update_message("alice", b, text="A cat.", status="done", token_ids=(5, 6))
        view = store.get_conversation("alice", c)
        assert [m.token_ids for m in view.messages] == [[71, 2, 3008, 4], [5, 6]]
        view.messages[0].token_ids.append(99)  # views are copies
        assert "token_ids" not in store.export_json("alice", c)["messages"][0]  # the tokenizer's business only
        for bad in [[1, "2"], [1.5], [True], "12", 7]:
            with pytest.raises(ValueError, match="token_ids"):
                store.update_message("alice", a, token_ids=bad)
    with ConversationStore(db_url, data_dir) as store:  # kept across a restart
        assert [m.token_ids for m in store.get_conversation("alice", c).messages] == [[71, 2, 3008, 4], [5, 6]]
        store.update_message("alice", a, status="done")  # the text is unchanged: so are its ids
        assert store.get_conversation("alice", c).messages[0].token_ids == [71, 2, 3008, 4]
        store.update_message("alice", a, text="A red house!")  # new text, no ids given: the old ids are dropped
        store.update_message("alice", b, token_ids=None)
        store.add_message("alice", c, "user", "q")
        assert [m.token_ids for m in store.get_conversation("alice", c).messages] == [None, None, None]


def test_unsavable_characters_are_normalised(store):
    """PostgreSQL refuses NUL in text and no driver encodes a lone surrogate: both become U+FFFD, on every backend,
    in every text field, instead of losing the row."""
    c = store.create_conversation("alice", "tit\x00le")
    u = store.add_message("alice", c, "user", "a\x00b\ud800c")
    a = store.add_message("alice", c, "assistant", "", status="streaming", error="e\x00")
    store.update_message("alice", a, text="x\x00y\udfff", status="error", error="bad\x00")
    view = store.get_conversation("alice", c)
    assert view.title == "tit\ufffdle"
    assert [(m.id, m.text, m.error) for m in view.messages] == [
        (u, "a\ufffdb\ufffdc", None), (a, "x\ufffdy\ufffd", "bad\ufffd")]
    store.rename_conversation("alice", c, "\x00 new \ud83d")
    assert store.get_conversation("alice", c).title == "\ufffd new \ufffd"
    assert "a\ufffdb" in store.export_markdown("alice", c)


# ------------------------------------------------------------------------------------------------------- isolation

def test_other_owner_gets_not_found_everywhere(store):
    c = store.create_conversation("alice", "Private", settings={"seed": 1})
    h = store.save_image("alice", c, PNG, "image/png")
    u, a = add_turn(store, "alice", c, "secret question", "secret answer")
    bob_conv = store.create_conversation("bob")

    attempts = {
        "get_conversation": lambda: store.get_conversation("bob", c),
        "rename_conversation": lambda: store.rename_conversation("bob", c, "mine"),
        "update_settings": lambda: store.update_settings("bob", c, {}),
        "save_image": lambda: store.save_image("bob", c, JPEG, "image/jpeg"),
        "image_bytes": lambda: store.image_bytes("bob", h),
        "image_mime": lambda: store.image_mime("bob", h),
        "add_message": lambda: store.add_message("bob", c, "user", "hi"),
        "add_message with alice's image": lambda: store.add_message("bob", bob_conv, "user", "x", image_hash=h),
        "update_message": lambda: store.update_message("bob", a, text="changed"),
        "record_generation": lambda: store.record_generation(
            "bob", a, model="m", precision="fp32", device="cpu", settings={}, prompt_tokens=1, new_tokens=1,
            latency_s=1.0, first_token_s=None),
        "delete_last_turn": lambda: store.delete_last_turn("bob", c),
        "export_json": lambda: store.export_json("bob", c),
        "export_markdown": lambda: store.export_markdown("bob", c),
        "delete_conversation": lambda: store.delete_conversation("bob", c),
    }
    for name, attempt in attempts.items():
        with pytest.raises(NotFound) as foreign:
            attempt()
        assert "alice" not in str(foreign.value) and c not in str(foreign.value), name

    # Exactly the same error as for ids that do not exist.
    missing = {"get_conversation": lambda: store.get_conversation("bob", "no-such-id"),
               "update_message": lambda: store.update_message("bob", "no-such-id", text="x"),
               "image_bytes": lambda: store.image_bytes("bob", "0" * 64)}
    for name, attempt in missing.items():
        with pytest.raises(NotFound) as err:
            attempt()
        assert type(err.value) is NotFound and str(err.value) in ("Conversation not found.", "Message not found.",
                                                                  "Image not found."), name

    assert [s.id for s in store.list_conversations("bob")] == [bob_conv]
    assert store.get_conversation("bob", bob_conv).messages == []
    view = store.get_conversation("alice", c)  # nothing of alice's changed
    assert (view.title, view.settings, view.image_hash) == ("Private", {"seed": 1}, h)
    assert [m.text for m in view.messages] == ["secret question", "secret answer"]
    assert store.image_bytes("alice", h) == PNG
    assert count(store, Generation) == 1


def test_image_access_follows_references(store, data_dir):
    a = store.create_conversation("alice")
    h = store.save_image("alice", a, PNG, "image/png")
    assert h == hashlib.sha256(PNG).hexdigest()
    assert (data_dir / "images" / h[:2] / h[2:]).read_bytes() == PNG
    assert store.image_mime("alice", h) == "image/png"
    assert store.get_conversation("alice", a).image_hash == h

    with pytest.raises(NotFound):
        store.image_bytes("bob", h)
    b = store.create_conversation("bob")
    assert store.save_image("bob", b, PNG, "image/png") == h  # same content: stored once, now bob's too
    assert store.image_bytes("bob", h) == PNG
    assert len([p for p in (data_dir / "images").rglob("*") if p.is_file()]) == 1  # no temp files left over

    for bad in ["../../etc/passwd", "/etc/passwd", h.upper(), h[:-1], "", h + "/..", None]:
        with pytest.raises(NotFound):
            store.image_bytes("alice", bad)
    for data, mime in [(b"", "image/png"), (PNG, "text/html"), (PNG, "image/../x"), (PNG, "")]:
        with pytest.raises(ValueError):
            store.save_image("alice", a, data, mime)


def test_ids_are_not_guessable(store):
    conv_ids = [store.create_conversation("alice") for _ in range(50)]
    msg_ids = [store.add_message("alice", conv_ids[0], "user", str(i)) for i in range(50)]
    for ids in (conv_ids, msg_ids):
        assert len(set(ids)) == len(ids)
        assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", i) for i in ids)  # 16 random bytes, url-safe
        assert not any(i.isdigit() for i in ids)
        prefix = os.path.commonprefix(ids)
        assert len(prefix) <= 2  # sequential or time-based ids would share a prefix
        assert len(set("".join(ids))) > 40  # uses the whole alphabet


# ------------------------------------------------------------------------------------------------------- deleting

def test_delete_cascades_and_keeps_shared_images(store, data_dir):
    a = store.create_conversation("alice")
    b = store.create_conversation("alice")
    shared = store.save_image("alice", a, PNG, "image/png")
    store.add_message("alice", a, "user", "and this one?", image_hash=shared)
    add_turn(store, "alice", a, "q1", "a1")
    only_a = store.save_image("alice", a, JPEG, "image/jpeg")  # a's current image; shared stays on a message
    store.save_image("alice", b, PNG, "image/png")
    add_turn(store, "alice", b, "q2", "a2")
    assert (count(store, Message), count(store, Generation), count(store, Image)) == (5, 2, 2)
    assert store.get_conversation("alice", a).image_hash == only_a

    store.delete_conversation("alice", a)
    with pytest.raises(NotFound):
        store.get_conversation("alice", a)
    with pytest.raises(NotFound):
        store.delete_conversation("alice", a)
    assert (count(store, Message), count(store, Generation), count(store, Image)) == (2, 1, 1)
    assert not (data_dir / "images" / only_a[:2] / only_a[2:]).exists()  # nobody references it any more
    assert store.image_bytes("alice", shared) == PNG  # still used by b
    assert [m.text for m in store.get_conversation("alice", b).messages] == ["q2", "a2"]
    assert [h.name for h in (data_dir / "images").rglob("*") if h.is_file()] == [shared[2:]]

    store.delete_conversation("alice", b)
    assert (count(store, Message), count(store, Generation), count(store, Image)) == (0, 0, 0)
    assert not (data_dir / "images" / shared[:2] / shared[2:]).exists()
    assert store.list_conversations("alice") == []


def test_replaced_image_is_deleted_when_unused(store, data_dir):
    c = store.create_conversation("alice")
    first = store.save_image("alice", c, PNG, "image/png")  # uploaded, never sent
    second = store.save_image("alice", c, JPEG, "image/jpeg")
    assert store.get_conversation("alice", c).image_hash == second
    assert not (data_dir / "images" / first[:2] / first[2:]).exists() and count(store, Image) == 1
    store.add_message("alice", c, "user", "look", image_hash=second)
    store.save_image("alice", c, PNG, "image/png")
    assert store.image_bytes("alice", second) == JPEG  # still on a message
    assert store.save_image("alice", c, PNG, "image/png") == first  # same image again: nothing changes
    assert store.image_bytes("alice", first) == PNG and count(store, Image) == 2


def test_delete_last_turn(store):
    c = store.create_conversation("alice")
    store.add_message("alice", c, "system", "Be brief.")
    add_turn(store, "alice", c, "q1", "a1")
    store.add_message("alice", c, "user", "q2")
    failed = store.add_message("alice", c, "assistant", "", status="error", error="out of memory")
    store.record_generation("alice", failed, model="m", precision="fp32", device="cpu", settings={},
                            prompt_tokens=3, new_tokens=0, latency_s=0.1, first_token_s=None)

    assert store.delete_last_turn("alice", c) == 2
    assert [m.text for m in store.get_conversation("alice", c).messages] == ["Be brief.", "q1", "a1"]
    assert count(store, Generation) == 1
    store.add_message("alice", c, "user", "q2 again")  # sequence continues cleanly after an undo
    assert [m.text for m in store.get_conversation("alice", c).messages][-1] == "q2 again"
    assert store.delete_last_turn("alice", c) == 1
    assert store.delete_last_turn("alice", c) == 2
    assert [m.text for m in store.get_conversation("alice", c).messages] == ["Be brief."]
    assert store.delete_last_turn("alice", c) == 0  # no user message left: nothing to undo
    assert count(store, Generation) == 0


# ------------------------------------------------------------------------------------------------------- export

def test_export_json_and_markdown(store):
    c = store.create_conversation("alice", "House", settings={"max_new_tokens": 32})
    h = store.save_image("alice", c, PNG, "image/png")
    store.add_message("alice", c, "user", "What is it?", image_hash=h)
    a = store.add_message("alice", c, "assistant", "A **red** house.")
    store.record_generation("alice", a, model="Salesforce/blip2-opt-2.7b", precision="fp16", device="cuda:0",
                            settings={"max_new_tokens": 32}, prompt_tokens=45, new_tokens=6, latency_s=0.8,
                            first_token_s=0.12)
    store.add_message("alice", c, "user", "Roof colour?")
    store.add_message("alice", c, "assistant", "", status="error", error="CUDA out of memory")

    data = store.export_json("alice", c)
    assert json.loads(json.dumps(data)) == data  # plain JSON
    assert data["format"] == "blip2-conversation" and data["version"] == 1
    assert data["conversation"]["title"] == "House"
    assert data["conversation"]["settings"] == {"max_new_tokens": 32}
    assert data["conversation"]["image_hash"] == h
    assert [(m["seq"], m["role"], m["text"], m["status"]) for m in data["messages"]] == [
        (1, "user", "What is it?", "done"), (2, "assistant", "A **red** house.", "done"),
        (3, "user", "Roof colour?", "done"), (4, "assistant", "", "error")]
    assert data["messages"][0]["image_hash"] == h
    assert data["messages"][3]["error"] == "CUDA out of memory"
    (gen,) = data["messages"][1]["generations"]
    assert {k: gen[k] for k in ("model", "precision", "device", "prompt_tokens", "new_tokens", "latency_s",
                                "first_token_s", "settings")} == {
        "model": "Salesforce/blip2-opt-2.7b", "precision": "fp16", "device": "cuda:0", "prompt_tokens": 45,
        "new_tokens": 6, "latency_s": 0.8, "first_token_s": 0.12, "settings": {"max_new_tokens": 32}}
    assert data["images"] == [{"hash": h, "mime": "image/png", "size": len(PNG)}]
    assert datetime.fromisoformat(data["messages"][0]["created_at"]).tzinfo is not None

    md = store.export_markdown("alice", c)
    assert md.startswith("# House\n")
    assert "`max_new_tokens=32`" in md
    assert re.search(r"### User · \d{4}-\d\d-\d\d \d\d:\d\d UTC\n\n\*\[image sha256:" + h + r"\]\*\n\nWhat is it\?", md)
    assert "### Assistant" in md and "A **red** house." in md
    assert "Salesforce/blip2-opt-2.7b · fp16 · cuda:0 · 6 tokens in 0.80 s, first token 0.12 s" in md
    assert "> **Error:** CUDA out of memory" in md
    assert md.index("What is it?") < md.index("A **red** house.") < md.index("Roof colour?")


# ---------------------------------------------------------------------------------------------------- robustness

def test_locked_sqlite_raises_store_unavailable_then_recovers(data_dir):
    store = ConversationStore(None, data_dir, busy_timeout_ms=200, retries=1)
    c = store.create_conversation("alice", "Before the lock")
    store.add_message("alice", c, "user", "kept")

    locker = sqlite3.connect(data_dir / "blip2.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"History could not be saved: database is locked"):
            store.add_message("alice", c, "user", "lost while locked")
        assert time.monotonic() - start < 5  # bounded: (retries + 1) x busy timeout + backoff
        with pytest.raises(StoreUnavailable):
            store.create_conversation("alice")
        assert [m.text for m in store.get_conversation("alice", c).messages] == ["kept"]  # WAL: reads go on
    finally:
        locker.execute("ROLLBACK")
        locker.close()

    store.add_message("alice", c, "assistant", "after")
    assert [m.text for m in store.get_conversation("alice", c).messages] == ["kept", "after"]
    assert [s.title for s in store.list_conversations("alice")] == ["Before the lock"]
    store.close()
    with ConversationStore(None, data_dir) as reopened:  # committed rows are on disk
        assert [m.text for m in reopened.get_conversation("alice", c).messages] == ["kept", "after"]


def test_database_locked_at_start_then_released(data_dir):
    data_dir.mkdir(parents=True)
    locker = sqlite3.connect(data_dir / "blip2.sqlite3", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the schema cannot be created yet
    try:
        store = ConversationStore(None, data_dir, busy_timeout_ms=100, retries=0)  # does not raise: chat goes on
        with pytest.raises(StoreUnavailable, match="History could not be saved"):
            store.create_conversation("alice")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    c = store.create_conversation("alice")  # the schema is created on the first call that can reach the database
    assert store.get_conversation("alice", c).messages == []
    store.close()


@pytest.mark.parametrize("db_url", [p for p in BACKENDS if p != "sqlite"], indirect=True)
def test_postgres_connections_killed_are_replaced(db_url, data_dir):
    store = ConversationStore(db_url, data_dir)
    c = store.create_conversation("alice")
    store.add_message("alice", c, "user", "before")
    schema = make_url(db_url).query["application_name"]
    admin = create_engine(PG_URL)
    with admin.begin() as conn:  # what a server restart does to the pool's idle connections
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE application_name = :name"), {"name": schema}).scalar_one()
    admin.dispose()
    assert killed >= 1
    store.add_message("alice", c, "assistant", "after")  # pool_pre_ping / retry reconnects transparently
    assert [m.text for m in store.get_conversation("alice", c).messages] == ["before", "after"]
    store.close()


def test_sqlite_pragmas(data_dir):
    with ConversationStore(None, data_dir, busy_timeout_ms=1234) as store:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 1234
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_unreachable_postgres_raises_store_unavailable(tmp_path):
    start = time.monotonic()
    store = ConversationStore("postgresql+psycopg://blip2:s3cret@127.0.0.1:1/nowhere", tmp_path,
                              connect_timeout_s=2, retries=1)  # the constructor does not fail: the chat goes on
    with pytest.raises(StoreUnavailable) as err:
        store.create_conversation("alice")
    message = str(err.value)
    assert message.startswith("History could not be saved: ")
    assert "127.0.0.1" in message and "refused" in message.lower()
    assert "s3cret" not in message
    with pytest.raises(StoreUnavailable, match="History could not be loaded"):
        store.list_conversations("alice")
    assert time.monotonic() - start < 20
    store.close()


def test_concurrent_writers_lose_nothing(store):
    shared = store.create_conversation("alice")
    own = {i: store.create_conversation(f"user{i}") for i in range(4)}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(15):
                store.add_message("alice", shared, "user", f"w{i}-{j}")
                store.add_message(f"user{i}", own[i], "assistant", f"own{j}")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    texts = [m.text for m in store.get_conversation("alice", shared).messages]
    assert sorted(texts) == sorted(f"w{i}-{j}" for i in range(4) for j in range(15))
    for i in range(4):  # each writer's own messages keep their order
        assert [t for t in texts if t.startswith(f"w{i}-")] == [f"w{i}-{j}" for j in range(15)]
        assert [m.text for m in store.get_conversation(f"user{i}", own[i]).messages] == [f"own{j}" for j in range(15)]
    with store.engine.connect() as conn:
        seqs = conn.execute(select(Message.seq).where(Message.conversation_id == shared).order_by(Message.seq))
        assert list(seqs.scalars()) == list(range(1, 61))


def test_import_does_not_pull_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, app.store; print('\\n'.join(sys.modules))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert "app.store" in out and "sqlalchemy" in out
    assert "torch" not in out and "blip2" not in out


# ---------------------------------------------------------------------------------------------------- migrations

def test_migrations_create_exactly_the_models(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert ctx.get_current_revision() == head
        assert compare_metadata(ctx, Base.metadata) == []
        assert {"conversations", "messages", "images", "generations", "alembic_version"} <= set(
            conn.dialect.get_table_names(conn))
        indexes = {ix["name"] for ix in conn.dialect.get_indexes(conn, "conversations")}
        assert "ix_conversations_owner_updated_at" in indexes


def test_reopening_keeps_rows_and_newer_schema_is_refused(db_url, data_dir):
    with ConversationStore(db_url, data_dir) as store:
        c = store.create_conversation("alice", "Kept")
        h = store.save_image("alice", c, PNG, "image/png")
        add_turn(store, "alice", c, "q", "a")
    with ConversationStore(db_url, data_dir) as store:  # runs `upgrade head` again: a no-op
        view = store.get_conversation("alice", c)
        assert (view.title, view.image_hash, [m.text for m in view.messages]) == ("Kept", h, ["q", "a"])
        assert store.image_bytes("alice", h) == PNG
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = 'from_the_future'"))
    with pytest.raises(StoreError, match="schema this version of the app does not know") as err:
        ConversationStore(db_url, data_dir)
    assert not isinstance(err.value, StoreUnavailable)


def test_upgrade_from_0001_keeps_rows(db_url, data_dir):
    """A database written by the first release (revision 0001) is upgraded when the store opens it."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from sqlalchemy import insert

    from app.tables import Conversation

    if db_url is None:
        data_dir.mkdir(parents=True)
        engine = create_engine(f"sqlite:///{data_dir / 'blip2.sqlite3'}")
    else:
        engine = create_engine(db_url)
    upgrade(engine, "0001")
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:  # only columns that exist at 0001
        conn.execute(insert(Conversation.__table__).values(id="c1", owner="alice", title="Old", settings={},
                                                           image_hash=None, created_at=now, updated_at=now))
        conn.execute(insert(Message.__table__).values(id="m1", conversation_id="c1", seq=1, role="user", text="q",
                                                      status="done", error=None, image_hash=None, created_at=now))
        conn.execute(insert(Message.__table__).values(id="m2", conversation_id="c1", seq=2, role="assistant",
                                                      text="a", status="done", error=None, image_hash=None,
                                                      created_at=now))
    engine.dispose()

    with ConversationStore(db_url, data_dir) as store:
        view = store.get_conversation("alice", "c1")
        assert [(m.text, m.token_ids) for m in view.messages] == [("q", None), ("a", None)]
        store.update_message("alice", "m2", token_ids=[1, 2])
        assert store.get_conversation("alice", "c1").messages[1].token_ids == [1, 2]
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert ctx.get_current_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
            assert compare_metadata(ctx, Base.metadata) == []


def test_upgrade_from_0002_keeps_rows_and_allows_interrupted(db_url, data_dir):
    """0003 widens the CHECK on messages.status; on SQLite that copies the table, which must not lose a message or
    (through ON DELETE CASCADE, with foreign keys on as the store has them) a generation record."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import event, insert
    from sqlalchemy.exc import IntegrityError

    from app.tables import Conversation

    if db_url is None:
        data_dir.mkdir(parents=True)
        engine = create_engine(f"sqlite:///{data_dir / 'blip2.sqlite3'}")

        @event.listens_for(engine, "connect")
        def _foreign_keys(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA foreign_keys = ON")
    else:
        engine = create_engine(db_url)
    upgrade(engine, "0002")
    now = datetime.now(timezone.utc)
    with engine.begin() as conn:
        conn.execute(insert(Conversation.__table__).values(id="c1", owner="alice", title="Old", settings={},
                                                           image_hash=None, created_at=now, updated_at=now))
        for seq, (mid, role, text_, status) in enumerate([("m1", "user", "q", "done"),
                                                          ("m2", "assistant", "a", "done"),
                                                          ("m3", "user", "q2", "done"),
                                                          ("m4", "assistant", "half an ans", "streaming")], 1):
            conn.execute(insert(Message.__table__).values(id=mid, conversation_id="c1", seq=seq, role=role,
                                                          text=text_, status=status, error=None, image_hash=None,
                                                          created_at=now, token_ids=[1, 2] if mid == "m2" else None))
        conn.execute(insert(Generation.__table__).values(
            id="g1", message_id="m2", model="default", precision="bf16", device="cpu", settings={},
            prompt_tokens=3, new_tokens=1, latency_s=0.5, first_token_s=None, created_at=now))
    engine.dispose()

    with ConversationStore(db_url, data_dir) as store:
        view = store.get_conversation("alice", "c1")
        assert [(m.text, m.status) for m in view.messages] == [
            ("q", "done"), ("a", "done"), ("q2", "done"), ("half an ans", "interrupted")]
        assert view.messages[1].token_ids == [1, 2]
        assert count(store, Generation) == 1
        assert "*(interrupted" in store.export_markdown("alice", "c1")
        with store.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
        with pytest.raises(IntegrityError):  # the CHECK is still there
            with store.engine.begin() as conn:
                conn.execute(text("UPDATE messages SET status = 'bogus' WHERE id = 'm1'"))
        store.delete_conversation("alice", "c1")  # the foreign keys still cascade
        assert count(store, Message) == count(store, Generation) == 0


KILLED_WHILE_STREAMING = """
import os, signal, sys
from app.store import ConversationStore

store = ConversationStore(sys.argv[1] or None, sys.argv[2])
c = store.create_conversation("alice")
store.add_message("alice", c, "user", "q")
m = store.add_message("alice", c, "assistant", "", status="streaming")
store.update_message("alice", m, text="the first half")  # as the chat saves a streaming reply
print(c, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_replies_cut_off_by_a_crash_are_marked_interrupted(db_url, data_dir):
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_STREAMING, db_url or "", str(data_dir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    cid = proc.stdout.strip()
    with ConversationStore(db_url, data_dir) as store:
        msgs = store.get_conversation("alice", cid).messages
        assert [(m.text, m.status) for m in msgs] == [("q", "done"), ("the first half", "interrupted")]
        live = store.add_message("alice", cid, "assistant", "", status="streaming")  # this process's own: kept
    with ConversationStore(db_url, data_dir) as store:
        assert [m.status for m in store.get_conversation("alice", cid).messages] == ["done", "interrupted",
                                                                                     "interrupted"]
        assert store.get_conversation("alice", cid).messages[-1].id == live


def test_a_reply_with_nul_is_saved_with_its_question(store):
    """A model can write NUL (byte-level tokenizers decode any byte): PostgreSQL used to refuse the reply's row."""
    from app.chat import ChatApp, new_session
    from app.fakes import FakeBackend, FakeStream

    class NulBackend(FakeBackend):
        def chat(self, image, history, message, settings):
            super().chat(image, history, message, settings)
            return FakeStream(["a\x00", "b"], 0.0)

    app = ChatApp(NulBackend(), store)
    s = new_session()
    app.ensure_owner(s, "alice")
    app.set_image(s, PNG + b"-padding-to-16-bytes", "x.png")
    for _ in app.send(s, "q"):
        pass
    msgs = store.get_conversation("user:alice", s["conversation_id"]).messages
    assert [(m.role, m.text, m.status) for m in msgs[1:]] == [("user", "q", "done"), ("assistant", "a\ufffdb", "done")]
    assert not s["save_failed"]
