"""Draws the example pictures in assets/examples/ (our own drawings, so no third-party data is committed).

    python assets/make_examples.py
"""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "examples"


def house() -> Image.Image:
    img = Image.new("RGB", (320, 240), (135, 190, 235))  # sky
    d = ImageDraw.Draw(img)
    d.rectangle([0, 170, 320, 240], fill=(70, 150, 60))  # grass
    d.ellipse([250, 20, 300, 70], fill=(250, 210, 40))  # sun
    d.rectangle([60, 110, 170, 190], fill=(200, 80, 60))  # walls
    d.polygon([(50, 112), (115, 60), (180, 112)], fill=(110, 60, 40))  # roof
    d.rectangle([100, 145, 130, 190], fill=(90, 50, 30))  # door
    d.rectangle([210, 120, 225, 190], fill=(100, 70, 40))  # trunk
    d.ellipse([185, 70, 250, 135], fill=(40, 120, 40))  # crown
    return img


def shapes() -> Image.Image:
    img = Image.new("RGB", (320, 240), (245, 245, 245))
    d = ImageDraw.Draw(img)
    d.ellipse([30, 60, 120, 150], fill=(220, 30, 30))  # red circle
    d.rectangle([140, 70, 210, 140], fill=(30, 60, 220))  # blue square
    d.polygon([(240, 150), (275, 70), (310, 150)], fill=(40, 170, 60))  # green triangle
    return img


def triangle() -> Image.Image:
    # One flat shape on white, like the easy-vqa pictures the default model was trained on: the example it answers
    # best (the two above have several objects, which it counts and places poorly).
    img = Image.new("RGB", (240, 240), (255, 255, 255))
    ImageDraw.Draw(img).polygon([(60, 180), (120, 60), (180, 180)], fill=(30, 70, 220))  # blue triangle
    return img


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    house().save(OUT / "house.jpg", quality=90)
    shapes().save(OUT / "shapes.jpg", quality=90)
    triangle().save(OUT / "triangle.jpg", quality=90)
    print("wrote", sorted(p.name for p in OUT.iterdir()))
