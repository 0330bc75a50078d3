"""Inference benchmark for the ``blip2`` package, measured side by side in one process.

Part 1, decode throughput: ``blip2`` against plain ``transformers`` (``Blip2ForConditionalGeneration.generate``) on
one official-format BLIP-2 checkpoint whose LLM is the real SmolLM2-135M-Instruct (small random ViT and Q-Former in
front of it). Same image, same prompt token ids, greedy, exactly N new tokens; wall time per call includes image
preprocessing, the image tower, the Q-Former, prefill and decode. blip2's caches are cleared before every run.

Part 2, time to first token of a second chat turn on the offline default model (EfficientNet-Lite0 + SmolLM2):
with blip2's caches warm from the previous turn (image queries cached, prompt prefix key/values reused) against
recomputing everything after ``clear_caches()``.

    python benchmarks/bench_inference.py [--precisions fp32,bf16] [--new-tokens 64] [--repeats 3] [--json OUT]

Runs offline. The benchmark checkpoint is built once into ``$BLIP2_CACHE/bench/`` (default ``~/.cache/blip2/bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

START = time.perf_counter()
NUM_QUERY_TOKENS = 32
BENCH_CHECKPOINT = "blip2-smollm2-135m-vit256-v1"  # bump the suffix when the recipe below changes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

PART1_PROMPT = "Describe this picture in detail."
TURN1 = "What is in this picture? Describe it in detail."
TURN2 = "What colours do you see?"
# The longer conversation: four previous turns, then a fifth question.
LONG_QUESTIONS = [
    TURN1,
    TURN2,
    "Is there an animal in it? What is it doing?",
    "Where might this photo have been taken?",
]
LONG_NEXT = "Write a short title for this picture."


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_image():
    from PIL import Image
    from skimage import data

    return Image.fromarray(data.chelsea())  # 451x300 RGB cat


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# The benchmark checkpoint


def bench_checkpoint() -> Path:
    """An official-format BLIP-2 folder: random small ViT + Q-Former, real SmolLM2-135M-Instruct. Built once."""
    from blip2.offline import cache_dir, converted_smollm2

    target = cache_dir() / "bench" / BENCH_CHECKPOINT
    if (target / "config.json").exists() and (target / "model.safetensors").exists():  # renamed into place whole
        log(f"benchmark checkpoint cached: {target}")
        return target

    log("converting SmolLM2-135M-Instruct (first run only, ~15 s) ...")
    llm_dir = converted_smollm2()
    log(f"building the benchmark checkpoint in {target} (first run only) ...")
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration,
                              Blip2Processor, Blip2QFormerConfig, Blip2VisionConfig, BlipImageProcessor)

    tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": 224, "width": 224}), tokenizer, num_query_tokens=NUM_QUERY_TOKENS
    )  # adds the <image> token to the tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    llm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    if llm.get_input_embeddings().weight.shape[0] < len(tokenizer):
        llm.resize_token_embeddings(len(tokenizer))
    vision = Blip2VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                               image_size=224, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                                 encoder_hidden_size=vision.hidden_size)
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=llm.config.to_dict(),
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    result = model.language_model.load_state_dict(llm.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]  # tied to the embeddings
    if missing or result.unexpected_keys:
        raise RuntimeError(f"SmolLM2 weights did not fit: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    model.language_model.tie_weights()
    assert torch.equal(model.language_model.get_input_embeddings().weight, llm.get_input_embeddings().weight)
    if llm.generation_config is not None:
        model.generation_config.bos_token_id = llm.generation_config.bos_token_id
        model.generation_config.eos_token_id = llm.generation_config.eos_token_id
        model.generation_config.pad_token_id = llm.generation_config.pad_token_id

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BENCH_CHECKPOINT}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del model, llm
    log("benchmark checkpoint built")
    return target


# ---------------------------------------------------------------------------------------------------------------
# Part 1: decode throughput


def run_blip2(model, image, prompt: str, n: int):
    model.clear_caches()  # no cached image queries or key/value prefixes from the previous run
    t0 = time.perf_counter()
    stream = model.stream(image, prompt, max_new_tokens=n, min_new_tokens=n, no_repeat_ngram_size=0)
    for _ in stream:
        pass
    seconds = time.perf_counter() - t0
    return seconds, list(stream.reply.token_ids)


def run_transformers(hf, processor, image, before: str, after: str, n: int):
    t0 = time.perf_counter()
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(hf.vision_model.dtype)
    # The image slot where blip2 puts it in a chat prompt (after the system turn); <image> is a special token, so
    # the text on each side is tokenized on its own exactly as blip2 does.
    text = before + processor.image_token.content * NUM_QUERY_TOKENS + after
    enc = processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.inference_mode():
        out = hf.generate(
            pixel_values=pixel_values, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
            temperature=None, top_p=None, top_k=None,
        )
    seconds = time.perf_counter() - t0
    return seconds, out[0, enc["input_ids"].shape[1]:].tolist(), enc["input_ids"][0].tolist()


def part1(folder: Path, precision: str, n: int, repeats: int, image) -> dict:
    import blip2
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    dtype = DTYPES[precision]
    log(f"[part 1 {precision}] loading with blip2.load ...")
    ours = blip2.load(str(folder), precision=precision, device="cpu")
    log(f"[part 1 {precision}] loading with Blip2ForConditionalGeneration.from_pretrained ...")
    hf = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).eval()
    processor = Blip2Processor.from_pretrained(str(folder))

    rendered = ours.prompt_format.raw(PART1_PROMPT, ours.tokenizer)
    ours_ids = ours._tokenize(rendered)

    log(f"[part 1 {precision}] warm-up (one run each) ...")
    _, warm_ours = run_blip2(ours, image, PART1_PROMPT, n)
    _, warm_hf, hf_ids = run_transformers(hf, processor, image, rendered.before, rendered.after, n)
    if hf_ids != ours_ids:
        log(f"[part 1 {precision}] WARNING: prompt token ids differ (blip2 {len(ours_ids)}, transformers {len(hf_ids)})")

    times = {"blip2": [], "transformers": []}
    same = warm_ours == warm_hf
    for r in range(repeats):
        t, ids_a = run_blip2(ours, image, PART1_PROMPT, n)
        times["blip2"].append(t)
        t, ids_b, _ = run_transformers(hf, processor, image, rendered.before, rendered.after, n)
        times["transformers"].append(t)
        same = same and ids_a == ids_b == warm_ours and len(ids_a) == n
        log(f"[part 1 {precision}] run {r + 1}/{repeats}: blip2 {times['blip2'][-1]:.2f}s, "
            f"transformers {times['transformers'][-1]:.2f}s")
    if not same:
        first_diff = next((i for i, (a, b) in enumerate(zip(warm_ours, warm_hf)) if a != b), None)
        log(f"[part 1 {precision}] WARNING: token ids differ (first difference at position {first_diff})")
    text = ours.tokenizer.decode(warm_ours, skip_special_tokens=True).strip()
    log(f"[part 1 {precision}] blip2 reply: {text[:100]!r}")
    med_ours, med_hf = median(times["blip2"]), median(times["transformers"])
    row = {
        "precision": precision,
        "prompt_tokens": len(ours_ids),
        "prompt_ids_match": hf_ids == ours_ids,
        "new_tokens": n,
        "blip2_seconds": times["blip2"],
        "transformers_seconds": times["transformers"],
        "blip2_median_s": med_ours,
        "transformers_median_s": med_hf,
        "blip2_tokens_per_s": n / med_ours,
        "transformers_tokens_per_s": n / med_hf,
        "ratio_blip2_over_transformers": (n / med_ours) / (n / med_hf),
        "same_token_ids": same,
    }
    del ours, hf
    return row


# ---------------------------------------------------------------------------------------------------------------
# Part 2: time to first token of the next chat turn, cached vs recomputed


def chat_turn(model, image, history, message, n, min_n=0):
    stream = model.chat(image, history, message, stream=True, max_new_tokens=n, min_new_tokens=min_n)
    for _ in stream:
        pass
    return stream.reply


def part2_row(model, image, label, prev_questions, next_question, reply_tokens, repeats, precision) -> dict:
    """prev_questions are asked first (their replies become the history); then ``next_question`` is timed."""
    model.clear_caches()
    history = []
    for q in prev_questions:
        reply = chat_turn(model, image, history, q, reply_tokens, reply_tokens)
        history.append((q, reply.text))
    before, last = history[:-1], history[-1]

    def cached():
        # Rerun the last previous turn from clean caches, so the prefix cache holds exactly that conversation.
        model.clear_caches()
        again = chat_turn(model, image, before, last[0], reply_tokens, reply_tokens)
        if again.text != last[1]:
            log(f"[part 2 {precision}] WARNING: rerun of the previous turn gave a different reply")
        return chat_turn(model, image, history, next_question, 1)

    def uncached():
        model.clear_caches()  # recompute image encoder + Q-Former + the whole prefill
        return chat_turn(model, image, history, next_question, 1)

    cached(), uncached()  # warm-up
    warm, cold = [], []
    for r in range(repeats):
        warm.append(cached())
        cold.append(uncached())
        log(f"[part 2 {precision}] {label} run {r + 1}/{repeats}: cached {warm[-1].first_token_seconds * 1e3:.0f} ms "
            f"(reused {warm[-1].reused_prefix_tokens}), uncached {cold[-1].first_token_seconds * 1e3:.0f} ms "
            f"(reused {cold[-1].reused_prefix_tokens})")
    med_warm = median([r.first_token_seconds for r in warm])
    med_cold = median([r.first_token_seconds for r in cold])
    return {
        "precision": precision,
        "conversation": label,
        "previous_turns": len(history),
        "prompt_tokens": warm[-1].prompt_tokens,
        "reused_prefix_tokens": warm[-1].reused_prefix_tokens,
        "uncached_reused_prefix_tokens": cold[-1].reused_prefix_tokens,
        "cached_ttft_s": [r.first_token_seconds for r in warm],
        "uncached_ttft_s": [r.first_token_seconds for r in cold],
        "cached_median_s": med_warm,
        "uncached_median_s": med_cold,
        "speedup": med_cold / med_warm,
    }


def part2(precision: str, repeats: int, image) -> list[dict]:
    import blip2

    log(f"[part 2 {precision}] loading blip2.load('default') ...")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "untrained Q-Former" notice: irrelevant for timing
        model = blip2.load("default", precision=precision, device="cpu")
    log(f"[part 2 {precision}] {model.info.summary()}")
    rows = [
        part2_row(model, image, "1 previous turn", [TURN1], TURN2, 48, repeats, precision),
        part2_row(model, image, "4 previous turns", LONG_QUESTIONS, LONG_NEXT, 48, repeats, precision),
    ]
    del model
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def report(env: dict, rows1: list[dict], rows2: list[dict], args) -> str:
    out = [
        "",
        "=" * 100,
        f"torch {env['torch']}, transformers {env['transformers']}, python {env['python']}",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs visible, avx512_bf16: {env['avx512_bf16']}, "
        f"amx_bf16: {env['amx_bf16']}); torch threads: {env['threads']}",
        "",
        f"Part 1: decode throughput, blip2 vs transformers. Official-format BLIP-2 checkpoint with SmolLM2-135M-Instruct "
        f"(random 2-layer ViT-256 + Q-Former, {NUM_QUERY_TOKENS} queries). Greedy, exactly {args.new_tokens} new tokens "
        f"(min_new_tokens = max_new_tokens, no_repeat_ngram_size=0), chelsea.png, median of {args.repeats} alternating "
        "runs after one warm-up each. Wall time per call = preprocessing + image tower + Q-Former + prefill + decode. "
        "blip2.clear_caches() runs before every blip2 call, so no image/prefix caching helps it.",
    ]
    if rows1:
        out.append(table(
            ["precision", "prompt tok", "blip2 s", "blip2 tok/s", "transformers s", "transformers tok/s",
             "blip2/transformers", "same token ids"],
            [[r["precision"], str(r["prompt_tokens"]), f"{r['blip2_median_s']:.3f}", f"{r['blip2_tokens_per_s']:.1f}",
              f"{r['transformers_median_s']:.3f}", f"{r['transformers_tokens_per_s']:.1f}",
              f"{r['ratio_blip2_over_transformers']:.2f}x", "yes" if r["same_token_ids"] else "NO"] for r in rows1],
        ))
    out += [
        "",
        f"Part 2: time to first token of the next chat turn, blip2.load('default') (EfficientNet-Lite0 + untrained "
        f"Q-Former + SmolLM2-135M-Instruct). Previous replies: 48 tokens each. Cached = right after the previous "
        f"turn (image queries + prompt-prefix key/values reused); uncached = after clear_caches() (image encoder + "
        f"Q-Former + full prefill). Reply.first_token_seconds, median of {args.turn_repeats} alternating runs "
        "(goal: >= 3x).",
    ]
    if rows2:
        out.append(table(
            ["precision", "conversation", "prompt tok", "reused tok", "cached TTFT ms", "uncached TTFT ms",
             "speedup"],
            [[r["precision"], r["conversation"], str(r["prompt_tokens"]), str(r["reused_prefix_tokens"]),
              f"{r['cached_median_s'] * 1e3:.0f}", f"{r['uncached_median_s'] * 1e3:.0f}", f"{r['speedup']:.1f}x"]
             for r in rows2],
        ))
    out.append("=" * 100)
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per part-1 generation (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side in part 1 (default 3)")
    parser.add_argument("--turn-repeats", type=int, default=5, help="timed runs per case in part 2 (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--parts", default="1,2", help="which parts to run (default 1,2)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = parser.parse_args(argv)

    precisions = [p.strip().lower() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in DTYPES]
    if unknown:
        parser.error(f"unknown precision(s) {unknown}; CPU benchmark supports {', '.join(DTYPES)}")
    parts = {p.strip() for p in args.parts.split(",")}
    torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()
    flags = cpu_flags()
    env = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "threads": torch.get_num_threads(),
    }
    log(f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, CPU {env['cpu']}")
    image = test_image()

    rows1, rows2 = [], []
    if "1" in parts:
        folder = bench_checkpoint()
        for precision in precisions:
            rows1.append(part1(folder, precision, args.new_tokens, args.repeats, image))
    if "2" in parts:
        for precision in precisions:
            rows2.extend(part2(precision, args.turn_repeats, image))

    print(report(env, rows1, rows2, args), flush=True)
    if args.json:
        payload = {"env": env, "args": vars(args), "decode_throughput": rows1, "chat_ttft": rows2,
                   "total_seconds": time.perf_counter() - START}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
