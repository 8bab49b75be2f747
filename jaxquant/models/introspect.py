"""Reading layer attributes (conv geometry, concatenated inputs) off a network by tracing."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.models.layers import Conv


@dataclasses.dataclass(frozen=True)
class ConvInfo:
    """A convolution as an abstract forward pass sees it: kernel size, strides, padding, and
    ``input_split``, the channel at which its input is a concatenation of two tensors (0: none)."""

    kernel_size: int
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    input_split: int


def _trace(model, interceptor) -> None:
    """One abstract (shape-only) forward pass of ``model`` on a batch of one, with a Flax
    method interceptor that sees every module call."""
    x = jax.ShapeDtypeStruct((1, *model.sample_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if model.is_class_conditional else None
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, x, t, y: model.module.apply({"params": p}, x, t, y), model.params, x, t, y)


def conv_layers(model) -> dict[str, ConvInfo]:
    """``{layer name: ConvInfo}`` for every :class:`Conv` a model's forward pass calls.

    Found by an abstract (shape-only) forward pass with a method interceptor, so it
    costs no computation and needs no per-architecture table.
    """
    found: dict[str, ConvInfo] = {}

    def interceptor(next_fn, args, kwargs, context):
        mod = context.module
        if isinstance(mod, Conv) and context.method_name == "__call__":
            pad = mod.padding
            if isinstance(pad, int):
                pad = ((pad, pad), (pad, pad))
            found[".".join(mod.scope.path)] = ConvInfo(
                mod.kernel_size, (mod.strides, mod.strides), tuple(tuple(p) for p in pad), mod.input_split)
        return next_fn(*args, **kwargs)

    _trace(model, interceptor)
    return found


def layer_positions(model) -> dict[str, int]:
    """``{layer name: positions}`` for every :class:`Conv` and :class:`Dense` a model's
    forward pass calls: how many positions (pixels, tokens) one example's input to the
    layer has, the product of its shape between the batch and the channel axis (1 for a
    layer applied to a vector, such as a time-embedding projection).

    Found, like :func:`conv_layers`, by an abstract forward pass (no computation). A
    layer called more than once keeps its largest input.
    """
    from jaxquant.models.layers import Dense

    found: dict[str, int] = {}

    def interceptor(next_fn, args, kwargs, context):
        mod = context.module
        if isinstance(mod, (Conv, Dense)) and context.method_name == "__call__" and args:
            shape = args[0].shape
            n = 1
            for d in shape[1:-1]:
                n *= int(d)
            name = ".".join(mod.scope.path)
            found[name] = max(found.get(name, 0), n)
        return next_fn(*args, **kwargs)

    _trace(model, interceptor)
    return found


def full_resolution_layers(model) -> list[str]:
    """The layers whose input has the most positions (:func:`layer_positions`): for a
    UNet, the convolutions and attention projections at the network's full resolution."""
    pos = layer_positions(model)
    top = max(pos.values())
    return [n for n, p in pos.items() if p == top]
