"""Evaluation: the scoring loop on a stand-in model with known answers, and the CLI on tiny trained checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training.evaluate import evaluate_captions, evaluate_vqa, vqa_examples
from training.metrics import caption_scores

ROOT = Path(__file__).resolve().parents[2]


class Oracle:
    """Answers right for every other question; captions by a fixed table."""

    def __init__(self, answers, captions=None):
        self.answers, self.captions, self.calls = answers, captions or {}, []

    def ask(self, image, question, **decoding):
        self.calls.append(decoding)
        return self.answers[question]

    def caption(self, image, **decoding):
        return self.captions[image]


def test_vqa_accuracy_and_breakdown():
    examples = [
        {"image": "a", "image_id": "a", "question": "q1", "answers": ["yes"]},
        {"image": "a", "image_id": "a", "question": "q2", "answers": ["circle"]},
        {"image": "b", "image_id": "b", "question": "q3", "answers": ["red"]},
        {"image": "b", "image_id": "b", "question": "is there not a q4?", "answers": ["no"]},
    ]
    model = Oracle({"q1": "Yes.", "q2": "a triangle", "q3": "red", "is there not a q4?": "yes"})
    result = evaluate_vqa(model, examples, {"num_beams": 5})
    assert result["accuracy"] == 50.0 and result["count"] == 4  # "Yes." normalises to "yes"; 2 of 4 right
    assert result["by_answer_kind"]["yes/no"] == {"accuracy": 50.0, "count": 2}
    assert result["yes_no_by_polarity_and_answer"] == {"plain question, answer yes": {"accuracy": 100.0, "count": 1},
                                                       "negated question, answer no": {"accuracy": 0.0, "count": 1}}
    assert result["by_answer_kind"]["shape"]["accuracy"] == 0.0
    assert result["by_answer_kind"]["colour/other"]["accuracy"] == 100.0
    assert model.calls == [{"num_beams": 5}] * 4  # the protocol's decoding reaches the model
    assert [s["score"] for s in result["samples"]] == [1.0, 0.0, 1.0, 0.0]


def test_negated_questions_are_recognised():
    from training.metrics import NEGATION

    negated = ["Is there not a circle?", "Doesn't the image contain a red shape?", "Is no shape blue?", "NOT red?"]
    plain = ["Is there a circle?", "Is the knot red?", "Is it nothing?", "Is there a notebook?"]
    assert all(NEGATION.search(q) for q in negated) and not any(NEGATION.search(q) for q in plain)


def test_caption_scores_come_from_the_metric():
    examples = [{"image": "x", "image_id": "x", "references": ["a red circle", "a red round shape"]},
                {"image": "y", "image_id": "y", "references": ["two blue squares"]}]
    model = Oracle({}, {"x": "a red circle", "y": "a green triangle"})
    result = evaluate_captions(model, examples, {})
    expected = caption_scores({"x": "a red circle", "y": "a green triangle"},
                              {"x": ["a red circle", "a red round shape"], "y": ["two blue squares"]})
    assert result["CIDEr"] == expected["CIDEr"] and result["BLEU-4"] == expected["BLEU-4"] and result["count"] == 2


def test_skip_leaves_out_the_first_questions_in_order():
    spec = {"type": "scenes", "n": 4, "seed": 7}
    everything = [(e["image_id"], e["question"]) for e in vqa_examples(spec, None)]
    assert len(everything) > 12
    assert [(e["image_id"], e["question"]) for e in vqa_examples(spec, 5, skip=7)] == everything[7:12]
    assert [(e["image_id"], e["question"]) for e in vqa_examples(spec, None, skip=7)] == everything[7:]
    with pytest.raises(ValueError, match="after the first"):
        vqa_examples(spec, None, skip=len(everything))


def test_eval_cli_rejects_skip_outside_vqa():
    result = subprocess.run([sys.executable, "-m", "training", "eval", "--task", "caption", "--checkpoint", "x",
                             "--data", "scenes:3", "--skip", "2"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--skip 2" in result.stderr


@pytest.mark.slow
def run_eval(checkpoint, task: str, data: str, limit: int, output) -> None:
    """``python -m training eval`` (greedy) as a user runs it; fails the test with its stderr if it fails."""
    result = subprocess.run(
        [sys.executable, "-m", "training", "eval", "--task", task, "--checkpoint", str(checkpoint), "--data", data,
         "--limit", str(limit), "--protocol", "greedy", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_eval_cli_on_a_tiny_checkpoint(our_checkpoint, tmp_path):
    for task in ("vqa", "caption"):
        run_eval(our_checkpoint, task, "scenes:3:7", 4, tmp_path)
        data = json.loads((tmp_path / f"eval_{task}.json").read_text())
        assert data["task"] == task and data["count"] in (3, 4) and data["protocol"] == "greedy"
        if task == "vqa":
            assert 0.0 <= data["accuracy"] <= 100.0 and len(data["samples"]) == data["count"]
        else:
            assert "CIDEr" in data and len(data["samples"]) == 3


def test_sample_table_cells_stay_on_one_row():
    from training.samples import table_cell

    assert table_cell("Aard\n\nAarda is a | b ") == "Aard ⏎ Aarda is a / b"
    assert table_cell(" \n") == "(empty)"
    assert "\n" not in table_cell("one\r\ntwo\rthree")


def test_results_go_to_runs_eval_never_into_the_checkpoint_or_assets(tmp_path, monkeypatch):
    from training.evaluate import results_dir

    monkeypatch.chdir(tmp_path)
    assert results_dir("runs/default/vqa/checkpoint") == Path("runs/eval/default/vqa")
    assert results_dir("runs/stage1_tiny/stage1") == Path("runs/eval/stage1_tiny")
    assert results_dir("assets/default") == Path("runs/eval/default")
    assert results_dir(tmp_path / "elsewhere" / "my_model") == Path("runs/eval/my_model")


class Namer:
    """Replies from a table keyed by (picture, message), and records the history each chat turn received."""

    def __init__(self, replies):
        self.replies, self.histories = replies, []

    def ask(self, image, question, **decoding):
        return self.chat(image, [], question)

    def chat(self, image, history, message, **decoding):
        self.histories.append(list(history))
        return self.replies.get((image.info.get("name"), message), "I do not know.")

    def caption(self, image, **decoding):
        return self.replies.get((image.info.get("name"), "caption"), "")


def _named_picture(name, colour, accepted, source):
    from PIL import Image

    image = Image.new("RGB", (32, 32), colour)
    image.info["name"] = name
    return {"image": image, "image_id": name, "source": source, "concept": name, "accepted": accepted}


def test_naming_scores_per_source_against_accepted_words():
    from training.evaluate import NAMING_QUESTION, evaluate_naming

    pictures = [_named_picture("cat", "white", ["cat", "kitten"], "emoji-google"),
                _named_picture("rocket", "white", ["rocket"], "emoji-google"),
                _named_picture("cup", "white", ["cup", "coffee"], "photos")]
    model = Namer({("cat", NAMING_QUESTION): "Two kittens.", ("rocket", NAMING_QUESTION): "A rocketship.",
                   ("cup", NAMING_QUESTION): "A cup of coffee.", ("cup", "caption"): "A white plate."})
    result = evaluate_naming(model, pictures, {})
    # "rocketship" is not the word "rocket": whole words only.
    assert result["by_source"]["emoji-google"] == {"accuracy": 50.0, "correct": 1, "count": 2}
    assert result["by_source"]["photos"]["correct"] == 1 and result["by_source"]["photos (caption)"]["correct"] == 0
    assert result["accuracy"] == pytest.approx(200 / 3)


def test_chat_is_scored_turn_by_turn_with_the_history_passed_on():
    from training.evaluate import NAMING_QUESTION, evaluate_chat

    pictures = [_named_picture("apple", (220, 30, 30), ["apple"], "emoji-google"),
                _named_picture("tree", (40, 170, 60), ["tree"], "emoji-google")]
    model = Namer({("apple", NAMING_QUESTION): "An apple.", ("apple", "What colour is it?"): "It is red.",
                   ("apple", "Is there an apple in the picture?"): "Yes.",
                   ("tree", NAMING_QUESTION): "A bush.", ("tree", "What colour is it?"): "Green.",
                   ("tree", "Is there an apple in the picture?"): "Yes, there is."})
    result = evaluate_chat(model, pictures, {})
    turns = result["by_turn"]
    assert turns["name"]["correct"] == 1 and turns["colour"]["correct"] == 2
    # The first picture is asked about its own name (yes), the second about the other's (no): "Yes" there is wrong.
    assert turns["is there (answer yes)"]["correct"] == 1 and turns["is there (answer no)"]["correct"] == 0
    assert model.histories[:3] == [[], [(NAMING_QUESTION, "An apple.")],
                                   [(NAMING_QUESTION, "An apple."), ("What colour is it?", "It is red.")]]


def test_naming_and_chat_cli_on_photos(our_checkpoint, tmp_path):
    pytest.importorskip("skimage")
    for task in ("naming", "chat"):
        run_eval(our_checkpoint, task, "photos", 2, tmp_path)
        data = json.loads((tmp_path / f"eval_{task}_photos.json").read_text())
        assert data["count"] == 2 and data["protocol"] == "greedy"
    naming = json.loads((tmp_path / "eval_naming_photos.json").read_text())
    assert [s["image_id"] for s in naming["samples"]] == ["photos/astronaut", "photos/chelsea"]
    assert all("caption" in s for s in naming["samples"])


def test_sample_table_marks_whether_the_object_is_named():
    from PIL import Image

    from training.samples import markdown, rows

    class Replies:
        def caption(self, image, **decoding):
            return "A cat on a sofa."

        def ask(self, image, question, **decoding):
            return {"What is in this picture?": "A dog.", "What colour is it?": "Brown."}[question]

    image = Image.new("RGB", (8, 8))
    table = rows(Replies(), [("chelsea", image, ["cat", "kitten"]), ("drawing.jpg", image, None)])
    text = markdown(table).splitlines()
    assert text[2] == "| `chelsea` | A cat on a sofa. | A dog. | Brown. | ✓ / ✗ |"
    assert text[3].endswith("| – |")
