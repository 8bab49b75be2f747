"""Quantizing a whole model: weights by rules, activations from a calibration.

:func:`quantize_uniform` is the W{b}A{a} baseline of the diffusion PTQ literature
(Q-Diffusion's setting without block reconstruction): per-output-channel uniform
weights with MSE-optimal clipping, per-tensor activations with a range per timestep
group chosen on the calibration sub-sample (MSE-optimal or a percentile), split ranges
for concatenated skip inputs, and the attention softmax at a higher bit width. The
first and last layer stay float unless the rules say otherwise.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from jaxquant.errors import ConfigError
from jaxquant.quant.activation import ActQuant, mse_range, percentile_range, range_to_scale_zero
from jaxquant.quant.rules import Rule, _copy_dicts, _split_name, apply_plan, default_rules, layer_kernels, resolve
from jaxquant.quant.uniform import WeightQuantConfig, quantize_weight


@dataclasses.dataclass(frozen=True)
class ActQuantConfig:
    """How activation ranges are chosen.

    Attributes:
      bits: 4..8 (``None``: activations stay float).
      method: "mse" (clipping ratio minimising the squared error on the calibration
        sub-sample), "percentile" (of the sub-sample), or "minmax" (the full range of
        every value the calibration saw: no clipping on the calibration trajectories).
      percentile: for "percentile", the upper percentile (the lower is ``100 - p``).
      softmax_bits: bit width of the attention probabilities (kept higher than ``bits``).
      attention_matmuls: also quantize q, k, v and the softmax output (the matmul operands).
      split: separate ranges for the two parts of concatenated skip inputs.
      site_bits: per-site exceptions, ``((pattern, bits), ...)``: the first regular
        expression that matches the whole name of a quantizer (``LAYER.input_quant``, or
        ``ATTENTION.q_quant`` / ``k_quant`` / ``v_quant`` / ``probs_quant``) gives it
        ``bits`` (4..16) instead of ``bits`` (or ``softmax_bits``). For keeping a few
        sensitive inputs wider, as the first and last layer are kept float; a model built
        so is no longer A``bits`` everywhere, and its manifest says which sites differ.
        Above 8 bits such a quantizer takes the full range the calibration saw ("minmax"):
        its rounding error is then negligible and clipping would be all its error.
    """

    bits: int | None = 8
    method: str = "mse"
    percentile: float = 99.99
    softmax_bits: int = 16
    attention_matmuls: bool = True
    split: bool = True
    site_bits: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.bits is not None and not 4 <= self.bits <= 8:
            raise ConfigError(f"activation bits must be 4..8 (or None for float), got {self.bits}")
        if not 4 <= self.softmax_bits <= 16:
            raise ConfigError(f"softmax_bits must be 4..16, got {self.softmax_bits}")
        if self.method not in ("mse", "percentile", "minmax"):
            raise ConfigError(f"activation calibration method must be 'mse', 'percentile' or 'minmax', got {self.method!r}")
        object.__setattr__(self, "site_bits", tuple((str(p), int(b)) for p, b in self.site_bits))
        for pattern, bits in self.site_bits:
            if not 4 <= bits <= 16:
                raise ConfigError(f"site bits must be 4..16, got {bits} for {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"site pattern {pattern!r} is not a regular expression: {e}") from None

    def site_override(self, quantizer: str) -> int | None:
        """The bits ``site_bits`` gives the quantizer named ``quantizer`` (the first pattern
        matching the whole name), ``None`` where no pattern matches."""
        return next((b for p, b in self.site_bits if re.fullmatch(p, quantizer)), None)

    def at_site(self, quantizer: str, default: int) -> tuple[int, ActQuantConfig]:
        """``(bits, config)`` of the quantizer named ``quantizer``: ``default`` bits and this
        config, or its ``site_bits`` exception (with "minmax" ranges above 8 bits)."""
        bits = self.site_override(quantizer)
        if bits is None:
            return default, self
        return bits, self.at_bits(bits)

    def at_bits(self, bits: int) -> ActQuantConfig:
        """The config a quantizer of ``bits`` calibrates with: this one up to 8 bits, with
        "minmax" ranges above (where rounding error is negligible and a clipped range on
        the calibration sub-sample would be all the error). Used by ``site_bits`` and by
        rate–distortion candidates above 8 bits."""
        return dataclasses.replace(self, method="minmax") if bits > 8 else self


def act_quantizer(samples: np.ndarray, bits: int, cfg: ActQuantConfig, split: int = 0,
                  extremes: tuple[np.ndarray, np.ndarray] | None = None) -> ActQuant:
    """An :class:`ActQuant` from a site's calibration sub-sample ``[G, P, R]``; the
    "minmax" method needs the site's ``extremes`` (``lo``, ``hi``, each ``[G, P]``)."""
    g, p, _ = samples.shape
    scale = np.zeros((g, p), np.float32)
    zero = np.zeros((g, p), np.float32)
    if cfg.method == "minmax" and (extremes is None or np.shape(extremes[0]) != (g, p)):
        raise ConfigError(f"minmax activation ranges need the site's extremes of shape {(g, p)}")
    for i in range(g):
        for j in range(p):
            if cfg.method == "minmax":
                lo, hi = float(extremes[0][i, j]), float(extremes[1][i, j])
            elif cfg.method == "mse":
                lo, hi = mse_range(samples[i, j], bits)
            else:
                lo, hi = percentile_range(samples[i, j], cfg.percentile)
            scale[i, j], zero[i, j] = range_to_scale_zero(lo, hi, bits)
    if p == 2 and not split:
        raise ConfigError("a two-part calibration needs the split position")
    return ActQuant(scale, zero, bits, split if p == 2 else 0)


def quantize_uniform(
    model,
    calib,
    weights: WeightQuantConfig | None,
    acts: ActQuantConfig | None = None,
    rules: Sequence[Rule] | None = None,
    progress: bool = True,
) -> dict:
    """Return the quantized parameter tree of ``model`` (see the module docstring).

    Args:
      model: a :class:`jaxquant.Model` with float parameters.
      calib: a :class:`jaxquant.calib.Calibration` of the same model (needed when
        activations are quantized).
      weights: the weight quantizer for layers the rules do not override.
      acts: activation settings; ``None`` or ``bits=None`` keeps activations float.
      rules: (regex → WeightQuantConfig | None) rules; default: first/last layer float.
    """
    rules = list(rules) if rules is not None else default_rules(weights)
    kernels = layer_kernels(model.params)
    plan = resolve(kernels, rules)
    bar = (lambda it: tqdm(it, desc="quantize weights", unit="layer")) if progress else None
    xtx = weight_statistics(calib, plan)
    params = apply_plan(model.params, plan, lambda name, k, c: quantize_weight(k, c, xtx.get(name)), progress=bar)
    return attach_act_quantizers(model, calib, params, plan, acts)


def weight_statistics(calib, plan: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{layer: XᵀX}`` for the planned layers whose quantizer uses error feedback
    (:attr:`WeightQuantConfig.error_feedback`); raises if the calibration lacks them."""
    need = [n for n, c in plan.items() if getattr(c, "error_feedback", False)]
    if not need:
        return {}
    if calib is None or not calib.xtx:
        raise ConfigError("error feedback (GPTQ) needs a calibration with XᵀX statistics "
                          "(jaxquant calibrate without --no-xtx)")
    missing = [n for n in need if n not in calib.xtx]
    if missing:
        raise ConfigError(f"the calibration has no XᵀX of layers {missing[:5]}: was it made with this model?")
    return {n: calib.xtx[n] for n in need}


def attach_act_quantizers(model, calib, params: dict, plan: dict[str, Any], acts: ActQuantConfig | None) -> dict:
    """Add activation quantizers to a weight-quantized parameter tree.

    Every layer whose ``plan`` entry is not ``None`` (a quantized layer) gets an
    ``input_quant`` beside its kernel, with ranges per timestep group from ``calib``
    (split ranges for concatenated inputs when ``acts.split``). With
    ``acts.attention_matmuls`` the q, k, v and softmax operands of an attention whose
    projections are all quantized get ``{q,k,v,probs}_quant`` (softmax at
    ``max(bits, softmax_bits)``); ``acts.site_bits`` overrides the bits of the quantizers it
    names. Shared by every whole-model quantizer (uniform, AQ).

    Args:
      model: the :class:`jaxquant.Model` the tree belongs to (conv geometry, split inputs).
      calib: a :class:`jaxquant.calib.Calibration` of the float model.
      params: the parameter tree (not modified; a copy is returned).
      plan: ``{layer name: config or None}`` for every weight layer.
      acts: activation settings; ``None`` or ``bits=None`` returns ``params`` unchanged.
    """
    from jaxquant.models.introspect import conv_layers

    if acts is None or acts.bits is None:
        return params
    if calib is None:
        raise ConfigError("activation quantization needs a calibration (jaxquant calibrate)")
    params = _copy_dicts(params)
    splits = {n: c.input_split for n, c in conv_layers(model).items()} if acts.split else {}

    def node_of(name):
        node = params
        for p in _split_name(params, name):
            node = node[p]
        return node

    quantized = [n for n, c in plan.items() if c is not None]
    named: list[str] = []  # every quantizer attached, for the check of acts.site_bits
    for name in quantized:
        samples = _site_samples(calib, name)
        merge = samples.shape[1] == 2 and not acts.split
        if merge:
            samples = samples.reshape(samples.shape[0], 1, -1)
        named.append(f"{name}.input_quant")
        bits, cfg = acts.at_site(named[-1], acts.bits)
        node_of(name)["input_quant"] = act_quantizer(samples, bits, cfg, splits.get(name, 0),
                                                     site_extremes(calib, name, merge))
    if acts.attention_matmuls:
        for site in calib.sites:
            base, _, leaf = site.rpartition(".")
            if leaf not in ("q", "k", "v", "probs") or not _projections_quantized(base, plan):
                continue
            named.append(f"{base}.{leaf}_quant")
            bits, cfg = acts.at_site(named[-1], max(acts.bits, acts.softmax_bits) if leaf == "probs" else acts.bits)
            node_of(base)[f"{leaf}_quant"] = act_quantizer(_site_samples(calib, site), bits, cfg,
                                                           extremes=site_extremes(calib, site, False))
    for pattern, _ in acts.site_bits:
        if not any(re.fullmatch(pattern, n) for n in named):
            raise ConfigError(f"site pattern {pattern!r} matches none of the model's {len(named)} activation "
                              f"quantizers (names like {named[0]!r}; the whole name must match)" if named else
                              f"site pattern {pattern!r}: the model has no activation quantizers")
    return params


def site_extremes(calib, site: str, merge_parts: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` ``[G, P]`` of a site over the calibration (``P = 1`` when the two parts of
    a split input share one range)."""
    lo, hi = np.asarray(calib.lo[site]), np.asarray(calib.hi[site])
    if merge_parts:
        lo, hi = lo.min(axis=1, keepdims=True), hi.max(axis=1, keepdims=True)
    return lo, hi


def _site_samples(calib, site: str) -> np.ndarray:
    try:
        return np.asarray(calib.samples[site])
    except KeyError:
        raise ConfigError(f"the calibration has no record of layer {site!r}: was it made with this model?") from None


def _projections_quantized(attn: str, plan: dict) -> bool:
    """Quantize an attention's matmul operands only if its projections are quantized."""
    own = [c for n, c in plan.items() if n.startswith(attn + ".")]
    return bool(own) and all(c is not None for c in own)
