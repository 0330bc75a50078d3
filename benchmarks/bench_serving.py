"""N concurrent chat sessions against (a) the in-process backend and (b) vLLM, on the same tiny checkpoint.

    python benchmarks/bench_serving.py                  # 8 sessions x 3 turns, greedy, 32 new tokens a turn
    python benchmarks/bench_serving.py --sessions 16 --turns 2 --max-new-tokens 64 --json

Both sides get the same work through the app's Backend interface (app.py's Blip2Backend; app/remote.py's
RemoteBackend): each session asks about its own picture, turn after turn, with its history. The in-process backend
answers one request at a time (blip2 holds a lock per model, as the app with --max-concurrency 1 does); vLLM batches
the sessions' requests. Reported per side: turns per second, tokens per second, and p50/p95 latency of a turn
(seconds), then the ratios. Needs ``.venv-vllm`` (``bash .ci/vllm.sh``); the checkpoint is the one tests/serving/
builds (tiny random BLIP-2 OPT, head_dim 32), so the figures measure serving overhead, not a real model.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "serving")]


def pictures(n: int) -> list[bytes]:
    from conftest import image

    out = []
    for i in range(n):
        buf = io.BytesIO()
        image(i).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def run(backend, images: list[bytes], turns: int, settings: dict) -> dict:
    """Every session in its own thread, all started together; each turn waits for the previous one (a person)."""
    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(images))

    def session(img: bytes, i: int):
        history = []
        start.wait()
        for t in range(turns):
            question = f"session {i} turn {t}: what is in the picture?"
            t0 = time.perf_counter()
            try:
                stream = backend.chat(img, history, question, dict(settings))
                text = "".join(stream)
            except Exception as exc:  # noqa: BLE001 - counted and shown, the run goes on
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += stream.reply.new_tokens
            history.append((question, text.strip()))

    threads = [threading.Thread(target=session, args=(img, i)) for i, img in enumerate(images)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else latencies * 19
    return dict(turns=len(latencies), errors=len(errors), first_error=errors[0] if errors else None,
                wall_s=round(wall, 3), turns_per_s=round(len(latencies) / wall, 3),
                tokens_per_s=round(tokens[0] / wall, 1), p50_s=round(statistics.median(latencies), 3),
                p95_s=round(q[18], 3))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)

    import blip2
    from app.decoding import DEFAULT_DECODING
    from app.remote import RemoteBackend
    from vllm_server import VLLM_PYTHON, VllmServer, build_servable

    if not VLLM_PYTHON.exists():
        raise SystemExit("no .venv-vllm: run `bash .ci/vllm.sh` first")
    # Greedy, and min = max new tokens: every turn does the same work on both sides, whatever the random model says.
    settings = dict(DEFAULT_DECODING, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens,
                    no_repeat_ngram_size=0)
    images = pictures(args.sessions)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_servable(Path(tmp) / "ckpt")
        spec = importlib.util.spec_from_file_location("blip2_app_main", ROOT / "app.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        local = module.Blip2Backend(blip2.load(str(folder), precision="fp32", device="cpu"))
        run(local, images[:1], 1, settings)  # warm-up: first-call costs are not serving costs
        in_process = run(local, images, args.turns, settings)
        del local
        server = VllmServer(folder, Path(tmp))
        try:
            server.wait_ready()
            remote = RemoteBackend(server.url, timeout=120)
            run(remote, images[:1], 1, settings)
            served = run(remote, images, args.turns, settings)
        finally:
            server.stop()
    report = dict(sessions=args.sessions, turns=args.turns, max_new_tokens=args.max_new_tokens,
                  in_process=in_process, vllm=served,
                  throughput_ratio=round(served["turns_per_s"] / in_process["turns_per_s"], 2),
                  p50_ratio=round(served["p50_s"] / in_process["p50_s"], 2),
                  p95_ratio=round(served["p95_s"] / in_process["p95_s"], 2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.sessions} sessions x {args.turns} turns, {args.max_new_tokens} new tokens a turn (greedy)")
        for name in ("in_process", "vllm"):
            r = report[name]
            print(f"  {name:<10} {r['turns_per_s']:7.2f} turns/s  {r['tokens_per_s']:8.1f} tok/s  "
                  f"p50 {r['p50_s']:.3f} s  p95 {r['p95_s']:.3f} s  errors {r['errors']}")
        print(f"  vLLM / in-process: throughput x{report['throughput_ratio']}, p50 x{report['p50_ratio']}, "
              f"p95 x{report['p95_ratio']}")
    return report


if __name__ == "__main__":
    main()
