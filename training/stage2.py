"""Stage 2 recipe (paper §3.3, Fig. 3) and generative fine-tuning: the Q-Former's projected queries become soft
visual prompts for a frozen LLM (``python -m training stage2`` / ``finetune --task caption|vqa``).

    setup (config, init, frozen encoder + LLM, cached features) -> fit (engine) -> export (blip2 checkpoint folder)

Tasks, all with the loss on the target text only (never on query positions, prompt tokens or padding):

- ``pretrain``: image-text pairs. Decoder-only LLMs (OPT, Llama/SmolLM2): language modelling on the caption after
  the family's caption prompt (empty for plain LLMs, as in the paper). Encoder-decoder LLMs (Flan-T5): **prefix
  language modelling**: each caption is split at a random word; queries + prefix go into the encoder, the suffix is
  the decoder's target. (The split point is a fixed function of the seed and the sample, so runs resume exactly.)
- ``caption``: the paper's captioning fine-tune: prompt "a photo of" (plain LLMs) or the chat caption prompt.
- ``vqa``: question/answer pairs (``qa`` of easy-vqa and scene items), prompted exactly as ``Blip2.ask`` prompts.

The parts live in their own modules: the model and its losses (``training.stage2_model``), where it starts
(``training.stage2_init``), texts as token ids (``training.text``), examples and how often each is drawn
(``training.examples``, ``training.sampling``, ``training.yes_no``). The output folder's ``checkpoint/`` is our
checkpoint format (trained parts only, the frozen encoder and LLM referenced), which ``blip2.load`` opens.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from blip2.checkpoint import CheckpointConfig, save_checkpoint
from blip2.encoders import build_encoder
from blip2.llm import family_of
from blip2.loading import placeholder_token_id
from blip2.prompts import PromptFormat, default_format

from . import distributed as dist
from . import yes_no
from .config import ConfigError, Stage2Config, dump_config
from .data import ConcatPairs, replace_broken, train_transform
from .data.sources import build_source
from .engine import LoopConfig, fit, make_accelerator, shard_frozen
from .examples import Examples, RawExamples, StreamedExamples
from .features import cached_dataset, weights_digest
from .sampling import repeat_questions, select_questions
from .stage2_init import build, encoder_spec_of, load_frozen_llm
from .naming import NameBank, answer_name
from .stage2_model import LMLoss, qformer_config_dict
from .text import TextBuilder
from .vision_finetune import lr_scale_for, make_trainable

EXPORT_DIR = "checkpoint"
CAPTION_PROMPT_PLAIN = "a photo of"  # the paper's captioning fine-tune prompt (§4.2)


def check(cfg: Stage2Config) -> None:
    """What the types alone cannot say: settings that only fit some tasks, and a run with a loss to train."""
    vqa_only = {"data.repeat_questions": cfg.data.repeat_questions, "data.balance_yes_no": cfg.data.balance_yes_no,
                "data.only_questions": cfg.data.only_questions, "data.skip_questions": cfg.data.skip_questions,
                "yes_no_aux_weight": cfg.yes_no_aux_weight, "naming_aux_weight": cfg.naming_aux_weight}
    for key, value in vqa_only.items():
        if value and cfg.task != "vqa":
            raise ConfigError(f"{key} is for the vqa task; this run's task is {cfg.task!r}.")
    for key in ("yes_no_aux_weight", "naming_aux_weight", "lm_loss_weight"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be a number >= 0, not {getattr(cfg, key)!r}.")
    if cfg.naming_tau <= 0:
        raise ConfigError(f"naming_tau must be > 0, not {cfg.naming_tau!r}.")
    if not cfg.lm_loss_weight and not cfg.yes_no_aux_weight and not cfg.naming_aux_weight:
        raise ConfigError("lm_loss_weight: 0 leaves no loss to train: set yes_no_aux_weight or naming_aux_weight "
                          "> 0 too.")
    if cfg.vision_finetune.enabled and cfg.task != "caption":
        raise ConfigError("vision_finetune is for the caption task (paper Table 7); VQA and stage 2 keep the "
                          "image encoder frozen.")
    if any(source.get("type") == "shards" for source in cfg.data.sources):
        # A stream has no index: nothing to cache features by, mix with other sources or pick questions from.
        if len(cfg.data.sources) > 1 or cfg.data.cache_features or cfg.task == "vqa" or cfg.vision_finetune.enabled:
            raise ConfigError("A shards source streams captions: make it the only source, with "
                              "data.cache_features: false, task pretrain or caption and a frozen image encoder.")
    elif not cfg.vision_finetune.enabled and not cfg.data.cache_features:
        raise ConfigError("With a frozen encoder stage 2 trains on cached features (data.cache_features: true), "
                          "unless it streams tar shards ({type: shards}).")


def run(cfg: Stage2Config, resume: bool = False) -> dict:
    check(cfg)
    task, d = cfg.task, cfg.data
    output_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")

    language_model, tokenizer = load_frozen_llm(cfg.llm, cfg.llm_dtype)
    family = family_of(language_model.config, tokenizer)
    prompt_format = PromptFormat.from_dict(cfg.prompt) if cfg.prompt else default_format(family)
    image_token_id = placeholder_token_id(tokenizer)
    encoder_spec = encoder_spec_of(cfg)
    encoder = build_encoder(encoder_spec).freeze()
    trained_vision = make_trainable(encoder) if cfg.vision_finetune.enabled else None
    model, init, vision_state = build(cfg, language_model, image_token_id, encoder.feature_dim, trained_vision)
    language_model.to(accelerator.device)
    held, total = shard_frozen(language_model, accelerator)
    if held < total:
        accelerator.print(f"frozen LLM sharded over {accelerator.num_processes} processes: {held:,} of {total:,} "
                          "weights held per process")
    if vision_state:  # a checkpoint whose image encoder was fine-tuned
        encoder.load_state_dict(vision_state)
    prefix_lm = task == "pretrain" and model.is_encoder_decoder
    caption_prompt = prompt_format.caption_prompt
    if task == "caption" and prompt_format.style == "plain":
        caption_prompt = CAPTION_PROMPT_PLAIN
    builder = TextBuilder(tokenizer, prompt_format, image_token_id, model.query_tokens.shape[1],
                          model.is_encoder_decoder, d.max_target_tokens)
    skipped: Counter = Counter()
    name_bank: NameBank | None = None

    def text_batch(batch):
        out = builder.collate([builder.example(b["kind"], b["prompt"], b["target"]) for b in batch])
        if model.qformer_tokenizer is not None:  # the text the serving code gives the Q-Former: the user's message
            out["qformer_text"] = model.qformer_text([b["prompt"] for b in batch])
        if model.yes_no_head is not None:
            out["yes_no"] = yes_no.labels(batch)
        if name_bank is not None:
            out["names"] = name_bank.labels(batch)
        return out

    def decoded_batch(batch):  # images decoded every step (no feature cache): the encoder's own preprocessing
        batch = replace_broken(batch, skipped)
        out = text_batch(batch)
        out["pixel_values"] = encoder.preprocess([b["image"] for b in batch])
        return out

    lr_scale = None
    frozen_encoder = None  # streamed images: embedded every step by the frozen tower
    if trained_vision is not None:
        lr_scale = lr_scale_for(trained_vision, cfg.vision_finetune.layer_decay)
        transform = train_transform(getattr(encoder, "image_size", 224)) if d.augment else None
        train_set = RawExamples(ConcatPairs([build_source(s, transform) for s in d.sources]), caption_prompt)
        collate, source_count = decoded_batch, len(train_set)
    elif not d.cache_features:  # tar shards, streamed; the frozen encoder embeds each batch
        train_set = StreamedExamples(build_source(d.sources[0]), caption_prompt, prefix_lm, cfg.train.seed)
        frozen_encoder = encoder.to(accelerator.device)
        collate, source_count = decoded_batch, "streamed"
    else:
        sources = [build_source(s) for s in d.sources]
        dataset = sources[0] if len(sources) == 1 else ConcatPairs(sources)
        # Features of a fine-tuned encoder (a vision_finetune checkpoint) are not the pretrained encoder's: key them
        # by the weights too.
        features, build_skipped = cached_dataset(dataset, encoder, d, output_dir / "features", accelerator,
                                                 encoder_weights=weights_digest(vision_state) if vision_state else None)
        skipped.update(build_skipped)
        encoder = None  # features are cached: free the tower
        train_set = Examples(features, task, caption_prompt, prefix_lm, cfg.train.seed, d.with_captions)
        if not model.use_lm:  # only the yes/no (and naming) questions have a loss: draw nothing else
            train_set.rows = [row for row in train_set.rows
                              if (cfg.yes_no_aux_weight and yes_no.answer_label(row.kind, row.target) != yes_no.IGNORE)
                              or (cfg.naming_aux_weight and answer_name(row.kind, row.prompt, row.target))]
        train_set.rows = select_questions(train_set.rows, d.only_questions, d.skip_questions)
        if cfg.naming_aux_weight:
            name_bank = NameBank.of_rows(train_set.rows, tokenizer, language_model.get_input_embeddings())
            model.set_name_bank(name_bank.vectors, cfg.naming_tau)
            accelerator.print(f"naming loss over {len(name_bank.names)} names")
        train_set = repeat_questions(train_set, d.repeat_questions, d.balance_yes_no)
        source_count = len(features)

        def collate(batch):
            out = text_batch(batch)
            out["image_embeds"] = torch.stack([b["image_embeds"] for b in batch]).float()
            return out

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    examples = "streamed" if isinstance(train_set, StreamedExamples) else len(train_set)
    accelerator.print(f"stage 2 ({task}, {family} LLM {cfg.llm}): {examples} examples from {source_count} "
                      f"images ({dict(skipped) or 'none'} skipped), {trainable / 1e6:.1f}M trainable parameters, "
                      f"init: {init['init']}")

    def compute_losses(model, batch, micro_step):
        device = accelerator.device
        pixels = batch["pixel_values"].to(device) if "pixel_values" in batch else None
        embeds = batch["image_embeds"].to(device) if "image_embeds" in batch else None
        if pixels is not None and frozen_encoder is not None:
            with torch.no_grad():
                embeds, pixels = frozen_encoder(pixels), None
        out = model(embeds, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["labels"].to(device), batch.get("qformer_text"), pixel_values=pixels,
                    yes_no=batch.get("yes_no"), names=batch.get("names"))
        # Means over every target token (and yes/no or naming question) of the global batch: N processes train
        # exactly like one.
        lm = dist.global_token_mean(out.lm_sum, out.lm_count)
        yes_no_loss = None if out.yes_no_sum is None else dist.global_token_mean(out.yes_no_sum, out.yes_no_count)
        naming = None if out.naming_sum is None else dist.global_token_mean(out.naming_sum, out.naming_count)
        return LMLoss(lm, yes_no_loss, cfg.yes_no_aux_weight, cfg.lm_loss_weight, naming, cfg.naming_aux_weight)

    qconfig = qformer_config_dict(model.qformer.config)

    def export(unwrapped, step):
        config = CheckpointConfig(
            vision=encoder_spec, llm=cfg.llm, qformer=qconfig, num_query_tokens=unwrapped.query_tokens.shape[1],
            image_token_id=image_token_id, prompt=cfg.prompt, trained=True,
            qformer_text_input=unwrapped.qformer_embeddings is not None, vision_trained=cfg.vision_finetune.enabled,
            qformer_text_frozen_from=cfg.qformer_text_frozen_from,
            image_feature_norm=unwrapped.image_feature_norm,
            metadata={"task": task, "step": step, "sources": d.sources, "init": init,
                      "skipped": dict(skipped + Counter(getattr(train_set, "skipped", {})))},
        )
        save_checkpoint(unwrapped, output_dir / EXPORT_DIR, config, dtype=getattr(torch, cfg.export.dtype))
        if encoder_spec.get("type") == "eva-vit" and step == cfg.train.steps:
            export_official_copy(output_dir)

    last = fit(LoopConfig.of(cfg.train, cfg.optim), model, train_set, collate, compute_losses, output_dir,
               resume=resume, on_checkpoint=export, accelerator=accelerator, lr_scale=lr_scale)
    if accelerator.is_main_process:
        (output_dir / "final_metrics.json").write_text(json.dumps(last, indent=2))
    return last


def export_official_copy(output_dir: Path) -> Path:
    """With the EVA ViT, also write the official transformers format (``output_dir/official``), loadable by plain
    ``Blip2ForConditionalGeneration.from_pretrained`` (and vLLM) without blip2."""
    import blip2
    from blip2.export import export_official

    model = blip2.load(str(output_dir / EXPORT_DIR), precision="fp32", device="cpu")
    return export_official(model, output_dir / "official")
