"""Frozen language models: which family an LLM is, and loading one by source (hub id, folder or package)."""

from __future__ import annotations

import os

from .errors import CheckpointError
from .offline import is_package_source, resolve_package_source
from .precision import LoadPlan, adapt_llm_to_cpu_kernels


def family_of(config, tokenizer) -> str:
    """``encoder-decoder`` (Flan-T5), ``chat`` (decoder with a chat template, e.g. SmolLM2-Instruct) or
    ``decoder`` (OPT and other base causal LMs). Decided from the config and tokenizer, never from the name."""
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    return "decoder"


def local_source(source: str) -> str:
    """A ``package:`` source becomes its local folder; anything else is passed through."""
    return resolve_package_source(source) if is_package_source(source) else source


def load_llm(source: str, plan: LoadPlan):
    """(model, tokenizer) for a standalone LLM, frozen, in eval mode, loaded as the plan says."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = local_source(source)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise CheckpointError(_not_found(source, exc)) from exc
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": plan.dtype, "device_map": plan.device_map}
    if plan.quantization_config is not None:
        kwargs["quantization_config"] = plan.quantization_config
    try:
        model = cls.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise CheckpointError(_not_found(source, exc)) from exc
    adapt_llm_to_cpu_kernels(model)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def _not_found(source: str, exc: Exception) -> str:
    if os.path.isdir(source):
        return f"Could not load the language model in {source}: {exc}"
    return (
        f"Could not load the language model {source!r}: {exc}. If it is a Hugging Face hub id, this machine needs "
        "network access (or a filled HF cache); otherwise pass a local folder."
    )
