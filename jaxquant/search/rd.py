"""Rate–distortion mixed precision (seed ``002``: Algorithms 1 and 2, eqs. 3–5, 13–17).

For every *site* — the weights of each quantizable layer, and each activation that
uniform quantization would quantize (a quantized layer's input, the q/k/v operands of
an attention whose projections are quantized) — and every candidate bit width, the
**curve** holds the output distortion of the whole network when *only that site* is
quantized (Algorithm 1), measured on calibration inputs ``(x_t, t)`` of each timestep
group against the float network's output on the same inputs. Under the additivity
property (eq. 5: the distortion of quantizing many sites ≈ the sum of the single-site
distortions) the best plan for a size budget is found by Lagrangian equal-slope
selection (eqs. 14–17, Algorithm 2): for a multiplier ``λ ≥ 0`` every curve takes the
point minimising ``d + λ·s``; ``λ`` is bisected until the total size meets the budget.
(The seed writes ``d − γ·s`` with ``γ = −λ`` the common slope of the curves.)

Sizes, and the budgets of ``allocate_plan``:

* weights: the exact storage of the layer's :class:`~jaxquant.quant.uniform.UniformWeight`
  at that bit width (codes, scales, zero points; :mod:`jaxquant.quant.accounting`).
  A target of ``w_bits`` average bits is the storage of every quantized layer at
  ``w_bits`` (interpolated between integers), so an RD model at ``--w-bits 4`` is never
  larger than the uniform W4 model of the same layers.
* activations: as the seed, the number of values of the site per sample times the bit
  width; a target of ``a_bits`` is ``a_bits`` times the values of all sites. Weight and
  activation budgets are met separately (the CLI asks for both averages).

What is compared (``CurveConfig.lookahead``): by default, as the seed, the network's
output (the predicted noise) at the step whose inputs carry the perturbation. With a
lookahead of ``k`` steps, the perturbed step is followed by ``k`` deterministic DDIM
steps of the *float* network along the calibration's own sampling schedule, and the
distortion compares the clean sample ``x̂₀`` predicted at the last of them with the float
trajectory's (``k = 0``: ``x̂₀`` of the perturbed step itself; near the end of the
trajectory the lookahead stops at its last step). This measures what an error made at
one step does to the sample after the following steps have acted on it: an error the
denoiser removes (high-frequency, noise-like) counts less than one it carries forward
(a change of content). Each single-site curve still perturbs only the steps of its own
timestep group, so the sum over groups keeps the additive reading across timesteps.

Along whole trajectories (``CurveConfig.trajectory``): the inputs are the calibration
trajectories at the *first* step of each timestep group, the site is quantized at *every*
step of that group, the float network runs the steps after it, and ``x̂₀`` at the last
step (the sample) is compared. An error that every step of a group repeats in the same
direction accumulates here, as it does in quantized sampling, where one perturbed step
followed by float steps (the lookahead) lets the float steps repair it. With one timestep
group this is the drift of whole quantized trajectories; with ``G`` groups each curve row
still perturbs only its own group. Each input costs a whole trajectory of forward passes.

In feature space (``CurveConfig.features``, e.g. ``"fmnist"``): the compared ``x̂₀`` (the
lookahead's, ``k = 0`` when none is given) is mapped to an image as the pipelines do
(``clip(x̂₀/2 + 1/2, 0, 1)·255``, decoded by the float first stage for latent models, not
rounded) and through a feature network of :mod:`jaxquant.eval.features`; the distortion
is the normalised squared error of its ``feature_output`` vector (``"pool"``: the
features FID is computed on; ``"logits"``: the class scores). This weighs an error by what
it changes in the content the evaluation sees, rather than pixel by pixel. SSIM has no
meaning on feature vectors: such curves give only ``"mse"``.

Weights on top of the activations (``CurveConfig.act_context``): single-site weight
curves measure each weight with the activations float, and miss how a coarse weight and
coarse activations compound (BENCHMARKS.md: RD W4A4). With a context, every weight curve
point is measured with the given activation sites quantized at the given widths (the
activation plan; attention probabilities too when q, k and v all are) and stores the
distortion the weight *adds* to that of the context alone (the context's own err² and
1 − SSIM subtracted; a point may be negative when errors cancel), or — with
``context_reference="context"`` — the weight's error against the output of the network
with the context's activations and float weights (never negative; the cross term of the
two errors left out, as additivity leaves it out between any two sites). The
activation curves stay single-site: :func:`quantize_model_rd` with
``conditional_weights`` plans the activations on them first, then measures the weight
curves given that plan, then allocates the weights on those.

Timestep groups: every curve has one row per group (the calibration's groups).
Activation bits are chosen per group (their own budget each, stored as per-group bit
widths in :class:`~jaxquant.quant.activation.ActQuant`); weights are shared by all
groups and chosen on the sum of the groups' distortions, or — ``per_group_weights`` —
chosen per group with all ``G`` copies counted in the one weight budget (a plan only:
such models cannot be written as a model directory yet).

Computation (the JAX way): the forward pass is a pure function of the parameters; the
parameter tree carries, at every site, a probe whose perturbation is switched on by a
traced site index (``lax.cond``, so only the selected site's branch runs). One jitted
function per site kind is compiled once and called per site, ``vmap``-ed over that
site's candidates (the quantized kernels, or the activation scales), and chunked over
the input samples; with several devices the candidate axis is sharded over them.
Finished curves are written to ``OUT/curves.json`` after each site; a rerun skips them.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm.auto import tqdm

from jaxquant import xla
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.quant import dispatch
from jaxquant.quant.accounting import leaf_storage
from jaxquant.quant.activation import ActQuant, at_timestep_group, fake_quant
from jaxquant.quant.quantize import (ActQuantConfig, _projections_quantized, act_quantizer, site_extremes,
                                     weight_statistics)
from jaxquant.quant.rules import Rule, _copy_dicts, _split_name, apply_plan, default_rules, layer_kernels, resolve
from jaxquant.quant.uniform import UniformWeight, WeightQuantConfig, quantize_weight
from jaxquant.search.distortion import DISTORTIONS, SSIMConfig, distortion, output_stats

#: Candidate bit widths of weights and of activations (the seed's ranges, the defaults).
WEIGHT_BITS = (2, 3, 4, 5, 6, 7, 8)
ACT_BITS = (4, 5, 6, 7, 8)
#: The narrowest and the widest activation candidate a curve may hold (``CurveConfig.act_bits``).
MIN_ACT_BITS = 2
MAX_ACT_BITS = 16
CURVES_FORMAT = "jaxquant-rd-curves"
CURVES_VERSION = 1


def act_candidates(max_bits: int = 8, min_bits: int = 4) -> tuple[int, ...]:
    """Activation candidate widths from ``min_bits`` to ``max_bits``: every width from
    ``min_bits`` to 8 (the defaults give :data:`ACT_BITS`, 4..8), then every second width
    above 8 (``act_candidates(16)``: 4..8, 10, 12, 14, 16) and ``max_bits`` itself. Above 8
    bits the curves flatten (the rounding error falls 4x per bit while the clipping error
    is gone), so the odd widths add cost and little choice. Below 4 (``min_bits`` 2 or 3;
    the seed's curves run from 1 bit) an average of 4 bits leaves the allocation a choice,
    as widths above 8 do at an average of 8."""
    if not 8 <= max_bits <= MAX_ACT_BITS:
        raise ConfigError(f"the widest activation candidate must be in 8..{MAX_ACT_BITS}, got {max_bits}")
    if not MIN_ACT_BITS <= min_bits <= ACT_BITS[0]:
        raise ConfigError(f"the narrowest activation candidate must be in {MIN_ACT_BITS}..{ACT_BITS[0]}, got {min_bits}")
    top = ACT_BITS[-1]
    return tuple(sorted({*range(min_bits, top + 1), *range(top + 2, max_bits + 1, 2), max_bits}))


# --------------------------------------------------------------------------- sites and inputs


@dataclasses.dataclass(frozen=True)
class Site:
    """A quantization site.

    Attributes:
      kind: ``"weight"`` (a layer's kernel), ``"act"`` (an activation with a curve) or
        ``"probs"`` (attention probabilities, quantized at a fixed width, no curve).
      name: the layer name (weights, layer inputs) or the calibration's site name
        (``<attention>.q``).
      node: keys of the parameter dict that holds the kernel / the quantizer.
      leaf: ``"kernel"``, ``"input_quant"``, ``"q_quant"``, …
      numel: weights of the kernel, or values of the activation per sample.
      split: first channel of the second part of a split activation (0: none).
    """

    kind: str
    name: str
    node: tuple[str, ...]
    leaf: str
    numel: int
    split: int = 0

    @property
    def key(self) -> str:
        """Unique key: ``weight:<layer>`` / ``act:<site>``."""
        return f"{self.kind}:{self.name}"


@dataclasses.dataclass(frozen=True)
class CurveConfig:
    """How curves are measured.

    Attributes:
      weight_bits / act_bits: candidate bit widths: weights 2..8; activations 2..16
        (:data:`MIN_ACT_BITS`, :data:`MAX_ACT_BITS`; the seed's 4..8 by default). Above 8
        bits an activation candidate takes the full range the calibration saw
        (:meth:`ActQuantConfig.at_bits`). Candidates beyond 4..8 give the allocation room
        at the ends of the range: with 4..8 an average of 8 bits puts every site at 8 (and
        RD W8A8 can only equal uniform W8A8, BENCHMARKS.md), an average of 4 every site at
        4; with wider candidates a few sensitive sites can be paid for by the others.
      inputs_per_group: calibration inputs ``(x_t, t)`` drawn per timestep group (the
        seed uses 50 images in all); for a guided class-conditional model each is used
        twice, with its class and with the unconditional label, as guided sampling does.
      batch_size: samples per call (times the candidates of a site: the memory bound).
      seed: which calibration inputs are drawn.
      ssim: SSIM settings of the ``"mse+ssim"`` distortion.
      lookahead: ``None`` (the seed): compare the network output of the perturbed step;
        ``k ≥ 0``: compare the ``x̂₀`` predicted after ``k`` further float DDIM steps
        (module docstring). Needs a DDIM calibration without classifier-free guidance.
      features: compare the ``feature_output`` of this feature network
        (:func:`jaxquant.eval.features.get_feature_net`) on the image of ``x̂₀`` instead of
        pixels (module docstring); implies a lookahead (``0`` when it is ``None``).
      feature_output: ``"pool"`` or ``"logits"``.
      trajectory: measure along whole trajectories (module docstring): inputs at each
        group's first step, the site quantized at all of the group's steps, the sample
        compared. Replaces ``lookahead`` (which must then be ``None``); needs a DDIM
        calibration without classifier-free guidance, as a lookahead does.
      act_context: ``(activation site, bits per group)`` pairs (or a dict): measure the
        weight curves with these activations quantized (module docstring). A problem with
        a context has weight curves only.
      context_reference: with ``act_context``, what a weight point is measured against:
        ``"float"``, the float network's output, less the context's own distortion (the
        increase the weight causes); ``"context"``, the output of the network with the
        context's activations and float weights (the weight's own error, on the inputs
        the quantized activations give it).
    """

    weight_bits: tuple[int, ...] = WEIGHT_BITS
    act_bits: tuple[int, ...] = ACT_BITS
    inputs_per_group: int = 8
    batch_size: int = 16
    seed: int = 0
    ssim: SSIMConfig = SSIMConfig()
    lookahead: int | None = None
    features: str | None = None
    feature_output: str = "pool"
    trajectory: bool = False
    act_context: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    context_reference: str = "float"

    def __post_init__(self):
        if not self.weight_bits or any(not 2 <= b <= 8 for b in self.weight_bits):
            raise ConfigError(f"weight candidate bits must be in 2..8, got {self.weight_bits}")
        if not self.act_bits or any(not MIN_ACT_BITS <= b <= MAX_ACT_BITS for b in self.act_bits):
            raise ConfigError(f"activation candidate bits must be in {MIN_ACT_BITS}..{MAX_ACT_BITS}, got {self.act_bits}")
        if self.inputs_per_group < 1 or self.batch_size < 1:
            raise ConfigError("inputs_per_group and batch_size must be positive")
        if self.lookahead is not None and (isinstance(self.lookahead, bool) or int(self.lookahead) != self.lookahead
                                           or self.lookahead < 0):
            raise ConfigError(f"lookahead must be None or a whole number of steps ≥ 0, got {self.lookahead!r}")
        if self.feature_output not in ("pool", "logits"):
            raise ConfigError(f"feature_output must be 'pool' or 'logits', got {self.feature_output!r}")
        if self.trajectory and self.lookahead is not None:
            raise ConfigError("trajectory curves run every input to the end of its trajectory; leave lookahead unset")
        if self.features is not None and self.lookahead is None and not self.trajectory:
            object.__setattr__(self, "lookahead", 0)  # features are taken of x̂₀
        if self.context_reference not in ("float", "context"):
            raise ConfigError(f"context_reference must be 'float' or 'context', got {self.context_reference!r}")
        if self.act_context is not None:
            ctx = dict(self.act_context)
            if not ctx:
                raise ConfigError("an activation context needs at least one activation site (or None)")
            object.__setattr__(self, "act_context", tuple(sorted((str(k), tuple(int(b) for b in v))
                                                                 for k, v in ctx.items())))
        object.__setattr__(self, "weight_bits", tuple(sorted(set(self.weight_bits))))
        object.__setattr__(self, "act_bits", tuple(sorted(set(self.act_bits))))


@dataclasses.dataclass
class RDInputs:
    """Calibration inputs of the curves, all groups concatenated (``B`` samples)."""

    x: np.ndarray            # [B, H, W, C]
    t: np.ndarray            # [B] int32
    y: np.ndarray | None     # [B] labels (class-conditional models)
    group: np.ndarray        # [B] timestep group
    ref: np.ndarray          # [B, ...] float output compared (network output, x̂₀ with a lookahead, or its features)
    chain: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    """With a lookahead ``k``: ``(t, t_prev, on, perturbed)``, each ``[B, k + 1]``, the
    timesteps of the perturbed step and the ``k`` steps after it; ``on`` is False past the
    trajectory's end; ``perturbed`` marks the steps run with the quantized parameters (the
    first only, or with ``trajectory`` all steps of the input's group)."""

    def ref_energy(self, groups: int) -> np.ndarray:
        """``[G]`` summed ``‖O‖²`` of the reference outputs of each timestep group."""
        return np.asarray([float(np.sum(np.square(self.ref[self.group == g], dtype=np.float64)))
                           for g in range(groups)])


class RDProblem:
    """A model, its calibration, the sites and their quantizers (cached).

    Args:
      model: a :class:`jaxquant.Model` with float parameters.
      calib: its :class:`~jaxquant.calib.Calibration` (inputs, activation samples, groups).
      weights: the weight quantizer form (symmetry, group size, clipping search) for
        layers the rules do not override; RD chooses each layer's bits.
      acts: activation quantizer settings (range method, softmax bits, attention
        operands, split ranges); ``None`` keeps activations float.
      rules: which layers are quantized (default: all but the first/last layer), and
        with which form; their ``bits`` are replaced by the candidates.
      config: candidates and inputs of the curves.
    """

    def __init__(self, model, calib, weights: WeightQuantConfig | None = None, acts: ActQuantConfig | None = None,
                 rules: Sequence[Rule] | None = None, config: CurveConfig = CurveConfig()):
        self.model = model
        self.calib = calib
        self.weights = weights or WeightQuantConfig()
        self.acts = acts if acts is not None and acts.bits is not None else None
        self.rules = list(rules) if rules is not None else default_rules(self.weights)
        self.config = config
        self.groups = int(calib.config.groups)
        if config.lookahead is not None or config.trajectory:
            if calib.config.sampler != "ddim":
                raise ConfigError(f"a lookahead or trajectory curves follow the calibration's DDIM trajectory; "
                                  f"this calibration used the {calib.config.sampler!r} sampler "
                                  "(calibrate with --sampler ddim)")
            if model.is_class_conditional and calib.config.cfg_scale != 1.0:
                raise ConfigError("a lookahead or trajectory curves with classifier-free guidance are not supported "
                                  "yet (calibrate without guidance, or measure the network output)")
        self._features = None
        if config.features is not None:
            from jaxquant.eval.features import get_feature_net

            net = get_feature_net(config.features)
            if net.traced is None:
                raise ConfigError(f"feature network {config.features!r} has no traceable form")
            self._features = net.traced
        self._kernels = layer_kernels(model.params)
        self.layer_configs = {n: c for n, c in resolve(self._kernels, self.rules).items() if c is not None}
        if not self.layer_configs:
            raise ConfigError("the rules leave no layer to quantize")
        self._xtx = weight_statistics(calib, self.layer_configs)  # for error-feedback (GPTQ) weights
        self.sites = self._find_sites()
        if config.act_context is not None:
            self._check_context(config.act_context)
        self.inputs = self._select_inputs()
        self._wq: dict[tuple[str, int], UniformWeight] = {}
        self._aq: dict[tuple[str, int, int], tuple[np.ndarray, np.ndarray]] = {}

    # -- sites

    @property
    def weight_sites(self) -> list[Site]:
        return [s for s in self.sites if s.kind == "weight"]

    @property
    def act_sites(self) -> list[Site]:
        """Sites with a curve (``"act"``) followed by the fixed-width ``"probs"`` sites."""
        return [s for s in self.sites if s.kind == "act"] + [s for s in self.sites if s.kind == "probs"]

    @property
    def curve_sites(self) -> list[Site]:
        """Sites with a curve: weights and activations, or with an activation context
        (:class:`CurveConfig`) the weights only."""
        kinds = ("weight",) if self.config.act_context is not None else ("weight", "act")
        return [s for s in self.sites if s.kind in kinds]

    @property
    def context(self) -> dict[str, tuple[int, ...]] | None:
        """The activation context of the weight curves (site → bits per group), or ``None``."""
        return None if self.config.act_context is None else dict(self.config.act_context)

    def given_activations(self, context: dict[str, Sequence[int]], reference: str | None = None) -> "RDProblem":
        """This problem with its weight curves measured given ``context`` (activation site →
        bits per group; :class:`CurveConfig` ``act_context``), against ``reference``
        (default: this config's ``context_reference``). Shares the sites, the inputs and
        their float outputs, and the quantizer caches; has its own evaluator."""
        cfg = dataclasses.replace(self.config, act_context=context,
                                  context_reference=reference or self.config.context_reference)
        self._check_context(cfg.act_context)
        other = copy.copy(self)
        other.config = cfg
        other.__dict__.pop("_evaluator", None)
        return other

    def _check_context(self, ctx) -> None:
        if self.acts is None:
            raise ConfigError("weight curves given quantized activations need activation quantizer settings (acts)")
        names = {s.name for s in self.sites if s.kind == "act"}
        for name, bits in ctx:
            if name not in names:
                raise ConfigError(f"activation context: {name!r} is not an activation site of this problem")
            if len(bits) != self.groups:
                raise ConfigError(f"activation context: {name!r} has {len(bits)} widths for {self.groups} "
                                  "timestep group(s)")

    def site(self, key: str) -> Site:
        for s in self.sites:
            if s.key == key:
                return s
        raise ConfigError(f"no quantization site {key!r}")

    def candidates(self, site: Site) -> tuple[int, ...]:
        return self.config.weight_bits if site.kind == "weight" else self.config.act_bits

    def _find_sites(self) -> list[Site]:
        from jaxquant.calib.calibration import _model_fns
        from jaxquant.models.introspect import conv_layers

        params = self.model.params
        sites = [Site("weight", n, tuple(_split_name(params, n)), "kernel", int(np.prod(np.shape(self._kernels[n]))))
                 for n in self.layer_configs]
        if self.acts is None:
            return sites
        missing = [n for n in self.layer_configs if n not in self.calib.samples]
        if missing:
            raise ConfigError(f"the calibration has no record of layer {missing[0]!r}: was it made with this model?")
        _, capture = _model_fns(self.model, 1.0)
        x = jax.ShapeDtypeStruct((1, *self.model.sample_shape), jnp.float32)
        i = jax.ShapeDtypeStruct((1,), jnp.int32)
        shapes = jax.eval_shape(capture, params, x, i, i)
        splits = {n: c.input_split for n, c in conv_layers(self.model).items()} if self.acts.split else {}
        full_plan = {n: self.layer_configs.get(n) for n in self._kernels}
        for n in self.layer_configs:
            sites.append(Site("act", n, tuple(_split_name(params, n)), "input_quant",
                              int(np.prod(shapes[n].shape[1:])), splits.get(n, 0)))
        if self.acts.attention_matmuls:
            probs = []
            for name in self.calib.sites:
                base, _, leaf = name.rpartition(".")
                if leaf not in ("q", "k", "v", "probs") or not _projections_quantized(base, full_plan):
                    continue
                s = Site("probs" if leaf == "probs" else "act", name, tuple(_split_name(params, base)),
                         f"{leaf}_quant", int(np.prod(shapes[name].shape[1:])))
                (probs if leaf == "probs" else sites).append(s)
            sites += probs
        return sites

    def _select_inputs(self) -> RDInputs:
        c = self.calib
        S, N = c.inputs.shape[:2]
        rng = np.random.default_rng(self.config.seed)
        picks = []
        for g in range(self.groups):
            steps = np.flatnonzero(np.asarray(c.step_groups) == g)
            if len(steps) == 0:
                raise ConfigError(f"timestep group {g} has no calibration step; calibrate with more --steps "
                                  f"(at least as many as groups, spread over all timesteps)")
            if self.config.trajectory:
                steps = steps[:1]  # whole trajectories start at the group's first step
            pairs = np.stack(np.meshgrid(steps, np.arange(N), indexing="ij"), -1).reshape(-1, 2)
            k = min(self.config.inputs_per_group, len(pairs))
            picks.append(pairs[np.sort(rng.choice(len(pairs), k, replace=False))])
        pairs = np.concatenate(picks)
        x = np.asarray(c.inputs)[pairs[:, 0], pairs[:, 1]].astype(np.float32)
        t = np.asarray(c.timesteps)[pairs[:, 0]].astype(np.int32)
        y = np.asarray(c.labels)[pairs[:, 1]].astype(np.int32) if self.model.is_class_conditional else None
        group = np.asarray(c.step_groups)[pairs[:, 0]].astype(np.int32)
        chain = None
        if self.config.lookahead is not None or self.config.trajectory:
            from jaxquant.diffusion.samplers import previous_timesteps

            last = S - 1
            k = last - int(pairs[:, 0].min()) if self.config.trajectory else self.config.lookahead
            steps = pairs[:, :1] + np.arange(k + 1)[None]      # [B, k + 1]
            prevs = previous_timesteps(self.model.schedule, S, "ddim")
            at = np.minimum(steps, last)
            on = steps <= last
            if self.config.trajectory:
                perturbed = on & (np.asarray(c.step_groups)[at] == group[:, None])
            else:
                perturbed = np.zeros_like(on)
                perturbed[:, 0] = True
            chain = (np.asarray(c.timesteps)[at].astype(np.int32), np.asarray(prevs)[at].astype(np.int32), on,
                     perturbed)
        null = getattr(self.model.network_config, "unconditional_label", None)
        if y is not None and c.config.cfg_scale != 1.0 and null is not None:
            # Guided sampling also runs the model on the unconditional label: measure both.
            x, t, group = np.concatenate([x, x]), np.concatenate([t, t]), np.concatenate([group, group])
            y = np.concatenate([y, np.full_like(y, null)])
        return RDInputs(x, t, y, group, self._forward_float(x, t, y, chain), chain)

    def _forward_float(self, x, t, y, chain) -> np.ndarray:
        fwd = xla.jit(lambda p, x, t, y, chain: self.output(p, p, x, t, y, chain))
        bs = self.config.batch_size
        parts, order = [], []
        for j in self.batches(bs, len(x), None if chain is None else chain[3]):
            parts.append(np.asarray(fwd(self.model.params, *_take((x, t, y, chain), j))))
            order.append(j)
        return np.concatenate(parts)[np.argsort(np.concatenate(order))].astype(np.float32)

    def batches(self, size: int, n: int | None = None, perturbed: np.ndarray | None = None) -> list[np.ndarray]:
        """Index arrays of at most ``size`` inputs (all ``n``, default :attr:`inputs`'s),
        each of one ``perturbed`` pattern (so :meth:`output` can pick the parameters of
        a step by a scalar, the same for the whole batch): consecutive runs otherwise."""
        if n is None:
            n = len(self.inputs.t)
            perturbed = None if self.inputs.chain is None else self.inputs.chain[3]
        if perturbed is None or not self.config.trajectory:
            return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]
        _, kind = np.unique(perturbed, axis=0, return_inverse=True)
        out = []
        for k in np.unique(kind):
            idx = np.flatnonzero(kind.ravel() == k)
            out += [idx[i:i + size] for i in range(0, len(idx), size)]
        return out

    def output(self, params: Any, float_params: Any, x: jax.Array, t: jax.Array, y: jax.Array | None,
               chain: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None,
               apply: Callable | None = None) -> jax.Array:
        """What the distortion compares, traceable: ``apply(params, x, t, y)`` (the network
        output) without a lookahead; with one, ``x̂₀`` after the perturbed step and the
        ``k`` DDIM steps of ``apply(float_params, …)`` given by ``chain`` (:class:`RDInputs`),
        or its features (``CurveConfig.features``). ``apply`` defaults to the model's plain
        forward pass."""
        if apply is None:
            module = self.model.module
            apply = lambda p, x, t, y: module.apply({"params": p}, x, t, y)  # noqa: E731
        if chain is None:
            return apply(params, x, t, y)
        from jaxquant.diffusion.samplers import ddim_step, predict_x0

        sched = self.model.schedule
        ts, prevs, on, perturbed = chain
        mask = lambda j: on[:, j].reshape(-1, *([1] * (x.ndim - 1)))  # noqa: E731
        x0 = None
        for j in range(ts.shape[1]):
            if j == 0 or not self.config.trajectory:
                eps = apply(params if j == 0 else float_params, x, ts[:, j], y)
            else:  # the batch shares its perturbed pattern (RDProblem.batches): one branch runs
                eps = lax.cond(perturbed[0, j], lambda a: apply(params, *a), lambda a: apply(float_params, *a),
                               (x, ts[:, j], y))
            x0_j = predict_x0(sched, x, eps, ts[:, j])
            x0 = x0_j if j == 0 else jnp.where(mask(j), x0_j, x0)
            if j + 1 < ts.shape[1]:
                x = jnp.where(mask(j + 1), ddim_step(sched, x, eps, ts[:, j], prevs[:, j]), x)
        return x0 if self._features is None else self._feature_vector(float_params, x0)

    def _feature_vector(self, float_params: Any, x0: jax.Array) -> jax.Array:
        """``[B, D]`` features of the images of ``x̂₀`` (as the pipelines map samples to
        images, without rounding; latents decoded by the float first stage)."""
        if hasattr(self.model.module, "decode"):
            x0 = self.model.module.apply({"params": float_params}, x0, method="decode")
        pixels = jnp.clip(x0 / 2 + 0.5, 0.0, 1.0) * 255.0
        return self._features(pixels)[self.config.feature_output].reshape(x0.shape[0], -1)

    # -- quantizers

    def weight_quant(self, layer: str, bits: int) -> UniformWeight:
        """The layer's kernel quantized at ``bits`` with its rule's quantizer form (cached)."""
        key = (layer, int(bits))
        if key not in self._wq:
            cfg = dataclasses.replace(self.layer_configs[layer], bits=int(bits))
            self._wq[key] = quantize_weight(self._kernels[layer], cfg, self._xtx.get(layer))
        return self._wq[key]

    def weight_size(self, layer: str, bits: int) -> int:
        """Storage bits of the layer at ``bits`` (:func:`jaxquant.quant.accounting.leaf_storage`)."""
        return leaf_storage(layer + ".kernel", self.weight_quant(layer, bits)).bits

    def act_params(self, site: Site, group: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scale [2], zero [2])`` of the site's quantizer for one group and width (cached);
        both parts equal for unsplit sites."""
        key = (site.name, int(group), int(bits))
        if key not in self._aq:
            samples = self._site_samples(site)
            lo, hi = site_extremes(self.calib, site.name, self._merges_parts(site))
            q = act_quantizer(samples[group:group + 1], int(bits), self.acts.at_bits(int(bits)), site.split,
                              (lo[group:group + 1], hi[group:group + 1]))
            s, z = np.asarray(q.scale[0], np.float32), np.asarray(q.zero[0], np.float32)
            self._aq[key] = (np.resize(s, 2), np.resize(z, 2))
        return self._aq[key]

    def _merges_parts(self, site: Site) -> bool:
        """Whether a two-part input (a concatenation) is quantized with one range."""
        return np.shape(self.calib.samples[site.name])[1] == 2 and not site.split

    def _site_samples(self, site: Site) -> np.ndarray:
        samples = np.asarray(self.calib.samples[site.name])
        if self._merges_parts(site):
            samples = samples.reshape(samples.shape[0], 1, -1)
        return samples

    def act_quantizer(self, site: Site, group_bits: Sequence[int]) -> ActQuant:
        """An :class:`ActQuant` with one bit width per timestep group (an int when all agree)."""
        group_bits = tuple(int(b) for b in group_bits)
        p = 2 if site.split else 1
        scale = np.stack([self.act_params(site, g, b)[0][:p] for g, b in enumerate(group_bits)])
        zero = np.stack([self.act_params(site, g, b)[1][:p] for g, b in enumerate(group_bits)])
        bits = group_bits[0] if len(set(group_bits)) == 1 else group_bits
        return ActQuant(scale, zero, bits, site.split)

    def probs_bits(self, plan_act_bits: dict[str, Sequence[int]], site: Site) -> int:
        """Width of an attention's probabilities: ``softmax_bits`` (at least its operands')."""
        base = site.name.rpartition(".")[0]
        own = [max(b) for k, b in plan_act_bits.items() if k.rpartition(".")[0] == base]
        return max([self.acts.softmax_bits, *own])

    def fingerprint(self) -> dict:
        """What the curves depend on; a resumed run must match it."""
        h = hashlib.sha256()
        for leaf in jax.tree_util.tree_leaves(self.model.params):
            h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
        h.update(self.inputs.x.tobytes())
        h.update(self.inputs.t.tobytes())
        for s in self.sites:
            if s.kind != "weight":
                h.update(np.ascontiguousarray(self.calib.samples[s.name], np.float32).tobytes())
        extra = {} if self.config.features is None else {"features": f"{self.config.features}:{self.config.feature_output}"}
        config = {k: v for k, v in dataclasses.asdict(self.config).items()
                  if k != "batch_size" and _LATER_DEFAULTS.get(k, _NO) != v}
        if self.config.act_context is None:
            config.pop("context_reference", None)  # means nothing without a context
        else:
            config["act_context"] = context_digest(self.config.act_context)
            extra["act_context"] = config["act_context"]
        return {
            **extra,
            "params_and_inputs_sha256": h.hexdigest(),
            "groups": self.groups,
            "layers": {n: _form(c) for n, c in self.layer_configs.items()},
            "acts": _form(self.acts),
            "config": repr(config),
        }


#: Curve settings added after curves were first stored, at their defaults: left out of the
#: fingerprint, so curves made before them still resume and are reused.
_LATER_DEFAULTS = {"features": None, "feature_output": "pool", "trajectory": False, "act_context": None,
                   "context_reference": "float"}
_NO = object()


def context_digest(context: Sequence[tuple[str, Sequence[int]]] | dict[str, Sequence[int]]) -> str:
    """A short, order-free name of an activation context (sites and their widths)."""
    items = sorted((str(k), [int(b) for b in v]) for k, v in dict(context).items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _take(arrays: Sequence[Any], idx: np.ndarray) -> tuple:
    """``arrays`` (arrays, ``None`` or tuples of arrays) at the rows ``idx``."""
    return tuple(None if a is None else tuple(b[idx] for b in a) if isinstance(a, tuple) else a[idx] for a in arrays)


#: Quantizer settings added after curves were first stored, at their defaults: left out of
#: a form, so curves made before them keep their fingerprint.
_LATER_FORM_DEFAULTS = {"error_feedback": False, "damp": 0.01}


def _form(cfg: Any) -> str:
    """A quantizer config without its ``bits`` (RD chooses those): what curves depend on."""
    if dataclasses.is_dataclass(cfg):
        return repr({k: v for k, v in dataclasses.asdict(cfg).items()
                     if k != "bits" and _LATER_FORM_DEFAULTS.get(k, _NO) != v})
    return repr(cfg)


# --------------------------------------------------------------------------- probes


@flax.struct.dataclass
class _KernelProbe:
    """A kernel that is replaced by a candidate (flat, padded ``row``) when ``on``."""

    w: jax.Array
    row: jax.Array
    on: jax.Array

    def candidate(self, row: jax.Array) -> jax.Array:
        return row[:math.prod(self.w.shape)].reshape(self.w.shape)


def _probe_dense(x, k: _KernelProbe):
    dot = lambda w: jnp.dot(x, w.astype(x.dtype), precision=lax.Precision.HIGHEST)  # noqa: E731
    return lax.cond(k.on, lambda r: dot(k.candidate(r)), lambda r: dot(k.w), k.row)


def _probe_conv(x, k: _KernelProbe, strides, padding):
    conv = lambda w: lax.conv_general_dilated(  # noqa: E731
        x, w.astype(x.dtype), window_strides=tuple(strides), padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=lax.Precision.HIGHEST)
    return lax.cond(k.on, lambda r: conv(k.candidate(r)), lambda r: conv(k.w), k.row)


dispatch.register_weight_type(_KernelProbe, lambda k, dtype: jnp.where(k.on, k.candidate(k.row), k.w).astype(dtype),
                              dense_kernel=_probe_dense, conv_kernel=_probe_conv)


@flax.struct.dataclass
class _ActProbe:
    """An activation quantizer with per-sample ``scale``/``zero`` ``[B, 2]`` and ``qmax [B]``,
    applied when ``on`` (the same arithmetic as :class:`ActQuant` of the sample's group)."""

    scale: jax.Array
    zero: jax.Array
    qmax: jax.Array
    on: jax.Array
    split: int = flax.struct.field(pytree_node=False, default=0)

    def __call__(self, x: jax.Array) -> jax.Array:
        def quant(x, scale, zero, qmax):
            shape = (x.shape[0],) + (1,) * (x.ndim - 1)
            part = lambda v, p: fake_quant(v, scale[:, p].reshape(shape), zero[:, p].reshape(shape),  # noqa: E731
                                           qmax.reshape(shape))
            if self.split:
                return jnp.concatenate([part(x[..., :self.split], 0), part(x[..., self.split:], 1)], axis=-1)
            return part(x, 0)

        return lax.cond(self.on, quant, lambda x, *_: x, x, self.scale, self.zero, self.qmax)


def _with_probes(params: dict, sites: Sequence[Site], make: Callable[[int, Site, Any], Any]) -> dict:
    """A copy of ``params`` with ``make(i, site, current)`` at each site's leaf."""
    p = _copy_dicts(params)
    for i, s in enumerate(sites):
        node = p
        for k in s.node:
            node = node[k]
        node[s.leaf] = make(i, s, node.get(s.leaf))
    return p


# --------------------------------------------------------------------------- curves


@dataclasses.dataclass
class SiteCurve:
    """Measured curve of one site.

    Attributes:
      site: the site.
      bits: candidate bit widths (``M``).
      sizes: ``[M]`` size of each candidate in bits (module docstring).
      err2: ``[G, M]`` summed ``‖Ô − O‖²`` over each group's inputs.
      dssim: ``[G, M]`` summed ``1 − SSIM`` over each group's inputs.
    """

    site: Site
    bits: tuple[int, ...]
    sizes: np.ndarray
    err2: np.ndarray
    dssim: np.ndarray

    def to_json(self) -> dict:
        return {"site": dataclasses.asdict(self.site), "bits": list(self.bits), "sizes": self.sizes.tolist(),
                "err2": self.err2.tolist(), "dssim": self.dssim.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "SiteCurve":
        s = dict(d["site"])
        s["node"] = tuple(s["node"])
        return cls(Site(**s), tuple(d["bits"]), np.asarray(d["sizes"], np.float64),
                   np.asarray(d["err2"], np.float64), np.asarray(d["dssim"], np.float64))


@dataclasses.dataclass
class RDCurves:
    """All curves of a problem, with the per-group reference statistics.

    Attributes:
      curves: ``{site key: SiteCurve}`` in site order.
      ref2: ``[G]`` summed ``‖O‖²`` per group.
      count: ``[G]`` inputs per group.
      settings: the problem's fingerprint.
    """

    curves: dict[str, SiteCurve]
    ref2: np.ndarray
    count: np.ndarray
    settings: dict

    @property
    def groups(self) -> int:
        return len(self.ref2)

    def distortion(self, key: str, kind: str = "mse") -> np.ndarray:
        """``[G, M]`` distortion of the site's candidates per group."""
        c = self.curves[key]
        self.check_kind(kind)
        return distortion(kind, c.err2, self.ref2[:, None], c.dssim, self.count[:, None])

    def check_kind(self, kind: str) -> None:
        """Raise ``ConfigError`` for a distortion these curves cannot give (SSIM of features)."""
        if kind == "mse+ssim" and self.settings.get("features"):
            raise ConfigError(f"curves measured in feature space ({self.settings['features']}) have no SSIM "
                              "term; use the 'mse' distortion with them")

    def of_kind(self, kind: str) -> list[SiteCurve]:
        return [c for c in self.curves.values() if c.site.kind == kind]

    def to_json(self) -> dict:
        return {"format": CURVES_FORMAT, "format_version": CURVES_VERSION, "settings": self.settings,
                "ref2": self.ref2.tolist(), "count": self.count.tolist(),
                "curves": {k: c.to_json() for k, c in self.curves.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "RDCurves":
        if d.get("format") != CURVES_FORMAT or d.get("format_version") != CURVES_VERSION:
            raise CheckpointError(f"not a jaxquant curves file (format {d.get('format')!r} "
                                  f"v{d.get('format_version')})")
        return cls({k: SiteCurve.from_json(v) for k, v in d["curves"].items()}, np.asarray(d["ref2"], np.float64),
                   np.asarray(d["count"], np.float64), d["settings"])


def load_curves(path: str | os.PathLike) -> RDCurves:
    """Read ``curves.json`` (or a directory holding it) written by :func:`compute_curves`."""
    p = Path(path)
    p = p / "curves.json" if p.is_dir() else p
    try:
        return RDCurves.from_json(json.loads(p.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read rate–distortion curves from '{p}': {e}") from None


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


class _Evaluator:
    """The jitted, vmapped single-site evaluators of a problem (compiled once each)."""

    def __init__(self, problem: RDProblem):
        self.p = problem
        ssim_cfg = problem.config.ssim
        self.wsites = problem.weight_sites
        self.asites = problem.act_sites
        self.max_size = max(s.numel for s in self.wsites)
        self.devices = jax.devices()
        self.mesh = jax.sharding.Mesh(np.asarray(self.devices), ("cand",)) if len(self.devices) > 1 else None

        def stats(p, params, x, t, y, chain, ref):
            return output_stats(problem.output(p, params, x, t, y, chain), ref, ssim_cfg)

        def weight_fn(params, idx, rows, x, t, y, chain, ref):
            def one(row):
                p = _with_probes(params, self.wsites, lambda i, s, k: _KernelProbe(k, row, idx == i))
                return stats(p, params, x, t, y, chain, ref)
            return jax.vmap(one)(rows)

        def weight_ctx_fn(params, idx, rows, scale, zero, qmax, on, x, t, y, chain, ref):
            # the context's quantizers are the same for every candidate: built outside the vmap
            base = _with_probes(params, self.asites,
                                lambda i, s, _: _ActProbe(scale[i], zero[i], qmax[i], on[i], s.split))
            if problem.config.context_reference == "context":
                ref = problem.output(base, params, x, t, y, chain)

            def one(row):
                p = _with_probes(base, self.wsites, lambda i, s, k: _KernelProbe(k, row, idx == i))
                return stats(p, params, x, t, y, chain, ref)
            return jax.vmap(one)(rows)

        def act_fn(params, idx, scale, zero, qmax, x, t, y, chain, ref):
            def one(scale, zero, qmax):
                p = _with_probes(params, self.asites, lambda i, s, _: _ActProbe(scale, zero, qmax, idx == i, s.split))
                return stats(p, params, x, t, y, chain, ref)
            return jax.vmap(one)(scale, zero, qmax)

        def joint_fn(params, kernels, scale, zero, qmax, on, x, t, y, chain, ref):
            p = _with_probes(params, self.wsites, lambda i, s, _: kernels[i])
            p = _with_probes(p, self.asites, lambda i, s, _: _ActProbe(scale[i], zero[i], qmax[i], on[i], s.split))
            return stats(p, params, x, t, y, chain, ref)

        self.weight_fn = xla.jit(weight_fn)
        self.weight_ctx_fn = xla.jit(weight_ctx_fn)
        self._context_sums: np.ndarray | None = None
        self.act_fn = xla.jit(act_fn)
        self.joint_fn = xla.jit(joint_fn)

    def _chunks(self):
        """``(sample indices padded to batch_size, number valid)`` over all inputs."""
        n, bs = len(self.p.inputs.t), self.p.config.batch_size
        bs = min(bs, n)
        for idx in self.p.batches(bs):
            yield np.concatenate([idx, np.full(bs - len(idx), idx[-1])]), len(idx)

    def _batch(self, idx):
        inp = self.p.inputs
        return (jnp.asarray(inp.x[idx]), jnp.asarray(inp.t[idx]), None if inp.y is None else jnp.asarray(inp.y[idx]),
                None if inp.chain is None else tuple(jnp.asarray(a[idx]) for a in inp.chain), jnp.asarray(inp.ref[idx]))

    def _put_candidates(self, *arrays):
        """Pad the leading (candidate) axis to a multiple of the devices and shard it."""
        v = arrays[0].shape[0]
        nd = len(self.devices)
        pad = (-v) % nd
        out = []
        for a in arrays:
            if pad:
                a = np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])
            a = jnp.asarray(a)
            if self.mesh is not None:
                spec = jax.sharding.PartitionSpec("cand", *([None] * (a.ndim - 1)))
                a = jax.device_put(a, jax.sharding.NamedSharding(self.mesh, spec))
            out.append(a)
        return out

    def _group_sums(self, stats: np.ndarray, idx: np.ndarray, valid: int, acc: np.ndarray) -> None:
        """Add per-sample ``stats [V, b, 2]`` into ``acc [G, V, 2]`` by the samples' groups."""
        g = self.p.inputs.group[idx[:valid]]
        for gi in np.unique(g):
            acc[gi] += stats[:, :valid][:, g == gi].sum(axis=1)

    def weight_site(self, i: int, rows: np.ndarray) -> np.ndarray:
        """``[G, V, 2]`` group sums of (err², 1−SSIM) for candidate kernels ``rows [V, max_size]``;
        with an activation context, what each adds to the context's own sums."""
        v = len(rows)
        (rows_d,) = self._put_candidates(rows)
        acc = np.zeros((self.p.groups, v, 2))
        ctx = self.p.context
        tables = None if ctx is None else self._act_tables(ctx)
        for idx, valid in self._chunks():
            x, t, y, chain, ref = self._batch(idx)
            if tables is None:
                st = self.weight_fn(self.p.model.params, jnp.int32(i), rows_d, x, t, y, chain, ref)
            else:
                g = self.p.inputs.group[idx]
                scale, zero, qm, on = tables
                st = self.weight_ctx_fn(self.p.model.params, jnp.int32(i), rows_d, jnp.asarray(scale[:, g]),
                                        jnp.asarray(zero[:, g]), jnp.asarray(qm[:, g]), jnp.asarray(on),
                                        x, t, y, chain, ref)
            self._group_sums(np.asarray(st)[:v], idx, valid, acc)
        if ctx is not None and self.p.config.context_reference == "float":
            acc -= self.context_sums()[:, None, :]
        return acc

    def context_sums(self) -> np.ndarray:
        """``[G, 2]`` group sums of the activation context alone, all weights float (cached)."""
        if self._context_sums is None:
            self._context_sums = self.joint({}, self.p.context)
        return self._context_sums

    def act_site(self, i: int, tables: tuple[np.ndarray, np.ndarray], bits: Sequence[int]) -> np.ndarray:
        """Like :meth:`weight_site` for activation site ``i``: ``tables`` are
        ``(scale, zero)`` of shape ``[G, V, 2]`` for the candidate ``bits``."""
        v = len(bits)
        acc = np.zeros((self.p.groups, v, 2))
        for idx, valid in self._chunks():
            g = self.p.inputs.group[idx]
            scale = np.transpose(tables[0][g], (1, 0, 2))  # [V, b, 2]
            zero = np.transpose(tables[1][g], (1, 0, 2))
            qmax = np.repeat((2.0 ** np.asarray(bits, np.float32) - 1)[:, None], len(idx), axis=1)
            scale, zero, qmax = self._put_candidates(scale, zero, qmax.astype(np.float32))
            x, t, y, chain, ref = self._batch(idx)
            st = np.asarray(self.act_fn(self.p.model.params, jnp.int32(i), scale, zero, qmax, x, t, y, chain, ref))[:v]
            self._group_sums(st, idx, valid, acc)
        return acc

    def joint(self, weight_bits: dict[str, Sequence[int] | int], act_bits: dict[str, Sequence[int]]) -> np.ndarray:
        """``[G, 2]`` group sums of (err², 1−SSIM) with many sites quantized at once.

        ``weight_bits``: layer → bits (shared); ``act_bits``: activation site name → bits
        per group. Absent sites stay float; the probabilities of attentions with all
        operands quantized are quantized at :meth:`RDProblem.probs_bits`. One compile
        serves every plan (kernels are dense arrays, quantizers per-sample probes).
        """
        p = self.p
        kernels = [dispatch.materialize(p.weight_quant(s.name, int(weight_bits[s.name])))
                   if s.name in weight_bits else jnp.asarray(p._kernels[s.name]) for s in self.wsites]
        scale, zero, qm, on = self._act_tables(act_bits)
        acc = np.zeros((p.groups, 1, 2))
        for idx, valid in self._chunks():
            g = p.inputs.group[idx]
            x, t, y, chain, ref = self._batch(idx)
            st = self.joint_fn(p.model.params, kernels, jnp.asarray(scale[:, g]), jnp.asarray(zero[:, g]),
                               jnp.asarray(qm[:, g]), jnp.asarray(on), x, t, y, chain, ref)
            self._group_sums(np.asarray(st)[None], idx, valid, acc)
        return acc[:, 0]

    def _act_tables(self, act_bits: dict[str, Sequence[int]]) -> tuple[np.ndarray, ...]:
        """``(scale [S, G, 2], zero [S, G, 2], qmax [S, G], on [S])`` over :attr:`asites` of a
        plan's activation widths (``act_bits``: site → bits per group; probabilities of the
        attentions whose q, k, v are all planned at :meth:`RDProblem.probs_bits`)."""
        p = self.p
        na = len(self.asites)
        tabs = np.ones((na, p.groups, 2), np.float32), np.zeros((na, p.groups, 2), np.float32)
        qm = np.ones((na, p.groups), np.float32)
        on = np.zeros(na, bool)
        for i, s in enumerate(self.asites):
            if s.kind == "probs":
                base = s.name.rpartition(".")[0]
                operands = [n for n in (f"{base}.q", f"{base}.k", f"{base}.v")]
                if not all(n in act_bits for n in operands):
                    continue
                bits = [p.probs_bits({n: act_bits[n] for n in operands}, s)] * p.groups
            elif s.name in act_bits:
                bits = list(act_bits[s.name])
            else:
                continue
            on[i] = True
            for g, b in enumerate(bits):
                tabs[0][i, g], tabs[1][i, g] = p.act_params(s, g, b)
                qm[i, g] = 2.0 ** b - 1
        return tabs[0], tabs[1], qm, on


def _evaluator(problem: RDProblem) -> _Evaluator:
    ev = getattr(problem, "_evaluator", None)
    if ev is None:
        ev = problem._evaluator = _Evaluator(problem)
    return ev


def _evaluate_site(problem: RDProblem, site: Site, candidates_per_call: int | None = None) -> SiteCurve:
    """One site's curve (Algorithm 1, lines 3–9 for every candidate of the site)."""
    ev = _evaluator(problem)
    bits = problem.candidates(site)
    per_call = candidates_per_call or len(bits)
    parts = []
    if site.kind == "weight":
        i = ev.wsites.index(site)
        rows = np.zeros((len(bits), ev.max_size), np.float32)
        for j, b in enumerate(bits):
            rows[j, :site.numel] = np.asarray(dispatch.materialize(problem.weight_quant(site.name, b))).ravel()
        sizes = np.asarray([problem.weight_size(site.name, b) for b in bits], np.float64)
        for j in range(0, len(bits), per_call):
            parts.append(ev.weight_site(i, rows[j:j + per_call]))
    else:
        i = ev.asites.index(site)
        scale = np.zeros((problem.groups, len(bits), 2), np.float32)
        zero = np.zeros_like(scale)
        for g in range(problem.groups):
            for j, b in enumerate(bits):
                scale[g, j], zero[g, j] = problem.act_params(site, g, b)
        sizes = np.asarray([site.numel * b for b in bits], np.float64)
        for j in range(0, len(bits), per_call):
            sl = slice(j, j + per_call)
            parts.append(ev.act_site(i, (scale[:, sl], zero[:, sl]), bits[sl]))
    acc = np.concatenate(parts, axis=1)
    return SiteCurve(site, tuple(bits), sizes, acc[..., 0], acc[..., 1])


def compute_curves(problem: RDProblem, out_dir: str | os.PathLike | None = None, *, progress: bool = True,
                   only: Sequence[str] | None = None, candidates_per_call: int | None = None) -> RDCurves:
    """Measure the rate–distortion curve of every site (Algorithm 1); resumable.

    Args:
      problem: the model, calibration and sites.
      out_dir: ``curves.json`` is written there after every finished site, and the sites
        it already holds (made with the same settings) are not measured again.
      progress: show a progress bar.
      only: measure only these site keys (``weight:<layer>``, ``act:<site>``).
      candidates_per_call: candidates per jitted call (default: all of a site's;
        ``1`` evaluates them one by one, the unbatched baseline of the benchmark).

    Returns:
      The curves of all (or the ``only``) sites, finished ones included.

    Raises:
      CheckpointError: ``out_dir`` holds curves made with other settings.
    """
    inp = problem.inputs
    ref2 = inp.ref_energy(problem.groups)
    count = np.bincount(inp.group, minlength=problem.groups).astype(np.float64)
    settings = problem.fingerprint()
    curves = RDCurves({}, ref2, count, settings)
    path = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "curves.json"
        if path.exists():
            old = load_curves(path)
            if old.settings != settings:
                raise CheckpointError(f"'{out}' holds curves of another model, calibration or settings; "
                                      "use another output directory (or delete curves.json)")
            curves.curves.update(old.curves)
    sites = problem.curve_sites
    if only is not None:
        keys = set(only)
        unknown = keys - {s.key for s in sites}
        if unknown:
            raise ConfigError(f"unknown site(s) {', '.join(sorted(unknown))}; sites are "
                              f"'weight:<layer>' or 'act:<activation>'")
        sites = [s for s in sites if s.key in keys]
    todo = [s for s in sites if s.key not in curves.curves]
    bar = tqdm(total=len(sites), initial=len(sites) - len(todo), desc="rd curves", unit="site", disable=not progress)
    for s in todo:
        curves.curves[s.key] = _evaluate_site(problem, s, candidates_per_call)
        if path is not None:
            _save_json(path, curves.to_json())
        bar.update(1)
    bar.close()
    order = {s.key: i for i, s in enumerate(problem.curve_sites)}
    wanted = {s.key for s in sites}
    curves.curves = {k: curves.curves[k] for k in sorted(curves.curves, key=lambda k: order.get(k, 1 << 30))
                     if k in wanted}
    return curves


#: Uniform weight widths :func:`weight_sensitivity` measures by default.
SENSITIVITY_BITS = (2, 3, 4)


def weight_sensitivity(model, calib, layers: Sequence[str], *, bits: Sequence[int] = SENSITIVITY_BITS,
                       inputs_per_group: int = 32, batch_size: int = 16, seed: int = 0,
                       out_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, float]:
    """How much each layer's weight error costs at the model's output: ``{layer: s}``.

    For each layer, ``s`` is the whole model's output distortion (normalised MSE, the mean
    over timestep groups of the RD curves' ``"mse"``) per unit of the layer's relative
    weight error ``e = tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ)``
    (:func:`jaxquant.quant.additive.relative_error`), when only that layer is quantized:
    ``D ≈ s·e`` is the first-order model behind additivity (eq. 5). Both are measured with
    the layer's per-channel uniform quantizer at each of ``bits`` (weight RD curves of the
    layer, :func:`compute_curves`), and ``s`` is the geometric mean of ``D(b)/e(b)``.
    :func:`jaxquant.quant.aq_model.plan_aq_configs` uses ``s`` as the layer's weight so
    that an AQ plan spends its bits where the output needs them. A layer the output does
    not depend on at all (the output is bit-identical at every width: the key projection
    of a cross-attention over a single context token) gets ``s = 0``, so the planner
    gives it its cheapest configuration.

    Args:
      model, calib: the float model and its calibration with ``XᵀX`` (``CalibConfig(xtx=True)``).
      layers: the layers to measure (their kernels are quantized one at a time).
      bits: uniform widths measured (2..8).
      inputs_per_group, batch_size, seed: the curves' calibration inputs (:class:`CurveConfig`).
      out_dir: where the curves are written (resumable), ``None``: kept in memory.
      progress: show a progress bar.

    Raises:
      ConfigError: no ``XᵀX`` for a layer, or a layer whose quantization changes the output
        but not its weighted error.
    """
    from jaxquant.quant.additive import relative_error

    layers = list(layers)
    xtx = getattr(calib, "xtx", None) or {}
    missing = [n for n in layers if n not in xtx]
    if missing:
        raise ConfigError(f"sensitivity needs the calibration's XᵀX, which lacks layer(s) {', '.join(missing[:5])}; "
                          "calibrate with CalibConfig(xtx=True)")
    rules = [Rule(re.escape(n), WeightQuantConfig()) for n in layers]
    problem = RDProblem(model, calib, None, None, rules,
                        CurveConfig(weight_bits=tuple(bits), inputs_per_group=inputs_per_group,
                                    batch_size=batch_size, seed=seed))
    curves = compute_curves(problem, out_dir, progress=progress)
    out = {}
    for n in layers:
        c = curves.curves[f"weight:{n}"]
        d = np.mean(curves.distortion(f"weight:{n}", "mse"), axis=0)
        e = np.asarray([relative_error(problem.weight_quant(n, b), problem._kernels[n], xtx[n]) for b in c.bits])
        ok = (d > 0) & (e > 0)
        if ok.any():
            out[n] = float(np.exp(np.mean(np.log(d[ok] / e[ok]))))
        elif np.all(d == 0):
            # The output does not depend on this layer at all (e.g. the key projection of a
            # cross-attention over one context token: softmax over one key is 1).
            out[n] = 0.0
        else:
            raise ConfigError(f"layer {n!r}: quantizing it changes the output but not its weighted error "
                              "tr(ΔW XᵀX ΔWᵀ) on the calibration's XᵀX, so its sensitivity is undefined "
                              "(keep it float with a rule)")
    return out


# --------------------------------------------------------------------------- allocation


@dataclasses.dataclass
class Allocation:
    """Result of :func:`allocate`.

    Attributes:
      choice: ``[N]`` index of the chosen point on each curve.
      size: total size of the choice.
      distortion: predicted distortion (sum of the chosen points, eq. 13).
      lam: the multiplier ``λ`` (the negated common slope) of the choice.
    """

    choice: np.ndarray
    size: float
    distortion: float
    lam: float


def allocate(curves: Sequence[tuple[Sequence[float], Sequence[float]]], budget: float,
             iterations: int = 100) -> Allocation:
    """Lagrangian equal-slope bit allocation (eqs. 13–17, Algorithm 2) in ``O(K·M·N)``.

    For ``λ ≥ 0`` each curve takes the point minimising ``d + λ·s`` (ties: the smaller
    size); the total size falls as ``λ`` grows, and ``λ`` is bisected (``K`` =
    ``iterations`` steps) to the smallest value meeting ``budget``. The curves whose
    choice flips at that critical ``λ`` all have (numerically) the same slope; they
    take their larger point in order of slope while the budget allows. Every plan
    returned minimises ``Σd + λ·Σs`` for some ``λ``, so no plan of at most its size
    has a smaller total distortion (it lies on the lower convex hull of the achievable
    (size, distortion) pairs); plans between hull points are not reached.

    Args:
      curves: ``N`` curves, each ``(sizes [M_i], distortions [M_i])``; any shape (not
        necessarily convex or monotone).
      budget: the largest total size allowed.
      iterations: bisection steps.

    Raises:
      ConfigError: the smallest points of all curves together exceed ``budget``, or
        a curve is empty or not finite.
    """
    n = len(curves)
    if n == 0:
        return Allocation(np.zeros(0, np.int64), 0.0, 0.0, 0.0)
    m = max(len(c[0]) for c in curves)
    S = np.zeros((n, m))           # padding: size 0 at infinite distortion, never chosen
    D = np.full((n, m), np.inf)
    valid = np.zeros((n, m), bool)
    for i, (s, d) in enumerate(curves):
        s, d = np.asarray(s, np.float64), np.asarray(d, np.float64)
        if s.shape != d.shape or s.ndim != 1 or len(s) == 0:
            raise ConfigError(f"curve {i}: sizes and distortions must be non-empty 1-D arrays of one length")
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(d))):
            raise ConfigError(f"curve {i} has non-finite sizes or distortions")
        S[i, :len(s)], D[i, :len(d)], valid[i, :len(s)] = s, d, True
    rows = np.arange(n)

    def pick(lam: float) -> np.ndarray:
        cost = D + lam * S
        best = cost.min(axis=1, keepdims=True)
        return np.argmin(np.where((cost <= best) & valid, S, np.inf), axis=1)

    def total(choice):
        return float(S[rows, choice].sum())

    smallest = float(np.where(valid, S, np.inf).min(axis=1).sum())
    if smallest > budget:
        raise ConfigError(f"infeasible bit budget: {budget:.0f} bits, but the smallest candidates of all "
                          f"{n} sites already need {smallest:.0f}; allow more bits or fewer quantized sites")
    lo, hi = 0.0, 1.0
    choice = pick(0.0)
    if total(choice) <= budget:
        return Allocation(choice, total(choice), float(D[rows, choice].sum()), 0.0)
    while total(pick(hi)) > budget:
        lo, hi = hi, hi * 2.0
        if not np.isfinite(hi):
            raise ConfigError("allocation diverged: curve slopes are not finite")
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if total(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    choice, above = pick(hi), pick(lo)
    # Curves flipping inside (lo, hi): take their larger point in order of slope while it fits.
    flips = np.flatnonzero(choice != above)
    gains = (D[flips, choice[flips]] - D[flips, above[flips]]) / np.maximum(
        S[flips, above[flips]] - S[flips, choice[flips]], 1e-300)
    size = total(choice)
    for i in flips[np.argsort(-gains, kind="stable")]:
        extra = S[i, above[i]] - S[i, choice[i]]
        if size + extra > budget:
            continue  # a smaller flip further down may still fit
        choice[i] = above[i]
        size += extra
    return Allocation(choice, total(choice), float(D[rows, choice].sum()), hi)


@dataclasses.dataclass
class RDPlan:
    """A mixed-precision plan and what the curves predict for it.

    Attributes:
      distortion: the measure the plan minimises (``"mse"`` or ``"mse+ssim"``).
      weight_bits: layer → bits (shared weights), or layer → bits per group.
      act_bits: activation site → bits per group.
      per_group_weights: whether weights are chosen per group.
      weight_size / weight_budget: total weight storage (bits) and its budget.
      act_size / act_budget: per group, activation size (values × bits) and budget.
      predicted: per group, the sum of the chosen curve points (eq. 5); with weight curves
        given the activation plan, that plan's measured distortion plus the weights' increments.
      min_weight_bits: no weight layer was given fewer bits (``None``: no floor).
    """

    distortion: str
    weight_bits: dict[str, Any]
    act_bits: dict[str, tuple[int, ...]]
    per_group_weights: bool
    weight_size: float
    weight_budget: float
    act_size: list[float]
    act_budget: float
    predicted: list[float]
    min_weight_bits: int | None = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "act_bits": {k: list(v) for k, v in self.act_bits.items()},
                "weight_bits": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.weight_bits.items()}}


def weight_budget(curves: RDCurves, w_bits: float) -> float:
    """Storage of all weight sites at ``w_bits`` (linear between integer widths)."""
    total = 0.0
    for c in curves.of_kind("weight"):
        bits = np.asarray(c.bits, np.float64)
        if not bits.min() <= w_bits <= bits.max():
            raise ConfigError(f"--w-bits {w_bits} is outside the candidate widths {c.bits[0]}..{c.bits[-1]}")
        total += float(np.interp(w_bits, bits, c.sizes))
    return total


def allocate_plan(curves: RDCurves, w_bits: float, a_bits: float | None, distortion: str = "mse",
                  per_group_weights: bool = False, min_weight_bits: int | None = None) -> RDPlan:
    """Choose every site's bits from the curves for average ``w_bits`` / ``a_bits``.

    Weights: budget :func:`weight_budget`; shared weights are chosen on the sum over
    groups of their distortion, per-group weights on each group's curve with all
    copies in the one budget. Activations (``a_bits`` not ``None``): per group, budget
    ``a_bits × Σ values``, on that group's curves.

    ``min_weight_bits``: no weight layer below this width (its smaller candidates are
    left out of the allocation; the budget is unchanged). The single-step output
    distortion of the curves rates the low-resolution layers as cheap, and the samples
    disagree (BENCHMARKS.md, RD W4A4): the floor bounds how far the allocation may
    follow it.
    """
    if distortion not in DISTORTIONS:
        raise ConfigError(f"unknown distortion {distortion!r}; choose one of {', '.join(DISTORTIONS)}")
    G = curves.groups
    wc = curves.of_kind("weight")
    dist = {c.site.key: curves.distortion(c.site.key, distortion) for c in wc}
    budget_w = weight_budget(curves, w_bits)
    if min_weight_bits is not None and min_weight_bits > w_bits:
        raise ConfigError(f"the weight floor of {min_weight_bits} bits is above the average of {w_bits}")
    # The candidates each weight curve may take: never empty, since weight_budget checked
    # that every curve reaches w_bits, which is at or above the floor.
    allowed = [np.flatnonzero(np.asarray(c.bits) >= (min_weight_bits or 0)) for c in wc]
    predicted = np.zeros(G)
    if per_group_weights:
        alloc = allocate([(np.asarray(c.sizes)[ix], dist[c.site.key][g][ix])
                          for c, ix in zip(wc, allowed) for g in range(G)], budget_w)
        ch = np.asarray([ix[alloc.choice[i * G:(i + 1) * G]] for i, ix in enumerate(allowed)],
                        np.int64).reshape(len(wc), G)
        weight_bits = {c.site.name: tuple(int(c.bits[j]) for j in ch[i]) for i, c in enumerate(wc)}
        for i, c in enumerate(wc):
            predicted += dist[c.site.key][np.arange(G), ch[i]]
    else:
        alloc = allocate([(np.asarray(c.sizes)[ix], dist[c.site.key].sum(axis=0)[ix])
                          for c, ix in zip(wc, allowed)], budget_w)
        choice = [int(ix[j]) for ix, j in zip(allowed, alloc.choice)]
        weight_bits = {c.site.name: int(c.bits[j]) for c, j in zip(wc, choice)}
        for c, j in zip(wc, choice):
            predicted += dist[c.site.key][:, j]
    act_bits, act_size, budget_a, act_predicted = allocate_activations(curves, a_bits, distortion)
    return RDPlan(distortion, weight_bits, act_bits, per_group_weights, alloc.size, budget_w, act_size, budget_a,
                  (predicted + act_predicted).tolist(), min_weight_bits)


def allocate_activations(curves: RDCurves, a_bits: float | None, distortion: str = "mse"
                         ) -> tuple[dict[str, tuple[int, ...]], list[float], float, np.ndarray]:
    """The activation half of :func:`allocate_plan`: per timestep group, budget
    ``a_bits × Σ values`` on that group's activation curves.

    Returns:
      ``(bits per group of each site, size per group, budget, [G] predicted distortion)``;
      no sites (``{}``) when ``a_bits`` is ``None`` or the curves have no activation.
    """
    G = curves.groups
    ac = curves.of_kind("act")
    act_bits: dict[str, list[int]] = {c.site.name: [] for c in ac}
    act_size, budget_a, predicted = [], 0.0, np.zeros(G)
    if a_bits is not None and ac:
        dist = {c.site.key: curves.distortion(c.site.key, distortion) for c in ac}
        budget_a = float(a_bits) * sum(c.site.numel for c in ac)
        for g in range(G):
            a = allocate([(c.sizes, dist[c.site.key][g]) for c in ac], budget_a)
            act_size.append(a.size)
            for c, j in zip(ac, a.choice):
                act_bits[c.site.name].append(int(c.bits[j]))
                predicted[g] += dist[c.site.key][g, j]
    return {k: tuple(v) for k, v in act_bits.items() if v}, act_size, budget_a, predicted


# --------------------------------------------------------------------------- quantized models and checks


def quantize_rd(problem: RDProblem, plan: RDPlan) -> dict:
    """The quantized parameter tree of a plan (same containers as uniform quantization).

    Weights become :class:`UniformWeight` at their planned bits (layers not in the
    plan stay float); planned activation sites get an :class:`ActQuant` with per-group
    bits; attentions whose q, k, v are all planned also get ``probs_quant`` at
    :meth:`RDProblem.probs_bits`.
    """
    if plan.per_group_weights:
        raise ConfigError("a plan with per-group weight copies cannot be written as one model yet; "
                          "plan with shared weights (per_group_weights=False)")
    params = apply_plan(problem.model.params, dict(plan.weight_bits),
                        lambda name, k, bits: problem.weight_quant(name, bits))
    if problem.acts is None:
        return params
    by_name = {s.name: s for s in problem.act_sites if s.kind == "act"}
    todo = [(by_name[n], b) for n, b in plan.act_bits.items()]
    for s in problem.act_sites:
        if s.kind != "probs":
            continue
        base = s.name.rpartition(".")[0]
        ops = {n: plan.act_bits[n] for n in (f"{base}.q", f"{base}.k", f"{base}.v") if n in plan.act_bits}
        if len(ops) == 3:
            todo.append((s, [problem.probs_bits(ops, s)] * problem.groups))
    for s, bits in todo:
        node = params
        for k in s.node:
            node = node[k]
        node[s.leaf] = problem.act_quantizer(s, bits)
    return params


def measure_distortion(problem: RDProblem, params: dict) -> np.ndarray:
    """``[G, 2]`` group sums of (err², 1−SSIM) of any parameter tree of the model.

    Goes through the ordinary forward pass (quantized containers, each group's
    activation quantizers selected by :func:`at_timestep_group`); compiles for the
    tree's structure. Turn the sums into distortions with :func:`group_distortion`.
    """
    ssim_cfg = problem.config.ssim

    @xla.jit
    def stats(p, float_params, g, x, t, y, chain, ref):
        out = problem.output(at_timestep_group(p, g), float_params, x, t, y, chain)
        return output_stats(out, ref, ssim_cfg)

    inp = problem.inputs
    acc = np.zeros((problem.groups, 2))
    bs = problem.config.batch_size
    for g in range(problem.groups):
        idx = np.flatnonzero(inp.group == g)
        for i in range(0, len(idx), bs):
            j = idx[i:i + bs]
            st = stats(params, problem.model.params, jnp.int32(g), jnp.asarray(inp.x[j]), jnp.asarray(inp.t[j]),
                       None if inp.y is None else jnp.asarray(inp.y[j]),
                       None if inp.chain is None else tuple(jnp.asarray(a[j]) for a in inp.chain),
                       jnp.asarray(inp.ref[j]))
            acc[g] += np.asarray(st).sum(axis=0)
    return acc


def group_distortion(curves: RDCurves, sums: np.ndarray, kind: str = "mse") -> np.ndarray:
    """``[G]`` distortions from ``[G, 2]`` sums of :func:`measure_distortion` / joint runs."""
    curves.check_kind(kind)
    return distortion(kind, sums[:, 0], curves.ref2, sums[:, 1], curves.count)


def joint_distortion(problem: RDProblem, curves: RDCurves, weight_bits: dict[str, int],
                     act_bits: dict[str, Sequence[int]], kind: str = "mse") -> np.ndarray:
    """``[G]`` measured distortion with the given sites quantized together (one compile for all plans)."""
    return group_distortion(curves, _evaluator(problem).joint(weight_bits, act_bits), kind)


def predicted_distortion(curves: RDCurves, weight_bits: dict[str, int], act_bits: dict[str, Sequence[int]],
                         kind: str = "mse") -> np.ndarray:
    """``[G]`` sum of the single-site curve points of a plan (the right side of eq. 5)."""
    out = np.zeros(curves.groups)
    for name, b in weight_bits.items():
        c = curves.curves[f"weight:{name}"]
        out += curves.distortion(c.site.key, kind)[:, c.bits.index(int(b))]
    for name, bits in act_bits.items():
        c = curves.curves[f"act:{name}"]
        d = curves.distortion(c.site.key, kind)
        out += np.asarray([d[g, c.bits.index(int(b))] for g, b in enumerate(bits)])
    return out


@dataclasses.dataclass
class Additivity:
    """Measured vs predicted distortion of random plans (the seed's Figure 1).

    Attributes:
      measured / predicted: ``[P, G]``.
      r2: coefficient of determination of ``measured ≈ predicted`` (the identity
        line, not a fitted one) over all points.
      r2_log: the same on log10 values.
      pearson_r2: squared correlation.
    """

    measured: np.ndarray
    predicted: np.ndarray
    r2: float
    r2_log: float
    pearson_r2: float

    def to_json(self) -> dict:
        return {"measured": self.measured.tolist(), "predicted": self.predicted.tolist(), "r2": self.r2,
                "r2_log": self.r2_log, "pearson_r2": self.pearson_r2}


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss if ss > 0 else float("nan")


def additivity_check(problem: RDProblem, curves: RDCurves, num_plans: int = 16, kind: str = "mse",
                     seed: int = 0, progress: bool = True) -> Additivity:
    """Measure random plans jointly and compare with the sum of their curve points.

    Each plan quantizes a random fraction (10–100 %) of the sites with the curves, at
    random candidate widths (activations: per group), so the points span small to
    large distortions.
    """
    rng = np.random.default_rng(seed)
    wc, ac = curves.of_kind("weight"), curves.of_kind("act")
    meas, pred = [], []
    for _ in tqdm(range(num_plans), desc="additivity", unit="plan", disable=not progress):
        frac = rng.uniform(0.1, 1.0)
        wb = {c.site.name: int(rng.choice(c.bits)) for c in wc if rng.random() < frac}
        ab = {c.site.name: tuple(int(rng.choice(c.bits)) for _ in range(curves.groups)) for c in ac
              if rng.random() < frac}
        meas.append(joint_distortion(problem, curves, wb, ab, kind))
        pred.append(predicted_distortion(curves, wb, ab, kind))
    m, p = np.asarray(meas), np.asarray(pred)
    pos = (m > 0) & (p > 0)
    r2_log = _r2(np.log10(m[pos]), np.log10(p[pos])) if pos.sum() > 1 else float("nan")
    pearson = float(np.corrcoef(m.ravel(), p.ravel())[0, 1] ** 2) if m.size > 1 else float("nan")
    return Additivity(m, p, _r2(m.ravel(), p.ravel()), r2_log, pearson)


# --------------------------------------------------------------------------- the whole method


@dataclasses.dataclass
class RDResult:
    """What :func:`quantize_model_rd` produced."""

    params: dict
    plan: RDPlan
    curves: RDCurves
    measured: list[float]          # per group, the quantized model's distortion
    additivity: Additivity | None
    files: dict[str, str]


def check_rd_budget(w_bits: float, a_bits: float | None, config: CurveConfig = CurveConfig(),
                    min_weight_bits: int | None = None) -> None:
    """Raise :class:`ConfigError` unless the averages lie within the candidates' widths
    (``config.weight_bits``, no lower than ``min_weight_bits``; ``config.act_bits``): an
    allocation could not meet them. Cheap, so callers check before calibrating."""
    lo_w = max(min(config.weight_bits), min_weight_bits or 0)
    if not (np.isfinite(w_bits) and lo_w <= w_bits <= max(config.weight_bits)):
        raise ConfigError(f"an average of {w_bits!r} weight bits is outside the candidates' widths "
                          f"{lo_w}..{max(config.weight_bits)}")
    if a_bits is not None and not (np.isfinite(a_bits) and min(config.act_bits) <= a_bits <= max(config.act_bits)):
        raise ConfigError(f"an average of {a_bits!r} activation bits is outside the candidates' widths "
                          f"{min(config.act_bits)}..{max(config.act_bits)}")


def quantize_model_rd(model, calib, w_bits: float, a_bits: float | None, *,
                      weights: WeightQuantConfig | None = None, acts: ActQuantConfig | None = None,
                      rules: Sequence[Rule] | None = None, config: CurveConfig = CurveConfig(),
                      distortion: str = "mse", out_dir: str | os.PathLike | None = None,
                      curves_dir: str | os.PathLike | None = None, min_weight_bits: int | None = None,
                      conditional_weights: bool = False, additivity_plans: int = 16, plots: bool = True,
                      progress: bool = True) -> RDResult:
    """Rate–distortion mixed precision end to end: curves → plan → quantized params.

    Args:
      model, calib: the float model and its calibration.
      w_bits: average weight bits (the storage of all quantized layers at ``w_bits``).
      a_bits: average activation bits (``None``: activations stay float).
      weights, acts, rules, config: see :class:`RDProblem` and :class:`CurveConfig`.
      distortion: ``"mse"`` or ``"mse+ssim"`` (:mod:`jaxquant.search.distortion`).
      out_dir: ``plan.json``, ``report.json``/``report.md`` and the plots go here, and
        the curves too unless ``curves_dir`` is given (``None``: nothing is written).
      curves_dir: where the curves are kept (resumable); curves do not depend on the
        budget or the distortion kind, so several plans can share one directory.
      min_weight_bits: no weight layer below this width (:func:`allocate_plan`).
      conditional_weights: plan the activations first (on their single-site curves),
        then measure the weight curves with the activations quantized as planned
        (:class:`CurveConfig` ``act_context``, against ``config.context_reference``;
        kept in ``given-acts-<digest>[-vs-context]`` under the curves directory) and
        allocate the weights on those. The plan's predicted
        distortion is then the activation plan's measured distortion plus the weights'
        increments. Needs ``a_bits``.
      additivity_plans: random plans of the additivity check (0: skip it; with
        ``conditional_weights`` its weight points are those given the planned activations).
      plots: write PNG plots to ``out_dir``.

    Raises:
      ConfigError: ``w_bits`` or ``a_bits`` outside the candidates' widths (:func:`check_rd_budget`).
    """
    check_rd_budget(w_bits, a_bits, config, min_weight_bits)
    if a_bits is not None and acts is None:
        acts = ActQuantConfig(bits=int(round(min(max(a_bits, 4), 8))))
    problem = RDProblem(model, calib, weights, acts if a_bits is not None else None, rules, config)
    cdir = curves_dir if curves_dir is not None else out_dir
    context_dir = None
    if not conditional_weights:
        curves = compute_curves(problem, cdir, progress=progress)
        plan = allocate_plan(curves, w_bits, a_bits, distortion, min_weight_bits=min_weight_bits)
    else:
        if a_bits is None or problem.acts is None:
            raise ConfigError("weight curves given the planned activations need quantized activations (a_bits)")
        if config.act_context is not None:
            raise ConfigError("conditional_weights makes the activation context itself; leave act_context unset")
        act_curves = compute_curves(problem, cdir, progress=progress,
                                    only=[s.key for s in problem.curve_sites if s.kind == "act"])
        context = allocate_activations(act_curves, a_bits, distortion)[0]
        wproblem = problem.given_activations(context)
        vs = "" if config.context_reference == "float" else f"-vs-{config.context_reference}"
        context_dir = None if cdir is None else Path(cdir) / f"given-acts-{context_digest(context)}{vs}"
        wcurves = compute_curves(wproblem, context_dir, progress=progress)
        curves = RDCurves({**wcurves.curves, **act_curves.curves}, act_curves.ref2, act_curves.count,
                          {**act_curves.settings, "weight_curves": wcurves.settings})
        plan = allocate_plan(curves, w_bits, a_bits, distortion, min_weight_bits=min_weight_bits)
        if plan.act_bits != context:
            raise AssertionError("the activation plan changed between the two allocations")
        base = group_distortion(curves, _evaluator(wproblem).context_sums(), distortion)
        plan = dataclasses.replace(plan, predicted=(base + predicted_distortion(curves, plan.weight_bits, {},
                                                                                distortion)).tolist())
    params = quantize_rd(problem, plan)
    measured = group_distortion(curves, measure_distortion(problem, params), distortion)
    add = additivity_check(problem, curves, additivity_plans, distortion, progress=progress) \
        if additivity_plans > 0 else None
    files: dict[str, str] = {}
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files["plan"] = str(out / "plan.json")
        _save_json(out / "plan.json", plan.to_json())
        report = {"distortion": distortion, "w_bits": w_bits, "a_bits": a_bits, "groups": curves.groups,
                  "min_weight_bits": min_weight_bits, "conditional_weights": conditional_weights,
                  "weight_curves": None if context_dir is None else str(context_dir),
                  "predicted": plan.predicted, "measured": measured.tolist(),
                  "weight_size_bits": plan.weight_size, "weight_budget_bits": plan.weight_budget,
                  "act_size": plan.act_size, "act_budget": plan.act_budget,
                  "additivity": add.to_json() if add is not None else None}
        if plots and not _have_matplotlib():
            import warnings

            warnings.warn("matplotlib is not installed: the RD plots are skipped (pip install matplotlib)",
                          RuntimeWarning, stacklevel=2)
            plots = False
        if plots:
            from jaxquant.search import plots as P

            files["curves_plot"] = str(P.plot_curves(curves, out / "curves.png", distortion))
            files["allocation_plot"] = str(P.plot_allocation(plan, curves, out / "allocation.png"))
            if add is not None:
                files["additivity_plot"] = str(P.plot_additivity(add, out / "additivity.png"))
        report["files"] = dict(files)
        _save_json(out / "report.json", report)
        files["report"] = str(out / "report.md")
        (out / "report.md").write_text(format_report(report) + "\n")
    return RDResult(params, plan, curves, measured.tolist(), add, files)


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def format_report(report: dict) -> str:
    """A short Markdown summary of :func:`quantize_model_rd`'s ``report.json``."""
    lines = [f"# Rate–distortion mixed precision ({report['distortion']})", "",
             f"- target: W{report['w_bits']} A{report['a_bits'] if report['a_bits'] is not None else '-float'} "
             f"average bits, {report['groups']} timestep group(s)"
             + (f", no weight layer below {report['min_weight_bits']} bits" if report.get("min_weight_bits") else "")
             + (", weight curves measured given the planned activations" if report.get("conditional_weights")
                else ""),
             f"- weight storage: {report['weight_size_bits']:.0f} of {report['weight_budget_bits']:.0f} bits allowed"]
    if report["act_size"]:
        used = ", ".join(f"{s / max(report['act_budget'], 1):.3f}" for s in report["act_size"])
        lines.append(f"- activation size / budget per group: {used}")
    how = ("the activation plan's measured distortion plus the weight curves' increments"
           if report.get("conditional_weights") else "sum of single-site curves")
    lines.append(f"- distortion per group, predicted ({how}) vs measured (quantized model):")
    for g, (p, m) in enumerate(zip(report["predicted"], report["measured"])):
        lines.append(f"  - group {g}: predicted {p:.4g}, measured {m:.4g}")
    add = report.get("additivity")
    if add:
        n = len(add["measured"])
        lines.append(f"- additivity over {n} random plans: R² = {add['r2']:.4f} (identity line), "
                     f"R² of log10 = {add['r2_log']:.4f}, squared correlation = {add['pearson_r2']:.4f}")
    for k, v in (report.get("files") or {}).items():
        lines.append(f"- {k}: `{Path(v).name}`")
    return "\n".join(lines)
