"""Whole-model additive quantization: per-layer planning under a bit budget, the AQ flow
with block fine-tuning, resuming after a kill, the cin256-v2 bit counts and the CLI.

A tiny UNet2DModel (random weights, norms and biases perturbed) keeps this file fast; the
AQ runs quantize the time embedding, ``down_blocks.1`` and ``mid_block`` (two blocks, few
distinct layer shapes, so few compilations) and keep the rest float.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import cli
from jaxquant.calib import CalibConfig, calibrate
from jaxquant.calib.calibration import save_calibration
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.quant import aq_model
from jaxquant.quant.accounting import storage_report
from jaxquant.quant.activation import ActQuant
from jaxquant.quant.additive import AQWeight, aq_bits_per_weight, relative_error
from jaxquant.quant.additive import quantize_kernel
from jaxquant.quant.aq_model import (LAYER_PROXY_DB, OFFSET_PROBE, AQConfig, block_of, block_output_error, block_units,
                                     default_candidates, finetune_block, measure_layer_offsets, plan_aq_configs,
                                     plan_bits, plan_table, preset_config, preset_plan, proxy_distortion, quantize_aq,
                                     wide_candidates)
from jaxquant.quant.quantize import ActQuantConfig
from jaxquant.quant.rules import Rule, _copy_dicts, layer_kernels

from conftest import build_tiny

QUANTIZED = r"time_embedding\.linear_2|(down_blocks\.1|mid_block)\..*"
RULES = [Rule(QUANTIZED, "auto"), Rule(r".*", None)]
TARGET = 3.0
SETTINGS = dict(rules=RULES, beam_size=2, finetune_lr=1e-3, finetune_batch=4, key=0, progress=False,
                layer_weighting="count")  # the default, "sensitivity", has its own test
FT_STEPS = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("aq") / "tiny", block_out_channels=[16, 16])


@pytest.fixture(scope="module")
def model(model_dir):
    return jaxquant.load(model_dir)


@pytest.fixture(scope="module")
def calib(model):
    return calibrate(model, CalibConfig(num_samples=4, steps=2, groups=2, batch_size=4, reservoir=256),
                     progress=False)


@pytest.fixture(scope="module")
def result(model, calib):
    return quantize_aq(model, calib, TARGET, ActQuantConfig(bits=8), finetune_steps=FT_STEPS, **SETTINGS)


@pytest.fixture(scope="module")
def unfinetuned(model, calib):
    """The planned layers quantized, without fine-tuning or activation quantization."""
    return quantize_aq(model, calib, TARGET, None, finetune_steps=0, **SETTINGS)


def _leaves_equal(a, b) -> bool:
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    return ta == tb and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# --------------------------------------------------------------------------- planning


SHAPES = {"big_conv": (3, 3, 256, 256), "wide_dense": (512, 512), "mid_conv": (3, 3, 32, 64),
          "small_dense": (16, 16), "shortcut": (1, 1, 64, 32)}


@pytest.mark.parametrize("target", [2.0, 3.0, 4.0])
def test_plan_meets_the_budget_and_small_layers_get_small_codebooks(target):
    plan = plan_aq_configs(SHAPES, target)
    avg = plan_bits(SHAPES, plan)
    assert avg <= target and avg > target - 0.05  # the budget is spent, not exceeded
    for name, cfg in plan.items():
        assert cfg.fits(SHAPES[name])
    # Codebook storage per weight: cheap for the big layer, the small layer cannot afford 2^8 entries.
    book = {n: 16 * c.num_codebooks * 2 ** c.nbits * c.group_size / np.prod(SHAPES[n]) for n, c in plan.items()}
    assert book["big_conv"] < 0.1 and plan["big_conv"].nbits >= 7  # large codebooks where they are cheap
    assert plan["small_dense"].nbits < 8 and plan["shortcut"].nbits < 8
    assert book["small_dense"] > book["big_conv"]
    assert "average" in plan_table(SHAPES, plan)


def test_plan_is_monotone_infeasible_budgets_fail_and_fixed_configs_count():
    def cost(plan):
        return sum(np.prod(SHAPES[n]) * proxy_distortion(c, SHAPES[n]) for n, c in plan.items())

    costs = [cost(plan_aq_configs(SHAPES, t)) for t in (1.5, 2.0, 3.0, 4.0)]
    assert all(a > b for a, b in zip(costs, costs[1:]))
    with pytest.raises(ConfigError, match="infeasible"):
        plan_aq_configs({"small_dense": (16, 16)}, 1.0)
    fixed = {"big_conv": AQConfig(4, 8, 9)}
    plan = plan_aq_configs(SHAPES, 3.0, fixed=fixed)
    assert plan["big_conv"] == AQConfig(4, 8, 9) and plan_bits(SHAPES, plan) <= 3.0
    with pytest.raises(ConfigError, match="does not fit"):
        plan_aq_configs(SHAPES, 3.0, fixed={"small_dense": AQConfig(1, 8, 9)})
    # A candidate list: each layer only takes the entries that fit it.
    plan = plan_aq_configs(SHAPES, 4.0, [AQConfig(1, 4, 4), AQConfig(2, 8, 8), AQConfig(2, 8, 9)])
    assert set(plan.values()) <= {AQConfig(1, 4, 4), AQConfig(2, 8, 8), AQConfig(2, 8, 9)}


def test_layer_weights_move_bits_to_sensitive_layers():
    counts = {n: float(np.prod(s)) for n, s in SHAPES.items()}
    base = plan_aq_configs(SHAPES, 2.5)
    assert plan_aq_configs(SHAPES, 2.5, layer_weights=counts) == base  # N is the default weight

    def cost(plan, w):
        return sum(w[n] * proxy_distortion(c, SHAPES[n]) for n, c in plan.items())

    # A small layer that matters 1000x more per weight than its size says gets more bits.
    sens = {**counts, "small_dense": 1000 * counts["small_dense"]}
    plan = plan_aq_configs(SHAPES, 2.5, layer_weights=sens)
    bits = {n: c.stored_bits(SHAPES[n]) / np.prod(SHAPES[n]) for n, c in plan.items()}
    base_bits = {n: c.stored_bits(SHAPES[n]) / np.prod(SHAPES[n]) for n, c in base.items()}
    assert bits["small_dense"] > base_bits["small_dense"]
    assert plan_bits(SHAPES, plan) <= 2.5
    assert cost(plan, sens) < cost(base, sens)  # better in the objective it was planned for
    with pytest.raises(ConfigError, match="no weight for layer"):
        plan_aq_configs(SHAPES, 2.5, layer_weights={"big_conv": 1.0})
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="finite and >= 0"):
            plan_aq_configs(SHAPES, 2.5, layer_weights={**counts, "shortcut": bad})
    # A layer the output does not depend on (weight 0) gets its cheapest candidate.
    free = plan_aq_configs(SHAPES, 2.5, layer_weights={**counts, "shortcut": 0.0})
    cheapest = min(default_candidates(SHAPES["shortcut"]), key=lambda c: c.stored_bits(SHAPES["shortcut"]))
    assert free["shortcut"].stored_bits(SHAPES["shortcut"]) == cheapest.stored_bits(SHAPES["shortcut"])
    assert cost(free, counts) - counts["shortcut"] * proxy_distortion(free["shortcut"], SHAPES["shortcut"]) \
        <= cost(base, counts) - counts["shortcut"] * proxy_distortion(base["shortcut"], SHAPES["shortcut"])


def test_min_code_bits_floors_every_planned_layer():
    # Weights that make the big layer nearly free to starve: without a floor it falls below 1 code bit.
    counts = {n: float(np.prod(s)) for n, s in SHAPES.items()}
    skewed = {**counts, "big_conv": 1e-6 * counts["big_conv"]}
    free = plan_aq_configs(SHAPES, 2.0, layer_weights=skewed)
    assert free["big_conv"].code_bits < 1
    floored = plan_aq_configs(SHAPES, 2.0, layer_weights=skewed, min_code_bits=1.0)
    assert all(c.code_bits >= 1 for c in floored.values())
    assert plan_bits(SHAPES, floored) <= 2.0
    # Among plans that respect the floor, the floored one is at least as good in its objective.
    def cost(plan):
        return sum(skewed[n] * proxy_distortion(c, SHAPES[n]) for n, c in plan.items())

    assert cost(free) <= cost(floored)
    assert plan_aq_configs(SHAPES, 2.0, layer_weights=skewed, min_code_bits=0.0) == free
    # A fixed layer is not subject to the floor.
    fixed = plan_aq_configs(SHAPES, 2.0, fixed={"big_conv": AQConfig(1, 4, 18)}, min_code_bits=1.0)
    assert fixed["big_conv"] == AQConfig(1, 4, 18)
    with pytest.raises(ConfigError, match="code bits per weight or more"):
        plan_aq_configs(SHAPES, 8.0, min_code_bits=70.0)
    with pytest.raises(ConfigError, match="min_code_bits"):
        plan_aq_configs(SHAPES, 2.0, min_code_bits=-1.0)


def test_wide_candidates_and_the_layer_proxy():
    for shape in SHAPES.values():
        wide, base = wide_candidates(shape), default_candidates(shape)
        assert set(base) <= set(wide) and all(c.fits(shape) and c.code_bits <= 16 for c in wide)
        assert {c.group_size for c in wide} - {c.group_size for c in base} == {1, 2}
    shape = SHAPES["mid_conv"]
    c = AQConfig(2, 6, 4)
    assert proxy_distortion(c, shape) == proxy_distortion(c, shape, (aq_model.PROXY_DB_PER_CODE_BIT,
                                                                      aq_model.PROXY_DB_PER_NBIT,
                                                                      aq_model.PROXY_DB_PER_CODEBOOK_BIT))
    a, b, k, m = LAYER_PROXY_DB
    book = 16 * 2 * 64 * 4 / np.prod(shape)
    want = -(a * 3.0 + b * 6 + k * book + m * 1) - 2.5
    assert np.isclose(10 * np.log10(proxy_distortion(c, shape, LAYER_PROXY_DB, -2.5)), want)
    # Under the layer proxy a second codebook costs: at 8 code bits per weight one 8-bit scalar
    # codebook beats eight 4-bit codebooks of 4-vectors, which the Gaussian proxy prefers.
    one, eight = AQConfig(1, 8, 1), AQConfig(8, 4, 4)
    assert proxy_distortion(one, shape, LAYER_PROXY_DB) < proxy_distortion(eight, shape, LAYER_PROXY_DB)


def test_layer_offsets_move_bits_to_the_layers_that_are_hard_to_quantize():
    shapes = {"a": (3, 3, 32, 64), "b": (3, 3, 32, 64)}
    even = plan_aq_configs(shapes, 3.0, wide_candidates, coefficients=LAYER_PROXY_DB, layer_offsets={"a": 0, "b": 0})
    bits = {n: c.stored_bits(shapes[n]) for n, c in even.items()}
    # "a" reaches 10 dB lower errors than "b" at every configuration: it needs fewer bits.
    skew = plan_aq_configs(shapes, 3.0, wide_candidates, coefficients=LAYER_PROXY_DB,
                           layer_offsets={"a": -10.0, "b": 0.0})
    assert skew["a"].stored_bits(shapes["a"]) < min(bits.values()) <= max(bits.values()) < skew["b"].stored_bits(shapes["b"])
    assert plan_bits(shapes, skew) <= 3.0
    with pytest.raises(ConfigError, match="no finite offset"):
        plan_aq_configs(shapes, 3.0, layer_offsets={"a": 0.0})


def test_measured_offsets_are_the_probe_error_against_the_proxy(model, calib):
    kernels = layer_kernels(model.params)
    names = ["mid_block.attentions.0.to_q", "mid_block.resnets.0.conv1"]
    off = measure_layer_offsets({n: kernels[n] for n in names}, calib.xtx, key=3, beam_size=2, progress=False)
    probe = AQConfig(*OFFSET_PROBE)
    for n in names:
        w, _ = quantize_kernel(kernels[n], calib.xtx[n], *OFFSET_PROBE, beam_size=2,
                               key=jax.random.fold_in(jax.random.key(3), aq_model.zlib.crc32(n.encode()) & 0x7FFFFFFF))
        measured = 10 * np.log10(relative_error(w, kernels[n], calib.xtx[n]))
        proxy = 10 * np.log10(proxy_distortion(probe, tuple(kernels[n].shape), LAYER_PROXY_DB))
        assert np.isclose(off[n], measured - proxy, atol=1e-6)


def test_measured_planning(model, calib, tmp_path):
    settings = SETTINGS
    r = quantize_aq(model, calib, TARGET, None, finetune_steps=0, planning="measured", progress_dir=tmp_path / "p",
                    **settings)
    saved = json.loads((tmp_path / "p" / "offsets.json").read_text())
    assert set(saved["offsets"]) == set(r.plan)
    kernels = layer_kernels(model.params)
    assert plan_bits(kernels, r.plan) <= TARGET
    assert r.plan == plan_aq_configs({n: kernels[n] for n in r.plan}, TARGET, wide_candidates,
                                     min_code_bits=aq_model.DEFAULT_MIN_CODE_BITS, coefficients=LAYER_PROXY_DB,
                                     layer_offsets=saved["offsets"])
    # the offsets are reused from the progress directory (a changed file is what the planner sees)
    bumped = {**saved["offsets"], "mid_block.resnets.0.conv1": saved["offsets"]["mid_block.resnets.0.conv1"] + 30}
    (tmp_path / "p" / "offsets.json").write_text(json.dumps({**saved, "offsets": bumped}))
    plan2 = plan_aq_configs({n: kernels[n] for n in r.plan}, TARGET, wide_candidates,
                            min_code_bits=aq_model.DEFAULT_MIN_CODE_BITS, coefficients=LAYER_PROXY_DB,
                            layer_offsets=bumped)
    # a fresh progress directory holding only the (edited) offsets: the run plans with them
    (tmp_path / "p3").mkdir()
    (tmp_path / "p3" / "offsets.json").write_text((tmp_path / "p" / "offsets.json").read_text())
    r3 = quantize_aq(model, calib, TARGET, None, finetune_steps=0, planning="measured", progress_dir=tmp_path / "p3",
                     **settings)
    assert r3.plan == plan2
    with pytest.raises(ConfigError, match="planning must be"):
        quantize_aq(model, calib, TARGET, planning="bogus", **settings)
    with pytest.raises(ConfigError, match="not to a given plan"):
        quantize_aq(model, calib, plan=r.plan, planning="measured", progress=False)


def test_presets_are_the_papers_configurations():
    assert preset_config((3, 3, 192, 192), "W2") == AQConfig(2, 8, 9)
    assert preset_config((3, 3, 192, 192), "W4") == AQConfig(4, 8, 9)
    assert preset_config((512, 192), "W2") == AQConfig(2, 8, 8)
    assert preset_config((1, 1, 192, 384), "W4") == AQConfig(4, 8, 8)
    # ANCHORS: a 192→192 3×3 conv costs 2.01 (2x8 g9) and 4.01 (4x8 g9) bits per weight.
    shape = (3, 3, 192, 192)
    for preset, want in (("W2", 2.01), ("W4", 4.01)):
        c = preset_config(shape, preset)
        assert aq_bits_per_weight(192, 9 * 192, c.num_codebooks, c.nbits, c.group_size) == pytest.approx(want, abs=5e-3)
        assert plan_bits({"c": shape}, {"c": c}) == pytest.approx(want, abs=5e-3)
    with pytest.raises(ConfigError, match="unknown AQ preset"):
        preset_plan({"c": shape}, "W3")
    assert AQConfig.parse("2x8 g9") == AQConfig(2, 8, 9)


def test_cin256_preset_bits_match_the_paper():
    from benchmarks.aq_bits_cin256 import PAPER_BITS, TOLERANCE, preset_bits

    res = preset_bits()
    for preset, paper in PAPER_BITS.items():
        r = res[preset]
        assert abs(r["unet_rest_fp16"] - paper) <= TOLERANCE, (preset, r)
        assert r["aq_layers_stored"] < r["unet_rest_fp16"] < r["unet_rest_fp32"]
    assert res["W2"]["unet_params"] == 400_920_579


def test_block_names():
    assert block_of("down_blocks.1.resnets.0.conv1") == "down_blocks.1"
    assert block_of("mid_block.attentions.0.to_q") == "mid_block"
    assert block_of("up_blocks.0.upsamplers.0.conv") == "up_blocks.0"
    assert block_of("input_blocks.4.1.transformer_blocks.0.attn1.to_q") == "input_blocks.4"
    assert block_of("unet.output_blocks.11.0.in_layers.2") == "unet.output_blocks.11"
    assert block_of("unet.middle_block.1.proj_in") == "unet.middle_block"
    for outside in ("time_embedding.linear_1", "conv_in", "input_blocks.0.0", "unet.time_embed.0", "out.2"):
        assert block_of(outside) is None


# --------------------------------------------------------------------------- whole-model AQ


def test_result_meets_the_budget_exactly_as_stored(model, result):
    kernels = layer_kernels(model.params)
    assert sorted(result.plan) == sorted(n for n in kernels if block_of(n) in ("down_blocks.1", "mid_block")
                                         or n == "time_embedding.linear_2")
    assert plan_bits(kernels, result.plan) <= TARGET
    rep = storage_report(result.params)
    assert rep.bits_per_quantized_weight <= TARGET
    # The plan's exact bit count is what is stored.
    aq_bits = sum(layer.bits for layer in rep.quantized)
    assert aq_bits == sum(c.stored_bits(kernels[n].shape) for n, c in result.plan.items())
    got = layer_kernels(result.params)
    for name, k in kernels.items():
        if name in result.plan:
            c = result.plan[name]
            assert isinstance(got[name], AQWeight)
            assert (got[name].num_codebooks, got[name].nbits, got[name].group_size) == \
                (c.num_codebooks, c.nbits, c.group_size)
        else:
            np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(k))
    # Activations at 8 bits on the quantized layers (and only there).
    node = result.params["mid_block.resnets.0"]["conv1"]
    assert isinstance(node["input_quant"], ActQuant) and node["input_quant"].bits == 8
    assert "input_quant" not in result.params["conv_in"]  # (the CLI test samples from such a model)


def test_layer_objectives_fall_and_block_finetuning_reduces_the_output_error(model, calib, result, unfinetuned):
    for r in result.layers:
        assert r["objective"] <= r["objective_init"]
        if r["objective_init"] > 1e-6:
            assert r["objective"] < r["objective_init"], r
    assert [b["block"] for b in result.blocks] == ["down_blocks.1", "mid_block"]
    for b in result.blocks:
        assert b["kept"] and b["error_after"] < b["error_before"]

    # The same layers without fine-tuning or activation quantization.
    base = unfinetuned
    kernels = layer_kernels(model.params)
    got = layer_kernels(base.params)
    for r in base.layers[:4]:  # the recorded objective is the weighted error of the stored weight
        assert relative_error(got[r["name"]], kernels[r["name"]], calib.xtx[r["name"]]) == \
            pytest.approx(r["objective"], rel=1e-3, abs=1e-6)
    assert block_output_error(model, base.params, base.params, "mid_block", calib, batch_size=4) == 0.0
    before = block_output_error(model, base.params, model.params, "mid_block", calib, batch_size=4)
    tuned, rec = finetune_block(model, base.params, model.params, "mid_block", calib, steps=8, lr=1e-3,
                                batch_size=4)
    after = block_output_error(model, tuned, model.params, "mid_block", calib, batch_size=4)
    assert before > 0 and after < before
    assert rec["error_before"] == pytest.approx(before, rel=1e-5)
    assert rec["error_after"] == pytest.approx(after, rel=1e-5)
    # Codes frozen; codebooks (float16) and the block's float parameters moved; other blocks untouched.
    q0, q1 = layer_kernels(base.params), layer_kernels(tuned)
    moved = False
    for name in q0:
        if block_of(name) == "mid_block":
            np.testing.assert_array_equal(np.asarray(q0[name].codes), np.asarray(q1[name].codes))
            assert q1[name].codebooks.dtype == jnp.float16
            moved |= not np.array_equal(np.asarray(q0[name].codebooks), np.asarray(q1[name].codebooks))
    assert moved
    assert not np.array_equal(np.asarray(base.params["mid_block.resnets.0"]["norm1"]["scale"]),
                              np.asarray(tuned["mid_block.resnets.0"]["norm1"]["scale"]))
    assert _leaves_equal(base.params["down_blocks.1.resnets.0"], tuned["down_blocks.1.resnets.0"])
    assert [u[0] for u in block_units(model.params, "mid_block")] == \
        ["mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1"]


class _Killed(Exception):
    pass


def test_resume_after_a_kill_gives_identical_params(model, calib, result, tmp_path, monkeypatch):
    progress = tmp_path / "progress"
    real_quantize, real_finetune = aq_model.quantize_kernel, aq_model.finetune_block
    calls = {"quantize": 0, "finetune": 0}

    def run(kill_quantize_at=None, kill_finetune_at=None):
        calls.update(quantize=0, finetune=0)

        def quantize(*a, **k):
            calls["quantize"] += 1
            if calls["quantize"] == kill_quantize_at:
                raise _Killed
            return real_quantize(*a, **k)

        def finetune(*a, **k):
            calls["finetune"] += 1
            if calls["finetune"] == kill_finetune_at:
                raise _Killed
            return real_finetune(*a, **k)

        monkeypatch.setattr(aq_model, "quantize_kernel", quantize)
        monkeypatch.setattr(aq_model, "finetune_block", finetune)
        return quantize_aq(model, calib, TARGET, ActQuantConfig(bits=8), finetune_steps=FT_STEPS,
                           progress_dir=progress, **SETTINGS)

    n_layers = len(result.plan)
    with pytest.raises(_Killed):  # killed while quantizing the 6th layer
        run(kill_quantize_at=6)
    assert len(list(progress.glob("layer-*.npz"))) == 5
    with pytest.raises(_Killed):  # killed while fine-tuning the second block
        run(kill_finetune_at=2)
    assert calls["quantize"] == n_layers - 5 and len(list(progress.glob("block-*.npz"))) == 1
    resumed = run()
    assert calls == {"quantize": 0, "finetune": 1}
    assert _leaves_equal(resumed.params, result.params)
    timeless = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert timeless(resumed.layers) == timeless(result.layers)
    assert timeless(resumed.blocks) == timeless(result.blocks)
    with pytest.raises(CheckpointError, match="other settings"):
        quantize_aq(model, calib, TARGET, None, finetune_steps=0, progress_dir=progress, **SETTINGS)


def test_bad_arguments(model, calib):
    with pytest.raises(ConfigError, match="exactly one"):
        quantize_aq(model, calib, 2.0, plan={"conv_in": AQConfig(1, 4, 9)}, progress=False)
    with pytest.raises(ConfigError, match="not in the model"):
        quantize_aq(model, calib, plan={"nope": AQConfig(1, 4, 8)}, progress=False)
    no_xtx = type(calib)(**{**calib.__dict__, "xtx": {}})
    with pytest.raises(ConfigError, match="XᵀX"):
        quantize_aq(model, no_xtx, 3.0, rules=RULES, progress=False)


def test_weight_sensitivity_is_output_distortion_per_unit_of_relative_error(model, calib):
    """Checked against a direct forward pass with only that layer quantized, on the curves'
    own inputs, and the relative error computed here from XᵀX."""
    import re

    from jaxquant.quant.uniform import WeightQuantConfig, quantize_weight
    from jaxquant.search.rd import CurveConfig, RDProblem, weight_sensitivity

    layers = ["time_embedding.linear_2", "mid_block.resnets.0.conv1"]
    sens = weight_sensitivity(model, calib, layers, bits=(3,), inputs_per_group=4, progress=False)
    problem = RDProblem(model, calib, None, None, [Rule(re.escape(n), WeightQuantConfig()) for n in layers],
                        CurveConfig(weight_bits=(3,), inputs_per_group=4))
    inp = problem.inputs
    kernels = layer_kernels(model.params)
    for n in layers:
        wq = quantize_weight(kernels[n], WeightQuantConfig(bits=3))
        deq = np.asarray(wq.dequantize(), np.float32).reshape(np.shape(kernels[n]))
        params = _copy_dicts(model.params)
        aq_model._set_layer(params, n, jnp.asarray(deq))
        out = np.asarray(model.module.apply({"params": params}, inp.x, inp.t), np.float64)
        d = np.mean([np.sum((out - inp.ref)[inp.group == g] ** 2) / np.sum(inp.ref[inp.group == g] ** 2)
                     for g in range(problem.groups)])
        w = np.asarray(kernels[n], np.float64).reshape(-1, np.shape(kernels[n])[-1]).T
        delta = w - deq.astype(np.float64).reshape(-1, w.shape[0]).T
        h = np.asarray(calib.xtx[n], np.float64)
        e = np.trace(delta @ h @ delta.T) / np.trace(w @ h @ w.T)
        assert sens[n] == pytest.approx(d / e, rel=2e-3)
    with pytest.raises(ConfigError, match="XᵀX"):
        weight_sensitivity(model, type(calib)(**{**calib.__dict__, "xtx": {}}), layers, progress=False)


def test_layers_the_output_does_not_depend_on_have_zero_sensitivity(model, calib):
    """With the attention's output projection zeroed, its q/k/v projections cannot change
    the output (as a cross-attention's keys over one context token cannot): s = 0, not an
    error, and the planner gives them their cheapest configuration."""
    from jaxquant.search.rd import weight_sensitivity

    att = "mid_block.attentions.0"
    params = _copy_dicts(model.params)
    kernels = layer_kernels(model.params)
    aq_model._set_layer(params, f"{att}.to_out.0", jnp.zeros_like(kernels[f"{att}.to_out.0"]))
    cut = jaxquant.Model(model.meta, params)
    layers = [f"{att}.to_q", f"{att}.to_k", "mid_block.resnets.0.conv1"]
    sens = weight_sensitivity(cut, calib, layers, bits=(3,), inputs_per_group=4, progress=False)
    assert sens[f"{att}.to_q"] == 0.0 and sens[f"{att}.to_k"] == 0.0
    assert sens["mid_block.resnets.0.conv1"] > 0
    shapes = {n: np.shape(kernels[n]) for n in layers}
    plan = plan_aq_configs(shapes, 3.0, layer_weights=sens)
    for n in layers[:2]:
        assert plan[n].stored_bits(shapes[n]) == min(c.stored_bits(shapes[n]) for c in default_candidates(shapes[n]))


def test_sensitivity_weighted_planning(model, calib, unfinetuned, tmp_path):
    settings = {k: v for k, v in SETTINGS.items() if k != "layer_weighting"}
    r = quantize_aq(model, calib, TARGET, None, finetune_steps=0, progress_dir=tmp_path / "p", **settings)
    assert r.layer_weights is not None  # sensitivity is the default
    assert set(r.layer_weights) == set(unfinetuned.plan) and all(v > 0 for v in r.layer_weights.values())
    assert (tmp_path / "p" / "sensitivity" / "curves.json").is_file()
    kernels = layer_kernels(model.params)
    assert plan_bits(kernels, r.plan) <= TARGET
    assert r.plan == plan_aq_configs({n: kernels[n] for n in r.plan}, TARGET, layer_weights=r.layer_weights,
                                     min_code_bits=aq_model.DEFAULT_MIN_CODE_BITS)  # the default floor
    assert all(c.code_bits >= aq_model.DEFAULT_MIN_CODE_BITS for c in r.plan.values())
    with pytest.raises(ConfigError, match="layer_weighting must be"):
        quantize_aq(model, calib, TARGET, layer_weighting="bogus", progress=False)
    with pytest.raises(ConfigError, match="not to a given plan"):
        quantize_aq(model, calib, plan=unfinetuned.plan, layer_weighting="sensitivity", progress=False)
    with pytest.raises(ConfigError, match="not to a given plan"):
        quantize_aq(model, calib, plan=unfinetuned.plan, min_code_bits=1.0, progress=False)
    # Another floor reaches the planner: same weights, every layer at 1.5 code bits per weight or more.
    floored = quantize_aq(model, calib, TARGET, None, finetune_steps=0, min_code_bits=1.5,
                          **{**settings, "layer_weighting": r.layer_weights})
    assert all(c.code_bits >= 1.5 for c in floored.plan.values())
    assert floored.plan == plan_aq_configs({n: kernels[n] for n in r.plan}, TARGET,
                                           layer_weights=r.layer_weights, min_code_bits=1.5)


# --------------------------------------------------------------------------- CLI


def test_cli_quantize_aq_save_load_info_sample(model_dir, calib, tmp_path, capsys):
    cal = save_calibration(calib, tmp_path / "cal")
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"- pattern: '{QUANTIZED}'\n  config: auto\n- pattern: '.*'\n  config: null\n")
    q = tmp_path / "q"
    argv = ["quantize", str(model_dir), "--method", "aq", "--w-bits", "3", "--a-bits", "8", "--calib", str(cal),
            "--rules", str(rules), "--beam", "2", "--finetune-steps", "0", "--aq-min-code-bits", "0.5",
            "--aq-rounds", "2", "--out", str(q)]
    assert cli.main([*argv[:-4], "--aq-rounds", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--aq-rounds must be at least 1" in capsys.readouterr().err
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "average" in out and "bits per quantized weight" in out
    assert (tmp_path / "q.progress" / "progress.json").is_file()
    meta = json.loads((q / "config.json").read_text())
    assert json.dumps(meta).count('"aq"') >= 1
    assert '"weighting": "sensitivity"' in json.dumps(meta)  # the default plan
    assert '"min_code_bits": 0.5' in json.dumps(meta) and '"rounds": 2' in json.dumps(meta)
    assert '"planning": "gaussian"' in json.dumps(meta)
    # the rounds reach quantize_matrix (and the resume fingerprint: a run with other rounds does not resume this)
    assert json.loads((tmp_path / "q.progress" / "progress.json").read_text())["settings"]["aq_options"] == {
        "max_iters": "2"}
    assert (tmp_path / "q.progress" / "sensitivity" / "curves.json").is_file()
    m = jaxquant.load(q)
    kernels = layer_kernels(m.params)
    assert isinstance(kernels["mid_block.resnets.0.conv1"], AQWeight)
    rep = storage_report(m.params)
    assert rep.bits_per_quantized_weight <= 3.0
    assert cli.main(["info", str(q)]) == 0
    info = capsys.readouterr().out
    assert "AQ " in info and "per quantized weight" in info
    npz = tmp_path / "s.npz"
    assert cli.main(["sample", str(q), "--num", "2", "--steps", "2", "--batch-size", "2", "--out", str(npz)]) == 0
    images = np.load(npz)["arr_0"]
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
    from jaxquant.diffusion.pipeline import generate

    np.testing.assert_array_equal(images, generate(m, 2, steps=2, seed=0, batch_size=2, progress=False))
    # The paper's W2 preset through the CLI (on one layer: 2x8 g8 codebooks are too big for this model).
    one = tmp_path / "one.yaml"
    one.write_text("- pattern: 'mid_block\\.attentions\\.0\\.to_q'\n  config: auto\n- pattern: '.*'\n  config: null\n")
    argv2 = [*argv[:argv.index("--rules")], "--rules", str(one), "--beam", "2", "--aq-preset", "W2", "--a-bits", "none",
             "--out", str(tmp_path / "q2")]
    assert cli.main(argv2) == 0
    k2 = layer_kernels(jaxquant.load(tmp_path / "q2").params)
    assert k2["mid_block.attentions.0.to_q"].describe() == "AQ 2x8 g8"
    assert sum(isinstance(k, AQWeight) for k in k2.values()) == 1


def test_finetune_code_updates_within_budget(model, calib, unfinetuned):
    base = unfinetuned.params
    before = block_output_error(model, base, model.params, "mid_block", calib, batch_size=4)
    tuned, rec = finetune_block(model, base, model.params, "mid_block", calib, steps=8, lr=1e-3, batch_size=4,
                                code_update_every=2, code_budget=0.05)
    accepted, tried = rec["code_updates"]
    assert tried == 4 and 1 <= accepted <= tried and rec["kept"]
    after = block_output_error(model, tuned, model.params, "mid_block", calib, batch_size=4)
    assert after < before and rec["error_after"] == pytest.approx(after, rel=1e-5)
    q0, q1 = layer_kernels(base), layer_kernels(tuned)
    total = 0
    for name in q0:
        if block_of(name) != "mid_block" or not isinstance(q0[name], AQWeight):
            assert _leaves_equal(q0[name], q1[name]) or block_of(name) == "mid_block"
            continue
        w = q0[name]
        diff = int(np.sum(np.asarray(w.int_codes()) != np.asarray(q1[name].int_codes())))
        assert diff <= accepted * int(0.05 * w.out_features * w.num_groups * w.num_codebooks)
        assert q1[name].packed == w.packed and q1[name].codes.dtype == w.codes.dtype
        total += diff
    assert 0 < total <= rec["codes_changed"]
    # Off by default: codes frozen, no code-update fields.
    _, rec0 = finetune_block(model, base, model.params, "mid_block", calib, steps=2, lr=1e-3, batch_size=4)
    assert "code_updates" not in rec0
    with pytest.raises(ConfigError, match="code_budget"):
        finetune_block(model, base, model.params, "mid_block", calib, steps=2, code_update_every=1, code_budget=0.0)
    with pytest.raises(ConfigError, match="finetune_steps > 0"):
        quantize_aq(model, calib, TARGET, None, finetune_steps=0, code_update_every=2, **SETTINGS)
