"""Stage 1 recipe: Q-Former representation learning on a frozen image encoder (``python -m training stage1``).

    setup (config, tokenizer, frozen encoder, data, model) -> fit (engine) -> export (stage-1 checkpoint folder)

The parts live in their own modules: the Q-Former and its three losses (``training.qformer``), where it starts
(``training.qformer_init``), the checkpoint folder (``training.stage1_checkpoint``), data (``training.data``) and
the loop (``training.engine``). Retrieval fine-tuning (``finetune --task retrieval``) is this recipe started from a
stage-1 checkpoint (``qformer.init: checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from blip2.encoders import build_encoder

from .config import ConfigError, Stage1Config, dump_config
from .data import ConcatPairs, collate_pairs, replace_broken, train_transform
from .data.sources import build_source
from .engine import LoopConfig, fit, make_accelerator
from .features import cached_dataset, collate_features
from .qformer_init import build_qformer, load_qformer_tokenizer, tokenize
from .sampling import repeat_by_source
from .stage1_checkpoint import save_stage1

EXPORT_DIR = "stage1"


def image_key(item_id: str) -> int:
    """A stable 63-bit id per image (same on every process, unlike hash()): ITC/ITM never treat two captions of
    one image as negatives of each other."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") >> 1


def run(cfg: Stage1Config, resume: bool = False) -> dict:
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
    tokenizer = load_qformer_tokenizer(cfg.tokenizer)
    encoder = build_encoder(cfg.encoder).freeze()
    d = cfg.data
    if d.augment and d.cache_features:
        raise ConfigError("data.cache_features needs data.augment: false (cached features are of un-augmented images).")
    transform = train_transform(getattr(encoder, "image_size", 224)) if d.augment else None
    sources = [build_source(s, transform) for s in d.sources]
    if any(isinstance(s, IterableDataset) for s in sources) and (len(sources) > 1 or d.cache_features):
        # The feature cache and ConcatPairs index their items; a stream has no index.
        raise ConfigError("A shards source streams: make it the only source, with data.cache_features: false.")
    dataset = sources[0] if len(sources) == 1 else ConcatPairs(sources)
    max_len = cfg.qformer.max_text_length
    skipped: Counter = Counter(getattr(dataset, "skipped", {}))

    if d.repeat and not d.cache_features:
        raise ConfigError("data.repeat needs data.cache_features: true (it repeats cached items by their source).")
    if d.cache_features:
        train_set, build_skipped = cached_dataset(dataset, encoder, d, output_dir / "features", accelerator)
        skipped.update(build_skipped)
        if d.repeat:
            train_set = repeat_by_source(train_set, d.repeat)

        def collate(batch):
            out = collate_features(batch)
            return {"image_embeds": out["image_embeds"].float(), "ids": out["ids"], **tokenize(tokenizer, out["texts"], max_len)}
    else:
        train_set = dataset

        def collate(batch):
            batch = replace_broken(batch, skipped)
            out = collate_pairs(batch, encoder)
            return {"pixel_values": out["pixel_values"], "ids": out["ids"], **tokenize(tokenizer, out["texts"], max_len)}

    model = build_qformer(cfg.qformer, tokenizer, encoder.feature_dim, cfg.train.seed, cfg.loss)
    encoder.to(accelerator.device)
    count = "streamed" if isinstance(train_set, IterableDataset) else len(train_set)  # a stream has no length
    accelerator.print(f"stage 1: {count} pairs ({dict(skipped) or 'none'} skipped), "
                      f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.1f}M trainable parameters")

    def compute_losses(model, batch, micro_step):
        device = accelerator.device
        if "image_embeds" in batch:
            image_embeds = batch["image_embeds"].to(device)
        else:
            with torch.no_grad():
                image_embeds = encoder(batch["pixel_values"].to(device))
        ids = torch.tensor([image_key(i) for i in batch["ids"]], device=device)
        return model(image_embeds, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                     image_ids=ids, step=micro_step)

    def export(unwrapped, step):
        save_stage1(unwrapped, tokenizer, cfg.encoder, output_dir / EXPORT_DIR,
                    metadata={"step": step, "sources": d.sources, "skipped": dict(skipped)})

    scale = cfg.optim.pretrained_lr_scale
    pretrained = getattr(model, "pretrained_names", set())
    lr_scale = (lambda name: scale if name in pretrained else 1.0) if scale != 1.0 and pretrained else None
    last = fit(LoopConfig.of(cfg.train, cfg.optim), model, train_set, collate, compute_losses, output_dir,
               resume=resume, on_checkpoint=export, accelerator=accelerator, lr_scale=lr_scale)
    if accelerator.is_main_process:
        (output_dir / "final_metrics.json").write_text(json.dumps(last, indent=2))
    return last
