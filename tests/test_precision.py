"""Precision/device resolution, and int8/nf4 loading on CPU (bitsandbytes' CPU backend)."""

import importlib.util
import warnings

import pytest
import torch

import blip2
from blip2.precision import keep_cpu_4bit_layers_unpacked, resolve
from conftest import image


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_depends_on_native_bf16(monkeypatch, native_bf16, expected):
    monkeypatch.setattr("blip2.precision.cpu_has_native_bf16", lambda: native_bf16)
    assert resolve("auto", "cpu").precision == expected
    assert resolve("auto", "cpu", low_memory=True).precision == "int8"


def test_fp16_on_cpu_names_the_fix():
    with pytest.raises(blip2.PrecisionError, match="bf16 or fp32"):
        resolve("fp16", "cpu")


def test_unknown_precision():
    with pytest.raises(blip2.PrecisionError, match="Unknown precision 'fp8'"):
        resolve("fp8", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_requested_without_gpu():
    with pytest.raises(blip2.PrecisionError, match="no CUDA GPU"):
        resolve("fp32", "cuda")


def test_unknown_device():
    with pytest.raises(blip2.PrecisionError, match="Unknown device"):
        resolve("fp32", "tpu")


def test_int8_without_bitsandbytes(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(blip2.PrecisionError, match="pip install bitsandbytes"):
        resolve("int8", "cpu")


@pytest.mark.parametrize("precision, layer", [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantizes_only_the_llm(opt_checkpoint, precision, layer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = blip2.load(str(opt_checkpoint), precision=precision, device="cpu")
        reference = blip2.load(str(opt_checkpoint), precision="fp32", device="cpu")
    llm_layers = {type(m).__name__ for m in model.language_model.modules()}
    assert layer in llm_layers
    for part in (model.vision, model.qformer, model.language_projection):
        kinds = {type(m).__name__ for m in part.modules()}
        assert not kinds & {"Linear8bitLt", "Linear4bit"}
        assert all(p.dtype == torch.float32 for p in part.parameters())
    assert model.info.precision == precision
    # Quantization error is small on this tiny model: the first reply tokens agree with fp32.
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, no_repeat_ngram_size=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with model.stream(image(0), "Question: what? Answer:", **kwargs) as quantized:
            list(quantized)
        with reference.stream(image(0), "Question: what? Answer:", **kwargs) as full:
            list(full)
    assert quantized.reply.token_ids[:2] == full.reply.token_ids[:2]


def test_4bit_layers_bitsandbytes_cannot_repack_keep_the_portable_kernel():
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs assuming in_features is a multiple of its 64-wide
    # quantization block; a 32-wide layer crashed there. Forced on, so the check runs on any CPU.
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        bnb.nn.Linear4bit(32, 64, quant_type="nf4", compute_dtype=torch.float32),
        bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32),
    ).to("cpu")
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    assert keep_cpu_4bit_layers_unpacked(layers) == 1
    assert [layer.support_avx512bf16_for_cpu for layer in layers] == [False, True]
    narrow = layers[0]
    weight = bnb.functional.dequantize_4bit(narrow.weight.data, narrow.weight.quant_state)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.allclose(narrow(x), x @ weight.T + narrow.bias, atol=1e-5)


def test_bf16_keeps_qformer_fp32(opt_checkpoint):
    model = blip2.load(str(opt_checkpoint), precision="bf16", device="cpu")
    assert model.qformer.layernorm.weight.dtype == torch.float32
    assert model.language_model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.generate(image(0), "Question: what? Answer:", max_new_tokens=3) is not None
