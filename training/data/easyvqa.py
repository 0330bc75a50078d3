"""easy-vqa: captions derived from each image's questions, and the questions themselves."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable

from torch.utils.data import Dataset

from blip2.images import InvalidImageError, load_image

from .pairs import PairDataset, Skipped

__all__ = ["EasyVQA", "EasyVQAQuestions", "easy_vqa_facts"]


def _easy_vqa_split(split: str):
    try:
        import easy_vqa
    except ImportError as err:
        raise ImportError("easy-vqa is not installed: `pip install --no-deps easy-vqa==1.0`") from err
    if split == "train":
        return easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    if split == "test":
        return easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    raise ValueError(f"easy-vqa split must be 'train' or 'test', not {split!r}")


_EV_SHAPES = ("circle", "rectangle", "triangle")
_EV_COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")


def easy_vqa_facts(qa: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    """What a set of easy-vqa questions says about its image: ``{"shape": {...}, "color": {...}}``.

    easy-vqa pictures hold one shape. Its questions name it directly ("what shape is in the image?" -> circle,
    "what color is the rectangle?" -> blue, "what is the blue shape?" -> rectangle) or by yes/no, possibly negated
    ("is there not a red shape?" -> no means red). More than one value for a field means the labels conflict."""
    facts: dict[str, set[str]] = {"shape": set(), "color": set()}
    absent: set[str] = set()
    for question, answer in qa:
        q = question.lower().strip().rstrip("?")
        words = set(re.findall(r"[a-z]+", q))
        named_shapes = [s for s in _EV_SHAPES if s in words]
        named_colors = [c for c in _EV_COLORS if c in words]
        if answer in _EV_SHAPES:
            facts["shape"].add(answer)
            facts["color"].update(named_colors)  # "what is the blue shape?" -> rectangle
        elif answer in _EV_COLORS:
            facts["color"].add(answer)
            facts["shape"].update(named_shapes)  # "what color is the triangle?" -> blue
        elif answer in ("yes", "no"):
            negated = bool(re.search(r"\b(not|no)\b", q.replace("is no", "is not")))
            present = (answer == "yes") != negated
            if present:
                facts["shape"].update(named_shapes)
                facts["color"].update(named_colors)
            elif len(named_shapes) + len(named_colors) == 1:  # "is there a red circle?" -> no says little
                absent.update(named_shapes + named_colors)
    # By elimination: two shapes (or seven colours) absent leave the last one.
    for field, values in (("shape", _EV_SHAPES), ("color", _EV_COLORS)):
        left = [v for v in values if v not in absent]
        if not facts[field] and len(left) == 1:
            facts[field].add(left[0])
    return facts


class EasyVQA(PairDataset):
    """easy-vqa images (64x64, one shape) with captions like "a blue circle." derived from their questions.

    ``qa`` (all the image's question/answer pairs) is kept on each item for VQA later. Images whose questions do
    name only the shape or only the colour get a partial caption ("a circle.", "a brown shape."; counted in
    ``partial``); those that name neither, or contradict each other, are skipped (``underdetermined`` /
    ``conflicting_labels``). Train and test come from easy-vqa's own folders and are never mixed."""

    source = "easy-vqa"

    def __init__(self, split: str = "train", transform: Callable | None = None):
        super().__init__(transform)
        self.split, self.partial = split, 0
        (questions, answers, image_ids), paths = _easy_vqa_split(split)
        per_image: dict[int, list[tuple[str, str]]] = {}
        for q, a, i in zip(questions, answers, image_ids):
            per_image.setdefault(i, []).append((q, a))
        for image_id in sorted(paths):
            qa = per_image.get(image_id, [])
            facts = easy_vqa_facts(qa)
            if len(facts["shape"]) > 1 or len(facts["color"]) > 1:
                self.skipped["conflicting_labels"] += 1
                continue
            shape = next(iter(facts["shape"]), None)
            color = next(iter(facts["color"]), None)
            if shape is None and color is None:
                self.skipped["underdetermined"] += 1
                continue
            if shape is None or color is None:
                self.partial += 1  # still a true caption: "a circle." / "a brown shape."
            caption = f"a {color + ' ' if color else ''}{shape or 'shape'}."
            self._add(paths[image_id], caption, f"easy-vqa/{split}/{image_id}", source=self.source, qa=qa)


class EasyVQAQuestions(Dataset):
    """easy-vqa questions: items ``{"image", "question", "answer", "id", "image_id"}`` (``id`` is per question,
    ``image_id`` matches :class:`EasyVQA`'s ids, for cached features)."""

    def __init__(self, split: str = "train", transform: Callable | None = None):
        (questions, answers, image_ids), paths = _easy_vqa_split(split)
        self.split, self.transform = split, transform
        self.skipped: Counter = Counter()
        self.records = []
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids)):
            if i not in paths:
                self.skipped["missing_file"] += 1
                continue
            self.records.append({"path": paths[i], "question": q, "answer": a, "id": f"easy-vqa/{split}/q{n}",
                                 "image_id": f"easy-vqa/{split}/{i}"})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | Skipped:
        record = self.records[index]
        try:
            image = load_image(record["path"])
        except InvalidImageError as err:
            self.skipped["broken_image"] += 1
            return Skipped("broken_image", record["id"], str(err))
        item = {k: v for k, v in record.items() if k != "path"}
        item["image"], item["source"] = image, "easy-vqa"
        return self.transform(item) if self.transform else item
