"""Empirical bias correction of a quantized model, one correction per timestep group.

Quantization error has a systematic part: averaged over inputs, a quantized layer's
output is off by a vector per output channel, ``E[ΔW·x]`` for the weights and the mean of
clipping and rounding for the activations (Nagel et al. 2019, "Data-free quantization
through weight equalization and bias correction"). In a diffusion model that offset is
made again at every sampling step, in the same direction, so it accumulates along the
trajectory where zero-mean error partly averages out. The offset depends on the input
distribution, which moves with the timestep, so it is estimated per timestep group,
like the activation ranges.

For each dense and convolution layer ``l`` the model calls, and each timestep group
``g``::

    δ_l,g = E[y_l(float model)] − E[y_l(quantized model, layers before l corrected)]

where ``E`` is the mean over the calibration's inputs ``x_t`` at group ``g``'s steps and
over all output positions, per output channel. The quantized model is run once per
chunk of inputs, with a method interceptor that corrects each layer's output as it is
produced, so a layer's correction also removes the mean error that reaches it from
earlier layers (the sequential form of the empirical correction, in the network's
execution order). Chunks of a group are averaged, weighted by their inputs.

The corrections are stored as a :class:`BiasCorrection` leaf ``bias_correction`` beside
the layer's ``kernel`` (float16 ``[G, out]``, counted by the accounting; each is applied
as stored while the later layers are corrected) and added to
the layer's bias at run time (:mod:`jaxquant.models.layers`); like the activation
quantizers they are narrowed to the call's timestep group by
:func:`jaxquant.quant.activation.at_timesteps`. Layers whose correction is zero (their
input and weights are the float model's, e.g. the first layer) store none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.errors import ConfigError
from jaxquant.quant.activation import at_timesteps, register_grouped, timestep_group

#: Leaf name of a layer's correction in the parameter tree.
LEAF = "bias_correction"
#: How corrections are stored.
STORAGE_DTYPE = jnp.float16


@flax.struct.dataclass
class BiasCorrection:
    """Per-timestep-group offsets added to a layer's output (its bias).

    Attributes:
      delta: ``[G, out]`` (:data:`STORAGE_DTYPE`), one row per timestep group.
    """

    delta: jax.Array

    num_weights = 0  # extra parameters, not weights (accounting)

    @property
    def num_groups(self) -> int:
        return int(self.delta.shape[0])

    def describe(self) -> str:
        return f"bias correction x{int(self.delta.shape[1])} x{self.num_groups} groups"

    def select(self, g: jax.Array | int) -> "BiasCorrection":
        """The correction of timestep group ``g`` (a one-group BiasCorrection); traceable."""
        return BiasCorrection(jax.lax.dynamic_slice_in_dim(self.delta, jnp.asarray(g, jnp.int32), 1, axis=0))

    def corrected(self, bias: jax.Array | None) -> jax.Array:
        """``bias + delta`` of the selected group (``delta`` alone for a layer without bias)."""
        if self.num_groups != 1:
            raise ConfigError(
                f"this bias correction holds {self.num_groups} timestep groups; select one per call with "
                "jaxquant.quant.activation.at_timestep_group(params, group)")
        d = self.delta[0].astype(jnp.float32)
        return d if bias is None else (jnp.asarray(bias, jnp.float32) + d).astype(jnp.asarray(bias).dtype)


register_grouped(BiasCorrection)


def is_bias_correction(x: Any) -> bool:
    """Whether ``x`` is a bias-correction leaf (for ``is_leaf`` in tree maps)."""
    return isinstance(x, BiasCorrection)


def validate_bias_correction(c: BiasCorrection) -> None:
    """Raise ``ValueError`` unless a loaded correction holds one row per timestep group (``[G, out]``)."""
    if np.asarray(c.delta).ndim != 2:
        raise ValueError(f"bias correction delta must be [G, out], got shape {np.shape(c.delta)}")


@dataclasses.dataclass(frozen=True)
class BiasCorrectionConfig:
    """Settings of :func:`bias_correct`.

    Attributes:
      num_samples: calibration trajectories used at every step (the first ones).
      groups: timestep groups of the corrections (default: the calibration's).
      chunk_rows: inputs per forward pass (a group's inputs are split into chunks of at
        most this many; chunks are corrected separately and averaged).
    """

    num_samples: int = 64
    groups: int | None = None
    chunk_rows: int = 256

    def __post_init__(self):
        if self.num_samples < 1 or self.chunk_rows < 1:
            raise ConfigError("num_samples and chunk_rows must be at least 1")
        if self.groups is not None and self.groups < 1:
            raise ConfigError(f"groups must be at least 1, got {self.groups}")


@dataclasses.dataclass
class BiasCorrectionResult:
    """What :func:`bias_correct` did.

    Attributes:
      params: the quantized parameter tree with ``bias_correction`` leaves.
      deltas: ``{layer: [G, out] float32}`` corrections (as stored, rounded to :data:`STORAGE_DTYPE`), of
        every layer the model calls, including those not stored (zero).
      rel_offset: ``{layer: [G]}`` size of each correction relative to the float layer's
        output: ``‖δ‖ / rms(y_float)`` over channels.
      error_before / error_after: ``[G]`` relative output error of the whole model
        ``Σ‖ε_q − ε‖² / Σ‖ε‖²`` on the inputs used, without and with the corrections.
      bias_before / bias_after: ``[G]`` the part of that error that is the mean offset
        (per output channel, over inputs and positions), relative to ``Σ‖ε‖²``.
      stored: the layers given a ``bias_correction`` leaf (the others' corrections are zero).
      groups, rows: timestep groups and inputs per group used.
    """

    params: dict
    deltas: dict[str, np.ndarray]
    rel_offset: dict[str, np.ndarray]
    error_before: np.ndarray
    error_after: np.ndarray
    bias_before: np.ndarray
    bias_after: np.ndarray
    stored: set[str]
    groups: int
    rows: list[int]

    def summary(self) -> str:
        lines = [f"{'group':>5}  {'inputs':>6}  {'error before':>12}  {'after':>10}  "
                 f"{'mean offset before':>18}  {'after':>10}"]
        for g in range(self.groups):
            lines.append(f"{g:>5}  {self.rows[g]:>6}  {self.error_before[g]:12.3e}  {self.error_after[g]:10.3e}  "
                         f"{self.bias_before[g]:18.3e}  {self.bias_after[g]:10.3e}")
        lines.append(f"{len(self.stored)} layers corrected, {len(self.deltas) - len(self.stored)} with a zero "
                     "correction not stored")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"groups": self.groups, "rows": self.rows,
                "error_before": self.error_before.tolist(), "error_after": self.error_after.tolist(),
                "bias_before": self.bias_before.tolist(), "bias_after": self.bias_after.tolist(),
                "layers": {n: {"rel_offset": self.rel_offset[n].tolist(), "stored": n in self.stored}
                           for n in self.deltas}}


def without_corrections(tree: Any) -> Any:
    """The parameter tree without its :class:`BiasCorrection` leaves."""
    if isinstance(tree, dict):
        return {k: without_corrections(v) for k, v in tree.items() if not is_bias_correction(v)}
    return tree


def _interceptor(means: dict, targets: dict | None):
    """A flax method interceptor recording each Dense/Conv output's per-channel mean into
    ``means``; with ``targets`` it instead shifts the output to the target mean and
    records the shift."""
    from jaxquant.models.layers import Conv, Dense

    def intercept(next_fn, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, (Dense, Conv)):
            return next_fn(*args, **kwargs)
        name = ".".join(mod.scope.path)
        if name in means:
            raise ConfigError(f"layer {name} is called more than once per forward pass; bias correction "
                              "needs one call per layer")
        y = next_fn(*args, **kwargs)
        m = jnp.mean(y.astype(jnp.float32).reshape(-1, y.shape[-1]), axis=0)
        if targets is None:
            means[name] = m
            return y
        # applied as it will be stored, so later layers correct for the rounding too
        d = (targets[name] - m).astype(STORAGE_DTYPE).astype(jnp.float32)
        means[name] = d
        return (y.astype(jnp.float32) + d).astype(y.dtype)

    return intercept


def _forward_fns(model, cfg_scale: float):
    """Jitted ``(layer means, corrective pass, output)`` functions of ``model``'s module."""
    from jaxquant import xla
    from jaxquant.calib.calibration import _model_fns

    eps_fn, _ = _model_fns(model, cfg_scale)
    T = model.schedule.num_train_timesteps

    def narrowed(params, t):
        return at_timesteps(params, t, T)

    @xla.jit
    def layer_means(params, x, t, y):
        means: dict = {}
        with nn.intercept_methods(_interceptor(means, None)):
            eps_fn(narrowed(params, t), x, t, y)
        return means

    @xla.jit
    def correct(params, x, t, y, targets):
        shifts: dict = {}
        with nn.intercept_methods(_interceptor(shifts, targets)):
            eps_fn(narrowed(params, t), x, t, y)
        return shifts

    @xla.jit
    def output(params, x, t, y):
        return eps_fn(narrowed(params, t), x, t, y)

    return layer_means, correct, output


def _group_rows(calib, groups: int, num_samples: int, T: int, chunk_rows: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per group, chunks of ``(step indices, sample indices)`` rows (one timestep group per chunk)."""
    N = min(num_samples, calib.inputs.shape[1])
    step_group = np.asarray(timestep_group(jnp.asarray(calib.timesteps), groups, T))
    out = []
    for g in range(groups):
        steps = np.flatnonzero(step_group == g)
        rows = [(s, i) for s in steps for i in range(N)]
        out.append([(np.array([r[0] for r in rows[a:a + chunk_rows]]), np.array([r[1] for r in rows[a:a + chunk_rows]]))
                    for a in range(0, len(rows), chunk_rows)])
    return out


def bias_correct(qmodel, float_model, calib, cfg: BiasCorrectionConfig = BiasCorrectionConfig(),
                 progress: bool = True) -> BiasCorrectionResult:
    """Per-timestep-group empirical bias correction of ``qmodel`` (see the module docstring).

    Args:
      qmodel: the quantized :class:`jaxquant.Model` (any method: uniform, AQ, RD).
        Corrections it already holds are replaced.
      float_model: the float model it was quantized from (for a smoothed model, the
        smoothed float model: the layer outputs must correspond).
      calib: a calibration of the float model; its recorded inputs ``x_t`` (the first
        ``cfg.num_samples`` trajectories at every step) are the inputs.
      cfg: see :class:`BiasCorrectionConfig`.
      progress: show a progress bar over the chunks.

    Returns:
      a :class:`BiasCorrectionResult`; its ``params`` are ``qmodel``'s with the corrections.
    """
    from jaxquant.calib.calibration import trajectory_labels
    from jaxquant.quant.rules import _copy_dicts, _split_name

    if qmodel.meta.architecture != float_model.meta.architecture:
        raise ConfigError("the quantized and the float model have different architectures")
    if calib.inputs.shape[2:] != tuple(float_model.sample_shape):
        raise ConfigError(f"calibration inputs {calib.inputs.shape[2:]} do not fit the model's samples "
                          f"{tuple(float_model.sample_shape)}: is the calibration of this model?")
    T = qmodel.schedule.num_train_timesteps
    G = cfg.groups or calib.config.groups
    chunks = _group_rows(calib, G, cfg.num_samples, T, cfg.chunk_rows)
    if any(not c for c in chunks):
        empty = [g for g, c in enumerate(chunks) if not c]
        raise ConfigError(f"timestep groups {empty} have no calibration step; use fewer groups")
    labels = trajectory_labels(calib)
    qparams = without_corrections(qmodel.params)
    layer_means, correct, output = _forward_fns(qmodel, calib.config.cfg_scale)  # one architecture, either params

    sums: dict[str, np.ndarray] = {}
    fsq: dict[str, np.ndarray] = {}
    rows = [0] * G
    n_chunks = sum(len(c) for c in chunks)
    bar = tqdm(total=n_chunks, desc="bias correction", unit="chunk", disable=not progress)
    batches: list[tuple[int, tuple]] = []
    for g, group_chunks in enumerate(chunks):
        for steps, idx in group_chunks:
            batch = (jnp.asarray(calib.inputs[steps, idx]), jnp.asarray(calib.timesteps[steps], jnp.int32),
                     jnp.asarray(labels[idx], jnp.int32))
            targets = layer_means(float_model.params, *batch)
            shifts = correct(qparams, *batch, targets)
            n = len(idx)
            for name, d in shifts.items():
                d = np.asarray(d, np.float64)
                if name not in sums:
                    sums[name] = np.zeros((G, d.shape[0]))
                    fsq[name] = np.zeros((G,))
                sums[name][g] += n * d
                fsq[name][g] += n * float(np.mean(np.square(np.asarray(targets[name], np.float64))))
            rows[g] += n
            batches.append((g, batch))
            bar.update(1)
    bar.close()
    if not sums:
        raise ConfigError("the model calls no Dense or Conv layer")
    deltas = {n: (s / np.asarray(rows, np.float64)[:, None]).astype(np.float32) for n, s in sums.items()}
    rel = {n: np.sqrt(np.mean(np.square(d), axis=1)) / np.maximum(np.sqrt(fsq[n] / np.asarray(rows)), 1e-30)
           for n, d in deltas.items()}

    params = _copy_dicts(qparams)
    stored = {n for n in deltas if float(np.max(rel[n])) >= 1e-6}  # else input and weights as in the float model
    for name in stored:
        node = params
        for p in _split_name(params, name):
            node = node[p]
        node[LEAF] = BiasCorrection(jnp.asarray(deltas[name], STORAGE_DTYPE))

    # the whole model's output error on the same inputs, without and with the corrections
    err = np.zeros((2, G))
    energy = np.zeros((G,))
    positions = np.zeros((G,))  # output vectors per group
    osum = np.zeros((2, G, calib.inputs.shape[-1]))  # per-channel sum of the error (ε has x_t's shape)
    for g, batch in batches:
        ref = np.asarray(output(float_model.params, *batch), np.float64)
        energy[g] += float(np.sum(np.square(ref)))
        positions[g] += ref.size // ref.shape[-1]
        for k, p in enumerate((qparams, params)):
            diff = np.asarray(output(p, *batch), np.float64) - ref
            err[k, g] += float(np.sum(np.square(diff)))
            osum[k, g] += diff.reshape(-1, diff.shape[-1]).sum(0)
    off = np.sum(np.square(osum), axis=-1) / positions  # Σ over positions of ‖mean‖²
    energy = np.maximum(energy, 1e-30)
    return BiasCorrectionResult(params, deltas, rel, err[0] / energy, err[1] / energy, off[0] / energy,
                                off[1] / energy, stored, G, rows)
