"""Stage-1 training throughput: cached frozen-encoder features vs the naive loop that re-runs the encoder.

    python benchmarks/bench_stage1.py [--steps 6] [--batch-size 16]

Both loops train the same Q-Former (the tiny CI config's sizes by default, or --config) on the same procedural
scenes, side by side in one process; the cached loop's one-off feature extraction is reported separately.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blip2.encoders import build_encoder  # noqa: E402
from training.config import Stage1Config, load_config  # noqa: E402
from training.data import Scenes, collate_pairs  # noqa: E402
from training.features import CachedFeatureDataset, FeatureCache, collate_features  # noqa: E402
from training.qformer_init import build_qformer, load_qformer_tokenizer, tokenize  # noqa: E402


def train_steps(model, optimizer, batches, encoder, tokenizer, cached: bool) -> float:
    """Samples/s over the given batches (one optimizer step each)."""
    samples, t0 = 0, time.perf_counter()
    for step, batch in enumerate(batches):
        if cached:
            image_embeds = batch["image_embeds"].float()
        else:
            with torch.no_grad():
                image_embeds = encoder(batch["pixel_values"])
        tokens = tokenize(tokenizer, batch["texts"], 32)
        loss = model(image_embeds, tokens["input_ids"], tokens["attention_mask"], step=step).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        samples += image_embeds.shape[0]
    return samples / (time.perf_counter() - t0)


def eva_vit_b(folder: Path):
    """An EVA-style BLIP-2 vision tower of ViT-B/16 size with random weights (config + image processor only)."""
    from transformers import Blip2Config, Blip2VisionConfig, BlipImageProcessor

    vision = Blip2VisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=16)
    Blip2Config(vision_config=vision.to_dict()).save_pretrained(folder)
    BlipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    torch.manual_seed(0)
    return build_encoder({"type": "eva-vit", "source": str(folder)}, pretrained=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="training/configs/stage1_tiny.yaml")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder", default="efficientnet-lite0", choices=("efficientnet-lite0", "eva-vit-b"))
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [], Stage1Config)
    tokenizer = load_qformer_tokenizer(cfg.tokenizer)
    tower_dir = tempfile.TemporaryDirectory()
    if args.encoder == "eva-vit-b":
        encoder = eva_vit_b(Path(tower_dir.name)).freeze()
    else:
        encoder = build_encoder(cfg.encoder).freeze()
    n = args.steps * args.batch_size
    dataset = Scenes(n, seed=123)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache.for_encoder(tmp, encoder, tag="bench")
        t0 = time.perf_counter()
        cache.build(dataset, encoder, batch_size=args.batch_size, progress=False)
        extraction = time.perf_counter() - t0
        cached_set = CachedFeatureDataset(cache)
        cached_batches = [collate_features([cached_set[i] for i in range(s, s + args.batch_size)]) for s in range(0, n, args.batch_size)]
        results = {}
        for name in ("naive", "cached", "naive ", "cached "):  # alternate, twice, to even out machine noise
            torch.manual_seed(0)
            model = build_qformer(cfg.qformer, tokenizer, encoder.feature_dim, cfg.train.seed, cfg.loss).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if name.strip() == "naive":
                # Decoding and preprocessing are part of the naive loop's cost, as in real training.
                batches = (collate_pairs([dataset[i] for i in range(s, s + args.batch_size)], encoder) for s in range(0, n, args.batch_size))
            else:
                batches = iter(cached_batches)
            results.setdefault(name.strip(), []).append(train_steps(model, optimizer, batches, encoder, tokenizer, name.strip() == "cached"))
    naive, cached = max(results["naive"]), max(results["cached"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, config {args.config}, encoder "
          f"{args.encoder}, {args.steps} steps x batch {args.batch_size}")
    print(f"{'loop':10s} {'samples/s':>10s}")
    print(f"{'naive':10s} {naive:10.1f}   (encoder re-run every step)")
    print(f"{'cached':10s} {cached:10.1f}   (features precomputed once: {extraction:.1f} s for {n} images)")
    print(f"speed-up {cached / naive:.1f}x (goal >= 3x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"encoder": args.encoder, "naive": naive, "cached": cached,
                                               "speedup": cached / naive,
                                               "extraction_s": extraction, "images": n}, indent=2))


if __name__ == "__main__":
    main()
