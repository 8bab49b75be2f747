"""The single dispatch point for every dense layer and convolution.

Models never look at how a weight is stored: they call :func:`dense` and
:func:`conv2d` with whatever sits at the weight's path in the parameter tree. A float
array takes the plain XLA path; quantized weight containers (added by the quantization
modules) are recognised here and either dequantized on the fly inside the jitted
forward or routed to a kernel that computes on the compressed form.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# Weight containers register a dequantize function here: type -> fn(weight, dtype).
# Keeping the registry in this module means there is exactly one place that decides
# how a stored weight becomes something a matmul can use.
_DEQUANTIZERS: dict[type, Callable[[Any, Any], jax.Array]] = {}
# Optional fused paths: type -> fn(x, weight, **conv_or_dense_kwargs).
_DENSE_KERNELS: dict[type, Callable[..., jax.Array]] = {}
_CONV_KERNELS: dict[type, Callable[..., jax.Array]] = {}


def register_weight_type(
    cls: type,
    dequantize: Callable[[Any, Any], jax.Array],
    dense_kernel: Callable[..., jax.Array] | None = None,
    conv_kernel: Callable[..., jax.Array] | None = None,
) -> None:
    """Teach the dispatch a new stored-weight type.

    Args:
      cls: the pytree class stored at a weight's path.
      dequantize: ``fn(weight, dtype) -> dense array`` with the float weight's shape.
      dense_kernel / conv_kernel: optional functions computing directly on the
        compressed form; when absent the weight is dequantized and the XLA op is used.
    """
    _DEQUANTIZERS[cls] = dequantize
    if dense_kernel is not None:
        _DENSE_KERNELS[cls] = dense_kernel
    if conv_kernel is not None:
        _CONV_KERNELS[cls] = conv_kernel


def is_quantized_weight(weight: Any) -> bool:
    """Whether ``weight`` is a registered stored-weight container (not a float array)."""
    return type(weight) in _DEQUANTIZERS


def materialize(weight: Any, dtype: Any = jnp.float32) -> jax.Array:
    """Return ``weight`` as a dense array of ``dtype`` (dequantizing if needed)."""
    fn = _DEQUANTIZERS.get(type(weight))
    if fn is not None:
        return fn(weight, dtype)
    return jnp.asarray(weight, dtype)


def dense(
    x: jax.Array,
    kernel: Any,
    bias: jax.Array | None = None,
    *,
    act_quant: Callable[[jax.Array], jax.Array] | None = None,
    dtype: Any = jnp.float32,
    precision: Any = lax.Precision.HIGHEST,
) -> jax.Array:
    """``x @ kernel + bias`` with ``kernel`` of shape ``[in, out]`` in any stored form.

    ``act_quant`` (an activation quantizer) is applied to ``x`` first.
    """
    if act_quant is not None:
        x = act_quant(x)
    fused = _DENSE_KERNELS.get(type(kernel))
    if fused is not None:
        y = fused(x.astype(dtype), kernel)
    else:
        w = materialize(kernel, dtype)
        y = jnp.dot(x.astype(dtype), w, precision=precision)
    if bias is not None:
        y = y + jnp.asarray(bias, dtype)
    return y


def conv2d(
    x: jax.Array,
    kernel: Any,
    bias: jax.Array | None = None,
    *,
    strides: Sequence[int] = (1, 1),
    padding: Sequence[tuple[int, int]] | str = ((0, 0), (0, 0)),
    act_quant: Callable[[jax.Array], jax.Array] | None = None,
    dtype: Any = jnp.float32,
    precision: Any = lax.Precision.HIGHEST,
) -> jax.Array:
    """2-D convolution of NHWC ``x`` with an HWIO ``kernel`` in any stored form.

    ``act_quant`` (an activation quantizer) is applied to ``x`` first; zero padding
    stays exact since every quantizer represents 0.
    """
    if act_quant is not None:
        x = act_quant(x)
    fused = _CONV_KERNELS.get(type(kernel))
    if fused is not None:
        y = fused(x.astype(dtype), kernel, strides=tuple(strides), padding=padding)
    else:
        w = materialize(kernel, dtype)
        y = lax.conv_general_dilated(
            x.astype(dtype),
            w,
            window_strides=tuple(strides),
            padding=padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=precision,
        )
    if bias is not None:
        y = y + jnp.asarray(bias, dtype)
    return y
