"""Data sources named in configs and on the command line, turned into datasets."""

from __future__ import annotations

import os

from ..config import ConfigError
from .easyvqa import EasyVQA
from .emoji import EmojiPictures
from .manifest import ManifestDataset
from .scenes import Scenes
from .tuxpaint import TuxPaintStamps
from .webdataset import WebDatasetShards


def build_source(spec: dict, transform=None):
    """One dataset from a config entry such as ``{"type": "scenes", "n": 100, "seed": 0}``. ``shards`` is the one
    streamed source (an ``IterableDataset``); build it after the process group exists, it splits itself by rank."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "scenes":
        return Scenes(spec.get("n", 100), seed=spec.get("seed", 0), size=spec.get("size", 224), transform=transform)
    if kind == "manifest":
        return ManifestDataset(spec["path"], transform=transform)
    if kind == "tuxpaint":
        return TuxPaintStamps(split=spec.get("split", "train"), transform=transform,
                              **{k: v for k, v in spec.items() if k in ("root", "test_fraction", "seed", "split_by")})
    if kind == "easyvqa":
        return EasyVQA(spec.get("split", "train"), transform=transform)
    if kind == "emoji":
        return EmojiPictures(spec.get("split", "train"), styles=tuple(spec.get("styles", ("google", "twitter"))),
                             transform=transform, with_colour=spec.get("with_colour", True))
    if kind == "photos":
        from .photos import SamplePhotos

        return SamplePhotos(transform=transform)
    if kind == "shards":
        # Streamed: each process (and DataLoader worker) reads its own shards, reshuffled every epoch.
        if "pattern" not in spec:
            raise ConfigError('A shards source needs a pattern, e.g. {type: shards, pattern: "data/{0000..0009}.tar"}.')
        return WebDatasetShards(spec["pattern"], shuffle=spec.get("shuffle", True), seed=spec.get("seed", 0),
                                transform=transform)
    raise ConfigError(f"Unknown data source type {kind!r}; use scenes, manifest, tuxpaint, easyvqa, emoji, photos "
                      "or shards.")


def parse_data_arg(text: str) -> dict:
    """CLI shorthand: ``scenes:N[:SEED]``, ``tuxpaint:test[:concept]``, ``easyvqa:test``, ``emoji:test``, ``photos``
    or a manifest path."""
    if os.path.exists(text):
        return {"type": "manifest", "path": text}
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "scenes":
        return {"type": "scenes", "n": int(parts[0]) if parts else 100, "seed": int(parts[1]) if len(parts) > 1 else 0}
    if kind == "tuxpaint":  # held out by caption, so near-duplicate stamps ("The letter W.") never straddle the split
        return {"type": kind, "split": parts[0] if parts else "test", "split_by": parts[1] if len(parts) > 1 else "caption"}
    if kind == "emoji":  # held out by concept (training.data.concepts)
        return {"type": kind, "split": parts[0] if parts else "test"}
    if kind == "photos":
        return {"type": kind}
    if kind == "easyvqa":
        return {"type": kind, "split": parts[0] if parts else "test"}
    raise ConfigError(f"Cannot read data {text!r}: use scenes:N[:SEED], tuxpaint:SPLIT[:concept], easyvqa:SPLIT, "
                      "emoji:SPLIT, photos or a manifest.")
