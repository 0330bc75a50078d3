"""Where a stage-1 Q-Former starts: a BERT checkpoint (the paper), random weights, or an earlier stage-1 folder;
and the Q-Former's text tokenizer."""

from __future__ import annotations

import os
import re
from dataclasses import asdict

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Blip2QFormerConfig

from blip2.bert_text import bert_text_only, is_text_only_weight
from blip2.llm import local_source

from .config import ConfigError, LossConfig, QFormerConfig
from .qformer import Stage1QFormer
from .stage1_checkpoint import load_stage1

DEC_TOKEN = "[DEC]"


def load_qformer_tokenizer(source: str):
    """The Q-Former's tokenizer, with the [DEC] token that starts image-grounded text generation (ITG)."""
    tokenizer = AutoTokenizer.from_pretrained(local_source(source))
    if DEC_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [DEC_TOKEN]})
    return tokenizer


def tokenize(tokenizer, texts, max_length: int) -> dict:
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")


def build_qformer(q: QFormerConfig, tokenizer, encoder_dim: int, seed: int,
                  loss: LossConfig | None = None) -> Stage1QFormer:
    """A stage-1 Q-Former as ``q.init`` says. ``seed`` fixes the random parts (queries, cross-attention)."""
    loss = loss or LossConfig()
    if q.init == "checkpoint":
        if not q.checkpoint:
            raise ConfigError("qformer.init=checkpoint needs qformer.checkpoint=<stage-1 folder>.")
        model, _ = load_stage1(q.checkpoint)
        return set_losses(model, loss)  # the losses are this run's, not the checkpoint's
    sizes = dict(hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                 num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                 max_position_embeddings=512)
    bert_state = None
    if q.init == "bert":
        from transformers import AutoConfig

        folder = local_source(q.bert)
        bert = AutoConfig.from_pretrained(folder)
        sizes = dict(hidden_size=bert.hidden_size, num_hidden_layers=min(q.num_hidden_layers, bert.num_hidden_layers),
                     num_attention_heads=bert.num_attention_heads, intermediate_size=bert.intermediate_size,
                     max_position_embeddings=bert.max_position_embeddings)
        bert_state = load_file(os.path.join(folder, "model.safetensors"))
    config = Blip2QFormerConfig(
        **sizes, vocab_size=len(tokenizer), encoder_hidden_size=encoder_dim,
        cross_attention_frequency=q.cross_attention_frequency, use_qformer_text_input=True,
        hidden_dropout_prob=q.dropout, attention_probs_dropout_prob=q.dropout,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Stage1QFormer(
        config, q.num_query_tokens, embed_dim=q.embed_dim, cls_token_id=tokenizer.cls_token_id,
        dec_token_id=tokenizer.convert_tokens_to_ids(DEC_TOKEN), pad_token_id=tokenizer.pad_token_id,
        image_feature_norm=q.image_feature_norm, text_pooling=q.text_pooling, **asdict(loss),
    )
    if bert_state is not None:
        model.pretrained_names = set(load_bert_weights(model, bert_state))
    if q.freeze_text:
        if bert_state is None:
            raise ConfigError("qformer.freeze_text keeps BERT's text weights: it needs qformer.init: bert.")
        for name, param in model.named_parameters():
            # (The ITG head's decoder is tied to the word embeddings, so it stays BERT's too; its bias trains.)
            if name == "embeddings.word_embeddings.weight" or is_text_only_weight(name):
                param.requires_grad_(False)
    return model


def set_losses(model: Stage1QFormer, loss: LossConfig) -> Stage1QFormer:
    """Give ``model`` the loss settings of ``loss`` (each LossConfig field is the Stage1QFormer attribute of its
    name, as its constructor takes them)."""
    for name, value in asdict(loss).items():
        setattr(model, name, value)
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
