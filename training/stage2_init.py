"""Where stage 2's trainable parts come from, and the frozen LLM they feed.

``init_from`` names a stage-1 folder (the Q-Former and queries of representation learning), a blip2 checkpoint
(fine-tuning: its projection too, and a fine-tuned image encoder's weights when it has them), or nothing: then
``qformer.init`` builds the Q-Former from BERT or from scratch (the paper's "without representation learning"
ablation). ``qformer_text_frozen_from`` then swaps in a BERT checkpoint's text-only weights, frozen.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blip2.bert_text import bert_text_weights, is_text_only_weight
from blip2.checkpoint import QFORMER_TOKENIZER_DIR, CheckpointConfig, is_our_checkpoint, load_trained_weights
from blip2.llm import local_source

from .config import ConfigError, Stage2Config
from .qformer_init import build_qformer, load_qformer_tokenizer
from .stage1_checkpoint import TOKENIZER_DIR, is_stage1_checkpoint, load_stage1, stage1_config
from .stage2_model import Stage2Model, qformer_config_of


def build(cfg: Stage2Config, language_model, image_token_id: int, encoder_dim: int, vision: nn.Module | None = None
          ) -> tuple[Stage2Model, dict, dict]:
    """:func:`build_trainable`, then with ``qformer_text_frozen_from`` the text-only weights replaced by that BERT
    checkpoint's and frozen (and its tokenizer). ``vision``: an image encoder that trains along."""
    frozen_from = cfg.qformer_text_frozen_from
    if frozen_from and not cfg.qformer_text_input:
        raise ConfigError("qformer_text_frozen_from is for an instruction-aware Q-Former: set qformer_text_input=true.")
    model, init, vision_state = build_trainable(cfg, language_model, image_token_id, encoder_dim, vision)
    if frozen_from:
        freeze_text_weights(model, frozen_from)
        init = {**init, "text_frozen_from": frozen_from}
    return model, init, vision_state


def freeze_text_weights(model: Stage2Model, source: str) -> None:
    """Give ``model``'s text positions ``source``'s word embeddings, FFNs and tokenizer, frozen (the word embedding
    table takes ``source``'s vocabulary size)."""
    from transformers import AutoTokenizer

    weights = bert_text_weights(source, model.qformer.config.num_hidden_layers)
    words = weights.pop("qformer_embeddings.word_embeddings.weight")
    if words.shape[1] != model.qformer.config.hidden_size:
        raise ConfigError(f"qformer_text_frozen_from: {source} has hidden size {words.shape[1]}, the Q-Former "
                          f"{model.qformer.config.hidden_size}.")
    embeddings = model.qformer_embeddings
    embeddings.word_embeddings = nn.Embedding.from_pretrained(words.float(), freeze=True,
                                                              padding_idx=embeddings.word_embeddings.padding_idx)
    model.qformer.config.vocab_size = words.shape[0]
    state = model.state_dict()
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in weights.items()}, strict=False)
    for name, param in model.named_parameters():
        if is_text_only_weight(name):
            param.requires_grad_(False)
    model.qformer_tokenizer = AutoTokenizer.from_pretrained(local_source(source))


def build_trainable(cfg: Stage2Config, language_model, image_token_id: int, encoder_dim: int,
                    vision: nn.Module | None = None) -> tuple[Stage2Model, dict, dict]:
    """The model, metadata about its initialisation, and the fine-tuned image encoder's weights when ``init_from`` is
    a checkpoint that has them (else empty), from ``init_from`` or ``qformer.init``.

    ``qformer_text_input: true`` keeps the Q-Former's text embeddings and text FFNs (from stage 1) so the prompt's
    text enters the Q-Former. Fine-tuning a stage-2 checkpoint that dropped them takes them from the stage-1
    checkpoint it was trained from (its metadata says which)."""
    source, aware = cfg.init_from, cfg.qformer_text_input
    # The training-time parts the config asks for (never exported).
    heads = dict(vision=vision, yes_no_head=bool(cfg.yes_no_aux_weight), use_lm=bool(cfg.lm_loss_weight))
    text_tokenizer = None
    if source and is_our_checkpoint(source):  # fine-tuning a blip2 checkpoint
        ck = CheckpointConfig.read(source)
        if ck.llm != cfg.llm:
            raise ConfigError(f"{source} was trained for LLM {ck.llm!r}, not {cfg.llm!r}; set llm={ck.llm}.")
        weights = {k: v.float() for k, v in load_trained_weights(source).items()}
        if ck.qformer_text_frozen_from and aware:
            weights.update(bert_text_weights(ck.qformer_text_frozen_from, ck.qformer["num_hidden_layers"]))
        vision_state = {k[len("vision."):]: v for k, v in weights.items() if k.startswith("vision.")}
        weights = {k: v for k, v in weights.items() if not k.startswith("vision.")}
        qconfig = qformer_config_of(ck.qformer, text=aware)
        embeddings = None
        if aware and ck.qformer_text_input:
            from transformers import AutoTokenizer

            text_tokenizer = AutoTokenizer.from_pretrained(Path(source) / QFORMER_TOKENIZER_DIR)
            embeddings = Blip2TextEmbeddings(qconfig)
        elif aware:  # add the text parts from the stage-1 checkpoint behind this one
            stage1_dir = (ck.metadata.get("init") or {}).get("from")
            if not stage1_dir or not is_stage1_checkpoint(stage1_dir):
                raise ConfigError(f"qformer_text_input needs the Q-Former's text parts; {source} has none and names no "
                                  "stage-1 checkpoint to take them from. Start from a stage-1 checkpoint instead.")
            stage1, _ = load_stage1(stage1_dir)
            text_tokenizer = load_qformer_tokenizer(str(Path(stage1_dir) / TOKENIZER_DIR))
            embeddings = stage1.embeddings
            # The text FFNs only (layer.N.intermediate / layer.N.output), not the attention blocks' own output
            # projections ("attention.output.", "crossattention.output."), which stage 2 trained.
            text_ffn = {k: v for k, v in stage1.qformer.state_dict().items()
                        if re.search(r"\.layer\.\d+\.(?:intermediate|output)\.", k)}
            weights.update({f"qformer.{k}": v for k, v in text_ffn.items()})
            weights.update({f"qformer_embeddings.{k}": v for k, v in embeddings.state_dict().items()})
        model = Stage2Model(nn.Parameter(torch.zeros(1, ck.num_query_tokens, qconfig.hidden_size)),
                            Blip2QFormerModel(qconfig), language_model, image_token_id, embeddings, text_tokenizer,
                            ck.image_feature_norm, **heads)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        # The training-only parts start fresh (a trained image encoder's weights are loaded into it by the caller).
        missing = [k for k in missing if not k.startswith(("yes_no_head.", "vision."))]
        if missing or unexpected:
            raise ConfigError(f"{source} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        return model, {"init": "blip2-checkpoint", "from": str(source)}, vision_state
    if source:  # a stage-1 folder
        stage1, _ = load_stage1(source)
        init = {"init": "stage1", "from": str(source)}
        if aware:
            text_tokenizer = load_qformer_tokenizer(str(Path(source) / TOKENIZER_DIR))
    else:
        tokenizer = load_qformer_tokenizer(cfg.tokenizer)
        if cfg.qformer.init == "checkpoint":
            raise ConfigError("For a stage-1 Q-Former set init_from=<stage-1 folder> instead of qformer.init.")
        stage1 = build_qformer(cfg.qformer, tokenizer, encoder_dim, cfg.train.seed)
        init = {"init": cfg.qformer.init}
        text_tokenizer = tokenizer if aware else None
    qformer = Blip2QFormerModel(qformer_config_of(stage1.config, text=aware))
    missing, unexpected = qformer.load_state_dict(stage1.qformer.state_dict(), strict=False)
    # Only the text FFNs may be left behind; anything else would mean a silent random init.
    if missing or any(".intermediate." not in k and ".output." not in k for k in unexpected):
        raise RuntimeError(f"Q-Former transfer failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    query_tokens = nn.Parameter(stage1.query_tokens.detach().clone())
    embeddings = stage1.embeddings if aware else None
    torch.manual_seed(cfg.train.seed)
    return (Stage2Model(query_tokens, qformer, language_model, image_token_id, embeddings, text_tokenizer,
                        stage1.image_feature_norm, **heads), init, {})


def encoder_spec_of(cfg: Stage2Config) -> dict:
    """The frozen image encoder the Q-Former was (or will be) trained on: the one named by ``init_from``'s config,
    else ``cfg.encoder``."""
    source = cfg.init_from
    if source and is_our_checkpoint(source):
        return CheckpointConfig.read(source).vision
    if source:
        if not is_stage1_checkpoint(source):
            raise FileNotFoundError(f"{source} is neither a stage-1 checkpoint (no stage1_config.json) nor a blip2 "
                                    "checkpoint (no blip2_config.json).")
        return stage1_config(source)["encoder"]
    return cfg.encoder


def load_frozen_llm(source: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = local_source(source)
    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model, AutoTokenizer.from_pretrained(folder)
