"""One thread for all of blip2's torch work.

Why not run it wherever it is called: torch's CPU backend is OpenMP, and every thread that runs torch ops gets its
own team of OpenMP worker threads, kept as long as that thread lives. Once a process holds more OpenMP threads than
CPUs, libgomp stops spinning its idle workers between parallel regions ("throttled" waiting), so every one of the
hundreds of regions in a forward pass waits for a worker to be woken. Streaming needs generation in a background
thread while the caller's thread has already run torch (loading, encoding the image): two teams. Measured on 2
cores with the default model (SmolLM2-135M, an 11-token forward on a cached prefix): 118 ms when one thread runs
all torch work, 150-200 ms when two threads do (``benchmarks/bench_inference.py --parts 2`` shows the effect on
a chat turn's time to first token).

So :func:`blip2.load` and every model method that runs torch hand their work to one long-lived thread (calls made
on it run inline). Programs that run torch in other threads too (training, tests comparing against plain
transformers) stay correct, only without this speed-up.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import wraps
from typing import Callable, TypeVar

T = TypeVar("T")

_state = threading.local()
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _mark_compute_thread() -> None:
    _state.is_compute = True


def on_compute_thread() -> bool:
    return getattr(_state, "is_compute", False)


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            # concurrent.futures joins its workers at interpreter exit (after the queued work is done), so a
            # next-turn prefill still running when a program ends finishes instead of being killed inside a kernel.
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip2-compute",
                                           initializer=_mark_compute_thread)
        return _executor


def _forget_executor_in_child() -> None:
    # A forked child (a DataLoader worker) has no copy of the thread: it starts its own when it needs one.
    global _executor, _executor_lock
    _executor, _executor_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_executor_in_child)


def submit(fn: Callable[..., T], *args, **kwargs) -> Future:
    """Queue ``fn`` on the compute thread (run it now, already resolved, when called from that thread)."""
    if on_compute_thread():
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
            future.set_exception(exc)
        return future
    return _get_executor().submit(fn, *args, **kwargs)


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run ``fn`` on the compute thread and return its result (its exception is raised here)."""
    if on_compute_thread():
        return fn(*args, **kwargs)
    return _get_executor().submit(fn, *args, **kwargs).result()


def on_compute(method: Callable[..., T]) -> Callable[..., T]:
    """Decorator: the function always runs on the compute thread."""

    @wraps(method)
    def wrapper(*args, **kwargs):
        return run(method, *args, **kwargs)

    return wrapper
