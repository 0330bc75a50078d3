"""Precision/device resolution, and int8/nf4 loading on CPU (bitsandbytes' CPU backend)."""

import importlib.util
import warnings

import pytest
import torch

import blip2
from blip2.precision import SmallBatchCpuLinear, keep_cpu_4bit_layers_unpacked, resolve, use_small_batch_cpu_linears
from conftest import image


def test_auto_on_cpu_is_fp32_or_int8_for_low_memory():
    assert resolve("auto", "cpu").precision == "fp32"
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


@pytest.mark.parametrize("shape", [(1, 1, 24), (1, 24), (2, 1, 24), (5, 24), (1, 8, 24), (3, 3, 24), (7,)])
@pytest.mark.parametrize("bias", [True, False])
def test_small_batch_linear_equals_nn_linear(shape, bias):
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40, bias=bias)
    fast = torch.nn.Linear(24, 40, bias=bias)
    fast.load_state_dict(plain.state_dict())
    assert use_small_batch_cpu_linears(fast) == 1 and isinstance(fast, SmallBatchCpuLinear)
    x = torch.randn(*shape[:-1], 24, requires_grad=True) if len(shape) > 1 else torch.randn(24, requires_grad=True)
    expected, got = plain(x), fast(x)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    (grad_expected,) = torch.autograd.grad(expected.sum(), x)
    (grad_got,) = torch.autograd.grad(got.sum(), x)
    assert torch.allclose(grad_got, grad_expected, atol=1e-5)


def test_small_batch_linears_only_replace_fp32_cpu_layers():
    bnb = pytest.importorskip("bitsandbytes")
    layers = torch.nn.Sequential(
        torch.nn.Linear(8, 4), torch.nn.Linear(8, 4).to(torch.bfloat16), bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False)
    )
    assert use_small_batch_cpu_linears(layers) == 1
    assert [type(layer).__name__ for layer in layers] == ["SmallBatchCpuLinear", "Linear", "Linear8bitLt"]


def test_fp32_cpu_load_uses_small_batch_linears_in_the_llm_only(opt_checkpoint):
    from transformers import Blip2ForConditionalGeneration

    model = blip2.load(str(opt_checkpoint), precision="fp32", device="cpu")
    llm_linears = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    assert llm_linears and all(type(m) is SmallBatchCpuLinear for m in llm_linears)
    assert type(model.language_projection) is torch.nn.Linear
    assert not any(isinstance(m, SmallBatchCpuLinear) for m in model.qformer.modules())
    # Same parameters under the same names as transformers' model (checkpoints and exports are unaffected).
    plain = Blip2ForConditionalGeneration.from_pretrained(str(opt_checkpoint), dtype=torch.float32).language_model
    ours = model.language_model.state_dict()
    assert ours.keys() == plain.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in plain.state_dict().items())
    bf16 = blip2.load(str(opt_checkpoint), precision="bf16", device="cpu")
    assert not any(isinstance(m, SmallBatchCpuLinear) for m in bf16.language_model.modules())
