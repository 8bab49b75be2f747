"""The Fashion-MNIST IDX reader."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from jaxquant.data import load_fashion_mnist
from jaxquant.data.fmnist import DEFAULT_DIR, read_idx
from jaxquant.errors import DataError


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def test_reads_synthetic_idx_files_padded_and_scaled(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=False)
    x, y = load_fashion_mnist("test", tmp_path)
    assert x.shape == (5, 32, 32, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_allclose(x[:, 2:30, 2:30, 0], imgs / 127.5 - 1.0, atol=1e-6)
    assert np.all(x[:, :2] == -1.0) and np.all(x[:, :, 30:] == -1.0)
    u8, _ = load_fashion_mnist("test", tmp_path, as_uint8=True)
    assert u8.dtype == np.uint8 and np.array_equal(u8[:, 2:30, 2:30, 0], imgs)


def test_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


def test_truncated_file_is_reported(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    _write_idx(p, np.zeros((2, 4, 4), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


@pytest.mark.skipif(not Path(DEFAULT_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_files_have_the_published_sizes():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10_000, 32, 32, 1)
    assert np.bincount(y).tolist() == [1000] * 10
