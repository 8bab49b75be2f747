"""Building blocks shared by the Flax networks.

``Dense`` and ``Conv`` hold their weights under the usual Flax names (``kernel``,
``bias``) but compute through :mod:`jaxquant.quant.dispatch`, so a quantized container
placed at the same path in the parameter tree is used without the model knowing.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.quant import dispatch

Dtype = Any


def optional_param(module: nn.Module, name: str) -> Any:
    """A parameter that exists only in quantized trees (e.g. ``input_quant``), else None."""
    return module.get_variable("params", name) if module.has_variable("params", name) else None


def record(module: nn.Module, name: str, x: jax.Array) -> None:
    """Expose an activation to calibration (a no-op unless ``"calib"`` is mutable)."""
    if not module.is_initializing():
        module.sow("calib", name, x)


def _get_or_init(module: nn.Module, name: str, init_fn, shape, dtype=jnp.float32):
    # `Module.param` compares the stored value's leaf shapes with the initializer's
    # shape; a quantized container has other leaves, so read existing values directly.
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init_fn, shape, dtype)


def _smoothed(module: nn.Module, x: jax.Array) -> jax.Array:
    """The layer's input after its channel smoothing (``input_smooth``, see
    :mod:`jaxquant.quant.smooth`), if it has one; what calibration records and the
    activation quantizer sees."""
    smooth = optional_param(module, "input_smooth")
    return x if smooth is None else smooth(x)


def _corrected_bias(module: nn.Module, bias: jax.Array | None) -> jax.Array | None:
    """The layer's bias plus its bias correction (``bias_correction``, see
    :mod:`jaxquant.quant.bias_correction`), if it has one."""
    correction = optional_param(module, "bias_correction")
    return bias if correction is None else correction.corrected(bias)


class Dense(nn.Module):
    """Fully connected layer ``y = x W + b`` (``W`` stored ``[in, out]``)."""

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _get_or_init(self, "kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = _get_or_init(self, "bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        bias = _corrected_bias(self, bias)
        x = _smoothed(self, x)
        record(self, "input", x)
        return dispatch.dense(x, kernel, bias, act_quant=optional_param(self, "input_quant"), dtype=self.dtype)


class Conv(nn.Module):
    """2-D convolution on NHWC inputs, kernel stored HWIO.

    ``padding`` is an int (symmetric), or explicit ``((top, bottom), (left, right))``.
    ``input_split`` marks an input that is a concatenation (upsampled features, skip
    connection): the channel where the second part starts, so activation quantizers
    can give the two parts separate ranges (0: not a concatenation).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: int | Sequence[tuple[int, int]] = 1
    use_bias: bool = True
    input_split: int = 0
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = _get_or_init(self, "kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = _get_or_init(self, "bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        bias = _corrected_bias(self, bias)
        pad = self.padding
        if isinstance(pad, int):
            pad = ((pad, pad), (pad, pad))
        x = _smoothed(self, x)
        record(self, "input", x)
        return dispatch.conv2d(x, kernel, bias, strides=(self.strides, self.strides), padding=pad,
                               act_quant=optional_param(self, "input_quant"), dtype=self.dtype)


class GroupNorm(nn.Module):
    """GroupNorm over NHWC (or N…C) inputs, statistics in float32 as PyTorch computes them."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        shape = xf.shape
        g = xf.reshape(shape[0], -1, self.num_groups, c // self.num_groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        g = (g - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = g.reshape(shape) * scale + bias
        return y.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, float32 statistics."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return ((xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
              probs_fn: Any = None) -> jax.Array:
    """Multi-head scaled dot-product attention on ``[B, L, heads*d]`` tensors.

    Scores and softmax are computed in float32 (diffusers' ``upcast_softmax``);
    ``probs_fn`` (e.g. a quantizer) is applied to the softmax output.
    """
    b, lq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, lq, heads, d).astype(jnp.float32)
    kh = k.reshape(b, k.shape[1], heads, d).astype(jnp.float32)
    vh = v.reshape(b, v.shape[1], heads, d)
    scores = jnp.einsum("bqhd,bkhd->bhqk", qh, kh, precision=jax.lax.Precision.HIGHEST) * (d ** -0.5)
    probs = jax.nn.softmax(scores, axis=-1)
    if probs_fn is not None:
        probs = probs_fn(probs)
    probs = probs.astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vh, precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, lq, inner)


#: Activation-only quantization sites of an attention module: the operands of its two
#: matmuls (q·kᵀ and softmax·v).
ATTENTION_SITES = ("q", "k", "v", "probs")


def attend(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """:func:`attention` inside ``module`` with its matmul operands exposed as sites.

    Each operand is recorded for calibration and passed through the quantizer stored
    at ``<module>.<site>_quant`` when the parameter tree has one.
    """
    def site(name: str, x: jax.Array) -> jax.Array:
        record(module, name, x)
        aq = optional_param(module, f"{name}_quant")
        return x if aq is None else aq(x)

    q, k, v = site("q", q), site("k", k), site("v", v)
    return attention(q, k, v, heads, probs_fn=lambda p: site("probs", p))


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep embedding with diffusers' ``flip_sin_to_cos``/``freq_shift``.

    Frequencies are ``exp(-log(max_period) * i / (dim/2 - freq_shift))``; the output is
    ``[sin, cos]`` (``[cos, sin]`` when flipped), zero-padded when ``dim`` is odd.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    freqs = jnp.exp(exponent)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def upsample_nearest2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2× upsampling of NHWC ``x``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
