"""Actual outputs of a checkpoint on a few photos from ``skimage.data`` (for the model card), as a Markdown table.

    python -m training.samples --checkpoint assets/default
"""

from __future__ import annotations

import argparse

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
QUESTIONS = ("What color is the shape?", "What shape is in the image?", "What is in the picture?")


def photo(name: str):
    from PIL import Image
    from skimage import data

    pixels = getattr(data, name)() if name != "motorcycle_left" else data.stereo_motorcycle()[0]
    return Image.fromarray(pixels).convert("RGB")


def table_cell(text: str) -> str:
    """A model output as one Markdown table cell: line breaks shown as ⏎ (a raw one would end the row), pipes as /."""
    return " ⏎ ".join(line.strip() for line in text.replace("|", "/").splitlines() if line.strip()) or "(empty)"


def main(argv=None) -> None:
    import blip2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="default")
    args = parser.parse_args(argv)
    model = blip2.load(args.checkpoint)
    print(f"Outputs of {model.info.summary()} (greedy decoding):\n")
    print("| photo | caption | " + " | ".join(QUESTIONS) + " |")
    print("|---" * (2 + len(QUESTIONS)) + "|")
    for name in PHOTOS:
        image = photo(name)
        cells = [model.caption(image, max_new_tokens=30)] + [model.ask(image, q, max_new_tokens=10) for q in QUESTIONS]
        print(f"| `{name}` | " + " | ".join(table_cell(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
