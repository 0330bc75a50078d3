"""Tests for blip2.images: every image is built here with Pillow/numpy, nothing is checked in."""

import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from blip2 import images
from blip2.images import InvalidImageError, image_digest, load_image

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
COLOUR = (200, 40, 70)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def assert_close(pixel, expected, tol):
    assert all(abs(a - b) <= tol for a, b in zip(pixel, expected)), (pixel, expected)


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_bilevel_png(width, height):
    """A real, valid 1-bit PNG of all-black rows: tiny on disk, width*height pixels once decoded."""
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_chunk = 500
    parts = [packer.compress(row * rows_per_chunk) for _ in range(height // rows_per_chunk)]
    parts += [packer.compress(row * (height % rows_per_chunk)), packer.flush()]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", b"".join(parts))
            + png_chunk(b"IEND", b""))


@pytest.fixture
def count_decodes(monkeypatch):
    """Record every ImageFile.load() call, to prove a rejection happened before pixels were decoded."""
    calls = []
    original = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


# --- accepted formats and sources -------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, tol", [("JPEG", 8), ("PNG", 0), ("WEBP", 8), ("GIF", 0), ("BMP", 0)])
@pytest.mark.parametrize("as_source", ["bytes", "bytearray", "memoryview", "path", "str", "file"])
def test_allowed_formats_round_trip_to_rgb(tmp_path, fmt, tol, as_source):
    data = encode(Image.new("RGB", (24, 16), COLOUR), fmt)
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(data)
    source = {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data), "path": path,
              "str": str(path), "file": io.BytesIO(data)}[as_source]
    out = load_image(source)
    assert out.mode == "RGB" and out.size == (24, 16)
    assert_close(out.getpixel((12, 8)), COLOUR, tol)


def test_result_is_fully_decoded_and_detached_from_the_file(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (5, 4), COLOUR).save(path)
    out = load_image(path)
    path.unlink()  # a lazily decoded image would now fail
    assert np.asarray(out).shape == (4, 5, 3)
    assert not isinstance(out, ImageFile.ImageFile)


def test_file_object_is_read_from_its_current_position():
    data = encode(Image.new("RGB", (3, 3), BLUE), "PNG")
    stream = io.BytesIO(b"junk" + data)
    stream.seek(4)
    assert load_image(stream).getpixel((1, 1)) == BLUE


def test_camera_jpeg_reported_as_mpo_is_accepted():
    # Phone/camera JPEGs with an embedded second picture are identified by Pillow as "MPO".
    data = encode(Image.new("RGB", (8, 6), RED), "MPO", save_all=True,
                  append_images=[Image.new("RGB", (8, 6), BLUE)])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = load_image(data)
    assert out.size == (8, 6)
    assert_close(out.getpixel((4, 3)), RED, 8)


def test_one_by_one_image_is_accepted_unchanged_in_size():
    out = load_image(encode(Image.new("RGB", (1, 1), GREEN), "PNG"))
    assert out.size == (1, 1) and out.mode == "RGB" and out.getpixel((0, 0)) == GREEN
    assert load_image(np.zeros((1, 1), np.uint8)).size == (1, 1)


# --- rejected formats and data ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PDF"])
def test_other_formats_are_rejected_by_name(fmt):
    data = encode(Image.new("RGB", (16, 16), COLOUR), fmt)
    with pytest.raises(InvalidImageError, match=f"'{fmt}'.*JPEG, PNG, WEBP, GIF or BMP"):
        load_image(data)


def test_svg_text_file_is_rejected_by_name(tmp_path):
    path = tmp_path / "logo.svg"
    path.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                    '<rect width="10" height="10" fill="red"/></svg>\n')
    with pytest.raises(InvalidImageError, match="'SVG'.*JPEG, PNG"):
        load_image(path)


def test_heic_is_rejected_by_name():
    fake_heic = struct.pack(">I", 24) + b"ftypheic" + b"\0" * 12 + b"mif1heic"
    with pytest.raises(InvalidImageError, match="'HEIC'"):
        load_image(fake_heic)


def test_garbage_bytes_are_rejected():
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(InvalidImageError, match="Unrecognised image data.*JPEG, PNG, WEBP, GIF or BMP"):
        load_image(b"hello, I am not a picture" + garbage)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP"])
def test_truncated_data_is_rejected(fmt):
    noise = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), fmt)
    with pytest.raises(InvalidImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


@pytest.mark.parametrize("fmt, cut", [("PNG", 10), ("PNG", 20), ("PNG", 40), ("JPEG", 4), ("JPEG", 20)])
def test_file_cut_inside_its_header_is_reported_as_damaged_not_unsupported(fmt, cut):
    # Pillow cannot even identify most of these; the message must still name the damaged format.
    data = encode(Image.new("RGB", (8, 8), COLOUR), fmt)
    with pytest.raises(InvalidImageError, match=f"The {fmt} data is truncated or corrupt"):
        load_image(data[:cut])


def test_corrupted_files_only_ever_raise_invalid_image_error():
    # Flip bytes at many positions: each result must be an RGB image or InvalidImageError, never a Pillow error.
    rng = np.random.default_rng(2)
    noise = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    outcomes = set()
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
        data = encode(noise, fmt)
        for _ in range(20):
            damaged = bytearray(data)
            for pos in rng.integers(0, len(data), 3):
                damaged[pos] ^= 0xFF
            try:
                assert load_image(bytes(damaged)).mode == "RGB"
                outcomes.add("ok")
            except InvalidImageError:
                outcomes.add("rejected")
    assert "rejected" in outcomes


def test_pil_image_whose_file_is_closed_raises_invalid_image_error(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4), COLOUR).save(path)
    lazy = Image.open(path)
    lazy.close()  # closed before its pixels were ever decoded
    with pytest.raises(InvalidImageError):
        load_image(lazy)


# --- size limits ------------------------------------------------------------------------------------------------

def test_pixel_limit_is_checked_from_the_header_before_decoding(count_decodes):
    data = encode(Image.new("RGB", (100, 50), COLOUR), "PNG")
    with pytest.raises(InvalidImageError, match=r"100x50 = 5,000 pixels; the limit is 4,999"):
        load_image(data, max_pixels=4999)
    assert count_decodes == []
    assert load_image(data, max_pixels=5000).size == (100, 50)
    assert set(count_decodes) == {(100, 50)}  # load() is re-entered (a no-op) by copy/convert


def test_pixel_limit_applies_to_pil_images_and_arrays():
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(Image.new("RGB", (10, 10)), max_pixels=99)
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=99)
    assert load_image(np.zeros((10, 10, 3), np.uint8), max_pixels=100).size == (10, 10)


@pytest.mark.parametrize("width, height", [
    (8000, 6000),    # 48 M pixels: over our 40 M limit, under Pillow's warning threshold (~89 M)
    (10000, 10000),  # 100 M: Pillow would only warn; must still be an error
    (20000, 20000),  # 400 M: Pillow raises DecompressionBombError in open(); must become InvalidImageError
])
def test_decompression_bomb_is_rejected_before_decoding(count_decodes, width, height):
    bomb = blank_bilevel_png(width, height)
    assert len(bomb) < 100_000  # tiny file, huge declared size
    filters_before = list(warnings.filters)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(bomb)
    assert count_decodes == []
    # Pillow's global settings and the process's warning filters are left as they were.
    assert Image.MAX_IMAGE_PIXELS == limit_before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert warnings.filters == filters_before


def test_pillow_bomb_warning_is_an_error_even_when_max_pixels_is_raised(count_decodes):
    # 100 M pixels is within the caller's limit but over Pillow's MAX_IMAGE_PIXELS, where Pillow only warns.
    bomb = blank_bilevel_png(10000, 10000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InvalidImageError, match="decompression bomb"):
            load_image(bomb, max_pixels=150_000_000)
    assert count_decodes == []
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_photo_over_the_pixel_limit_is_decoded_small_and_downscaled(count_decodes):
    """A 50 MP phone photo (JPEG) is not refused: libjpeg decodes it at a reduced scale (the full-size pixels never
    exist) and it is downscaled to MAX_SIDE, keeping its aspect ratio and its EXIF orientation."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the picture is portrait
    photo = encode(Image.new("RGB", (8000, 6300), COLOUR), "JPEG", quality=30, exif=exif)
    assert 8000 * 6300 > images.MAX_PIXELS
    out = load_image(photo)
    assert out.size == (1613, images.MAX_SIDE) and out.mode == "RGB"
    assert_close(out.getpixel((800, 1000)), COLOUR, 4)
    assert count_decodes and all(w * h <= images.MAX_PIXELS for w, h in count_decodes)
    assert load_image(io.BytesIO(photo)).size == out.size  # every source of encoded data alike


def test_jpeg_over_pillows_bomb_limit_is_still_refused_before_decoding(count_decodes):
    small = encode(Image.new("RGB", (16, 16), COLOUR), "JPEG")
    sof = small.index(b"\xff\xc0")  # baseline frame header: length (2), precision (1), height (2), width (2)
    bomb = small[:sof + 5] + struct.pack(">HH", 12000, 12000) + small[sof + 9:]
    with pytest.warns(Image.DecompressionBombWarning), Image.open(io.BytesIO(bomb)) as img:
        assert img.size == (12000, 12000)  # 144 M pixels declared: over Image.MAX_IMAGE_PIXELS, under twice it
    with pytest.raises(InvalidImageError, match="decompression bomb"):
        load_image(bomb)
    assert count_decodes == []


def test_empty_sides_are_rejected():
    with pytest.raises(InvalidImageError, match="empty side"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(InvalidImageError, match="empty side"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_bytes_over_max_bytes_are_rejected():
    data = encode(Image.new("RGB", (8, 8), COLOUR), "PNG")
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(data, max_bytes=len(data) - 1)
    assert load_image(data, max_bytes=len(data)).size == (8, 8)


def test_oversized_file_is_rejected_without_opening_it(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(encode(Image.new("RGB", (8, 8), COLOUR), "PNG"))

    def no_open(*args, **kwargs):
        raise AssertionError("the oversized file was opened")

    monkeypatch.setattr(images, "open", no_open, raising=False)  # shadows the builtin inside the module only
    with pytest.raises(InvalidImageError, match=r"too large \(\d+ bytes\); the limit is 10 bytes"):
        load_image(path, max_bytes=10)


def test_oversized_stream_is_read_only_up_to_the_limit():
    class CountingStream(io.BytesIO):
        read_total = 0

        def read(self, size=-1):
            chunk = super().read(size)
            CountingStream.read_total += len(chunk)
            return chunk

    stream = CountingStream(b"\xff\xd8\xff" + b"\0" * 100_000)
    with pytest.raises(InvalidImageError, match="too large"):
        load_image(stream, max_bytes=1000)
    assert CountingStream.read_total <= 1001


@pytest.mark.parametrize("source", [b"", bytearray(), io.BytesIO(b"")])
def test_empty_data_is_rejected(source):
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(source)


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        load_image(path)


def test_missing_path_and_directory_are_rejected(tmp_path):
    with pytest.raises(InvalidImageError, match="Image file not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(tmp_path)
    with pytest.raises(InvalidImageError, match="directory"):
        load_image(str(tmp_path))


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_device_file_is_rejected_without_reading_it():
    with pytest.raises(InvalidImageError, match="Not a regular file"):
        load_image("/dev/null")


def test_text_mode_file_object_is_rejected(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (2, 2)).save(path)
    with open(path, encoding="latin-1") as fh, pytest.raises(InvalidImageError, match="text mode.*'rb'"):
        load_image(fh)


@pytest.mark.parametrize("source", [42, None, 3.5, [[0, 0], [0, 0]], object()])
def test_unsupported_input_types_are_rejected_by_name(source):
    with pytest.raises(InvalidImageError, match=f"type {type(source).__name__};"):
        load_image(source)


def test_invalid_image_error_is_a_value_error():
    assert issubclass(InvalidImageError, ValueError)
    with pytest.raises(ValueError):
        load_image(b"not an image")


# --- orientation, frames, transparency ---------------------------------------------------------------------------

def _left_red_right_blue(width=40, height=20):
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def _with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value  # Orientation
    return exif


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_is_applied(fmt):
    data = encode(_left_red_right_blue(), fmt, exif=_with_orientation(6).tobytes())
    out = load_image(data)
    # Orientation 6 means "rotate 90 degrees clockwise to display": the left (red) half ends up on top.
    assert out.size == (20, 40)
    assert_close(out.getpixel((10, 5)), RED, 12)
    assert_close(out.getpixel((10, 35)), BLUE, 12)


def test_exif_orientation_is_applied_to_pil_input_without_mutating_it():
    opened = Image.open(io.BytesIO(encode(_left_red_right_blue(), "JPEG", exif=_with_orientation(6).tobytes())))
    out = load_image(opened)
    assert out.size == (20, 40)
    assert opened.size == (40, 20)
    assert opened.getexif().get(0x0112) == 6


def _two_frames(fmt):
    first, second = Image.new("RGB", (6, 4), RED), Image.new("RGB", (6, 4), BLUE)
    return encode(first, fmt, save_all=True, append_images=[second], duration=50, loop=0)


@pytest.mark.parametrize("fmt, tol", [("GIF", 0), ("PNG", 0), ("WEBP", 10)])
def test_animated_image_gives_its_first_frame(fmt, tol):
    data = _two_frames(fmt)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    out = load_image(data)
    assert out.size == (6, 4)
    assert_close(out.getpixel((3, 2)), RED, tol)


def test_pil_animation_on_a_later_frame_gives_first_frame_and_keeps_callers_position():
    anim = Image.open(io.BytesIO(_two_frames("GIF")))
    anim.seek(1)
    assert anim.convert("RGB").getpixel((0, 0)) == BLUE
    assert load_image(anim).getpixel((0, 0)) == RED
    assert anim.tell() == 1


def _palette_red_with_transparent_pixel():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([*RED, 0, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)  # palette index 1 is black, and is the transparent index
    return img


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_becomes_white(fmt):
    out = load_image(encode(_palette_red_with_transparent_pixel(), fmt, transparency=1))
    assert out.getpixel((0, 0)) == RED
    assert out.getpixel((1, 0)) == WHITE  # not black


def test_palette_with_alpha_palette_becomes_white():
    img = Image.new("P", (2, 1), 0)
    img.putpalette([*RED, 255, 0, 0, 0, 0], rawmode="RGBA")
    img.putpixel((1, 0), 1)
    out = load_image(img)
    assert out.getpixel((0, 0)) == RED and out.getpixel((1, 0)) == WHITE


def _alpha_image(rgba, mode):
    """`rgba` in `mode`. Pillow's RGBA->PA and RGBA->La conversions drop the alpha, so those are built by hand."""
    if mode == "La":
        return rgba.convert("LA").convert("La")
    if mode == "PA":
        img = Image.new("PA", rgba.size)
        img.putpalette([0, 0, 0] * 256)
        for x in range(rgba.width):
            img.putpixel((x, 0), (0, rgba.getpixel((x, 0))[3]))
        return img
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa", "La"])
def test_alpha_modes_are_composited_over_white(mode):
    rgba = Image.new("RGBA", (3, 1), (0, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))    # fully transparent black
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    img = _alpha_image(rgba, mode)
    assert img.mode == mode and img.getpixel((1, 0))[-1] == 0  # the test input really is transparent there
    out = load_image(img)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert out.getpixel((1, 0)) == WHITE
    assert_close(out.getpixel((2, 0)), (127, 127, 127), 2)


def test_rgba_png_transparent_pixel_becomes_white():
    rgba = Image.new("RGBA", (2, 1), (*GREEN, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    out = load_image(encode(rgba, "PNG"))
    assert out.getpixel((0, 0)) == GREEN and out.getpixel((1, 0)) == WHITE


# --- modes ------------------------------------------------------------------------------------------------------

def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = load_image(data)
    assert out.mode == "RGB"
    assert_close(out.getpixel((4, 4)), RED, 8)


def test_sixteen_bit_png_is_scaled_not_clipped():
    samples = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(samples), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(load_image(data))
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_pil_modes_are_scaled(mode):
    img = Image.new(mode, (2, 1))
    img.putpixel((0, 0), 65535)
    img.putpixel((1, 0), 32768)
    out = load_image(img)
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == (128, 128, 128)


def test_float_mode_is_clipped_to_0_255():
    img = Image.fromarray(np.array([[-5.0, 100.0, 300.0]], dtype=np.float32))
    assert img.mode == "F"
    assert np.asarray(load_image(img))[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("mode, expected", [
    ("1", WHITE), ("L", (200, 200, 200)), ("YCbCr", RED), ("HSV", RED), ("LAB", RED), ("RGBX", RED),
    ("CMYK", RED),
])
def test_other_modes_become_rgb(mode, expected):
    source = Image.new("RGB", (2, 2), (200, 200, 200) if mode in ("1", "L") else RED)
    out = load_image(source.convert(mode))
    assert out.mode == "RGB"
    assert_close(out.getpixel((1, 1)), expected, 8)


# --- numpy arrays -----------------------------------------------------------------------------------------------

def test_uint8_rgb_array_is_exact_and_does_not_share_memory():
    arr = np.random.default_rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    before = arr.copy()
    out = load_image(arr)
    assert out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), arr)
    out.putpixel((0, 0), (1, 2, 3))
    np.testing.assert_array_equal(arr, before)


@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1)])
def test_grey_arrays_become_rgb(shape):
    arr = np.full(shape, 90, np.uint8)
    out = load_image(arr)
    assert out.size == (6, 4) and out.getpixel((2, 2)) == (90, 90, 90)


def test_float_array_in_0_1_is_scaled():
    arr = np.zeros((2, 2, 3), np.float32)
    arr[0, 0] = (1.0, 0.5, 0.0)
    assert load_image(arr).getpixel((0, 0)) == (255, 128, 0)


def test_uint16_array_is_scaled():
    arr = np.zeros((1, 2, 3), np.uint16)
    arr[0, 0] = (65535, 32768, 257)
    assert load_image(arr).getpixel((0, 0)) == (255, 128, 1)
    assert load_image(arr.astype(">u2")).getpixel((0, 0)) == (255, 128, 1)


def test_rgba_array_transparent_pixel_becomes_white():
    arr = np.zeros((1, 2, 4), np.uint8)
    arr[0, 0] = (*BLUE, 255)
    out = load_image(arr)
    assert out.getpixel((0, 0)) == BLUE and out.getpixel((1, 0)) == WHITE


def test_non_contiguous_array_is_accepted():
    arr = np.random.default_rng(4).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(arr[::2, ::-1])), arr[::2, ::-1])


@pytest.mark.parametrize("bad, message", [
    (np.array([[0.0, 1.5]]), r"\[0, 1\].*\[0, 1.5\]"),
    (np.array([[-0.1, 0.5]]), r"\[0, 1\]"),
    (np.array([[np.nan, 0.5]]), "finite"),
    (np.array([[np.inf, 0.5]]), "finite"),
])
def test_float_array_out_of_range_is_rejected(bad, message):
    with pytest.raises(InvalidImageError, match=message):
        load_image(bad)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 3), (4, 4, 2), (4, 4, 5)])
def test_wrong_array_shape_is_rejected(shape):
    with pytest.raises(InvalidImageError, match="shape"):
        load_image(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool, np.uint32, np.complex64])
def test_unsupported_array_dtype_is_rejected(dtype):
    with pytest.raises(InvalidImageError, match="dtype.*uint8, uint16 or float"):
        load_image(np.zeros((2, 2, 3), dtype))


# --- caller's objects are untouched ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L"])
def test_callers_pil_image_is_not_mutated(mode):
    base = Image.fromarray(np.random.default_rng(5).integers(0, 256, (6, 6, 4), dtype=np.uint8), "RGBA")
    img = base.convert(mode)
    before = (img.mode, img.size, img.tobytes(), dict(img.info))
    out = load_image(img)
    assert out is not img
    out.putpixel((0, 0), (1, 2, 3))
    assert (img.mode, img.size, img.tobytes(), dict(img.info)) == before


# --- digest -----------------------------------------------------------------------------------------------------

def test_digest_is_the_same_for_every_way_of_passing_one_picture(tmp_path):
    picture = Image.fromarray(np.random.default_rng(6).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    data = encode(picture, "PNG")
    path = tmp_path / "p.png"
    path.write_bytes(data)
    digests = {
        image_digest(load_image(path)),
        image_digest(load_image(str(path))),
        image_digest(load_image(data)),
        image_digest(load_image(io.BytesIO(data))),
        image_digest(load_image(picture)),
        image_digest(load_image(np.asarray(picture))),
        image_digest(picture),
    }
    assert len(digests) == 1
    digest = digests.pop()
    assert len(digest) == 64 and int(digest, 16) >= 0


def test_digest_differs_for_different_pictures():
    picture = Image.new("RGB", (4, 4), COLOUR)
    changed = picture.copy()
    changed.putpixel((3, 3), (201, 40, 70))
    assert image_digest(picture) != image_digest(changed)
    # Same pixel bytes, different shape.
    assert image_digest(Image.new("RGB", (2, 3), COLOUR)) != image_digest(Image.new("RGB", (3, 2), COLOUR))


def test_digest_of_non_rgb_image_describes_its_normalised_pixels():
    grey = Image.new("L", (3, 3), 77)
    assert image_digest(grey) == image_digest(Image.new("RGB", (3, 3), (77, 77, 77)))
    with pytest.raises(InvalidImageError):
        image_digest(b"bytes")
