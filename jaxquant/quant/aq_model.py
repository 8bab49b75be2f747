"""Additive quantization of a whole diffusion UNet (AQUATIC-Diff's W4A8 / W2A8 flow).

Three stages, each a function of its own:

1. **Plan** (:func:`plan_aq_configs`): an AQ configuration ``M×B g`` (``M`` codebooks of
   ``2**B`` entries, groups of ``g`` weights) per layer so that the *stored* bits of all
   AQ layers — codes, float16 codebooks and float16 scales, exactly as
   :func:`~jaxquant.quant.accounting.storage_report` counts them — average at most
   ``target_bits`` per weight they replace. A codebook costs ``M·2**B·g·16`` bits
   whatever the layer's size, so small layers cannot afford the configurations big ones
   use; the planner trades bits between layers (see *The planning rule* below).
   :func:`preset_plan` instead gives every layer the paper's configuration (``"W2"``:
   2×8, ``"W4"``: 4×8; ``g = 9``, one 3×3 kernel per vector, for 3×3 convolutions and
   ``g = 8`` otherwise), which averages 1.95 / 3.88 bits on LDM-4 ImageNet
   (``benchmarks/aq_bits_cin256.py``).

2. **Quantize** (:func:`quantize_aq`): every planned layer by
   :func:`~jaxquant.quant.additive.quantize_kernel` on its calibration ``XᵀX``, outside
   the blocks first (time/class embeddings), then block by block (below). Each finished
   layer (and each fine-tuned block) is written to a progress directory at once, so a
   killed run resumes where it stopped and gives the same parameters as an
   uninterrupted one.

3. **Block fine-tuning** (:func:`finetune_block`, ``finetune_steps > 0``): after all layers
   of a block are quantized, Adam tunes the block's codebooks, scales and remaining float
   parameters (norms, biases, float kernels) — codes frozen — so that the block's outputs
   match the float block's outputs on the calibration inputs ``(x_t, t, y)``. *Blocks*
   are the UNet's top-level stages: ``down_blocks.i``, ``mid_block``, ``up_blocks.i``
   (diffusers) and ``input_blocks.i``, ``middle_block``, ``output_blocks.i`` (CompVis).
   A block's *outputs* are the outputs of its top-level sub-modules (each resnet,
   attention, down/up-sampler: the hidden states it hands on, skip connections
   included); the error is ``mean_over_outputs ‖out_q - out_f‖² / ‖out_f‖²``. The block is
   run *inside the whole network*: its inputs (hidden state, skip connections, time
   embedding, cross-attention context) are produced by the network with the earlier
   blocks already quantized (as AQLM propagates quantized inputs), the target is the
   float block on those same inputs, and everything after the block is dead code that
   XLA does not compute. Codebooks and scales are tuned in float32 and stored back as
   float16; the tuned block is kept only if its error on a fixed evaluation subset of
   the calibration pairs is lower than before. Optional code updates in the manner of
   PV-tuning (``code_update_every``, a per-update ``code_budget``; off by default) move
   a budgeted fraction of the codes along the loss gradient between Adam steps.

Activations (``acts``) are quantized afterwards, with ranges from the float model's
calibration, by the same :func:`~jaxquant.quant.quantize.attach_act_quantizers` the
uniform quantizer uses. The first and last layers stay float by default
(:func:`~jaxquant.quant.rules.default_rules`).

**The planning rule.** A configuration's quality is scored by a distortion proxy, in dB
of the relative objective ``tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ)``::

    proxy_dB = -(4.7·r + 0.29·B + 0.83·c)

with ``r = M·B/g`` code bits per weight and ``c = 16·M·2**B·g / N`` codebook bits per
weight of the layer (``N`` weights). It is a least-squares fit (largest residual 0.93 dB)
to what :func:`~jaxquant.quant.additive.quantize_matrix` (beam 4, 4 rounds) reaches on a
256×576 Gaussian weight with a correlated ``XᵀX``, for 17 configurations::

    r = 2: 1x4 g2 -16.2  2x4 g4 -15.7  3x4 g6 -15.4  4x4 g8 -15.2  8x4 g16 -15.0
           2x6 g6 -16.1  1x8 g4 -16.8  2x8 g8 -16.9  3x8 g12 -17.8  4x8 g16 -18.8
           6x8 g24 -21.0  8x8 g32 -22.1 dB
    r = 1.5: 1x6 g4 -14.0;   r = 1: 1x4 g4 -11.4  2x4 g8 -11.1  1x8 g8 -11.7  2x8 g16 -12.4 dB

A code bit per weight is worth about 4.7 dB, a bit of codebook per weight 0.83 dB (large
codebooks help by fitting the layer, at a price the budget counts), and at equal rate
codes of more bits (larger codebooks, fewer of them) are better by 0.29 dB per bit: 8-bit
codes where the bits permit. Weights without structure cannot show an advantage of
kernel-aligned groups; the paper's configurations are :func:`preset_plan`. A layer's cost
is ``s · 10^(proxy_dB/10)`` with *sensitivity* planning (the default of
:func:`quantize_aq`), where ``s`` is the measured output distortion of the whole model
per unit of the layer's relative error (:func:`jaxquant.search.rd.weight_sensitivity`; on
``ddpm-fmnist`` ``s/N`` spans five orders of magnitude, the small full-resolution layers
being the most sensitive), or ``N · 10^(proxy_dB/10)`` with *count* planning (all
weights count alike; the default of :func:`plan_aq_configs` when no ``layer_weights`` are
given). The planner minimises ``Σ s·d`` (or ``Σ N·d``)
subject to the bit budget by the equal-slope (Lagrangian) rule: starting from each
layer's cheapest configuration it takes the upgrades on the layers' lower convex hulls in
order of distortion saved per bit, while they fit, then spends what is left on any
upgrade that still fits. :func:`quantize_aq` plans no layer below one code bit per weight
(``min_code_bits``, :data:`DEFAULT_MIN_CODE_BITS`): below it the proxy is extrapolated
and the sensitivities, measured at the errors of 2-4-bit uniform weights, no longer hold;
on ddpm-fmnist at W2A8 the floor took FID from 16.7 to 12.2 at the same size.

**Measured planning** (``planning="measured"``, ``jaxquant quantize --aq-planning
measured``). The Gaussian proxy misleads in two ways on real layers. (1) At 2 code bits per
weight and more, one codebook of scalars or pairs (``1xB g1``, ``1xB g2``) beats several
codebooks of 4-vectors by 2-10 dB at equal stored bits (ddpm-fmnist,
``down_blocks.0.resnets.0.conv1``: ``8x4 g4`` at 8.9 bits -43.9 dB, ``1x7 g1`` at 7.3 bits
-46.6 dB), and :func:`default_candidates` offers neither. (2) Layers differ by more than
10 dB in how small an error a configuration reaches on them (the structure of their weights
and of their inputs' ``XᵀX``), and the proxy scores them alike. Measured planning takes
:func:`wide_candidates`, the proxy :data:`LAYER_PROXY_DB` fitted on 7 ddpm-fmnist layers
(with one intercept per layer; its new term charges 1.16 dB per codebook beyond the first),
and adds each layer's own intercept, measured by one AQ run of the layer at
:data:`OFFSET_PROBE` (:func:`measure_layer_offsets`, about a second per layer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant import xla
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.io.model_dir import params_digest
from jaxquant.quant import serialize
from jaxquant.quant.activation import at_timestep_group, has_grouped, is_grouped, timestep_group
from jaxquant.quant.additive import aq_bits_per_weight, aq_stored_bits, quantize_kernel, relative_error
from jaxquant.quant.rules import Rule, _copy_dicts, _split_name, default_rules, layer_kernels, resolve

#: How :func:`quantize_aq` weighs each layer's error when planning (see its docstring).
LAYER_WEIGHTINGS = ("count", "sensitivity")

#: ``M`` (codebooks of 2**8 entries) of AQUATIC-Diff's configurations.
PRESETS: dict[str, int] = {"W2": 2, "W4": 4}

#: :func:`quantize_aq`'s floor on each planned layer's code bits per weight (``min_code_bits``):
#: on ddpm-fmnist at W2A8 it took FID from 16.71 to 12.25 at the same size (BENCHMARKS.md).
DEFAULT_MIN_CODE_BITS = 1.0

#: Coefficients of the planning proxy: dB per code bit per weight, per bit of ``B``, per
#: codebook bit per weight (see the module docstring).
PROXY_DB_PER_CODE_BIT, PROXY_DB_PER_NBIT, PROXY_DB_PER_CODEBOOK_BIT = 4.7, 0.29, 0.83

#: How :func:`quantize_aq` plans (see *Measured planning* in the module docstring).
PLANNINGS = ("gaussian", "measured")

#: The proxy of ``"measured"`` planning, ``(dB per code bit, per bit of B, per codebook bit,
#: per codebook beyond the first)``: a least-squares fit, with one intercept per layer, to
#: what :func:`~jaxquant.quant.additive.quantize_kernel` (beam 8, default rounds) reaches on
#: 7 ddpm-fmnist layers (4 096 to 294 912 weights, calibration ``XᵀX``) in 34
#: configurations from ``1x2 g1`` to ``8x4 g4`` (rms residual 1.19 dB, largest 4.9 dB).
LAYER_PROXY_DB = (4.96, 0.22, 0.83, -1.16)

#: The configuration :func:`measure_layer_offsets` quantizes each layer with: it fits every
#: layer (``g = 1``) and is among the quickest to encode.
OFFSET_PROBE = (1, 2, 1)


@dataclasses.dataclass(frozen=True, order=True)
class AQConfig:
    """AQ configuration of one layer: ``M`` codebooks of ``2**B`` codewords of ``g`` weights.

    Kernel-aware grouping follows from the shape (:func:`~jaxquant.quant.additive.quantize_kernel`:
    on for a ``kh×kw`` convolution when ``g`` is a multiple of ``kh·kw``).
    """

    num_codebooks: int
    nbits: int
    group_size: int

    def describe(self) -> str:
        return f"{self.num_codebooks}x{self.nbits} g{self.group_size}"

    @property
    def code_bits(self) -> float:
        """Code bits per weight ``M·B/g`` (without codebooks and scales)."""
        return self.num_codebooks * self.nbits / self.group_size

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Whether ``g`` divides the weights per output channel of a kernel of ``shape``."""
        return int(np.prod(shape[:-1])) % self.group_size == 0

    def stored_bits(self, shape: tuple[int, ...]) -> int:
        """Exact stored bits of a kernel of ``shape`` in this configuration."""
        return aq_stored_bits(shape, self.num_codebooks, self.nbits, self.group_size)

    @classmethod
    def parse(cls, text: str) -> "AQConfig":
        """``"2x8 g9"`` → ``AQConfig(2, 8, 9)``."""
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*g\s*(\d+)\s*", text)
        if m is None:
            raise ConfigError(f"AQ config {text!r}: expected 'MxB gG', e.g. '2x8 g9'")
        return cls(*(int(v) for v in m.groups()))


def _shape(kernel: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in (kernel.shape if hasattr(kernel, "shape") else kernel))


def _kernel_taps(shape: tuple[int, ...]) -> int:
    """``kh·kw`` of a conv kernel with a spatial window, else 1."""
    return shape[0] * shape[1] if len(shape) == 4 else 1


# --------------------------------------------------------------------------- presets


def preset_config(shape: tuple[int, ...], preset: str) -> AQConfig:
    """AQUATIC-Diff's configuration of a layer: ``M×8`` with ``M`` from :data:`PRESETS`,
    ``g = kh·kw`` (kernel-aware grouping) for convolutions with a spatial window, else ``g = 8``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown AQ preset {preset!r} (available: {', '.join(PRESETS)})")
    shape = _shape(shape)
    taps = _kernel_taps(shape)
    cfg = AQConfig(PRESETS[preset], 8, taps if taps > 1 else 8)
    if not cfg.fits(shape):
        raise ConfigError(f"preset {preset} ({cfg.describe()}) does not fit a kernel of shape {shape}: "
                          f"{int(np.prod(shape[:-1]))} weights per output channel are not a multiple of "
                          f"{cfg.group_size}; keep the layer float with a rule")
    return cfg


def preset_plan(kernels: dict[str, Any], preset: str) -> dict[str, AQConfig]:
    """:func:`preset_config` for every layer of ``{name: kernel or shape}``."""
    return {n: preset_config(_shape(k), preset) for n, k in kernels.items()}


# --------------------------------------------------------------------------- planning


def default_candidates(shape: tuple[int, ...]) -> list[AQConfig]:
    """The configurations :func:`plan_aq_configs` chooses from by default.

    ``M`` 1..8 codebooks of ``2**B``, ``B`` 2..8 (one byte per code at most), and
    ``g`` ∈ {4, 8, 16}, plus ``kh·kw`` and ``2·kh·kw`` for convolutions with a spatial
    window (kernel-aware grouping); only ``g`` dividing the weights per output channel.
    """
    shape = _shape(shape)
    taps = _kernel_taps(shape)
    groups = {4, 8, 16} | ({taps, 2 * taps} if taps > 1 else set())
    return [AQConfig(m, b, g) for m in range(1, 9) for b in range(2, 9) for g in sorted(groups)
            if AQConfig(m, b, g).fits(shape)]


def wide_candidates(shape: tuple[int, ...]) -> list[AQConfig]:
    """:func:`default_candidates` plus groups of ``g`` ∈ {1, 2} weights (at most 16 code bits
    per weight): the candidates of ``"measured"`` planning. At 2 code bits per weight and
    more, ``1xB g1`` and ``1xB g2`` reach 2-10 dB lower errors than the ``g ≥ 4``
    configurations of the same stored bits on ddpm-fmnist's layers (BENCHMARKS.md)."""
    shape = _shape(shape)
    small = [AQConfig(m, b, g) for m in range(1, 9) for b in range(2, 9) for g in (1, 2)
             if m * b / g <= 16 and AQConfig(m, b, g).fits(shape)]
    return small + default_candidates(shape)


def proxy_distortion(cfg: AQConfig, shape: tuple[int, ...], coefficients: Sequence[float] | None = None,
                     offset_db: float = 0.0) -> float:
    """The planning proxy per weight of a layer of ``shape``, ``10^(proxy_dB/10)`` (see the
    module docstring). ``coefficients``: ``(per code bit, per bit of B, per codebook bit[,
    per codebook beyond the first])`` in dB (default: the Gaussian fit, ``PROXY_DB_*``;
    :data:`LAYER_PROXY_DB` for measured planning); ``offset_db`` is added (the layer's
    measured offset, :func:`measure_layer_offsets`)."""
    a, b, c, *rest = (PROXY_DB_PER_CODE_BIT, PROXY_DB_PER_NBIT, PROXY_DB_PER_CODEBOOK_BIT) \
        if coefficients is None else coefficients
    n = int(np.prod(shape))
    codebook_bits = 16.0 * cfg.num_codebooks * 2 ** cfg.nbits * cfg.group_size / n
    db = -(a * cfg.code_bits + b * cfg.nbits + c * codebook_bits
           + (rest[0] * (cfg.num_codebooks - 1) if rest else 0.0)) + offset_db
    return 10.0 ** (db / 10.0)


def measure_layer_offsets(kernels: dict[str, Any], xtx: dict[str, Any], *, key: Any = 0, beam_size: int = 8,
                          coefficients: Sequence[float] = LAYER_PROXY_DB, progress: bool = True) -> dict[str, float]:
    """Each layer's measured offset from the proxy, in dB: the relative objective that
    :func:`~jaxquant.quant.additive.quantize_kernel` reaches at :data:`OFFSET_PROBE` on the
    layer's own weights and ``XᵀX``, minus the proxy's value there. Layers differ by more
    than 10 dB (how much of a layer's weight the inputs' covariance lets AQ leave out);
    the Gaussian proxy treats them alike. ``{layer: offset_db}``."""
    key = _as_key(key)
    probe = AQConfig(*OFFSET_PROBE)
    out = {}
    for n in tqdm(list(kernels), desc="AQ layer offsets", unit="layer", disable=not progress):
        shape = _shape(kernels[n])
        w, _ = quantize_kernel(kernels[n], xtx[n], probe.num_codebooks, probe.nbits, probe.group_size,
                               key=_named_key(key, n), beam_size=beam_size)
        measured = 10.0 * np.log10(max(relative_error(w, kernels[n], xtx[n]), 1e-30))
        out[n] = float(measured - 10.0 * np.log10(proxy_distortion(probe, shape, coefficients)))
        xla.release_compiled_if_crowded()
    return out


def _pareto_points(shape: tuple[int, ...], cands: Iterable[AQConfig],
                   weight: float | None = None, coefficients: Sequence[float] | None = None,
                   offset_db: float = 0.0) -> list[tuple[int, float, AQConfig]]:
    """``(bits, w·d, config)`` sorted by bits, keeping only those that lower the distortion;
    ``w`` is the layer's weight in the objective (default ``N``, its number of weights).
    Ties (same bits and distortion) go to larger ``B``, larger ``g``, fewer ``M``."""
    w = float(np.prod(shape)) if weight is None else float(weight)
    pts = sorted({(c.stored_bits(shape), w * proxy_distortion(c, shape, coefficients, offset_db), c)
                  for c in cands},
                 key=lambda p: (p[0], p[1], -p[2].nbits, -p[2].group_size, p[2].num_codebooks))
    out: list[tuple[int, float, AQConfig]] = []
    for p in pts:
        if not out or p[1] < out[-1][1]:
            out.append(p)
    return out


def _lower_hull(points: list[tuple[int, float, AQConfig]]) -> list[tuple[int, float, AQConfig]]:
    """Lower convex hull of Pareto points (bits increasing, distortion decreasing)."""
    hull: list[tuple[int, float, AQConfig]] = []
    for p in points:
        while len(hull) >= 2:
            (b0, d0, _), (b1, d1, _) = hull[-2], hull[-1]
            if (b1 - b0) * (p[1] - d0) - (d1 - d0) * (p[0] - b0) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def plan_aq_configs(
    kernels: dict[str, Any],
    target_bits: float,
    candidates: Sequence[AQConfig] | Callable[[tuple[int, ...]], Sequence[AQConfig]] | None = None,
    *,
    fixed: dict[str, AQConfig] | None = None,
    layer_weights: dict[str, float] | None = None,
    min_code_bits: float = 0.0,
    coefficients: Sequence[float] | None = None,
    layer_offsets: dict[str, float] | None = None,
) -> dict[str, AQConfig]:
    """Choose an AQ configuration per layer under an average bit budget.

    Args:
      kernels: ``{layer name: kernel or kernel shape}`` of the layers to quantize.
      target_bits: the most stored bits (codes + codebooks + scales) per weight, on average
        over all these layers (``fixed`` ones included).
      candidates: the configurations to choose from: a list (each layer uses those whose
        ``g`` divides its weights per output channel), a function ``shape -> list``, or
        ``None`` for :func:`default_candidates`.
      fixed: layers whose configuration is given; their bits count against the budget.
      layer_weights: ``{layer: w}``, the weight of each planned layer's relative error in
        the objective ``Σ w·d``. Default: its number of weights ``N`` (every weight counts
        alike). :func:`jaxquant.search.rd.weight_sensitivity` measures ``w`` as the model's
        output distortion per unit of the layer's relative error (``"sensitivity"``
        planning in :func:`quantize_aq`). A layer of weight 0 gets its cheapest candidate.
      min_code_bits: a floor on the planned layers' code bits per weight ``r = M·B/g``:
        candidates below it are dropped. The proxy is fitted on ``1 ≤ r ≤ 2`` and the
        sensitivities are measured at the errors of 2-4-bit uniform weights; a floor of 1
        keeps every layer where both were measured.
      coefficients: the proxy's dB coefficients (:func:`proxy_distortion`; default the
        Gaussian fit).
      layer_offsets: ``{layer: dB}`` added to each planned layer's proxy
        (:func:`measure_layer_offsets`); default 0 for all.

    Returns:
      ``{layer name: AQConfig}`` for every layer, in the order of ``kernels``; see the
      module docstring for the rule.

    Raises:
      ConfigError: a layer has no usable candidate, or even the cheapest choice of every
        layer exceeds the budget (the message gives the smallest achievable average).
    """
    shapes = {n: _shape(k) for n, k in kernels.items()}
    fixed = dict(fixed or {})
    for n, c in fixed.items():
        if n not in shapes:
            raise ConfigError(f"fixed AQ config for {n!r}, which is not among the layers to plan")
        if not c.fits(shapes[n]):
            raise ConfigError(f"AQ config {c.describe()} does not fit layer {n} of shape {shapes[n]}")
    total_weights = sum(int(np.prod(s)) for s in shapes.values())
    budget = float(target_bits) * total_weights - sum(c.stored_bits(shapes[n]) for n, c in fixed.items())

    if not (np.isfinite(min_code_bits) and min_code_bits >= 0):
        raise ConfigError(f"min_code_bits must be a finite number >= 0, got {min_code_bits!r}")
    if layer_weights is not None:
        missing = [n for n in shapes if n not in fixed and n not in layer_weights]
        if missing:
            raise ConfigError(f"layer_weights has no weight for layer(s) {', '.join(missing[:5])}")
        bad = [n for n in shapes if n not in fixed and not (np.isfinite(layer_weights[n]) and layer_weights[n] >= 0)]
        if bad:
            raise ConfigError(f"layer weights must be finite and >= 0; {bad[0]!r} has {layer_weights[bad[0]]!r}")

    points, hulls = {}, {}
    for n, s in shapes.items():
        if n in fixed:
            continue
        if candidates is None:
            cands = default_candidates(s)
        elif callable(candidates):
            cands = list(candidates(s))
        else:
            cands = [c for c in candidates if c.fits(s)]
        if not cands:
            raise ConfigError(f"no AQ candidate configuration fits layer {n} (shape {s}, "
                              f"{int(np.prod(s[:-1]))} weights per output channel); keep it float with a rule")
        cands = [c for c in cands if c.code_bits >= min_code_bits]
        if not cands:
            raise ConfigError(f"no AQ candidate configuration of layer {n} has {min_code_bits:g} code bits per "
                              "weight or more; lower min_code_bits or widen the candidates")
        if layer_offsets is not None and not np.isfinite(layer_offsets.get(n, np.nan)):
            raise ConfigError(f"layer_offsets has no finite offset for layer {n!r}")
        points[n] = _pareto_points(s, cands, None if layer_weights is None else layer_weights[n],
                                   coefficients, 0.0 if layer_offsets is None else layer_offsets[n])
        hulls[n] = _lower_hull(points[n])

    choice = {n: h[0] for n, h in hulls.items()}
    used = sum(p[0] for p in choice.values())
    if used > budget:
        cheapest = (used + sum(c.stored_bits(shapes[n]) for n, c in fixed.items())) / max(total_weights, 1)
        floor = f" with at least {min_code_bits:g} code bits per weight" if min_code_bits else ""
        raise ConfigError(f"AQ bit budget {target_bits:g} bits/weight is infeasible for these layers: the cheapest "
                          f"configurations{floor} already need {cheapest:.3f} bits/weight (codebooks and scales "
                          "cost bits whatever the layer size); raise the target, lower the floor or keep small "
                          "layers float")

    # Equal-slope greedy along each layer's lower convex hull.
    import heapq

    def push(heap, n, i):
        h = hulls[n]
        if i + 1 < len(h):
            slope = (h[i + 1][1] - h[i][1]) / (h[i + 1][0] - h[i][0])  # distortion per bit, < 0
            heapq.heappush(heap, (slope, n, i))

    pos = {n: 0 for n in hulls}
    heap: list = []
    for n in hulls:
        push(heap, n, 0)
    while heap:
        _, n, i = heapq.heappop(heap)
        step = hulls[n][i + 1][0] - hulls[n][i][0]
        if used + step <= budget:
            used += step
            pos[n] = i + 1
            choice[n] = hulls[n][i + 1]
            push(heap, n, i + 1)
    # Spend what is left on the single upgrade that saves most distortion, while one fits.
    for _ in range(4 * len(points) + 1):
        best = None
        for n, pts in points.items():
            cb, cd, _ = choice[n]
            for p in pts:
                if p[1] < cd and used + p[0] - cb <= budget:
                    gain = cd - p[1]
                    if best is None or gain > best[0]:
                        best = (gain, n, p)
        if best is None:
            break
        _, n, p = best
        used += p[0] - choice[n][0]
        choice[n] = p
    return {n: fixed[n] if n in fixed else choice[n][2] for n in shapes}


def plan_bits(kernels: dict[str, Any], plan: dict[str, AQConfig], ideal: bool = False) -> float:
    """Average stored bits per weight of ``plan`` over its layers (``ideal``: AQLM's formula,
    codes not rounded to words)."""
    bits = weights = 0.0
    for n, c in plan.items():
        s = _shape(kernels[n])
        n_w = int(np.prod(s))
        weights += n_w
        bits += (aq_bits_per_weight(s[-1], n_w // s[-1], c.num_codebooks, c.nbits, c.group_size) * n_w if ideal
                 else c.stored_bits(s))
    return bits / max(weights, 1)


def plan_table(kernels: dict[str, Any], plan: dict[str, AQConfig]) -> str:
    """The chosen configuration per layer as a text table, with the average."""
    w = max([len(n) for n in plan] + [5])
    lines = [f"{'layer':<{w}}  {'shape':<18} {'weights':>10} {'config':<10} {'code b/w':>8} {'bits/w':>7}"]
    for n, c in plan.items():
        s = _shape(kernels[n])
        n_w = int(np.prod(s))
        lines.append(f"{n:<{w}}  {str(s):<18} {n_w:>10d} {c.describe():<10} {c.code_bits:>8.3f} "
                     f"{c.stored_bits(s) / n_w:>7.3f}")
    lines.append(f"{'average':<{w}}  {'':<18} {sum(int(np.prod(_shape(kernels[n]))) for n in plan):>10d} "
                 f"{'':<10} {'':>8} {plan_bits(kernels, plan):>7.3f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- blocks

_BLOCK_RE = re.compile(r"^((?:[A-Za-z_]\w*\.)*?)((?:down_blocks|up_blocks|input_blocks|output_blocks)\.\d+"
                       r"|mid_block|middle_block)(?:\.|$)")
_STAGE = {"down_blocks": 0, "input_blocks": 0, "mid_block": 1, "middle_block": 1, "up_blocks": 2, "output_blocks": 2}


def block_of(name: str) -> str | None:
    """The top-level UNet block a layer or module belongs to (``"down_blocks.1"``,
    ``"unet.middle_block"``), or ``None`` outside the blocks (embeddings, first/last layers)."""
    m = _BLOCK_RE.match(name)
    if m is None:
        return None
    block = m.group(1) + m.group(2)
    if block.endswith("input_blocks.0"):  # CompVis' first conv, not a block
        return None
    return block


def _block_order(block: str) -> tuple:
    tail = block.split(".")
    if tail[-1].isdigit():
        return (_STAGE[tail[-2]], int(tail[-1]), block)
    return (_STAGE[tail[-1]], 0, block)


#: The pseudo-block of :func:`finetune_block` that is the whole network: every top-level
#: module trains, and the loss is the error of the network's output (end-to-end tuning).
NETWORK = "network"


def block_units(params: dict, block: str) -> list[tuple[str, ...]]:
    """Parameter paths of a block's top-level sub-modules (its resnets, attentions,
    samplers), in tree order; module scopes have the same paths. For :data:`NETWORK`, every
    top-level entry of ``params``."""
    if block == NETWORK:
        return [(k,) for k in params]
    units: list[tuple[str, ...]] = []

    def visit(node: dict, path: tuple[str, ...]) -> None:
        for k, v in node.items():
            dotted = ".".join(path + (k,))
            if dotted.startswith(block + "."):
                units.append(path + (k,))
            elif block.startswith(dotted + ".") and isinstance(v, dict):
                visit(v, path + (k,))

    visit(params, ())
    if not units:
        raise ConfigError(f"block {block!r} not found in the parameter tree")
    return units


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _set_paths(tree: dict, values: dict[tuple[str, ...], Any]) -> dict:
    """Copy of ``tree`` (dicts along the paths only) with ``values`` set at their paths."""
    def put(node, path, value):
        node = dict(node)
        node[path[0]] = value if len(path) == 1 else put(node[path[0]], path[1:], value)
        return node

    for path, v in values.items():
        tree = put(tree, path, v)
    return tree


def _set_layer(params: dict, name: str, weight: Any) -> None:
    node = params
    for p in _split_name(params, name):
        node = node[p]
    node["kernel"] = weight


# --------------------------------------------------------------------------- block fine-tuning


def _calibration_pairs(model, calib) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """All calibration model inputs ``(x_t, t, y)`` flattened over steps and samples. With
    classifier-free guidance the model also saw the unconditional label: both are included."""
    s, n = calib.inputs.shape[:2]
    x = np.asarray(calib.inputs, np.float32).reshape(s * n, *calib.inputs.shape[2:])
    t = np.repeat(np.asarray(calib.timesteps, np.int32), n)
    y = None
    if model.is_class_conditional:
        if calib.labels is None:
            raise ConfigError("the calibration of a class-conditional model has no labels")
        y = np.tile(np.asarray(calib.labels, np.int32), s)
        null = getattr(model.network_config, "unconditional_label", None)
        if calib.config.cfg_scale != 1.0 and null is not None:
            x, t, y = np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([np.full_like(y, null), y])
    return x, t, y


def _loss_outputs(block: str, units: tuple) -> tuple:
    """Module paths whose outputs a block's loss compares: the block's units, or for
    :data:`NETWORK` the root module (the network's output)."""
    return ((),) if block == NETWORK else units


def _unit_outputs(module, units: tuple, params: dict, x, t, y, g=None) -> list:
    """Outputs of the modules at ``units`` in a forward pass (the network after them is
    dead code, which XLA drops); the path ``()`` is the root module, whose output is the
    network's. ``g``: the timestep group of the whole batch, to which per-group leaves
    (activation quantizers, …) are narrowed; ``None`` when there are none."""
    wanted = set(units)
    if g is not None:
        params = at_timestep_group(params, g)

    def select(mdl, method_name):
        return method_name == "__call__" and tuple(mdl.scope.path) in wanted

    _, state = module.apply({"params": params}, x, t, y, capture_intermediates=select, mutable=["intermediates"])
    return jax.tree_util.tree_leaves(state["intermediates"])


def _relative_errors(q: list, f: list, w: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per output, ``(Σ_i w_i ‖q_i − f_i‖², Σ_i ‖f_i‖²)`` over the batch's pairs ``i``
    (``w``: per-pair weights, default 1)."""
    def sq(a):
        return jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1)

    diff = [sq(a.astype(jnp.float32) - b.astype(jnp.float32)) for a, b in zip(q, f)]
    num = jnp.stack([jnp.sum(d) if w is None else jnp.sum(d * w) for d in diff])
    den = jnp.stack([jnp.sum(jnp.square(b.astype(jnp.float32))) for b in f])
    return num, den


def _mean_relative_error(q: list, f: list, w: jax.Array | None = None) -> jax.Array:
    """The block loss: mean over the block's outputs of ``Σ_i w_i ‖q_i - f_i‖² / Σ_i ‖f_i‖²``
    (sums over the batch's pairs; ``w`` the per-pair weights, default 1)."""
    num, den = _relative_errors(q, f, w)
    return jnp.mean(num / jnp.maximum(den, 1e-30))


def min_snr_weights(schedule, t: np.ndarray, gamma: float) -> np.ndarray:
    """Per-timestep loss weights ``min(SNR_t, γ) / SNR_t`` for an ε-prediction loss, with
    ``SNR_t = ᾱ_t / (1 − ᾱ_t)`` (Hang et al. 2023, "Min-SNR weighting"): 1 where the
    noise dominates, ``γ / SNR_t`` below it. An ε error at a nearly clean step moves the
    sample by ``√(1 − ᾱ_t)/√ᾱ_t`` times itself, so these steps (DDIM's last, ``t = 0``,
    whose ε the sampler scales by about 0.01) stop ruling a loss in which their relative
    ε errors are largest."""
    if not gamma > 0:
        raise ConfigError(f"the min-SNR gamma must be positive, got {gamma}")
    from jaxquant.diffusion.schedules import alphas_cumprod

    a = np.asarray(alphas_cumprod(schedule), np.float64)[np.asarray(t, np.int64)]
    snr = a / np.maximum(1.0 - a, 1e-30)
    return (np.minimum(snr, gamma) / snr).astype(np.float32)


# Module-level jitted functions with the (hashable) Flax module and unit paths static, so
# repeated runs (and resumed runs) reuse the compiled code.
@partial(xla.jit, static_argnames=("module", "units"))
def _unit_errors(module, units, params, ref_params, x, t, y, g=None, w=None):
    return _relative_errors(_unit_outputs(module, units, params, x, t, y, g),
                            _unit_outputs(module, units, ref_params, x, t, y, g), w)


def _assemble(units: tuple, treedef, train_idx: tuple, leaves: list, theta: list, base: dict) -> dict:
    ls = list(leaves)
    for i, v in zip(train_idx, theta):
        ls[i] = v
    return _set_paths(base, dict(zip(units, jax.tree_util.tree_unflatten(treedef, ls))))


@partial(xla.jit, static_argnames=("module", "units", "treedef", "train_idx", "lr", "outs"))
def _finetune_step(module, units, treedef, train_idx, lr, theta, opt_state, leaves, base, ref, x, t, y, g=None,
                   step_units=None, outs=None, w=None):
    """One Adam step on the trainable leaves of ``units``; the loss compares the outputs of
    the modules at ``outs`` (default: ``units``), pairs weighted by ``w`` (default 1)."""
    outs = units if outs is None else outs
    target = jax.lax.stop_gradient(_unit_outputs(module, outs, ref, x, t, y, g))

    def loss_fn(th):
        q = _unit_outputs(module, outs, _assemble(units, treedef, train_idx, leaves, th, base), x, t, y, g)
        return _mean_relative_error(q, target, w)

    loss, grads = jax.value_and_grad(loss_fn)(theta)
    return *_adam_update(lr, grads, opt_state, theta, step_units), loss


@partial(xla.jit, static_argnames=("module", "units", "paths"))
def _kernel_grads(module, units, paths, kernels, base, ref, x, t, y, g=None):
    """Minibatch block loss and its gradient with respect to dense kernels put at ``paths``."""
    target = jax.lax.stop_gradient(_unit_outputs(module, units, ref, x, t, y, g))

    def loss_fn(ks):
        q = _unit_outputs(module, units, _set_paths(base, dict(zip(paths, ks))), x, t, y, g)
        return _mean_relative_error(q, target)

    return jax.value_and_grad(loss_fn)(kernels)


# Code updates try every (step scale, budget fraction) pair and keep the best (see finetune_block).
CODE_STEP_SCALES = (1.0, 0.5, 0.25)
CODE_BUDGET_FRACTIONS = (1.0, 0.25, 0.0625, 0.015625)


def _code_step(model, block: str, tree: dict, float_params: dict, ref: dict, outs: tuple, budget: float,
               xtx: dict, batch: tuple, pairs, select: np.ndarray, batch_size: int, groups: np.ndarray | None = None,
               g: Any = None) -> tuple[dict | None, int]:
    """One PV-style code update of the block's AQ layers (see :func:`finetune_block`).

    The gradient comes from ``batch`` ``(x, t, y)``, the choice among candidates from the
    block error (the outputs of the modules at ``outs``) on the calibration ``pairs`` at
    indices ``select``. Returns the tree with
    new codes and the number of codes changed, or ``(None, 0)`` when no candidate lowers
    that error.
    """
    from jaxquant.quant.additive import AQWeight, greedy_code_update
    from jaxquant.quant.uniform import as_matrix

    names = [n for n, k in layer_kernels(tree).items()
             if (block == NETWORK or block_of(n) == block) and isinstance(k, AQWeight)]
    if not names:
        return None, 0
    paths = tuple(tuple(_split_name(tree, n)) + ("kernel",) for n in names)
    weights = [_get(tree, p) for p in paths]
    dense = [w.dequantize(jnp.float32) for w in weights]
    _, grads = _kernel_grads(model.module, outs, paths, dense, tree, ref, *batch, g)
    layers = []  # (path, weight, Ŵ, unit step D/κ, metric H)
    for name, p, w, wq, grad in zip(names, paths, weights, dense, grads):
        wq_m, g_m = as_matrix(wq), as_matrix(grad)
        k = wq_m.shape[1]
        h = jnp.asarray(xtx[name], jnp.float32) if name in xtx else jnp.eye(k, dtype=jnp.float32)
        h = h / jnp.maximum(jnp.mean(jnp.diag(h)), 1e-30) + 1e-2 * jnp.eye(k, dtype=jnp.float32)
        # Local model of the loss in this layer's weight: L(Ŵ + δ) ≈ L + <G, δ> + κ/2 tr(δ H δᵀ),
        # with κ fitted to G ≈ κ (Ŵ - W) H; its minimiser is Ŵ - G H⁻¹ / κ.
        eh = (wq_m - as_matrix(jnp.asarray(_get(float_params, p), jnp.float32))) @ h
        kappa = float(jnp.sum(g_m * eh) / jnp.maximum(jnp.sum(eh * eh), 1e-30))
        if kappa > 0:
            layers.append((p, w, wq_m, jnp.linalg.solve(h, g_m.T).T / kappa, h))
    best, best_changed = None, 0
    best_loss = _block_error(model, outs, tree, ref, pairs, select, batch_size, groups)
    for scale in CODE_STEP_SCALES:
        for frac in CODE_BUDGET_FRACTIONS:
            updates, changed = {}, 0
            for p, w, wq_m, step, h in layers:
                max_changes = int(frac * budget * w.out_features * w.num_groups * w.num_codebooks)
                updates[p], n = greedy_code_update(w, wq_m - scale * step, max_changes, xtx=h)
                changed += n
            if changed == 0:
                continue
            candidate = _set_paths(tree, updates)
            cand_loss = _block_error(model, outs, candidate, ref, pairs, select, batch_size, groups)
            if cand_loss < best_loss:
                best, best_loss, best_changed = candidate, cand_loss, changed
    return best, best_changed


def _eval_indices(total: int, num: int | None, seed: int) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(total)
    return np.sort(perm[: total if num is None else min(num, total)])


def _pair_groups(model, params: dict, pairs) -> np.ndarray | None:
    """Timestep group of each calibration pair when ``params`` holds per-group leaves
    (activation quantizers, bias corrections), else ``None``. A forward pass then takes
    pairs of one group only, narrowed to it (:func:`_unit_outputs`)."""
    if not has_grouped(params):
        return None
    counts = {int(a.num_groups) for a in jax.tree_util.tree_leaves(params, is_leaf=is_grouped) if is_grouped(a)}
    if len(counts) != 1:
        raise ConfigError(f"the per-timestep-group leaves disagree on the number of groups: {sorted(counts)}")
    (num,) = counts
    return np.asarray(timestep_group(jnp.asarray(pairs[1]), num, model.schedule.num_train_timesteps))


def _by_group(idx: np.ndarray, groups: np.ndarray | None):
    """``(g, indices)`` for each timestep group among ``idx`` (``(None, idx)`` without groups)."""
    if groups is None:
        yield None, idx
        return
    for g in np.unique(groups[idx]):
        yield jnp.asarray(g, jnp.int32), idx[groups[idx] == g]


def _block_error(model, units: tuple, params: dict, ref_params: dict, pairs, idx: np.ndarray,
                 batch_size: int, groups: np.ndarray | None = None, weights: np.ndarray | None = None) -> float:
    """The block loss over the pairs ``idx`` (``weights``: one per calibration pair)."""
    x, t, y = pairs
    num = den = 0.0
    for g, sub in _by_group(idx, groups):
        for i in range(0, len(sub), batch_size):
            j = sub[i:i + batch_size]
            w = None if weights is None else jnp.asarray(weights[j])
            a, b = _unit_errors(model.module, units, params, ref_params, jnp.asarray(x[j]), jnp.asarray(t[j]),
                                None if y is None else jnp.asarray(y[j]), g, w)
            num, den = num + np.asarray(a, np.float64), den + np.asarray(b, np.float64)
    return float(np.mean(num / np.maximum(den, 1e-30)))


def block_output_error(model, params: dict, float_params: dict, block: str, calib, *,
                       num_pairs: int | None = 32, batch_size: int = 8, seed: int = 0) -> float:
    """``mean_over_outputs ‖out_q - out_f‖² / ‖out_f‖²`` of a block (module docstring).

    ``params``' block against ``float_params``' block, both run on the inputs the network
    ``params`` feeds the block, over ``num_pairs`` calibration pairs (``None``: all) drawn
    with ``seed``.
    """
    pairs = _calibration_pairs(model, calib)
    units = tuple(block_units(params, block))
    ref_params = _set_paths(params, {u: _get(float_params, u) for u in units})
    return _block_error(model, _loss_outputs(block, units), params, ref_params, pairs,
                        _eval_indices(len(pairs[0]), num_pairs, seed),
                        batch_size, _pair_groups(model, params, pairs))


def _named_key(key: jax.Array, name: str) -> jax.Array:
    """``fold_in(key, crc32(name))``: the key of one layer (or other named unit)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _seed_of(key: jax.Array, salt: str) -> int:
    return int(jax.random.randint(_named_key(key, salt), (), 0, 2**31 - 1))


def _is_zero_point(path: tuple) -> bool:
    """Whether a flattened leaf's key path ends at an activation quantizer's zero point
    (integer-valued floats, kept fixed by fine-tuning)."""
    last = path[-1] if path else None
    return isinstance(last, jax.tree_util.GetAttrKey) and last.name == "zero"


def _trainable(params: dict, float_params: dict, units: tuple) -> tuple:
    """What tuning ``units`` works on: ``(ref_params, treedef, leaves, train_idx, theta)``.

    ``ref_params`` is ``params`` with the units' float values; ``leaves`` the units'
    flattened arrays; ``train_idx`` those that train (floating point, not activation
    zero points); ``theta`` their float32 copies."""
    ref_params = _set_paths(params, {u: _get(float_params, u) for u in units})
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path([_get(params, u) for u in units])
    leaves = [jnp.asarray(a) for _, a in path_leaves]
    train_idx = tuple(i for i, (p, a) in enumerate(path_leaves)
                      if jnp.issubdtype(a.dtype, jnp.floating) and not _is_zero_point(p))
    return ref_params, treedef, leaves, train_idx, [leaves[i].astype(jnp.float32) for i in train_idx]


def _step_units(theta: list, lr_relative: bool) -> list | None:
    """Each trained array's mean magnitude, which scales its steps when ``lr_relative``."""
    if not lr_relative:
        return None
    return [jnp.float32(m if m > 0 else 1.0) for m in (float(jnp.mean(jnp.abs(v))) for v in theta)]


def _adam_update(lr: float, grads, opt_state, theta, step_units):
    """One Adam step of ``theta`` (steps scaled by ``step_units`` when given)."""
    import optax

    updates, opt_state = optax.adam(lr).update(grads, opt_state, theta)
    if step_units is not None:
        updates = [u * k for u, k in zip(updates, step_units)]
    return optax.apply_updates(theta, updates), opt_state


class _IterateAverage:
    """An exponential moving average of the trained arrays over the Adam steps (``decay``
    per step, started from zero and bias-corrected as Adam's moments are), so that the
    tuned values are ``Σ_s decay^(T-s)·θ_s / Σ_s decay^(T-s)`` over the iterates
    ``θ_1..θ_T``: the minibatch noise of the last steps averages out. ``decay`` ``None``:
    no average, :meth:`result` gives the last iterate."""

    def __init__(self, decay: float | None, theta: list):
        if decay is not None and not 0 < decay < 1:
            raise ConfigError(f"the iterate average's decay must be in (0, 1), got {decay}")
        self.decay, self.steps = decay, 0
        self.mean = None if decay is None else [jnp.zeros_like(v) for v in theta]

    def update(self, theta: list) -> None:
        if self.decay is not None:
            self.mean = _ema_step(jnp.float32(self.decay), self.mean, theta)
            self.steps += 1

    def result(self, theta: list) -> list:
        if self.decay is None or self.steps == 0:
            return theta
        norm = 1.0 - self.decay ** self.steps
        return [(m / norm).astype(v.dtype) for m, v in zip(self.mean, theta)]


@xla.jit
def _ema_step(decay, mean, theta):
    return [decay * m + (1 - decay) * v for m, v in zip(mean, theta)]


def _split_pool(total: int, eval_pairs: int | None, seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(eval_idx, pool, bs)``: the held-out indices deciding keep-or-discard, the indices
    minibatches come from (all, when the rest cannot hold a minibatch) and the batch size."""
    eval_idx = _eval_indices(total, eval_pairs, seed)
    pool = np.setdiff1d(np.arange(total), eval_idx)
    if len(pool) < batch_size:
        pool = np.arange(total)
    return eval_idx, pool, min(batch_size, len(pool))


def _check_code_updates(every: int, budget: float) -> None:
    if every < 0 or not 0 < budget <= 1:
        raise ConfigError(f"code_update_every must be >= 0 and code_budget in (0, 1], got {every} and {budget}")


def finetune_block(
    model,
    params: dict,
    float_params: dict,
    block: str,
    calib,
    *,
    steps: int,
    lr: float = 1e-4,
    batch_size: int = 8,
    eval_pairs: int = 32,
    key: Any = 0,
    code_update_every: int = 0,
    code_budget: float = 0.01,
    lr_relative: bool = False,
    unroll: int = 1,
    step_loss: bool = False,
    balance_steps: bool = False,
    min_snr_gamma: float | None = None,
    ema: float | None = None,
    progress: bool = False,
) -> tuple[dict, dict]:
    """Tune a quantized block to reproduce the float block's outputs.

    The trainable parameters are every floating-point array under the block's modules
    in ``params``: AQ codebooks and scales, uniform scales, activation quantizers' scales,
    channel-smoothing factors, norms, biases, float kernels; integer arrays (codes) and
    the activation quantizers' zero points stay fixed. Adam (learning rate ``lr``; with
    ``lr_relative`` each array's steps are scaled by its mean magnitude, so that ``lr``
    is a relative step for scales of any size) runs ``steps`` steps on minibatches of
    ``batch_size`` calibration pairs, minimising the relative output error of
    :func:`block_output_error` against ``float_params``' block on the inputs the network
    ``params`` (earlier blocks quantized) feeds it. The tuned arrays are cast back to
    their stored dtypes and kept only if the error on a fixed subset of ``eval_pairs``
    pairs, held out of the training minibatches, falls.

    ``block`` may be :data:`NETWORK`: then every floating-point array of the model trains
    (the float first and last layers and the embeddings too) and the loss is the relative
    error of the network's output against ``float_params``' on the same calibration inputs,
    end to end, as AQLM's global fine-tuning (here on the denoiser's output, not on a
    language model's logits). Run after the blocks, it tunes what block-wise tuning cannot
    see: errors that blocks pass to one another.

    With activation quantizers in ``params`` the block is tuned with its activations
    quantized: their rounding passes gradients straight through and their scales learn
    as in LSQ (:func:`~jaxquant.quant.activation.fake_quant`). Quantizers with several
    timestep groups take minibatches of one group at a time (a group drawn in proportion
    to its pairs), each narrowed to its group, so each group's scales learn from their
    own timesteps.

    **Unrolled network loss** (``unroll = K > 1``, :data:`NETWORK` only): instead of one
    model call per calibration pair, the loss follows ``K`` consecutive DDIM steps of the
    calibration's sampler (eta 0, with its guidance scale) from a calibration input
    ``x_s``: the quantized model steps from its own previous state, the float model
    (``float_params``) from its own, both from ``x_s``; gradients flow through all ``K``
    steps. Step ``j``'s term is the state error after it in units of the first step's ε:
    ``‖x^q_{s+j+1} − x^f_{s+j+1}‖² / (c_s²·‖ε^f_s‖²)`` with ``c_s`` the first step's ε
    coefficient (:func:`~jaxquant.diffusion.samplers.ddim_eps_coefficient`); the loss is
    the mean of the ``K`` terms (norms over the batch, as the one-step loss). For
    ``K = 1`` it is the one-step relative ε error (exactly, when x0 is not clipped), and
    for ``K > 1`` it also charges the model for the state errors its earlier steps hand
    on, which it can learn to correct. (Each step's own coefficient would not do: DDIM's
    last step from ``t = 0`` moves the sample by ``√β₀ ≈ 0.01`` ε, and a state error
    carried into it would count ~3 000 times.) Starts ``s`` run over the steps with ``K`` steps
    left; a minibatch shares one start; held-out starts decide keep-or-discard, and the
    record adds ``unroll`` and the one-step errors (``one_step_before`` / ``_after``).

    **DDIM-step loss** (``step_loss``, :data:`NETWORK` only; implied by ``unroll > 1``): the
    unrolled loss with ``K = unroll``, also for ``K = 1``: one DDIM step, the error of the
    state it reaches rather than of ε. The two differ where the sampler clips x0 to
    [-1, 1]: there the state moves by ``σ_{t'}·ε`` instead of ``c_t·ε`` and the clip
    rectifies errors that push x0 back inside. On ddpm-fmnist the 8-bit activations'
    noise-like ε error at ``t ≥ 500`` is amplified by ``σ_t/α_t`` in x0, and the clip keeps
    its upward half on black pixels (a bias the float model does not have; BENCHMARKS, the
    clip probe): the ε loss cannot see it, the step loss charges it.

    **Balanced steps** (``balance_steps``, with the step or unrolled loss): each start
    step's term is divided by its value for the model entering the stage (measured on up to
    32 training trajectories per step, before the first Adam step), in the training loss
    and in the held-out error (which then starts near 1), so that every sampler step counts
    alike. Unbalanced, the last step rules the loss: on ddpm-fmnist AQ W4A8 the one-step
    state error at ``t = 0`` is 1e-2 of ``c_0²‖ε‖²``, at ``t ≥ 500`` 5e-5 to 8e-5, so the
    steps where the clip rectifies the activations' error hold about 1 % of the loss. The
    record adds ``balance_steps`` and the per-step values (``step_scales``).

    **Timestep weighting** (``min_snr_gamma = γ``; one-step loss only): each pair's squared
    error is weighted by :func:`min_snr_weights` of its timestep, ``min(SNR_t, γ)/SNR_t``,
    in the training loss and in the held-out error that decides keep-or-discard (the
    denominator stays the unweighted ``Σ‖f‖²``). Unweighted, the nearly clean steps rule
    the loss: on ddpm-fmnist AQ W4A8 the last DDIM step (``t = 0``) holds about 85 % of the
    network's output error, though the sampler scales its ε by 0.01, while the 8-bit
    activations' drift is made entirely at ``t ≥ 500``. There it did not help: FID 9.06
    with γ 5 and 8.63 with γ 1, against 8.55 unweighted (BENCHMARKS).

    **Iterate averaging** (``ema = d``, e.g. 0.995; off by default): the tuned values are an
    exponential moving average of the Adam iterates (:class:`_IterateAverage`; weight
    ``d^(T-s)`` on step ``s``, a window of about ``1/(1-d)`` steps) instead of the last
    iterate; the held-out error that decides keep-or-discard is the average's. With a
    minibatch of 8 pairs and a constant learning rate the last iterate carries the last
    steps' minibatch noise: on ddpm-fmnist AQ W4A8 two seeds of the 600-step network stage
    end with activation scales several percent apart, the held-out error alike, and FID
    8.38 and 9.03 (BENCHMARKS). With ``ema = 0.995`` three seeds gave FID 8.60-8.67
    (spread 0.07 instead of 0.65) at the same mean (8.65): the average removes the seed
    noise, not the gap to the float model. Not with code updates (the average would mix
    values tuned for different codes).

    ``progress`` shows a bar over the Adam steps.

    **Code updates** (``code_update_every > 0``; off by default), in the manner of
    PV-tuning's code step: after every ``code_update_every`` Adam steps, the gradient
    ``G`` of the minibatch loss with respect to each AQ layer's dequantized weight ``Ŵ``
    and the layer's ``H = XᵀX`` (from ``calib``, normalised, damped by 1e-2; identity if
    absent) give a local model ``L(Ŵ + δ) ≈ L + <G, δ> + κ/2·tr(δ H δᵀ)``, with ``κ``
    fitted to ``G ≈ κ (Ŵ - W) H``. Its minimiser ``T = Ŵ - G H⁻¹ / κ`` is the target
    towards which codes move (:func:`~jaxquant.quant.additive.greedy_code_update` in the
    ``H`` metric: the best single-code changes, largest model decrease first). Every pair
    of a step of (1, 1/2, 1/4) times ``T - Ŵ`` and a budget of (1, 1/4, 1/16, 1/64) x
    ``code_budget`` of each layer's codes is tried, and the pair with the lowest
    loss on a fresh selection batch (4x the minibatch, from the training pairs) is taken
    if it lowers that loss (else the codes stay).

    Returns:
      ``(params, record)``; ``record`` holds ``block``, ``steps``, ``error_before``,
      ``error_after`` (of the returned params), ``kept`` and ``seconds``, and with code
      updates ``code_updates`` (accepted / tried) and ``codes_changed``.

    Raises:
      ConfigError: a negative ``code_update_every`` or a ``code_budget`` outside (0, 1];
        ``unroll < 1``; ``unroll > 1`` or ``step_loss`` on a block other than
        :data:`NETWORK`, with code updates, on a calibration not sampled by deterministic
        DDIM, or longer than its trajectories; ``balance_steps`` without a step or
        unrolled loss; ``min_snr_gamma`` not positive, or with a step loss or code
        updates; ``ema`` outside (0, 1), or with code updates.
    """
    import optax

    _check_code_updates(code_update_every, code_budget)
    _check_unroll(block, unroll, code_update_every, calib, step_loss)
    if min_snr_gamma is not None and (unroll > 1 or step_loss or code_update_every):
        raise ConfigError("timestep weighting (min_snr_gamma) is for the one-step ε loss without code updates")
    if ema is not None and code_update_every:
        raise ConfigError("an iterate average (ema) mixes values tuned for different codes: not with code updates")
    if balance_steps and not (unroll > 1 or step_loss):
        raise ConfigError("balance_steps weighs the sampler steps of a step or unrolled loss: set step_loss or "
                          "unroll > 1")
    if unroll > 1 or step_loss:
        return _finetune_unrolled(model, params, float_params, calib, steps=steps, lr=lr, batch_size=batch_size,
                                  eval_pairs=eval_pairs, key=key, lr_relative=lr_relative, unroll=unroll,
                                  ema=ema, balance_steps=balance_steps, progress=progress)
    t0 = time.perf_counter()
    key = _as_key(key)
    pairs = _calibration_pairs(model, calib)
    n_pairs = len(pairs[0])
    units = tuple(block_units(params, block))
    outs = _loss_outputs(block, units)
    groups = _pair_groups(model, params, pairs)
    weights = None if min_snr_gamma is None else min_snr_weights(model.schedule, pairs[1], min_snr_gamma)
    ref_params, treedef, leaves, train_idx, theta = _trainable(params, float_params, units)
    seed = _seed_of(key, "finetune:" + block)
    # Train on the pairs the keep-or-discard decision does not look at.
    eval_idx, pool, bs = _split_pool(n_pairs, eval_pairs, seed, batch_size)

    before = _block_error(model, outs, params, ref_params, pairs, eval_idx, batch_size, groups, weights)
    step_units = _step_units(theta, lr_relative)
    opt_state = optax.adam(lr).init(theta)
    average = _IterateAverage(ema, theta)
    rng = np.random.default_rng(seed + 1)
    x, t, y = pairs
    if groups is not None:
        group_ids, group_counts = np.unique(groups[pool], return_counts=True)
    train_set = set(train_idx)
    tried = accepted = changed = 0
    for step in tqdm(range(steps), desc=f"tuning {block}", unit="step", disable=not progress, leave=False):
        g = None
        if groups is None:
            j = np.sort(rng.choice(pool, bs, replace=False))
        else:
            gi = int(rng.choice(group_ids, p=group_counts / group_counts.sum()))
            members = pool[groups[pool] == gi]
            j = np.sort(rng.choice(members, min(bs, len(members)), replace=False))
            g = jnp.asarray(gi, jnp.int32)
        xb, tb, yb = jnp.asarray(x[j]), jnp.asarray(t[j]), None if y is None else jnp.asarray(y[j])
        wb = None if weights is None else jnp.asarray(weights[j])
        theta, opt_state, _ = _finetune_step(model.module, units, treedef, train_idx, float(lr), theta, opt_state,
                                             leaves, params, ref_params, xb, tb, yb, g, step_units, outs, wb)
        average.update(theta)
        if code_update_every and (step + 1) % code_update_every == 0:
            tried += 1
            tree = _assemble(units, treedef, train_idx, leaves, theta, params)
            select = np.sort(rng.choice(pool, min(len(pool), 4 * bs), replace=False))  # a fresh selection batch
            new_tree, n = _code_step(model, block, tree, float_params, ref_params, outs, code_budget,
                                     getattr(calib, "xtx", None) or {}, (xb, tb, yb), pairs, select, bs, groups, g)
            if new_tree is not None:  # take the new codes; the float leaves stay in theta
                new_leaves = jax.tree_util.tree_leaves([_get(new_tree, u) for u in units])
                leaves = [old if i in train_set else new for i, (old, new) in enumerate(zip(leaves, new_leaves))]
                accepted, changed = accepted + 1, changed + n
    stored = [v.astype(leaves[i].dtype) for i, v in zip(train_idx, average.result(theta))]
    tuned = _assemble(units, treedef, train_idx, leaves, stored, params)
    after = (_block_error(model, outs, tuned, ref_params, pairs, eval_idx, batch_size, groups, weights)
             if steps > 0 else before)
    kept = after < before
    rec = {"block": block, "steps": int(steps), "error_before": before, "error_after": after if kept else before,
           "kept": bool(kept), "seconds": round(time.perf_counter() - t0, 3)}
    if min_snr_gamma is not None:
        rec["min_snr_gamma"] = float(min_snr_gamma)
    if ema is not None:
        rec["ema"] = float(ema)
    if code_update_every:
        rec.update(code_updates=[accepted, tried], codes_changed=changed if kept else 0)
    return (tuned if kept else params), rec


def _state_loss_name(unroll: int) -> str:
    """How errors name the network stage's DDIM-state loss of ``unroll`` steps."""
    return f"an unrolled loss (unroll = {unroll})" if unroll != 1 else "a DDIM-step loss (step_loss)"


def _check_unroll(block: str, unroll: int, code_update_every: int, calib, step_loss: bool = False) -> None:
    if isinstance(unroll, bool) or not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise ConfigError(f"unroll must be a positive integer, got {unroll!r}")
    if unroll == 1 and not step_loss:
        return
    what = _state_loss_name(unroll)
    if block != NETWORK:
        raise ConfigError(f"{what} tunes the whole network: use block {NETWORK!r}, not {block!r}")
    if code_update_every:
        raise ConfigError(f"code updates are not supported with {what}")
    if calib.config.sampler != "ddim":
        raise ConfigError(f"{what} follows deterministic DDIM steps, but the calibration was sampled with "
                          f"{calib.config.sampler!r}: calibrate with the ddim sampler")
    if unroll > len(calib.timesteps):
        raise ConfigError(f"unroll = {unroll} is longer than the calibration's {len(calib.timesteps)} steps")


def _unrolled_errors(eps, sched, params, ref_params, x, ts, tps, coef, y):
    """Per-step ``(‖x^q − x^f‖², c₀²‖ε^f₀‖²)`` of ``len(ts)`` DDIM steps from ``x`` (sums
    over the batch): each state error against the first step's ε-driven update;
    ``eps(params, x, t, y)`` is the sampler's ε; ``ts`` / ``tps`` / ``coef`` the steps'
    timesteps, previous timesteps and ε coefficients (traced, shape ``[K]``)."""
    from jaxquant.diffusion.samplers import ddim_step

    xq = xf = x
    nums = []
    for j in range(ts.shape[0]):
        t = jnp.broadcast_to(ts[j], (x.shape[0],))
        ef = jax.lax.stop_gradient(eps(ref_params, xf, t, y))
        xq = ddim_step(sched, xq, eps(params, xq, t, y), ts[j], tps[j])
        xf = jax.lax.stop_gradient(ddim_step(sched, xf, ef, ts[j], tps[j]))
        nums.append(jnp.sum(jnp.square(xq - xf)))
        if j == 0:
            den = jnp.square(coef[0]) * jnp.sum(jnp.square(ef))
    return jnp.stack(nums), jnp.broadcast_to(den, (len(nums),))


def _finetune_unrolled(model, params: dict, float_params: dict, calib, *, steps: int, lr: float, batch_size: int,
                       eval_pairs: int, key: Any, lr_relative: bool, unroll: int, ema: float | None = None,
                       balance_steps: bool = False, progress: bool = False) -> tuple[dict, dict]:
    """:func:`finetune_block` on :data:`NETWORK` with the unrolled loss (see there)."""
    import optax

    from jaxquant.diffusion.pipeline import eps_fn
    from jaxquant.diffusion.samplers import ddim_eps_coefficient, previous_timesteps
    from jaxquant.diffusion.schedules import sampling_timesteps

    t0 = time.perf_counter()
    key = _as_key(key)
    sched = model.schedule
    num_steps, n_traj = calib.inputs.shape[:2]
    ts = np.asarray(calib.timesteps, np.int32)
    if not np.array_equal(ts, sampling_timesteps(sched, num_steps)):
        raise ConfigError("the calibration's timesteps are not the model's DDIM schedule of "
                          f"{num_steps} steps: calibrate this model with the ddim sampler")
    tps = np.asarray(previous_timesteps(sched, num_steps, "ddim"), np.int32)
    coef = ddim_eps_coefficient(sched, ts, tps).astype(np.float32)
    eps = eps_fn(model, calib.config.cfg_scale)
    x_all = np.asarray(calib.inputs, np.float32)
    labels = None
    if model.is_class_conditional:
        if calib.labels is None:
            raise ConfigError("the calibration of a class-conditional model has no labels")
        labels = np.asarray(calib.labels, np.int32)

    units = tuple(block_units(params, NETWORK))
    ref_params, treedef, leaves, train_idx, theta = _trainable(params, float_params, units)

    # Starts: (step s, trajectory n) with `unroll` steps left, flat index s * n_traj + n.
    n_starts = (num_steps - unroll + 1) * n_traj
    seed = _seed_of(key, "finetune:" + NETWORK)
    eval_idx, pool, bs = _split_pool(n_starts, eval_pairs, seed, batch_size)

    def batch(s: int, n: np.ndarray):
        sl = slice(s, s + unroll)
        y = None if labels is None else jnp.asarray(labels[n])
        return jnp.asarray(x_all[s, n]), jnp.asarray(ts[sl]), jnp.asarray(tps[sl]), jnp.asarray(coef[sl]), y

    errors = xla.jit(partial(_unrolled_errors, eps, sched))

    def start_error(p: dict, s: int, n_all: np.ndarray) -> float:
        """The mean of the ``K`` terms of the starts ``(s, n_all)``, each a ratio of sums."""
        num = den = 0.0
        for i in range(0, len(n_all), bs):
            a, b = errors(p, ref_params, *batch(s, n_all[i:i + bs]))
            num, den = num + np.asarray(a, np.float64), den + np.asarray(b, np.float64)
        return float(np.mean(num / np.maximum(den, 1e-30)))

    pool_steps = pool // n_traj
    starts = np.unique(pool_steps)
    scale = np.ones(num_steps - unroll + 1)  # each start step's divisor (balance_steps)
    if balance_steps:
        for s in starts:
            members = pool[pool_steps == s] % n_traj
            scale[s] = max(start_error(params, int(s), np.sort(members[:32])), 1e-30)

    def held_out(p: dict) -> float:
        """Mean over the held-out starts' steps ``s`` of the error of the starts at ``s``
        (divided by ``scale[s]``), as the minibatches (one start step each) weigh them: a
        ratio of sums over all starts would be ruled by the early steps, whose ``c_s`` are
        large."""
        return float(np.mean([start_error(p, int(s), eval_idx[eval_idx // n_traj == s] % n_traj) / scale[s]
                              for s in np.unique(eval_idx // n_traj)]))

    step_units = _step_units(theta, lr_relative)

    @xla.jit
    def train_step(theta, opt_state, leaves, base, ref, x, a, b, c, y, w):
        def loss_fn(th):
            num, den = _unrolled_errors(eps, sched, _assemble(units, treedef, train_idx, leaves, th, base),
                                        ref, x, a, b, c, y)
            return jnp.mean(num / jnp.maximum(den, 1e-30)) / w

        loss, grads = jax.value_and_grad(loss_fn)(theta)
        return *_adam_update(lr, grads, opt_state, theta, step_units), loss

    before = held_out(params)
    one_step_before = block_output_error(model, params, float_params, NETWORK, calib, num_pairs=eval_pairs,
                                         batch_size=batch_size, seed=seed)
    opt_state = optax.adam(lr).init(theta)
    average = _IterateAverage(ema, theta)
    rng = np.random.default_rng(seed + 1)
    bar = tqdm(range(steps), desc=f"tuning {NETWORK} ({unroll}-step loss)", unit="step", disable=not progress,
               leave=False)
    recent: list = []
    for i in bar:
        s = int(rng.choice(starts))
        members = pool[pool_steps == s] % n_traj
        n = np.sort(rng.choice(members, min(bs, len(members)), replace=False))
        theta, opt_state, loss = train_step(theta, opt_state, leaves, params, ref_params, *batch(s, n),
                                            jnp.float32(scale[s]))
        average.update(theta)
        recent = (recent + [loss])[-50:]
        if progress and (i + 1) % 25 == 0:
            bar.set_postfix_str(f"minibatch loss (last 50) {float(jnp.mean(jnp.stack(recent))):.4g}")
    stored = [v.astype(leaves[i].dtype) for i, v in zip(train_idx, average.result(theta))]
    tuned = _assemble(units, treedef, train_idx, leaves, stored, params)
    after = held_out(tuned) if steps > 0 else before
    kept = after < before
    out = tuned if kept else params
    one_step_after = block_output_error(model, out, float_params, NETWORK, calib, num_pairs=eval_pairs,
                                        batch_size=batch_size, seed=seed)
    rec = {"block": NETWORK, "steps": int(steps), "unroll": int(unroll), "step_loss": True, "error_before": before,
           "error_after": after if kept else before, "kept": bool(kept), "error_tuned": after,
           "one_step_before": one_step_before, "one_step_after": one_step_after,
           "seconds": round(time.perf_counter() - t0, 3)}
    if ema is not None:
        rec["ema"] = float(ema)
    if balance_steps:
        rec.update(balance_steps=True, step_scales=[float(v) for v in scale])
    return out, rec


#: finetune_model's relative learning rate: the best of 1e-3, 3e-3 and 1e-2 on ddpm-fmnist
#: RD W6A6 (BENCHMARKS, "Block reconstruction").
RECONSTRUCT_LR = 3e-3


def model_blocks(params: dict) -> list[str]:
    """The UNet blocks holding quantizable layers, in execution order."""
    return sorted({b for b in map(block_of, layer_kernels(params)) if b is not None}, key=_block_order)


def finetune_model(
    model,
    params: dict,
    float_params: dict,
    calib,
    *,
    steps: int,
    lr: float = RECONSTRUCT_LR,
    lr_relative: bool = True,
    batch_size: int = 8,
    eval_pairs: int = 64,
    key: Any = 0,
    blocks: Sequence[str] | None = None,
    progress: bool = True,
    unroll: int = 1,
    step_loss: bool = False,
    balance_steps: bool = False,
    min_snr_gamma: float | None = None,
    ema: float | None = None,
) -> tuple[dict, list[dict]]:
    """Block-by-block fine-tuning of a quantized model of any method (uniform, RD, AQ).

    Each block in execution order is tuned by :func:`finetune_block` against
    ``float_params``' block, on the inputs the model tuned so far feeds it: the
    block-reconstruction step of BRECQ / Q-Diffusion with the codes frozen. With the
    model's activation quantizers in place, their scales (one per timestep group) learn
    with the weights' scales, biases and norms. ``lr`` is relative to each array's
    magnitude by default (``lr_relative``): uniform weight scales (~1e-3) and norm
    weights (~1) move by the same fraction.

    Args:
      model: the quantized model (its module and schedule).
      params: its parameters; float_params: the float model's (same layer names; for a
        smoothed model, the smoothed float model it was quantized from).
      calib: the calibration (model inputs along the float model's trajectories).
      steps, lr, lr_relative, batch_size, eval_pairs, key: as :func:`finetune_block`.
      blocks: the blocks to tune, in this order (default :func:`model_blocks`);
        :data:`NETWORK` is the whole network, tuned end to end (see :func:`finetune_block`).
      progress: show a progress bar.
      unroll: the :data:`NETWORK` stage's loss follows this many sampler steps
        (:func:`finetune_block`); only with ``blocks == [NETWORK]`` when above 1.
      step_loss: the :data:`NETWORK` stage's loss is the error of the DDIM state after
        ``unroll`` steps, clip included, also for one step (:func:`finetune_block`); only
        with ``blocks == [NETWORK]``.
      balance_steps: with a step or unrolled loss, each sampler step's term divided by its
        value before the stage (:func:`finetune_block`).
      min_snr_gamma: weight each pair's error by ``min(SNR_t, γ)/SNR_t``
        (:func:`finetune_block`, :func:`min_snr_weights`); ``None``: unweighted.
      ema: keep each block's exponential moving average of the Adam iterates with this
        decay instead of the last iterate (:func:`finetune_block`); ``None``: the last.

    Returns:
      ``(params, records)``, one :func:`finetune_block` record per block.

    Raises:
      ConfigError: ``unroll > 1`` or ``step_loss`` with blocks other than :data:`NETWORK` (and as
        :func:`finetune_block`).
    """
    names = model_blocks(params) if blocks is None else list(blocks)
    if (unroll != 1 or step_loss) and names != [NETWORK]:
        raise ConfigError(f"{_state_loss_name(unroll)} is for the end-to-end stage alone: blocks must be [{NETWORK!r}], got {names}")
    records: list[dict] = []
    bar = tqdm(names, desc="fine-tuning blocks", unit="block", disable=not progress)
    for block in bar:
        params, rec = finetune_block(model, params, float_params, block, calib, steps=steps, lr=lr,
                                     batch_size=batch_size, eval_pairs=eval_pairs, key=key, lr_relative=lr_relative,
                                     unroll=unroll, step_loss=step_loss, balance_steps=balance_steps,
                                     min_snr_gamma=min_snr_gamma, ema=ema,
                                     progress=progress and block == NETWORK)
        records.append(rec)
        bar.set_postfix_str(f"{block}: {rec['error_before']:.4g} -> {rec['error_after']:.4g}")
        xla.release_compiled_if_crowded()
    return params, records


# --------------------------------------------------------------------------- progress store

PROGRESS_FORMAT = "jaxquant-aq-progress"
PROGRESS_VERSION = 1


def _save_npz(path: Path, tree: dict, record: dict) -> None:
    """Write a (possibly quantized) tree and a JSON record atomically as one ``.npz``."""
    plain, manifest = serialize.to_storable(tree)
    flat: dict[str, np.ndarray] = {}

    def visit(node, prefix):
        for k, v in node.items():
            if "/" in k:
                raise CheckpointError(f"parameter name {k!r} contains '/'; cannot store it in a progress file")
            if isinstance(v, dict):
                visit(v, prefix + (k,))
            else:
                flat["/".join(prefix + (k,))] = np.asarray(v)

    visit(plain, ())
    flat["__manifest__"] = np.asarray(json.dumps(manifest))
    flat["__record__"] = np.asarray(json.dumps(record))
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def _load_npz(path: Path) -> tuple[dict, dict]:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"progress file '{path}' is unreadable ({e}); delete it to redo that step") from None
    manifest = json.loads(str(data.pop("__manifest__")))
    record = json.loads(str(data.pop("__record__")))
    plain = flax.traverse_util.unflatten_dict(data, sep="/")
    return serialize.from_storable(plain, manifest), record


class _Progress:
    """One ``.npz`` per finished layer / fine-tuned block under ``root``, and ``progress.json``
    with the run's settings (a rerun with other settings is refused)."""

    def __init__(self, root: str | os.PathLike, fingerprint: dict):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / "progress.json"
        want = {"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION, "settings": fingerprint}
        if meta.exists():
            have = json.loads(meta.read_text())
            if have.get("format") != PROGRESS_FORMAT or have.get("version") != PROGRESS_VERSION:
                raise CheckpointError(f"'{self.root}' is not an AQ progress directory of this jaxquant version")
            if have.get("settings") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(have.get("settings", {}))
                              if fingerprint.get(k) != have.get("settings", {}).get(k))
                raise CheckpointError(f"'{self.root}' holds an AQ run with other settings ({', '.join(diff)} "
                                      "differ); delete it or choose another progress directory")
        else:
            meta.write_text(json.dumps(want, indent=1) + "\n")

    def _path(self, kind: str, name: str) -> Path:
        return self.root / f"{kind}-{name}.npz"

    def load(self, kind: str, name: str) -> tuple[dict, dict] | None:
        p = self._path(kind, name)
        return _load_npz(p) if p.exists() else None

    def save(self, kind: str, name: str, tree: dict, record: dict) -> None:
        _save_npz(self._path(kind, name), tree, record)


# --------------------------------------------------------------------------- whole model


@dataclasses.dataclass
class AQResult:
    """Result of :func:`quantize_aq`.

    Attributes:
      params: the quantized parameter tree (AQ weights, tuned blocks, activation quantizers).
      plan: ``{layer name: AQConfig}`` of the quantized layers.
      layers: per layer ``{"name", "config", "bits_per_weight", "objective_init",
        "objective", "seconds"}`` (objective: relative ``tr(ΔW XᵀX ΔWᵀ)``).
      blocks: per fine-tuned block, the record of :func:`finetune_block`.
      layer_weights: the planner's ``{layer: weight}`` (``None``: by number of weights).
    """

    params: dict
    plan: dict[str, AQConfig]
    layers: list[dict]
    blocks: list[dict]
    layer_weights: dict[str, float] | None = None

    def table(self) -> str:
        """Per layer: configuration, stored bits/weight, objective after init → final."""
        w = max([len(r["name"]) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'config':<10} {'bits/w':>7} {'obj init':>9} {'obj':>9} {'s':>7}"]
        for r in self.layers:
            lines.append(f"{r['name']:<{w}}  {r['config']:<10} {r['bits_per_weight']:>7.3f} "
                         f"{r['objective_init']:>9.5f} {r['objective']:>9.5f} {r['seconds']:>7.1f}")
        for b in self.blocks:
            lines.append(f"fine-tuned {b['block']}: output error {b['error_before']:.5f} -> {b['error_after']:.5f} "
                         f"({b['steps']} steps{'' if b['kept'] else ', not kept'}, {b['seconds']:.1f} s)")
        return "\n".join(lines)


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def _key_json(key: jax.Array) -> list:
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return [int(v) for v in np.asarray(data).ravel()]


def resolve_aq_rules(kernels: dict, rules: Sequence[Rule] | None) -> tuple[list[str], dict[str, AQConfig]]:
    """``(layers to quantize, {layer: fixed AQConfig})`` under ``rules``: a rule's config is
    ``None`` (float), an :class:`AQConfig` (fixed) or anything else (planned). Default
    rules (``None``): first/last layer float, everything else planned."""
    rules = list(rules) if rules is not None else default_rules("auto")
    resolved = resolve(kernels, rules)
    names = [n for n, c in resolved.items() if c is not None]
    return names, {n: c for n, c in resolved.items() if isinstance(c, AQConfig)}


def check_aq_budget(params: dict, target_bits: float, *, rules: Sequence[Rule] | None = None,
                    candidates: Sequence[AQConfig] | Callable | None = None, planning: str = "gaussian",
                    min_code_bits: float | None = None) -> None:
    """Raise :class:`ConfigError` if :func:`quantize_aq` could not meet ``target_bits``.

    Whether a budget can be met depends on the layer shapes, the candidates and the floor
    alone (each layer's cheapest candidate), so this runs before the calibration, the
    sensitivities and the offsets that planning needs.
    """
    if isinstance(target_bits, bool) or not (isinstance(target_bits, (int, float, np.floating, np.integer))
                                             and np.isfinite(target_bits) and target_bits > 0):
        raise ConfigError(f"the AQ target must be a positive number of bits per weight, got {target_bits!r}")
    if planning not in PLANNINGS:
        raise ConfigError(f"planning must be one of {', '.join(PLANNINGS)}, got {planning!r}")
    kernels = layer_kernels(params)
    names, fixed = resolve_aq_rules(kernels, rules)
    if candidates is None and planning == "measured":
        candidates = wide_candidates
    plan_aq_configs({n: _shape(kernels[n]) for n in names}, float(target_bits), candidates, fixed=fixed,
                    min_code_bits=DEFAULT_MIN_CODE_BITS if min_code_bits is None else min_code_bits)


def _check_xtx(calib, layers: Iterable[str]) -> None:
    """ConfigError unless ``calib`` holds ``XᵀX`` of every layer to quantize."""
    if not getattr(calib, "xtx", None):
        raise ConfigError("AQ needs XᵀX statistics: calibrate with CalibConfig(xtx=True)")
    missing = [n for n in layers if n not in calib.xtx]
    if missing:
        raise ConfigError(f"the calibration has no XᵀX for layer(s) {', '.join(missing[:5])}: was it made with "
                          "this model?")


def _layer_offsets(kernels: dict[str, Any], xtx: dict[str, Any], key: Any, beam_size: int,
                   progress_dir: str | os.PathLike | None, progress: bool) -> dict[str, float]:
    """:func:`measure_layer_offsets`, kept in ``progress_dir/offsets.json`` (reused when it
    holds every layer, measured with the same key and beam)."""
    path = None if progress_dir is None else Path(progress_dir) / "offsets.json"
    tag = {"key": _key_json(_as_key(key)), "beam_size": beam_size, "probe": list(OFFSET_PROBE),
           "coefficients": list(LAYER_PROXY_DB)}
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("settings") == tag and set(kernels) <= set(saved["offsets"]):
            return {n: saved["offsets"][n] for n in kernels}
    offsets = measure_layer_offsets(kernels, xtx, key=key, beam_size=beam_size, progress=progress)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"settings": tag, "offsets": offsets}, indent=1))
    return offsets


def quantize_aq(
    model,
    calib,
    target_bits: float | None = None,
    acts: Any = None,
    *,
    plan: dict[str, AQConfig] | None = None,
    candidates: Sequence[AQConfig] | Callable | None = None,
    rules: Sequence[Rule] | None = None,
    beam_size: int = 8,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
    finetune_batch: int = 8,
    code_update_every: int = 0,
    code_budget: float = 0.01,
    layer_weighting: str | dict[str, float] | None = None,
    min_code_bits: float | None = None,
    planning: str = "gaussian",
    progress_dir: str | os.PathLike | None = None,
    key: Any = 0,
    aq_options: dict | None = None,
    progress: bool = True,
) -> AQResult:
    """Additively quantize a model's weights (and activations); see the module docstring.

    Args:
      model: a :class:`jaxquant.Model` with float parameters.
      calib: its :class:`jaxquant.calib.Calibration` with ``XᵀX`` (``CalibConfig(xtx=True)``).
      target_bits: average stored bits per quantized weight for :func:`plan_aq_configs`.
      acts: an :class:`~jaxquant.quant.quantize.ActQuantConfig` (e.g. 8 bits), or ``None``
        to keep activations float.
      plan: ``{layer: AQConfig}`` to use instead of planning (e.g. :func:`preset_plan`);
        exactly one of ``target_bits`` and ``plan``.
      candidates: passed to :func:`plan_aq_configs`.
      rules: (regex → config) rules over layer names: ``None`` keeps a layer float, an
        :class:`AQConfig` fixes its configuration, anything else lets the planner choose.
        Default: first/last layer float, everything else planned.
      beam_size: beam width of the code search.
      finetune_steps: Adam steps per block (0: no block fine-tuning); finetune_lr,
        finetune_batch: its learning rate and calibration pairs per step.
      code_update_every, code_budget: PV-style code updates during block fine-tuning
        (:func:`finetune_block`; 0: codes frozen).
      layer_weighting: how the planner weighs a layer's relative error: ``"sensitivity"``
        (the default: by the measured output distortion per unit of its error,
        :func:`jaxquant.search.rd.weight_sensitivity`; the curves go to
        ``progress_dir/sensitivity``), ``"count"`` (by its number of weights: every weight
        alike), or ``{layer: weight}``. Only with ``target_bits``.
      min_code_bits: the planner's floor on each layer's code bits per weight
        (:func:`plan_aq_configs`; 0: none). Only with ``target_bits``; default
        :data:`DEFAULT_MIN_CODE_BITS` (1). Without a floor, sensitivity planning on
        ddpm-fmnist at W2 put the mid block at 0.2-0.35 code bits per weight (20-30 %
        relative error) and the FID was 16.7 instead of 12.2.
      planning: ``"gaussian"`` (the proxy fitted on a Gaussian weight, :func:`default_candidates`)
        or ``"measured"`` (:func:`wide_candidates`, :data:`LAYER_PROXY_DB`, and each layer's
        offset measured by :func:`measure_layer_offsets`, saved to
        ``progress_dir/offsets.json``). Only with ``target_bits``; ``candidates`` overrides
        the candidate set of either.
      progress_dir: directory for finished layers/blocks; rerunning with the same
        settings resumes there (``None``: nothing is saved).
      key: PRNG key or int seed; layer ``n`` uses ``fold_in(key, crc32(n))``.
      aq_options: more keyword arguments of
        :func:`~jaxquant.quant.additive.quantize_matrix` (``max_iters``, ``adam_steps``, …).
      progress: show a progress bar with each layer's objective.

    Raises:
      ConfigError: both or neither of ``target_bits``/``plan``, an infeasible budget, a
        calibration without ``XᵀX`` for a planned layer.
      CheckpointError: ``progress_dir`` holds a run with other settings.
    """
    from jaxquant.quant.quantize import attach_act_quantizers

    if (target_bits is None) == (plan is None):
        raise ConfigError("quantize_aq needs exactly one of target_bits (plan by budget) and plan")
    _check_code_updates(code_update_every, code_budget)
    if code_update_every and not finetune_steps:
        raise ConfigError("code updates happen during block fine-tuning: set finetune_steps > 0")
    if plan is not None and (layer_weighting is not None or min_code_bits is not None or planning != "gaussian"):
        raise ConfigError("layer_weighting, min_code_bits and planning apply to planning by target_bits, "
                          "not to a given plan")
    if planning not in PLANNINGS:
        raise ConfigError(f"planning must be one of {', '.join(PLANNINGS)}, got {planning!r}")
    layer_weighting = "sensitivity" if layer_weighting is None else layer_weighting
    if not isinstance(layer_weighting, dict) and layer_weighting not in LAYER_WEIGHTINGS:
        raise ConfigError(f"layer_weighting must be one of {', '.join(LAYER_WEIGHTINGS)} or a dict, "
                          f"got {layer_weighting!r}")
    kernels = layer_kernels(model.params)
    weights = None
    if plan is None:
        names, fixed = resolve_aq_rules(kernels, rules)
        check_aq_budget(model.params, target_bits, rules=rules, candidates=candidates, planning=planning,
                        min_code_bits=min_code_bits)
        _check_xtx(calib, names)
        if isinstance(layer_weighting, dict):
            weights = {n: float(v) for n, v in layer_weighting.items()}
        elif layer_weighting == "sensitivity":
            from jaxquant.search.rd import weight_sensitivity

            weights = weight_sensitivity(model, calib, [n for n in names if n not in fixed],
                                         out_dir=None if progress_dir is None else Path(progress_dir) / "sensitivity",
                                         progress=progress)
        coefficients = offsets = None
        if planning == "measured":
            candidates = wide_candidates if candidates is None else candidates
            coefficients = LAYER_PROXY_DB
            offsets = _layer_offsets({n: kernels[n] for n in names if n not in fixed}, calib.xtx, key, beam_size,
                                     progress_dir, progress)
        plan = plan_aq_configs({n: kernels[n] for n in names}, target_bits, candidates, fixed=fixed,
                               layer_weights=weights,
                               min_code_bits=DEFAULT_MIN_CODE_BITS if min_code_bits is None else min_code_bits,
                               coefficients=coefficients, layer_offsets=offsets)
    else:
        unknown = sorted(set(plan) - set(kernels))
        if unknown:
            raise ConfigError(f"plan names layer(s) not in the model: {', '.join(unknown[:5])}")
        for n, c in plan.items():
            if not c.fits(_shape(kernels[n])):
                raise ConfigError(f"AQ config {c.describe()} does not fit layer {n} of shape {_shape(kernels[n])}")
        _check_xtx(calib, plan)
    aq_options = dict(aq_options or {})
    key = _as_key(key)
    store = None
    if progress_dir is not None:
        store = _Progress(progress_dir, {
            "model": params_digest(model.params), "plan": {n: c.describe() for n, c in plan.items()},
            "beam_size": beam_size,
            "finetune": ([finetune_steps, finetune_lr, finetune_batch]
                         + ([code_update_every, code_budget] if code_update_every else []) if finetune_steps else 0),
            "key": _key_json(key), "aq_options": {k: repr(v) for k, v in sorted(aq_options.items())},
            "calibration": {"inputs": list(np.shape(calib.inputs)), "timesteps": [int(v) for v in calib.timesteps],
                            "config": repr(calib.config)}})

    # Layers outside the blocks first (they feed every block), then block by block.
    groups: dict[str | None, list[str]] = {None: []}
    for n in sorted(plan, key=lambda n: (block_of(n) is not None, _block_order(block_of(n)) if block_of(n) else ())):
        groups.setdefault(block_of(n), []).append(n)

    params = _copy_dicts(model.params)
    layer_recs: dict[str, dict] = {}
    block_recs: list[dict] = []
    bar = tqdm(total=len(plan), desc="AQ", unit="layer", disable=not progress)
    for block, names in groups.items():
        for name in names:
            cfg = plan[name]
            saved = store.load("layer", name) if store else None
            if saved is not None:
                tree, rec = saved
                weight = tree["kernel"]
            else:
                def show(r, name=name):
                    bar.set_postfix_str(f"{name} round {r['round']} {r['phase']}: objective {r['objective']:.4f}")

                weight, hist = quantize_kernel(
                    kernels[name], calib.xtx[name], cfg.num_codebooks, cfg.nbits, cfg.group_size,
                    key=_named_key(key, name), beam_size=beam_size,
                    progress=show if progress else None, **aq_options)
                rec = {"name": name, "config": cfg.describe() + (" kernel" if weight.kernel_grouping else ""),
                       "bits_per_weight": cfg.stored_bits(_shape(kernels[name])) / int(np.prod(_shape(kernels[name]))),
                       "objective_init": hist[0]["objective"], "objective": hist[-1]["objective"],
                       "seconds": hist[-1]["seconds"]}
                if store:
                    store.save("layer", name, {"kernel": weight}, rec)
            _set_layer(params, name, weight)
            xla.release_compiled_if_crowded()  # a compilation per layer shape and config adds up
            layer_recs[name] = rec
            bar.set_postfix_str(f"{name}: objective {rec['objective_init']:.4f} -> {rec['objective']:.4f}")
            bar.update(1)
        if block is not None and finetune_steps > 0:
            units = block_units(params, block)
            saved = store.load("block", block) if store else None
            if saved is not None:
                tree, rec = saved
                params = _set_paths(params, {u: tree[".".join(u)] for u in units})
            else:
                bar.set_postfix_str(f"fine-tuning {block}")
                params, rec = finetune_block(model, params, model.params, block, calib, steps=finetune_steps,
                                             lr=finetune_lr, batch_size=finetune_batch, key=key,
                                             code_update_every=code_update_every, code_budget=code_budget)
                if store:
                    store.save("block", block, {".".join(u): _get(params, u) for u in units}, rec)
            bar.set_postfix_str(f"{block}: output error {rec['error_before']:.4f} -> {rec['error_after']:.4f}")
            block_recs.append(rec)
    bar.close()
    params = _copy_dicts(params)
    full_plan = {n: plan.get(n) for n in kernels}
    params = attach_act_quantizers(model, calib, params, full_plan, acts)
    return AQResult(params, dict(plan), [layer_recs[n] for n in plan if n in layer_recs], block_recs, weights)
