"""img2dataset-style tar shards, streamed and split across DataLoader workers and ranks."""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from blip2.images import InvalidImageError, load_image

from .pairs import Skipped, clean_text

__all__ = ["IMAGE_EXTENSIONS", "WebDatasetShards", "expand_shards"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


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
