"""Batching pair items for a DataLoader, with skipped items counted rather than lost."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from .pairs import Skipped

__all__ = ["collate_pairs", "replace_broken"]


def collate_pairs(batch: Sequence[dict | Skipped | None], encoder=None) -> dict:
    """``{"pixel_values": encoder.preprocess(images) | None, "texts", "ids", "sources", "skipped": Counter}``.

    Skipped markers (and None) are dropped and counted; if nothing is left ``pixel_values`` is None and the
    caller should skip the batch. Without an encoder the PIL images are returned under ``"images"``. Use with a
    DataLoader as ``collate_fn=functools.partial(collate_pairs, encoder=encoder)``; tokenization is the model's."""
    skipped: Counter = Counter()
    items = []
    for item in batch:
        if item is None:
            skipped["none"] += 1
        elif isinstance(item, Skipped):
            skipped[item.reason] += 1
        else:
            items.append(item)
    images = [it["image"] for it in items]
    out = {
        "texts": [it["text"] for it in items],
        "ids": [it["id"] for it in items],
        "sources": [it.get("source", "") for it in items],
        "qa": [[list(pair) for pair in it.get("qa") or []] for it in items],  # kept for VQA (cached with features)
        "skipped": skipped,
    }
    if encoder is None:
        out["images"] = images
        out["pixel_values"] = None
    else:
        out["pixel_values"] = encoder.preprocess(images) if images else None
    return out


def replace_broken(batch: Sequence, skipped: Counter) -> list[dict]:
    """``batch`` with every item that failed to load (a :class:`Skipped` marker) replaced by a copy of a good item
    of the same batch, counted in ``skipped["broken_image"]``. Every process keeps its batch size, which the
    cross-process gathers need; a copy has the same id, so ITC/ITM never treat it as its own negative."""
    good = [item for item in batch if isinstance(item, dict)]
    if not good:
        raise RuntimeError("Every image of a batch failed to load; check the data source.")
    if len(good) < len(batch):
        skipped.update({"broken_image": len(batch) - len(good)})
    return [item if isinstance(item, dict) else good[i % len(good)] for i, item in enumerate(batch)]
