"""Image-text pairs for stage-1 training: datasets, augmentation and collation.

Every dataset yields items ``{"image": PIL RGB, "text": str, "id": str, "source": str}`` (some add ``"qa"``,
``"flip_ok"``, ``"crop_ok"``). Sources:

- ``ManifestDataset(path)``      JSONL or CSV of ``image,caption`` (paths relative to the manifest's folder)
- ``WebDatasetShards(shards)``   img2dataset tar shards, streamed (split across DataLoader workers and ranks)
- ``TuxPaintStamps(split=...)``  Debian ``tuxpaint-stamps-default``: stamp PNG + first line of its .txt
- ``EasyVQA(split)``             easy-vqa images with a caption derived from their QA; ``EasyVQAQuestions(split)``
- ``Scenes(n, seed)``            procedural shapes (training/scenes.py)
- ``ConcatPairs([...])``         several map-style datasets as one

Bad data is skipped and counted, never fatal. Map-style datasets drop what they can see cheaply when they are
built (missing files, empty captions, SVG-only stamps) and count it in ``dataset.skipped`` (a ``Counter`` by
reason). Images are decoded only when fetched, with ``blip2.images.load_image``; an image that fails to decode
makes ``__getitem__`` return a :class:`Skipped` marker instead of an item. ``collate_pairs`` drops markers and
reports them in the batch's ``"skipped"`` Counter, so the counts reach the main process even from DataLoader
workers (a worker's own ``dataset.skipped`` lives in the worker). We chose this over decoding everything up front:
a pre-scan of a large set costs as much as an epoch. ``WebDatasetShards`` skips inline and yields a
``Skipped`` marker too, for the same reason.

Augmentation (:func:`train_transform`) is the paper's random resized crop (scale 0.5-1) + horizontal flip. A flip
turns "on the left" into a lie, so flipping swaps left and right in the text (:func:`swap_left_right`), and items
marked ``flip_ok=False`` (stamps whose .dat says ``nomirror``: coins, road signs with writing) are never flipped.
Items marked ``crop_ok=False`` (scenes: a crop could cut a counted shape out) are only resized.
"""

from __future__ import annotations

import bisect
import csv
import glob
import hashlib
import json
import math
import os
import re
import tarfile
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset, IterableDataset, get_worker_info

from blip2.images import InvalidImageError, load_image

from .scenes import make_scene

__all__ = [
    "ConcatPairs",
    "EasyVQA",
    "EasyVQAQuestions",
    "ManifestDataset",
    "PairDataset",
    "PairTransform",
    "Scenes",
    "Skipped",
    "TuxPaintStamps",
    "WebDatasetShards",
    "collate_pairs",
    "held_out",
    "iter_items",
    "stamp_caption",
    "swap_left_right",
    "train_transform",
]

TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


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


def _load_source(source):
    if isinstance(source, _SvgSource):
        try:
            source = source.render()
        except Exception as err:  # cairosvg raises many types on bad SVG
            raise InvalidImageError(f"Could not render SVG {source.path}: {err}") from err
    return load_image(source)


# ---------------------------------------------------------------------------------------------------------------
# Map-style datasets over (image source, caption) records


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

    def load(self, record: dict) -> dict | Skipped:
        try:
            image = _load_source(record["image"])
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


class ManifestDataset(PairDataset):
    """A JSONL (``{"image": path, "caption": text}`` per line; ``"text"`` also accepted, optional ``"id"``) or CSV
    (header with ``image`` and ``caption``/``text`` columns) manifest. Relative image paths are relative to the
    manifest's folder. Malformed lines, missing files and empty captions are skipped and counted here."""

    source = "manifest"

    def __init__(self, path, transform: Callable | None = None, source: str | None = None):
        super().__init__(transform)
        self.path = os.fspath(path)
        self.source = source or os.path.splitext(os.path.basename(self.path))[0]
        base = os.path.dirname(os.path.abspath(self.path))
        for line_no, row in self._rows():
            if row is None or not row.get("image"):
                self.skipped["bad_record"] += 1
                continue
            image = os.path.join(base, os.path.expanduser(str(row["image"])))
            if not os.path.isfile(image):
                self.skipped["missing_file"] += 1
                continue
            caption = row.get("caption", row.get("text"))
            self._add(image, caption, str(row.get("id") or f"{self.source}:{line_no}"), source=self.source)

    def _rows(self) -> Iterator[tuple[int, dict | None]]:
        if self.path.lower().endswith((".csv", ".tsv")):
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if self.path.lower().endswith(".tsv") else ",")
                for line_no, row in enumerate(reader, start=2):
                    yield line_no, row
            return
        with open(self.path, encoding="utf-8-sig") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                yield line_no, row if isinstance(row, dict) else None


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

    def _in_split(self, key: str, test_fraction: float, seed: int) -> bool:
        return self.split == "all" or held_out(key, test_fraction, seed) == (self.split == "test")

    def __init__(self, root: str = TUXPAINT_STAMPS, split: str = "train", test_fraction: float = 0.1, seed: int = 0,
                 transform: Callable | None = None, svg_size: int = 512, split_by: str = "path"):
        super().__init__(transform)
        _check_split(split)
        if split_by not in ("path", "caption"):
            raise ValueError("split_by must be 'path' or 'caption'")
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
            self._add(image, caption, f"tuxpaint/{key}", source=self.source, flip_ok=flip_ok)




# ---------------------------------------------------------------------------------------------------------------
# easy-vqa


def _easy_vqa_split(split: str):
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError("easy-vqa is not installed: `pip install --no-deps easy-vqa==1.0`") from err
    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    if split == "test":
        return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    raise ValueError(f"easy-vqa split must be 'train' or 'test', not {split!r}")


_EV_SHAPES = ("circle", "rectangle", "triangle")
_EV_COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")


def easy_vqa_facts(qa: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """What a set of easy-vqa questions says about its image: ``{"shape": {...}, "color": {...}}``.

    easy-vqa pictures hold one shape. Its questions name it directly ("what shape is in the image?" -> circle,
    "what color is the rectangle?" -> blue, "what is the blue shape?" -> rectangle) or by yes/no, possibly negated
    ("is there not a red shape?" -> no means red). More than one value for a field means the labels conflict."""
    facts: dict[str, set[str]] = {"shape": set(), "color": set()}
    absent: set[str] = set()
    for question, answer in qa:
        q = question.lower().strip().rstrip("?")
        words = set(re.findall(r"[a-z]+", q))
        named_shapes = [s for s in _EV_SHAPES if s in words]
        named_colors = [c for c in _EV_COLORS if c in words]
        if answer in _EV_SHAPES:
            facts["shape"].add(answer)
            facts["color"].update(named_colors)  # "what is the blue shape?" -> rectangle
        elif answer in _EV_COLORS:
            facts["color"].add(answer)
            facts["shape"].update(named_shapes)  # "what color is the triangle?" -> blue
        elif answer in ("yes", "no"):
            negated = bool(re.search(r"\b(not|no)\b", q.replace("is no", "is not")))
            present = (answer == "yes") != negated
            if present:
                facts["shape"].update(named_shapes)
                facts["color"].update(named_colors)
            elif len(named_shapes) + len(named_colors) == 1:  # "is there a red circle?" -> no says little
                absent.update(named_shapes + named_colors)
    # By elimination: two shapes (or seven colours) absent leave the last one.
    for field, values in (("shape", _EV_SHAPES), ("color", _EV_COLORS)):
        left = [v for v in values if v not in absent]
        if not facts[field] and len(left) == 1:
            facts[field].add(left[0])
    return facts


class EasyVQA(PairDataset):
    """easy-vqa images (64x64, one shape) with captions like "a blue circle." derived from their questions.

    ``qa`` (all the image's question/answer pairs) is kept on each item for VQA later. Images whose questions do
    name only the shape or only the colour get a partial caption ("a circle.", "a brown shape."; counted in
    ``partial``); those that name neither, or contradict each other, are skipped (``underdetermined`` /
    ``conflicting_labels``). Train and test come from easy-vqa's own folders and are never mixed."""

    source = "easy-vqa"

    def __init__(self, split: str = "train", transform: Callable | None = None):
        super().__init__(transform)
        self.split, self.partial = split, 0
        (questions, answers, image_ids), paths = _easy_vqa_split(split)
        per_image: dict[int, list[tuple[str, str]]] = {}
        for q, a, i in zip(questions, answers, image_ids):
            per_image.setdefault(i, []).append((q, a))
        for image_id in sorted(paths):
            qa = per_image.get(image_id, [])
            facts = easy_vqa_facts(qa)
            if len(facts["shape"]) > 1 or len(facts["color"]) > 1:
                self.skipped["conflicting_labels"] += 1
                continue
            shape = next(iter(facts["shape"]), None)
            color = next(iter(facts["color"]), None)
            if shape is None and color is None:
                self.skipped["underdetermined"] += 1
                continue
            if shape is None or color is None:
                self.partial += 1  # still a true caption: "a circle." / "a brown shape."
            caption = f"a {color + ' ' if color else ''}{shape or 'shape'}."
            self._add(paths[image_id], caption, f"easy-vqa/{split}/{image_id}", source=self.source, qa=qa)


class EasyVQAQuestions(Dataset):
    """easy-vqa questions: items ``{"image", "question", "answer", "id", "image_id"}`` (``id`` is per question,
    ``image_id`` matches :class:`EasyVQA`'s ids, for cached features)."""

    def __init__(self, split: str = "train", transform: Callable | None = None):
        (questions, answers, image_ids), paths = _easy_vqa_split(split)
        self.split, self.transform = split, transform
        self.skipped: Counter = Counter()
        self.records = []
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids)):
            if i not in paths:
                self.skipped["missing_file"] += 1
                continue
            self.records.append({"path": paths[i], "question": q, "answer": a, "id": f"easy-vqa/{split}/q{n}",
                                 "image_id": f"easy-vqa/{split}/{i}"})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | Skipped:
        record = self.records[index]
        try:
            image = load_image(record["path"])
        except InvalidImageError as err:
            self.skipped["broken_image"] += 1
            return Skipped("broken_image", record["id"], str(err))
        item = {k: v for k, v in record.items() if k != "path"}
        item["image"], item["source"] = image, "easy-vqa"
        return self.transform(item) if self.transform else item


# ---------------------------------------------------------------------------------------------------------------
# Procedural scenes


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene ``index`` in the set with ``seed``; different sets do not share scenes."""
    return int.from_bytes(hashlib.sha256(f"scenes:{seed}:{index}".encode()).digest()[:8], "big")


class Scenes(Dataset):
    """``n`` procedural scenes (training/scenes.py), scene i drawn from ``scene_seed(seed, i)``; use another
    ``seed`` for a held-out set. Items carry ``qa`` and ``crop_ok=False`` (a crop could cut counted shapes out)."""

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


# ---------------------------------------------------------------------------------------------------------------
# WebDataset-style tar shards (img2dataset layout)


def expand_shards(pattern_or_list) -> list[str]:
    """A list of paths, a brace pattern (``data/{00000..00009}.tar``), a glob, or a comma-separated mix."""
    if isinstance(pattern_or_list, (list, tuple)):
        out: list[str] = []
        for p in pattern_or_list:
            out.extend(expand_shards(p))
        return out
    pattern = os.fspath(pattern_or_list)
    if "," in pattern and "{" not in pattern:
        return expand_shards(pattern.split(","))
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        return [p for i in range(int(lo), int(hi) + 1)
                for p in expand_shards(pattern[:match.start()] + str(i).zfill(width) + pattern[match.end():])]
    if any(ch in pattern for ch in "*?["):
        return sorted(glob.glob(pattern))
    return [pattern]


def _distributed_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WebDatasetShards(IterableDataset):
    """Stream ``(key.jpg|png|webp, key.txt, key.json)`` samples from tar shards with ``tarfile``.

    Work is split across ``world_size`` ranks x DataLoader workers: slot = ``rank * num_workers + worker_id``.
    With at least as many shards as slots, each slot reads whole shards (``shards[slot::slots]``); with fewer, every
    slot reads every shard and keeps samples ``i % slots == slot`` so that no slot idles and nothing repeats.
    ``set_epoch(e)`` reshuffles the shard order (same order on every rank) when ``shuffle=True``.
    Caption: ``.txt``, else the ``.json``'s ``caption``. Bad samples / unreadable shards are counted in
    ``skipped`` and yielded as :class:`Skipped` so ``collate_pairs`` reports them."""

    source = "webdataset"

    def __init__(self, pattern_or_list, rank: int | None = None, world_size: int | None = None,
                 shuffle: bool = False, seed: int = 0, transform: Callable | None = None,
                 split_by: str = "auto"):
        self.shards = expand_shards(pattern_or_list)
        if not self.shards:
            raise FileNotFoundError(f"No tar shards match {pattern_or_list!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (then torch.distributed decides)")
        if rank is None:
            rank, world_size = _distributed_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if split_by not in ("auto", "shard", "sample"):
            raise ValueError("split_by must be 'auto', 'shard' or 'sample'")
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed
        self.transform, self.split_by, self.epoch = transform, split_by, 0
        self.skipped: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict | Skipped]:
        slot, slots = self._slot()
        shards = list(self.shards)
        if self.shuffle:
            import random

            random.Random(f"{self.seed}:{self.epoch}").shuffle(shards)
        by_shard = self.split_by == "shard" or (self.split_by == "auto" and len(shards) >= slots)
        if by_shard:
            mine, keep = shards[slot::slots], None
        else:
            mine, keep = shards, (slot, slots)
        counter = 0
        for shard in mine:
            for sample in self._samples(shard):
                if keep is not None:
                    counter += 1
                    if (counter - 1) % keep[1] != keep[0]:
                        continue
                item = self._item(shard, sample)
                if self.transform is not None and not isinstance(item, Skipped):
                    item = self.transform(item)
                yield item

    def _samples(self, shard: str) -> Iterator[dict]:
        """Group consecutive tar members by key (path up to the first dot of the file name)."""
        current_key, current = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, name = os.path.split(member.name)
                    if name.startswith(".") or "." not in name:
                        continue
                    stem, ext = name.split(".", 1)
                    key = f"{folder}/{stem}" if folder else stem
                    if key != current_key:
                        if current:
                            yield current
                        current_key, current = key, {"__key__": key}
                    data = tar.extractfile(member)
                    current[ext.lower()] = data.read() if data is not None else b""
        except (tarfile.TarError, OSError, EOFError) as err:
            # A truncated/corrupt shard: keep what was read before the damage, count the shard.
            self.skipped["bad_shard"] += 1
            if current:
                current["__truncated__"] = str(err)
        if current:
            yield current

    def _item(self, shard: str, sample: dict) -> dict | Skipped:
        id_ = f"{os.path.splitext(os.path.basename(shard))[0]}/{sample['__key__']}"
        if "__truncated__" in sample:
            self.skipped["broken_image"] += 1
            return Skipped("broken_image", id_, sample["__truncated__"])
        image_bytes = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image_bytes is None:
            self.skipped["no_image"] += 1
            return Skipped("no_image", id_)
        text = sample["txt"].decode("utf-8", "replace") if "txt" in sample else ""
        if not text.strip() and "json" in sample:
            try:
                meta = json.loads(sample["json"])
                text = meta.get("caption") or "" if isinstance(meta, dict) else ""
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass
        text = clean_text(text)
        if not text:
            self.skipped["empty_caption"] += 1
            return Skipped("empty_caption", id_)
        try:
            image = load_image(image_bytes)
        except InvalidImageError as err:
            self.skipped["broken_image"] += 1
            return Skipped("broken_image", id_, str(err))
        return {"image": image, "text": text, "id": id_, "source": self.source}


# ---------------------------------------------------------------------------------------------------------------
# Augmentation


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


# ---------------------------------------------------------------------------------------------------------------
# Collation


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


def iter_items(dataset) -> Iterator[dict]:
    """Every usable item of a map-style or iterable dataset, in order, without Skipped markers."""
    source = dataset if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    for item in source:
        if item is not None and not isinstance(item, Skipped):
            yield item
