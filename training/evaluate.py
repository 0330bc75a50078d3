"""``python -m training eval --task caption|vqa|naming|chat``: run a blip2 checkpoint over a test set and score it.

The model is served exactly as users get it (``blip2.load`` -> ``ask`` / ``caption``), so the numbers describe the
shipped behaviour. Decoding follows the paper's protocol by default: VQA with beam search (5 beams) and length
penalty -1, which favours short answers; captions with 5 beams. ``--protocol greedy`` is faster.
Results (metrics, settings, timing and sample predictions) go to ``eval_<task>.json``.

``naming`` asks "What is in this picture?" about named pictures (``emoji:test`` and ``tuxpaint:test:concept``:
held-out concepts; ``photos``: real photographs, never trained on) and scores whether the reply names the object
(:func:`training.data.concepts.names_object`, against the picture's accepted words); photos are captioned too.
``chat`` holds a scripted 3-turn conversation about each picture, scored turn by turn: name it, its colour (only
pictures with one dominant colour, :func:`~training.data.concepts.colour_name`), and "Is there a X?" (the
picture's own name on even pictures, answer yes; another picture's name on odd ones, answer no).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from .data import EasyVQAQuestions, iter_items
from .data.concepts import colour_name, names_object
from .data.emoji import article
from .metrics import NEGATION, caption_scores, normalize_vqa_answer, vqa_accuracy
from .data.sources import build_source, parse_data_arg

logger = logging.getLogger(__name__)

PROTOCOLS = {
    "vqa": {"paper": dict(num_beams=5, length_penalty=-1.0, max_new_tokens=10, no_repeat_ngram_size=0),
            "greedy": dict(num_beams=1, max_new_tokens=10, no_repeat_ngram_size=0)},
    "caption": {"paper": dict(num_beams=5, max_new_tokens=30, min_new_tokens=3),
                "greedy": dict(num_beams=1, max_new_tokens=30, min_new_tokens=3)},
    "naming": {"paper": dict(num_beams=5, max_new_tokens=20), "greedy": dict(num_beams=1, max_new_tokens=20)},
    "chat": {"paper": dict(num_beams=5, max_new_tokens=20), "greedy": dict(num_beams=1, max_new_tokens=20)},
}
NAMING_QUESTION = "What is in this picture?"
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


def named_examples(spec: dict, limit: int | None) -> list[dict]:
    """``{"image", "image_id", "source", "concept", "accepted"}`` per named picture of a source."""
    out = []
    for item in iter_items(build_source(spec)):
        if "accepted" not in item:
            raise ValueError(f"{spec} has no named pictures: naming and chat evaluation need emoji:SPLIT, "
                             "tuxpaint:SPLIT:concept or photos")
        out.append({"image": item["image"], "image_id": item["id"], "source": item["source"],
                    "concept": item["concept"], "accepted": item["accepted"]})
        if limit is not None and len(out) >= limit:
            break
    return out


def _scored(groups: dict[str, list[bool]]) -> dict:
    return {k: {"accuracy": 100.0 * sum(v) / len(v), "correct": sum(v), "count": len(v)}
            for k, v in sorted(groups.items())}


def evaluate_naming(model, examples: list[dict], decoding: dict) -> dict:
    by_source: dict[str, list[bool]] = defaultdict(list)
    samples = []
    start = time.perf_counter()
    for ex in tqdm(examples, desc="naming", unit="img"):
        reply = model.ask(ex["image"], NAMING_QUESTION, **decoding)
        right = names_object(reply, ex["accepted"])
        by_source[ex["source"]].append(right)
        sample = {"image_id": ex["image_id"], "concept": ex["concept"], "reply": reply, "named": right}
        if ex["source"] == "photos":
            caption = model.caption(ex["image"], **decoding)
            sample.update(caption=caption, caption_named=names_object(caption, ex["accepted"]))
            by_source["photos (caption)"].append(sample["caption_named"])
        samples.append(sample)
    seconds = time.perf_counter() - start
    picture_scores = [s["named"] for s in samples]
    return {"accuracy": 100.0 * sum(picture_scores) / max(1, len(picture_scores)), "count": len(samples),
            "question": NAMING_QUESTION, "by_source": _scored(by_source), "seconds": round(seconds, 1),
            "samples": samples}


def evaluate_chat(model, examples: list[dict], decoding: dict) -> dict:
    turns: dict[str, list[bool]] = defaultdict(list)
    conversations = []
    start = time.perf_counter()
    for n, ex in enumerate(tqdm(examples, desc="chat", unit="conversation")):
        image = ex["image"]  # a PIL image (named_examples)
        other = examples[(n + len(examples) // 2) % len(examples)]
        asks_own = n % 2 == 0 or other["concept"] == ex["concept"]
        named = ex["concept"] if asks_own else other["concept"]
        script = [("name", NAMING_QUESTION, lambda reply: names_object(reply, ex["accepted"]))]
        colour = colour_name(image)
        if colour:
            script.append(("colour", "What colour is it?", lambda reply, c=colour: names_object(reply, [c])))
        expected = "yes" if asks_own else "no"
        script.append((f"is there (answer {expected})", f"Is there {article(named).lower()} {named} in the picture?",
                       lambda reply, e=expected: normalize_vqa_answer(reply).startswith(e)))
        history, log = [], []
        for turn, message, check in script:
            reply = model.chat(image, history, message, **decoding)
            right = bool(check(reply))
            turns[turn].append(right)
            log.append({"turn": turn, "user": message, "reply": reply, "right": right})
            history.append((message, reply))
        conversations.append({"image_id": ex["image_id"], "concept": ex["concept"], "colour": colour, "turns": log})
    seconds = time.perf_counter() - start
    all_turns = [t["right"] for c in conversations for t in c["turns"]]
    return {"accuracy": 100.0 * sum(all_turns) / max(1, len(all_turns)), "count": len(conversations),
            "by_turn": _scored(turns), "seconds": round(seconds, 1), "samples": conversations[:40]}


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
    elif args.task == "naming":
        result = evaluate_naming(model, named_examples(spec, args.limit), decoding)
        headline = f"named {result['accuracy']:.1f}% of {result['count']} pictures: " + ", ".join(
            f"{k} {v['accuracy']:.1f}% ({v['correct']}/{v['count']})" for k, v in result["by_source"].items())
    elif args.task == "chat":
        result = evaluate_chat(model, named_examples(spec, args.limit), decoding)
        headline = f"chat turns right {result['accuracy']:.1f}% over {result['count']} conversations: " + ", ".join(
            f"{k} {v['accuracy']:.1f}% ({v['correct']}/{v['count']})" for k, v in result["by_turn"].items())
    else:
        result = evaluate_captions(model, caption_examples(spec, args.limit), decoding)
        headline = f"BLEU-4 {result['BLEU-4']:.2f}, CIDEr {result['CIDEr']:.2f} on {result['count']} images"
    result = {"task": args.task, "checkpoint": str(args.checkpoint), "data": args.data, "protocol": args.protocol,
              "skip": args.skip, "decoding": decoding, "model": model.info.summary(), **result}
    folder = Path(args.output) if args.output else results_dir(args.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    name = args.task if args.task in ("vqa", "caption") else f"{args.task}_{args.data.replace(':', '_')}"
    path = folder / (f"eval_{name}_from{args.skip}.json" if args.skip else f"eval_{name}.json")
    path.write_text(json.dumps(result, indent=2))
    print(f"{headline} -> {path}")
    return result
