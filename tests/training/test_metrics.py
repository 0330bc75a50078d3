"""training.metrics: official VQA accuracy, COCO caption tokenization, BLEU and CIDEr-D.

Expected values are worked out here from the published definitions (VQA v2 vqaEval.py, BLEU, CIDEr-D), not read
back from the code under test. The PTB tokenizer is also checked against the real Stanford CoreNLP 3.4.1 jar that
ships in the pycocoevalcap wheel, where a Java runtime is installed.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from training.metrics import (
    PTB_PUNCTUATIONS,
    caption_scores,
    normalize_vqa_answer,
    ptb_tokenize,
    vqa_accuracy,
    vqa_score,
)

# ---------------------------------------------------------------------------------------------------------------
# VQA answer normalisation (processPunctuation + processDigitArticle)


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two dogs.", "2 dogs"),  # number word -> digit, final period stripped
        ("the cat", "cat"),  # articles dropped
        ("An apple", "apple"),
        ("A man's hat", "man's hat"),  # the apostrophe is not in the punctuation list
        ("dont", "don't"),  # contractions map
        ("isnt", "isn't"),
        ("None", "0"),  # "none" counts as a number word
        ("ten", "10"),
        ("eleven", "eleven"),  # only zero..ten are mapped
        ("  Yes\n", "yes"),  # whitespace, case
        ("3.5", "3.5"),  # a period followed by a digit stays
        ("1,000", "1000"),  # comma between digits: punctuation is deleted, not spaced
        ("1,000 (approx)", "1000 approx"),  # ... and then every listed character is deleted
        ("black/white", "black white"),  # punctuation touching no space -> a space
        ("yes, sir", "yes sir"),  # "," touches a space -> deleted
        ("red, white,blue", "red whiteblue"),  # decided once per character for the whole answer
        ("left-hand side!", "left hand side"),
        ('"Frisbee"?', "frisbee"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


# ---------------------------------------------------------------------------------------------------------------
# VQA accuracy


def test_vqa_accuracy_leave_one_out_two_of_ten():
    answers = ["yes", "yes"] + ["no"] * 8
    # Leave out each human in turn; count the remaining humans who said "yes"; score min(count / 3, 1).
    per_subset = [
        min(1 / 3, 1),  # without human 1 (yes): 1 yes left
        min(1 / 3, 1),  # without human 2 (yes): 1 yes left
    ] + [min(2 / 3, 1)] * 8  # without any "no" human: both yes left
    expected = sum(per_subset) / 10
    assert expected == pytest.approx(0.6)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)
    assert vqa_accuracy("Yes.", answers) == pytest.approx(expected)  # normalised before matching
    assert vqa_accuracy("no", answers) == pytest.approx(1.0)  # 8 humans: every subset still has >= 3
    assert vqa_accuracy("maybe", answers) == 0.0


@pytest.mark.parametrize(("n_humans", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_agreeing_humans(n_humans, expected):
    answers = ["2"] * n_humans + ["3"] * (10 - n_humans)
    # n of the 10 subsets lose one agreeing human (n - 1 left), the other 10 - n keep all n.
    formula = (n_humans * min((n_humans - 1) / 3, 1) + (10 - n_humans) * min(n_humans / 3, 1)) / 10
    assert formula == pytest.approx(expected)
    assert vqa_accuracy("two", answers) == pytest.approx(expected)


def test_vqa_accuracy_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("the red one.", ["red one"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0
    assert vqa_accuracy("red", ["red one"]) == 0.0


def test_vqa_accuracy_other_counts_use_the_same_formula():
    # 2 answers, both "yes": each leave-one-out subset has 1 "yes" -> 1/3 (the official formula, as documented).
    assert vqa_accuracy("yes", ["yes", "yes"]) == pytest.approx(1 / 3)
    # 5 answers, 4 "yes": subsets without a "yes" human keep 3 -> 1; the one without the "no" human keeps 4 -> 1.
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


def test_vqa_score_is_mean_accuracy_in_percent():
    refs = {1: ["yes"] * 10, 2: ["yes", "yes"] + ["no"] * 8, "q3": ["cat"]}
    preds = {1: "yes", 2: "yes", "q3": "dog"}
    out = vqa_score(preds, refs)
    assert out["count"] == 3
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)


def test_vqa_score_requires_the_same_question_ids():
    with pytest.raises(ValueError, match="same ids"):
        vqa_score({1: "yes"}, {1: ["yes"], 2: ["no"]})
    with pytest.raises(ValueError, match="same ids"):
        vqa_score({1: "yes", 3: "no"}, {1: ["yes"]})
    with pytest.raises(ValueError):
        vqa_score({}, {})


# ---------------------------------------------------------------------------------------------------------------
# PTB tokenization as in the COCO caption evaluation

# Sentences whose tokenization was checked against the jar (and is re-checked below where Java is installed).
PTB_CASES = [
    ("A man's dog doesn't like the (red) ball.", "a man 's dog does n't like the -lrb- red -rrb- ball"),
    ("Two dogs playing in the grey snow, near a theatre!", "two dogs playing in the grey snow near a theatre"),
    (
        "I can't believe it's not butter... \"really\" she said; wow?! ok: fine - yes -- no",
        "i ca n't believe it 's not butter really she said wow ?! ok fine yes no",
    ),
    ("The cat cannot sit on the {mat} [here] 3.5 1,000 10:30 am.",
     "the cat can not sit on the -lcb- mat -rcb- -lsb- here -rsb- 3.5 1,000 10:30 am"),
    ("A black-and-white photo of a hot-dog stand in the U.S. at 5 p.m. today.",
     "a black-and-white photo of a hot-dog stand in the u.s. at 5 p.m. today"),
    ("She's gonna wanna go, y'all won't they'd we'll I'm you've.",
     "she 's gon na wan na go y' all wo n't they 'd we 'll i 'm you 've"),
    ("a red/blue kite & 50% of the kids' toys, #1 $5", "a red/blue kite & 50 % of the kids toys # 1 $ 5"),
    ("'quoted' text and 'tis the season at 5 o'clock", "quoted text and 't is the season at 5 o'clock"),
    ("Mr. Smith and Dr. Jones vs. the world etc. and so on",
     "mr. smith and dr. jones vs. the world etc. and so on"),
    ("The letter W. A man riding a wave on top of a surfboard.",
     "the letter w a man riding a wave on top of a surfboard"),
    ("a 3-year-old boy in a T-shirt eating 1/2 a pizza :)", "a 3-year-old boy in a t-shirt eating 1/2 a pizza :-rrb-"),
    ("\u201cCurly quotes\u201d and don\u2019t \u2014 dashes \u2013 too\u2026", "curly quotes and do n't dashes too"),
    ("Kids\u2019 toys, St. Patrick's day; no. 5 and No. 7.", "kids toys st. patrick 's day no. 5 and no. 7"),
    ("file.jpg www.example.com and a@b.com!", "file.jpg www.example.com and a@b.com!"),
    ("A small red circle in the top left and a large blue square on the right.",
     "a small red circle in the top left and a large blue square on the right"),
]


@pytest.mark.parametrize(("text", "expected"), PTB_CASES)
def test_ptb_tokenize(text, expected):
    assert ptb_tokenize(text) == expected


def test_ptb_tokenize_edge_cases():
    assert ptb_tokenize("") == ""
    assert ptb_tokenize("...") == ""
    assert ptb_tokenize("two\nlines") == "two lines"  # the COCO wrapper joins a caption's lines


def test_ptb_punctuations_are_pycocoevalcaps():
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    assert set(PUNCTUATIONS) == PTB_PUNCTUATIONS


def _corenlp_jar() -> Path | None:
    try:
        import pycocoevalcap.tokenizer as tok_pkg
    except ImportError:
        return None
    jar = Path(list(tok_pkg.__path__)[0]) / "stanford-corenlp-3.4.1.jar"
    return jar if jar.is_file() else None


@pytest.mark.skipif(shutil.which("java") is None or _corenlp_jar() is None, reason="needs Java and the CoreNLP jar")
def test_ptb_tokenize_matches_the_stanford_jar(tmp_path):
    """Same command as pycocoevalcap's PTBTokenizer. Every caption is followed by an "A a" line, because
    ptb_tokenize assumes the next caption starts with "A " (a few abbreviation rules look at the next line)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    sentences = [text for text, _ in PTB_CASES] + [
        "A red double-decker bus drives down the street , next to a building .",
        "there's a 'no parking' sign (in red) & a bike/rack - it isn't U.S. Route 1 etc. Y'know?",
        "Is this an A. It's cold; 20\u00b0C! See www.coco.org/x.html.",
    ]
    data = tmp_path / "captions.txt"
    data.write_text("\n".join(f"{s}\nA a" for s in sentences), encoding="utf-8")
    cmd = ["java", "-cp", str(_corenlp_jar()), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
           "-lowerCase", str(data)]
    lines = subprocess.run(cmd, capture_output=True, check=True, timeout=120).stdout.decode("utf-8").split("\n")
    for i, sentence in enumerate(sentences):
        official = " ".join(w for w in lines[2 * i].rstrip().split(" ") if w not in PUNCTUATIONS)
        assert ptb_tokenize(sentence) == official, sentence


# ---------------------------------------------------------------------------------------------------------------
# Caption metrics


def _bleu1(pairs: list[tuple[list[str], list[list[str]]]]) -> float:
    """Corpus BLEU-1 from its definition: clipped unigram matches / hypothesis length, summed over images, times
    the brevity penalty exp(1 - r/c) when c < r (r: per image the reference length closest to the hypothesis,
    the shorter on a tie)."""
    correct = guess = ref_len = 0
    for hyp, refs in pairs:
        max_ref = Counter()
        for ref in refs:
            for word, n in Counter(ref).items():
                max_ref[word] = max(max_ref[word], n)
        correct += sum(min(n, max_ref[w]) for w, n in Counter(hyp).items())
        guess += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    bp = 1.0 if guess >= ref_len else math.exp(1 - ref_len / guess)
    return correct / guess * bp


def test_bleu1_from_the_formula():
    preds = {"img1": "The the dog runs fast.", "img2": "A red bus."}
    refs = {
        "img1": ["A dog is running on the grass.", "A brown dog runs across a lawn."],
        "img2": ["A big red bus.", "A red bus on a street."],
    }
    # img1: "the the dog runs fast" (5 words); "the" is clipped to 1 (no reference has it twice), "fast" misses:
    #        3 matches; both references have 7 words -> r = 7.
    # img2: "a red bus" (3 words), 3 matches; reference lengths 4 and 6 -> closest r = 4.
    expected = (3 + 3) / (5 + 3) * math.exp(1 - (7 + 4) / (5 + 3))
    tokenized = [(ptb_tokenize(preds[k]).split(), [ptb_tokenize(r).split() for r in refs[k]]) for k in preds]
    assert _bleu1(tokenized) == pytest.approx(expected)
    scores = caption_scores(preds, refs)
    assert scores["BLEU-1"] == pytest.approx(expected, abs=1e-9)
    assert scores["count"] == 2
    assert 0 <= scores["BLEU-4"] <= scores["BLEU-3"] <= scores["BLEU-2"] <= scores["BLEU-1"] <= 1


def test_bleu1_closest_reference_tie_takes_the_shorter():
    # Hypothesis of 5 words, references of 3 and 7 words: both 2 away, BLEU uses 3 (so no brevity penalty).
    preds = {0: "a cat on a mat", 1: "two dogs"}
    refs = {0: ["a cat sits", "a cat is on a red mat"], 1: ["two dogs", "two big dogs"]}
    tokenized = [(ptb_tokenize(preds[k]).split(), [ptb_tokenize(r).split() for r in refs[k]]) for k in preds]
    expected = (5 + 2) / (5 + 2)  # every word matches; c = 7 >= r = 3 + 2
    assert _bleu1(tokenized) == pytest.approx(expected)
    assert caption_scores(preds, refs)["BLEU-1"] == pytest.approx(expected, abs=1e-9)


def test_cider_perfect_and_disjoint_predictions():
    refs = {
        "a": ["a red circle in the top left corner"] * 3,
        "b": ["two blue squares on gray background"] * 3,
    }
    # Identical to every reference: cosine similarity 1 for n = 1..4, no length penalty, x10.
    perfect = caption_scores({k: v[0] for k, v in refs.items()}, refs)
    assert perfect["CIDEr"] == pytest.approx(10.0)
    assert perfect["BLEU-4"] == pytest.approx(1.0)
    # No n-gram in common with its references: 0, whatever the IDF weights.
    disjoint = caption_scores({"a": "two blue squares on gray background", "b": "a red circle in the top left corner"},
                              refs)
    assert disjoint["CIDEr"] == 0.0


def test_cider_needs_several_images():
    # IDF comes from the evaluated set: on one image every n-gram is in every "document", so every weight is 0.
    refs = {"only": ["a red circle in the top left corner"]}
    assert caption_scores({"only": "a red circle in the top left corner"}, refs)["CIDEr"] == 0.0


def test_caption_scores_equal_pycocoevalcap_on_tokenized_captions():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    preds = {
        1: "A man riding a wave on top of a surfboard.",
        2: "Two dogs play in the snow.",
        3: "A plate of food with broccoli.",
        4: "a red circle in the top left",
    }
    refs = {
        1: ["A man riding a wave on a surfboard.", "A surfer rides a large wave.", "Man on a surf board in the ocean."],
        2: ["Two dogs playing in the snow.", "A pair of dogs runs through snow.", "Dogs in the snow."],
        3: ["A plate with broccoli and rice.", "Food on a white plate.", "A dish of broccoli, chicken and rice."],
        4: ["A red circle in the top left.", "A small red circle at the top left corner."],
    }
    gts = {k: [ptb_tokenize(r) for r in v] for k, v in refs.items()}
    res = {k: [ptb_tokenize(v)] for k, v in preds.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    scores = caption_scores(preds, refs)
    assert [scores[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert scores["CIDEr"] == pytest.approx(float(cider), abs=1e-12)
    assert scores["count"] == 4


def test_caption_scores_requires_matching_ids_and_references():
    with pytest.raises(ValueError, match="same ids"):
        caption_scores({1: "a cat"}, {1: ["a cat"], 2: ["a dog"]})
    with pytest.raises(ValueError, match="no reference"):
        caption_scores({1: "a cat"}, {1: []})
