"""The exception hierarchy of hero_core.

Every error a caller can cause is an `InvalidInputError` whose message names the
limit or value to change; services map the classes here to gRPC status codes in one
place (`services/common/errors.py`), so code never decides a status code itself.
"""

from __future__ import annotations


class HeroError(Exception):
    """Base of every error hero_core raises on purpose."""


class InvalidInputError(HeroError, ValueError):
    """The caller sent something unusable; the message says what to change."""


class ImageDecodeError(InvalidInputError):
    """The bytes are not a readable image (not an image, truncated, unsupported format)."""


class ImageSizeError(InvalidInputError):
    """The image is zero-sized or above the configured pixel or byte limit."""


class InvalidRatioError(InvalidInputError):
    """A retention ratio outside (0, 1]."""


class UnknownMethodError(InvalidInputError):
    """A pruning method name that is not in the registry."""


class PromptTooLongError(InvalidInputError):
    """A prompt above the configured length limit."""


class LayoutError(InvalidInputError):
    """Packed tokens whose layout does not fit the model (shape, crop, position)."""


class CorruptPayloadError(InvalidInputError):
    """Serialised tokens that fail their magic, version, length or checksum check."""


class ModelLoadError(HeroError):
    """A checkpoint could not be found or is not a supported architecture."""


class ConfigError(HeroError, ValueError):
    """A configuration value outside its documented range."""
