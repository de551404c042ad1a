"""Encoded image bytes -> the model's input tensor, exactly as training prepared images.

Opening reads only the header, so every image of a request is sized and costed before
any pixel is decoded: a small file that expands to gigabytes (a decompression bomb), or
one that decodes slowly, is refused for the price of reading its header.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract.metadata import Preprocessing
from contract.preprocessing import resize_images
from service.status import bounded

DECODE_WEIGHT = {"PNG": 2, "JPEG": 1, "WEBP": 4, "GIF": 2, "TIFF": 2, "BMP": 1, "PPM": 1}
"""Formats this server decodes, and what each decoded pixel costs against the request's
decode budget: each format's worst-case decode time per pixel, relative to JPEG's
(docs/results.md, "Figures behind the defaults")."""
_BYTES_PER_PIXEL = 4
"""What one decoded pixel can take in PIL before conversion (RGBA, I;16, F are widest)."""


class ImageError(ValueError):
    """Bytes that are not an image this server will decode."""


@dataclass(frozen=True)
class Header:
    image: Image.Image
    width: int
    height: int

    @property
    def cost(self) -> int:
        """Weighted pixels: what decoding it costs against the request's decode budget."""
        return self.width * self.height * DECODE_WEIGHT[self.image.format or "PNG"]

    def decoded_bytes(self, channels: int) -> int:
        """Memory its decoding holds at its peak: the decoded image and its conversion."""
        return self.width * self.height * (_BYTES_PER_PIXEL + channels)


def open_header(data: bytes, max_pixels: int) -> Header:
    """Read one image's header: its format and size, no pixels yet."""
    if not data:
        raise ImageError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=tuple(DECODE_WEIGHT))
    except UnidentifiedImageError:
        raise ImageError(f"{len(data)} bytes that are not an image in a supported format "
                         f"({', '.join(DECODE_WEIGHT)})") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageError(bounded(f"cannot read the image header ({len(data)} bytes): {exc}",
                                 200)) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is "
                         f"{max_pixels}")
    return Header(image, width, height)


def decode(header: Header, prep: Preprocessing) -> np.ndarray:
    """One opened image -> uint8 (H, W, C) at the model's size and colour mode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            header.image.load()
            converted = header.image.convert(prep.color)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageError(bounded(f"cannot decode the {header.image.format} image: {exc}",
                                 200)) from None
    pixels = np.asarray(converted, dtype=np.uint8).reshape(header.height, header.width,
                                                           prep.channels)
    return resize_images(pixels[None], prep.color, prep.height, prep.width)[0]
