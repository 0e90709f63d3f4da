import io

import pytest
from PIL import Image

from hero_core.config import Limits
from hero_core.errors import ImageDecodeError, ImageSizeError
from hero_core.image import decode_image


def encoded(width=64, height=48, fmt="PNG", mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (width, height), 128).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
def test_supported_formats_decode_to_rgb(fmt):
    image = decode_image(encoded(fmt=fmt))
    assert image.mode == "RGB" and image.size == (64, 48)


def test_grey_and_alpha_images_become_rgb():
    assert decode_image(encoded(mode="L")).mode == "RGB"
    assert decode_image(encoded(mode="RGBA")).mode == "RGB"


def test_not_an_image():
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        decode_image(b"definitely not an image")


def test_truncated_image():
    data = encoded(640, 480, fmt="JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 3])


def test_empty_bytes():
    with pytest.raises(ImageSizeError, match="empty"):
        decode_image(b"")


def test_pixel_limit_names_the_limit():
    with pytest.raises(ImageSizeError, match="max_image_pixels=1000"):
        decode_image(encoded(100, 100), Limits(max_image_pixels=1000))


def test_byte_limit_names_the_limit():
    with pytest.raises(ImageSizeError, match="max_image_bytes=10"):
        decode_image(encoded(), Limits(max_image_bytes=10))


def test_unsupported_format_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="ICO")
    with pytest.raises(ImageDecodeError, match="not supported"):
        decode_image(buf.getvalue())
