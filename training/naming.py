"""Naming as a training signal of its own (the default recipe's naming warm-up, docs/model-card.md).

Through the frozen LLM the LM loss teaches a name slowly: at 4 examples a second, 500 emoji concepts are each seen a
few times an hour, and early on every picture gets the most common name ("A car."). :func:`naming_loss` asks the
soft prompt itself for the name instead, without running the LLM: the mean of the projected query outputs is
compared (cosine, temperature ``tau``) with the LLM's own input embedding of every training name (the mean over the
name's tokens, :class:`NameBank`), and cross-entropy picks the right one. That trains the Q-Former *and* the
projection to put the picture where the LLM reads its name, ~10x faster per example than the LM loss; the LM phase
after it then only has to learn to say it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

IGNORE = -100
NAMING_PROMPTS = frozenset({"What is in this picture?", "What is this?"})
_ANSWER = re.compile(r"^(?:an?|the)\s+(.+?)\.?$", re.IGNORECASE)


def answer_name(kind: str, prompt: str, target: str) -> str | None:
    """The name a naming question's answer gives ("What is this?" -> "A dog face." -> "dog face"), else None."""
    if kind != "vqa" or prompt not in NAMING_PROMPTS:
        return None
    match = _ANSWER.match(target.strip())
    return match.group(1).lower() if match else None


class NameBank:
    """Every name of the training rows, and the LLM's input embedding of each (mean over its tokens, L2-normed)."""

    def __init__(self, names: list[str], tokenizer, embeddings: torch.nn.Embedding):
        self.names = sorted(set(names))
        if len(self.names) < 2:
            raise ValueError("naming_aux_weight needs naming questions with at least two different names in the "
                             "data (emoji or stamps sources).")
        self.index = {name: i for i, name in enumerate(self.names)}
        weight = embeddings.weight.detach().float()
        vectors = []
        for name in self.names:
            ids = tokenizer(" " + name, add_special_tokens=False)["input_ids"]
            vectors.append(weight[ids].mean(0))
        self.vectors = F.normalize(torch.stack(vectors), dim=-1)  # (N, H_llm)

    @classmethod
    def of_rows(cls, rows, tokenizer, embeddings) -> NameBank:
        names = [answer_name(row.kind, row.prompt, row.target) for row in rows]
        return cls([n for n in names if n], tokenizer, embeddings)

    def labels(self, batch: list[dict]) -> torch.Tensor:
        """Per example (dicts with "kind", "prompt", "target"): the index of its name, or IGNORE."""
        out = []
        for b in batch:
            name = answer_name(b["kind"], b["prompt"], b["target"])
            out.append(self.index.get(name, IGNORE) if name else IGNORE)
        return torch.tensor(out)


def naming_loss(soft_prompt: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor,
                tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the examples with a name, and their count. ``soft_prompt`` (B, Q, H_llm) is the
    projected query output; ``bank`` (N, H_llm) the normalised name embeddings."""
    labels = labels.to(soft_prompt.device)
    pooled = F.normalize(soft_prompt.float().mean(1), dim=-1)
    logits = pooled @ bank.to(pooled.device).t() / tau
    # Over the whole batch with ignore_index, so the projection is in the graph even without a naming example.
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()
