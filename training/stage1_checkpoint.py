"""The stage-1 checkpoint: a folder with ``stage1_config.json`` + ``model.safetensors`` (the Stage1QFormer) +
``tokenizer/`` (the Q-Former's tokenizer, with the [DEC] token). Stage 2, retrieval fine-tuning and
``eval-retrieval`` load it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from transformers import Blip2QFormerConfig

from .qformer import Stage1QFormer

CONFIG_NAME = "stage1_config.json"
TOKENIZER_DIR = "tokenizer"


def is_stage1_checkpoint(folder) -> bool:
    return (Path(folder) / CONFIG_NAME).exists()


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
    # The ITG head's decoder is tied to the word embeddings: stored once, tied again on load.
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.word_embeddings.weight"}
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    old = folder.with_name(f".{folder.name}-old")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def stage1_config(folder) -> dict:
    """The ``stage1_config.json`` of a stage-1 folder, or FileNotFoundError saying what is missing."""
    path = Path(folder) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a stage-1 checkpoint (no {CONFIG_NAME}).")
    return json.loads(path.read_text())


def load_stage1(folder) -> tuple[Stage1QFormer, dict]:
    folder = Path(folder)
    config = stage1_config(folder)
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
