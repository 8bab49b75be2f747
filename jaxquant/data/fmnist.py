"""Fashion-MNIST from the standard IDX files.

The Debian package ``dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
Images are padded from 28×28 to 32×32 with background (-1) and scaled to [-1, 1].
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from jaxquant.errors import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        p = directory / name
        if p.is_file():
            return p
    raise DataError(
        f"Fashion-MNIST file '{stem}[.gz]' not found in '{directory}'. Install the data with "
        f"`apt-get update && apt-get install -y dataset-fashion-mnist`, or pass the directory "
        f"holding the IDX files (data_dir=... / --data-dir, or $JAXQUANT_FMNIST_DIR).")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"'{path}' is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"'{path}': IDX element type 0x{dtype_code:02x} unsupported (expected unsigned byte)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"'{path}' is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def load_fashion_mnist(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    pad_to: int = 32,
    as_uint8: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)`` of a Fashion-MNIST split.

    Args:
      split: ``"train"`` (60 000) or ``"test"`` (10 000).
      data_dir: directory of the IDX files; default ``$JAXQUANT_FMNIST_DIR`` or
        ``/usr/share/datasets/fashion-mnist``.
      pad_to: spatial size after zero-padding (background) around the 28×28 image.
      as_uint8: return uint8 NHWC in [0, 255] instead of float32 in [-1, 1].

    Returns:
      images ``[N, pad_to, pad_to, 1]`` and int32 labels ``[N]``.
    """
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r} (use 'train' or 'test')")
    directory = Path(data_dir or os.environ.get("JAXQUANT_FMNIST_DIR") or DEFAULT_DIR)
    img_stem, lbl_stem = _FILES[split]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lbl_stem)).astype(np.int32)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
        raise DataError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    p = pad_to - images.shape[1]
    if p < 0 or p % 2:
        raise DataError(f"pad_to={pad_to} must be ≥ 28 and differ from 28 by an even number")
    images = np.pad(images, ((0, 0), (p // 2, p // 2), (p // 2, p // 2)))[..., None]
    if as_uint8:
        return images, labels
    return images.astype(np.float32) / 127.5 - 1.0, labels
