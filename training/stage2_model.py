"""The stage-2 model: query tokens + Q-Former + projection (trained) in front of a frozen LLM, and its losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

from blip2.qformer import QFORMER_TEXT_TOKENS, run_qformer

from .config import ConfigError
from .naming import naming_loss
from .yes_no import YesNoHead


class Stage2Losses(NamedTuple):
    """Summed LM token cross-entropy and its token count; with a yes/no classifier also its summed cross-entropy
    and the number of yes/no questions it was asked (``None`` without one)."""
    lm_sum: torch.Tensor
    lm_count: torch.Tensor
    yes_no_sum: torch.Tensor | None = None
    yes_no_count: torch.Tensor | None = None
    naming_sum: torch.Tensor | None = None
    naming_count: torch.Tensor | None = None


class Stage2Model(nn.Module):
    """Query tokens + Q-Former + projection (trained) in front of a frozen LLM. Names match ``blip2.Blip2`` and
    transformers' ``Blip2ForConditionalGeneration``, so ``blip2.checkpoint.save_checkpoint`` exports it as is.

    ``qformer_embeddings`` / ``qformer_tokenizer``: an instruction-aware Q-Former (paper Fig. 7), the prompt's text
    enters it too. ``vision``: an image encoder trained along (captioning, paper Table 7); batches then bring pixels.
    ``yes_no_head``: add the training-only yes/no classifier (``training.yes_no``). ``use_lm=False`` skips the LLM
    (the LM loss is 0 over 0 tokens): only the auxiliary losses train the Q-Former. :meth:`set_name_bank` adds
    the naming loss (``training.naming``; training only, never exported)."""

    def __init__(self, query_tokens: nn.Parameter, qformer: Blip2QFormerModel, language_model, image_token_id: int,
                 qformer_embeddings: nn.Module | None = None, qformer_tokenizer=None, image_feature_norm: str = "none",
                 *, vision: nn.Module | None = None, yes_no_head: bool = False, use_lm: bool = True):
        super().__init__()
        self.image_feature_norm = image_feature_norm  # as stage 1 trained the Q-Former (and as blip2 serves it)
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.qformer_embeddings = qformer_embeddings
        self.qformer_tokenizer = qformer_tokenizer
        self.language_projection = nn.Linear(qformer.config.hidden_size, language_model.config.hidden_size)
        # Frozen and deliberately *not* a submodule: optimizer, DDP and training checkpoints then hold only the
        # trained parts (the LLM is referenced by the exported checkpoint, never copied).
        object.__setattr__(self, "language_model", language_model.requires_grad_(False).eval())
        self.image_token_id = image_token_id
        self.is_encoder_decoder = bool(language_model.config.is_encoder_decoder)
        self.vision = vision
        self.use_lm = use_lm
        self.yes_no_head: YesNoHead | None = None
        if yes_no_head:
            if qformer_embeddings is None:
                raise ConfigError("yes_no_aux_weight needs an instruction-aware Q-Former (qformer_text_input=true): "
                                  "without the question the queries cannot know the answer.")
            self.yes_no_head = YesNoHead(qformer.config.hidden_size)
        self.register_buffer("name_bank", None, persistent=False)
        self.naming_tau = 0.05

    def set_name_bank(self, vectors: torch.Tensor, tau: float) -> None:
        """The normalised LLM embeddings of the training names (N, H_llm): a non-persistent buffer, so neither
        training checkpoints nor the export hold it."""
        self.name_bank = vectors
        self.naming_tau = tau

    def train(self, mode: bool = True):
        super().train(mode)
        self.language_model.eval()  # frozen: no dropout, ever
        return self

    def qformer_text(self, texts: list[str]) -> dict:
        """The tokenized text an instruction-aware Q-Former reads, cut as the serving code cuts it."""
        return dict(self.qformer_tokenizer(texts, padding="longest", truncation=True, max_length=QFORMER_TEXT_TOKENS,
                                           return_tensors="pt"))

    def query_outputs(self, image_embeds: torch.Tensor, qformer_text: dict | None = None) -> torch.Tensor:
        """(B, N, D) image features (+ the tokenized instruction for an instruction-aware Q-Former) -> (B, Q, H)
        query outputs, computed by the serving code's own Q-Former pass."""
        return run_qformer(self.qformer, self.query_tokens, image_embeds.to(self.query_tokens.dtype),
                           self.qformer_embeddings, qformer_text, image_norm=self.image_feature_norm)

    def soft_prompt(self, image_embeds: torch.Tensor, qformer_text: dict | None = None) -> torch.Tensor:
        """The projected query outputs: (B, Q, H_llm)."""
        return self.language_projection(self.query_outputs(image_embeds, qformer_text))

    def forward(self, image_embeds, input_ids, attention_mask, labels, qformer_text: dict | None = None,
                pixel_values: torch.Tensor | None = None, yes_no: torch.Tensor | None = None,
                names: torch.Tensor | None = None) -> Stage2Losses:
        """Summed token cross-entropy over the labelled target tokens, and their count. With a trained image
        encoder pass ``pixel_values`` instead of cached ``image_embeds``. With a yes/no head and ``yes_no`` (per
        example 0 = no, 1 = yes, -100 = not a yes/no question) also the classifier's loss; with a name bank and
        ``names`` (per example the name's index or -100) also the naming loss."""
        if pixel_values is not None:
            image_embeds = self.vision(pixel_values)
        query_out = self.query_outputs(image_embeds, qformer_text)
        yes_no_sum = yes_no_count = None
        if self.yes_no_head is not None and yes_no is not None:
            yes_no_sum, yes_no_count = self.yes_no_head.loss(query_out, yes_no)
        projected = self.language_projection(query_out)
        naming_sum = naming_count = None
        if self.name_bank is not None and names is not None:
            naming_sum, naming_count = naming_loss(projected, names, self.name_bank, self.naming_tau)
        if not self.use_lm:
            zero = query_out.new_zeros(())
            return Stage2Losses(zero, zero.long(), yes_no_sum, yes_no_count, naming_sum, naming_count)
        text = self.language_model.get_input_embeddings()(input_ids)
        queries = projected.to(text.dtype)
        positions = input_ids == self.image_token_id
        if int(positions.sum()) != queries.shape[0] * queries.shape[1]:
            raise ValueError("Every example needs exactly num_query_tokens image positions in its input ids.")
        # Scatter the queries into the image positions (row-major order matches, one image per example).
        inputs = text.masked_scatter(positions.unsqueeze(-1), queries)
        if self.is_encoder_decoder:
            out = self.language_model(inputs_embeds=inputs, attention_mask=attention_mask, labels=labels)
            logits, targets = out.logits, labels
        else:
            # The LM head only where there is a target: a 49k-word vocabulary over every prompt position would cost
            # a quarter of the step and is thrown away.
            hidden = self.language_model.base_model(inputs_embeds=inputs, attention_mask=attention_mask).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != -100
            logits = self.language_model.get_output_embeddings()(hidden[:, :-1][keep])
            targets = targets[keep]
        loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        return Stage2Losses(loss_sum, (targets != -100).sum(), yes_no_sum, yes_no_count, naming_sum, naming_count)


class LMLoss:
    """The LM loss (times ``lm_weight``), plus ``aux_weight`` times the yes/no classifier's loss and
    ``naming_weight`` times the naming loss when there are those."""

    def __init__(self, lm: torch.Tensor, yes_no: torch.Tensor | None = None, aux_weight: float = 0.0,
                 lm_weight: float = 1.0, naming: torch.Tensor | None = None, naming_weight: float = 0.0):
        self.lm, self.yes_no, self.naming = lm, yes_no, naming
        self.loss = lm_weight * lm
        if yes_no is not None:
            self.loss = self.loss + aux_weight * yes_no
        if naming is not None:
            self.loss = self.loss + naming_weight * naming

    def items(self) -> dict[str, float]:
        if self.yes_no is None and self.naming is None:
            return {"loss": float(self.loss.detach())}
        out = {"loss": float(self.loss.detach()), "lm": float(self.lm.detach())}
        if self.yes_no is not None:
            out["yes_no"] = float(self.yes_no.detach())
        if self.naming is not None:
            out["naming"] = float(self.naming.detach())
        return out


def qformer_config_dict(config: Blip2QFormerConfig | dict) -> dict:
    """A Q-Former config as the keyword arguments that rebuild it (as stored in checkpoint configs)."""
    data = config if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}


def qformer_config_of(config: Blip2QFormerConfig | dict, text: bool) -> Blip2QFormerConfig:
    """Stage 2 feeds only queries to the Q-Former unless it is instruction-aware: then stage 1's text-only FFNs
    (a third of its weights) are dropped."""
    return Blip2QFormerConfig(**{**qformer_config_dict(config), "use_qformer_text_input": text})
