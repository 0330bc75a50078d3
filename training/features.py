"""Precompute a frozen image encoder's features once, then train the Q-Former from the cache.

Stage-1 training never updates the image encoder, so its output per (un-augmented) image is a constant. On a CPU
the encoder is the slow part (EfficientNet-Lite0 ~13 ms per image on 2 cores); caching makes every later epoch
read features instead.

Layout: ``<folder>/<key>/`` holds ``features-00000.safetensors`` ... (tensor ``image_embeds``, ``(rows, N, D)``)
and ``index.json`` (encoder spec, image size, dtype, shape, every item's id/text/shard/row, skip counts). ``key``
hashes the encoder spec, the image size and ``tag`` (name the dataset there), so a different encoder or input size
can never reuse a stale cache. A build writes into ``<key>.tmp-<pid>`` and renames it into place only when
``index.json`` is complete; an interrupted build leaves a ``.tmp`` folder that is never read (and is removed by the
next build).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .data import collate_pairs

__all__ = ["CachedFeatureDataset", "FeatureCache", "cache_key", "cached_dataset", "collate_features",
           "weights_digest"]

FORMAT_VERSION = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cache_key(encoder_spec: dict, image_size: int | None, tag: str = "") -> str:
    payload = json.dumps({"encoder": encoder_spec, "image_size": image_size, "tag": tag,
                          "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class FeatureCache:
    """A folder of cached encoder features for one (encoder spec, image size, tag)."""

    def __init__(self, folder, encoder_spec: dict, image_size: int | None = None, tag: str = ""):
        self.root = os.fspath(folder)
        self.encoder_spec, self.image_size, self.tag = dict(encoder_spec), image_size, tag
        self.key = cache_key(self.encoder_spec, image_size, tag)
        self.path = os.path.join(self.root, self.key)

    @classmethod
    def for_encoder(cls, folder, encoder, tag: str = "") -> FeatureCache:
        return cls(folder, encoder.spec, getattr(encoder, "image_size", None), tag)

    @property
    def index_path(self) -> str:
        return os.path.join(self.path, "index.json")

    def is_complete(self) -> bool:
        """True only for a finished build of this exact key (checked in the index too, not just the folder name)."""
        try:
            with open(self.index_path) as fh:
                index = json.load(fh)
        except (OSError, json.JSONDecodeError):
            return False
        return index.get("key") == self.key and index.get("complete") is True and all(
            os.path.isfile(os.path.join(self.path, s)) for s in index.get("shards", []))

    def index(self) -> dict:
        with open(self.index_path) as fh:
            return json.load(fh)

    def build(self, dataset, encoder, batch_size: int = 32, dtype: torch.dtype = torch.float16,
              num_workers: int = 0, shard_rows: int = 2048, overwrite: bool = False, progress: bool = True,
              max_items: int | None = None) -> dict:
        """Encode every item of ``dataset`` (map-style or iterable, no augmentation) and write the cache.

        Returns the index's stats: ``count``, ``skipped`` (by reason), ``seconds``, ``images_per_s``. An existing
        complete cache is reused unless ``overwrite``. ``max_items`` stops early (for tests and smoke runs; the
        result is still a complete cache of those items)."""
        if self.is_complete() and not overwrite:
            return self.index()["stats"]
        if getattr(dataset, "transform", None) is not None:
            raise ValueError("Build features from a dataset without a transform: cached features must not be "
                             "augmented (construct the dataset with transform=None).")
        spec = getattr(encoder, "spec", None)
        if spec is not None and spec != self.encoder_spec:
            raise ValueError(f"Encoder spec {spec} differs from this cache's {self.encoder_spec}.")
        os.makedirs(self.root, exist_ok=True)
        self._remove_stale_tmp()
        tmp = f"{self.path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

        from safetensors.torch import save_file
        from tqdm.auto import tqdm

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=functools.partial(collate_pairs, encoder=encoder))
        total = len(dataset) if not isinstance(dataset, IterableDataset) else None
        if max_items is not None and total is not None:
            total = min(total, max_items)
        device = getattr(encoder, "device", torch.device("cpu"))
        enc_dtype = getattr(encoder, "dtype", torch.float32)
        items, shards, pending, skipped, seen = [], [], [], Counter(), set()
        shape = None
        pending_rows = 0
        start = time.perf_counter()

        def flush():
            nonlocal pending, pending_rows
            if not pending:
                return
            name = f"features-{len(shards):05d}.safetensors"
            save_file({"image_embeds": torch.cat(pending).contiguous()}, os.path.join(tmp, name))
            shards.append(name)
            pending, pending_rows = [], 0

        bar = tqdm(total=total, unit="img", disable=not progress, desc=f"features {self.key[:8]}")
        try:
            with torch.inference_mode():
                for batch in loader:
                    skipped.update(batch["skipped"])
                    if batch["pixel_values"] is None:
                        continue
                    keep = []
                    for row, id_ in enumerate(batch["ids"]):
                        if id_ in seen:
                            skipped["duplicate_id"] += 1
                        else:
                            seen.add(id_)
                            keep.append(row)
                    if max_items is not None:
                        keep = keep[:max(0, max_items - len(items))]
                    if not keep:
                        if max_items is not None and len(items) >= max_items:
                            break
                        continue
                    pixels = batch["pixel_values"][keep].to(device=device, dtype=enc_dtype)
                    feats = encoder(pixels).to("cpu", dtype)  # (B, N, D)
                    shape = list(feats.shape[1:])
                    for j, row in enumerate(keep):
                        if pending_rows >= shard_rows:
                            flush()
                        pending.append(feats[j:j + 1])
                        item = {"id": batch["ids"][row], "text": batch["texts"][row],
                                "source": batch["sources"][row], "shard": len(shards), "row": pending_rows}
                        if batch.get("qa") and batch["qa"][row]:
                            item["qa"] = batch["qa"][row]  # question/answer pairs for VQA training
                        items.append(item)
                        pending_rows += 1
                    bar.update(len(keep))
                    bar.set_postfix(img_s=f"{len(items) / max(1e-9, time.perf_counter() - start):.1f}",
                                    skipped=sum(skipped.values()))
                    if max_items is not None and len(items) >= max_items:
                        break
            flush()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        stats = {"count": len(items), "skipped": dict(skipped), "seconds": round(seconds, 3),
                 "images_per_s": round(len(items) / max(seconds, 1e-9), 2)}
        index = {"key": self.key, "format": FORMAT_VERSION, "encoder_spec": self.encoder_spec,
                 "image_size": self.image_size, "tag": self.tag, "dtype": str(dtype).replace("torch.", ""),
                 "shape": shape, "shards": [s for s in shards], "items": items, "stats": stats,
                 "complete": True}
        with open(os.path.join(tmp, "index.json.part"), "w") as fh:
            json.dump(index, fh)
        os.replace(os.path.join(tmp, "index.json.part"), os.path.join(tmp, "index.json"))
        # Swap the finished folder in; an older complete build of the same key is replaced.
        if os.path.exists(self.path):
            old = f"{self.path}.old-{os.getpid()}"
            os.replace(self.path, old)
            os.replace(tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, self.path)
        return stats

    def _remove_stale_tmp(self) -> None:
        prefix = os.path.basename(self.path) + "."
        for name in os.listdir(self.root):
            if name.startswith(prefix) and (".tmp-" in name or ".old-" in name):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def dataset(self) -> CachedFeatureDataset:
        return CachedFeatureDataset(self)


class CachedFeatureDataset(Dataset):
    """Items ``{"image_embeds": (N, D) tensor in the cached dtype, "text": str, "id": str, "source": str}`` from a
    complete :class:`FeatureCache` (or its folder ``<root>/<key>``). Shards are memory-mapped lazily per process,
    so the dataset is cheap to send to DataLoader workers. ``features(id)`` looks an image up by id (e.g. for
    easy-vqa questions, whose ``image_id`` matches the cached ids)."""

    def __init__(self, cache: FeatureCache | str | os.PathLike):
        if isinstance(cache, FeatureCache):
            if not cache.is_complete():
                raise FileNotFoundError(f"No complete feature cache at {cache.path}; run FeatureCache.build first.")
            self.path = cache.path
        else:
            self.path = os.fspath(cache)
        with open(os.path.join(self.path, "index.json")) as fh:
            self.index = json.load(fh)
        if not self.index.get("complete"):
            raise FileNotFoundError(f"Feature cache at {self.path} is incomplete.")
        self.items = self.index["items"]
        self.by_id = {it["id"]: n for n, it in enumerate(self.items)}
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # safetensors handles do not pickle; each worker opens its own
        return state

    def _tensor(self, shard: int, row: int) -> torch.Tensor:
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            handle = safe_open(os.path.join(self.path, self.index["shards"][shard]), framework="pt")
            self._handles[shard] = handle
        return handle.get_slice("image_embeds")[row:row + 1][0]

    def __getitem__(self, index: int) -> dict:
        it = self.items[index]
        return {"image_embeds": self._tensor(it["shard"], it["row"]), "text": it["text"], "id": it["id"],
                "source": it.get("source", ""), "qa": it.get("qa", [])}

    def features(self, id_: str) -> torch.Tensor:
        return self[self.by_id[id_]]["image_embeds"]

    def __iter__(self) -> Iterator[dict]:
        for n in range(len(self)):
            yield self[n]


def collate_features(batch) -> dict:
    """``{"image_embeds": (B, N, D), "texts": [...], "ids": [...]}`` for a DataLoader over CachedFeatureDataset."""
    return {"image_embeds": torch.stack([b["image_embeds"] for b in batch]),
            "texts": [b["text"] for b in batch], "ids": [b["id"] for b in batch]}


def weights_digest(state_dict: dict) -> str:
    """A short hash of a state dict's names, dtypes, shapes and values: tells fine-tuned weights of one encoder spec
    apart (the spec names only the architecture and its pretrained weights)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_dataset(dataset, encoder, data_cfg, default_dir, accelerator,
                   encoder_weights: str | None = None) -> tuple[CachedFeatureDataset, dict]:
    """The training runs' cache step: the main process builds the cache of ``dataset`` (keyed by the encoder, the
    config's data sources and, for an encoder whose weights were fine-tuned, their :func:`weights_digest` passed as
    ``encoder_weights``) unless a complete one exists, the others wait; returns the cached dataset and what the
    build skipped (by reason). ``data_cfg``: a run config's ``data`` section (sources, cache_dir, feature_dtype)."""
    tag = json.dumps(data_cfg.sources, sort_keys=True)
    if encoder_weights:
        tag += f"|weights:{encoder_weights}"
    cache = FeatureCache.for_encoder(data_cfg.cache_dir or default_dir, encoder, tag=tag)
    skipped: dict = {}
    if accelerator.is_main_process and not cache.is_complete():
        skipped = cache.build(dataset, encoder, dtype=getattr(torch, data_cfg.feature_dtype)).get("skipped", {})
    accelerator.wait_for_everyone()
    return CachedFeatureDataset(cache), skipped
