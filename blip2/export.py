"""Export to the official transformers BLIP-2 format (``Blip2ForConditionalGeneration`` + ``Blip2Processor``), so
plain transformers and vLLM load what we trained without blip2 installed. Only models whose image encoder is the
EVA ViT fit that format; the others stay in our checkpoint format (:mod:`blip2.checkpoint`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .encoders import EvaViTEncoder
from .errors import CheckpointError


def export_official(model, folder: str | os.PathLike) -> Path:
    """Write ``model`` (EVA ViT image encoder only) in the official ``Blip2ForConditionalGeneration`` format, with
    its tokenizer and processor, so ``transformers`` loads it without blip2 installed."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

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
