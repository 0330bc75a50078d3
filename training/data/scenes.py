"""The procedural scenes of :mod:`training.data.scene_maker` as a dataset."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable

from torch.utils.data import Dataset

from .scene_maker import make_scene

__all__ = ["Scenes", "scene_seed"]


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` in the set with ``seed``; different sets do not share scenes."""
    return int.from_bytes(hashlib.sha256(f"scenes:{seed}:{index}".encode()).digest()[:8], "big")


class Scenes(Dataset):
    """``n`` procedural scenes (:mod:`training.data.scene_maker`), scene i drawn from ``scene_seed(seed, i)``; use
    another ``seed`` for a held-out set. Items carry ``qa`` and ``crop_ok=False`` (a crop could cut counted shapes
    out)."""

    source = "scenes"

    def __init__(self, n: int, seed: int = 0, size: int = 224, transform: Callable | None = None):
        self.n, self.seed, self.size, self.transform = n, seed, size, transform
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n:
            raise IndexError(index)
        scene = make_scene(scene_seed(self.seed, index), size=self.size)
        item = {"image": scene.image, "text": scene.caption, "id": f"scenes/{self.seed}/{index}",
                "source": self.source, "qa": scene.qa, "crop_ok": False}
        return self.transform(item) if self.transform else item
