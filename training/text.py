"""Stage-2 texts as LLM token ids: (prompt, target) -> input ids, image positions and loss labels.

Every prompt is rendered by ``blip2.prompts`` (the serving code), so the model is trained on exactly the token
layout it is served with.
"""

from __future__ import annotations

import torch

from blip2.prompts import PromptFormat, prompt_ids

from .config import ConfigError


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
