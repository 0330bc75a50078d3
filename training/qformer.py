"""Stage-1 Q-Former: representation learning on a frozen image encoder with ITC + ITM + ITG (paper §3.2, Fig. 2).

The Q-Former is transformers' own ``Blip2QFormerModel`` (with ``use_qformer_text_input=True``: a second FFN for
text positions) plus ``Blip2TextEmbeddings``; parameter names follow ``Blip2ForImageTextRetrieval``
(``query_tokens``, ``embeddings``, ``qformer``, ``vision_projection``, ``text_projection``, ``itm_head``) so the
trained Q-Former drops into ``blip2``'s runtime. Each objective has its own attention mask:

- ITC, *unimodal*: queries and text never see each other (two separate passes);
- ITM, *bidirectional*: queries and text see each other (text padding hidden);
- ITG, *multimodal causal*: queries see queries only; text token i sees every query and text tokens <= i.

Distributed training: in-batch negatives are gathered from every process with gradients flowing back through the
gather, and hard negatives are drawn from the *global* similarity matrix with a generator seeded by the step, so a
run on N processes computes exactly the losses (and gradients) of one process with the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.activations import ACT2FN
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blip2.qformer import normalize_image_features, run_qformer

from . import distributed as dist


@dataclass
class Stage1Losses:
    loss: torch.Tensor
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor

    def items(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "itc", "itm", "itg")}


class LMHead(nn.Module):
    """BERT's prediction head (dense -> gelu -> LayerNorm -> decoder tied to the word embeddings)."""

    def __init__(self, config: Blip2QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self.word_embeddings = word_embeddings  # tied: shares the embedding matrix

    def forward(self, hidden):  # (B, T, H) -> (B, T, V)
        return F.linear(self.norm(self.act(self.dense(hidden))), self.word_embeddings.weight, self.bias)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean (B, L, L) 'row may attend to column' -> additive (B, 1, L, L) mask the Q-Former accepts."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def bidirectional_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, Q+T, Q+T) boolean: everyone sees every query and every non-padding text token."""
    batch, length = text_mask.shape
    keys = torch.cat([torch.ones(batch, num_queries, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
    return keys[:, None, :].expand(batch, num_queries + length, num_queries + length)


def multimodal_causal_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """(B, Q+T, Q+T) boolean: queries see only queries; text token i sees all queries and text tokens j <= i."""
    batch, length = text_mask.shape
    q, total = num_queries, num_queries + length
    allowed = torch.zeros(batch, total, total, dtype=torch.bool, device=text_mask.device)
    allowed[:, :, :q] = True  # every position sees the queries
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=text_mask.device))
    allowed[:, q:, q:] = causal[None] & text_mask.bool()[:, None, :]
    return allowed


TEXT_POOLINGS = ("cls", "mean")


class Stage1QFormer(nn.Module):
    """Query tokens + Q-Former + the three stage-1 heads."""

    def __init__(
        self,
        config: Blip2QFormerConfig,
        num_query_tokens: int,
        *,
        embed_dim: int = 256,
        cls_token_id: int,
        dec_token_id: int,
        pad_token_id: int,
        itc_label_smoothing: float = 0.0,
        itg_label_smoothing: float = 0.0,
        image_feature_norm: str = "none",
        text_pooling: str = "cls",
        itm_negatives_ramp: int = 0,
        itm_weight: float = 1.0,
    ):
        super().__init__()
        if text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, not {text_pooling!r}.")
        self.image_feature_norm = image_feature_norm  # blip2.qformer.normalize_image_features, as served
        self.text_pooling = text_pooling
        if not config.use_qformer_text_input:
            config.use_qformer_text_input = True  # text positions need their own FFN
        self.config = config
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, config.hidden_size) * config.initializer_range)
        self.embeddings = Blip2TextEmbeddings(config)
        self.qformer = Blip2QFormerModel(config)
        self.vision_projection = nn.Linear(config.hidden_size, embed_dim)
        self.text_projection = nn.Linear(config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.lm_head = LMHead(config, self.embeddings.word_embeddings)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.cls_token_id, self.dec_token_id, self.pad_token_id = cls_token_id, dec_token_id, pad_token_id
        self.itc_label_smoothing = itc_label_smoothing
        self.itg_label_smoothing = itg_label_smoothing
        self.itm_negatives_ramp = itm_negatives_ramp
        self.itm_weight = itm_weight

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    # -- the three passes ------------------------------------------------------------------------------------
    def image_queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Query-only pass: (B, N, D) image features -> (B, Q, H) query outputs Z."""
        return run_qformer(self.qformer, self.query_tokens, image_embeds, image_norm=self.image_feature_norm)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text-only pass (no queries, no image): (B, T) ids -> (B, T, H)."""
        return self.qformer(
            query_embeds=self.embeddings(input_ids=input_ids),
            query_length=0,
            attention_mask=attention_mask,
            return_dict=True,
        ).last_hidden_state

    def joint(self, image_embeds, input_ids, attention_mask, causal: bool) -> torch.Tensor:
        """Queries and text in one pass with the bidirectional (ITM) or multimodal causal (ITG) mask."""
        q = self.num_query_tokens
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        hidden = self.embeddings(input_ids=input_ids, query_embeds=queries)  # (B, Q+T, H)
        build = multimodal_causal_mask if causal else bidirectional_mask
        mask = additive(build(q, attention_mask), hidden.dtype)
        return self.qformer(
            query_embeds=hidden,
            query_length=q,
            attention_mask=mask,
            encoder_hidden_states=normalize_image_features(image_embeds, self.image_feature_norm),
            encoder_attention_mask=_ones(image_embeds),
            return_dict=True,
        ).last_hidden_state

    def itm_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """(B, 2): match / no-match, the 2-class head on every query output, averaged over queries."""
        hidden = self.joint(image_embeds, input_ids, attention_mask, causal=False)
        return self.itm_head(hidden[:, : self.num_query_tokens]).mean(dim=1)

    def itg_logits(self, image_embeds, input_ids, attention_mask) -> torch.Tensor:
        """(B, T, V) next-token logits; the first text token is replaced by the decoder start token [DEC]."""
        input_ids = input_ids.clone()
        input_ids[:, 0] = self.dec_token_id
        hidden = self.joint(image_embeds, input_ids, attention_mask, causal=True)
        return self.lm_head(hidden[:, self.num_query_tokens:])

    def itc_features(self, image_embeds, input_ids, attention_mask):
        """Normalised (B, Q, E) query features and (B, E) text features: the [CLS] output (the paper) or, with
        ``text_pooling="mean"``, the mean over the text's tokens, the pooling a sentence-embedding model such as
        all-MiniLM-L6-v2 was trained with, so ITC starts from its sentence space instead of an unused [CLS]."""
        image_feats = F.normalize(self.vision_projection(self.image_queries(image_embeds)), dim=-1)
        text = self.text_features(input_ids, attention_mask)
        if self.text_pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(text.dtype)
            pooled = (text * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            pooled = text[:, 0]
        return image_feats, F.normalize(self.text_projection(pooled), dim=-1)

    # -- losses ----------------------------------------------------------------------------------------------
    def forward(self, image_embeds, input_ids, attention_mask, image_ids=None, step: int = 0) -> Stage1Losses:
        """All three losses on a (per-process) batch; their unweighted sum is ``loss``.

        ``image_ids`` (B,) mark pairs sharing an image (e.g. several captions of one picture) so they are never
        used as each other's negatives; by default every row is its own image.
        """
        batch = image_embeds.shape[0]
        rank = dist.rank()
        # Texts are padded to the longest in the *global* batch: negatives are exchanged between processes, and
        # N processes then see exactly the tensors one process would.
        length = dist.max_over_processes(input_ids.shape[1])
        if length > input_ids.shape[1]:
            extra = length - input_ids.shape[1]
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, extra), value=0)
        if image_ids is None:
            image_ids = torch.arange(batch, device=image_embeds.device) + rank * batch
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)

        # ITC over the global batch.
        image_feats, text_feat = self.itc_features(image_embeds, input_ids, attention_mask)
        image_feats_all = dist.gather_with_grad(image_feats)  # (B*W, Q, E)
        text_feat_all = dist.gather_with_grad(text_feat)  # (B*W, E)
        ids_all = dist.gather(image_ids)
        sim_i2t = torch.einsum("iqe,je->ijq", image_feats, text_feat_all).amax(-1) / self.temp  # (B, B*W)
        sim_t2i = torch.einsum("ie,jqe->ijq", text_feat, image_feats_all).amax(-1) / self.temp  # (B, B*W)
        targets = torch.arange(batch, device=image_embeds.device) + rank * batch
        itc = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=self.itc_label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=self.itc_label_smoothing)
        ) / 2

        # ITM with hard negatives drawn from the global similarities (same draw on every process).
        image_embeds_all = dist.gather(image_embeds)  # frozen encoder features: no gradient to carry
        input_ids_all, attention_mask_all = dist.gather(input_ids), dist.gather(attention_mask)
        with torch.no_grad():
            global_i2t = torch.einsum("iqe,je->ijq", image_feats_all, text_feat_all).amax(-1) / self.temp
            if self.itm_negatives_ramp:  # easy (uniform) negatives first: see LossConfig.itm_negatives_ramp
                global_i2t = global_i2t * min(1.0, step / self.itm_negatives_ramp)
            neg_text, neg_image = hard_negatives(global_i2t, not_negatives(ids_all, input_ids_all), step)
            rows = slice(rank * batch, (rank + 1) * batch)
            neg_text, neg_image = neg_text[rows], neg_image[rows]
        itm_images = torch.cat([image_embeds, image_embeds, image_embeds_all[neg_image]])
        itm_ids = torch.cat([input_ids, input_ids_all[neg_text], input_ids])
        itm_mask = torch.cat([attention_mask, attention_mask_all[neg_text], attention_mask])
        itm_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(image_embeds.device)
        itm = F.cross_entropy(self.itm_logits(itm_images, itm_ids, itm_mask), itm_labels)

        # ITG: mean over all real text tokens of the global batch, so N processes equal one.
        logits = self.itg_logits(image_embeds, input_ids, attention_mask)[:, :-1]
        labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        token_sum = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
            ignore_index=-100, reduction="sum", label_smoothing=self.itg_label_smoothing,
        )
        itg = dist.global_token_mean(token_sum, (labels != -100).sum())
        return Stage1Losses(itc + self.itm_weight * itm + itg, itc, itm, itg)


def not_negatives(image_ids: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(N, N) True where text j is a right caption of image i: the same image, or the very same caption text
    (templated captions repeat: "A cat." under two emoji styles, "A red circle." under many easy-vqa images).
    Drawing such a pair as an ITM negative labels a match "no match", which taught the ITM head noise."""
    same_image = image_ids[:, None] == image_ids[None, :]
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(-1)
    return same_image | same_text


def hard_negatives(sim_i2t: torch.Tensor, same_image: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a hard negative text and for each text a hard negative image, sampled in proportion to the
    softmaxed similarity with all positives (pairs of the same image) excluded. Deterministic given ``step``."""
    if bool(same_image.all()):
        raise ValueError("ITM needs at least two different images in the (global) batch to draw negatives.")
    generator = torch.Generator(device="cpu").manual_seed(1_000_003 + step)
    weights_i2t = F.softmax(sim_i2t.float(), dim=1).masked_fill(same_image, 0).cpu()
    weights_t2i = F.softmax(sim_i2t.t().float(), dim=1).masked_fill(same_image.t(), 0).cpu()
    # A row whose negatives all underflowed to 0 still gets a uniform choice among the negatives.
    weights_i2t = torch.where(weights_i2t.sum(1, keepdim=True) > 0, weights_i2t, (~same_image).float().cpu())
    weights_t2i = torch.where(weights_t2i.sum(1, keepdim=True) > 0, weights_t2i, (~same_image.t()).float().cpu())
    neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    return neg_text.to(sim_i2t.device), neg_image.to(sim_i2t.device)


def _ones(image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
