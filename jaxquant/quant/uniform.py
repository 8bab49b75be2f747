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
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import ConfigError
from jaxquant.quant import dispatch, packing

SCALE_DTYPE = jnp.float16


def as_matrix(kernel: jax.Array) -> jax.Array:
    """Flax kernel (``[..., out]``) → ``[out, K]`` with ``K`` in kernel order."""
    return jnp.asarray(kernel).reshape(-1, kernel.shape[-1]).T


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


def _fake_quant_groups(w: jax.Array, lo: jax.Array, hi: jax.Array, bits: int, symmetric: bool):
    """Quantize groups ``w [..., gs]`` to the range ``[lo, hi]`` (per group); returns
    ``(codes uint, scale f16, zero or None, dequantized)``."""
    qmin, qmax = _qrange(bits, symmetric)
    if symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        scale = (amax / qmax).astype(SCALE_DTYPE)
        s = jnp.where(scale == 0, 1.0, scale.astype(jnp.float32))
        q = jnp.clip(jnp.round(w / s[..., None]), qmin, qmax)
        deq = q * s[..., None]
        codes = (q + 2 ** (bits - 1)).astype(jnp.uint8 if bits <= 8 else jnp.uint16)
        return codes, jnp.where(scale == 0, jnp.asarray(1.0, SCALE_DTYPE), scale), None, deq
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = ((hi - lo) / qmax).astype(SCALE_DTYPE)
    s = jnp.where(scale == 0, 1.0, scale.astype(jnp.float32))
    zero = jnp.clip(jnp.round(-lo / s), 0, qmax)
    q = jnp.clip(jnp.round(w / s[..., None]) + zero[..., None], 0, qmax)
    deq = (q - zero[..., None]) * s[..., None]
    return (q.astype(jnp.uint8 if bits <= 8 else jnp.uint16),
            jnp.where(scale == 0, jnp.asarray(1.0, SCALE_DTYPE), scale), zero.astype(jnp.uint8), deq)


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
    """

    bits: int = 4
    symmetric: bool = False
    group_size: int | None = None
    clip_search: int = 40
    clip_min: float = 0.3
    packed: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"weight bits must be 2..8, got {self.bits}")
        if self.clip_search < 1 or not 0 < self.clip_min <= 1:
            raise ConfigError("clip_search must be ≥ 1 and clip_min in (0, 1]")


def quantize_weight(kernel: Any, cfg: WeightQuantConfig) -> UniformWeight:
    """Quantize a float kernel (HWIO conv or ``[in, out]`` dense) uniformly.

    For every group the clipping ratio ``r`` (range ``r·[min, max]``) minimising the
    squared error of the group is chosen among ``cfg.clip_search`` candidates.
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(kernel))):
        raise ConfigError("cannot quantize a weight with NaN or Inf entries")
    shape = tuple(kernel.shape)
    w = as_matrix(kernel)
    out, k = w.shape
    gs = cfg.group_size or k
    if k % gs:
        raise ConfigError(f"group_size {gs} does not divide the {k} weights per output channel of shape {shape}")
    wg = w.reshape(out, k // gs, gs)
    lo, hi = wg.min(-1), wg.max(-1)
    ratios = (jnp.linspace(cfg.clip_min, 1.0, cfg.clip_search) if cfg.clip_search > 1
              else jnp.ones((1,), jnp.float32))

    def err(r):
        *_, deq = _fake_quant_groups(wg, lo * r, hi * r, cfg.bits, cfg.symmetric)
        return jnp.sum(jnp.square(deq - wg), -1)

    errs = jax.lax.map(err, ratios)  # [n_ratios, out, groups]; one ratio at a time bounds memory
    best = ratios[jnp.argmin(errs, axis=0)]
    codes, scale, zero, _ = _fake_quant_groups(wg, lo * best, hi * best, cfg.bits, cfg.symmetric)
    qw = UniformWeight(codes.reshape(out, k).astype(jnp.uint8), scale, zero, cfg.bits, shape, gs, packed=False)
    return qw.to_packed() if cfg.packed else qw
