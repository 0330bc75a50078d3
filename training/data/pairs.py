"""The item contract every dataset follows, and what works on any pair dataset.

An item is ``{"image": PIL RGB, "text": str, "id": str, "source": str}`` (some add ``"qa"``, ``"flip_ok"``,
``"crop_ok"``); an item that could not be made is a :class:`Skipped` marker instead.
"""

from __future__ import annotations

import bisect
import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch.utils.data import ConcatDataset, Dataset, IterableDataset

from blip2.images import InvalidImageError, load_image

__all__ = ["ConcatPairs", "PairDataset", "Skipped", "clean_text", "held_out", "iter_items"]


class Skipped(NamedTuple):
    """Returned/yielded in place of an item that could not be used; ``collate_pairs`` drops and counts it."""

    reason: str
    id: str = ""
    detail: str = ""


def clean_text(text: str | None) -> str:
    """Normalise a caption: Unicode NFC, typographic quotes/dashes to ASCII-ish, whitespace collapsed."""
    if not text:
        return ""
    text = unicodedata.normalize("NFC", str(text))
    table = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": " - ",
             "\u2026": "...", "\u00a0": " ", "\ufeff": ""}
    text = "".join(table.get(ch, ch) for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def held_out(key: str, test_fraction: float, seed: int = 0) -> bool:
    """True if ``key`` belongs to the held-out split: a hash of (seed, key), so membership never depends on which
    other files exist or on the order they are listed; adding stamps does not move old ones between splits."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


class PairDataset(Dataset):
    """Base for map-style pair datasets: ``self.records`` is a list of dicts with ``image`` (anything
    ``load_image`` accepts), ``text``, ``id`` and optional extra keys copied into the item; ``transform`` is applied
    to the item (see :func:`train_transform`). ``__getitem__`` returns a :class:`Skipped` for an image that fails
    to decode."""

    source = "pairs"

    def __init__(self, transform: Callable | None = None):
        self.records: list[dict] = []
        self.skipped: Counter = Counter()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def _add(self, image, text, id_, **extra) -> bool:
        text = clean_text(text)
        if not text:
            self.skipped["empty_caption"] += 1
            return False
        self.records.append({"image": image, "text": text, "id": id_, **extra})
        return True

    def open_image(self, source):
        """The PIL RGB image of a record's ``image``; raises ``InvalidImageError``. A subclass whose records hold
        other kinds of source (stamps that are SVG) converts them here."""
        return load_image(source)

    def load(self, record: dict) -> dict | Skipped:
        try:
            image = self.open_image(record["image"])
        except InvalidImageError as err:
            self.skipped["broken_image"] += 1
            return Skipped("broken_image", record["id"], str(err))
        item = {k: v for k, v in record.items() if k != "image"}
        item["image"] = image
        item.setdefault("source", self.source)
        return item

    def __getitem__(self, index: int) -> dict | Skipped:
        item = self.load(self.records[index])
        if self.transform is not None and not isinstance(item, Skipped):
            item = self.transform(item)
        return item


class ConcatPairs(ConcatDataset):
    """Several map-style pair datasets as one; ``skipped`` sums theirs (as seen in this process).
    For weighting, give a ``torch.utils.data.WeightedRandomSampler`` the weights from :meth:`sample_weights`."""

    def __init__(self, datasets: Sequence[Dataset]):
        super().__init__(list(datasets))

    @property
    def skipped(self) -> Counter:
        total: Counter = Counter()
        for ds in self.datasets:
            total.update(getattr(ds, "skipped", {}))
        return total

    def sample_weights(self, weights: Sequence[float]) -> torch.Tensor:
        """Per-sample weights so that dataset k is drawn with probability proportional to ``weights[k]``."""
        if len(weights) != len(self.datasets):
            raise ValueError(f"{len(weights)} weights for {len(self.datasets)} datasets")
        parts = [torch.full((len(ds),), float(w) / max(1, len(ds))) for ds, w in zip(self.datasets, weights)]
        return torch.cat(parts)

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset number, index inside it) of a global index."""
        k = bisect.bisect_right(self.cumulative_sizes, index)
        return k, index - (self.cumulative_sizes[k - 1] if k else 0)


def iter_items(dataset) -> Iterator[dict]:
    """Every usable item of a map-style or iterable dataset, in order, without Skipped markers."""
    source = dataset if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    for item in source:
        if item is not None and not isinstance(item, Skipped):
            yield item
