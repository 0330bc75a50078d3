"""The app's view of a model: a small interface with plain-Python types, so app/ never imports torch.

``app.py`` wires a real ``blip2`` model to it (``Blip2Backend``); tests use a fake. Images cross this boundary as
encoded bytes (what the browser uploaded); the backend validates them and raises :class:`BadImage` with a human
message when they are unusable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class BadImage(ValueError):
    """The uploaded file is not a usable image; the message says why, for the chat."""


class BackendUnavailable(RuntimeError):
    """The model cannot answer right now (a model server that is down, unreachable, too slow or failing). The
    message is a plain sentence shown in the chat as is: unlike an internal error, it tells the user what to do."""


@dataclass(frozen=True)
class ModelCard:
    """What is serving, shown in the UI at all times."""

    source: str
    precision: str
    device: str
    llm_family: str
    untrained: bool = False
    notes: tuple[str, ...] = ()
    context_length: int | None = None

    @property
    def summary(self) -> str:
        return f"{self.source} · {self.precision} · {self.device}"


@dataclass
class ReplyStats:
    """A finished reply, for the generation record."""

    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float | None = None
    notice: str | None = None  # e.g. "The conversation was too long for the model: ..."
    cancelled: bool = False
    extra: dict = field(default_factory=dict)
    # The ids the model generated for ``text``; handed back with this reply in later turns' history (see
    # Backend.chat). None when the backend does not report them.
    token_ids: list[int] | None = None


class ReplyStream(Protocol):
    """Text chunks as they are generated. ``cancel()`` stops at the next token; ``reply`` is set once done."""

    reply: ReplyStats | None

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...


# One earlier turn: (user, assistant) or (user, assistant, token_ids). token_ids are what the model generated for
# that assistant text (ReplyStats.token_ids), or None; they come from this conversation only, never from another's.
HistoryTurn = tuple[str, str] | tuple[str, str, list[int] | None]


class Backend(Protocol):
    card: ModelCard

    def check_image(self, image: bytes) -> None:
        """Raise BadImage if ``image`` cannot be used (format, size, corrupt, ...)."""

    def chat(self, image: bytes, history: Sequence[HistoryTurn], message: str, settings: dict) -> ReplyStream:
        """Stream the reply to ``message`` about ``image`` after ``history`` turns. Where a turn carries token ids,
        the backend may put them in the prompt instead of re-tokenizing the reply's text.
        ``settings`` are decoding settings (max_new_tokens, num_beams, do_sample, temperature, top_p, ...)."""

    def caption(self, image: bytes, settings: dict) -> ReplyStream:
        """Stream a caption of ``image``."""
