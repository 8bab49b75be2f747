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

One ``α`` for the whole model is a compromise: a layer whose input has a few wide
channels wants a large ``α``, one whose kernel rows are already uneven a small one (the
per-output-channel weight quantizer pays for every range moved into a row).
:func:`search_alphas` chooses per layer, among "not smoothed" and ``α`` on a grid, the
candidate with the smallest error of the layer's own output when both its input (at the
target activation bits, ranges per timestep group chosen as the calibration chooses
them) and its kernel (the target weight quantizer) are quantized::

    e(α) = ‖x W − Q_a(x / s_α) · Q_w(diag(s_α) W)‖² / ‖x W‖²

on inputs recorded from the calibration's trajectories (``jaxquant smooth --alpha auto``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.errors import ConfigError

if TYPE_CHECKING:
    import jaxquant


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
    """Whether ``x`` is a channel-smoothing leaf (for ``is_leaf`` in tree maps)."""
    return isinstance(x, ChannelSmooth)


def channel_absmax(model, calib, layers: Sequence[str], batch_size: int = 32, progress: bool = True) -> dict[str, np.ndarray]:
    """``{layer: max |x_j| per input channel}`` over the calibration's inputs and steps.

    The float model is run on every recorded input ``x_t`` of ``calib`` (all steps, all
    trajectories, with their labels and the calibration's guidance scale) and the inputs
    of ``layers`` are reduced to one maximum per channel.
    """
    from jaxquant.calib.calibration import _model_fns, trajectory_labels
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
    labels = trajectory_labels(calib)
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


def _alpha_of(alpha: float | Mapping[str, float | None], name: str) -> float | None:
    if isinstance(alpha, Mapping):
        if name not in alpha:
            raise ConfigError(f"no smoothing alpha for layer {name!r}")
        return alpha[name]
    return alpha


def scale_kernel_inputs(kernel, factors: np.ndarray) -> jax.Array:
    """``kernel`` (dense ``[in, out]`` or conv ``HWIO``) with its input row ``j`` multiplied by
    ``factors[j]`` (in float64, cast back to the kernel's dtype)."""
    shape = (1,) * (np.ndim(kernel) - 2) + (-1, 1)
    return jnp.asarray(np.asarray(kernel, np.float64) * np.asarray(factors, np.float64).reshape(shape),
                       np.asarray(kernel).dtype)


def smooth_params(params: dict, act_absmax: dict[str, np.ndarray], alpha: float | Mapping[str, float | None]) -> dict:
    """``params`` with the layers of ``act_absmax`` smoothed (scaled kernel + ``input_smooth``).

    ``alpha`` is one strength for every layer, or one per layer (``None``: the layer is
    left as it is). The layers must hold float kernels; smoothing twice is refused.
    """
    from jaxquant.quant.rules import _copy_dicts, _split_name

    params = _copy_dicts(params)
    for name, amax in act_absmax.items():
        a = _alpha_of(alpha, name)
        if a is None:
            continue
        node = params
        for p in _split_name(params, name):
            node = node[p]
        if "input_smooth" in node:
            raise ConfigError(f"layer {name!r} is already smoothed")
        kernel = node["kernel"]
        if not isinstance(kernel, (np.ndarray, jax.Array)):
            raise ConfigError(f"layer {name!r} holds a {type(kernel).__name__}: smooth the float model, then quantize")
        s = smoothing_factors(amax, np.asarray(kernel), a)
        node["kernel"] = scale_kernel_inputs(kernel, s)
        node["input_smooth"] = ChannelSmooth(jnp.asarray(1.0 / s, jnp.float32))
    return params


#: What ``layers=`` of :func:`smoothed_layers` accepts.
LAYER_SETS = ("all", "full-resolution")


def smoothed_layers(model, rules=None, layers: str = "all") -> list[str]:
    """The layers smoothing applies to: those the rules would quantize (default rules:
    all but the first and last layer, which stay float and unquantized); with
    ``layers="full-resolution"`` only those of them whose input is at the network's full
    resolution (:func:`jaxquant.models.introspect.full_resolution_layers`), where the
    8-bit activations of ``ddpm-fmnist`` lose most (BENCHMARKS.md)."""
    from jaxquant.quant.rules import default_rules, layer_kernels, resolve
    from jaxquant.quant.uniform import WeightQuantConfig

    if layers not in LAYER_SETS:
        raise ConfigError(f"smoothing layers must be one of {LAYER_SETS}, got {layers!r}")
    plan = resolve(layer_kernels(model.params), rules if rules is not None else default_rules(WeightQuantConfig(8)))
    names = [n for n, c in plan.items() if c is not None]
    if layers == "full-resolution":
        from jaxquant.models.introspect import full_resolution_layers

        full = set(full_resolution_layers(model))
        names = [n for n in names if n in full]
    return names


def smooth_model(model, calib, alpha: float | Mapping[str, float | None] = 0.5, rules=None, progress: bool = True,
                 act_absmax: dict[str, np.ndarray] | None = None, layers: str = "all") -> jaxquant.Model:
    """The smoothed float model (see the module docstring).

    Args:
      model: a :class:`jaxquant.Model` with float parameters.
      calib: a calibration of ``model`` (its recorded inputs are rerun for the ranges).
      alpha: migration strength in ``[0, 1]`` (SmoothQuant's default 0.5), or one per
        layer (``None``: not smoothed), e.g. the choices of :func:`search_alphas`.
      rules: which layers are smoothed (see :func:`smoothed_layers`).
      layers: "all" the rules' layers, or only the "full-resolution" ones.
      act_absmax: the layers' per-channel input maxima when already computed
        (:func:`channel_absmax`); else they are.
    """
    import jaxquant

    names = smoothed_layers(model, rules, layers)
    amax = act_absmax if act_absmax is not None else channel_absmax(model, calib, names, progress=progress)
    missing = [n for n in names if n not in amax]
    if missing:
        raise ConfigError(f"no channel ranges for layers {missing[:5]}")
    return jaxquant.Model(model.meta, smooth_params(model.params, {n: amax[n] for n in names}, alpha))


DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclasses.dataclass(frozen=True)
class AlphaSearchConfig:
    """What :func:`search_alphas` scores against.

    Attributes:
      weight: the weight quantizer of the target (uniform; for AQ or mixed precision the
        uniform quantizer at the average bits stands in).
      act: the activation quantizer of the target (bits and range method); ranges per
        timestep group.
      groups: timestep groups of the target's activation quantizers.
      alphas: the strengths tried (besides leaving the layer unsmoothed).
      num_inputs: calibration inputs the layers are scored on, spread over the steps.
      reservoir: values per group (and part) the ranges are chosen from, as calibration
        keeps them.
      memory_limit_mb: bound on the recorded layer inputs held at once (layers are
        taken in chunks, one forward pass per chunk and step).
      seed: picks the inputs and the values for the ranges.
      criterion: "layer": the error of the layer's own output (:func:`score_alphas`);
        "model": the error of the model's output (the noise prediction) with only that
        layer smoothed and quantized, everything else float, on the same inputs (one
        forward pass per candidate and step; what the seed's per-layer distortion
        measures, so where the layer's error goes downstream counts).
    """

    weight: Any  # WeightQuantConfig
    act: Any  # ActQuantConfig
    groups: int = 1
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    num_inputs: int = 64
    reservoir: int = 4096
    memory_limit_mb: int = 2048
    seed: int = 0
    criterion: str = "layer"

    def __post_init__(self):
        if self.criterion not in ("layer", "model"):
            raise ConfigError(f"smoothing criterion must be 'layer' or 'model', got {self.criterion!r}")
        if self.act is None or getattr(self.act, "bits", None) is None:
            raise ConfigError("choosing smoothing per layer needs activation bits (the error it trades)")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigError(f"smoothing alphas must be in [0, 1], got {self.alphas}")
        if self.groups < 1 or self.num_inputs < 1 or self.reservoir < 16:
            raise ConfigError("groups and num_inputs must be >= 1, reservoir >= 16")


@dataclasses.dataclass(frozen=True)
class LayerAlpha:
    """One layer's choice: ``alpha`` (``None``: not smoothed) and the relative output
    error of every candidate (``errors[None]`` is the unsmoothed layer's)."""

    alpha: float | None
    errors: dict[float | None, float]

    @property
    def gain(self) -> float:
        """Unsmoothed error over the chosen candidate's (1: smoothing does not help)."""
        best = self.errors[self.alpha]
        return self.errors[None] / best if best > 0 else float("inf")


def _record_inputs(model, calib, layers: Sequence[str], rows: list[tuple[int, np.ndarray]]) -> dict[str, np.ndarray]:
    """``{layer: its inputs}`` for the calibration inputs ``rows`` (step, sample indices),
    concatenated in that order (under guidance each step's batch is doubled, as the
    quantized model sees it)."""
    from jaxquant.calib.calibration import _model_fns, trajectory_labels
    from jaxquant import xla

    _, capture = _model_fns(model, calib.config.cfg_scale)
    wanted = list(layers)

    @xla.jit
    def step(params, x, t, y):
        acts = capture(params, x, t, y)
        return {n: acts[n].astype(jnp.float32) for n in wanted}

    labels = trajectory_labels(calib)
    got: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    for s, idx in rows:
        x = jnp.asarray(calib.inputs[s, idx])
        out = step(model.params, x, jnp.full((len(idx),), int(calib.timesteps[s]), jnp.int32),
                   jnp.asarray(labels[idx], jnp.int32))
        for n in wanted:
            got[n].append(np.asarray(out[n]))
    return {n: np.concatenate(v) for n, v in got.items()}


def _layer_fn(info):
    """The float layer ``x -> x W`` (dense) or its convolution (``info``: ConvInfo)."""
    from jaxquant.quant import dispatch

    if info is None:
        return jax.jit(lambda x, w: dispatch.dense(x, w))
    return jax.jit(lambda x, w: dispatch.conv2d(x, w, strides=info.strides, padding=info.padding))


class _LayerCandidates:
    """The quantized forms of one layer under every smoothing candidate: factors ``s``,
    the activation quantizer of ``x / s`` (ranges per timestep group from the recorded
    inputs, as calibration chooses them) and the quantized kernel ``Q_w(diag(s) W)``."""

    def __init__(self, x: np.ndarray, row_groups: np.ndarray, kernel: np.ndarray, act_absmax: np.ndarray,
                 cfg: AlphaSearchConfig, split: int = 0):
        self.x, self.row_groups, self.kernel, self.act_absmax = x, row_groups, kernel, act_absmax
        self.cfg, self.split = cfg, split
        self.parts = [slice(0, split), slice(split, None)] if split else [slice(None)]
        self.present = sorted(set(int(g) for g in row_groups))
        # The same value positions for every candidate, so candidates differ only in s.
        rng = np.random.default_rng(cfg.seed)
        self.picks = {}
        for g in self.present:
            n = int((row_groups == g).sum()) * int(np.prod(x.shape[1:-1]))
            for j, part in enumerate(self.parts):
                self.picks[g, j] = rng.integers(0, n * x[:1, ..., part].shape[-1], cfg.reservoir)

    def factors(self, alpha: float | None) -> np.ndarray:
        if alpha is None:
            return np.ones(self.kernel.shape[-2])
        return smoothing_factors(self.act_absmax, self.kernel, alpha)

    def act_quant(self, s: np.ndarray, xs: np.ndarray | None = None):
        """The :class:`ActQuant` of the smoothed input ``x / s`` (one range per group)."""
        from jaxquant.quant.quantize import act_quantizer

        cfg, parts = self.cfg, self.parts
        if xs is None:
            xs = self.x * (1.0 / s).astype(np.float32)
        samples = np.zeros((cfg.groups, len(parts), cfg.reservoir), np.float32)
        lo = np.zeros((cfg.groups, len(parts)), np.float32)
        hi = np.zeros((cfg.groups, len(parts)), np.float32)
        for g in self.present:
            xg = xs[self.row_groups == g]
            for j, part in enumerate(parts):
                v = xg[..., part].ravel()
                samples[g, j], lo[g, j], hi[g, j] = v[self.picks[g, j]], v.min(), v.max()
        return act_quantizer(samples, int(cfg.act.bits), cfg.act, self.split, extremes=(lo, hi))

    def weight(self, s: np.ndarray):
        """``Q_w(diag(s) W)`` (a :class:`UniformWeight`)."""
        from jaxquant.quant.uniform import quantize_weight

        shape = (1,) * (self.kernel.ndim - 2) + (-1, 1)
        return quantize_weight(self.kernel * s.reshape(shape).astype(np.float32), self.cfg.weight)


def _choice(errors: dict[float | None, float]) -> LayerAlpha:
    # ties: no smoothing first, then the smaller strength
    return LayerAlpha(min(errors, key=lambda a: (errors[a], -1.0 if a is None else a)), errors)


def score_alphas(x: np.ndarray, row_groups: np.ndarray, kernel: np.ndarray, act_absmax: np.ndarray,
                 cfg: AlphaSearchConfig, info=None, split: int = 0) -> LayerAlpha:
    """Every candidate's relative error of the layer's own output (criterion "layer", see
    the module docstring).

    Args:
      x: the layer's recorded (unsmoothed) inputs, ``[n, ..., C]``.
      row_groups: timestep group of each input row, ``[n]``.
      kernel: the float kernel (``[C, out]`` dense, HWIO conv).
      act_absmax: ``max |x_j|`` per input channel over the calibration (the factors' input).
      cfg: target quantizers and candidates.
      info: the conv geometry (:class:`jaxquant.models.introspect.ConvInfo`), ``None`` for dense.
      split: first channel of the second part of a concatenated input (0: none), which
        the activation quantizer gives its own range.
    """
    layer = _layer_fn(info)
    kernel = np.asarray(kernel, np.float32)
    cands = _LayerCandidates(x, row_groups, kernel, act_absmax, cfg, split)
    ref = layer(jnp.asarray(x), jnp.asarray(kernel))
    ref_energy = float(jnp.sum(jnp.square(ref)))
    errors: dict[float | None, float] = {}
    for alpha in (None, *cfg.alphas):
        s = cands.factors(alpha)
        xs = x * (1.0 / s).astype(np.float32)
        quant = cands.act_quant(s, xs)
        xq = np.empty_like(xs)
        for g in cands.present:
            m = row_groups == g
            xq[m] = np.asarray(quant.select(g)(jnp.asarray(xs[m])))
        out = layer(jnp.asarray(xq), cands.weight(s).dequantize())
        errors[alpha] = float(jnp.sum(jnp.square(out - ref))) / max(ref_energy, 1e-30)
    return _choice(errors)


class _ModelScore:
    """Criterion "model": the relative error of the model's output on the chosen
    calibration inputs with one layer replaced by a candidate's smoothed, quantized form."""

    def __init__(self, model, calib, rows: list[tuple[int, np.ndarray]]):
        from jaxquant import xla
        from jaxquant.calib.calibration import _model_fns, trajectory_labels
        from jaxquant.quant.activation import at_timesteps

        self.model = model
        eps_fn, _ = _model_fns(model, calib.config.cfg_scale)
        T = model.schedule.num_train_timesteps
        self.fwd = xla.jit(lambda p, x, t, y: eps_fn(at_timesteps(p, t, T), x, t, y))
        labels = trajectory_labels(calib)
        # one call per step: a call's activation ranges are those of its first timestep's group
        self.batches = [(jnp.asarray(calib.inputs[s, idx]), jnp.full((len(idx),), int(calib.timesteps[s]), jnp.int32),
                         jnp.asarray(labels[idx], jnp.int32)) for s, idx in rows]
        self.refs = [self.fwd(model.params, *b) for b in self.batches]
        self.ref_energy = sum(float(jnp.sum(jnp.square(r))) for r in self.refs)

    def __call__(self, name: str, cands: _LayerCandidates) -> LayerAlpha:
        from jaxquant.quant.rules import _copy_dicts, _split_name

        errors: dict[float | None, float] = {}
        for alpha in (None, *cands.cfg.alphas):
            s = cands.factors(alpha)
            params = _copy_dicts(self.model.params)
            node = params
            for part in _split_name(params, name):
                node = node[part]
            node["kernel"] = cands.weight(s)
            node["input_smooth"] = ChannelSmooth(jnp.asarray(1.0 / s, jnp.float32))
            node["input_quant"] = cands.act_quant(s)
            err = sum(float(jnp.sum(jnp.square(self.fwd(params, *b) - r))) for b, r in zip(self.batches, self.refs))
            errors[alpha] = err / max(self.ref_energy, 1e-30)
        return _choice(errors)


def search_alphas(model, calib, cfg: AlphaSearchConfig, rules=None, act_absmax: dict[str, np.ndarray] | None = None,
                  progress: bool = True, layers: str = "all") -> dict[str, LayerAlpha]:
    """Per layer, the smoothing strength (or none) with the smallest error under the
    target quantizers: of the layer's own output (``cfg.criterion == "layer"``,
    :func:`score_alphas`) or of the model's output with that layer alone smoothed and
    quantized ("model"), on ``cfg.num_inputs`` inputs recorded from the calibration's
    trajectories, spread over its steps (at most all of them).

    ``act_absmax`` are the factors' channel maxima over the whole calibration, as
    :func:`smooth_model` uses them (computed when not given). Returns ``{layer:
    LayerAlpha}``; ``smooth_model(model, calib, {n: c.alpha for n, c in ...})`` applies it.
    ``layers`` restricts the search as it restricts :func:`smoothed_layers`.
    """
    from jaxquant.calib.calibration import _model_fns
    from jaxquant.models.introspect import conv_layers
    from jaxquant.quant.activation import timestep_group

    layers = smoothed_layers(model, rules, layers)
    if not layers:
        return {}
    if act_absmax is None:
        act_absmax = channel_absmax(model, calib, layers, progress=progress)
    S, N = calib.inputs.shape[:2]
    per_step = min(N, max(1, math.ceil(cfg.num_inputs / S)))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(N)
    # Step s takes the next per_step trajectories in a shuffled order, so the rows cover
    # many trajectories and every step.
    rows = [(s, np.sort(order[(s * per_step + np.arange(per_step)) % N])) for s in range(S)]
    T = model.schedule.num_train_timesteps
    step_group = np.asarray(timestep_group(jnp.asarray(calib.timesteps), cfg.groups, T))
    # Under guidance the recorded batch is doubled: (unconditional, conditional) halves.
    _, capture = _model_fns(model, calib.config.cfg_scale)
    probe = jax.eval_shape(capture, model.params, jnp.zeros((per_step, *model.sample_shape), jnp.float32),
                           jnp.zeros((per_step,), jnp.int32), jnp.zeros((per_step,), jnp.int32))
    row_groups = np.concatenate([np.full(probe[layers[0]].shape[0], step_group[s]) for s, _ in rows])
    convs = conv_layers(model)
    kernels = layer_kernels_of(model.params, layers)
    # Layers in chunks whose recorded inputs fit the memory bound.
    nbytes = {n: 4 * S * int(np.prod(probe[n].shape)) for n in layers}
    limit = cfg.memory_limit_mb * 2 ** 20
    chunks, cur, size = [], [], 0
    for n in layers:
        if cur and size + nbytes[n] > limit:
            chunks.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes[n]
    chunks.append(cur)
    model_score = _ModelScore(model, calib, rows) if cfg.criterion == "model" else None
    out: dict[str, LayerAlpha] = {}
    bar = tqdm(total=len(layers), desc=f"smoothing alpha per layer ({cfg.criterion} error)", unit="layer",
               disable=not progress)
    for chunk in chunks:
        inputs = _record_inputs(model, calib, chunk, rows)
        for n in chunk:
            info = convs.get(n)
            split = info.input_split if info is not None and getattr(cfg.act, "split", True) else 0
            if model_score is None:
                out[n] = score_alphas(inputs[n], row_groups, kernels[n], act_absmax[n], cfg, info, split)
            else:
                cands = _LayerCandidates(inputs[n], row_groups, kernels[n], act_absmax[n], cfg, split)
                out[n] = model_score(n, cands)
            bar.set_postfix_str(f"{n}: {out[n].alpha} (x{out[n].gain:.2f})")
            bar.update(1)
        del inputs
    bar.close()
    return out


def layer_kernels_of(params: dict, layers: Sequence[str]) -> dict[str, np.ndarray]:
    """The float kernels of ``layers``; a layer that holds a quantized weight is refused."""
    from jaxquant.quant.rules import layer_kernels

    found = layer_kernels(params)
    out = {}
    for n in layers:
        k = found[n]
        if not isinstance(k, (np.ndarray, jax.Array)):
            raise ConfigError(f"layer {n!r} holds a {type(k).__name__}: choose smoothing on the float model")
        out[n] = np.asarray(k, np.float32)
    return out
