"""Decoding untrusted image bytes into RGB pictures, within limits."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from hero_core.config import DEFAULT_LIMITS, Limits
from hero_core.errors import ImageDecodeError, ImageSizeError

PIXELS_VERSION = 2
"""How bytes become pixels; part of the encoder fingerprint, so cached tokens made by an
older decoding (version 1 dropped transparency instead of compositing it onto white)
are never served."""

SUPPORTED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
"""Container formats accepted from clients; anything else is refused before decoding."""


def decode_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Decode `data` into an RGB image, checking size limits before the pixels are read.

    Raises `ImageSizeError` for empty, zero-sized or over-limit images and
    `ImageDecodeError` for anything that is not a complete image of a supported format.
    """
    if not data:
        raise ImageSizeError("image is empty (0 bytes); send the encoded file's bytes")
    if len(data) > limits.max_image_bytes:
        raise ImageSizeError(
            f"image is {len(data)} bytes, above max_image_bytes={limits.max_image_bytes}; "
            "send a smaller file"
        )
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, on bombs; our own pixel check runs first anyway.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_header(image, limits)
            image.load()
    except (ImageSizeError, ImageDecodeError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageSizeError(f"image is above the pixel limit: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"image could not be decoded ({exc}); send a PNG, JPEG, "
                               "WEBP, GIF, BMP or TIFF file") from exc
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as LLaVA-NeXT's processor makes it: transparency (an alpha band, or a palette
    or colour key marked transparent) composited onto white, so colours hidden under
    transparent pixels never reach the model."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def read_image(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> Image.Image:
    """Read and decode an image file with the same checks as `decode_image`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {path}: {exc.strerror}") from exc
    return decode_image(data, limits)


def _check_header(image: Image.Image, limits: Limits) -> None:
    if image.format not in SUPPORTED_FORMATS:
        raise ImageDecodeError(
            f"image format {image.format} is not supported; use one of "
            f"{', '.join(sorted(SUPPORTED_FORMATS))}"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageSizeError(f"image is {width}x{height}; both sides must be at least 1 pixel")
    if width * height > limits.max_image_pixels:
        raise ImageSizeError(
            f"image is {width}x{height} = {width * height} pixels, above "
            f"max_image_pixels={limits.max_image_pixels}; downscale it first"
        )
