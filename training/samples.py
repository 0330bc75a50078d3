"""Actual outputs of a checkpoint on the sample photos (``training.data.photos``: scikit-image's, never trained on)
and on any other pictures, as a Markdown table for the model card: the caption, the answers to "What is in this
picture?" and "What colour is it?", and whether the caption and the answer name the object (✓/✗, photos only).

    python -m training.samples --checkpoint assets/default [--images assets/examples/*.jpg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .data.concepts import names_object
from .data.photos import PHOTOS, SamplePhotos

QUESTIONS = ("What is in this picture?", "What colour is it?")


def table_cell(text: str) -> str:
    """A model output as one Markdown table cell: line breaks shown as ⏎ (a raw one would end the row), pipes as /."""
    return " ⏎ ".join(line.strip() for line in text.replace("|", "/").splitlines() if line.strip()) or "(empty)"


def rows(model, pictures) -> list[dict]:
    """``pictures``: (name, image, accepted words or None). Greedy outputs per picture."""
    out = []
    for name, image, accepted in pictures:
        caption = model.caption(image, max_new_tokens=30)
        answers = [model.ask(image, q, max_new_tokens=20) for q in QUESTIONS]
        row = {"name": name, "caption": caption, "answers": answers}
        if accepted is not None:
            row["caption_named"] = names_object(caption, accepted)
            row["answer_named"] = names_object(answers[0], accepted)
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    mark = {True: "✓", False: "✗"}
    lines = ["| picture | caption | " + " | ".join(QUESTIONS) + " | named (caption / answer) |",
             "|---" * (3 + len(QUESTIONS)) + "|"]
    for row in table:
        named = f"{mark[row['caption_named']]} / {mark[row['answer_named']]}" if "caption_named" in row else "–"
        cells = [row["caption"], *row["answers"]]
        lines.append(f"| `{row['name']}` | " + " | ".join(table_cell(c) for c in cells) + f" | {named} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import blip2
    from blip2.images import load_image

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--images", nargs="*", default=[], help="more pictures (no naming score)")
    args = parser.parse_args(argv)
    model = blip2.load(args.checkpoint)
    photos = SamplePhotos()
    pictures = [(record["image"], photos.open_image(record["image"]), record["accepted"]) for record in photos.records]
    pictures += [(Path(path).name, load_image(path), None) for path in args.images]
    print(f"Outputs of {model.info.summary()} (greedy decoding; photos: {', '.join(PHOTOS)}):\n")
    print(markdown(rows(model, pictures)))


if __name__ == "__main__":
    main()
