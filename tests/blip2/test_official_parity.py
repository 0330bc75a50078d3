"""Official-format checkpoints must decode token-for-token like plain transformers.

The reference is `Blip2Processor` + `Blip2ForConditionalGeneration.generate`, nothing of ours; the checkpoints are
tiny random models saved in the official format (conftest.py), one with an OPT and one with a T5 text model.

CI runs them on the CPU in fp32. On a GPU the same tests check the other precisions against transformers loaded
with the same settings, e.g. ``BLIP2_TEST_DEVICE=cuda BLIP2_TEST_PRECISIONS=fp16,bf16,int8,nf4 pytest
tests/blip2/test_official_parity.py``.
"""

import os
import warnings

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

import blip2
from blip2.precision import resolve
from conftest import image

DEVICE = os.environ.get("BLIP2_TEST_DEVICE", "cpu")
PRECISIONS = [p.strip() for p in os.environ.get("BLIP2_TEST_PRECISIONS", "fp32").split(",") if p.strip()]

PROMPTS = {"opt": "Question: what is in the picture? Answer:", "t5": "Question: what is in the picture? Short answer:"}
SETTINGS = [
    dict(num_beams=1),
    dict(num_beams=3, length_penalty=-1.0),
    dict(num_beams=2, length_penalty=1.5, repetition_penalty=1.3),
]


def reference_model(folder, ours, precision: str):
    """Plain transformers with the same dtype / quantization settings and device as ``ours``, and the Q-Former in
    the dtype blip2 keeps it in (fp32), so both sides compute the same numbers."""
    plan = resolve(precision, DEVICE)
    ref = Blip2ForConditionalGeneration.from_pretrained(
        folder, dtype=plan.dtype, quantization_config=plan.quantization_config, device_map=plan.device_map
    ).eval()
    ref.qformer.to(ours.qformer.layernorm.weight.dtype)
    ref.query_tokens.data = ref.query_tokens.data.to(ours.query_tokens.dtype)
    return ref


def reference_inputs(ref, processor, pil, prompt):
    inputs = processor(images=pil, text=prompt, return_tensors="pt") if prompt else processor(images=pil, return_tensors="pt")
    inputs = inputs.to(ref.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(ref.vision_model.embeddings.patch_embedding.weight.dtype)
    return inputs


def reference_tokens(ref, processor, kind, pil, prompt, settings):
    inputs = reference_inputs(ref, processor, pil, prompt)
    out = ref.generate(**inputs, max_new_tokens=10, min_new_tokens=10, **settings)
    if kind == "opt":  # decoder-only generate returns prompt + reply
        # Without text, generate builds [image tokens] + [BOS] itself and returns them too.
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else ref.config.num_query_tokens + 1
        return out[0, prompt_length:].tolist()
    return out[0, 1:].tolist()  # drop the decoder start token


@pytest.fixture(scope="module", params=[(k, p) for k in ("opt", "t5") for p in PRECISIONS],
                ids=lambda param: "-".join(param))
def pair(request, opt_checkpoint, t5_checkpoint):
    kind, precision = request.param
    folder = {"opt": opt_checkpoint, "t5": t5_checkpoint}[kind]
    processor = Blip2Processor.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = blip2.load(str(folder), precision=precision, device=DEVICE)
    return kind, reference_model(folder, ours, precision), processor, ours


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
    pixel_values = reference_inputs(ref, processor, image(3), None)["pixel_values"]
    expected = ref.get_image_features(pixel_values).pooler_output
    got = ours.query_embeddings(pixel_values)
    assert got.dtype == expected.dtype and got.device == expected.device
    tolerance = 1e-6 if got.dtype == torch.float32 else 1e-2 * expected.abs().max().item()
    assert torch.allclose(got, expected, atol=tolerance)


def test_prompt_format_follows_family(pair):
    kind, _, _, ours = pair
    assert ours.info.llm_family == {"opt": "decoder", "t5": "encoder-decoder"}[kind]
    expected = {"opt": "Question: {} Answer:", "t5": "Question: {} Short answer:"}[kind]
    assert ours.prompt_format.question_template == expected
