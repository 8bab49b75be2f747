"""Evaluate a batch of samples against a reference: FID, sFID, IS, precision / recall.

This is the library side of ``jaxquant eval``. It follows guided-diffusion's
``evaluations/evaluator.py``: features of the samples and of the reference batch come
from one feature network (:mod:`jaxquant.eval.features`), the reference's stored
``mu`` / ``sigma`` / ``mu_s`` / ``sigma_s`` are used when present, its ``arr_0`` images
give the reference features for precision / recall, and the metrics are the functions
of :mod:`jaxquant.eval.metrics` (IS over chunks of 5000, k=3 manifolds).

References
----------
``ref`` is one of

* a path to a guided-diffusion ``.npz`` batch (``arr_0`` images and/or statistics);
  statistics recorded with another feature network are refused
  (:func:`jaxquant.eval.refbatch.load_reference`). A file written by
  :func:`write_reference` may also carry the reference ``pool`` features, which are
  then used for precision / recall instead of recomputing them;
* a built-in name (:data:`BUILTIN_REFERENCES`): ``fashion-mnist-test`` (10 000
  images) or ``fashion-mnist-train`` (60 000), read from the local IDX files of the
  Debian package ``dataset-fashion-mnist``. Their statistics and pool features are
  computed once per feature network and cached in
  ``$JAXQUANT_CACHE/refs/<name>-<feature_net>.npz`` (default cache directory
  ``${XDG_CACHE_HOME:-~/.cache}/jaxquant``). Statistics shipped with the package in
  ``jaxquant/assets/refs/<name>-<feature_net>.npz`` (:func:`build_shipped_reference`)
  are used for FID / sFID without the data; the data is then only read for precision
  / recall, which is reported as unavailable (with the install hint) when it is
  missing;
* a dict returned by :func:`compute_reference`.

Cached and shipped files record a SHA-256 of the feature network's weights
(``weights_sha256``); a file computed with other weights of a network of the same name
(e.g. a retrained ``fmnist`` classifier) is not used: a cache is recomputed, a shipped
file is ignored, both with a warning.

Labels
------
Numbers computed with a network other than Inception are not FIDs in the published
sense. :func:`metric_labels` names every metric with its network (``FID [fmnist
features]``, ``IS [fmnist classifier]``); only ``inception`` gets the bare names, and
:func:`format_report` and the CLI's JSON use these labels.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np

from jaxquant.data.fmnist import load_fashion_mnist
from jaxquant.errors import ConfigError, DataError
from jaxquant.eval.features import FeatureNet, get_feature_net, iter_feature_batches
from jaxquant.eval.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    spatial_features_for_sfid,
)
from jaxquant.eval.refbatch import (
    DEFAULT_FEATURE_NET,
    load_images,
    load_reference,
    save_reference,
    validate_images,
)
from jaxquant.io.model_dir import ASSETS_DIR

__all__ = [
    "BUILTIN_REFERENCES",
    "CACHE_ENV",
    "SHIPPED_REFS_DIR",
    "build_shipped_reference",
    "builtin_reference",
    "cache_dir",
    "compute_reference",
    "evaluate",
    "format_report",
    "metric_labels",
    "write_reference",
]

#: Environment variable for the cache directory (reference statistics go in ``refs/``).
CACHE_ENV = "JAXQUANT_CACHE"
#: Where statistics shipped with the package live.
SHIPPED_REFS_DIR = ASSETS_DIR / "refs"
#: guided-diffusion's Inception-score chunk size and precision/recall settings.
IS_SPLIT_SIZE = 5000
PR_K = 3

_POOL_KEY = "pool"
_NUM_KEY = "num_images"
_SHA_KEY = "weights_sha256"

PathLike = Union[str, "os.PathLike[str]"]


def _fashion_mnist(split: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        # Looked up at call time so tests can substitute the loader.
        return load_fashion_mnist(split, as_uint8=True)[0]

    return load


#: Built-in reference sets: name -> (description, loader returning uint8 NHWC images).
BUILTIN_REFERENCES: dict[str, tuple[str, Callable[[], np.ndarray]]] = {
    "fashion-mnist-test": ("Fashion-MNIST test split (10 000 images, 32x32)", _fashion_mnist("test")),
    "fashion-mnist-train": ("Fashion-MNIST train split (60 000 images, 32x32)", _fashion_mnist("train")),
}


# --------------------------------------------------------------------------------------
# Feature extraction with a progress bar
# --------------------------------------------------------------------------------------


def _resolve_net(feature_net: Union[str, FeatureNet]) -> FeatureNet:
    if isinstance(feature_net, FeatureNet):
        return feature_net
    if not isinstance(feature_net, str):
        raise ConfigError(f"feature_net must be a name or a FeatureNet; got {type(feature_net).__name__}")
    return get_feature_net(feature_net)


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _weights_sha256(net: FeatureNet) -> Optional[str]:
    """SHA-256 over the network's variables (paths, dtypes, shapes, bytes); None if unknown."""
    if net.variables is None:
        return None
    import jax

    h = hashlib.sha256()
    leaves, _ = jax.tree_util.tree_flatten_with_path(net.variables)
    for path, leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _extract(net: FeatureNet, images: np.ndarray, batch_size: int, progress: bool, desc: str) -> dict:
    """Pool, flattened sFID features and logits of ``images``, batch by batch.

    Batches are formed exactly as :func:`jaxquant.eval.features.extract_features` does
    (the last partial batch is padded to ``batch_size`` when there is more than one
    batch), so the features are identical to its output. The spatial features are
    reduced to guided-diffusion's sFID vectors per batch, which keeps memory at
    ``N * h * w * 7`` floats instead of ``N * h * w * c``.
    """
    pool, spatial, logits = [], [], []
    for out in iter_feature_batches(net, images, batch_size, progress=progress, desc=desc):
        pool.append(out["pool"])
        spatial.append(spatial_features_for_sfid(out["spatial"]))
        logits.append(out["logits"])
    return {"pool": np.concatenate(pool), "spatial": np.concatenate(spatial), "logits": np.concatenate(logits)}


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------


def compute_reference(
    images_uint8: Any,
    feature_net: Union[str, FeatureNet],
    batch_size: int = 100,
    *,
    progress: bool = False,
) -> dict:
    """Reference statistics and features of a batch of images.

    Args:
      images_uint8: ``uint8 [N, H, W, C]`` images, C in {1, 3}.
      feature_net: a registered feature-network name or a :class:`FeatureNet`.
      batch_size: images per network call.
      progress: show a tqdm bar over the batches.

    Returns:
      ``{"mu", "sigma"}`` (float64 statistics of the ``pool`` features), ``{"mu_s",
      "sigma_s"}`` (of :func:`~jaxquant.eval.metrics.spatial_features_for_sfid`),
      ``"pool"`` (float32 ``[N, d]``, for precision / recall), ``"feature_net"`` (the
      network's name), ``"num_images"`` and ``"weights_sha256"`` (of the network's
      variables, or None).
    """
    net = _resolve_net(feature_net)
    batch_size = _check_positive("batch_size", batch_size)
    images = validate_images(images_uint8, "reference images")
    f = _extract(net, images, batch_size, progress, "reference")
    mu, sigma = feature_statistics(f["pool"])
    mu_s, sigma_s = feature_statistics(f["spatial"])
    return {
        "mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s, "pool": f["pool"],
        "feature_net": net.name, "num_images": int(images.shape[0]), "weights_sha256": _weights_sha256(net),
    }


def _append_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Add arrays to an existing uncompressed ``.npz`` (as ``np.savez`` would store them)."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, value in arrays.items():
            with zf.open(key + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)


def write_reference(path: PathLike, ref: Mapping[str, Any], *, include_pool: bool = True,
                    packed: bool = False) -> Path:
    """Write a :func:`compute_reference` result as a guided-diffusion ``.npz``.

    The statistics go through :func:`~jaxquant.eval.refbatch.save_reference` (float64,
    ``feature_net`` recorded), so the file is readable by guided-diffusion's evaluator
    and by :func:`~jaxquant.eval.refbatch.load_reference`. Extra keys, ignored by
    both: ``num_images``, ``weights_sha256`` (when known) and, with ``include_pool``,
    ``pool`` (the float32 reference features used for precision / recall). Written
    atomically. ``packed`` stores the covariances as upper triangles
    (:mod:`jaxquant.eval.refbatch`; half the size, jaxquant-only).

    Returns:
      The path written.
    """
    out = Path(path)
    tmp = out.with_name(out.name + ".partial")
    try:
        save_reference(tmp, mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"], sigma_s=ref["sigma_s"],
                       feature_net=ref["feature_net"], packed=packed)
        extras: dict[str, np.ndarray] = {}
        if ref.get("num_images") is not None:
            extras[_NUM_KEY] = np.array(int(ref["num_images"]), dtype=np.int64)
        if ref.get("weights_sha256"):
            extras[_SHA_KEY] = np.array(str(ref["weights_sha256"]), dtype=np.str_)
        if include_pool:
            if ref.get("pool") is None:
                raise DataError("write_reference(include_pool=True): the reference has no 'pool' features")
            extras[_POOL_KEY] = np.asarray(ref["pool"], dtype=np.float32)
        _append_npz(tmp, extras)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def _read_extras(path: PathLike) -> dict:
    """The keys :func:`write_reference` adds, where present (``pool`` read lazily by caller)."""
    out: dict[str, Any] = {"num_images": None, "weights_sha256": None, "has_pool": False}
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        out["has_images"] = "arr_0" in files
        if _NUM_KEY in files:
            out["num_images"] = int(z[_NUM_KEY][()])
        if _SHA_KEY in files:
            out["weights_sha256"] = str(z[_SHA_KEY][()])
        out["has_pool"] = _POOL_KEY in files
    return out


def _read_pool(path: PathLike) -> np.ndarray:
    with np.load(path, allow_pickle=False) as z:
        a = np.asarray(z[_POOL_KEY], dtype=np.float32)
    if a.ndim != 2:
        raise DataError(f"{path}: 'pool' must be [N, d]; got shape {a.shape}")
    return a


def cache_dir() -> Path:
    """The jaxquant cache directory: ``$JAXQUANT_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/jaxquant``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "jaxquant"


def _cache_path(name: str, net_name: str) -> Path:
    return cache_dir() / "refs" / f"{name}-{net_name}.npz"


def _shipped_path(name: str, net_name: str) -> Path:
    return Path(SHIPPED_REFS_DIR) / f"{name}-{net_name}.npz"


def _check_builtin(name: str) -> None:
    if name not in BUILTIN_REFERENCES:
        raise DataError(f"unknown built-in reference {name!r}; built-ins: {', '.join(sorted(BUILTIN_REFERENCES))}")


def _load_stats_file(path: Path, net: FeatureNet, sha: Optional[str], what: str) -> Optional[dict]:
    """Statistics of a cached/shipped file, or None (with a warning) if it is unusable."""
    try:
        stats = load_reference(path, feature_net=net.name, with_images=False)
        extras = _read_extras(path)
    except DataError as e:
        warnings.warn(f"ignoring the {what} reference {path}: {e}", RuntimeWarning, stacklevel=4)
        return None
    if stats["mu"] is None or stats["mu_s"] is None:
        warnings.warn(f"ignoring the {what} reference {path}: it lacks mu/sigma or mu_s/sigma_s",
                      RuntimeWarning, stacklevel=4)
        return None
    if sha is not None and extras["weights_sha256"] is not None and extras["weights_sha256"] != sha:
        warnings.warn(
            f"ignoring the {what} reference {path}: it was computed with other weights of the "
            f"{net.name!r} feature network (weights_sha256 {extras['weights_sha256'][:12]}..., "
            f"the network now has {sha[:12]}...)",
            RuntimeWarning, stacklevel=4)
        return None
    return {**{k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}, "feature_net": net.name,
            "num_images": extras["num_images"], "weights_sha256": extras["weights_sha256"],
            "has_pool": extras["has_pool"], "path": path}


def _cached_or_computed(name: str, net: FeatureNet, sha: Optional[str], batch_size: int, progress: bool) -> dict:
    """Full reference (stats and pool) of a built-in set: from the cache, else computed and cached."""
    path = _cache_path(name, net.name)
    if path.is_file():
        cached = _load_stats_file(path, net, sha, "cached")
        if cached is not None and cached["has_pool"]:
            try:
                pool = _read_pool(path)
            except (DataError, OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                warnings.warn(f"ignoring the cached reference {path}: {e}", RuntimeWarning, stacklevel=3)
            else:
                return {**cached, "pool": pool, "source": f"cached statistics {path}"}
    images = BUILTIN_REFERENCES[name][1]()  # raises DataError with the install hint when missing
    ref = compute_reference(images, net, batch_size, progress=progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_reference(path, ref, include_pool=True)
        source = f"computed from the data, cached in {path}"
    except OSError as e:
        warnings.warn(f"could not cache the reference statistics in {path}: {e}", RuntimeWarning, stacklevel=3)
        source = "computed from the data (not cached)"
    return {**ref, "source": source}


def builtin_reference(
    name: str,
    feature_net: Union[str, FeatureNet],
    *,
    batch_size: int = 100,
    need_pool: bool = True,
    progress: bool = False,
) -> dict:
    """Statistics (and, with ``need_pool``, pool features) of a built-in reference set.

    Order of sources: statistics shipped in :data:`SHIPPED_REFS_DIR` (FID / sFID need
    no data); then the user cache; else computed from the data and cached. With
    ``need_pool`` and shipped statistics, the pool features come from the cache or the
    data; if the data is missing, ``"pool"`` is None and ``"pool_unavailable"`` holds
    the reason (with the install hint) instead of raising.

    Returns:
      A dict with ``mu, sigma, mu_s, sigma_s, pool, feature_net, num_images,
      weights_sha256, source`` and ``pool_unavailable`` (None or a message).

    Raises:
      DataError: unknown name, or no shipped statistics and no data.
    """
    _check_builtin(name)
    net = _resolve_net(feature_net)
    batch_size = _check_positive("batch_size", batch_size)
    sha = _weights_sha256(net)
    shipped_path = _shipped_path(name, net.name)
    shipped = _load_stats_file(shipped_path, net, sha, "shipped") if shipped_path.is_file() else None
    if shipped is None:
        full = _cached_or_computed(name, net, sha, batch_size, progress)
        return {**full, "pool_unavailable": None}
    out = {**shipped, "pool": None, "pool_unavailable": None,
           "source": f"shipped statistics {shipped_path}"}
    if need_pool:
        try:
            full = _cached_or_computed(name, net, sha, batch_size, progress)
        except DataError as e:
            out["pool_unavailable"] = f"the reference images of {name!r} are needed for precision/recall: {e}"
        else:
            out["pool"] = full["pool"]
            out["num_images"] = out["num_images"] or full["num_images"]
    return out


def build_shipped_reference(
    name: str,
    feature_net: Union[str, FeatureNet],
    out_dir: PathLike,
    *,
    batch_size: int = 100,
    progress: bool = True,
) -> Path:
    """Write the statistics-only file of a built-in reference, for shipping in the package.

    The file is ``out_dir/<name>-<feature_net>.npz`` with ``mu, sigma, mu_s, sigma_s``
    in float64 (guided-diffusion's layout and precision, so shipped and locally
    computed statistics give the same numbers), ``feature_net``, ``num_images`` and
    ``weights_sha256``; no images and no pool features. Copy it to
    :data:`SHIPPED_REFS_DIR`. Covariances are stored as packed upper triangles
    (``8 * (d + d(d+1)/2)`` bytes per pair): ~1.1 MB for ``fmnist`` (256 + 448 dims),
    ~14 MB for ``efficientnet-lite0`` (1280 + 1372), ~33 MB for ``inception`` (2048 +
    2023).

    The statistics come from the user cache when it is valid, else from the data.
    Shipped statistics already in the package are not used as the source.

    Returns:
      The path written.
    """
    _check_builtin(name)
    net = _resolve_net(feature_net)
    batch_size = _check_positive("batch_size", batch_size)
    ref = _cached_or_computed(name, net, _weights_sha256(net), batch_size, progress)
    out = Path(out_dir) / f"{name}-{net.name}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_reference(out, ref, include_pool=False, packed=True)


def _path_reference(path: Path, net: FeatureNet, sha: Optional[str], batch_size: int, progress: bool) -> dict:
    """A guided-diffusion ``.npz`` reference: stored statistics, else computed from ``arr_0``."""
    stats = load_reference(path, feature_net=net.name, with_images=False)  # refuses another network
    extras = _read_extras(path)
    has_stats = stats["mu"] is not None
    if has_stats and stats["mu_s"] is None:
        raise DataError(f"{path} has 'mu'/'sigma' but not 'mu_s'/'sigma_s'; sFID needs both pairs "
                        "(or remove the statistics so they are computed from arr_0)")
    if has_stats and sha and extras["weights_sha256"] and extras["weights_sha256"] != sha:
        raise DataError(
            f"the statistics in {path} were computed with other weights of the {net.name!r} "
            f"feature network (weights_sha256 {extras['weights_sha256'][:12]}..., this network "
            f"{sha[:12]}...); recompute the reference")
    out: dict[str, Any] = {"feature_net": net.name, "pool": None, "pool_unavailable": None,
                           "num_images": extras["num_images"], "weights_sha256": extras["weights_sha256"]}
    if has_stats:
        out.update({k: stats[k] for k in ("mu", "sigma", "mu_s", "sigma_s")})
        out["source"] = f"statistics in {path}"
        if extras["has_pool"]:
            out["pool"] = _read_pool(path)
            out["num_images"] = int(out["pool"].shape[0])
            out["source"] = f"statistics and pool features in {path}"
        elif extras["has_images"]:
            images = load_images(path)
            out["pool"] = _extract(net, images, batch_size, progress, "reference")["pool"]
            out["num_images"] = int(images.shape[0])
        else:
            out["pool_unavailable"] = f"{path} holds statistics but no arr_0 images, which precision/recall needs"
        return out
    ref = compute_reference(load_images(path), net, batch_size, progress=progress)
    return {**ref, "pool_unavailable": None, "source": f"computed from arr_0 of {path}"}


def _resolve_reference(ref: Any, net: FeatureNet, batch_size: int, progress: bool) -> tuple[str, dict]:
    """``(description, reference dict)`` of a path, built-in name or precomputed dict."""
    sha = _weights_sha256(net)
    if isinstance(ref, Mapping):
        missing = [k for k in ("mu", "sigma", "mu_s", "sigma_s", "feature_net") if ref.get(k) is None]
        if missing:
            raise DataError(f"the reference dict lacks {missing}; build it with compute_reference")
        if ref["feature_net"] != net.name:
            raise DataError(
                f"the reference statistics were computed with feature network {ref['feature_net']!r}, "
                f"but this evaluation uses {net.name!r}; the values are not comparable")
        if sha and ref.get("weights_sha256") and ref["weights_sha256"] != sha:
            raise DataError(f"the reference statistics were computed with other weights of the "
                            f"{net.name!r} feature network; recompute them with compute_reference")
        d = {"pool_unavailable": None if ref.get("pool") is not None else "the reference dict has no 'pool' features",
             "pool": ref.get("pool"), "num_images": ref.get("num_images"), "source": "precomputed",
             **{k: ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s", "feature_net")}}
        return "reference statistics (dict)", d
    if not isinstance(ref, (str, os.PathLike)):
        raise DataError(f"ref must be an .npz path, a built-in name or a compute_reference dict; got {type(ref).__name__}")
    p = Path(ref).expanduser()
    if isinstance(ref, str) and ref in BUILTIN_REFERENCES and not p.exists():
        return ref, builtin_reference(ref, net, batch_size=batch_size, need_pool=True, progress=progress)
    if not p.is_file():
        raise DataError(
            f"reference {str(ref)!r} is neither an existing .npz file nor a built-in reference "
            f"({', '.join(sorted(BUILTIN_REFERENCES))})")
    return str(ref), _path_reference(p, net, sha, batch_size, progress)


# --------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------


def metric_labels(feature_net: str) -> dict[str, str]:
    """Display names of the metrics for a feature network.

    ``inception`` gets the bare names (``FID``, ``sFID``, ``IS``, ``Precision``,
    ``Recall``); any other network's name is attached, e.g. ``FID [fmnist features]``
    and ``IS [fmnist classifier]``, so that no number from another network is called a
    plain FID.
    """
    if feature_net == "inception":
        return {"fid": "FID", "sfid": "sFID", "inception_score": "IS", "precision": "Precision", "recall": "Recall"}
    f = f"[{feature_net} features]"
    return {"fid": f"FID {f}", "sfid": f"sFID {f}", "inception_score": f"IS [{feature_net} classifier]",
            "precision": f"Precision {f}", "recall": f"Recall {f}"}


def evaluate(
    samples: Union[PathLike, np.ndarray],
    ref: Union[PathLike, Mapping[str, Any]],
    feature_net: Union[str, FeatureNet],
    *,
    batch_size: int = 100,
    num_samples: Optional[int] = None,
    progress: bool = True,
    pr_batch_size: int = 10000,
) -> dict:
    """FID, sFID, Inception score and precision / recall of ``samples`` against ``ref``.

    Args:
      samples: an ADM-style ``.npz`` (``arr_0``: ``uint8 [N, H, W, C]``) or such an
        array. Float images (e.g. diffusion outputs in [-1, 1]) are refused with the
        conversion to apply.
      ref: an ``.npz`` reference batch, a built-in name (:data:`BUILTIN_REFERENCES`) or
        a :func:`compute_reference` dict; see the module docstring.
      feature_net: a registered feature-network name (``inception``,
        ``efficientnet-lite0``, ``fmnist``, ...) or a :class:`FeatureNet`.
      batch_size: images per feature-network call.
      num_samples: use only the first ``num_samples`` samples (default: all).
      progress: tqdm bars over the feature-extraction batches.
      pr_batch_size: block size of the precision / recall distance computation.

    Returns:
      A JSON-serialisable dict: ``feature_net``, ``num_samples``, ``num_reference``
      (None when unknown), ``fid``, ``sfid``, ``inception_score``,
      ``inception_score_std``, ``inception_score_splits``, ``precision``, ``recall``
      (None, with ``precision_recall_unavailable`` saying why, when the reference
      features are not available), ``labels`` (:func:`metric_labels`), ``reference``
      and ``reference_source``. The values are the metric functions of
      :mod:`jaxquant.eval.metrics` applied to the features: FID on ``pool``, sFID on
      the first 7 channels of ``spatial``, IS on ``logits`` in chunks of 5000,
      precision / recall with k=3 and the reference as the "real" set.

    Raises:
      DataError: invalid images, a reference computed with another feature network,
        missing data; ConfigError: unknown feature network, bad arguments.
    """
    batch_size = _check_positive("batch_size", batch_size)
    pr_batch_size = _check_positive("pr_batch_size", pr_batch_size)
    if isinstance(samples, (str, os.PathLike)):
        images = load_images(samples)
        samples_desc = str(samples)
    else:
        images = validate_images(samples, "samples")
        samples_desc = "array"
    if num_samples is not None:
        num_samples = _check_positive("num_samples", num_samples)
        if num_samples > images.shape[0]:
            raise DataError(f"num_samples={num_samples} but {samples_desc} holds only {images.shape[0]} images")
        images = images[:num_samples]
    if images.shape[0] < 2:
        raise DataError(f"need at least 2 samples for a covariance; got {images.shape[0]}")
    net = _resolve_net(feature_net)

    ref_desc, r = _resolve_reference(ref, net, batch_size, progress)
    f = _extract(net, images, batch_size, progress, "samples")

    mu, sigma = feature_statistics(f["pool"])
    mu_s, sigma_s = feature_statistics(f["spatial"])
    fid = frechet_distance(mu, sigma, r["mu"], r["sigma"])
    sfid = frechet_distance(mu_s, sigma_s, r["mu_s"], r["sigma_s"])
    is_mean, is_std = inception_score(f["logits"], split_size=IS_SPLIT_SIZE)
    precision = recall = None
    unavailable = r.get("pool_unavailable")
    if r.get("pool") is not None:
        precision, recall = precision_recall(r["pool"], f["pool"], k=PR_K, batch_size=pr_batch_size)
        unavailable = None
    num_ref = r.get("num_images")
    return {
        "feature_net": net.name,
        "num_samples": int(images.shape[0]),
        "num_reference": None if num_ref is None else int(num_ref),
        "fid": fid,
        "sfid": sfid,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_splits": int(math.ceil(images.shape[0] / IS_SPLIT_SIZE)),
        "precision": precision,
        "recall": recall,
        "precision_recall_unavailable": unavailable,
        "labels": metric_labels(net.name),
        "samples": samples_desc,
        "reference": ref_desc,
        "reference_source": r.get("source"),
    }


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_report(result: Mapping[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate` result.

    Metric names are :func:`metric_labels` of the result's feature network, so numbers
    from a network other than Inception are never shown under a bare name.
    """
    net = result["feature_net"]
    labels = metric_labels(net)
    n_ref = result.get("num_reference")
    lines = [
        f"feature network: {net}"
        + ("" if net == DEFAULT_FEATURE_NET else " (not Inception: not comparable with published numbers)"),
        f"samples:   {result['num_samples']} ({result.get('samples', '?')})",
        f"reference: {'?' if n_ref is None else n_ref} images ({result.get('reference', '?')}; "
        f"{result.get('reference_source') or 'n/a'})",
        "",
    ]
    is_val = _fmt(result["inception_score"])
    if result.get("inception_score_splits", 1) > 1:
        is_val += f" ± {result['inception_score_std']:.4f} ({result['inception_score_splits']} splits)"
    rows = [
        (labels["fid"], _fmt(result["fid"])),
        (labels["sfid"], _fmt(result["sfid"])),
        (labels["inception_score"], is_val),
        (labels["precision"], _fmt(result["precision"])),
        (labels["recall"], _fmt(result["recall"])),
    ]
    w = max(len("metric"), *(len(k) for k, _ in rows))
    vw = max(len("value"), *(len(v) for _, v in rows))
    lines.append(f"{'metric':<{w}}  {'value':>{vw}}")
    lines.append(f"{'-' * w}  {'-' * vw}")
    lines += [f"{k:<{w}}  {v:>{vw}}" for k, v in rows]
    if result.get("precision_recall_unavailable"):
        lines += ["", f"precision/recall unavailable: {result['precision_recall_unavailable']}"]
    return "\n".join(lines)
