"""Output distortion of a quantized model: normalised MSE and MSE + (1 − SSIM).

The seed (``seeds/002``, eq. 3) measures how far the quantized model's output ``Ô``
is from the float model's output ``O`` by an MSE term plus an SSIM term. We read it as
follows (the printed formula is garbled, so each choice is stated):

* **MSE term**: ``‖Ô − O‖² / ‖O‖²`` over all outputs of a timestep group (a ratio of
  sums over the group's samples). The seed divides by ``‖O‖²·‖Ô‖²``, which is not
  scale invariant; we keep the plain normalisation by the reference energy.
* **SSIM term**: the seed adds the SSIM formula itself, which would reward
  dissimilarity, and its text calls it "the SSIM loss"; we add ``1 − SSIM``. The
  printed formula is the single-window form (means and variances over the whole
  output); we use the standard windowed SSIM of Wang et al. (2004), as
  ``skimage.metrics.structural_similarity`` computes it: each sample's output (the
  predicted noise, NHWC) is treated as an image per channel, local statistics are
  taken in a ``win_size × win_size`` uniform window (or a Gaussian window, ``sigma``
  1.5, truncated at 3.5 sigma) over the *valid* positions, with sample covariances
  (``N / (N − 1)``), constants ``c1 = (K1·L)²``, ``c2 = (K2·L)²`` (``K1 = 0.01``,
  ``K2 = 0.03``) where ``L`` is the dynamic range ``max − min`` of the float output of
  that sample and channel (the network output is unbounded, so the range is read off
  the reference). The SSIM map is averaged over positions and channels, and
  ``1 − SSIM`` averaged over the group's samples.
* **MSE + SSIM**: the sum of the two terms, unweighted, as in the seed.

A window larger than the output is shrunk to the largest odd size that fits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import ConfigError

#: Distortion measures understood by :func:`distortion`.
DISTORTIONS = ("mse", "mse+ssim")


@dataclasses.dataclass(frozen=True)
class SSIMConfig:
    """Windowed SSIM settings (defaults: ``skimage.metrics.structural_similarity``'s).

    Attributes:
      win_size: side of the uniform window (odd); ignored with ``gaussian``.
      gaussian: Gaussian-weighted window of standard deviation ``sigma``
        (``2·round(3.5·sigma) + 1`` taps).
      sigma: Gaussian window width.
      k1, k2: stabilising constants (times the data range).
      sample_covariance: normalise variances by ``N − 1`` instead of ``N``.
    """

    win_size: int = 7
    gaussian: bool = False
    sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    sample_covariance: bool = True

    def __post_init__(self):
        if self.win_size < 3 or self.win_size % 2 == 0:
            raise ConfigError(f"SSIM win_size must be odd and ≥ 3, got {self.win_size}")

    def window(self, max_size: int | None = None) -> np.ndarray:
        """The 1-D window weights (sum 1), shrunk to at most ``max_size`` taps."""
        if self.gaussian:
            r = int(3.5 * self.sigma + 0.5)
            if max_size is not None:
                r = min(r, (max_size - 1) // 2)
            x = np.arange(-r, r + 1, dtype=np.float64)
            w = np.exp(-0.5 * (x / self.sigma) ** 2)
        else:
            n = self.win_size if max_size is None else min(self.win_size, max_size - (1 - max_size % 2))
            w = np.ones(max(n, 1))
        if len(w) < 3:
            raise ConfigError(f"SSIM needs outputs of at least 3x3 pixels (window of {len(w)} taps)")
        return w / w.sum()


def _filter_valid(x: jax.Array, w: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of ``[B, H, W]`` maps with the 1-D window ``w``."""
    k = jnp.asarray(w, x.dtype)
    n = len(w)
    x = x[..., None]  # [B, H, W, 1]
    dn = ("NHWC", "HWIO", "NHWC")
    hi = jax.lax.Precision.HIGHEST
    x = jax.lax.conv_general_dilated(x, k.reshape(n, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn, precision=hi)
    x = jax.lax.conv_general_dilated(x, k.reshape(1, n, 1, 1), (1, 1), "VALID", dimension_numbers=dn, precision=hi)
    return x[..., 0]


def _dssim_map(x: jax.Array, y: jax.Array, data_range, cfg: SSIMConfig) -> jax.Array:
    """``1 − SSIM`` map of ``[N, H, W, C]`` images: ``[N, C, H', W']`` over the valid positions.

    With ``A1 = 2μxμy + c1``, ``A2 = 2σxy + c2``, ``B1 = μx² + μy² + c1``,
    ``B2 = σx² + σy² + c2`` (SSIM ``= A1·A2 / (B1·B2)``), the differences are moments of
    ``d = x − y``: ``a = B1 − A1 = μd²`` and ``b = B2 − A2 = σd²``, so
    ``1 − SSIM = (a·B2 + b·B1 − a·b) / (B1·B2)`` keeps its precision when ``x ≈ y``
    (``1 − A1A2/(B1B2)`` cancels to float32 noise there).
    """
    n, h, wd, c = x.shape
    w = cfg.window(min(h, wd))
    npix = len(w) ** 2
    cov_norm = npix / (npix - 1) if cfg.sample_covariance else 1.0
    # Channels become images [N*C, H, W]; the six local moments in one filtering pass.
    xs = jnp.moveaxis(x, -1, 1).reshape(n * c, h, wd)
    ys = jnp.moveaxis(y, -1, 1).reshape(n * c, h, wd)
    ds = xs - ys
    m = _filter_valid(jnp.concatenate([xs, ys, xs * xs, ys * ys, ds, ds * ds]), w)
    ux, uy, uxx, uyy, ud, udd = m.reshape(6, n * c, h - len(w) + 1, wd - len(w) + 1)
    L = jnp.broadcast_to(jnp.asarray(data_range, jnp.float32), (n, c)).reshape(n * c, 1, 1)
    c1, c2 = (cfg.k1 * L) ** 2, (cfg.k2 * L) ** 2
    b1 = ux * ux + uy * uy + c1
    b2 = cov_norm * (uxx - ux * ux) + cov_norm * (uyy - uy * uy) + c2
    a = ud * ud
    b = cov_norm * (udd - ud * ud)
    out = (a * b2 + b * b1 - a * b) / (b1 * b2)
    return out.reshape(n, c, *out.shape[1:])


def _as_nhwc(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x[None, ..., None] if x.ndim == 2 else x[None] if x.ndim == 3 else x


def dssim(x: jax.Array, y: jax.Array, data_range: jax.Array | float, cfg: SSIMConfig = SSIMConfig()) -> jax.Array:
    """``1 − SSIM`` of each image and channel (see :func:`ssim`), computed without cancellation."""
    if jnp.shape(x) != jnp.shape(y):
        raise ConfigError(f"SSIM of images of different shapes {jnp.shape(x)} and {jnp.shape(y)}")
    nd = jnp.ndim(x)
    out = _dssim_map(_as_nhwc(x), _as_nhwc(y), data_range, cfg).mean(axis=(2, 3))
    return out[0, 0] if nd == 2 else out[0] if nd == 3 else out


def ssim(x: jax.Array, y: jax.Array, data_range: jax.Array | float, cfg: SSIMConfig = SSIMConfig()) -> jax.Array:
    """Mean windowed SSIM of each image and channel.

    Args:
      x, y: ``[N, H, W, C]`` images (or ``[H, W]`` / ``[H, W, C]``, treated as one image).
      data_range: ``L`` of the constants: a scalar or ``[N, C]``.
      cfg: window and constants.

    Returns:
      ``[N, C]`` SSIM averaged over the valid window positions (``[C]`` or a scalar for
      unbatched inputs), as ``skimage.metrics.structural_similarity`` with the same
      ``win_size`` / ``gaussian_weights`` / ``sigma`` / ``K1`` / ``K2`` /
      ``use_sample_covariance`` and ``channel_axis=-1``.
    """
    return 1.0 - dssim(x, y, data_range, cfg)


def output_stats(out: jax.Array, ref: jax.Array, cfg: SSIMConfig = SSIMConfig()) -> jax.Array:
    """Per-sample sufficient statistics of the distortion of ``out`` against ``ref``.

    Returns ``[N, 2]``: ``‖out − ref‖²`` and ``1 − SSIM`` (mean over channels, with the
    data range of each sample and channel of ``ref``). Sums of these over a group's
    samples, with ``‖ref‖²``, give every distortion of :func:`distortion`. Vectors
    (``[N, D]``, e.g. features) have no SSIM: that column is NaN.
    """
    out = out.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    err2 = jnp.sum(jnp.square(out - ref).reshape(out.shape[0], -1), axis=1)
    if out.ndim == 2:
        return jnp.stack([err2, jnp.full_like(err2, jnp.nan)], axis=1)
    rng = ref.max(axis=(1, 2)) - ref.min(axis=(1, 2))  # [N, C]
    rng = jnp.where(rng > 0, rng, 1.0)
    d = dssim(out, ref, rng, cfg).mean(axis=1)
    return jnp.stack([err2, d], axis=1)


def distortion(kind: str, err2: np.ndarray, ref2: np.ndarray, dssim: np.ndarray, count: np.ndarray) -> np.ndarray:
    """A distortion from summed statistics (broadcasting over any leading axes).

    Args:
      kind: ``"mse"`` (``Σ‖Ô−O‖² / Σ‖O‖²``) or ``"mse+ssim"`` (that plus the mean of
        ``1 − SSIM``).
      err2: summed ``‖Ô − O‖²`` of a group's samples.
      ref2: summed ``‖O‖²`` of the same samples.
      dssim: summed ``1 − SSIM`` of the same samples.
      count: number of samples.
    """
    if kind not in DISTORTIONS:
        raise ConfigError(f"unknown distortion {kind!r}; choose one of {', '.join(DISTORTIONS)}")
    d = np.asarray(err2, np.float64) / np.maximum(np.asarray(ref2, np.float64), 1e-30)
    if kind == "mse+ssim":
        d = d + np.asarray(dssim, np.float64) / np.maximum(np.asarray(count, np.float64), 1)
    return d
