"""Activation quantization: per-tensor uniform quantizers with a scale per timestep group.

An :class:`ActQuant` sits in the parameter tree beside the weight of the layer whose
input it quantizes (leaf ``input_quant``), or in an attention module for its matmul
operands (``q_quant``, ``k_quant``, ``v_quant``, ``probs_quant``). It holds one scale
and zero point per timestep group; :func:`at_timestep_group` selects a group's values
for a call, so the group travels with the call (``apply(at_timestep_group(params, g),
x, t)``) instead of living in global state.

``split > 0`` quantizes channels ``[:split]`` and ``[split:]`` with separate ranges:
Q-Diffusion's split quantization of the concatenated (upsampled features, skip) input
of up-block shortcuts, whose two halves have very different ranges.

``bits`` is one bit width for all groups, or a tuple with one bit width per timestep
group (mixed precision chosen per group, :mod:`jaxquant.search.rd`); selecting a group
then also selects its largest code (``qmax``), so the group index may stay traced.

Other leaves that hold one value per timestep group (the bias corrections of
:mod:`jaxquant.quant.bias_correction`) register with :func:`register_grouped` and are
narrowed by the same :func:`at_timestep_group` / :func:`at_timesteps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import ConfigError


@flax.struct.dataclass
class ActQuant:
    """Per-tensor asymmetric uniform fake-quantizer of an activation.

    Attributes:
      scale: float32 ``[G, P]`` (``G`` timestep groups, ``P`` = 1, or 2 with ``split``).
      zero: float32 ``[G, P]`` integer-valued zero points in ``[0, 2**bits - 1]``.
      bits: bit width, or a tuple of ``G`` bit widths (one per timestep group).
      split: first channel of the second part (0: no split).
      qmax: ``None`` when stored; set by :meth:`select` on quantizers with per-group
        bits to the selected group's largest code (a traced float32 scalar).
    """

    scale: jax.Array
    zero: jax.Array
    bits: int | tuple[int, ...] = flax.struct.field(pytree_node=False)
    split: int = flax.struct.field(pytree_node=False, default=0)
    qmax: jax.Array | None = None

    num_weights = 0  # stores no weights (accounting)

    @property
    def num_groups(self) -> int:
        return int(self.scale.shape[0])

    @property
    def group_bits(self) -> tuple[int, ...]:
        """Bit width of each timestep group."""
        return tuple(self.bits) if isinstance(self.bits, tuple) else (self.bits,) * self.num_groups

    def describe(self) -> str:
        bits = "/".join(map(str, self.bits)) if isinstance(self.bits, tuple) else str(self.bits)
        return f"act {bits}b x{self.num_groups} groups" + (" split" if self.split else "")

    def select(self, g: jax.Array | int) -> "ActQuant":
        """The quantizer of timestep group ``g`` (a one-group ActQuant); traceable."""
        g = jnp.asarray(g, jnp.int32)
        take = lambda a: jax.lax.dynamic_slice_in_dim(a, g, 1, axis=0)  # noqa: E731
        if isinstance(self.bits, tuple):
            qmax = jnp.asarray([2 ** b - 1 for b in self.bits], jnp.float32)[g]
            return dataclasses.replace(self, scale=take(self.scale), zero=take(self.zero), qmax=qmax)
        return dataclasses.replace(self, scale=take(self.scale), zero=take(self.zero))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.num_groups != 1:
            raise ConfigError(
                f"this activation quantizer holds {self.num_groups} timestep groups; select one per call "
                f"with jaxquant.quant.activation.at_timestep_group(params, group)")
        if self.qmax is not None:
            qmax = self.qmax
        elif isinstance(self.bits, tuple):  # per-group bits, constructed with one group
            qmax = 2 ** self.bits[0] - 1
        else:
            qmax = 2 ** self.bits - 1
        if self.split:
            a = fake_quant(x[..., :self.split], self.scale[0, 0], self.zero[0, 0], qmax)
            b = fake_quant(x[..., self.split:], self.scale[0, 1], self.zero[0, 1], qmax)
            return jnp.concatenate([a, b], axis=-1)
        return fake_quant(x, self.scale[0, 0], self.zero[0, 0], qmax)


@jax.custom_jvp
def round_ste(v: jax.Array) -> jax.Array:
    """``round(v)`` whose derivative is taken as 1 (the straight-through estimator).

    The value is exactly ``jnp.round(v)``; only gradients differ, so that the scale of a
    quantizer (and everything upstream of it) can be trained through the rounding.
    """
    return jnp.round(v)


@round_ste.defjvp
def _round_ste_jvp(primals, tangents):
    (v,), (dv,) = primals, tangents
    return jnp.round(v), dv


def fake_quant(x: jax.Array, scale: jax.Array, zero: jax.Array, qmax: int) -> jax.Array:
    """``scale * (clip(round(x / scale) + zero, 0, qmax) - zero)`` in x's dtype, for integer ``zero``.

    Differentiable in ``x`` and ``scale`` as in LSQ (Esser et al. 2020): the rounding
    passes gradients straight through (:func:`round_ste`), the clipping does not.
    """
    s = scale.astype(jnp.float32)
    # Clipping before rounding gives the same values (the zero point is an integer) and
    # full gradients up to the range's ends, where clipping after rounding halves them.
    q = round_ste(jnp.clip(x.astype(jnp.float32) / s, -zero, qmax - zero))
    return (q * s).astype(x.dtype)


def range_to_scale_zero(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric scale and integer zero point covering ``[lo, hi]`` (widened to contain 0)."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    qmax = 2 ** bits - 1
    scale = np.maximum((hi - lo) / qmax, 1e-8)
    zero = np.clip(np.round(-lo / scale), 0, qmax)
    return scale.astype(np.float32), zero.astype(np.float32)


def mse_range(values: np.ndarray, bits: int, num_candidates: int = 60, min_ratio: float = 0.2) -> tuple[float, float]:
    """Clipping range ``r·[min, max]`` minimising the quantization MSE on ``values``."""
    v = np.asarray(values, np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    best, best_err = (lo, hi), np.inf
    qmax = 2 ** bits - 1
    for r in np.linspace(min_ratio, 1.0, num_candidates):
        s, z = range_to_scale_zero(lo * r, hi * r, bits)
        q = np.clip(np.round(v / s) + z, 0, qmax)
        err = float(np.mean(np.square((q - z) * s - v)))
        if err < best_err:
            best, best_err = (lo * r, hi * r), err
    return best


def percentile_range(values: np.ndarray, pct: float = 99.99) -> tuple[float, float]:
    """``[percentile(100 - pct), percentile(pct)]`` of the values."""
    v = np.asarray(values, np.float64).ravel()
    return float(np.percentile(v, 100 - pct)), float(np.percentile(v, pct))


def is_act_quant(x: Any) -> bool:
    """Whether ``x`` is an activation quantizer leaf (for ``is_leaf`` in tree maps)."""
    return isinstance(x, ActQuant)


#: Leaf types holding one entry per timestep group, each with ``num_groups`` and a
#: traceable ``select(g)`` returning the one-group leaf of group ``g``.
_GROUPED: list[type] = [ActQuant]


def register_grouped(cls: type) -> None:
    """Have :func:`at_timestep_group` and :func:`at_timesteps` narrow leaves of ``cls`` too."""
    if cls not in _GROUPED:
        _GROUPED.append(cls)


def is_grouped(x: Any) -> bool:
    """Whether ``x`` is a leaf with one entry per timestep group (see :func:`register_grouped`)."""
    return isinstance(x, tuple(_GROUPED))


def at_timestep_group(params: Any, g: jax.Array | int) -> Any:
    """``params`` with every per-group leaf (:class:`ActQuant`, …) narrowed to timestep group ``g`` (traceable)."""
    return jax.tree_util.tree_map(lambda a: a.select(g) if is_grouped(a) else a, params, is_leaf=is_grouped)


def timestep_group(t: jax.Array, num_groups: int, num_train_timesteps: int) -> jax.Array:
    """Group index of timestep ``t``: ``G`` equal-width bins over ``[0, T)``."""
    return jnp.clip((jnp.asarray(t) * num_groups) // num_train_timesteps, 0, num_groups - 1).astype(jnp.int32)


def at_timesteps(params: Any, t: jax.Array, num_train_timesteps: int) -> Any:
    """``params`` with every per-group leaf narrowed to the group of timestep ``t[0]``.

    Sampling feeds one timestep per call, so the first entry decides for the batch.
    """
    t0 = jnp.asarray(t).reshape(-1)[0]
    return jax.tree_util.tree_map(
        lambda a: a.select(timestep_group(t0, a.num_groups, num_train_timesteps)) if is_grouped(a) else a,
        params, is_leaf=is_grouped)


def has_grouped(params: Any) -> bool:
    """Whether ``params`` holds any per-timestep-group leaf (then calls must select a group)."""
    return any(is_grouped(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_grouped))
