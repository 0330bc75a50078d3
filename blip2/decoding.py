"""Decoding settings, validated once, turned into `transformers` generate arguments."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields, replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList

# Upper bounds of the settings whose cost grows with their value. The app's sliders stay well inside them.
MAX_BEAMS = 16
# Above any context we serve: a decoder-only LLM's own context is the tighter limit (a PromptTooLongError naming
# max_new_tokens); this one bounds encoder-decoders, whose relative positions have no fixed context.
MAX_NEW_TOKENS = 32768
MAX_SEED = 2**64 - 1  # torch.manual_seed takes any unsigned 64-bit value


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens. Greedy by default; ``num_beams > 1`` is beam search; ``do_sample`` is nucleus sampling.

    Every setting is checked on construction: a wrong type, NaN/infinity or a value out of range (``num_beams`` up
    to ``MAX_BEAMS``, ``max_new_tokens`` up to ``MAX_NEW_TOKENS``, ``seed`` in 0..``MAX_SEED``) is a ValueError
    naming the setting."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 1
    # > 0 favours longer beams, < 0 shorter ones (the paper's zero-shot VQA uses -1 with 5 beams).
    length_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0  # 0 = off; nucleus sampling uses top_p alone
    # transformers' penalty also counts the prompt tokens; 1.0 = off.
    repetition_penalty: float = 1.0
    # Bans any n-gram that already occurs *in the reply* (not in the prompt, so a chat can repeat the
    # previous answer's words). 3 stops the "a cat a cat a cat" loops small LLMs fall into under greedy decoding.
    no_repeat_ngram_size: int = 3
    seed: int | None = None

    def __post_init__(self):
        # Settings also arrive from JSON, web forms and scripts: a wrong type or a NaN must be one clear error naming
        # the setting here, not a TypeError deep inside generate() or, worse, a silently absurd run.
        self._integer("max_new_tokens", 1, MAX_NEW_TOKENS)
        self._integer("min_new_tokens", 0, self.max_new_tokens, f"max_new_tokens ({self.max_new_tokens})")
        # Beam search's memory and time grow with the beam count (1000 beams: minutes and gigabytes for one reply).
        self._integer("num_beams", 1, MAX_BEAMS)
        self._integer("top_k", 0, None)
        self._integer("no_repeat_ngram_size", 0, None)
        if self.seed is not None:
            self._integer("seed", 0, MAX_SEED)
        _check(isinstance(self.do_sample, bool), f"do_sample must be True or False, not {self.do_sample!r}")
        self._number("length_penalty")  # any finite value: its sign picks longer or shorter beams
        self._number("temperature")
        _check(self.temperature > 0, "temperature must be > 0")
        self._number("top_p")
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        self._number("repetition_penalty")
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0")

    def _integer(self, name: str, low: int, high: int | None, high_name: str | None = None) -> None:
        value = getattr(self, name)
        # bool is an int to Python, but True beams or a seed of False is a mistake, not a setting.
        _check(isinstance(value, numbers.Integral) and not isinstance(value, bool),
               f"{name} must be a whole number, not {value!r} ({type(value).__name__})")
        value = int(value)  # numpy integers become plain ints, for generate() and JSON
        bound = "" if high is None else f" and at most {high_name or f'{high:,}'}"
        _check(value >= low and (high is None or value <= high), f"{name} must be at least {low}{bound}; got {value:,}")
        object.__setattr__(self, name, value)

    def _number(self, name: str) -> None:
        value = getattr(self, name)
        _check(isinstance(value, numbers.Real) and not isinstance(value, bool),
               f"{name} must be a number, not {value!r} ({type(value).__name__})")
        _check(math.isfinite(value), f"{name} must be a finite number; got {value}")
        object.__setattr__(self, name, float(value))

    @classmethod
    def from_kwargs(cls, base: Decoding | None = None, **kwargs) -> Decoding:
        """Settings from keyword arguments; unknown names are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"Unknown decoding setting(s): {', '.join(unknown)}. Known: {', '.join(sorted(known))}.")
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k == "seed"}
        return replace(base or cls(), **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    def generate_kwargs(self) -> dict:
        """Arguments for `GenerationMixin.generate` (the reply-only n-gram ban is added as a logits processor)."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            num_beams=self.num_beams,
            length_penalty=self.length_penalty,
            do_sample=self.do_sample,
            repetition_penalty=self.repetition_penalty,
        )
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            # Explicit neutral values keep a checkpoint's generation_config from switching sampling on silently.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.no_repeat_ngram_size:
            kwargs["logits_processor"] = LogitsProcessorList([ReplyNoRepeatNGram(self.no_repeat_ngram_size)])
        return kwargs


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


class ReplyNoRepeatNGram(LogitsProcessor):
    """Like transformers' `NoRepeatNGramLogitsProcessor`, but only over the generated tokens.

    The stock processor also looks at the prompt, which in a chat contains earlier replies and the template's own
    repeated markup: it would forbid answering "Yes." twice or even ending the reply the way the last one ended.
    The prompt length is learnt on the first call (generate always calls processors with the full sequence).
    """

    def __init__(self, ngram_size: int):
        self.n = ngram_size
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        reply = input_ids[:, self.prompt_length:]
        if reply.shape[1] < self.n - 1 or self.n == 0:
            return scores
        scores = scores.clone()
        rows = reply.tolist()
        for row, tokens in enumerate(rows):
            prefix = tuple(tokens[len(tokens) - self.n + 1:]) if self.n > 1 else ()
            banned = {
                tokens[i + self.n - 1]
                for i in range(len(tokens) - self.n + 1)
                if tuple(tokens[i:i + self.n - 1]) == prefix
            }
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores
