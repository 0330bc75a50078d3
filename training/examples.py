"""Stage-2 training examples: (image, prompt, target text) rows for one task.

A row is an :class:`Example`: which cached image it shows, its kind ("caption" or "vqa"), the prompt and the
target. :class:`Examples` builds the rows from cached features; :class:`RawExamples` is the same for images decoded
every step (a fine-tuned image encoder); :class:`StreamedExamples` turns a stream of captioned images (tar shards)
into caption rows on the fly.
"""

from __future__ import annotations

import hashlib
import random
from typing import NamedTuple

from torch.utils.data import Dataset, IterableDataset

from .config import ConfigError


class Example(NamedTuple):
    feature_index: int  # the image's row in the feature cache
    kind: str  # "caption" | "vqa"
    prompt: str
    target: str
    id: str  # the image's id; "<image id>#q<n>" for its n-th question


def prefix_split(text: str, key: str, seed: int) -> tuple[str, str]:
    """Split a caption at a random word boundary (prefix LM): at least one word on each side when possible. The
    split is a pure function of (seed, key), so every process and every resumed run agrees."""
    words = text.split()
    if len(words) < 2:
        return "", text
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    cut = random.Random(int.from_bytes(digest[:8], "big")).randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


class Examples(Dataset):
    """Cached image features paired with (prompt, target) texts for one task. VQA expands each image's ``qa``.
    ``prefix_lm``: captions are split at a random word (:func:`prefix_split`) into prompt and target."""

    def __init__(self, features, task: str, caption_prompt: str, prefix_lm: bool, seed: int,
                 with_captions: bool = False):
        self.features, self.task = features, task
        self.rows: list[Example] = []
        for index, item in enumerate(features.items):
            if task == "vqa":
                for n, (question, answer) in enumerate(item.get("qa") or []):
                    self.rows.append(Example(index, "vqa", question, answer, f"{item['id']}#q{n}"))
            if task == "vqa" and not with_captions:
                continue
            if prefix_lm:
                prefix, suffix = prefix_split(item["text"], item["id"], seed)
                self.rows.append(Example(index, "caption", prefix, suffix, item["id"]))
            else:
                self.rows.append(Example(index, "caption", caption_prompt, item["text"], item["id"]))
        if task == "vqa" and not any(row.kind == "vqa" for row in self.rows):
            raise ConfigError("No question/answer pairs in the data: use easyvqa or scenes sources (a feature cache "
                              "built by an older version lacks them: delete it to rebuild).")
        if not self.rows:
            raise ConfigError(f"No {task} training examples in the data.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        item = self.features[row.feature_index]
        return {"image_embeds": item["image_embeds"], "kind": row.kind, "prompt": row.prompt, "target": row.target,
                "id": row.id}


class RawExamples(Dataset):
    """Images decoded every step (for a fine-tuned image encoder), with the caption task's texts."""

    def __init__(self, dataset, caption_prompt: str):
        self.dataset, self.caption_prompt = dataset, caption_prompt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, dict):
            return item  # a Skipped marker: the collate replaces it
        return {"image": item["image"], "kind": "caption", "prompt": self.caption_prompt, "target": item["text"],
                "id": item["id"]}


class StreamedExamples(IterableDataset):
    """Captioned images from a stream that splits itself across processes (``WebDatasetShards``) as caption rows,
    decoded on the fly: data that fits in no index or feature cache. ``prefix_lm`` splits each caption as
    :class:`Examples` does. Items that failed to load pass through as :class:`Skipped` markers for the collate."""

    def __init__(self, stream: IterableDataset, caption_prompt: str, prefix_lm: bool, seed: int):
        self.stream, self.caption_prompt, self.prefix_lm, self.seed = stream, caption_prompt, prefix_lm, seed

    @property
    def skipped(self):
        return self.stream.skipped

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        for item in self.stream:
            if not isinstance(item, dict):
                yield item
                continue
            prompt, target = self.caption_prompt, item["text"]
            if self.prefix_lm:
                prompt, target = prefix_split(item["text"], item["id"], self.seed)
            yield {"image": item["image"], "kind": "caption", "prompt": prompt, "target": target, "id": item["id"]}
