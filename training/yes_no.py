"""Yes/no questions as a training signal of their own (the default recipe's yes/no curriculum, docs/model-card.md).

Through a frozen small LLM the LM loss hardly reaches the instruction-aware Q-Former's comparison of the question
with the picture, and easy-vqa's yes/no answers are predictable from the wording alone ("is there a blue shape?"
-> "no" is right 82% of the time). Two tools answer that: :func:`balance_counts` lists the rarer answer's questions
more often so the wording says nothing, and :class:`YesNoHead` (training only, never exported) asks a linear
classifier on the mean query output for the answer, a direct signal to the Q-Former.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import NEGATION

CLASSES = {"no": 0, "yes": 1}
IGNORE = -100


def answer_label(kind: str, target: str) -> int:
    """1 for a question answered "yes", 0 for "no", IGNORE for anything else (other answers, captions)."""
    if kind != "vqa":
        return IGNORE
    return CLASSES.get(target.strip().lower().rstrip("."), IGNORE)


def labels(batch: list[dict]) -> torch.Tensor:
    """Per example of a batch (dicts with "kind" and "target"): :func:`answer_label`."""
    return torch.tensor([answer_label(b["kind"], b["target"]) for b in batch])


def balance_counts(rows: list) -> tuple[list[int], dict]:
    """How many times to list each row (``training.examples.Example``) so yes and no answers are equally frequent
    within each group of yes/no questions (group: the row's source, the part of its id before the first "/", and
    whether the question is negated). The rarer answer's rows get round(majority / minority); everything else 1.
    Also returns a summary {group: (yes, no, times)} for the log."""

    def group_and_answer(row) -> tuple[tuple, int] | None:
        answer = answer_label(row.kind, row.target)
        if answer == IGNORE:
            return None
        return (row.id.split("/", 1)[0], bool(NEGATION.search(row.prompt))), answer

    labelled = [group_and_answer(row) for row in rows]
    groups: dict[tuple, Counter] = {}
    for key, answer in filter(None, labelled):
        groups.setdefault(key, Counter())[answer] += 1
    boost: dict[tuple, tuple[int, int]] = {}
    for key, count in groups.items():
        yes, no = count[CLASSES["yes"]], count[CLASSES["no"]]
        if yes and no:
            rare, common = (CLASSES["yes"], no) if yes < no else (CLASSES["no"], yes)
            boost[key] = (rare, max(1, round(common / min(yes, no))))
    counts = []
    for label in labelled:
        rare, times = boost.get(label[0], (None, 1)) if label else (None, 1)
        counts.append(times if label and label[1] == rare else 1)
    summary = {f"{source}{' (negated)' if negated else ''}":
               (c[CLASSES["yes"]], c[CLASSES["no"]], boost.get((source, negated), (None, 1))[1])
               for (source, negated), c in groups.items()}
    return counts, summary


class YesNoHead(nn.Linear):
    """A linear yes/no classifier on the mean query output (a plain Linear, so its weights keep the names training
    checkpoints have always used)."""

    def __init__(self, hidden_size: int):
        super().__init__(hidden_size, len(CLASSES))

    def loss(self, query_out: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the batch's yes/no questions and their count (so N processes can average
        over the global batch)."""
        # Over the whole batch with ignore_index, so the head is in the graph even when no example is yes/no
        # (distributed training needs every trained parameter used in every step).
        answers = answers.to(query_out.device)
        loss_sum = F.cross_entropy(self(query_out.mean(dim=1)).float(), answers, ignore_index=IGNORE,
                                   reduction="sum")
        return loss_sum, (answers != IGNORE).sum()
