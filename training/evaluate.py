"""``python -m training eval --task caption|vqa``: run a blip2 checkpoint over a test set and score it.

The model is served exactly as users get it (``blip2.load`` -> ``ask`` / ``caption``), so the numbers describe the
shipped behaviour. Decoding follows the paper's protocol by default: VQA with beam search (5 beams) and length
penalty -1, which favours short answers; captions with 5 beams. ``--protocol greedy`` is faster.
Results (metrics, settings, timing and sample predictions) go to ``eval_<task>.json``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .data import EasyVQAQuestions, iter_items
from .metrics import NEGATION, caption_scores, normalize_vqa_answer, vqa_accuracy
from .data.sources import build_source, parse_data_arg

logger = logging.getLogger(__name__)

PROTOCOLS = {
    "vqa": {"paper": dict(num_beams=5, length_penalty=-1.0, max_new_tokens=10, no_repeat_ngram_size=0),
            "greedy": dict(num_beams=1, max_new_tokens=10, no_repeat_ngram_size=0)},
    "caption": {"paper": dict(num_beams=5, max_new_tokens=30, min_new_tokens=3),
                "greedy": dict(num_beams=1, max_new_tokens=30, min_new_tokens=3)},
}
EASY_VQA_KINDS = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape"}


def vqa_examples(spec: dict, limit: int | None, skip: int = 0) -> list[dict]:
    """``{"image", "image_id", "question", "answers"}`` per question, grouped by image (the model's query cache
    then encodes each picture once): ``limit`` of them after the first ``skip`` (a held-out part of a test set,
    when the first questions were used to choose between recipes)."""
    end = None if limit is None else skip + limit
    if spec["type"] == "easyvqa":
        questions = EasyVQAQuestions(spec.get("split", "test"))
        rows = sorted(questions.records, key=lambda r: r["image_id"])[skip:end]
        out = [{"image": r["path"], "image_id": r["image_id"], "question": r["question"], "answers": [r["answer"]]}
               for r in rows]
    else:
        out = []
        for item in iter_items(build_source(spec)):
            for question, answer in item.get("qa") or []:
                out.append({"image": item["image"], "image_id": item["id"], "question": question, "answers": [answer]})
            if end is not None and len(out) >= end:
                break
        out = out[skip:end]
    if not out:
        raise ValueError(f"{spec} has no question/answer pairs after the first {skip}; VQA evaluation needs easyvqa "
                         "or scenes data.")
    return out


def caption_examples(spec: dict, limit: int | None) -> list[dict]:
    """``{"image", "image_id", "references"}`` per image (several captions of one image are all references)."""
    by_image: dict[str, dict] = {}
    for item in iter_items(build_source(spec)):
        entry = by_image.setdefault(item["id"], {"image": item["image"], "image_id": item["id"], "references": []})
        entry["references"].append(item["text"])
        if limit is not None and len(by_image) > limit:
            break
    return list(by_image.values())[:limit]


def accuracy_by_group(scores: dict[str, list[float]]) -> dict:
    return {k: {"accuracy": 100.0 * sum(v) / len(v), "count": len(v)} for k, v in sorted(scores.items())}


def evaluate_vqa(model, examples: list[dict], decoding: dict) -> dict:
    per_kind: dict[str, list[float]] = defaultdict(list)
    # Yes/no scores by question polarity and right answer: a model that answers from the wording alone ("is there
    # a ...?" -> no, "is there not a ...?" -> yes) is right in two of the four groups and wrong in the other two.
    per_yes_no: dict[str, list[float]] = defaultdict(list)
    scores, samples = [], []
    start = time.perf_counter()
    for ex in tqdm(examples, desc="vqa", unit="q"):
        prediction = model.ask(ex["image"], ex["question"], **decoding)
        score = vqa_accuracy(prediction, ex["answers"])
        scores.append(score)
        reference = normalize_vqa_answer(ex["answers"][0])
        kind = EASY_VQA_KINDS.get(reference, "colour/other")
        per_kind[kind].append(score)
        if reference in ("yes", "no"):
            polarity = "negated" if NEGATION.search(ex["question"]) else "plain"
            per_yes_no[f"{polarity} question, answer {reference}"].append(score)
        if len(samples) < 25:
            samples.append({"image_id": ex["image_id"], "question": ex["question"], "answers": ex["answers"],
                            "prediction": prediction, "score": score})
    seconds = time.perf_counter() - start
    return {
        "accuracy": 100.0 * sum(scores) / max(1, len(scores)), "count": len(scores),
        "by_answer_kind": accuracy_by_group(per_kind),
        "yes_no_by_polarity_and_answer": accuracy_by_group(per_yes_no),
        "seconds": round(seconds, 1), "questions_per_s": round(len(scores) / max(seconds, 1e-9), 2), "samples": samples,
    }


def evaluate_captions(model, examples: list[dict], decoding: dict) -> dict:
    predictions, references, samples = {}, {}, []
    start = time.perf_counter()
    for ex in tqdm(examples, desc="caption", unit="img"):
        predictions[ex["image_id"]] = model.caption(ex["image"], **decoding)
        references[ex["image_id"]] = ex["references"]
        if len(samples) < 25:
            samples.append({"image_id": ex["image_id"], "references": ex["references"],
                            "prediction": predictions[ex["image_id"]]})
    seconds = time.perf_counter() - start
    return {**caption_scores(predictions, references), "count": len(predictions), "seconds": round(seconds, 1),
            "samples": samples}


def results_dir(checkpoint) -> Path:
    """Where an evaluation writes by default: ``runs/eval/<run>``, the run named by the checkpoint's path below
    ``runs/`` (``runs/default/vqa/checkpoint`` -> ``runs/eval/default/vqa``), else by its folder name
    (``assets/default`` -> ``runs/eval/default``). Results never land inside the checkpoint or in assets/."""
    path = Path(checkpoint).resolve()
    if path.name in ("checkpoint", "stage1", "official"):  # a run's export folder: the run is its parent
        path = path.parent
    try:
        run = path.relative_to(Path("runs").resolve())
    except ValueError:
        run = Path(path.name)
    return Path("runs") / "eval" / run


def evaluate_cli(args) -> dict:
    import blip2

    spec = parse_data_arg(args.data)
    decoding = PROTOCOLS[args.task][args.protocol]
    model = blip2.load(args.checkpoint)
    print(f"evaluating {model.info.summary()} on {args.data} ({args.task}, {args.protocol} decoding: {decoding})")
    if args.task == "vqa":
        result = evaluate_vqa(model, vqa_examples(spec, args.limit, args.skip), decoding)
        headline = f"VQA accuracy {result['accuracy']:.2f}% on {result['count']} questions"
    else:
        result = evaluate_captions(model, caption_examples(spec, args.limit), decoding)
        headline = f"BLEU-4 {result['BLEU-4']:.2f}, CIDEr {result['CIDEr']:.2f} on {result['count']} images"
    result = {"task": args.task, "checkpoint": str(args.checkpoint), "data": args.data, "protocol": args.protocol,
              "skip": args.skip, "decoding": decoding, "model": model.info.summary(), **result}
    folder = Path(args.output) if args.output else results_dir(args.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"eval_{args.task}_from{args.skip}.json" if args.skip else f"eval_{args.task}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"{headline} -> {path}")
    return result
