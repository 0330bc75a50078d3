"""Training augmentation that keeps captions true: crops that keep counted shapes, flips that swap left/right."""

from __future__ import annotations

import math
import re

import torch
from PIL import Image

__all__ = ["PairTransform", "has_left_right", "swap_left_right", "train_transform"]


_LR = re.compile(r"\b(left|right)(?=(most|ward|wards|hand|-hand)?\b)", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """Swap "left" and "right" (also leftmost/rightward/left-hand..., case kept) in ``text``; "bright",
    "copyright" and "upright" are other words and stay."""

    def swap(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        if word[0].isupper():
            return new.capitalize()
        return new

    return _LR.sub(swap, text)


def has_left_right(text: str) -> bool:
    return bool(_LR.search(text))


class PairTransform:
    """Random resized crop (area ``scale``, aspect 3/4-4/3) + horizontal flip with probability ``flip_p``, to a
    square ``image_size``. ``left_right="swap"`` (default) swaps left/right in the text when it flips;
    ``"avoid"`` never flips a text that mentions them. Items with ``flip_ok=False`` are never flipped, items with
    ``crop_ok=False`` are only resized. Randomness comes from ``generator`` or torch's RNG (seeded per
    DataLoader worker by torch)."""

    def __init__(self, image_size: int, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
                 left_right: str = "swap", generator: torch.Generator | None = None):
        if left_right not in ("swap", "avoid"):
            raise ValueError("left_right must be 'swap' or 'avoid'")
        self.image_size, self.scale, self.ratio, self.flip_p = image_size, scale, ratio, flip_p
        self.left_right, self.generator = left_right, generator

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params: 10 tries, then a centre crop at the clamped aspect."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * (self.scale[0] + self._rand() * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_ratio[0] + self._rand() * (log_ratio[1] - log_ratio[0]))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                x = int(self._rand() * (width - w + 1))
                y = int(self._rand() * (height - h + 1))
                return x, y, x + w, y + h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        x, y = (width - w) // 2, (height - h) // 2
        return x, y, x + w, y + h

    def __call__(self, item: dict) -> dict:
        item = dict(item)
        image: Image.Image = item["image"]
        size = (self.image_size, self.image_size)
        if item.get("crop_ok", True):
            image = image.resize(size, Image.BICUBIC, box=self.crop_box(*image.size))
        else:
            image = image.resize(size, Image.BICUBIC)
        flip = self._rand() < self.flip_p and item.get("flip_ok", True)
        if flip and self.left_right == "avoid" and has_left_right(item["text"]):
            flip = False
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            item["text"] = swap_left_right(item["text"])
            if "qa" in item:
                item["qa"] = [(swap_left_right(q), swap_left_right(a)) for q, a in item["qa"]]
        item["image"], item["flipped"] = image, flip
        return item


def train_transform(image_size: int, scale=(0.5, 1.0), **kwargs) -> PairTransform:
    """The paper's stage-1 augmentation; see :class:`PairTransform`."""
    return PairTransform(image_size, scale=scale, **kwargs)
