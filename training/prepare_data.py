"""Inspect the training data and precompute encoder features.

    python -m training.prepare_data stats                      # items, skips and example captions per source
    python -m training.prepare_data features --source tuxpaint --split train --cache runs/features
    python -m training.prepare_data features --source manifest:data/pairs.jsonl --encoder lite1 --workers 2

Sources: ``tuxpaint``, ``easy-vqa``, ``scenes:N``, ``manifest:PATH``, ``shards:PATTERN``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

from . import data as D


def open_source(name: str, split: str = "train", scenes_seed: int | None = None):
    kind, _, arg = name.partition(":")
    if kind == "tuxpaint":
        return D.TuxPaintStamps(arg or D.TUXPAINT_STAMPS, split=split)
    if kind == "easy-vqa":
        return D.EasyVQA(split)
    if kind == "scenes":
        # Train and test scenes come from different seeds, so they never coincide.
        seed = scenes_seed if scenes_seed is not None else (0 if split == "train" else 1)
        return D.Scenes(int(arg or 1000), seed=seed)
    if kind == "manifest":
        return D.ManifestDataset(arg)
    if kind == "shards":
        return D.WebDatasetShards(arg, rank=0, world_size=1)
    raise SystemExit(f"unknown source {name!r}; use tuxpaint, easy-vqa, scenes:N, manifest:PATH or shards:PATTERN")


def cmd_stats(args) -> None:
    for name in args.sources:
        for split in ("train", "test"):
            try:
                ds = open_source(name, split)
            except (ImportError, FileNotFoundError) as err:
                print(f"{name} [{split}]: unavailable ({err})")
                continue
            n = len(ds) if hasattr(ds, "__len__") else "?"
            print(f"{name} [{split}]: {n} items, skipped {dict(ds.skipped)}")
            if hasattr(ds, "__len__") and len(ds):
                for i in random.Random(0).sample(range(len(ds)), min(args.examples, len(ds))):
                    item = ds[i]
                    if not isinstance(item, D.Skipped):
                        print(f"    {item['id']}: {item['text']}")


def cmd_features(args) -> None:
    import torch

    from blip2.encoders import build_encoder

    from .features import FeatureCache

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = {"type": "efficientnet-lite", "variant": args.encoder}
    encoder = build_encoder(spec).freeze()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder.to(device)
    ds = open_source(args.source, args.split)
    cache = FeatureCache.for_encoder(args.cache, encoder, tag=f"{args.source}:{args.split}")
    start = time.perf_counter()
    stats = cache.build(ds, encoder, batch_size=args.batch_size, num_workers=args.workers, overwrite=args.overwrite,
                        max_items=args.max_items)
    print(f"{cache.path}: {stats} ({time.perf_counter() - start:.1f} s on {device})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.prepare_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="items, skips and example captions")
    stats.add_argument("sources", nargs="*", default=["tuxpaint", "easy-vqa", "scenes:1000"])
    stats.add_argument("--examples", type=int, default=5)
    feats = sub.add_parser("features", help="precompute frozen encoder features")
    feats.add_argument("--source", required=True)
    feats.add_argument("--split", default="train", choices=["train", "test", "all"])
    feats.add_argument("--cache", required=True, help="cache folder")
    feats.add_argument("--encoder", default="lite0", choices=["lite0", "lite1", "lite2"])
    feats.add_argument("--batch-size", type=int, default=32)
    feats.add_argument("--workers", type=int, default=0)
    feats.add_argument("--threads", type=int, default=0)
    feats.add_argument("--device", default=None)
    feats.add_argument("--max-items", type=int, default=None)
    feats.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    {"stats": cmd_stats, "features": cmd_features}[args.command](args)


if __name__ == "__main__":
    main(sys.argv[1:])
