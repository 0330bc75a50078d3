"""Procedural scenes: simple shapes on plain backgrounds, with a caption and question/answer pairs that are TRUE.

Every scene is drawn from ``random.Random(seed)`` only (no global RNG), so ``make_scene(seed)`` gives the same
pixels, caption and answers on every machine. Objects sit in distinct cells of a 3x3 grid, never overlap and are
drawn without antialiasing in exact palette colours; the background avoids every shape colour, so the drawn
picture can be checked pixel by pixel against ``Scene.objects`` (tests do).

Position words follow the grid: columns left / center / right, rows top / middle / bottom ("in the top left",
"on the right", "in the center"). Left and right are the viewer's, so a horizontal flip must swap them
(``training.data.swap_left_right``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["COLORS", "SHAPES", "SceneObject", "Scene", "make_scene", "number_word"]

# Shape colours: exact RGB values (shapes are drawn flat, so every shape pixel has exactly this value).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 210, 20),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "black": (20, 20, 20),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "rectangle", "star")
# Backgrounds: base colour; shape colours closer than _MIN_CONTRAST to it are not used on it.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (215, 215, 215),
    "beige": (235, 222, 190),
    "light blue": (200, 225, 245),
    "pale green": (210, 240, 210),
    "dark gray": (60, 60, 60),
    "navy": (25, 30, 70),
}
BACKGROUND_STYLES = ("plain", "gradient", "noise")
_MIN_CONTRAST = 110.0  # Euclidean RGB distance; also keeps noisy/gradient backgrounds off every shape colour
_NOISE = 10  # +- amplitude of background noise / half the gradient's range
_COLS = ("left", "center", "right")
_ROWS = ("top", "middle", "bottom")
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Object radius as a fraction of the canvas side; a grid cell is 1/3 of it, so large shapes still fit with margin.
_RADIUS = {"small": 0.075, "large": 0.135}


def number_word(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str  # "small" | "large"
    row: int  # 0 top, 1 middle, 2 bottom
    col: int  # 0 left, 1 center, 2 right
    center: tuple[int, int]  # (x, y) in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) inclusive, every drawn pixel lies inside

    @property
    def position(self) -> str:
        """Grid position as words: "top left", "left", "center", "bottom", ..."""
        row, col = _ROWS[self.row], _COLS[self.col]
        if row == "middle":
            return col
        if col == "center":
            return row
        return f"{row} {col}"

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    caption: str
    qa: list[tuple[str, str]]
    objects: list[SceneObject]
    background: str = ""
    seed: int = 0
    extra: dict = field(default_factory=dict)


def position_phrase(position: str) -> str:
    """ "left" -> "on the left", "top" -> "at the top", "center" -> "in the center", "top left" -> "in the top left"."""
    if position in ("left", "right"):
        return f"on the {position}"
    if position in ("top", "bottom"):
        return f"at the {position}"
    return f"in the {position}"


def make_scene(seed: int, size: int = 224) -> Scene:
    """Draw scene number ``seed``: 1-4 shapes in distinct grid cells, a caption, and QA pairs about it."""
    rng = random.Random(seed)
    background = rng.choice(list(BACKGROUNDS))
    style = rng.choice(BACKGROUND_STYLES)
    bg_rgb = BACKGROUNDS[background]
    palette = [c for c, rgb in COLORS.items() if _distance(rgb, bg_rgb) >= _MIN_CONTRAST]

    image = _background(rng, size, bg_rgb, style)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    n = rng.choice((1, 1, 2, 2, 3, 3, 4))
    # Reuse a (colour, shape) now and then so captions have counts ("two red circles").
    objects = []
    for cell_index in rng.sample(range(9), n):
        if objects and rng.random() < 0.3:
            color, shape = objects[-1].color, objects[-1].shape
        else:
            color, shape = rng.choice(palette), rng.choice(SHAPES)
        obj_size = rng.choice(("small", "large"))
        row, col = divmod(cell_index, 3)
        radius = round(_RADIUS[obj_size] * size)
        slack = max(0, int(cell / 2 - radius - 2))
        cx = int(col * cell + cell / 2) + rng.randint(-slack, slack)
        cy = int(row * cell + cell / 2) + rng.randint(-slack, slack)
        bbox = _draw_shape(draw, shape, cx, cy, radius, COLORS[color], horizontal=rng.random() < 0.5)
        objects.append(SceneObject(shape, color, obj_size, row, col, (cx, cy), bbox))

    caption = _caption(rng, objects, background)
    qa = _questions(rng, objects, palette)
    return Scene(image=image, caption=caption, qa=qa, objects=objects, background=background, seed=seed,
                 extra={"background_style": style})


# ---------------------------------------------------------------------------------------------------------------
# Drawing


def _distance(a, b) -> float:
    return float(sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5)


def _background(rng: random.Random, size: int, rgb, style: str) -> Image.Image:
    base = np.asarray(rgb, dtype=np.int16)
    if style == "plain":
        return Image.new("RGB", (size, size), tuple(rgb))
    if style == "gradient":
        ramp = np.linspace(-_NOISE, _NOISE, size, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        pixels = base + np.broadcast_to(ramp, (size, size))[..., None].astype(np.int16)
    else:  # noise from a numpy generator seeded from our Random, never numpy's global state
        gen = np.random.default_rng(rng.getrandbits(64))
        pixels = base + gen.integers(-_NOISE, _NOISE + 1, (size, size, 1), dtype=np.int16)
    # Clipped inside (5, 250) so a noisy white or black background never produces an exact shape colour.
    return Image.fromarray(np.clip(pixels, 5, 250).astype(np.uint8), "RGB")


def _draw_shape(draw: ImageDraw.ImageDraw, shape, cx, cy, r, rgb, horizontal: bool):
    """Draw one filled shape centred on (cx, cy) with "radius" r; return its inclusive pixel bbox."""
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        h = round(r * 0.85)
        box = (cx - h, cy - h, cx + h, cy + h)
        draw.rectangle(box, fill=rgb)
    elif shape == "rectangle":
        long, short = r, round(r * 0.45)
        w, h = (long, short) if horizontal else (short, long)
        box = (cx - w, cy - h, cx + w, cy + h)
        draw.rectangle(box, fill=rgb)
    elif shape == "triangle":
        points = [(cx, cy - r), (cx + r, cy + round(r * 0.8)), (cx - r, cy + round(r * 0.8))]
        draw.polygon(points, fill=rgb)
        box = (cx - r, cy - r, cx + r, cy + round(r * 0.8))
    elif shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = np.pi / 2 + k * np.pi / 5  # first point straight up
            points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
        draw.polygon(points, fill=rgb)
        box = (cx - r, cy - r, cx + r, cy + r)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return tuple(int(v) for v in box)


# ---------------------------------------------------------------------------------------------------------------
# Language


def _groups(objects) -> list[tuple[str, str, list[SceneObject]]]:
    """(colour, shape, objects) in order of first appearance."""
    out: dict[tuple[str, str], list[SceneObject]] = {}
    for obj in objects:
        out.setdefault((obj.color, obj.shape), []).append(obj)
    return [(c, s, objs) for (c, s), objs in out.items()]


def _caption(rng: random.Random, objects, background: str) -> str:
    parts = []
    for color, shape, objs in _groups(objects):
        if len(objs) == 1:
            obj = objs[0]
            size = f"{obj.size} " if rng.random() < 0.4 else ""
            article = "an" if (size or color)[0] in "aeiou" else "a"
            phrase = f"{article} {size}{color} {shape}"
            if rng.random() < 0.7:
                phrase += " " + position_phrase(obj.position)
        else:
            phrase = f"{number_word(len(objs))} {color} {_plural(shape, len(objs))}"
        parts.append(phrase)
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = rng.choice(("{}", "{}", "a picture of {}", "there is {}", "{} on a {} background"))
    if template.startswith("there is") and not listed.startswith(("a ", "an ")):
        template = "there are {}"  # "there are two red circles ...", but "there is a square and two circles"
    text = template.format(listed, background)
    return text[0].upper() + text[1:] + "."


def _questions(rng: random.Random, objects, palette) -> list[tuple[str, str]]:
    qa: list[tuple[str, str]] = []
    shapes = Counter(o.shape for o in objects)
    colors = Counter(o.color for o in objects)
    names = Counter(o.name for o in objects)

    # Counting: every shape kind (absent ones too: "zero"), total, and one colour.
    qa.append(("How many shapes are there?", number_word(len(objects))))
    for shape in SHAPES:
        if shapes[shape] or rng.random() < 0.25:
            qa.append((f"How many {shape}s are there?", number_word(shapes[shape])))
    color = rng.choice(palette)
    qa.append((f"How many {color} shapes are there?", number_word(colors[color])))

    unique = [o for o in objects if names[o.name] == 1]
    for obj in objects:
        if shapes[obj.shape] == 1:
            qa.append((f"What color is the {obj.shape}?", obj.color))
        if colors[obj.color] == 1:
            qa.append((f"What shape is {obj.color}?", obj.shape))
        qa.append((f"What shape is {position_phrase(obj.position)}?", obj.shape))
    for obj in unique:
        qa.append((f"Where is the {obj.name}?", obj.position))
        qa.append((f"Is the {obj.name} small or large?", obj.size))

    # Spatial relations between uniquely named objects (yes and no both occur).
    for a in unique:
        for b in unique:
            if a is b:
                continue
            if a.col != b.col:
                qa.append((f"Is the {a.name} left of the {b.name}?", "yes" if a.col < b.col else "no"))
            if a.row != b.row:
                qa.append((f"Is the {a.name} above the {b.name}?", "yes" if a.row < b.row else "no"))

    # Existence: present pairs and sampled absent ones.
    for name in names:
        qa.append((f"Is there a {name}?", "yes"))
    for _ in range(2):
        c, s = rng.choice(palette), rng.choice(SHAPES)
        name = f"{c} {s}"
        qa.append((f"Is there a {name}?", "yes" if names[name] else "no"))
    # Deduplicate, keeping the first occurrence.
    seen, out = set(), []
    for q, a in qa:
        if q not in seen:
            seen.add(q)
            out.append((q, a))
    return out
