"""Image preprocessing shared by training, export parity checks and the service.

numpy and PIL only (no torch), so serving applies byte-for-byte the resize that
training applied, and the same scaling and per-channel normalisation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from contract.metadata import Preprocessing


def resize_images(images: np.ndarray, color: str, height: int, width: int) -> np.ndarray:
    """PIL bilinear resize of uint8 (N, H, W, C) images; returns the input when already sized."""
    if images.shape[1:3] == (height, width):
        return images
    out = np.empty((len(images), height, width, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if color == "L" else img, mode=color)
        out[i] = np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR)).reshape(
            height, width, -1)
    return out


def to_input(images: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 (N, H, W, C) images at the model's size -> normalised float32 NCHW batch."""
    expected = (prep.height, prep.width, prep.channels)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
        raise ValueError(f"expected uint8 images of shape (N, {', '.join(map(str, expected))}), "
                         f"got {images.dtype} {images.shape}")
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(1, -1, 1, 1)
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
