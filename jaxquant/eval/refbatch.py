"""Reference and sample batches in guided-diffusion's ``.npz`` format.

guided-diffusion (``evaluations/evaluator.py``) stores a batch as an ``.npz`` with

* ``arr_0``: ``uint8 [N, H, W, C]`` images in ``[0, 255]`` (NHWC);
* optionally ``mu``, ``sigma`` (FID statistics of Inception ``pool_3``) and ``mu_s``,
  ``sigma_s`` (sFID statistics of the first 7 ``mixed_6/conv`` channels), float64.
  When ``mu`` is present the evaluator uses the stored statistics instead of computing
  them from ``arr_0``; ``arr_0`` is still used for precision / recall.

This module adds one optional key, ``feature_net``: a 0-d numpy unicode array naming
the network the statistics were computed with, so that statistics computed with one
network are refused when evaluating with another. Files without it (the published
``VIRTUAL_*.npz`` reference batches) are treated as ``"inception"``. The extra key is
ignored by guided-diffusion's evaluator, so files written here stay readable by it.

Packed covariances: ``save_reference(..., packed=True)`` stores each covariance as its
upper triangle (``sigma_triu``, ``sigma_s_triu``: the float64 values of
``sigma[np.triu_indices(d)]``) instead of the full matrix, halving the file; the
statistics are bit-for-bit the same after :func:`load_reference` unpacks them. jaxquant
ships its reference statistics this way (``efficientnet-lite0``'s would be 28 MB full).
guided-diffusion's evaluator does not read packed files.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from jaxquant.errors import DataError

__all__ = [
    "DEFAULT_FEATURE_NET",
    "IMAGES_KEY",
    "STAT_KEYS",
    "load_images",
    "load_reference",
    "save_reference",
    "validate_images",
]

IMAGES_KEY = "arr_0"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FEATURE_NET_KEY = "feature_net"
#: Feature network assumed for files that do not say (guided-diffusion's batches).
DEFAULT_FEATURE_NET = "inception"

_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))
_PACKED = {"sigma": "sigma_triu", "sigma_s": "sigma_s_triu"}


def _unpack_triu(values: np.ndarray, source: str, key: str) -> np.ndarray:
    """The symmetric ``[d, d]`` matrix of its packed upper triangle."""
    n = values.shape[0] if values.ndim == 1 else -1
    d = int(round((np.sqrt(8 * n + 1) - 1) / 2)) if n > 0 else 0
    if n <= 0 or d * (d + 1) // 2 != n:
        raise DataError(f"{source}: {key!r} has shape {values.shape}; expected a packed upper triangle "
                        "[d * (d + 1) / 2]")
    out = np.empty((d, d), np.float64)
    iu = np.triu_indices(d)
    out[iu] = values
    out.T[iu] = values
    return out
_TO_UINT8 = "((x + 1) * 127.5).clip(0, 255).astype(np.uint8)"


def validate_images(images: Any, source: str = "images") -> np.ndarray:
    """Check that ``images`` is a ``uint8 [N, H, W, C]`` batch with C in {1, 3}.

    Returns the array unchanged (as ``np.ndarray``); raises :class:`DataError` whose
    message says what is wrong and how to fix it. ``source`` names the array in messages.
    """
    a = np.asarray(images)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
            raise DataError(
                f"{source} has dtype {a.dtype} (values in [{lo:.3g}, {hi:.3g}]); expected uint8 "
                f"images in [0, 255]. For diffusion outputs in [-1, 1], convert as "
                f"guided-diffusion's sampler does: {_TO_UINT8} (it truncates rather than "
                f"rounds); for images in [0, 1] use (x * 255).round().astype(np.uint8)"
            )
        raise DataError(
            f"{source} has dtype {a.dtype}; expected uint8 images in [0, 255] "
            "(if the values are already in [0, 255], use .astype(np.uint8))"
        )
    if a.ndim != 4:
        hint = ""
        if a.ndim == 3:
            hint = " (a single image? add a batch axis with x[None]; grayscale? add a channel axis with x[..., None])"
        raise DataError(f"{source} must be 4-D [N, H, W, C] (NHWC); got shape {a.shape}{hint}")
    if a.shape[-1] not in (1, 3):
        hint = ""
        if a.shape[1] in (1, 3):
            hint = " -- this looks like NCHW; transpose with x.transpose(0, 2, 3, 1)"
        raise DataError(
            f"{source} has {a.shape[-1]} channels in the last axis (shape {a.shape}); expected "
            f"1 or 3 channels, NHWC{hint}"
        )
    if a.shape[0] == 0:
        raise DataError(f"{source} holds no images (shape {a.shape})")
    return a


def _open_npz(path: str | os.PathLike) -> np.lib.npyio.NpzFile:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such batch file: {p}" + (" (it is a directory)" if p.is_dir() else ""))
    with open(p, "rb") as f:
        head = f.read(6)
    if not head.startswith(b"PK") and head != b"\x93NUMPY":
        # Neither a zip (.npz) nor an .npy file; numpy would try (and refuse) to unpickle it.
        raise DataError(f"{p} is not an .npz archive (it starts with {head!r}, not a zip signature); "
                        f"save sample batches with np.savez(path, arr_0=images) or `jaxquant sample`")
    try:
        obj = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{p} is not a readable .npz archive: {e}") from e
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise DataError(
            f"{p} is a single .npy array, not an .npz archive; save batches with "
            f"np.savez(path, arr_0=images) or jaxquant.eval.save_reference"
        )
    return obj


def _read(obj: np.lib.npyio.NpzFile, key: str, path: str | os.PathLike) -> np.ndarray:
    try:
        return obj[key]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {key!r} from {path}: {e}") from e


def load_images(path: str | os.PathLike) -> np.ndarray:
    """Load ``arr_0`` of a guided-diffusion batch as ``uint8 [N, H, W, C]``.

    Raises:
      DataError: the file is missing or not an ``.npz``, has no ``arr_0``, or the
        images are not uint8 NHWC with 1 or 3 channels (float images in [-1, 1] are
        reported with the conversion to apply).
    """
    with _open_npz(path) as obj:
        if IMAGES_KEY not in obj.files:
            raise DataError(
                f"{path} has no {IMAGES_KEY!r} image array (keys: {sorted(obj.files)}); "
                f"save images with np.savez(path, arr_0=images)"
            )
        return validate_images(_read(obj, IMAGES_KEY, path), f"{IMAGES_KEY} in {path}")


def _check_stats(stats: dict, source: str) -> None:
    for mk, sk in _PAIRS:
        has_m, has_s = stats.get(mk) is not None, stats.get(sk) is not None
        if has_m != has_s:
            have, miss = (mk, sk) if has_m else (sk, mk)
            raise DataError(f"{source} has {have!r} but not {miss!r}; both are needed")
        if not has_m:
            continue
        mu, sigma = stats[mk], stats[sk]
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise DataError(
                f"{source}: {mk!r} has shape {mu.shape} and {sk!r} has shape {sigma.shape}; "
                f"expected [d] and [d, d]"
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise DataError(f"{source}: {mk!r} / {sk!r} contain NaN or inf")


def save_reference(
    path: str | os.PathLike,
    images: Any = None,
    *,
    mu: Any = None,
    sigma: Any = None,
    mu_s: Any = None,
    sigma_s: Any = None,
    feature_net: str = DEFAULT_FEATURE_NET,
    packed: bool = False,
) -> Path:
    """Write a batch in guided-diffusion's ``.npz`` layout (uncompressed, as it does).

    Args:
      path: output file, written atomically (a temporary file then a rename); the name
        is used as given (no ``.npz`` is appended).
      images: optional ``uint8 [N, H, W, C]`` images stored as ``arr_0``.
      mu, sigma: optional FID statistics (``[d]``, ``[d, d]``), stored as float64.
      mu_s, sigma_s: optional sFID statistics. Each pair is all-or-nothing. Note that
        guided-diffusion's evaluator, when it finds ``mu``, also reads ``mu_s`` /
        ``sigma_s``: store both pairs for files meant for it.
      feature_net: name of the network the statistics come from, stored as a 0-d
        unicode array when any statistics are written.
      packed: store covariances as packed upper triangles (see the module docstring;
        half the size, not readable by guided-diffusion's evaluator). They must be
        symmetric.

    Returns:
      The path written.

    Raises:
      DataError: invalid images or statistics, or nothing to write.
    """
    arrays: dict[str, np.ndarray] = {}
    if images is not None:
        arrays[IMAGES_KEY] = validate_images(images)
    stats = {
        k: (None if v is None else np.asarray(v, dtype=np.float64))
        for k, v in zip(STAT_KEYS, (mu, sigma, mu_s, sigma_s))
    }
    _check_stats(stats, "save_reference")
    arrays.update({k: v for k, v in stats.items() if v is not None})
    if packed:
        for full, tri in _PACKED.items():
            if full in arrays:
                m = arrays.pop(full)
                if not np.array_equal(m, m.T):
                    raise DataError(f"save_reference(packed=True): {full!r} is not symmetric")
                arrays[tri] = m[np.triu_indices(m.shape[0])]
    if not arrays:
        raise DataError("save_reference: nothing to save (give images and/or statistics)")
    if any(stats[k] is not None for k in STAT_KEYS):
        if not isinstance(feature_net, str) or not feature_net:
            raise DataError(f"feature_net must be a non-empty string; got {feature_net!r}")
        arrays[FEATURE_NET_KEY] = np.array(feature_net, dtype=np.str_)

    return savez_atomic(path, arrays)


def savez_atomic(path: str | os.PathLike, arrays: dict) -> Path:
    """``np.savez`` (uncompressed) to a temporary file renamed into place."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def load_reference(
    path: str | os.PathLike, feature_net: Optional[str] = None, *, with_images: bool = True
) -> dict:
    """Read a reference (or sample) batch.

    Args:
      path: an ``.npz`` in guided-diffusion's layout, e.g. ``VIRTUAL_imagenet256_labeled.npz``.
      feature_net: the network the caller evaluates with. If given and the file holds
        statistics computed with a different one, a :class:`DataError` naming both is
        raised. Files without a ``feature_net`` key count as ``"inception"``.
      with_images: ``False`` skips reading ``arr_0`` (the published reference batches
        hold 10,000 images of 256x256, ~2 GB).

    Returns:
      A dict with ``"images"`` (``uint8 [N, H, W, C]``, or ``None`` when absent or not
      read), ``"mu"``, ``"sigma"``, ``"mu_s"``, ``"sigma_s"`` (float64 arrays or
      ``None``) and ``"feature_net"`` (the stored name, ``"inception"`` for statistics
      without one, ``None`` for a file without statistics).
    """
    with _open_npz(path) as obj:
        files = set(obj.files)
        stats = {
            k: (np.asarray(_read(obj, k, path), dtype=np.float64) if k in files else None)
            for k in STAT_KEYS
        }
        for full, tri in _PACKED.items():
            if stats[full] is None and tri in files:
                stats[full] = _unpack_triu(np.asarray(_read(obj, tri, path), np.float64), str(path), tri)
        _check_stats(stats, str(path))
        has_stats = any(v is not None for v in stats.values())
        if IMAGES_KEY not in files and not has_stats:
            raise DataError(
                f"{path} holds neither images ({IMAGES_KEY!r}) nor statistics "
                f"({', '.join(STAT_KEYS)}); keys: {sorted(files)}"
            )
        stored_net: Optional[str] = None
        if FEATURE_NET_KEY in files:
            raw = _read(obj, FEATURE_NET_KEY, path)
            if raw.ndim != 0 or raw.dtype.kind != "U":
                raise DataError(
                    f"{path}: {FEATURE_NET_KEY!r} must be a 0-d unicode array; got dtype "
                    f"{raw.dtype} and shape {raw.shape}"
                )
            stored_net = str(raw[()])
        elif has_stats:
            stored_net = DEFAULT_FEATURE_NET
        if feature_net is not None and has_stats and stored_net != feature_net:
            raise DataError(
                f"the statistics in {path} were computed with feature network "
                f"{stored_net!r}, but this evaluation uses {feature_net!r}; FID values from "
                f"different networks are not comparable -- recompute the reference "
                f"statistics with {feature_net!r} or evaluate with {stored_net!r}"
            )
        images = None
        if with_images and IMAGES_KEY in files:
            images = validate_images(_read(obj, IMAGES_KEY, path), f"{IMAGES_KEY} in {path}")
    return {"images": images, **stats, "feature_net": stored_net}
