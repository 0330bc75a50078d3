"""Real photographs for evaluation only: the scikit-image sample images that show a nameable object, each with the
words that name it. Never a training source (build_source refuses nothing here, but no shipped training config
names it, and tests/training/test_config.py checks that)."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from .concepts import Concept
from .pairs import PairDataset

__all__ = ["PHOTOS", "SamplePhotos"]

# skimage.data function -> (what it shows, words that name it). Grey photos are shown as grey RGB.
PHOTOS = {
    "astronaut": ("an astronaut", ["astronaut", "spaceman", "cosmonaut", "spacesuit", "suit"]),
    "chelsea": ("a cat", ["cat", "kitten", "kitty", "tabby"]),
    "coffee": ("a cup of coffee", ["coffee", "cup", "mug", "espresso", "cappuccino", "latte", "saucer"]),
    "rocket": ("a rocket", ["rocket", "shuttle", "missile", "launch"]),
    "stereo_motorcycle": ("a motorcycle", ["motorcycle", "motorbike", "scooter", "bike"]),
    "camera": ("a man with a camera", ["camera", "photographer", "cameraman", "tripod"]),
    "hubble_deep_field": ("galaxies in space", ["galaxy", "star", "universe", "nebula"]),
    "horse": ("a horse", ["horse", "pony", "stallion"]),
    "coins": ("coins", ["coin", "money", "penny"]),
    "moon": ("the moon", ["moon", "crater"]),
    "clock": ("a clock", ["clock", "watch"]),
    "brick": ("a brick wall", ["brick", "wall"]),
    "grass": ("grass", ["grass", "lawn", "meadow"]),
    "page": ("a page of text", ["page", "text", "book", "paper", "letter"]),
}


class SamplePhotos(PairDataset):
    """The :data:`PHOTOS` from ``skimage.data`` (bundled with scikit-image, no download), as named pictures."""

    source = "photos"

    def __init__(self, transform: Callable | None = None):
        super().__init__(transform)
        try:
            import skimage.data  # noqa: F401
        except ImportError as err:
            raise FileNotFoundError("The sample photos come with scikit-image: pip install scikit-image") from err
        for name, (what, words) in PHOTOS.items():
            concept = Concept(what, words)
            self._add(name, f"{what[0].upper()}{what[1:]}.", f"photos/{name}", source=self.source, concept=what,
                      accepted=concept.accepted, qa=[("What is in this picture?", what), ("What is this?", what)])

    def open_image(self, source):
        import numpy as np
        import skimage.data

        pixels = getattr(skimage.data, source)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
        if pixels.dtype == bool:
            pixels = (~pixels).astype(np.uint8) * 255  # the horse silhouette: black on white
        return Image.fromarray(pixels).convert("RGB")
