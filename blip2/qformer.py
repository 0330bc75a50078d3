"""The Q-Former pass: image features -> query outputs. Serving (:class:`blip2.Blip2`) and training both run it
through :func:`run_qformer`, so a model is trained on exactly what it is served."""

from __future__ import annotations

import torch

QFORMER_TEXT_TOKENS = 32  # instruction tokens an instruction-aware Q-Former reads

IMAGE_FEATURE_NORMS = ("none", "layernorm")


def normalize_image_features(image_embeds: torch.Tensor, kind: str = "none") -> torch.Tensor:
    """``layernorm``: each image token standardised over its channels (no learned scale), as a ViT's final LayerNorm
    leaves its features. Towers whose raw features are tiny (EfficientNet's final map: mean |x| ~ 0.1) otherwise
    reach the Q-Former's cross-attention as a faint signal: colour stayed linearly decodable from the queries but
    too weak for the frozen LLM to read."""
    if kind == "none":
        return image_embeds
    if kind == "layernorm":
        return torch.nn.functional.layer_norm(image_embeds.float(), image_embeds.shape[-1:]).to(image_embeds.dtype)
    raise ValueError(f"Unknown image feature normalisation {kind!r}; use one of {IMAGE_FEATURE_NORMS}.")


def run_qformer(qformer, query_tokens, image_embeds, text_embeddings=None, text=None, image_norm: str = "none"
                ) -> torch.Tensor:
    """(B, N, D) image features -> (B, Q, H) query outputs. With ``text_embeddings`` and tokenized ``text``
    (``input_ids``, ``attention_mask``), the text joins the queries in self-attention (bidirectional, padding
    hidden), as InstructBLIP's Q-Former does; only the Q query outputs are returned. Training and serving share
    this function."""
    image_embeds = normalize_image_features(image_embeds, image_norm)
    queries = query_tokens.expand(image_embeds.shape[0], -1, -1)
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    if text_embeddings is None:
        return qformer(query_embeds=queries, encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask,
                       return_dict=True).last_hidden_state
    device = queries.device
    input_ids, text_mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    hidden = text_embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q+T, H)
    mask = torch.cat([torch.ones(queries.shape[:2], dtype=text_mask.dtype, device=device), text_mask], dim=1)
    out = qformer(query_embeds=hidden, query_length=queries.shape[1], attention_mask=mask,
                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, return_dict=True)
    return out.last_hidden_state[:, : queries.shape[1]]
