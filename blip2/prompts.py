"""Prompt formats per LLM family, and where the image's query embeddings go.

A rendered prompt is text *around* one image slot: ``Rendered(before, after)``. The slot is filled with the
projected query embeddings (``num_query_tokens`` positions). Two layouts exist:

- ``plain`` (OPT, other base causal LMs, Flan-T5): the slot comes first and the text follows, exactly as the
  official checkpoints were trained (``Blip2Processor`` puts the image tokens before the BOS token).
- ``chat`` (chat-template LLMs such as SmolLM2-Instruct): the conversation is rendered with the tokenizer's chat
  template and the slot sits at the start of the *first user turn*, after the system turn, so the system prompt
  keeps its usual position and the image belongs to what the user said.

User text (messages, and past turns tokenized from their text) never becomes a special token, whatever it
contains: typing ``<|im_end|>`` must not end the user's turn and forge the assistant's. The plain layout's text
has no special tokens of its own, so it is tokenized with special tokens off; in the chat layout the template's
own markup must stay special, so each special token's text found in user text is wrapped in
``TEXT_OPEN``/``TEXT_CLOSE`` and tokenized as plain text (see ``prompt_ids``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

# Marks the image slot in text handed to a chat template; stripped from user text so users cannot forge it.
IMAGE_SLOT = "<|blip2:image|>"
# Mark where an earlier assistant reply sits in a rendered conversation (see ``prompt_ids``); stripped likewise.
REPLY_OPEN, REPLY_CLOSE = "<|blip2:reply|>", "<|blip2:/reply|>"
# Wrap a special token's text that the user typed (chat layout): ``prompt_ids`` tokenizes it as text; stripped likewise.
TEXT_OPEN, TEXT_CLOSE = "<|blip2:text|>", "<|blip2:/text|>"
_MARKERS = (IMAGE_SLOT, REPLY_OPEN, REPLY_CLOSE, TEXT_OPEN, TEXT_CLOSE)
_ESCAPED = re.compile(re.escape(TEXT_OPEN) + "(.*?)" + re.escape(TEXT_CLOSE), re.DOTALL)

Turn = tuple[str, str]  # (user message, assistant reply)


@dataclass(frozen=True)
class Rendered:
    before: str  # text before the image slot (chat layout only; empty for plain)
    after: str  # text after the image slot
    # True when `before`/`after` already contain the special tokens (chat templates render them as text).
    has_special_tokens: bool


@dataclass(frozen=True)
class PromptFormat:
    """How questions, history and instructions become the LLM's text prompt."""

    style: Literal["plain", "chat"] = "plain"
    # Template for one user question in the plain layout ("{}" is the question).
    question_template: str = "Question: {} Answer:"
    # Joins past turns in the plain layout.
    turn_separator: str = " "
    # What `caption()` sends: the empty prompt is the official zero-shot captioning setting.
    caption_prompt: str = ""
    # Chat layout only. None lets the template choose (SmolLM2's default is long and off-topic, so set one).
    system_prompt: str | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptFormat:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    # -- rendering -------------------------------------------------------------------------------------------
    def raw(self, prompt: str | None, tokenizer=None) -> Rendered:
        """A prompt used verbatim (plain layout), or as the single user message (chat layout)."""
        prompt = _clean(prompt or "")
        if self.style == "plain":
            return Rendered("", prompt, has_special_tokens=False)
        return self._render_chat([{"role": "user", "content": _escaper(tokenizer)(prompt)}], tokenizer)

    def conversation(self, history: Sequence[Turn], message: str, tokenizer=None, mark_replies: bool = False) -> Rendered:
        """Past turns plus a new user message, ready for the assistant's next reply. ``mark_replies`` wraps each
        past reply (in the plain layout with the space before it, the way a model generates it) in
        ``REPLY_OPEN``/``REPLY_CLOSE`` so ``prompt_ids`` can put back the token ids the model generated."""
        turns = [(_clean(u), _clean(a)) for u, a in history]
        message = _clean(message)
        opened, closed = (REPLY_OPEN, REPLY_CLOSE) if mark_replies else ("", "")
        if self.style == "plain":
            parts = [
                f"{self.question_template.format(u)}{opened} {a}{closed}" if a else self.question_template.format(u)
                for u, a in turns
            ]
            parts.append(self.question_template.format(message))
            return Rendered("", self.turn_separator.join(parts), has_special_tokens=False)
        escape = _escaper(tokenizer)
        turns = [(escape(u), escape(a)) for u, a in turns]
        messages = []
        for user, assistant in turns:
            messages.append({"role": "user", "content": self.question_template.format(user)})
            messages.append({"role": "assistant", "content": f"{opened}{assistant}{closed}"})
        messages.append({"role": "user", "content": self.question_template.format(escape(message))})
        return self._render_chat(messages, tokenizer)

    def _render_chat(self, messages: list[dict], tokenizer) -> Rendered:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("The chat prompt style needs a tokenizer with a chat template.")
        messages = [dict(m) for m in messages]
        messages[0]["content"] = IMAGE_SLOT + messages[0]["content"]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, sep, after = text.partition(IMAGE_SLOT)
        if not sep:
            raise ValueError("The chat template dropped the image slot; this LLM's template is not supported.")
        return Rendered(before, after, has_special_tokens=True)


def prompt_ids(rendered: Rendered, tokenizer, image_token_id: int, num_query_tokens: int,
               reply_ids: Callable[[str], list[int] | None] | None = None) -> list[int]:
    """Token ids of a rendered prompt with ``num_query_tokens`` image positions, laid out like ``Blip2Processor``
    (plain: image first, then the tokenized prompt with its special tokens) or inside the chat (chat layout).
    Inference and training both build their inputs here, so a model is trained on exactly what it is served.

    Replies marked by ``conversation(mark_replies=True)`` are tokenized with the rest of the text, unless
    ``reply_ids(text)`` knows the ids the model generated for that reply: those go in as they are. A model often
    generates a tokenization that re-tokenizing its text does not give back (" A"+"va" where the tokenizer says
    " Av"+"a"); feeding its own ids back keeps the next turn's prompt an exact extension of the last one, so the
    key/value cache of that turn is reused whole, and the model sees what it actually said."""
    image = [image_token_id] * num_query_tokens
    if rendered.has_special_tokens:  # chat templates render their special tokens as text
        before = _encode(rendered.before, tokenizer, False, reply_ids) if rendered.before else []
        return before + image + _encode(rendered.after, tokenizer, False, reply_ids)
    return image + _encode(rendered.after, tokenizer, True, reply_ids, plain=True)


def _encode(text: str, tokenizer, add_special_tokens: bool, reply_ids, plain: bool = False) -> list[int]:
    """Tokenize ``text`` whose marked replies are either plain text (ids unknown) or spliced in as known ids.
    ``plain``: the text holds no special tokens of its own (plain layout), so none is read from it."""
    if REPLY_OPEN not in text:
        return _text_ids(text, tokenizer, add_special_tokens, plain)
    chunks: list[str | list[int]] = [""]  # text to tokenize, alternating with known ids
    for piece in text.split(REPLY_OPEN):
        reply, closed, rest = piece.partition(REPLY_CLOSE)
        if not closed:  # the text before the first reply
            chunks[-1] += piece
            continue
        text_of_reply = _ESCAPED.sub(r"\1", reply).strip()  # as the caller knows it: unescaped
        known = reply_ids(text_of_reply) if reply_ids is not None and text_of_reply else None
        if known:
            chunks += [list(known), rest]
        else:
            chunks[-1] += reply + rest
    ids: list[int] = []
    for index, chunk in enumerate(chunks):
        if isinstance(chunk, list):
            ids += chunk
        elif chunk:
            # Only the first text chunk takes the tokenizer's special tokens (OPT's BOS); a tokenizer that also
            # appends some (T5's EOS) never gets here: encoder-decoders do not reuse key/values across turns.
            ids += _text_ids(chunk, tokenizer, add_special_tokens and index == 0, plain)
    return ids


def _text_ids(text: str, tokenizer, add_special_tokens: bool, plain: bool) -> list[int]:
    """Token ids of text in which special tokens come only from the template: never from user text. The prompt's
    own special tokens (OPT's BOS, T5's EOS) are still added with ``add_special_tokens``."""
    if plain:
        return tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True)["input_ids"]
    if TEXT_OPEN not in text:  # the usual case, tokenized in one piece exactly as before
        return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    # Only the chat layout escapes, and it never adds special tokens, so tokenizing in pieces adds none twice.
    pieces = _ESCAPED.split(text)  # [text, escaped, text, escaped, ..., text]
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if piece:
            ids += tokenizer(piece, add_special_tokens=False, split_special_tokens=index % 2 == 1)["input_ids"]
    return ids


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens, including added ones that ``all_special_ids`` leaves out (the
    ``<image>`` token ``Blip2Processor`` adds)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}


def _escaper(tokenizer) -> Callable[[str], str]:
    """A function that wraps each special token's text in a string in TEXT_OPEN/TEXT_CLOSE (and leaves a string
    without any unchanged). Without a tokenizer there is nothing to escape: the chat layout then refuses anyway."""
    if tokenizer is None:
        return lambda text: text
    added = getattr(tokenizer, "added_tokens_decoder", {})
    tokens = set(tokenizer.all_special_tokens) | {token.content for token in added.values() if token.special}
    tokens.discard("")
    if not tokens:
        return lambda text: text
    # Longest first: where one token's text starts with another's, the regex alternation must take the whole one.
    pattern = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    return lambda text: pattern.sub(lambda m: TEXT_OPEN + m.group(0) + TEXT_CLOSE, text)


def _clean(text: str) -> str:
    text = str(text)
    # Until nothing changes: removing a marker can join its neighbours into one ("<|blip2:<|blip2:image|>image|>").
    previous = None
    while text != previous:
        previous = text
        for marker in _MARKERS:
            text = text.replace(marker, "")
    return text.strip()


def default_format(family: str) -> PromptFormat:
    """The prompt format of an LLM family (see :func:`blip2.llm.family_of`)."""
    if family == "chat":
        return PromptFormat(
            style="chat",
            question_template="{}",
            caption_prompt="Describe this image in one short sentence.",
            system_prompt="You are a helpful assistant who can see the image the user shares.",
        )
    if family == "encoder-decoder":
        # Flan-T5: the paper's short-answer VQA prompt.
        return PromptFormat(style="plain", question_template="Question: {} Short answer:")
    return PromptFormat(style="plain", question_template="Question: {} Answer:")
