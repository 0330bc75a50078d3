"""Load test: N concurrent gradio_client sessions against a launched app on loopback.

    python benchmarks/load_app.py                       # fake backend (streams canned words), 8 sessions
    python benchmarks/load_app.py --sessions 16 --turns 3 --max-concurrency 2
    python benchmarks/load_app.py --model path/to/checkpoint --precision fp32 --device cpu   # a real model

Every session chats about its own picture with its own secret word, then lists its history. Reported: latency
of each chat turn (p50/p95, seconds), errors (goal 0; a turn missing from the saved conversation counts) and
cross-session leaks (goal 0): a reply that names
another session's picture or secret, or a history that holds another session's conversation. The server
listens on 127.0.0.1 only; the queue is bounded (--queue-size, default: room for every session).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_backend(args):
    if args.model is None:
        from app.fakes import FakeBackend

        return FakeBackend(delay=args.delay, words=args.words)
    import importlib.util

    import blip2

    spec = importlib.util.spec_from_file_location("blip2_app_main", ROOT / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Blip2Backend(blip2.load(args.model, precision=args.precision, device=args.device))


def picture(i: int, folder: Path) -> Path:
    from PIL import Image

    path = folder / f"session-{i}.png"
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256)).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return path


def run_session(i: int, url: str, path: Path, turns: int, fake: bool, results: dict, lock: threading.Lock):
    import hashlib

    from gradio_client import Client, handle_file

    secret = f"secret{i:04d}"
    tag = "img-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    latencies, errors, leaks = [], [], []
    try:
        client = Client(url, verbose=False)
        for turn in range(turns):
            t0 = time.perf_counter()
            job = client.submit(handle_file(str(path)) if turn == 0 else None, f"{secret} question {turn}",
                                api_name="/chat")
            updates = list(job)
            latencies.append(time.perf_counter() - t0)
            reply = updates[-1] if updates else ""
            if fake and (tag not in reply or secret not in reply):
                leaks.append(f"turn {turn}: reply not about this session's picture/secret: {reply[:80]!r}")
            with lock:
                others = [s for s in results.get("secrets", []) if s != secret]
            leaks += [f"reply names {s}" for s in others if s in reply]
        history = client.predict(api_name="/history")
        if len(history) != 1:
            leaks.append(f"history has {len(history)} conversations, expected 1")
        for conv in history:
            data = client.predict(conv["id"], api_name="/conversation")
            text = json.dumps(data)
            foreign = [w for w in text.split('"') if w.startswith("secret") and not w.startswith(secret)]
            if foreign:
                leaks.append(f"history holds another session's text: {foreign[:2]}")
            # Every turn persisted: each question and its finished answer, in order.
            saved = [(m["role"], m["status"]) for m in data.get("messages", []) if m["role"] != "system"]
            if saved != [("user", "done"), ("assistant", "done")] * turns:
                errors.append(f"conversation saved as {saved}, expected {turns} question/answer pairs")
    except Exception as exc:  # noqa: BLE001 - counted, reported
        errors.append(f"{type(exc).__name__}: {exc}")
    with lock:
        results["latencies"] += latencies
        results["errors"] += errors
        results["leaks"] += leaks


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-concurrency", type=int, default=2)
    p.add_argument("--queue-size", type=int, default=None, help="default: sessions (room for everyone)")
    p.add_argument("--delay", type=float, default=0.01, help="fake backend: seconds per streamed word")
    p.add_argument("--words", type=int, default=12, help="fake backend: words per reply")
    p.add_argument("--model", default=None, help="a blip2 source instead of the fake backend")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.sessions < 1 or args.sessions > 256:
        p.error("--sessions must be 1..256 (this is a loopback test, not a stress tool)")

    from app.store import ConversationStore
    from app.ui import build_ui

    backend = make_backend(args)
    with tempfile.TemporaryDirectory(prefix="blip2-load-") as tmp:
        tmp = Path(tmp)
        store = ConversationStore(data_dir=tmp / "data")
        demo = build_ui(backend, store, max_concurrency=args.max_concurrency,
                        queue_size=args.queue_size or args.sessions)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(),
                                quiet=True)
        results = {"latencies": [], "errors": [], "leaks": [],
                   "secrets": [f"secret{i:04d}" for i in range(args.sessions)]}
        lock = threading.Lock()
        paths = [picture(i, tmp) for i in range(args.sessions)]
        t0 = time.perf_counter()
        threads = [threading.Thread(target=run_session, args=(i, url, paths[i], args.turns, args.model is None,
                                                              results, lock)) for i in range(args.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        demo.close()
        store.close()
    lat = results["latencies"]
    report = dict(sessions=args.sessions, turns=args.turns, max_concurrency=args.max_concurrency,
                  backend=args.model or "fake", requests=len(lat), wall_s=round(wall, 2),
                  p50_s=round(percentile(lat, 0.5), 3), p95_s=round(percentile(lat, 0.95), 3),
                  mean_s=round(statistics.mean(lat), 3) if lat else None,
                  errors=len(results["errors"]), leaks=len(results["leaks"]),
                  error_samples=results["errors"][:3], leak_samples=results["leaks"][:3])
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{report['sessions']} sessions x {report['turns']} turns on {report['backend']} "
              f"(max concurrency {report['max_concurrency']}): {report['requests']} chat turns in {report['wall_s']} s")
        print(f"latency per turn: p50 {report['p50_s']} s, p95 {report['p95_s']} s")
        print(f"errors: {report['errors']} (goal 0)   cross-session leaks: {report['leaks']} (goal 0)")
        for line in report["error_samples"] + report["leak_samples"]:
            print("  ", line)
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(1 if report["errors"] or report["leaks"] else 0)
