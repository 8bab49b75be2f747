"""Image conversions and files: uint8 batches, ADM-style ``.npz``, PNG grids."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map model outputs in [-1, 1] to uint8 as ADM's sampling scripts do.

    ``((x + 1) * 127.5).clip(0, 255)`` then truncation to uint8, so the ``.npz`` files
    compare with guided-diffusion's reference batches bit for bit in convention.
    """
    return ((np.asarray(x, np.float32) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, ``nrow`` images per row."""
    n, h, w, c = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of uint8 NHWC images (grayscale or RGB), optionally upscaled."""
    grid = make_grid(images, nrow)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_samples_npz(images: np.ndarray, path: str | os.PathLike, labels: np.ndarray | None = None) -> Path:
    """Write an ADM-style sample batch: ``arr_0`` uint8 NHWC (``arr_1`` labels if given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 NHWC images, got {images.dtype} {images.shape}")
    arrays = {"arr_0": images}
    if labels is not None:
        arrays["arr_1"] = np.asarray(labels, np.int64)
    np.savez(path, **arrays)
    return path
