"""Encoded image bytes -> the model's input tensor, exactly as training prepared images."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract.metadata import Preprocessing
from contract.preprocessing import resize_images


class ImageError(ValueError):
    """Bytes that are not an image this server will decode."""


def decode(data: bytes, prep: Preprocessing, max_pixels: int) -> np.ndarray:
    """One encoded image -> uint8 (H, W, C) at the model's size and colour mode.

    The pixel limit is checked from the header, before any pixel is decoded, so a small
    file that expands to gigabytes (a decompression bomb) costs nothing.
    """
    if not data:
        raise ImageError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"image is {width}x{height} = {width * height} pixels; the "
                                 f"limit is {max_pixels}")
            image.load()
            converted = image.convert(prep.color)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"cannot decode image ({len(data)} bytes): {exc}") from None
    pixels = np.asarray(converted, dtype=np.uint8).reshape(height, width, prep.channels)
    return resize_images(pixels[None], prep.color, prep.height, prep.width)[0]
