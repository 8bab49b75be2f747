"""Uniform scalar quantization of weights (per output channel, optional sub-channel groups).

A weight of any layout is viewed as a matrix ``[out, K]``: the last axis of the Flax
kernel (HWIO conv or ``[in, out]`` dense) is the output channel, and ``K`` collects
the rest in kernel order ``(kh, kw, in)``. Each row is split into groups of
``group_size`` consecutive entries (``group_size = K``: one scale per output channel);
each group has a float16 scale and, for the asymmetric form, a ``bits``-bit integer
zero point.

Codes are unsigned integers in ``[0, 2**bits)``; the value is ``scale * (code - zero)``
with ``zero = 2**(bits-1)`` for the symmetric form. The clipping range of each group is
chosen by a grid search minimising the squared error (``clip_search``).

With ``error_feedback`` the codes are not rounded to nearest but chosen one input column
at a time, each column's rounding error pushed onto the columns not yet rounded so as to
minimise the layer's output error ``‖(W − Q)·X‖²`` on the calibration inputs, given their
second moments ``XᵀX`` (the optimal brain surgeon update, in the column order and form of
GPTQ, Frantar et al. 2023). Scales and zero points are those of the clipping search; only
the codes change, so the stored form and its size are the same.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import ConfigError
from jaxquant.quant import dispatch, packing

SCALE_DTYPE = jnp.float16


def as_matrix(kernel: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """Flax kernel (``[..., out]``) → ``[out, K]`` with ``K`` in kernel order; a numpy
    kernel gives a numpy matrix, a jax one a jax matrix."""
    return kernel.reshape(-1, kernel.shape[-1]).T


def from_matrix(w: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`as_matrix`."""
    return w.T.reshape(shape)


@flax.struct.dataclass
class UniformWeight:
    """A uniformly quantized weight, stored in the place of the float kernel.

    Attributes:
      codes: packed form: uint32 ``[out, words]`` (exact bit stream per row, see
        :mod:`jaxquant.quant.packing`); fake form: uint8 ``[out, K]``.
      scale: float16 ``[out, K // group_size]``.
      zero: uint8 ``[out, K // group_size]`` for the asymmetric form, else ``None``.
      bits, shape, group_size, packed: static metadata (``shape`` is the float kernel's).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    bits: int = flax.struct.field(pytree_node=False)
    shape: tuple = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    packed: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def out_features(self) -> int:
        return self.shape[-1]

    @property
    def in_size(self) -> int:
        """``K``: number of weights per output channel."""
        return int(np.prod(self.shape[:-1]))

    @property
    def num_weights(self) -> int:
        return int(np.prod(self.shape))

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def describe(self) -> str:
        g = "per-channel" if self.group_size == self.in_size else f"g={self.group_size}"
        return f"uniform {self.bits}b {'sym' if self.symmetric else 'asym'} {g}"

    def int_codes(self) -> jax.Array:
        """Codes as int32 ``[out, K]`` whatever the storage form."""
        if self.packed:
            return packing.unpack(self.codes, self.bits, self.in_size)
        return self.codes.astype(jnp.int32)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The dense kernel this weight represents, in the float kernel's layout."""
        q = self.int_codes()
        out, k = q.shape
        g = k // self.group_size
        q = q.reshape(out, g, self.group_size).astype(jnp.float32)
        zero = (jnp.float32(2 ** (self.bits - 1)) if self.zero is None
                else self.zero.astype(jnp.float32)[..., None])
        w = (q - zero) * self.scale.astype(jnp.float32)[..., None]
        return from_matrix(w.reshape(out, k), self.shape).astype(dtype)

    def to_packed(self) -> "UniformWeight":
        if self.packed:
            return self
        return dataclasses.replace(self, codes=packing.pack(self.codes, self.bits), packed=True)

    def to_fake(self) -> "UniformWeight":
        """The unpacked (one uint8 per code) form; same values as the packed form."""
        if not self.packed:
            return self
        return dataclasses.replace(self, codes=self.int_codes().astype(jnp.uint8), packed=False)


dispatch.register_weight_type(UniformWeight, lambda w, dtype: w.dequantize(dtype))


def _qrange(bits: int, symmetric: bool) -> tuple[float, float]:
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _fake_quant_groups(w: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool):
    """Quantize groups ``w [..., gs]`` (float32) to the range ``[lo, hi]`` (per group); returns
    ``(codes uint, scale f16, zero or None, dequantized)`` as numpy arrays.

    Numpy, not jnp: the clipping search calls it once per candidate ratio on every layer's
    shape, and op-by-op jnp compiled each shape anew (about 40 s for ``ddpm-fmnist``). The
    arithmetic is float32 throughout, as jnp's was.
    """
    qmin, qmax = _qrange(bits, symmetric)
    f32 = np.float32
    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        scale = (amax / f32(qmax)).astype(SCALE_DTYPE)
        s = np.where(scale == 0, f32(1.0), scale.astype(f32))
        q = np.clip(np.round(w / s[..., None]), qmin, qmax)
        deq = q * s[..., None]
        codes = (q + 2 ** (bits - 1)).astype(np.uint8 if bits <= 8 else np.uint16)
        return codes, np.where(scale == 0, SCALE_DTYPE(1.0), scale), None, deq
    lo = np.minimum(lo, f32(0.0))
    hi = np.maximum(hi, f32(0.0))
    scale = ((hi - lo) / f32(qmax)).astype(SCALE_DTYPE)
    s = np.where(scale == 0, f32(1.0), scale.astype(f32))
    zero = np.clip(np.round(-lo / s), 0, qmax).astype(f32)
    q = np.clip(np.round(w / s[..., None]) + zero[..., None], 0, qmax)
    deq = (q - zero[..., None]) * s[..., None]
    return (q.astype(np.uint8 if bits <= 8 else np.uint16),
            np.where(scale == 0, SCALE_DTYPE(1.0), scale), zero.astype(np.uint8), deq)


@dataclasses.dataclass(frozen=True)
class WeightQuantConfig:
    """How to quantize one weight uniformly.

    Attributes:
      bits: 2..8.
      symmetric: symmetric (zero point implicit) or asymmetric (per-group zero point).
      group_size: entries per scale along ``K``; ``None`` = one scale per output channel.
      clip_search: number of clipping ratios tried in ``[clip_min, 1]`` (1 = no search).
      clip_min: smallest ratio of the range tried.
      packed: store bit-packed codes (else one uint8 per code, the "fake" form).
      error_feedback: choose the codes by sequential rounding with error feedback on the
        layer's input statistics ``XᵀX`` (GPTQ); needs ``xtx`` in :func:`quantize_weight`.
      damp: with ``error_feedback``, ``damp · mean(diag XᵀX)`` is added to the diagonal.
    """

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None
    clip_search: int = 40
    clip_min: float = 0.3
    packed: bool = True
    error_feedback: bool = False
    damp: float = 0.01

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"weight bits must be 2..8, got {self.bits}")
        if not self.damp > 0:
            raise ConfigError(f"damp must be positive, got {self.damp}")
        if self.clip_search < 1 or not 0 < self.clip_min <= 1:
            raise ConfigError("clip_search must be ≥ 1 and clip_min in (0, 1]")


def quantize_weight(kernel: Any, cfg: WeightQuantConfig, xtx: Any = None) -> UniformWeight:
    """Quantize a float kernel (HWIO conv or ``[in, out]`` dense) uniformly.

    For every group the clipping ratio ``r`` (range ``r·[min, max]``) minimising the
    squared error of the group is chosen among ``cfg.clip_search`` candidates. With
    ``cfg.error_feedback`` the codes are then chosen by :func:`error_feedback_codes` on
    ``xtx`` (``[K, K]``, the layer's calibration ``XᵀX`` in :func:`as_matrix` order).
    """
    kernel = np.asarray(kernel, np.float32)
    if not np.isfinite(kernel).all():
        raise ConfigError("cannot quantize a weight with NaN or Inf entries")
    shape = tuple(kernel.shape)
    w = as_matrix(kernel)
    out, k = w.shape
    gs = cfg.group_size or k
    if k % gs:
        raise ConfigError(f"group_size {gs} does not divide the {k} weights per output channel of shape {shape}")
    if cfg.error_feedback:
        if xtx is None:
            raise ConfigError("error_feedback needs the layer's XᵀX (a calibration made with XᵀX statistics)")
        if tuple(np.shape(xtx)) != (k, k):
            raise ConfigError(f"XᵀX of shape {tuple(np.shape(xtx))} does not fit a kernel with K = {k}")
    wg = w.reshape(out, k // gs, gs)
    lo, hi = wg.min(-1), wg.max(-1)
    ratios = _clip_ratios(cfg.clip_min, cfg.clip_search)
    errs = np.empty((len(ratios), out, k // gs), np.float32)
    for i, r in enumerate(ratios):  # one ratio at a time bounds memory
        *_, deq = _fake_quant_groups(wg, lo * r, hi * r, cfg.bits, cfg.symmetric)
        errs[i] = np.sum(np.square(deq - wg), -1)
    best = ratios[np.argmin(errs, axis=0)]
    codes, scale, zero, _ = _fake_quant_groups(wg, lo * best, hi * best, cfg.bits, cfg.symmetric)
    codes = codes.reshape(out, k)
    if cfg.error_feedback:
        codes = error_feedback_codes(w, scale, zero, gs, cfg.bits, xtx, cfg.damp)
    qw = UniformWeight(jnp.asarray(codes, jnp.uint8), jnp.asarray(scale),
                       None if zero is None else jnp.asarray(zero), cfg.bits, shape, gs, packed=False)
    return qw.to_packed() if cfg.packed else qw


@functools.lru_cache(maxsize=16)
def _clip_ratios(clip_min: float, n: int) -> np.ndarray:
    """The ``n`` clipping ratios in ``[clip_min, 1]`` (float32, as ``jnp.linspace`` makes them)."""
    if n <= 1:
        return np.ones((1,), np.float32)
    r = np.asarray(jnp.linspace(clip_min, 1.0, n), np.float32)
    r.setflags(write=False)
    return r


def _inverse_cholesky(xtx: Any, damp: float) -> np.ndarray:
    """Upper ``U`` with ``Uᵀ U = (XᵀX + λI)⁻¹`` (float64); inputs never seen get a unit diagonal."""
    h = np.array(xtx, np.float64)
    h = (h + h.T) / 2
    dead = np.diag(h) <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    inv_lower = np.linalg.solve(np.linalg.cholesky(h), np.eye(len(h)))  # L⁻¹, so H⁻¹ = L⁻ᵀ L⁻¹
    return np.linalg.cholesky(inv_lower.T @ inv_lower).T


def error_feedback_codes(w: Any, scale: Any, zero: Any, group_size: int, bits: int, xtx: Any,
                         damp: float = 0.01) -> jax.Array:
    """Codes ``[out, K]`` of ``w`` (``[out, K]``) with fixed per-group ``scale`` (and
    ``zero``; ``None`` for the symmetric form), rounded one column at a time with each
    column's error spread over the later columns: with ``U`` the upper Cholesky factor
    of ``(XᵀX + λI)⁻¹``, ``W[:, j] -= (w_i − q_i) / U_ii · U_ij`` for ``j > i`` (GPTQ).

    Greedily minimises ``‖(W − Q)·X‖²``; equal to round-to-nearest when ``XᵀX`` is diagonal.
    """
    w = jnp.asarray(w, jnp.float32)
    symmetric = zero is None
    qmin, qmax = _qrange(bits, symmetric)
    s = jnp.asarray(scale).astype(jnp.float32)
    s = jnp.repeat(jnp.where(s == 0, 1.0, s), group_size, axis=1)  # [out, K]
    if symmetric:
        z = jnp.zeros_like(s)
    else:
        z = jnp.repeat(jnp.asarray(zero).astype(jnp.float32), group_size, axis=1)
    u = jnp.asarray(_inverse_cholesky(xtx, damp), jnp.float32)
    limits = jnp.asarray([qmin, qmax, 2 ** (bits - 1) if symmetric else 0], jnp.float32)
    return _sequential_round(w, s, z, u, limits)


@jax.jit
def _sequential_round(w, s, z, u, limits):
    """``limits``: ``[qmin, qmax, offset]``; symmetric codes are stored with ``offset =
    2**(bits-1)`` added (see the module docstring). Traced, so one compilation per shape."""
    qmin, qmax, offset = limits[0], limits[1], limits[2]
    def body(i, carry):
        w, codes = carry
        wi = jax.lax.dynamic_index_in_dim(w, i, axis=1, keepdims=False)
        si = jax.lax.dynamic_index_in_dim(s, i, axis=1, keepdims=False)
        zi = jax.lax.dynamic_index_in_dim(z, i, axis=1, keepdims=False)
        q = jnp.clip(jnp.round(wi / si) + zi, qmin, qmax)
        err = (wi - (q - zi) * si) / u[i, i]
        w = w - err[:, None] * u[i][None, :]
        codes = jax.lax.dynamic_update_index_in_dim(codes, (q + offset).astype(jnp.int32), i, axis=1)
        return w, codes

    _, codes = jax.lax.fori_loop(0, w.shape[1], body, (w, jnp.zeros(w.shape, jnp.int32)))
    return codes
