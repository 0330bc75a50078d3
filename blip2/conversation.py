"""A chat call's history as prompt material: its turns, the token ids its replies came with, and fitting the prompt
into the LLM's context by dropping the oldest turns, then cutting the message."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

from .errors import PromptTooLongError
from .prompts import Turn, special_ids


def split_history(history: Sequence | None) -> tuple[list[Turn], list[Sequence[int] | None]]:
    """The turns of ``history`` and, per turn, the token ids its reply came with (None: not given).

    Accepted items: ``(user, assistant)`` pairs, ``(user, assistant, assistant_token_ids)`` triples, or role/content
    dicts (the Gradio messages format), where an assistant dict may carry ``"token_ids"``. None is no history.
    Anything else is a ValueError that says which item is wrong and how."""
    if history is None:
        return [], []
    # A string or a dict iterates happily (characters, keys) into nonsense turns; refuse them by name.
    if isinstance(history, (str, bytes, Mapping)) or not isinstance(history, Iterable):
        raise ValueError(f"history must be a list of turns, each {_TURN}; got {type(history).__name__}.")
    turns: list[Turn] = []
    reply_ids: list[Sequence[int] | None] = []
    pending_user: str | None = None
    for index, item in enumerate(history):
        where = f"history item {index}"
        if isinstance(item, Mapping):
            role, content = item.get("role"), item.get("content")
            if not isinstance(content, str):
                continue  # images or files in a messages list carry no text for the LLM
            if role == "user":
                pending_user = content if pending_user is None else f"{pending_user}\n{content}"
            elif role == "assistant" and pending_user is not None:
                turns.append((pending_user, content))
                reply_ids.append(_token_ids(item.get("token_ids"), where))
                pending_user = None
            continue
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence):
            raise ValueError(f"{where} is {_kind(item)}; each turn must be {_TURN}.")
        if len(item) not in (2, 3):
            raise ValueError(f"{where} has {len(item)} elements; each turn must be {_TURN}.")
        user, assistant, ids = (*item, None) if len(item) == 2 else item
        for name, text in (("user message", user), ("assistant reply", assistant)):
            if not isinstance(text, str):
                raise ValueError(f"{where}: the {name} must be a string, not {type(text).__name__}.")
        turns.append((user, assistant))
        reply_ids.append(_token_ids(ids, where))
    return turns, reply_ids


_TURN = "a (user, assistant) pair, a (user, assistant, token_ids) triple or a role/content dict"


def _kind(value) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _token_ids(ids, where: str):
    # Only the container is checked here; ids that do not fit this model are ignored later (known_reply_ids).
    if ids is not None and (isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable)):
        raise ValueError(f"{where}: token_ids must be a list of ints or None, not {type(ids).__name__}.")
    return ids


def known_reply_ids(replies: Iterable[tuple[str, Sequence[int] | None]], tokenizer) -> dict[str, list[int]]:
    """Reply text -> the token ids to put back in the prompt for it (see ``blip2.prompts.prompt_ids``), from
    ``(text, ids)`` pairs of one conversation.

    Ids count only where they decode to the text: ids from another model or for a since-edited message are ignored
    and that reply is tokenized from its text. Trailing special tokens (EOS) are dropped: the prompt template
    writes its own end of turn; ids with a special token anywhere else are ignored. Where two replies have the same
    text, the later one's ids win."""
    known: dict[str, list[int]] = {}
    special = special_ids(tokenizer)
    vocab = len(tokenizer)
    for text, ids in replies:
        text = str(text).strip()
        if not text or ids is None:
            continue
        try:
            ids = [int(i) for i in ids]  # `not ids` first would fail on a tensor or array
        except (TypeError, ValueError):
            continue
        while ids and ids[-1] in special:
            ids.pop()
        # An id past the vocabulary would index past the embedding table; decode() may just skip it. A special id
        # inside the reply is skipped by decode() too, yet would reach the prompt: an image token adds image
        # positions, a chat marker a turn the text does not show.
        if (ids and all(0 <= i < vocab and i not in special for i in ids)
                and tokenizer.decode(ids, skip_special_tokens=True).strip() == text):
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
