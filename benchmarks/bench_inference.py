"""Inference benchmark for the ``blip2`` package, measured side by side in one process.

Part 1, decode throughput: ``blip2`` against plain ``transformers`` (``Blip2ForConditionalGeneration.generate``) on
one official-format BLIP-2 checkpoint whose LLM is the real SmolLM2-135M-Instruct (small random ViT and Q-Former in
front of it). Same image, same prompt token ids, greedy, exactly N new tokens; wall time per call includes image
preprocessing, the image tower, the Q-Former, prefill and decode. blip2's caches are cleared before every run.

Part 2, time to first token of a second chat turn on the offline default model (EfficientNet-Lite0 + SmolLM2):
with blip2's caches warm from the previous turn (image queries cached, prompt prefix key/values reused) against
recomputing everything after ``clear_caches()``.

    python benchmarks/bench_inference.py [--precisions fp32,bf16] [--new-tokens 64] [--repeats 3] [--json OUT]
        [--turn-repeats 5] [--threads 2] [--parts 1,2] [--thread-baseline]

Both sides of part 1 run on blip2's compute thread (``blip2.compute``), so one thread does all the torch work, as
in the app. ``--thread-baseline`` adds a third part-1 column: transformers' generate in a fresh thread of its own,
which shows what a second torch thread costs (OpenMP then stops spinning between parallel regions; see
``blip2/compute.py``). On a shared (busy) machine the "other load" column and ``OMP_WAIT_POLICY=PASSIVE`` tell the
machine's noise apart.

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
import threading
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


class CpuMeter:
    """CPU time used by this process and by everything else on the machine between start() and stop(): the
    2-core test machines are shared, and other processes' load shows up directly in the timings."""

    def __init__(self):
        self.start()

    @staticmethod
    def _busy_seconds() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")

    def start(self):
        t = os.times()
        self.t0, self.own0, self.busy0 = time.perf_counter(), t.user + t.system, self._busy_seconds()

    def stop(self) -> dict:
        t, busy = os.times(), self._busy_seconds()
        wall = time.perf_counter() - self.t0
        own = t.user + t.system - self.own0
        other = None if busy is None or self.busy0 is None else max(0.0, busy - self.busy0 - own)
        return {"wall_s": wall, "own_cpu_s": own, "other_cpu_s": other,
                "other_cores": None if other is None else other / max(wall, 1e-9)}


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


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
    weights = ("model.safetensors", "model.safetensors.index.json")
    if (target / "config.json").exists() and any((target / w).exists() for w in weights):  # renamed into place whole
        log(f"benchmark checkpoint cached: {target}")
        return target

    log("locating SmolLM2-135M-Instruct (converted from the packaged GGUF on first use, ~15 s) ...")
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
    # The non-streaming API, like transformers' generate (streaming adds a worker thread and a detokenizer).
    reply = model.generate_reply(image, prompt, max_new_tokens=n, min_new_tokens=n, no_repeat_ngram_size=0)
    seconds = time.perf_counter() - t0
    return seconds, list(reply.token_ids)


def transformers_prompt(processor, before: str, after: str):
    """The image slot where blip2 puts it in a chat prompt (after the system turn). ``<image>`` is a special token,
    so the text on each side of it is tokenized on its own, exactly as blip2 does."""
    text = before + processor.image_token.content * NUM_QUERY_TOKENS + after
    return processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")


def run_transformers(hf, processor, image, before: str, after: str, n: int):
    t0 = time.perf_counter()
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(hf.device, hf.vision_model.dtype)
    enc = transformers_prompt(processor, before, after).to(hf.device)
    with torch.inference_mode():
        out = hf.generate(
            pixel_values=pixel_values, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
            max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
            temperature=None, top_p=None, top_k=None,
        )
    seconds = time.perf_counter() - t0
    return seconds, out[0, enc["input_ids"].shape[1]:].tolist()


def in_worker_thread(fn, *args):
    """Run ``fn`` in a fresh thread, as blip2's streaming API runs generation (diagnostic baseline)."""
    result = {}

    def work():
        result["value"] = fn(*args)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result["value"]


def match_qformer_dtype(hf, ours) -> list[str]:
    """blip2 keeps the Q-Former and query tokens in fp32 whatever the precision (transformers' bf16 load casts
    them to bf16). Give the transformers model the same dtypes so both compute the same numbers; the Q-Former is
    ~1% of the FLOPs, so this does not move the timing."""
    changed = []
    if hf.qformer.layernorm.weight.dtype != ours.qformer.layernorm.weight.dtype:
        hf.qformer.to(ours.qformer.layernorm.weight.dtype)
        changed.append(f"qformer -> {ours.qformer.layernorm.weight.dtype}")
    if hf.query_tokens.dtype != ours.query_tokens.dtype:
        hf.query_tokens.data = hf.query_tokens.data.to(ours.query_tokens.dtype)
        changed.append(f"query_tokens -> {ours.query_tokens.dtype}")
    return changed


def part1(folder: Path, precision: str, n: int, repeats: int, image, thread_baseline: bool) -> dict:
    import blip2
    from blip2 import compute
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    dtype = DTYPES[precision]
    tag = f"[part 1 {precision}]"
    log(f"{tag} loading with blip2.load ...")
    ours = blip2.load(str(folder), precision=precision, device="cpu")
    log(f"{tag} loading with Blip2ForConditionalGeneration.from_pretrained ...")
    # On blip2's compute thread, like everything blip2 runs: one thread doing all the torch work on both sides
    # (a second thread running torch slows both down; see blip2/compute.py).
    hf = compute.run(lambda: Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).eval())
    processor = Blip2Processor.from_pretrained(str(folder))
    changed = match_qformer_dtype(hf, ours)
    if changed:
        log(f"{tag} transformers model aligned with blip2's dtypes: {', '.join(changed)}")

    rendered = ours.prompt_format.raw(PART1_PROMPT, ours.tokenizer)
    ours_ids = ours._tokenize(rendered)
    hf_args = (hf, processor, image, rendered.before, rendered.after, n)
    sides = {
        "blip2": lambda: run_blip2(ours, image, PART1_PROMPT, n),
        "transformers": lambda: compute.run(run_transformers, *hf_args),
    }
    if thread_baseline:
        sides["transformers_thread"] = lambda: in_worker_thread(run_transformers, *hf_args)

    log(f"{tag} warm-up (one run each) ...")
    meter = CpuMeter()
    warm = {name: fn()[1] for name, fn in sides.items()}
    hf_ids = transformers_prompt(processor, rendered.before, rendered.after)["input_ids"][0].tolist()
    if hf_ids != ours_ids:
        log(f"{tag} WARNING: prompt token ids differ (blip2 {len(ours_ids)}, transformers {len(hf_ids)})")

    times = {name: [] for name in sides}
    same = all(ids == warm["blip2"] for ids in warm.values()) and len(warm["blip2"]) == n
    for r in range(repeats):
        for name, fn in sides.items():  # alternating: blip2, transformers, (transformers in a thread), blip2, ...
            seconds, ids = fn()
            times[name].append(seconds)
            same = same and ids == warm["blip2"]
        log(f"{tag} run {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    if not same:
        first_diff = next((i for i, (a, b) in enumerate(zip(warm["blip2"], warm["transformers"])) if a != b), None)
        log(f"{tag} WARNING: token ids differ (first difference blip2/transformers at position {first_diff})")
    text = ours.tokenizer.decode(warm["blip2"], skip_special_tokens=True).strip()
    log(f"{tag} reply: {text[:100]!r}")
    row = {
        "precision": precision,
        "prompt_tokens": len(ours_ids),
        "prompt_ids_match": hf_ids == ours_ids,
        "new_tokens": n,
        "transformers_dtype_changes": changed,
        "same_token_ids": same,
        "cpu": meter.stop(),
    }
    for name, values in times.items():
        row[f"{name}_seconds"] = values
        row[f"{name}_median_s"] = median(values)
        row[f"{name}_tokens_per_s"] = n / median(values)
    row["ratio_blip2_over_transformers"] = row["blip2_tokens_per_s"] / row["transformers_tokens_per_s"]
    if thread_baseline:
        row["ratio_blip2_over_transformers_thread"] = (
            row["blip2_tokens_per_s"] / row["transformers_thread_tokens_per_s"]
        )
    del ours, hf
    return row


# ---------------------------------------------------------------------------------------------------------------
# Part 2: time to first token of the next chat turn, cached vs recomputed


def chat_turn(model, image, history, message, n, min_n=0):
    stream = model.chat(image, history, message, stream=True, max_new_tokens=n, min_new_tokens=min_n)
    for _ in stream:
        pass
    # The user reads the reply before asking again: let blip2 finish the work it does for the next turn after the
    # reply has streamed (prefilling the end-of-turn markup); none of it is inside any timed span.
    return stream.wait()


def part2_row(model, image, label, prev_questions, next_question, reply_tokens, repeats, precision, replies) -> dict:
    """Ask ``prev_questions`` (their replies, with their token ids, become the history), then time the first token
    of ``next_question``. ``replies`` memoises (history, question) -> (reply text, token ids) across rows (greedy
    decoding is deterministic)."""
    tag = f"[part 2 {precision}] {label}"
    history = []
    for q in prev_questions:
        key = (tuple((user, text) for user, text, _ in history), q)
        if key not in replies:
            model.clear_caches()
            reply = chat_turn(model, image, history, q, reply_tokens, reply_tokens)
            replies[key] = (reply.text, reply.token_ids)
        history.append((q, *replies[key]))
    before, last = history[:-1], history[-1]

    def cached():
        # Rerun the last previous turn from clear caches, so the caches hold exactly that conversation (and the
        # image queries), then ask the next question.
        model.clear_caches()
        again = chat_turn(model, image, before, last[0], reply_tokens, reply_tokens)
        if again.text != last[1]:
            log(f"{tag}: WARNING: rerunning the previous turn gave a different reply")
        return chat_turn(model, image, history, next_question, 1)

    def uncached():
        model.clear_caches()  # recompute image validation + encoder + Q-Former + the whole prefill
        return chat_turn(model, image, history, next_question, 1)

    # No separate warm-up: the turns above already ran every code path once.
    warm, cold = [], []
    for r in range(repeats):
        warm.append(cached())
        cold.append(uncached())
        log(f"{tag} run {r + 1}/{repeats}: cached {warm[-1].first_token_seconds * 1e3:.0f} ms "
            f"(reused {warm[-1].reused_prefix_tokens}), uncached {cold[-1].first_token_seconds * 1e3:.0f} ms "
            f"(reused {cold[-1].reused_prefix_tokens})")
    if any(r.reused_prefix_tokens == 0 for r in warm) or any(r.reused_prefix_tokens for r in cold):
        log(f"{tag}: WARNING: prefix reuse not as expected (cached runs should reuse, uncached ones not)")
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
        warnings.simplefilter("ignore")  # load-time notices are irrelevant for timing
        model = blip2.load("default", precision=precision, device="cpu")
    log(f"[part 2 {precision}] {model.info.summary()}")
    rows, replies = [], {}
    for label, questions, nxt in (("1 previous turn", [TURN1], TURN2), ("4 previous turns", LONG_QUESTIONS, LONG_NEXT)):
        meter = CpuMeter()
        row = part2_row(model, image, label, questions, nxt, 48, repeats, precision, replies)
        row["cpu"] = meter.stop()
        rows.append(row)
    del model
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _spread(values, scale=1.0, fmt="{:.2f}") -> str:
    return f"{fmt.format(min(values) * scale)}-{fmt.format(max(values) * scale)}" if values else "-"


def _load(row) -> str:
    cores = (row.get("cpu") or {}).get("other_cores")
    return "?" if cores is None else f"{cores:.2f}"


def report(env: dict, rows1: list[dict], rows2: list[dict], args) -> str:
    out = [
        "",
        "=" * 110,
        f"torch {env['torch']}, transformers {env['transformers']}, python {env['python']}",
        f"CPU: {env['cpu']} ({env['cpu_count']} logical CPUs visible, avx512_bf16: {env['avx512_bf16']}, "
        f"amx_bf16: {env['amx_bf16']}); torch threads: {env['threads']}; OpenMP env: {env['openmp_env'] or 'none'}; "
        f"load average {env['loadavg_start']} at start, {env['loadavg_end']} at end; total {env['total_seconds']:.0f} s",
        "'other load' = average number of cores used by OTHER processes while the row was measured (from "
        "/proc/stat); well above 0 means the figures are disturbed by a shared machine.",
        "",
        "Part 1: decode throughput, blip2 vs transformers. Official-format BLIP-2 checkpoint: SmolLM2-135M-Instruct "
        f"+ random 2-layer ViT-256 (224 px, patch 14) + random 2-layer Q-Former, {NUM_QUERY_TOKENS} queries.",
        f"Greedy, exactly {args.new_tokens} new tokens (min_new_tokens = max_new_tokens; blip2 with "
        "no_repeat_ngram_size=0), skimage chelsea, identical prompt token ids on both sides.",
        "Time per call = image preprocessing + ViT + Q-Former + prefill + decode (blip2: its public streaming API). "
        f"Median of {args.repeats} alternating runs (min-max in brackets)",
        "after one warm-up each. blip2.clear_caches() runs before EVERY blip2 call: no image/prefix caching helps it.",
    ]
    if rows1:
        threaded = all("transformers_thread_seconds" in r for r in rows1)
        headers = ["precision", "prompt tok", "blip2 s [min-max]", "blip2 tok/s", "transformers s [min-max]",
                   "transformers tok/s", "blip2/transformers"]
        if threaded:
            headers += ["transformers in thread s [min-max]", "blip2/(transformers in thread)"]
        headers += ["same token ids", "other load"]
        body = []
        for r in rows1:
            cells = [r["precision"], str(r["prompt_tokens"]),
                     f"{r['blip2_median_s']:.2f} [{_spread(r['blip2_seconds'])}]", f"{r['blip2_tokens_per_s']:.1f}",
                     f"{r['transformers_median_s']:.2f} [{_spread(r['transformers_seconds'])}]",
                     f"{r['transformers_tokens_per_s']:.1f}", f"{r['ratio_blip2_over_transformers']:.2f}x"]
            if threaded:
                cells += [f"{r['transformers_thread_median_s']:.2f} [{_spread(r['transformers_thread_seconds'])}]",
                          f"{r['ratio_blip2_over_transformers_thread']:.2f}x"]
            cells += ["yes" if r["same_token_ids"] else "NO", _load(r)]
            body.append(cells)
        out.append(table(headers, body))
        notes = sorted({c for r in rows1 for c in r.get("transformers_dtype_changes", [])})
        if notes:
            out.append(f"(transformers' model was given blip2's fp32 Q-Former for identical numerics: {', '.join(notes)})")
    out += [
        "",
        "Part 2: time to first token of the next chat turn on blip2.load('default') (EfficientNet-Lite0 + the trained, "
        "instruction-aware Q-Former + SmolLM2-135M-Instruct), max_new_tokens=1.",
        "Previous replies: 48 tokens each (greedy, min_new_tokens=48). cached = right after the previous turn "
        "(rerun from clear caches each time): image queries,",
        "the previous turn's key/values (its prompt, its generated ids fed back, the end-of-turn markup prefilled after "
        "it streamed) reused; uncached = after clear_caches():",
        "image validation + encoder + Q-Former + full prefill. Reply.first_token_seconds,",
        f"median of {args.turn_repeats} alternating runs (min-max in brackets). Goal: >= 3x.",
    ]
    if rows2:
        out.append(table(
            ["precision", "conversation", "prompt tok", "reused tok", "cached TTFT ms [min-max]",
             "uncached TTFT ms [min-max]", "speedup", "other load"],
            [[r["precision"], r["conversation"], str(r["prompt_tokens"]), str(r["reused_prefix_tokens"]),
              f"{r['cached_median_s'] * 1e3:.0f} [{_spread(r['cached_ttft_s'], 1e3, '{:.0f}')}]",
              f"{r['uncached_median_s'] * 1e3:.0f} [{_spread(r['uncached_ttft_s'], 1e3, '{:.0f}')}]",
              f"{r['speedup']:.1f}x", _load(r)] for r in rows2],
        ))
    busy = [r for r in rows1 + rows2 if ((r.get("cpu") or {}).get("other_cores") or 0) > 0.3]
    if busy:
        out += [
            "",
            f"WARNING: other processes used > 0.3 cores during {len(busy)} of {len(rows1) + len(rows2)} rows: the machine "
            "was shared, so absolute figures are pessimistic. Under such load",
            "OpenMP's default busy-waiting distorts torch timings. For a fair blip2/transformers ratio on a busy "
            "machine run with OMP_WAIT_POLICY=PASSIVE, or on an idle one.",
        ]
    out.append("=" * 110)
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per part-1 generation (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side in part 1 (default 3)")
    parser.add_argument("--turn-repeats", type=int, default=5, help="timed runs per case in part 2 (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--parts", default="1,2", help="which parts to run (default 1,2)")
    parser.add_argument("--thread-baseline", action="store_true",
                        help="part 1: also time transformers' generate run in a worker thread, as blip2 runs it")
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
    transformers.utils.logging.disable_progress_bar()
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
        "openmp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))},
        "loadavg_start": _loadavg(),
    }
    log(f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, CPU {env['cpu']}")
    image = test_image()

    rows1, rows2 = [], []
    if "1" in parts:
        folder = bench_checkpoint()
        for precision in precisions:
            rows1.append(part1(folder, precision, args.new_tokens, args.repeats, image, args.thread_baseline))
    if "2" in parts:
        for precision in precisions:
            rows2.extend(part2(precision, args.turn_repeats, image))

    env["loadavg_end"] = _loadavg()
    env["total_seconds"] = time.perf_counter() - START
    print(report(env, rows1, rows2, args), flush=True)
    if args.json:
        payload = {"env": env, "args": vars(args), "decode_throughput": rows1, "chat_ttft": rows2}
        Path(args.json).write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
