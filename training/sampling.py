"""Which training examples are drawn, and how often: repeat counts by source or by question, question filters,
and yes/no balancing. The engine's sampler draws uniformly over a dataset's listed items, so "more often" means
"listed more times" (:func:`repeat_items`)."""

from __future__ import annotations

import logging
import re
from collections import Counter

from torch.utils.data import Dataset, Subset

from . import yes_no
from .config import ConfigError
from .examples import Example, Examples

logger = logging.getLogger(__name__)


def check_repeat_count(name: str, times) -> None:
    """A repeat count from a config (``data.repeat``, ``data.repeat_questions``) must be a whole number >= 1."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, not {times!r}.")


def repeat_items(dataset, counts: list[int]) -> Subset:
    """``dataset`` with item i listed ``counts[i]`` times (the engine's sampler then draws it that much more often)."""
    return Subset(dataset, [i for i, times in enumerate(counts) for _ in range(times)])


def repeat_by_source(dataset, repeat: dict) -> Subset:
    """``dataset`` (items with a "source") with each item of source s listed ``repeat[s]`` times."""
    sources = [item.get("source", "") for item in dataset.items]
    unknown = sorted(set(repeat) - set(sources))
    if unknown:
        raise ConfigError(f"data.repeat names source(s) {unknown} that the data does not have; it has {sorted(set(sources))}.")
    for name, times in repeat.items():
        check_repeat_count(f"data.repeat.{name}", times)
    return repeat_items(dataset, [repeat.get(source, 1) for source in sources])


def question_pattern(key: str, pattern: str):
    """``pattern`` (the value of ``data.<key>``) compiled, or a ConfigError that names the key."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"data.{key}: {pattern!r} is not a regular expression ({exc}).") from None


def select_questions(rows: list[Example], only: str | None, skip: str | None) -> list[Example]:
    """The VQA rows whose question matches ``only`` (captions dropped) and not ``skip``; None keeps everything.
    An unusable pattern, or one that leaves nothing, is a ConfigError."""
    for key, pattern in (("only_questions", only), ("skip_questions", skip)):
        if pattern is not None and not isinstance(pattern, str):
            raise ConfigError(f"data.{key} must be a regular expression (a string) or null, not {pattern!r}.")
    if only is None and skip is None:
        return rows
    only_re = question_pattern("only_questions", only) if only is not None else None
    skip_re = question_pattern("skip_questions", skip) if skip is not None else None

    def kept(row: Example) -> bool:
        is_question = row.kind == "vqa"
        if only_re is not None and not (is_question and only_re.search(row.prompt)):
            return False
        return not (skip_re is not None and is_question and skip_re.search(row.prompt))

    keep = [row for row in rows if kept(row)]
    if not keep:
        raise ConfigError(f"data.only_questions / skip_questions ({only!r} / {skip!r}) leave no training example.")
    logger.info("only_questions / skip_questions: %d of %d examples kept", len(keep), len(rows))
    return keep


def repeat_questions(examples: Examples, rules: dict, balance_yes_no: bool = False) -> Dataset:
    """``examples`` with each question listed ``times`` times when it matches a rule ``{regex: times}`` or, with
    ``balance_yes_no``, when its answer is the rarer of yes/no in its group (:func:`training.yes_no.balance_counts`);
    the largest count wins, captions and other questions are listed once. A rule that matches no question is an
    error: it is a typo, or a data source is missing."""
    if not rules and not balance_yes_no:
        return examples
    compiled = []
    for pattern, times in rules.items():
        regex = question_pattern("repeat_questions", pattern)
        check_repeat_count(f"data.repeat_questions[{pattern!r}]", times)
        compiled.append((pattern, regex, times))
    counts, matched = [], Counter()
    for row in examples.rows:
        times = 1
        if row.kind == "vqa":
            for pattern, regex, n in compiled:
                if regex.search(row.prompt):
                    matched[pattern] += 1
                    times = max(times, n)
        counts.append(times)
    unmatched = [pattern for pattern, _, _ in compiled if not matched[pattern]]
    if unmatched:
        raise ConfigError(f"data.repeat_questions: {unmatched} match(es) no question in the data.")
    if compiled:
        logger.info("repeat_questions: %s", {p: (matched[p], n) for p, _, n in compiled})
    if balance_yes_no:
        balance, summary = yes_no.balance_counts(examples.rows)
        if not summary:
            raise ConfigError("data.balance_yes_no: the data has no yes/no questions.")
        logger.info("balance_yes_no (yes, no, times the rarer is listed): %s", summary)
        counts = [max(a, b) for a, b in zip(counts, balance)]
    return repeat_items(examples, counts)
