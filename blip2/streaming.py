"""Streaming generation: a :class:`TextStream` runs one generation on blip2's compute thread and hands its text
over chunk by chunk, with cancellation and a time-to-first-token timer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from . import compute

logger = logging.getLogger(__name__)


class TextStream:
    """Iterates text chunks as the model produces them. ``cancel()`` (or closing the iterator, or leaving the
    ``with`` block) stops generation at the next token. After iteration, ``reply`` holds the finished
    :class:`blip2.Reply` (what ``start()`` returned).

    ``follow_up(reply)``, if given, runs in the same worker thread once the reply is done (the iterator has already
    ended by then): work for the *next* turn that nobody waits for. ``wait()`` waits for it too."""

    def __init__(self, start, streamer: TextIteratorStreamer | None, cancel: threading.Event, follow_up=None):
        self._cancel = cancel
        self._streamer = streamer
        self._result: dict = {}
        self._done = threading.Event()
        # On blip2's compute thread (see blip2.compute), which the interpreter waits for at exit rather than
        # killing it inside a torch kernel or the follow-up (that aborts the process: "terminate called without an
        # active exception"). Cancelled or consumed streams end within a token; an abandoned one finishes its reply.
        self._job = compute.submit(self._work, start, follow_up)

    def _work(self, start, follow_up):
        try:
            self._result["reply"] = start()
        except BaseException as exc:  # re-raised in the consumer's thread
            self._result["error"] = exc
            if self._streamer is not None:
                self._streamer.end()
        finally:
            self._done.set()
        if follow_up is not None and "reply" in self._result:
            _run_follow_up(follow_up, self._result["reply"])  # after the reply is handed over; wait() waits for it

    def __iter__(self) -> Iterator[str]:
        try:
            if self._streamer is not None:
                for chunk in self._streamer:
                    if chunk:
                        yield chunk
            self._done.wait()
            if "error" in self._result:
                raise self._result["error"]
            if self._streamer is None:  # beam search cannot stream: the whole text comes at the end
                yield self._result["reply"].text
        finally:
            self.cancel()
            self._done.wait()

    def cancel(self) -> None:
        self._cancel.set()

    def wait(self):
        """Wait until the worker is finished, follow-up work included; returns the reply."""
        self._job.result()
        return self.reply

    @property
    def reply(self):
        return self._result.get("reply")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()
        self._done.wait()


def _run_follow_up(follow_up, reply) -> None:
    try:
        follow_up(reply)
    except Exception:  # an optimisation for the next turn: never worth failing the finished one
        logger.warning("Preparing the next chat turn failed; it will be computed in full.", exc_info=True)


class CancelCriteria(StoppingCriteria):
    """Stops ``generate`` at the next token once ``event`` is set (from any thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class FirstTokenTimer:
    """Streamer wrapper that records when the first generated token arrives (time to first token)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.first_at: float | None = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_at is None:  # call 1 is the prompt / decoder start
            self.first_at = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.first_at is None and self.calls:
            self.first_at = time.perf_counter()
        if self.inner is not None:
            self.inner.end()
