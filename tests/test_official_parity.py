"""Official-format checkpoints must decode token-for-token like plain transformers.

The reference is `Blip2Processor` + `Blip2ForConditionalGeneration.generate`, nothing of ours; the checkpoints are
tiny random models saved in the official format (conftest.py), one with an OPT and one with a T5 text model.
"""

import warnings

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from conftest import image

PROMPTS = {"opt": "Question: what is in the picture? Answer:", "t5": "Question: what is in the picture? Short answer:"}
SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=3, length_penalty=-1.0),
    dict(num_beams=2, length_penalty=1.5, repetition_penalty=1.3),
]


def reference_tokens(ref, processor, kind, pil, prompt, settings):
    inputs = processor(images=pil, text=prompt, return_tensors="pt") if prompt else processor(images=pil, return_tensors="pt")
    out = ref.generate(**inputs, max_new_tokens=10, min_new_tokens=10, **settings)
    if kind == "opt":  # decoder-only generate returns prompt + reply
        # Without text, generate builds [image tokens] + [BOS] itself and returns them too.
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else ref.config.num_query_tokens + 1
        return out[0, prompt_length:].tolist()
    return out[0, 1:].tolist()  # drop the decoder start token


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, opt_checkpoint, t5_checkpoint):
    folder = {"opt": opt_checkpoint, "t5": t5_checkpoint}[request.param]
    ref = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = Blip2Processor.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = blip2.load(str(folder), precision="fp32", device="cpu")
    return request.param, ref, processor, ours


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "beam3-lp-1", "beam2-rep"])
def test_token_identical_to_transformers(pair, settings):
    kind, ref, processor, ours = pair
    outputs = set()
    for seed in range(3):
        pil = image(seed)
        expected = reference_tokens(ref, processor, kind, pil, PROMPTS[kind], settings)
        with ours.stream(pil, PROMPTS[kind], max_new_tokens=10, min_new_tokens=10, no_repeat_ngram_size=0, **settings) as s:
            text = "".join(s)
        assert s.reply.token_ids == expected, f"{kind} seed {seed}"
        assert text.strip() == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()
        outputs.add(tuple(expected))
    # The comparison only means something if the image changes the output.
    assert len(outputs) > 1


def test_empty_prompt_captioning_matches(opt_checkpoint):
    """No prompt: transformers starts from [image tokens] + BOS; our caption prompt for the official format is
    empty and must do the same. (OPT only: transformers' prompt-less path needs a BOS token, which T5 lacks.)"""
    kind, ref, processor = "opt", Blip2ForConditionalGeneration.from_pretrained(opt_checkpoint).eval(), Blip2Processor.from_pretrained(opt_checkpoint)
    ours = blip2.load(str(opt_checkpoint), precision="fp32", device="cpu")
    pil = image(5)
    expected = reference_tokens(ref, processor, kind, pil, None, dict(num_beams=1))
    with ours.stream(pil, ours.prompt_format.caption_prompt, max_new_tokens=10, min_new_tokens=10,
                     no_repeat_ngram_size=0) as s:
        list(s)
    assert s.reply.token_ids == expected


def test_query_embeddings_match_transformers(pair):
    kind, ref, processor, ours = pair
    pixel_values = processor(images=image(3), return_tensors="pt")["pixel_values"]
    expected = ref.get_image_features(pixel_values).pooler_output
    assert torch.allclose(ours.query_embeddings(pixel_values), expected, atol=1e-6)


def test_prompt_format_follows_family(pair):
    kind, _, _, ours = pair
    assert ours.info.llm_family == {"opt": "decoder", "t5": "encoder-decoder"}[kind]
    expected = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}[kind]
    assert ours.prompt_format.question_template == expected
