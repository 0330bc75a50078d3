"""GPU figures for a checkpoint of official size: memory and decode speed per precision, blip2 vs transformers.

Builds an official-format BLIP-2 checkpoint with the shapes of ``Salesforce/blip2-opt-2.7b`` (EVA ViT-g 39 layers,
Q-Former 12 layers, OPT-2.7B; 3.7 B parameters) and random weights, on the GPU, so it needs no download. Then,
for each precision (fp16, nf4, int8 by default), measured side by side in one process on one GPU:

- memory: ``torch.cuda.memory_allocated`` after ``blip2.load`` and the peak while generating one reply;
- decode: tokens/s of ``model.generate_reply`` against plain ``Blip2ForConditionalGeneration.generate`` loaded with
  the same settings (same prompt ids, greedy, exactly N new tokens, alternating runs, median);
- fp16 only: time to first token of a second chat turn with blip2's caches vs after ``clear_caches()``.

Random weights make the text meaningless but not the timings or the memory. Each finished row is written to
``--json`` at once, so a run cut short keeps what it measured.

    python benchmarks/bench_gpu.py [--precisions fp16,nf4,int8] [--new-tokens 64] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_inference import (  # noqa: E402
    LONG_NEXT, LONG_QUESTIONS, TURN1, TURN2, log, median, part2_row, run_blip2, test_image,
)

NUM_QUERY_TOKENS = 32
PROMPT = "Question: what is in this picture? Answer:"
GiB = 1024**3


def build_checkpoint(folder: Path, device: str, tiny: bool) -> None:
    """blip2-opt-2.7b shapes, random fp16 weights, saved in the official format with a small stand-in tokenizer.
    ``tiny``: a few small layers instead (to try this script on a CPU)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import make_tokenizer  # a 300-token BPE with OPT's special tokens: ids fit any vocabulary

    tokenizer = make_tokenizer("opt")
    processor = Blip2Processor(BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer,
                               num_query_tokens=NUM_QUERY_TOKENS)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4) if tiny else {}
    text = OPTConfig(**{**dict(hidden_size=2560, num_hidden_layers=32, ffn_dim=10240, num_attention_heads=32,
                               word_embed_proj_dim=2560), **small, **(dict(ffn_dim=128, word_embed_proj_dim=64) if tiny else {})},
                     vocab_size=50272, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = Blip2VisionConfig(**small, intermediate_size=128) if tiny else Blip2VisionConfig()  # defaults: EVA ViT-g/14
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=Blip2QFormerConfig(**small, intermediate_size=128, encoder_hidden_size=vision.hidden_size).to_dict()
        if tiny else Blip2QFormerConfig(encoder_hidden_size=vision.hidden_size).to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16 if device != "cpu" else torch.float32)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    log(f"built {count / 1e9:.2f} B parameters into {folder}")


def gpu_memory(fn):
    """Run ``fn``; return (result, GiB allocated afterwards above the start, peak GiB above the start)."""
    if not torch.cuda.is_available():
        return fn(), float("nan"), float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return result, (torch.cuda.memory_allocated() - start) / GiB, (torch.cuda.max_memory_allocated() - start) / GiB


def reference(folder: Path, ours, precision: str, device: str):
    from transformers import Blip2ForConditionalGeneration

    from blip2.precision import resolve

    plan = resolve(precision, device)
    hf = Blip2ForConditionalGeneration.from_pretrained(
        folder, dtype=plan.dtype, quantization_config=plan.quantization_config, device_map=plan.device_map
    ).eval()
    hf.qformer.to(ours.qformer.layernorm.weight.dtype)  # blip2 keeps the Q-Former in fp32, as transformers intends
    hf.query_tokens.data = hf.query_tokens.data.to(ours.query_tokens.dtype)
    return hf


def run_transformers(hf, processor, image, n: int):
    """Plain transformers as its model card shows it: Blip2Processor (image tokens, then BOS + prompt) + generate."""
    t0 = time.perf_counter()
    inputs = processor(images=image, text=PROMPT, return_tensors="pt").to(hf.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(hf.vision_model.dtype)
    with torch.inference_mode():
        out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return time.perf_counter() - t0, ids


def measure(folder: Path, precision: str, n: int, repeats: int, image, device: str) -> dict:
    import blip2
    from transformers import Blip2Processor

    tag = f"[{precision}]"
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, loaded, _ = gpu_memory(lambda: blip2.load(str(folder), precision=precision, device=device))
    load_s = time.perf_counter() - t0
    (_, first_ids), _, peak = gpu_memory(lambda: run_blip2(ours, image, PROMPT, n))
    log(f"{tag} blip2.load {load_s:.1f} s, {loaded:.2f} GiB after loading, {peak:.2f} GiB peak while generating")

    hf = reference(folder, ours, precision, device)
    processor = Blip2Processor.from_pretrained(folder)
    ours_ids = ours._tokenize(ours.prompt_format.raw(PROMPT, ours.tokenizer))
    hf_ids = processor(images=image, text=PROMPT, return_tensors="pt")["input_ids"][0].tolist()
    sides = {
        "blip2": lambda: run_blip2(ours, image, PROMPT, n),
        "transformers": lambda: run_transformers(hf, processor, image, n),
    }
    warm = {name: fn()[1] for name, fn in sides.items()}  # warm-up, one each
    times = {name: [] for name in sides}
    same = warm["blip2"] == warm["transformers"] == first_ids
    for r in range(repeats):
        for name, fn in sides.items():
            seconds, ids = fn()
            times[name].append(seconds)
            same = same and ids == warm["blip2"]
        log(f"{tag} run {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    if not same:
        log(f"{tag} token ids differ: blip2 {warm['blip2'][:12]} transformers {warm['transformers'][:12]}")
    row = {"precision": precision, "prompt_ids_match": ours_ids == hf_ids, "load_s": load_s, "allocated_after_load_gib": loaded,
           "peak_while_generating_gib": peak, "new_tokens": n, "same_token_ids": same}
    for name, values in times.items():
        row[f"{name}_seconds"] = values
        row[f"{name}_tokens_per_s"] = n / median(values)
    row["ratio_blip2_over_transformers"] = row["blip2_tokens_per_s"] / row["transformers_tokens_per_s"]
    del hf
    if precision in ("fp16", "fp32"):
        replies = {}
        row["chat_ttft"] = [
            part2_row(ours, image, "1 previous turn", [TURN1], TURN2, 48, repeats, precision, replies),
            part2_row(ours, image, "4 previous turns", LONG_QUESTIONS, LONG_NEXT, 48, repeats, precision, replies),
        ]
    del ours
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp16,nf4,int8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT", help="write the figures as JSON to OUT (after every row)")
    parser.add_argument("--folder", help="where to build the checkpoint (default: a temporary folder)")
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny to try the script")
    parser.add_argument("--tiny", action="store_true", help="a few small layers instead of the official shapes")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU (or --device cpu --tiny --precisions fp32 to try it)")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    result = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "gpu": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu", "cuda": torch.version.cuda}, "rows": []}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))

    log(f"{result['env']}")
    folder = Path(args.folder or tempfile.mkdtemp(prefix="blip2-opt-2.7b-shapes-"))
    if not (folder / "config.json").exists():
        build_checkpoint(folder, args.device, args.tiny)
    image = test_image()
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        result["rows"].append(measure(folder, precision, args.new_tokens, args.repeats, image, args.device))
        save()

    print(f"\nblip2-opt-2.7b shapes (random weights) on {result['env']['gpu']}, torch {result['env']['torch']}, "
          f"transformers {result['env']['transformers']}; greedy, {args.new_tokens} new tokens, median of "
          f"{args.repeats} alternating runs")
    print("| precision | GiB after load | GiB peak (1 reply) | blip2 tok/s | transformers tok/s | ratio | same ids |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['precision']} | {r['allocated_after_load_gib']:.2f} | {r['peak_while_generating_gib']:.2f} | "
              f"{r['blip2_tokens_per_s']:.1f} | {r['transformers_tokens_per_s']:.1f} | "
              f"{r['ratio_blip2_over_transformers']:.2f}x | {'yes' if r['same_token_ids'] else 'NO'} |")
        for t in r.get("chat_ttft", []):
            print(f"|   TTFT {t['conversation']}: cached {t['cached_median_s'] * 1e3:.0f} ms (reused "
                  f"{t['reused_prefix_tokens']}/{t['prompt_tokens']}) vs uncached {t['uncached_median_s'] * 1e3:.0f} ms"
                  f" = {t['speedup']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
