"""A chat call's history as prompt material: its turns, the token ids its replies came with, and fitting the prompt
into the LLM's context by dropping the oldest turns, then cutting the message."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from .errors import PromptTooLongError
from .prompts import Turn


def split_history(history: Sequence) -> tuple[list[Turn], list[Sequence[int] | None]]:
    """The turns of ``history`` and, per turn, the token ids its reply came with (None: not given).

    Accepted items: ``(user, assistant)`` pairs, ``(user, assistant, assistant_token_ids)`` triples, or role/content
    dicts (the Gradio messages format), where an assistant dict may carry ``"token_ids"``."""
    turns: list[Turn] = []
    reply_ids: list[Sequence[int] | None] = []
    pending_user: str | None = None
    for item in history:
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content")
            if not isinstance(content, str):
                continue  # images or files in a messages list carry no text for the LLM
            if role == "user":
                pending_user = content if pending_user is None else f"{pending_user}\n{content}"
            elif role == "assistant" and pending_user is not None:
                turns.append((pending_user, content))
                reply_ids.append(item.get("token_ids"))
                pending_user = None
        else:
            user, assistant, ids = (*item, None) if len(item) == 2 else item
            turns.append((str(user), str(assistant)))
            reply_ids.append(ids)
    return turns, reply_ids


def known_reply_ids(replies: Iterable[tuple[str, Sequence[int] | None]], tokenizer) -> dict[str, list[int]]:
    """Reply text -> the token ids to put back in the prompt for it (see ``blip2.prompts.prompt_ids``), from
    ``(text, ids)`` pairs of one conversation.

    Ids count only where they decode to the text: ids from another model or for a since-edited message are ignored
    and that reply is tokenized from its text. Trailing special tokens (EOS) are dropped: the prompt template
    writes its own end of turn. Where two replies have the same text, the later one's ids win."""
    known: dict[str, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    vocab = len(tokenizer)
    for text, ids in replies:
        text = str(text).strip()
        if not text or not ids:
            continue
        try:
            ids = [int(i) for i in ids]
        except (TypeError, ValueError):
            continue
        while ids and ids[-1] in special:
            ids.pop()
        # An id past the vocabulary would index past the embedding table; decode() may just skip it.
        if ids and all(0 <= i < vocab for i in ids) and tokenizer.decode(ids, skip_special_tokens=True).strip() == text:
            known[text] = ids
    return known


def fit_prompt(prompt: Callable[[int, int], list[int]], num_turns: int, message: str, limit: int | None,
               max_new_tokens: int) -> tuple[list[int], int, int]:
    """(ids, dropped turns, characters cut from the message): ``prompt(drop, cut)`` tokenized with the fewest
    oldest turns dropped, then the fewest characters cut from the message's end, that leave room for the reply."""
    ids = prompt(0, 0)
    if limit is None or len(ids) + max_new_tokens <= limit:
        return ids, 0, 0
    for drop in range(1, num_turns + 1):
        ids = prompt(drop, 0)
        if len(ids) + max_new_tokens <= limit:
            return ids, drop, 0
    # Still too long: cut the message's tail, a character budget found by bisection on the real token count.
    low, high = 0, len(message)
    while low < high:
        keep = (low + high + 1) // 2
        if len(prompt(num_turns, len(message) - keep)) + max_new_tokens <= limit:
            low = keep
        else:
            high = keep - 1
    ids = prompt(num_turns, len(message) - low)
    if len(ids) + max_new_tokens > limit:
        raise PromptTooLongError(
            f"The prompt needs {len(ids)} tokens and the reply {max_new_tokens}, but this model takes "
            f"{limit}. Lower max_new_tokens."
        )
    return ids, num_turns, len(message) - low


def cut(text: str, remove: int) -> str:
    """``text`` without its last ``remove`` characters."""
    return text[: len(text) - remove] if remove else text
