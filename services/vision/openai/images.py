"""An `image_url` as the vision pipeline's `ImageInput`: bytes or a cached image's id.

* `data:image/<type>;base64,<data>`: the bytes, decoded strictly (at most
  `max_image_bytes`, checked before decoding).
* `hero-image://<id>`: an image this service stored before (the id an earlier answer
  returned in `usage.hero.image_id` / `x-hero-image-id`); an unknown id is NOT_FOUND.
* `http://` / `https://`: refused unless `openai.image_url_hosts` names the host, so by
  default a request cannot make the service connect anywhere (no server-side request
  forgery). For a listed host the image is fetched without redirects, within
  `openai.image_fetch_timeout_s` and `max_image_bytes`.
"""

from __future__ import annotations

import base64
import binascii
import re
from urllib.parse import urlsplit

from hero.vision.v1 import vision_pb2

from hero_core.errors import InvalidInputError
from services.vision.config import VisionConfig

IMAGE_ID_SCHEME = "hero-image://"
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9=._+-]+)*;base64,")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


def image_id_url(image_id: str) -> str:
    """The `image_url` that names a cached image."""
    return IMAGE_ID_SCHEME + image_id


def allowed_host(url: str, hosts: list[str]) -> bool:
    """Whether `url`'s host (or host:port) is one of `hosts` (case-insensitive)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        return False
    listed = {h.strip().lower() for h in hosts if h.strip()}
    return bool(host) and (host in listed or f"{host}:{port}" in listed)


def decode_data_uri(url: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image data URI; `InvalidInputError` saying what is wrong."""
    match = _DATA_URI.match(url)
    if match is None:
        raise InvalidInputError("image_url: a data URI must read "
                                "data:image/<type>;base64,<data>")
    payload = url[match.end():]
    if len(payload) > 4 * -(-max_bytes // 3) + 4:
        raise InvalidInputError(f"image_url: the image is about {len(payload) * 3 // 4} "
                                f"bytes, above max_image_bytes={max_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("image_url: the data URI's payload is not valid base64"
                                ) from None
    if not data:
        raise InvalidInputError("image_url: the data URI holds no image")
    if len(data) > max_bytes:
        raise InvalidInputError(f"image_url: the image is {len(data)} bytes, above "
                                f"max_image_bytes={max_bytes}")
    return data


async def fetch_image(url: str, max_bytes: int, timeout_s: float) -> bytes:
    """The body of a GET of `url` (an allowed host's): status 200, no redirects, at most
    `max_bytes`, all within `timeout_s`; `InvalidInputError` otherwise."""
    import aiohttp

    host = urlsplit(url).hostname
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise InvalidInputError(f"image_url: {host} answered HTTP {response.status}")
            if (response.content_length or 0) > max_bytes:
                raise InvalidInputError(f"image_url: the image at {host} is "
                                        f"{response.content_length} bytes, above "
                                        f"max_image_bytes={max_bytes}")
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 << 10):
                data += chunk
                if len(data) > max_bytes:
                    raise InvalidInputError(f"image_url: the image at {host} is larger "
                                            f"than max_image_bytes={max_bytes}")
            return bytes(data)
    except TimeoutError:
        raise InvalidInputError(f"image_url: {host} did not send the image within "
                                f"{timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise InvalidInputError(f"image_url: the image at {host} could not be fetched "
                                f"({type(exc).__name__})") from None


async def image_input(url: str, config: VisionConfig) -> vision_pb2.ImageInput:
    """The pipeline's input for an `image_url` (see the module's docstring)."""
    if url.startswith(IMAGE_ID_SCHEME):
        image_id = url[len(IMAGE_ID_SCHEME):]
        if not _IMAGE_ID.fullmatch(image_id):
            raise InvalidInputError("image_url: hero-image:// takes the 64-hex-digit id an "
                                    "earlier answer returned (usage.hero.image_id)")
        return vision_pb2.ImageInput(image_id=image_id)
    if url.startswith("data:"):
        return vision_pb2.ImageInput(data=decode_data_uri(url, config.max_image_bytes))
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise InvalidInputError("image_url: send a data:image/...;base64, URI, "
                                "hero-image://<id>, or an http(s) URL of an allowed host")
    settings = config.openai
    if not allowed_host(url, settings.image_url_hosts):
        raise InvalidInputError(
            "image_url: remote image URLs are not fetched from this host (openai."
            "image_url_hosts does not list it); send the image as a data:image/...;base64, "
            "URI or by its hero-image:// id")
    data = await fetch_image(url, config.max_image_bytes, settings.image_fetch_timeout_s)
    return vision_pb2.ImageInput(data=data)
