"""Emoji pictures named in words: Noto (Google) and Twemoji (Twitter) 64 px PNGs, named by their Unicode CLDR
annotation ("dog face", "hot beverage") with OpenMoji's keyword tags as synonyms ("dog", "puppy"; "coffee", "tea").

Fetched by ``python -m training fetch-data`` (see :mod:`training.data.fetch` for the licences). Only the groups
that show things are used (animals and nature, food and drink, travel and places, objects, activities); faces,
people with skin tones, flags and symbols are left out. Both styles of one emoji share its concept, so a held-out
concept is held out in every style (:mod:`training.data.concepts`).

Each picture gets a caption and questions from templates (keyed by a hash of its id, so every run agrees):
"What is in this picture?", "What is this?", "Is there a X in the picture?" (yes, and no with another concept's
name) and "What colour is the X?" when one colour dominates (:func:`~training.data.concepts.colour_name`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from blip2.images import load_image

from .concepts import TEST_FRACTION, Concept, colour_name
from .fetch import require
from .pairs import PairDataset

__all__ = ["EMOJI_GROUPS", "EMOJI_STYLES", "EmojiPictures", "article", "naming_questions"]

EMOJI_STYLES = {"google": "emoji-google", "twitter": "emoji-twitter"}
EMOJI_GROUPS = ("animals-nature", "food-drink", "travel-places", "objects", "activities")
CAPTIONS = ("{a} {name}.", "A picture of {a_lower} {name}.", "An emoji of {a_lower} {name}.")


def article(name: str) -> str:
    return "An" if name[:1].lower() in "aeiou" else "A"


def naming_questions(name: str, other: str, key: str, colour: str | None = None) -> list[tuple[str, str]]:
    """The question/answer pairs of one named picture; ``other`` is a different concept for the "no" question."""
    rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
    a = article(name).lower()
    answer = f"{a.capitalize()} {name}."
    qa = [("What is in this picture?", answer), ("What is this?", answer),
          (f"Is there {a} {name} in the picture?", "yes"),
          (f"Is there {article(other).lower()} {other} in the picture?", "no")]
    if colour:
        qa.append((f"What colour is the {name}?", colour))
    rng.shuffle(qa)
    return qa


class EmojiPictures(PairDataset):
    """Emoji as named pictures. ``split``: ``train`` / ``test`` (held-out concepts) / ``all``; ``styles``: some of
    ``google``, ``twitter``. Items carry ``concept`` (name), ``accepted`` (names that count as naming it) and
    ``qa``. Raises :class:`~training.data.fetch.DataNotFetchedError` naming the fetch command when the data is
    missing."""

    source = "emoji"

    def __init__(self, split: str = "train", styles=("google", "twitter"), transform: Callable | None = None,
                 test_fraction: float = TEST_FRACTION, root=None, with_colour: bool = True):
        super().__init__(transform)
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")
        unknown = [s for s in styles if s not in EMOJI_STYLES]
        if unknown:
            raise ValueError(f"Unknown emoji styles {unknown}; known: {', '.join(EMOJI_STYLES)}")
        words = _openmoji_words(require("openmoji", root))
        concepts = {code: Concept(name, tags, test_fraction) for code, (name, tags) in words.items()}
        forbidden = {w for c in concepts.values() if c.held_out for w in c.accepted}
        splits = {code: c.split(forbidden) for code, c in concepts.items()}
        train_names = sorted({c.name for code, c in concepts.items() if splits[code] == "train"})
        self.split, self.with_colour = split, with_colour
        for style in styles:
            folder = require(EMOJI_STYLES[style], root)
            for entry in json.loads((folder / "emoji.json").read_text(encoding="utf-8")):
                code = _codepoints(entry["unified"])
                if code not in concepts or not entry.get(f"has_img_{style}", False):
                    continue
                concept, where = concepts[code], splits[code]
                if where == "excluded":  # a synonym of a held-out concept: used nowhere
                    self.skipped["split_excluded"] += 1
                    continue
                if split != "all" and where != split:
                    continue
                path = folder / "img" / style / "64" / entry["image"]
                if not path.is_file():
                    self.skipped["missing_file"] += 1
                    continue
                key = f"emoji/{style}/{code}"
                rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big"))
                template = CAPTIONS[rng.randrange(len(CAPTIONS))]
                caption = template.format(a=article(concept.name), a_lower=article(concept.name).lower(),
                                          name=concept.name)
                # The "no" question names a training concept: held-out names never appear in training text.
                other = concept.name
                while other == concept.name or set(Concept(other).words) & set(concept.words):
                    other = train_names[rng.randrange(len(train_names))]
                self._add(str(path), caption, key, source=f"emoji-{style}", flip_ok=False, concept=concept.name,
                          accepted=concept.accepted, other=other)

    def open_image(self, source):
        return load_image(source)

    def load(self, record):
        item = super().load(record)
        if isinstance(item, dict):  # the colour of the picture as drawn, before any augmentation
            colour = colour_name(item["image"]) if self.with_colour else None
            item["qa"] = naming_questions(item["concept"], item["other"], item["id"], colour)
        return item


def _openmoji_words(folder) -> dict[str, tuple[str, list[str]]]:
    """``{codepoints: (CLDR annotation, keyword tags)}`` for the emoji of :data:`EMOJI_GROUPS`, skin tones left out."""
    out = {}
    for entry in json.loads((folder / "data" / "openmoji.json").read_text(encoding="utf-8")):
        if entry.get("group") not in EMOJI_GROUPS or entry.get("skintone"):
            continue
        tags = [t.strip() for t in (entry.get("tags") or "").split(",") if t.strip()]
        out[_codepoints(entry["hexcode"])] = (entry["annotation"].replace("’", "'"), tags)
    return out


def _codepoints(hexcode: str) -> str:
    """Codepoints as one key in both files ("2615-FE0F" and "2615" are the same emoji)."""
    return "-".join(p for p in hexcode.lower().split("-") if p != "fe0f")
