"""Precision and device: turn the user's words into transformers loading arguments, or one clear error."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from .errors import PrecisionError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8", "nf4")

# Never quantized: the image tower, the Q-Former and the projection are small and sensitive (transformers'
# `_keep_in_fp32_modules` marks the Q-Former for fp32 for the same reason; blip2 keeps it fp32 in every precision).
KEEP_UNQUANTIZED = ["vision_model", "qformer", "language_projection", "query_tokens", "lm_head"]


@dataclass(frozen=True)
class LoadPlan:
    precision: str  # resolved: fp32 | bf16 | fp16 | int8 | nf4
    dtype: torch.dtype  # for every floating-point weight that is not quantized (Q-Former stays fp32 regardless)
    device: str  # "cpu", "cuda", "cuda:1", or "auto" (accelerate device map over the GPUs)
    quantization_config: object | None = None

    @property
    def device_map(self):
        return "auto" if self.device == "auto" else {"": self.device}

    @property
    def torch_device(self) -> torch.device:
        """Where inputs go; with a device map the LLM's input embeddings decide, so callers check the model."""
        return torch.device("cuda:0" if self.device == "auto" else self.device)


def resolve(precision: str = "auto", device: str = "auto", *, low_memory: bool = False) -> LoadPlan:
    """Resolve ``precision`` (fp32/bf16/fp16/int8/nf4/auto) and ``device`` (auto/cpu/cuda/cuda:N).

    auto precision: fp16 on a GPU (int8 when ``low_memory``); fp32 on CPU (int8 when ``low_memory``). On CPU fp32
    decodes faster than bf16 even where the CPU has bf16 instructions: with :class:`SmallBatchCpuLinear` the fp32
    decoding step streams weights at ~2x the rate oneDNN's bf16 kernels reach, which outweighs reading half the
    bytes (64 tokens of SmolLM2-135M: 2.3-3.0 vs 4.3-4.5 s on an AVX512-BF16 EPYC, benchmarks/bench_inference.py), and
    CPUs without bf16 instructions emulate it (1.3x slower to decode, ~5x slower to prefill, AVX2 EPYC). bf16 halves
    the memory: ask for it for big checkpoints. auto device: every visible GPU through accelerate's device map,
    else the CPU.
    """
    precision = (precision or "auto").lower()
    if precision not in PRECISIONS:
        raise PrecisionError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    device = _resolve_device(device or "auto")
    on_gpu = device != "cpu"
    if precision == "auto":
        if on_gpu:
            precision = "int8" if low_memory else "fp16"
        else:
            precision = "int8" if low_memory else "fp32"
    if precision == "fp16" and not on_gpu:
        raise PrecisionError(
            "fp16 needs a CUDA GPU (CPU kernels for half precision are slow or missing). "
            "On CPU use --precision bf16 or fp32, or int8/nf4 to save memory."
        )
    if precision in ("int8", "nf4"):
        return _quantized_plan(precision, device, on_gpu)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return LoadPlan(precision, dtype, device)


def _resolve_device(device: str) -> str:
    device = device.lower()
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PrecisionError(
                f"Device {device!r} was requested but no CUDA GPU is visible (torch {torch.__version__}, "
                f"CUDA build: {torch.version.cuda or 'no'}). Use --device cpu, or install a CUDA build of torch."
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise PrecisionError(f"Device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible.")
        return device
    if device == "cpu":
        return device
    raise PrecisionError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.")


def _quantized_plan(precision: str, device: str, on_gpu: bool) -> LoadPlan:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise PrecisionError(
            f"{precision} needs bitsandbytes, which is not installed. Install it with: pip install bitsandbytes "
            "(or choose --precision bf16/fp32)."
        )
    from transformers import BitsAndBytesConfig

    # Compute dtype of the non-quantized parts and of nf4 matmuls: fp16 on GPU; fp32 on CPU, where bitsandbytes'
    # CPU kernels are exact in fp32 and fp16 is not supported.
    dtype = torch.float16 if on_gpu else torch.float32
    if precision == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_UNQUANTIZED)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=KEEP_UNQUANTIZED,
        )
    return LoadPlan(precision, dtype, device, config)


def keep_cpu_4bit_layers_unpacked(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' AVX512-BF16 weight repacking for 4-bit layers it cannot repack.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks every ``Linear4bit`` weight on its first forward, assuming
    ``in_features`` is a multiple of the quantization block (64) and ``out_features`` of 32; any other layer crashes
    with a reshape error. Such layers keep the portable kernel instead. Returns how many layers were changed.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        quant_state = getattr(module.weight, "quant_state", None)
        blocksize = getattr(quant_state, "blocksize", 64)
        if module.in_features % blocksize or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


class SmallBatchCpuLinear(torch.nn.Linear):
    """``nn.Linear`` that computes products with few rows (1-8) on the CPU as ``W @ x.T``.

    Why: every decoding step multiplies one row per sequence (per beam) by each weight matrix. ``F.linear``
    computes ``x @ W.T``, and for such skinny products MKL (2024) picks kernels that, on the 2-core AMD EPYC
    machines here, stream fp32 weights at ~12 GB/s; ``W @ x.T`` with at least two rows takes a kernel that reads
    every weight once at ~25-28 GB/s. A single row gets a second row of zeros (its result dropped), because for
    one row MKL falls back to its matrix-vector kernel, as slow as ``x @ W.T``. Measured over SmolLM2-135M's
    layers (min of 5 runs): 1 row 37 -> 18 ms, 2 rows 58 -> 18 ms, 4 rows 49 -> 23 ms, 8 rows 42 -> 36 ms; from 9
    rows on ``x @ W.T`` is faster again and is kept, as are bf16 (oneDNN, already faster one row at a time), GPUs
    and quantized layers. The results equal ``nn.Linear``'s up to float rounding.
    """

    max_rows = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[:-1].numel()
        if x.device.type != "cpu" or x.dtype != torch.float32 or not 1 <= rows <= self.max_rows:
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        out = (self.weight @ flat.t())[:, :rows].t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_small_batch_cpu_linears(model: torch.nn.Module) -> int:
    """Make the fp32 CPU ``nn.Linear`` layers of ``model`` :class:`SmallBatchCpuLinear` (same parameters, same
    state dict; only their forward changes). Quantized layers subclass ``nn.Linear`` and are left alone. Returns
    how many layers changed."""
    changed = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:
            continue
        if module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = SmallBatchCpuLinear
            changed += 1
    return changed


def adapt_llm_to_cpu_kernels(llm: torch.nn.Module) -> None:
    """What every loaded LLM needs for the CPU kernels it will run on (a no-op on GPUs): see
    :func:`keep_cpu_4bit_layers_unpacked` and :func:`use_small_batch_cpu_linears`."""
    keep_cpu_4bit_layers_unpacked(llm)
    use_small_batch_cpu_linears(llm)
