"""What the page offers to click, chosen for the loaded model: example cards (a picture and a question), one-click
prompts, and the "Precise" / "Creative" decoding styles.

The offline default model (``ModelCard.source == "default"``) was trained on simple drawn shapes (easy-vqa): it names
shapes and answers yes/no questions about them well, colours less reliably, and anything else (stories, recipes,
history) it can only make up. So for it the cards and prompts ask about shapes and colours, and the inventive prompts
are left out; a full-size BLIP-2 gets the prompts of the BLIP-2 paper's Fig. 4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.backend import ModelCard
from app.decoding import BEAM, SAMPLING

# One click, one prompt. The last five are the kinds of instruction shown in the BLIP-2 paper's Fig. 4.
PRESETS = {
    "Short caption": "Write a short caption for this image.",
    "Detailed description": "Describe this image in detail.",
    "Explain the image": "Explain what is happening in this image.",
    "Tell a story": "Tell me a short story about this picture.",
    "Romantic message": "Write a romantic message that goes along with this photo.",
    "Ingredients": "What are the ingredients I need to make this?",
    "History of the place": "Tell me something about the history of this place.",
}


@dataclass(frozen=True)
class Example:
    """An example card: a picture from the examples folder and the question it asks."""

    image: str  # a file name in the examples folder
    question: str
    label: str  # what the card says


_SMALL_EXAMPLES = (
    Example("triangle.jpg", "What shape is this?", "What shape is this?"),
    Example("triangle.jpg", "What colour is the shape?", "What colour is the shape?"),
    Example("shapes.jpg", "Is there a triangle?", "Is there a triangle?"),
)
_EXAMPLES = (
    Example("house.jpg", "Describe this picture.", "Describe this picture"),
    Example("shapes.jpg", "What shapes are in this picture?", "What shapes are there?"),
    Example("triangle.jpg", "What colour is the triangle?", "What colour is the triangle?"),
)
_SMALL_PRESETS = {
    "Short caption": PRESETS["Short caption"],
    "What shape?": "What shape is this?",
    "What colour?": "What colour is the shape?",
    "Is there a circle?": "Is there a circle?",
}
# Decoding styles, as values for the settings panel's controls (app.decoding.CONTROL_NAMES).
STYLES = {
    "Precise": dict(mode=BEAM, num_beams=1, repetition_penalty=1.0, length_penalty=1.0),
    "Creative": dict(mode=SAMPLING, temperature=0.9, top_p=0.95, repetition_penalty=1.1, seed=None),
}


def small_model(card: ModelCard) -> bool:
    return card.source == "default"


def examples_for(card: ModelCard, folder: Path | None) -> list[tuple[Example, Path]]:
    """The example cards whose picture exists in ``folder``, with the picture's path."""
    if not folder:
        return []
    cards = _SMALL_EXAMPLES if small_model(card) else _EXAMPLES
    return [(e, Path(folder) / e.image) for e in cards if (Path(folder) / e.image).is_file()]


def presets_for(card: ModelCard) -> dict[str, str]:
    """One-click prompts (button label -> prompt) that suit the model."""
    return dict(_SMALL_PRESETS) if small_model(card) else dict(PRESETS)
