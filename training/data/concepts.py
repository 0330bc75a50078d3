"""Concepts: the nouns a picture's name is made of, the split that holds whole concepts out of training, and the
score of whether a reply names the object.

A picture's name ("dog face", "hot beverage", "A blackbird.") is reduced to its **concept words**: lower case,
simple plurals folded (``word_key``), minus function words and generic words ("face", "button", colours and other
adjectives) that name no object. A word is **held out** when a hash of it falls in the test fraction
(:func:`held_out_word`): a pure function of the word, so the split is the same for every source, run and package
version, and a held-out word is held out everywhere ("cat" takes "cat", "cat face" and a stamp "A cat." with it).

A picture is

- ``test`` if any of its concept words is held out;
- ``train`` if none is, and none is a synonym of a held-out picture (``forbidden`` words, e.g. the keyword tags of
  held-out emoji: "coffee" and "tea" when "hot beverage" is held out);
- ``excluded`` otherwise (used nowhere).

So no training caption or question contains a held-out concept's name or synonym, and a held-out picture's
**accepted names** (its concept words and its non-generic synonyms) never appear in training text.
"""

from __future__ import annotations

import re

from .pairs import held_out

__all__ = ["GENERIC", "TEST_FRACTION", "Concept", "colour_name", "concept_words", "held_out_word", "names_object",
           "reply_words", "word_key"]

TEST_FRACTION = 0.15
SPLIT_SEED = 0
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
# Words that never make a concept: they name no object (or every object), so holding them out would hold out
# everything, and accepting them would score "a picture" as a right answer.
GENERIC = frozenset("""
a an the and or of with without in on at to for from by up down off out over under into its it is this that these
face button sign symbol mark light dark medium skin tone tones person people man men woman women animal animals
nature food drink object objects thing things picture image emoji icon travel place places activity activities
sport sports space time day night new old big small little large tiny happy sad left right top bottom front back
one two three four five six seven eight nine ten half full open closed hand hands smiling grinning
letter number style type kind part piece set other
""".split()) | frozenset(COLOURS) | {"grey", "colour", "color", "colored", "coloured"}


def word_key(word: str) -> str:
    """A word folded for matching: lower case, possessive and simple plurals removed
    ("Cats" -> "cat", "berries" -> "berry", "boxes" -> "box", "glass" stays)."""
    w = word.lower().strip("'’\".,!?;:()[]")
    w = re.sub(r"['’]s$", "", w)
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 4 and re.search(r"(ss|x|ch|sh)es$", w):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def reply_words(text: str) -> list[str]:
    return [word_key(w) for w in re.findall(r"[A-Za-z][A-Za-z'’]*", text)]


def concept_words(name: str) -> list[str]:
    """The concept words of a name, in order, without repeats."""
    out = []
    for w in reply_words(name):
        if len(w) > 1 and w not in GENERIC and w not in out:
            out.append(w)
    return out


def held_out_word(word: str, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> bool:
    return held_out(f"concept:{word_key(word)}", test_fraction, seed)


class Concept:
    """What a picture shows: its name, its synonyms (keyword tags) and which split it falls in."""

    def __init__(self, name: str, synonyms=(), test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED):
        self.name = name
        self.words = concept_words(name)
        self.synonyms = [w for w in dict.fromkeys(word_key(s) for s in synonyms if " " not in s.strip())
                         if len(w) > 1 and w not in GENERIC and w not in self.words]
        self.held_out = any(held_out_word(w, test_fraction, seed) for w in self.words)

    @property
    def accepted(self) -> list[str]:
        """Words any of which, in a reply, names the object."""
        return self.words + self.synonyms

    def split(self, forbidden: set[str] = frozenset()) -> str:
        """``test``, ``train`` or ``excluded`` (see the module docstring); ``forbidden``: held-out synonyms."""
        if not self.words:
            return "excluded"
        if self.held_out:
            return "test"
        return "excluded" if forbidden.intersection(self.words) else "train"


def names_object(reply: str, accepted: list[str]) -> bool:
    """True if the reply contains any accepted word (folded by :func:`word_key`, so "cats" names "cat")."""
    keys = {word_key(a) for a in accepted}
    return any(w in keys for w in reply_words(reply))


# Basic colour names by hue (degrees) for saturated pixels; dark, light and grey pixels by value and saturation.
_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"), (335, "pink"),
         (360, "red"))


def colour_name(image, min_share: float = 0.35) -> str | None:
    """The picture's main colour as one of :data:`COLOURS`, from its opaque, non-white pixels (an emoji or stamp is
    drawn on a transparent or white background), or None when no colour covers ``min_share`` of them. An explicit
    rule on HSV values, so the label is checkable: see tests/training/test_concepts.py."""
    import numpy as np

    rgba = np.asarray(image.convert("RGBA").resize((32, 32)), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    cmax, cmin = rgb.max(-1), rgb.min(-1)
    keep = (alpha > 0.5) & ~((cmin > 0.92) & (cmax - cmin < 0.08))  # drop the white background
    if keep.sum() < 20:
        return None
    r, g, b = (rgb[..., i][keep] for i in range(3))
    mx, mn = cmax[keep], cmin[keep]
    delta = mx - mn
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-6), 0)
    safe = np.maximum(delta, 1e-6)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60
    names = []
    for h, s, v in zip(hue, sat, mx):
        if v < 0.2:
            names.append("black")
        elif s < 0.2:
            names.append("white" if v > 0.85 else "gray")
        elif 15 <= h < 45 and v < 0.65:
            names.append("brown")
        else:
            names.append(next(name for limit, name in _HUES if h < limit))
    values, counts = np.unique(names, return_counts=True)
    best = counts.argmax()
    return str(values[best]) if counts[best] >= min_share * len(names) else None
