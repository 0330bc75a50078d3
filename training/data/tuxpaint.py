"""Tux Paint stamps: each stamp's picture with the English line of its description."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from blip2.images import InvalidImageError, load_image

from .concepts import Concept
from .pairs import PairDataset, clean_text, held_out

__all__ = ["TUXPAINT_STAMPS", "TuxPaintStamps", "stamp_caption"]

TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"


def _check_split(split: str) -> None:
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', not {split!r}")


class _SvgSource:
    """An SVG rendered to PNG bytes on load (only used when cairosvg is installed)."""

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size

    def render(self) -> bytes:
        import cairosvg

        return cairosvg.svg2png(url=self.path, output_width=self.size)


def stamp_caption(text: str) -> str:
    """The English description of a Tux Paint stamp from its .txt contents.

    The first line is English; the other lines are translations as ``xx.utf8=...`` (some files have only those,
    or blank lines first). Typographic quotes and dashes are normalised, a leading dash (``"- Because a brain is
    a terrible thing to waste..."``) dropped. Returns "" when there is no English line."""
    for line in text.lstrip("\ufeff").splitlines():
        line = line.strip()
        if not line:
            continue
        if re.match(r"^[A-Za-z]{2,3}(_[A-Z]{2})?(@\w+)?\.utf-?8\s*=", line):
            # A translation. "en.utf8=" / "en_GB.utf8=" are English, others are not.
            if re.match(r"^en(_[A-Z]{2})?\.utf-?8\s*=", line):
                return clean_text(line.split("=", 1)[1]).lstrip("-– ").strip()
            continue
        return clean_text(line).lstrip("-– ").strip()
    return ""


class TuxPaintStamps(PairDataset):
    """Tux Paint stamps (``apt-get install tuxpaint-stamps-default``): each stamp's PNG, composited on white by
    ``load_image``, captioned with the first line of its .txt.

    A stamp is the stem ``<folder>/<name>``. ``<name>_mirror.png`` / ``_flip.png`` are Tux Paint's pre-drawn
    mirrored versions of another stamp, not stamps of their own: left out. Stamps that exist only as SVG are
    skipped (``skipped["svg_only"]``) unless ``cairosvg`` is installed. A stamp whose ``.dat`` says ``nomirror``
    (writing, coins) gets ``flip_ok=False``. The held-out split hashes the path relative to ``root``
    (:func:`held_out`), so a held-out stamp stays held out across runs and package versions. Near-duplicates
    share a caption ("The letter W." for ``W_filled`` and ``W_outline``, both chess knights); ``split_by="caption"``
    hashes the caption instead, keeping such groups on one side (stable as long as the caption is).
    """

    source = "tuxpaint"

    def open_image(self, source):
        if isinstance(source, _SvgSource):
            try:
                source = source.render()
            except Exception as err:  # cairosvg raises many types on bad SVG
                raise InvalidImageError(f"Could not render SVG {source.path}: {err}") from err
        return load_image(source)

    def _in_split(self, key: str, test_fraction: float, seed: int) -> bool:
        return self.split == "all" or held_out(key, test_fraction, seed) == (self.split == "test")

    def __init__(self, root: str = TUXPAINT_STAMPS, split: str = "train", test_fraction: float = 0.1, seed: int = 0,
                 transform: Callable | None = None, svg_size: int = 512, split_by: str = "path"):
        super().__init__(transform)
        _check_split(split)
        if split_by not in ("path", "caption", "concept"):
            raise ValueError("split_by must be 'path', 'caption' or 'concept'")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"No Tux Paint stamps at {root}; install them with `apt-get install tuxpaint-stamps-default`."
            )
        self.root, self.split, self.svg_size = root, split, svg_size
        try:
            import cairosvg  # noqa: F401

            svg_ok = True
        except Exception:  # ImportError, or OSError when the cairo library is missing
            svg_ok = False
        stems: dict[str, dict[str, str]] = {}
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                stem, ext = os.path.splitext(name)
                stems.setdefault(os.path.join(folder, stem), {})[ext.lower()] = os.path.join(folder, name)
        for stem in sorted(stems):
            files = stems[stem]
            if ".png" not in files and ".svg" not in files:
                continue
            if re.search(r"_(mirror|flip)$", stem):
                continue
            key = os.path.relpath(stem, root).replace(os.sep, "/")
            caption = ""
            if ".txt" in files:
                try:
                    with open(files[".txt"], encoding="utf-8", errors="replace") as fh:
                        caption = stamp_caption(fh.read())
                except OSError:
                    pass
            # Uncaptioned stamps fall back to the path, so each skip is counted in exactly one split.
            extra = {}
            if split_by == "concept":
                # Held out with every other picture of the same concept words (training.data.concepts); a stamp
                # whose caption names no concept ("Because a brain is ...") is used nowhere.
                concept = Concept(caption)
                where = concept.split() if caption else "excluded"
                if where == "excluded" or (self.split != "all" and where != self.split):
                    continue
                extra = {"concept": caption.rstrip("."), "accepted": concept.accepted,
                         "qa": [("What is in this picture?", caption), ("What is this?", caption)]}
            else:
                split_key = caption.lower() if split_by == "caption" and caption else key
                if not self._in_split(split_key, test_fraction, seed):
                    continue
            if ".png" in files:
                image = files[".png"]
            elif svg_ok:
                image = _SvgSource(files[".svg"], svg_size)
            else:
                self.skipped["svg_only"] += 1
                continue
            if ".txt" not in files:
                self.skipped["no_caption"] += 1
                continue
            flip_ok = True
            if ".dat" in files:
                try:
                    with open(files[".dat"], encoding="utf-8", errors="replace") as fh:
                        flip_ok = "nomirror" not in fh.read().split()
                except OSError:
                    pass
            self._add(image, caption, f"tuxpaint/{key}", source=self.source, flip_ok=flip_ok, **extra)
