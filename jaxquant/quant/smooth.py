"""Channel smoothing of layer inputs (SmoothQuant-style), before quantization.

A per-tensor activation quantizer gives every input channel of a layer the same step, so
a few channels with a wide range set the step for all. Smoothing divides input channel
``j`` by a factor ``s_j`` and multiplies the kernel's input row ``j`` by it::

    y = x W = (x · diag(1/s)) (diag(s) W)

which leaves the float network's function unchanged (up to float rounding) while moving
range from the activations into the weights. SmoothQuant's choice of factors, with
``α`` in ``[0, 1]``::

    s_j = max|x_j|^α / max|W_j|^(1-α)

(``max|x_j|`` over calibration activations of the input channel, ``max|W_j|`` over the
kernel's weights that read it). ``α = 0`` flattens the weights' rows, ``α = 1`` the
activations' channels.

The result is again a float model: every smoothed layer holds its scaled kernel and a
:class:`ChannelSmooth` (leaf ``input_smooth``, stored as a container that adds
parameters) that multiplies its input by ``1/s`` before anything else, the activation
quantizer included. Calibrate, quantize (uniform, AQ, RD) and sample it like any model;
the calibration must be the smoothed model's own, since its layer inputs (ranges, XᵀX)
are the smoothed ones. On integer hardware the ``1/s`` multiply fuses into the
quantization of the input, which computes a per-channel multiply anyway when it divides
by the step.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.errors import ConfigError


@flax.struct.dataclass
class ChannelSmooth:
    """Multiplies a layer's input by ``inv_scale`` (one factor per input channel)."""

    inv_scale: jax.Array  # float32 [C]

    num_weights = 0  # extra parameters, not weights (accounting)

    def describe(self) -> str:
        return f"channel smoothing x{int(self.inv_scale.shape[0])}"

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.inv_scale.astype(x.dtype)


def is_channel_smooth(x: Any) -> bool:
    return isinstance(x, ChannelSmooth)


def channel_absmax(model, calib, layers: Sequence[str], batch_size: int = 32, progress: bool = True) -> dict[str, np.ndarray]:
    """``{layer: max |x_j| per input channel}`` over the calibration's inputs and steps.

    The float model is run on every recorded input ``x_t`` of ``calib`` (all steps, all
    trajectories, with their labels and the calibration's guidance scale) and the inputs
    of ``layers`` are reduced to one maximum per channel.
    """
    from jaxquant.calib.calibration import _model_fns
    from jaxquant import xla

    if not layers:
        return {}
    _, capture = _model_fns(model, calib.config.cfg_scale)
    wanted = sorted(set(layers))

    @xla.jit
    def step(params, x, t, y):
        acts = capture(params, x, t, y)
        missing = [n for n in wanted if n not in acts]
        if missing:
            raise ConfigError(f"no recorded input for layers {missing[:5]}: is the calibration of this model?")
        return {n: jnp.max(jnp.abs(acts[n].astype(jnp.float32)).reshape(-1, acts[n].shape[-1]), axis=0)
                for n in wanted}

    S, N = calib.inputs.shape[:2]
    labels = calib.labels if calib.labels is not None else np.zeros((N,), np.int32)
    out: dict[str, np.ndarray] = {}
    starts = range(0, N, batch_size)
    bar = tqdm(total=S * len(starts), desc="channel ranges", unit="batch", disable=not progress)
    for s in range(S):
        for b in starts:
            x = jnp.asarray(calib.inputs[s, b:b + batch_size])
            n = x.shape[0]
            got = step(model.params, x, jnp.full((n,), int(calib.timesteps[s]), jnp.int32),
                       jnp.asarray(labels[b:b + batch_size], jnp.int32))
            for k, v in got.items():
                v = np.asarray(v)
                out[k] = v if k not in out else np.maximum(out[k], v)
            bar.update(1)
    bar.close()
    return out


def smoothing_factors(act_absmax: np.ndarray, kernel: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's ``s_j = max|x_j|^α / max|W_j|^(1-α)`` for a kernel whose input axis is
    the second to last (``[in, out]`` dense, ``[kh, kw, in, out]`` conv). Channels that
    never fire, or that no weight reads, keep ``s_j = 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothing alpha must be in [0, 1], got {alpha}")
    k = np.abs(np.asarray(kernel, np.float64))
    w = k.reshape(-1, k.shape[-2], k.shape[-1]).max(axis=(0, 2))
    a = np.asarray(act_absmax, np.float64)
    if a.shape != w.shape:
        raise ConfigError(f"{a.shape[0]} activation channels for a kernel with {w.shape[0]} inputs")
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s


def smooth_params(params: dict, act_absmax: dict[str, np.ndarray], alpha: float) -> dict:
    """``params`` with the layers of ``act_absmax`` smoothed (scaled kernel + ``input_smooth``).

    The layers must hold float kernels; smoothing twice is refused.
    """
    from jaxquant.quant.rules import _copy_dicts, _split_name

    params = _copy_dicts(params)
    for name, amax in act_absmax.items():
        node = params
        for p in _split_name(params, name):
            node = node[p]
        if "input_smooth" in node:
            raise ConfigError(f"layer {name!r} is already smoothed")
        kernel = node["kernel"]
        if not isinstance(kernel, (np.ndarray, jax.Array)):
            raise ConfigError(f"layer {name!r} holds a {type(kernel).__name__}: smooth the float model, then quantize")
        s = smoothing_factors(amax, np.asarray(kernel), alpha)
        shape = (1,) * (np.ndim(kernel) - 2) + (-1, 1)
        node["kernel"] = jnp.asarray(np.asarray(kernel, np.float64) * s.reshape(shape), kernel.dtype)
        node["input_smooth"] = ChannelSmooth(jnp.asarray(1.0 / s, jnp.float32))
    return params


def smooth_model(model, calib, alpha: float = 0.5, rules=None, progress: bool = True):
    """The smoothed float model (see the module docstring).

    Args:
      model: a :class:`jaxquant.Model` with float parameters.
      calib: a calibration of ``model`` (its recorded inputs are rerun for the ranges).
      alpha: migration strength in ``[0, 1]`` (SmoothQuant's default 0.5).
      rules: which layers are smoothed: those the rules would quantize (default rules:
        all but the first and last layer, which stay float and unquantized).
    """
    import jaxquant
    from jaxquant.quant.rules import default_rules, layer_kernels, resolve
    from jaxquant.quant.uniform import WeightQuantConfig

    plan = resolve(layer_kernels(model.params), rules if rules is not None else default_rules(WeightQuantConfig(8)))
    layers = [n for n, c in plan.items() if c is not None]
    amax = channel_absmax(model, calib, layers, progress=progress)
    return jaxquant.Model(model.meta, smooth_params(model.params, amax, alpha))
