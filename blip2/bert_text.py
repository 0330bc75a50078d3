"""The instruction-aware Q-Former's text-only weights and the BERT checkpoint they come from.

The word embeddings and each layer's text FFN are used only at text positions, and a BERT checkpoint holds them
under other names. Stage 1 initialises them from BERT, and a checkpoint whose text weights stayed frozen
references that BERT instead of storing them (``CheckpointConfig.qformer_text_frozen_from``): this module maps
between the two namings.
"""

from __future__ import annotations

import re

import torch

from .errors import CheckpointError
from .llm import local_source
from .weights import load_prefixed_state_dict

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
    try:
        return bert_text_only(load_prefixed_state_dict(local_source(source), ""), num_layers)
    except KeyError as exc:
        raise CheckpointError(f"{source} is not a BERT checkpoint with {num_layers} layers: it has no {exc}.") from None
