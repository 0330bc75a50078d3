"""Validate and normalise every input image in one place.

`load_image` accepts whatever a caller is likely to have (a path, encoded bytes, a binary file object, a PIL
image or a numpy array) and returns a fully decoded RGB `PIL.Image.Image`, or raises `InvalidImageError` with a
sentence that says what is wrong and what is accepted. Nothing else in the package should open images itself, so
the limits below (file size, pixel count, formats) are enforced once and cannot be bypassed by a new code path.

Untrusted files are the main concern: the size and pixel limits are checked before any pixel data is decoded, so
a small file that declares an enormous image (a decompression bomb) is refused after reading only its header.
The pixel limit bounds what is decoded, not what a photo may declare: a JPEG over it (a 50 MP phone photo) is
decoded at 1/2, 1/4 or 1/8 scale, which libjpeg does while decoding, and downscaled to MAX_SIDE; only Pillow's own
decompression-bomb limit refuses it.

`image_digest` hashes the normalised pixels, so the same picture reaches the same feature cache entry whether it
arrived as a path, bytes or a PIL image.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Blip2Error

__all__ = [
    "ALLOWED_FORMATS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "MIN_SIDE",
    "InvalidImageError",
    "image_digest",
    "load_image",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # width * height, of the pixels actually decoded
# Longest side of a JPEG that was over MAX_PIXELS, after downscaling: still far more than the vision towers use.
MAX_SIDE = 2048
MIN_SIDE = 1

_ALLOWED_TEXT = "JPEG, PNG, WEBP, GIF or BMP"

# Pillow reports JPEGs that carry extra pictures (most phone and camera photos: a preview or a second stereo view)
# as "MPO". They are ordinary JPEG files to the user, and frame 0 is the main picture.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# Modes that carry an alpha channel; they are composited over white, as viewers show them, because dropping the
# alpha would reveal whatever colour the encoder left under transparent pixels (often black).
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Premultiplied-alpha modes that Pillow cannot convert to RGBA/RGB directly.
_UNPREMULTIPLY = {"La": "LA", "RGBa": "RGBA"}
# Integer modes holding 16-bit samples; Pillow's own convert() clips them to 255 (a mostly white picture).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

# Leading bytes of formats we can name in an error message even when Pillow cannot identify the data (truncated
# allowed formats, or unsupported formats Pillow has no reader for).
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF-", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


class InvalidImageError(Blip2Error, ValueError):
    """The input is not an image this package accepts; the message says why and what is accepted.

    It is a ValueError so callers that validate arguments generically still catch it, and a Blip2Error so the CLI
    and app show its message like the package's other user-facing errors.
    """


def load_image(source, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_FILE_BYTES) -> Image.Image:
    """Return `source` as a new, fully decoded RGB image, or raise InvalidImageError.

    `source` may be a filesystem path (str or os.PathLike), encoded image bytes (bytes, bytearray, memoryview), a
    binary file object, a PIL image, or a numpy array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) with
    dtype uint8, uint16, or float with values in [0, 1]. Encoded data must be one of ALLOWED_FORMATS and at most
    `max_bytes` long; every input must have at most `max_pixels` pixels and sides of at least MIN_SIDE, except a
    JPEG over `max_pixels`: it is decoded at a reduced scale that fits `max_pixels` and downscaled to fit
    MAX_SIDE x MAX_SIDE.

    Animated images give their first frame, the EXIF orientation is applied, and transparency is composited over
    white. A caller's PIL image or array is never modified. Pillow's limit `Image.MAX_IMAGE_PIXELS` also applies
    to encoded data, so raising `max_pixels` above it has no effect there.
    """
    # Checked first: a PIL image or ndarray must not fall through to the file-like test below.
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _decode(_read_path(source, max_bytes), max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(_read_buffer(source, max_bytes), max_pixels)
    if callable(getattr(source, "read", None)):
        return _decode(_read_stream(source, max_bytes), max_pixels)
    raise InvalidImageError(
        f"Unsupported image input of type {type(source).__name__}; pass a file path, image bytes, "
        "a binary file object, a PIL image or a numpy array."
    )


def image_digest(img: Image.Image) -> str:
    """Return a sha256 hex digest of an image's normalised RGB pixels and size.

    Pass the output of `load_image`: then the same picture gives the same digest whichever way it was supplied.
    A non-RGB image is normalised first (as `load_image` would) so the digest always describes RGB pixels.
    """
    if not isinstance(img, Image.Image):
        raise InvalidImageError(f"image_digest needs a PIL image, not {type(img).__name__}.")
    if img.mode != "RGB":
        img = load_image(img)
    width, height = img.size
    digest = hashlib.sha256()
    # The version tag lets a change in normalisation invalidate old cache entries; the size separates pictures
    # whose pixel bytes happen to coincide (e.g. 2x3 and 3x2 of one colour).
    digest.update(b"blip2.images.v1\0")
    digest.update(f"{width}x{height}\0".encode())
    digest.update(img.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Reading encoded bytes, bounded by max_bytes


def _read_path(source, max_bytes: int) -> bytes:
    """Read an image file after checking it exists, is a regular file and is not larger than max_bytes."""
    path = os.fspath(source)
    shown = os.fsdecode(path)
    try:
        info = os.stat(path)
    except FileNotFoundError as err:
        hint = " (URLs are not fetched; download the image first)" if "://" in shown else ""
        raise InvalidImageError(f"Image file not found: {shown}{hint}.") from err
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise InvalidImageError(f"Cannot access image file {shown}: {_reason(err)}.") from err
    if stat.S_ISDIR(info.st_mode):
        raise InvalidImageError(f"Expected an image file but got a directory: {shown}.")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device could block or never end; only plain files are read.
        raise InvalidImageError(f"Not a regular file: {shown}; pass an image file.")
    # The size is checked from the directory entry so an oversized file is refused without reading it.
    _check_byte_count(info.st_size, max_bytes)
    try:
        with open(path, "rb") as fh:
            data = _read_bounded(fh, max_bytes)
    except OSError as err:
        raise InvalidImageError(f"Cannot read image file {shown}: {_reason(err)}.") from err
    # Checked again: the file may have changed between stat() and read().
    _check_byte_count(len(data), max_bytes)
    return data


def _read_buffer(source, max_bytes: int) -> bytes:
    """Copy a bytes-like object after checking its length (memoryview.nbytes counts bytes, len() items)."""
    size = source.nbytes if isinstance(source, memoryview) else len(source)
    _check_byte_count(size, max_bytes)
    return source.tobytes() if isinstance(source, memoryview) else bytes(source)


def _read_stream(stream, max_bytes: int) -> bytes:
    """Read a binary file object from its current position, never more than max_bytes + 1 bytes."""
    try:
        data = _read_bounded(stream, max_bytes)
    except InvalidImageError:
        raise
    except (OSError, ValueError) as err:  # ValueError: the file is closed
        raise InvalidImageError(f"Cannot read from the image file object: {_reason(err)}.") from err
    _check_byte_count(len(data), max_bytes)
    return data


def _read_bounded(stream, max_bytes: int) -> bytes:
    """Read up to max_bytes + 1 bytes (one more than allowed, to detect oversize without reading it all).

    Loops because raw (unbuffered) streams and sockets may return fewer bytes than asked for before the end.
    """
    chunks, total = [], 0
    while total <= max_bytes:
        chunk = stream.read(max_bytes + 1 - total)
        if isinstance(chunk, str):
            raise InvalidImageError("The image file object is open in text mode; open it with mode 'rb'.")
        if chunk is None:  # a non-blocking stream with nothing ready
            raise InvalidImageError("The image file object returned no data; pass a blocking binary file.")
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise InvalidImageError(
                f"The image file object's read() returned {type(chunk).__name__}, not bytes; pass a binary file."
            )
        if not chunk:
            break
        chunks.append(bytes(chunk))
        total += len(chunks[-1])
    return b"".join(chunks)


def _check_byte_count(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise InvalidImageError(
            f"Image file is too large ({_human_bytes(size)}); the limit is {_human_bytes(max_bytes)}."
        )
    if size == 0:
        raise InvalidImageError(f"Image data is empty (0 bytes); pass a {_ALLOWED_TEXT} file.")


# ---------------------------------------------------------------------------------------------------------------
# Decoding encoded data


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """Identify, check and decode encoded image data.

    Pillow's own decompression-bomb guard is made an error here (warnings are process-wide, so this is scoped to
    the call instead of changing Pillow's global settings) and reported like our own pixel limit.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Lazy: reads only the header, so format and size are checked before any pixel is decoded.
            with Image.open(io.BytesIO(data)) as img:
                _check_format(img.format)
                reduced = _decode_reduced(img, max_pixels)
                rgb = _normalise(img, max_pixels)
                if reduced:
                    rgb.thumbnail((MAX_SIDE, MAX_SIDE))
                return rgb
        except InvalidImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _too_large_error(max_pixels) from err
        except UnidentifiedImageError as err:
            raise _unidentified_error(data) from err
        except MemoryError:
            raise
        except Exception as err:
            # Pillow's plugins raise many types on malformed headers (OSError, SyntaxError, struct.error, ...).
            raise InvalidImageError(
                f"The {_sniff_format(data) or 'image'} data is truncated or corrupt ({_reason(err)}); "
                f"pass a valid {_ALLOWED_TEXT} file."
            ) from err


def _decode_reduced(img: Image.Image, max_pixels: int) -> bool:
    """Over the pixel limit, set a JPEG to decode at the smallest of 1/2, 1/4, 1/8 scale that still covers MAX_SIDE
    (Pillow's draft); True when it was, so the decoded picture is then downscaled to MAX_SIDE. Other formats have
    no reduced decode: they stay over the limit and are refused by `_check_dimensions`, like a bomb."""
    width, height = img.size
    if width * height <= max_pixels or _FORMAT_ALIASES.get(img.format, img.format) != "JPEG":
        return False
    # The target keeps the aspect ratio, so draft can reduce a panorama as much as a square picture.
    scale = MAX_SIDE / max(width, height)
    img.draft(None, (max(1, int(width * scale)), max(1, int(height * scale))))
    return True


def _check_format(fmt: str | None) -> None:
    if _FORMAT_ALIASES.get(fmt, fmt) not in ALLOWED_FORMATS:
        raise InvalidImageError(f"Unsupported image format '{fmt or 'unknown'}'; use {_ALLOWED_TEXT}.")


def _unidentified_error(data: bytes) -> InvalidImageError:
    """Explain data Pillow could not identify: a damaged allowed format, a named unsupported one, or unknown."""
    kind = _sniff_format(data)
    if kind in ALLOWED_FORMATS:
        return InvalidImageError(f"The {kind} data is truncated or corrupt; pass a valid {_ALLOWED_TEXT} file.")
    if kind:
        return InvalidImageError(f"Unsupported image format '{kind}'; use {_ALLOWED_TEXT}.")
    return InvalidImageError(f"Unrecognised image data (not a {_ALLOWED_TEXT} file).")


def _sniff_format(data: bytes) -> str | None:
    """Name the format from the leading bytes, for error messages only (Pillow decides what is decoded)."""
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in _HEIF_BRANDS:
            return "HEIC"
    head = data[:4096].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        return "SVG"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Normalising a PIL image (decoded from data, or given by the caller)


def _from_pil(img: Image.Image, max_pixels: int) -> Image.Image:
    """Normalise a caller's PIL image into a new RGB image, leaving the caller's object as it was."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return _normalise(img, max_pixels)
        except InvalidImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _too_large_error(max_pixels) from err
        except MemoryError:
            raise
        except Exception as err:  # never let a Pillow error escape, even from an unusual image object
            raise InvalidImageError(f"Could not read the given PIL image ({_reason(err)}).") from err


def _normalise(img: Image.Image, max_pixels: int) -> Image.Image:
    """Check the size, take the first frame, apply EXIF orientation and convert to RGB; return a new image."""
    _check_dimensions(img.size, max_pixels)
    frame = _first_frame(img)
    return _to_rgb(_apply_exif_orientation(frame))


def _check_dimensions(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise InvalidImageError(
            f"Image has an empty side ({width}x{height}); both sides must be at least {MIN_SIDE} pixel."
        )
    if width * height > max_pixels:
        raise InvalidImageError(
            f"Image is too large: {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels."
        )


def _first_frame(img: Image.Image) -> Image.Image:
    """Return the first frame, decoded (`img` itself when it is already on frame 0; later steps copy it).

    The caller's image may be positioned on a later frame; it is moved to frame 0 only long enough to copy it,
    then put back, so the caller sees no change. `tell()` is used rather than `n_frames`, which would scan every
    frame of an untrusted file.
    """
    position = img.tell()
    try:
        if position == 0:
            _load_pixels(img)
            return img
        img.seek(0)
        _load_pixels(img)
        return img.copy()
    except InvalidImageError:
        raise
    except EOFError as err:
        raise InvalidImageError("The image has no readable first frame; it is truncated or corrupt.") from err
    finally:
        if position != 0:
            try:
                img.seek(position)
            except Exception:  # best effort: the copy we return does not depend on it
                pass


def _load_pixels(img: Image.Image) -> None:
    """Decode the pixels, turning any decoder failure into InvalidImageError."""
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError):
        raise
    except Exception as err:
        # OSError ("image file is truncated"), SyntaxError, ValueError ("Operation on closed image"), ...
        raise InvalidImageError(
            f"The {img.format or 'image'} data is truncated or corrupt ({_reason(err)}); "
            f"pass a valid {_ALLOWED_TEXT} file."
        ) from err


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Return a new image rotated/flipped as its EXIF orientation tag says (a copy when there is none).

    Malformed EXIF must not reject an otherwise good picture, so any failure here keeps the stored orientation.
    """
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        return img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to a new RGB image; transparency is composited over white."""
    try:
        if img.mode in _SIXTEEN_BIT_MODES:
            img = _sixteen_bit_to_l(img)
        elif img.mode == "F":
            img = _float_to_l(img)
        elif img.mode in _UNPREMULTIPLY:
            img = img.convert(_UNPREMULTIPLY[img.mode])
        if _has_transparency(img):
            return _composite_on_white(img.convert("RGBA"))
        # convert() returns a copy even when the mode is already RGB, so the result never aliases the input.
        return img.convert("RGB")
    except ValueError as err:  # "conversion from X to RGB not supported"
        raise InvalidImageError(
            f"Unsupported image mode '{img.mode}'; use an RGB, greyscale, palette or RGBA image."
        ) from err


def _has_transparency(img: Image.Image) -> bool:
    """True for alpha modes, and for images whose transparency is a colour key (PNG tRNS, GIF transparent index)
    or an alpha palette rather than an alpha channel."""
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return True
    return img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit samples to 8 bit (v / 257, rounded), which maps 0..65535 exactly onto 0..255.

    Mode "I" (32-bit) is treated as 16-bit because that is what PNG/TIFF 16-bit greyscale decodes to; values
    outside 0..65535 are clipped.
    """
    samples = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(_u16_to_u8(samples))


def _float_to_l(img: Image.Image) -> Image.Image:
    """Mode "F" is taken to hold 0..255 values (Pillow's convention); clip and round, NaN becomes 0."""
    samples = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
    return Image.fromarray(np.rint(np.clip(samples, 0, 255)).astype(np.uint8))


def _u16_to_u8(samples: np.ndarray) -> np.ndarray:
    # Adding 128 before the integer division rounds to nearest: 257 * k maps to k, 32768 to 128.
    return ((samples.astype(np.uint32) + 128) // 257).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# numpy arrays


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    """Validate an (H, W[, C]) array and build a new RGB image from it; the array itself is not modified."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InvalidImageError(
            f"Unsupported image array shape {tuple(arr.shape)}; use (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."
        )
    height, width = arr.shape[:2]
    # Before any conversion, so an oversized array is refused without allocating a converted copy.
    _check_dimensions((width, height), max_pixels)
    # fromarray gives L, RGB or RGBA for 2-D, 3- and 4-channel uint8 data; _to_rgb copies, so no memory is shared.
    return _to_rgb(Image.fromarray(np.ascontiguousarray(_array_to_uint8(arr))))


def _array_to_uint8(arr: np.ndarray) -> np.ndarray:
    kind, itemsize = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and itemsize == 1:
        return arr
    if kind == "u" and itemsize == 2:  # any byte order
        return _u16_to_u8(arr)
    if kind == "f":
        if not np.isfinite(arr).all():
            raise InvalidImageError("Float image arrays must be finite; found NaN or infinity.")
        low, high = float(arr.min()), float(arr.max())
        if low < 0.0 or high > 1.0:
            raise InvalidImageError(
                f"Float image arrays must have values in [0, 1]; got values in [{low:g}, {high:g}]."
            )
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    raise InvalidImageError(f"Unsupported image array dtype {arr.dtype}; use uint8, uint16 or float in [0, 1].")


# ---------------------------------------------------------------------------------------------------------------
# Messages


def _too_large_error(max_pixels: int) -> InvalidImageError:
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    return InvalidImageError(
        f"Image is too large to decode safely (possible decompression bomb); the limit is {limit:,} pixels."
    )


def _reason(err: BaseException) -> str:
    """A short reason from an exception: strerror for OS errors, else its message, else its type name."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _human_bytes(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MiB"
    if size >= 1024:
        return f"{size / 1024:.1f} KiB"
    return f"{size} bytes"
