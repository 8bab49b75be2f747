"""Sample-quality metrics with the semantics of guided-diffusion's evaluator.

The functions here take *features* (the feature network is elsewhere) and reproduce
what ``openai/guided-diffusion/evaluations/evaluator.py`` computes from them, so numbers
are comparable with the ADM / DiT / LDM papers and with the published reference
batches (``VIRTUAL_imagenet256_labeled.npz`` and friends):

* :func:`frechet_distance` -- FID (on ``pool_3`` features) and sFID (on the flattened
  spatial features of :func:`spatial_features_for_sfid`). The default path is the
  pytorch-fid / TTUR formula with ``scipy.linalg.sqrtm`` in float64, including its
  eps-offset retry and its imaginary-part check.
* :func:`inception_score` -- IS over consecutive chunks of ``split_size`` samples.
* :func:`precision_recall` -- the k-NN manifold estimator of Kynkaanniemi et al. (2019)
  as guided-diffusion's ``ManifoldEstimator``, computed in jitted JAX blocks.

Differences from guided-diffusion, all deliberate and documented where they apply:
statistics are float64 throughout (guided-diffusion keeps ``mu`` in float32), IS uses
``0 * log 0 = 0`` instead of producing NaN for an underflowed probability, and inputs
that would make guided-diffusion return NaN (non-finite statistics) raise instead.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import ConfigError, DataError, JaxquantError
from jaxquant import xla

__all__ = [
    "FrechetDistanceError",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "manifold_radii",
    "precision_recall",
    "spatial_features_for_sfid",
    "spatial_statistics",
]

#: Number of ``mixed_6/conv`` channels guided-diffusion keeps for sFID.
SFID_CHANNELS = 7

_IMAG_ATOL = 1e-3  # tolerance on the imaginary diagonal of sqrtm, as pytorch-fid / TTUR


class FrechetDistanceError(JaxquantError):
    """The matrix square root in the Frechet distance is not usable.

    Raised where pytorch-fid / guided-diffusion raise ``ValueError("Imaginary
    component ...")`` and where they would silently return NaN.
    """


# --------------------------------------------------------------------------------------
# Frechet distance (FID / sFID)
# --------------------------------------------------------------------------------------


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """``scipy.linalg.sqrtm`` (a module-level hook so tests can exercise the retries)."""
    try:
        from scipy import linalg
    except ImportError as e:  # scipy is an optional (test/eval) dependency
        raise ConfigError(
            "frechet_distance(method='sqrtm') needs scipy: pip install scipy "
            "(or pass method='eigh', which needs only numpy)"
        ) from e
    # `disp` is deprecated since scipy 1.16; without it every version returns the matrix.
    return linalg.sqrtm(a)


def _check_statistics(
    mu1: Any, sigma1: Any, mu2: Any, sigma2: Any
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu2.ndim != 1:
        raise DataError(f"mean vectors must be 1-D; got shapes {mu1.shape} and {mu2.shape}")
    if mu1.shape != mu2.shape:
        raise DataError(
            f"the two mean vectors have different lengths: {mu1.shape} and {mu2.shape} "
            "(statistics from different feature layers or networks?)"
        )
    d = mu1.shape[0]
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if s.shape != (d, d):
            raise DataError(f"{name} has shape {s.shape}; expected ({d}, {d}) to match the means")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise DataError(
                f"{name} contains NaN or inf (a covariance from fewer than 2 samples, "
                "or non-finite features)"
            )
    return mu1, sigma1, mu2, sigma2


def _trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` exactly as pytorch-fid / guided-diffusion."""
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"frechet_distance: the covariance product is singular; adding {eps} to the "
            "diagonal of both covariances",
            RuntimeWarning,
            stacklevel=3,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise FrechetDistanceError(
                f"the matrix square root is not finite even after adding {eps} to the "
                "covariance diagonals; check the features (constant or degenerate?) or "
                "pass a larger eps"
            )
    if np.iscomplexobj(covmean):
        diag_imag = np.abs(np.diagonal(covmean).imag)
        if diag_imag.max(initial=0.0) > _IMAG_ATOL:
            raise FrechetDistanceError(
                "the matrix square root of the covariance product has an imaginary "
                f"component of {np.abs(covmean.imag).max():.3g} on its diagonal (tolerance "
                f"{_IMAG_ATOL}); the covariances are badly conditioned -- use more samples "
                "than feature dimensions, or try method='eigh'"
            )
        covmean = covmean.real
    return float(np.trace(covmean))


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) * 0.5)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` through symmetric eigendecompositions.

    ``sigma1 @ sigma2`` is similar to the PSD matrix ``A sigma2 A`` with ``A =
    sigma1^(1/2)``, so its square root's trace is the sum of the square roots of that
    matrix's eigenvalues. Two ``eigh`` calls instead of a Schur-based ``sqrtm``.
    """
    a = _sym_sqrt(sigma1)
    m = a @ sigma2 @ a
    w = np.linalg.eigvalsh((m + m.T) * 0.5)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(
    mu1: Any,
    sigma1: Any,
    mu2: Any,
    sigma2: Any,
    eps: float = 1e-6,
    method: str = "sqrtm",
) -> float:
    """Frechet distance between Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 @ sigma2))``,
    computed in float64. This is FID when the statistics come from Inception ``pool_3``
    features and sFID when they come from :func:`spatial_statistics`.

    Args:
      mu1, sigma1: mean ``[d]`` and covariance ``[d, d]`` of the first set.
      mu2, sigma2: the same for the second set.
      eps: diagonal offset used by the ``"sqrtm"`` method when the square root of the
        product is not finite (pytorch-fid's retry; a ``RuntimeWarning`` is issued).
      method: ``"sqrtm"`` (default) -- ``scipy.linalg.sqrtm`` exactly as pytorch-fid and
        guided-diffusion; the real part is taken when the imaginary diagonal is within
        1e-3 of zero, otherwise :class:`FrechetDistanceError` is raised.
        ``"eigh"`` -- the trace of the square root from two symmetric
        eigendecompositions (numpy only, much faster at d=2048 and better behaved for
        singular covariances); agrees with ``"sqrtm"`` to ~1e-9 relative on
        well-conditioned statistics, but ``"sqrtm"`` is the reference.

    Returns:
      The distance as a Python float.

    Raises:
      DataError: mismatched shapes or non-finite statistics.
      FrechetDistanceError: the square root is unusable (see ``method``).
    """
    mu1, sigma1, mu2, sigma2 = _check_statistics(mu1, sigma1, mu2, sigma2)
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        raise ConfigError(f"unknown frechet_distance method {method!r}; use 'sqrtm' or 'eigh'")
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def feature_statistics(feats: Any) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``feats`` ``[N, d]`` in float64.

    ``sigma`` is ``np.cov(feats, rowvar=False)`` (unbiased, divides by ``N - 1``), as
    guided-diffusion's ``compute_statistics`` and pytorch-fid.

    Raises:
      DataError: ``feats`` is not 2-D, has fewer than 2 rows, or is not finite.
    """
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"features must be 2-D [N, d]; got shape {x.shape}")
    if x.shape[0] < 2:
        raise DataError(f"need at least 2 feature vectors for a covariance; got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise DataError("features contain NaN or inf")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance_from_features(
    feats1: Any, feats2: Any, eps: float = 1e-6, method: str = "sqrtm"
) -> float:
    """:func:`frechet_distance` between the statistics of two feature sets ``[N, d]``."""
    mu1, sigma1 = feature_statistics(feats1)
    mu2, sigma2 = feature_statistics(feats2)
    return frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps, method=method)


# --------------------------------------------------------------------------------------
# sFID features
# --------------------------------------------------------------------------------------


def spatial_features_for_sfid(
    x: Any, num_channels: int = SFID_CHANNELS, layout: str = "NHWC"
) -> np.ndarray:
    """Flatten spatial features (Inception ``mixed_6/conv``) the way guided-diffusion does.

    guided-diffusion runs the TensorFlow Inception graph, whose activations are
    **NHWC**: it keeps ``spatial[..., :7]`` (the first 7 channels) and reshapes to
    ``[N, -1]``, so the flattened vector is in **(H, W, C)** order, ``index = (h * W +
    w) * 7 + c``. The published reference statistics (``mu_s`` / ``sigma_s``) are in
    that order, so features must be flattened the same way to be compared with them.
    (The Frechet distance itself is invariant to a permutation of coordinates applied to
    both sets; the order only matters against precomputed statistics.)

    Args:
      x: ``[N, H, W, C]`` features (or ``[N, C, H, W]`` with ``layout="NCHW"``, e.g.
        from a PyTorch port of the network; it is transposed so that the output order
        is the same).
      num_channels: channels kept, 7 in guided-diffusion.
      layout: ``"NHWC"`` or ``"NCHW"``: the layout of ``x``.

    Returns:
      float32 ``[N, H * W * num_channels]`` in (H, W, C) order.
    """
    a = np.asarray(x)
    if layout not in ("NHWC", "NCHW"):
        raise ConfigError(f"layout must be 'NHWC' or 'NCHW'; got {layout!r}")
    if a.ndim != 4:
        raise DataError(f"spatial features must be 4-D [N, H, W, C] ({layout}); got shape {a.shape}")
    if layout == "NCHW":
        a = a.transpose(0, 2, 3, 1)
    if not 1 <= num_channels <= a.shape[-1]:
        raise DataError(
            f"cannot keep {num_channels} channels of spatial features with {a.shape[-1]} "
            f"channels (shape {a.shape} read as NHWC)"
        )
    a = a[..., :num_channels]
    return np.ascontiguousarray(a, dtype=np.float32).reshape(a.shape[0], -1)


def spatial_statistics(
    spatial_feats: Any, num_channels: int = SFID_CHANNELS, layout: str = "NHWC"
) -> Tuple[np.ndarray, np.ndarray]:
    """sFID statistics: :func:`feature_statistics` of :func:`spatial_features_for_sfid`."""
    return feature_statistics(spatial_features_for_sfid(spatial_feats, num_channels, layout))


# --------------------------------------------------------------------------------------
# Inception score
# --------------------------------------------------------------------------------------


def inception_score(
    logits_or_probs: Any, split_size: int = 5000, from_logits: bool = True
) -> Tuple[float, float]:
    """Inception score with guided-diffusion's chunking.

    The samples are cut into consecutive chunks of ``split_size`` (``range(0, N,
    split_size)``; ``split_size`` is a chunk *size*, not a number of splits as in
    ``torchmetrics`` or the original improved-gan code). The last chunk may be shorter
    and counts as a chunk of its own with equal weight: N=12000 gives chunks of 5000,
    5000 and 2000. Per chunk: ``exp(mean_x KL(p(y|x) || p_chunk(y)))``, where
    ``p_chunk(y)`` is the chunk's mean prediction.

    Computed in float64 with ``0 * log 0 = 0`` (guided-diffusion computes in float32 and
    would give NaN where a probability underflows to 0).

    Args:
      logits_or_probs: ``[N, num_classes]``. For Inception these are guided-diffusion's
        softmax inputs: ``pool_3 @ W`` of the ``softmax/logits`` layer, 1008 classes.
      split_size: samples per chunk (guided-diffusion: 5000).
      from_logits: ``True`` to apply a softmax first; ``False`` if the rows are already
        probabilities (non-negative, summing to 1).

    Returns:
      ``(mean, std)`` over chunks; guided-diffusion reports only the mean. ``std`` is
      the population standard deviation (``np.std``), 0 for a single chunk.
    """
    a = np.asarray(logits_or_probs, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"inception_score expects [N, num_classes] with N > 0; got shape {a.shape}")
    if isinstance(split_size, bool) or not isinstance(split_size, (int, np.integer)) or split_size < 1:
        raise ConfigError(f"split_size must be a positive integer (samples per chunk); got {split_size!r}")
    if not np.isfinite(a).all():
        raise DataError("inception_score input contains NaN or inf")
    if from_logits:
        shifted = a - a.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
    else:
        p = a
        if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
            raise DataError(
                "inception_score(from_logits=False) needs probability rows (non-negative, "
                "summing to 1); pass from_logits=True for logits"
            )
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
    scores = []
    for i in range(0, p.shape[0], int(split_size)):
        part, log_part = p[i : i + split_size], log_p[i : i + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            # a class no sample in the chunk predicts has log p(y) = -inf; its terms
            # have p(y|x) = 0 and are 0 by the 0 * log 0 = 0 convention
            log_py = np.log(part.mean(axis=0, keepdims=True))
            terms = np.where(part > 0, part * (log_part - log_py), 0.0)
        scores.append(math.exp(float(terms.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds)
# --------------------------------------------------------------------------------------

_DISTANCE_DTYPES = ("float32", "float16")


def _sq_distances(a: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """``max(||a||^2 - 2 a.b + ||b||^2, 0)`` for all row pairs, in ``dtype``."""
    a = a.astype(dtype)
    b = b.astype(dtype)
    na = jnp.sum(a * a, axis=1)[:, None]
    nb = jnp.sum(b * b, axis=1)[None, :]
    ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(na - 2 * ab + nb, jnp.zeros((), dtype))


def _distance_block(a: jax.Array, b: jax.Array, distance_dtype: str) -> jax.Array:
    """Squared distances as float32, optionally following guided-diffusion's float16 try."""
    d32 = lambda: _sq_distances(a, b, jnp.float32)  # noqa: E731
    if distance_dtype == "float32":
        return d32()
    d16 = _sq_distances(a, b, jnp.float16)
    return jax.lax.cond(
        jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32), d32
    )


@xla.jit(static_argnames=("k", "distance_dtype"))
def _knn_update(
    best: jax.Array, rows: jax.Array, cols: jax.Array, n_cols: jax.Array, k: int, distance_dtype: str
) -> jax.Array:
    """Merge one column block into the running ``k + 1`` smallest distances per row."""
    d = _distance_block(rows, cols, distance_dtype)
    valid = jnp.arange(cols.shape[0]) < n_cols
    d = jnp.where(valid[None, :], d, jnp.inf)
    neg, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
    return -neg  # ascending


@xla.jit(static_argnames=("distance_dtype",))
def _membership_block(
    real: jax.Array, r_real: jax.Array, fake: jax.Array, r_fake: jax.Array, distance_dtype: str
) -> Tuple[jax.Array, jax.Array]:
    d = _distance_block(real, fake, distance_dtype)
    real_in_fake = jnp.any(d <= r_fake[None, :], axis=1)
    fake_in_real = jnp.any(d <= r_real[:, None], axis=0)
    return real_in_fake, fake_in_real


def _as_features(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2 or a.shape[0] == 0:
        raise DataError(f"{name} must be a non-empty 2-D [N, d] array; got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{name} contains NaN or inf")
    return a


def _check_pr_args(batch_size: int, distance_dtype: str) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    if distance_dtype not in _DISTANCE_DTYPES:
        raise ConfigError(f"distance_dtype must be one of {_DISTANCE_DTYPES}; got {distance_dtype!r}")


def _padded_block(a: np.ndarray, start: int, size: int, fill: float = 0.0) -> Tuple[np.ndarray, int]:
    """Rows ``start:start+size`` of ``a``, padded with ``fill`` to exactly ``size`` rows."""
    blk = a[start : start + size]
    n = blk.shape[0]
    if n < size:
        pad = np.full((size - n,) + a.shape[1:], fill, dtype=a.dtype)
        blk = np.concatenate([blk, pad], axis=0)
    return blk, n


def manifold_radii(
    features: Any, k: int = 3, batch_size: int = 10000, distance_dtype: str = "float32"
) -> np.ndarray:
    """Squared distance from each feature vector to its k-th nearest neighbour in the set.

    As guided-diffusion's ``ManifoldEstimator.manifold_radii``: each row of the squared
    distance matrix *includes the point itself* (distance ~0) and the radius is the
    value at index ``k`` of the ascending row (``np.partition(row, k)[k]``), i.e. the
    k-th nearest *other* point; duplicates count as neighbours at distance 0. Radii are
    **squared** Euclidean distances, as are the distances they are compared with.

    Computed in row blocks of ``batch_size`` against column blocks of ``batch_size``,
    keeping a running ``k + 1`` smallest per row, so no block larger than
    ``batch_size x batch_size`` exists. See :func:`precision_recall` for
    ``distance_dtype``.

    Returns:
      float32 ``[N]``.
    """
    _check_pr_args(batch_size, distance_dtype)
    f = _as_features(features, "features")
    n = f.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer; got {k!r}")
    if k >= n:
        raise DataError(f"k={k} nearest neighbours need more than {k} feature vectors; got {n}")
    bs = min(int(batch_size), n)
    radii = np.empty((n,), dtype=np.float32)
    for r0 in range(0, n, bs):
        rows, n_rows = _padded_block(f, r0, bs)
        best = jnp.full((bs, k + 1), jnp.inf, dtype=jnp.float32)
        for c0 in range(0, n, bs):
            cols, n_cols = _padded_block(f, c0, bs)
            best = _knn_update(best, rows, cols, jnp.int32(n_cols), k=int(k), distance_dtype=distance_dtype)
        radii[r0 : r0 + n_rows] = np.asarray(best[:n_rows, k])
    return radii


def precision_recall(
    real_features: Any,
    fake_features: Any,
    k: int = 3,
    batch_size: int = 10000,
    distance_dtype: str = "float32",
) -> Tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), as guided-diffusion.

    Each set defines a manifold: the union of balls around its points with radius the
    distance to the point's k-th nearest neighbour (:func:`manifold_radii`). A sample is
    inside the other set's manifold if its squared distance to *some* point of that set
    is ``<=`` that point's squared radius.

    * precision = fraction of ``fake_features`` inside the manifold of ``real_features``;
    * recall = fraction of ``real_features`` inside the manifold of ``fake_features``.

    guided-diffusion passes the reference batch as ``real`` and the samples as ``fake``
    with k=3 and 10000-row blocks. Distances are ``max(||a||^2 - 2 a.b + ||b||^2, 0)``
    from jitted JAX blocks of at most ``batch_size x batch_size``.

    Args:
      real_features: ``[N_real, d]`` (Inception ``pool_3`` in guided-diffusion).
      fake_features: ``[N_fake, d]``.
      k: neighbourhood size.
      batch_size: rows and columns per distance block (memory ~ ``4 * batch_size^2``
        bytes per block).
      distance_dtype: ``"float32"`` (default): distances in float32 with full-precision
        matmuls. ``"float16"``: mimic guided-diffusion's TensorFlow ``DistanceBlock``,
        which computes each block in float16 and falls back to float32 only when that
        block is not finite -- closer to the published numbers, less exact.

    Returns:
      ``(precision, recall)`` as Python floats.
    """
    _check_pr_args(batch_size, distance_dtype)
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise DataError(
            f"real and fake features have different dimensions: {real.shape[1]} and {fake.shape[1]}"
        )
    r_real = manifold_radii(real, k, batch_size, distance_dtype)
    r_fake = manifold_radii(fake, k, batch_size, distance_dtype)

    real_in_fake = np.zeros((real.shape[0],), dtype=bool)
    fake_in_real = np.zeros((fake.shape[0],), dtype=bool)
    bs_r = min(int(batch_size), real.shape[0])
    bs_f = min(int(batch_size), fake.shape[0])
    # Padded rows/columns get radius -1: a distance is never <= -1, so they neither
    # contain nor are contained in anything; their own outputs are dropped.
    for r0 in range(0, real.shape[0], bs_r):
        rows, n_rows = _padded_block(real, r0, bs_r)
        rad_r, _ = _padded_block(r_real, r0, bs_r, fill=-1.0)
        for c0 in range(0, fake.shape[0], bs_f):
            cols, n_cols = _padded_block(fake, c0, bs_f)
            rad_f, _ = _padded_block(r_fake, c0, bs_f, fill=-1.0)
            rin, fin = _membership_block(rows, rad_r, cols, rad_f, distance_dtype=distance_dtype)
            real_in_fake[r0 : r0 + n_rows] |= np.asarray(rin[:n_rows])
            fake_in_real[c0 : c0 + n_cols] |= np.asarray(fin[:n_cols])
    return float(fake_in_real.mean()), float(real_in_fake.mean())
