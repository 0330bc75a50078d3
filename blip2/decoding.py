"""Decoding settings, validated once, turned into `transformers` generate arguments."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass(frozen=True)
class Decoding:
    """How to pick tokens. Greedy by default; ``num_beams > 1`` is beam search; ``do_sample`` is nucleus sampling."""

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
        _check(self.max_new_tokens >= 1, "max_new_tokens must be at least 1")
        _check(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be between 0 and max_new_tokens")
        _check(self.num_beams >= 1, "num_beams must be at least 1")
        _check(self.temperature > 0, "temperature must be > 0")
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(self.top_k >= 0, "top_k must be >= 0")
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0")
        _check(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0")

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
