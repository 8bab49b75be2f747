"""Channel smoothing (SmoothQuant-style) of layer inputs: factors, function preservation,
what calibration sees, storage, quantizing the smoothed model, and the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import cli
from jaxquant.calib import CalibConfig, calibrate
from jaxquant.calib.calibration import _model_fns
from jaxquant.errors import ConfigError
from jaxquant.io.model_dir import save_model_dir
from jaxquant.quant.accounting import storage_report
from jaxquant.quant.quantize import ActQuantConfig, quantize_uniform
from jaxquant.quant.rules import default_rules, layer_kernels, resolve
from jaxquant.quant.smooth import (ChannelSmooth, channel_absmax, is_channel_smooth, smooth_model,
                                   smooth_params, smoothed_layers, smoothing_factors)
from jaxquant.quant.uniform import WeightQuantConfig

from conftest import build_tiny

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(model dir, model, calibration)``: a random tiny UNet whose input channels have
    very different ranges (GroupNorm scales spread over two decades)."""
    rng = np.random.default_rng(0)

    def spread(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return jnp.asarray(10.0 ** rng.uniform(-1, 1, leaf.shape), leaf.dtype)
        return leaf + 0.1 * jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype)

    d = build_tiny(tmp_path_factory.mktemp("smooth") / "tiny",
                   perturb=lambda p: jax.tree_util.tree_map_with_path(spread, p))
    model = jaxquant.load(d)
    calib = calibrate(model, CalibConfig(num_samples=8, steps=4, groups=2, batch_size=4, reservoir=512, xtx=False),
                      progress=False)
    return d, model, calib


def _layers(model):
    plan = resolve(layer_kernels(model.params), default_rules(WeightQuantConfig(8)))
    return [n for n, c in plan.items() if c is not None]


def test_smoothing_factors_follow_the_formula():
    rng = np.random.default_rng(1)
    kernel = rng.standard_normal((3, 3, 5, 4))
    amax = np.array([2.0, 0.5, 0.0, 8.0, 1.0])
    kernel[:, :, 4, :] = 0.0  # an input channel no weight reads
    for alpha in (0.0, 0.5, 0.8, 1.0):
        s = smoothing_factors(amax, kernel, alpha)
        w = np.abs(kernel).max(axis=(0, 1, 3))
        for j in range(5):
            want = 1.0 if amax[j] == 0 or w[j] == 0 else amax[j] ** alpha / w[j] ** (1 - alpha)
            np.testing.assert_allclose(s[j], want, rtol=1e-12)
    dense = rng.standard_normal((5, 7))
    np.testing.assert_allclose(smoothing_factors(amax[:4].clip(0.1), dense[:4], 0.5),
                               np.sqrt(amax[:4].clip(0.1)) / np.sqrt(np.abs(dense[:4]).max(axis=1)))
    with pytest.raises(ConfigError, match="alpha"):
        smoothing_factors(amax, kernel, 1.5)
    with pytest.raises(ConfigError, match="channels"):
        smoothing_factors(amax[:3], kernel, 0.5)


def test_channel_absmax_is_the_max_over_recorded_inputs(tiny):
    _, model, calib = tiny
    layers = _layers(model)
    got = channel_absmax(model, calib, layers, batch_size=3, progress=False)  # uneven batches
    _, capture = _model_fns(model, 1.0)
    S, N = calib.inputs.shape[:2]
    want = {}
    for s in range(S):
        acts = capture(model.params, jnp.asarray(calib.inputs[s]), jnp.full((N,), int(calib.timesteps[s])),
                       jnp.zeros((N,), jnp.int32))
        for n in layers:
            a = np.abs(np.asarray(acts[n])).reshape(-1, acts[n].shape[-1]).max(0)
            want[n] = a if n not in want else np.maximum(want[n], a)
    assert got.keys() == set(layers)
    for n in layers:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5)  # batch shapes change float rounding


def test_smoothed_model_computes_the_same_function_and_flattens_channel_ranges(tiny, tmp_path):
    d, model, calib = tiny
    sm = smooth_model(model, calib, alpha=0.5, progress=False)
    layers = _layers(model)
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    t = jnp.array([3, 30, 60, 99])
    ref = np.asarray(model.apply(model.params, x, t))
    np.testing.assert_allclose(np.asarray(sm.apply(sm.params, x, t)), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    # Every quantizable layer is smoothed; the first and last are not.
    smoothed = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(sm.params, is_leaf=is_channel_smooth)
                if is_channel_smooth(v)}
    assert len(smoothed) == len(layers) and not any("conv_in" in s or "conv_out" in s for s in smoothed)
    # What calibration records is the smoothed input: per-channel maxima of x/s, spread
    # far less across channels than the float model's (alpha 0.5: the square root).
    before = channel_absmax(model, calib, layers, progress=False)
    after = channel_absmax(sm, calib, layers, progress=False)
    ratio = lambda a: a.max() / a[a > 0].min()  # noqa: E731
    name = "down_blocks.0.resnets.0.conv1"
    assert ratio(after[name]) < ratio(before[name]) ** 0.75
    # Saved and loaded like any model; storage counts the factors and no weights.
    out = tmp_path / "smoothed"
    save_model_dir(out, sm.meta, sm.params)
    back = jaxquant.load(out)
    np.testing.assert_allclose(np.asarray(back.apply(back.params, x, t)), np.asarray(sm.apply(sm.params, x, t)))
    rep, rep0 = storage_report(back.params), storage_report(model.params)
    assert rep.num_weights == rep0.num_weights
    factors = sum(int(np.prod(v.inv_scale.shape)) for v in jax.tree_util.tree_leaves(back.params, is_leaf=is_channel_smooth)
                  if is_channel_smooth(v))
    assert rep.total_bits == rep0.total_bits + 32 * factors
    with pytest.raises(ConfigError, match="already smoothed"):
        smooth_params(sm.params, {name: before[name]}, 0.5)


def test_layer_positions_and_full_resolution_smoothing(tiny, cli_calib, tmp_path, capsys):
    """Every dense and conv layer's input positions (the tiny UNet is 8×8 with one 4×4
    level); ``layers="full-resolution"`` smooths only the quantizable layers at 64
    positions, and the model still computes the same function."""
    from jaxquant.models.introspect import full_resolution_layers, layer_positions

    d, model, calib = tiny
    pos = layer_positions(model)
    assert set(pos) == set(layer_kernels(model.params))
    assert pos["conv_in"] == 64 and pos["down_blocks.1.resnets.0.conv1"] == 16
    assert pos["down_blocks.1.attentions.0.to_q"] == 16 and pos["down_blocks.0.resnets.0.time_emb_proj"] == 1
    assert pos["up_blocks.0.upsamplers.0.conv"] == 64  # it reads the upsampled (full-resolution) features
    full = full_resolution_layers(model)
    assert set(full) == {n for n, p in pos.items() if p == 64}
    names = smoothed_layers(model, layers="full-resolution")
    assert set(names) == set(full) - {"conv_in", "conv_out"} and set(names) < set(_layers(model))
    sm = smooth_model(model, calib, 0.5, layers="full-resolution", progress=False)
    done = {".".join(str(k.key) for k in p[:-1]) for p, v in
            jax.tree_util.tree_leaves_with_path(sm.params, is_leaf=is_channel_smooth) if is_channel_smooth(v)}
    assert done == set(names)
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, 1))
    t = jnp.array([5, 70])
    ref = np.asarray(model.apply(model.params, x, t))
    np.testing.assert_allclose(np.asarray(sm.apply(sm.params, x, t)), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    with pytest.raises(ConfigError, match="full-resolution"):
        smoothed_layers(model, layers="half")
    out = tmp_path / "fr"
    assert cli.main(["smooth", str(d), "--calib", str(cli_calib), "--alpha", "0.5", "--layers", "full-resolution",
                     "--out", str(out)]) == 0
    assert f"full-resolution layers: {len(names)}" in capsys.readouterr().out
    back = jaxquant.load(out)
    assert sum(is_channel_smooth(v) for v in jax.tree_util.tree_leaves(back.params, is_leaf=is_channel_smooth)) == len(names)


def test_quantized_smoothed_model_beats_unsmoothed_on_spread_channels(tiny):
    """Per-tensor 4-bit activations with float weights: smoothing lowers the output error
    of a model whose channels have very different ranges."""
    _, model, calib = tiny
    sm = smooth_model(model, calib, alpha=0.5, progress=False)
    cal_sm = calibrate(sm, CalibConfig(num_samples=8, steps=4, groups=2, batch_size=4, reservoir=512, xtx=False),
                       progress=False)
    plan_rules = [(r"conv_in|conv_out", None), (r".*", WeightQuantConfig(8))]
    from jaxquant.quant.rules import Rule
    rules = [Rule(p, c) for p, c in plan_rules]
    x = jnp.asarray(calib.inputs[:, :8].reshape(-1, 8, 8, 1)[:16])
    t = jnp.asarray(np.repeat(calib.timesteps, 8)[:16].astype(np.int32))
    errs = {}
    for tag, m, c in (("plain", model, calib), ("smoothed", sm, cal_sm)):
        ref = np.asarray(m.apply(m.params, x, t))
        q = quantize_uniform(m, c, WeightQuantConfig(8), ActQuantConfig(4), rules=rules, progress=False)
        out = np.asarray(m.apply(q, x, t))
        errs[tag] = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
    assert errs["smoothed"] < errs["plain"], errs


@pytest.fixture(scope="module")
def cli_calib(tiny, tmp_path_factory):
    """A calibration of the tiny model made by ``jaxquant calibrate``."""
    d, _, _ = tiny
    cal = tmp_path_factory.mktemp("smooth-cli") / "cal"
    assert cli.main(["calibrate", str(d), "--num-samples", "4", "--steps", "4", "--batch-size", "4", "--no-xtx",
                     "--out", str(cal)]) == 0
    return cal


def test_cli_smooth_then_quantize(tiny, cli_calib, tmp_path, capsys):
    d, _, _ = tiny
    cal = cli_calib
    out = tmp_path / "sm"
    assert cli.main(["smooth", str(d), "--calib", str(cal), "--alpha", "0.6", "--out", str(out)]) == 0
    assert "smoothed" in capsys.readouterr().out
    sm = jaxquant.load(out)
    leaves = [v for v in jax.tree_util.tree_leaves(sm.params, is_leaf=is_channel_smooth) if is_channel_smooth(v)]
    assert leaves and all(isinstance(v, ChannelSmooth) for v in leaves)
    assert cli.main(["smooth", str(d), "--calib", str(cal), "--alpha", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "alpha" in capsys.readouterr().err


def test_act_error_sources_variants(tiny):
    """benchmarks/act_error_sources: a per-step rebuild that keeps every step equals the
    quantizers it came from; keeping none leaves only clipping (far less error); its
    min/max variant (``method="minmax"``) clips nothing."""
    from benchmarks.act_error_sources import per_step_variant

    _, model, _ = tiny
    calib = calibrate(model, CalibConfig(num_samples=8, steps=4, groups=1, batch_size=4, reservoir=512, xtx=False),
                      progress=False)
    plan = resolve(layer_kernels(model.params), default_rules(WeightQuantConfig(8)))
    from jaxquant.quant.quantize import attach_act_quantizers
    base = attach_act_quantizers(model, calib, model.params, plan, ActQuantConfig(4))
    x = jnp.asarray(calib.inputs[:, :4].reshape(-1, 8, 8, 1))
    ts = np.repeat(calib.timesteps, 4).astype(np.int32)
    ref = np.asarray(model.apply(model.params, x, jnp.asarray(ts)))

    def out(params):  # one call per step: a call's quantizer group comes from its first timestep
        return np.concatenate([np.asarray(model.apply(params, x[i:i + 4], jnp.asarray(ts[i:i + 4])))
                               for i in range(0, len(ts), 4)])

    same = per_step_variant(base, 4, 100, lambda n, g: True)
    np.testing.assert_allclose(out(same), out(base), rtol=1e-5, atol=1e-6)
    err = lambda o: float(((o - ref) ** 2).sum() / (ref ** 2).sum())  # noqa: E731
    clip_only = err(out(per_step_variant(base, 4, 100, lambda n, g: False)))
    assert 0 < clip_only < err(out(base))
    # min/max ranges hold every value the calibration saw, these inputs' included: with
    # the fine step only the zero point's rounding (at most half a step of the original
    # width at the top of the range) can clip, so at 8 bits the output is far closer to
    # the float one than with the MSE ranges' clipping (this random net amplifies errors).
    base8 = attach_act_quantizers(model, calib, model.params, plan, ActQuantConfig(8))
    mm = attach_act_quantizers(model, calib, model.params, plan, ActQuantConfig(8, method="minmax"))
    mm_fine = err(out(per_step_variant(mm, 4, 100, lambda n, g: False)))
    assert mm_fine < 0.05 * err(out(per_step_variant(base8, 4, 100, lambda n, g: False)))
    assert err(out(mm)) > 10 * mm_fine  # at 8 bits the rounding is left


def test_quality_table_names_for_smoothing_and_minmax():
    """``-smNN`` and ``-mm`` in quality_table names: the smoothing strength, the minmax
    activation ranges, and RD curves kept apart from the plain model's."""
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args, smooth_args, smooth_suffix

    cfg = parse_config("uniform-w8a8-sm50")
    assert cfg["smooth"] == 0.5 and smooth_suffix(cfg) == "-sm50" and "act_method" not in cfg
    assert "--act-method" not in quantize_args("m", cfg, Path("c"), Path("w/q"))
    cfg = parse_config("rd-w6a6-g10-sm80-mm")
    assert cfg["smooth"] == 0.8 and cfg["act_method"] == "minmax"
    argv = quantize_args("m", cfg, Path("c"), Path("w/q"))
    assert argv[argv.index("--act-method") + 1] == "minmax"
    assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10-sm80-mm"))
    assert smooth_suffix(parse_config("uniform-w8a8")) == ""
    cfg = parse_config("aq-w2a8-ft100-sens-rmin1p5-plm-sm50fr-rec300-net600")
    assert cfg["smooth"] == 0.5 and cfg["smooth_layers"] == "full-resolution" and smooth_suffix(cfg) == "-sm50fr"
    argv = smooth_args("m", cfg, Path("c"), Path("w/s"))
    assert argv[argv.index("--layers") + 1] == "full-resolution" and argv[argv.index("--alpha") + 1] == "0.5"
    assert "--layers" not in smooth_args("m", parse_config("uniform-w8a8-sm50"), Path("c"), Path("w/s"))
    args = cli.build_parser().parse_args(["quantize", "M", "--out", "D", "--act-method", "minmax"])
    assert args.act_method == "minmax"


def _numpy_layer_error(x, groups, kernel, amax, alpha, a_bits, w_bits, num_groups):
    """Reference for one dense layer: min/max activation ranges per timestep group, the
    weight by the uniform per-channel quantizer without clipping search."""
    from jaxquant.quant.activation import range_to_scale_zero

    s = np.ones(kernel.shape[0]) if alpha is None else smoothing_factors(amax, kernel, alpha)
    xs = x.astype(np.float64) / s
    xq = np.empty_like(xs)
    for g in range(num_groups):
        m = groups == g
        if not m.any():
            continue
        scale, zero = range_to_scale_zero(xs[m].min(), xs[m].max(), a_bits)
        scale, zero = float(scale), float(zero)
        q = np.clip(np.round(xs[m].astype(np.float32) / np.float32(scale)) + zero, 0, 2 ** a_bits - 1)
        xq[m] = (q - zero) * scale
    w = kernel * s[:, None]
    lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
    step = ((hi - lo) / (2 ** w_bits - 1)).astype(np.float16).astype(np.float64)
    z = np.clip(np.round(-lo / step), 0, 2 ** w_bits - 1)
    wq = (np.clip(np.round(w / step) + z, 0, 2 ** w_bits - 1) - z) * step
    ref = x.astype(np.float64) @ kernel
    return float(((xq @ wq - ref) ** 2).sum() / (ref ** 2).sum())


def test_score_alphas_matches_a_numpy_reference_on_a_dense_layer():
    from jaxquant.quant.quantize import ActQuantConfig
    from jaxquant.quant.smooth import AlphaSearchConfig, score_alphas

    rng = np.random.default_rng(3)
    x = rng.standard_normal((24, 5, 16)).astype(np.float32)
    x[..., 3] *= 40.0  # two wide channels
    x[..., 11] *= 15.0
    kernel = rng.standard_normal((16, 12)).astype(np.float32)
    groups = np.repeat(np.arange(3), 8)
    amax = np.abs(x).reshape(-1, 16).max(0) * 1.1  # the factors come from the whole calibration
    cfg = AlphaSearchConfig(WeightQuantConfig(4, clip_search=1), ActQuantConfig(6, method="minmax"), groups=3,
                            alphas=(0.0, 0.3, 0.5, 0.8, 1.0))
    got = score_alphas(x, groups, kernel, amax, cfg)
    assert set(got.errors) == {None, 0.0, 0.3, 0.5, 0.8, 1.0}
    for a, e in got.errors.items():
        want = _numpy_layer_error(x, groups, kernel, amax, a, 6, 4, 3)
        np.testing.assert_allclose(e, want, rtol=2e-3, err_msg=f"alpha {a}")
    assert got.errors[got.alpha] == min(got.errors.values())
    assert got.alpha is not None and got.gain > 2  # wide channels: smoothing pays


@pytest.mark.parametrize("layer", ["down_blocks.1.resnets.0.conv1", "up_blocks.0.resnets.0.conv1"])
def test_model_criterion_is_the_error_of_the_model_with_that_layer_smoothed_and_quantized(tiny, layer, monkeypatch):
    """Criterion "model" scores a candidate by the model's output error with only that
    layer smoothed and quantized. Rebuilt the long way (smooth_model with a strength for
    that layer alone, a fresh calibration, quantize_uniform of that layer alone) with
    min/max ranges over the same inputs, the layer is the candidate and the model's error
    is the one reported. The second layer reads a concatenated (skip) input, whose two
    parts get separate ranges.

    At 4 bits, an input that moves by an ulp across a rounding boundary moves by a whole
    step, and on some CPUs that alone changes the error by a few per cent. So both sides
    run the same compiled forward (jaxquant's XLA options, as the criterion does; plain
    eager convolutions round differently), and the long way's ranges, which come from
    inputs the smoothed model computes itself and can differ from the recorded inputs
    divided by the factors in the last bits, are checked to agree with the candidate's to
    float rounding before the candidate's own quantizer is put in their place."""
    from jaxquant import xla
    from jaxquant.quant import smooth as smooth_mod
    from jaxquant.quant.rules import Rule, _split_name
    from jaxquant.quant.smooth import AlphaSearchConfig, search_alphas

    scored = []  # the activation quantizer of each candidate, in the order scored
    act_quant = smooth_mod._LayerCandidates.act_quant
    monkeypatch.setattr(smooth_mod._LayerCandidates, "act_quant",
                        lambda self, *a, **k: scored.append(act_quant(self, *a, **k)) or scored[-1])
    _, model, calib = tiny
    S, N = calib.inputs.shape[:2]
    acts = ActQuantConfig(4, method="minmax", attention_matmuls=False)
    only = [Rule(layer.replace(".", r"\."), WeightQuantConfig(6)), Rule(r".*", None)]
    cfg = AlphaSearchConfig(WeightQuantConfig(6), acts, groups=2, alphas=(0.5, 1.0), num_inputs=S * N,
                            criterion="model")
    got = search_alphas(model, calib, cfg, rules=only, progress=False)
    assert list(got) == [layer]
    assert len(scored) == 3  # None, 0.5, 1.0
    x, t = jnp.asarray(calib.inputs), calib.timesteps
    ts = [jnp.full((N,), int(t[s]), jnp.int32) for s in range(S)]
    fwd = xla.jit(lambda p, x, t: model.apply(p, x, t))  # the smoothed models share the module
    refs = [np.asarray(fwd(model.params, x[s], ts[s]), np.float64) for s in range(S)]
    den = sum((r ** 2).sum() for r in refs)
    for alpha, cand in zip((None, 0.5, 1.0), scored):
        sm = smooth_model(model, calib, {layer: alpha}, rules=only, progress=False)
        cal = calibrate(sm, CalibConfig(num_samples=8, steps=4, groups=2, batch_size=4, reservoir=512, xtx=False),
                        progress=False)
        q = quantize_uniform(sm, cal, WeightQuantConfig(6), acts, rules=only, progress=False)
        node = q
        for part in _split_name(q, layer):
            node = node[part]
        # the two paths reach the range through differently fused float32 sums: on AMD EPYC
        # (2026-12-07, CI) the scale differed by 1.4e-5 relative and so the rounded zero by one
        np.testing.assert_allclose(node["input_quant"].zero, cand.zero, atol=1, err_msg=f"alpha {alpha}")
        np.testing.assert_allclose(node["input_quant"].scale, cand.scale, rtol=1e-4, err_msg=f"alpha {alpha}")
        node["input_quant"] = cand
        num = sum(((np.asarray(fwd(q, x[s], ts[s]), np.float64) - refs[s]) ** 2).sum() for s in range(S))
        np.testing.assert_allclose(got[layer].errors[alpha], num / den, rtol=1e-3, err_msg=f"alpha {alpha}")
    assert got[layer].errors[got[layer].alpha] == min(got[layer].errors.values())


def test_cli_smooth_auto_writes_choices(tiny, cli_calib, tmp_path, capsys):
    import json

    from jaxquant.quant.rules import _split_name

    d, _, _ = tiny
    cal = cli_calib
    out = tmp_path / "auto"
    assert cli.main(["smooth", str(d), "--calib", str(cal), "--alpha", "auto", "--w-bits", "6", "--a-bits", "6",
                     "--groups", "2", "--alphas", "0.25", "0.75", "--num-inputs", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "alpha per layer at W6A6" in printed and "lower" in printed
    rep = json.loads((out / "smoothing.json").read_text())
    sm = jaxquant.load(out)
    assert rep["target"] == {"w_bits": 6, "a_bits": 6, "groups": 2, "act_method": "mse", "symmetric": False}
    assert rep["criterion"] == "layer"
    assert (out / "smoothing.png").stat().st_size > 0
    assert set(rep["layers"]) == set(_layers(sm))
    for name, c in rep["layers"].items():
        assert set(c["errors"]) == {"none", "0.25", "0.75"}
        node = sm.params
        for p in _split_name(sm.params, name):
            node = node[p]
        # a layer is smoothed exactly when a strength was chosen for it
        assert c["alpha"] in (None, 0.25, 0.75) and ("input_smooth" in node) == (c["alpha"] is not None)
    assert cli.main(["smooth", str(d), "--calib", str(cal), "--alpha", "auto", "--out", str(tmp_path / "b")]) == 2
    assert "--a-bits" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["smooth", str(d), "--calib", str(cal), "--alpha", "half", "--out", str(tmp_path / "c")])


def test_quality_table_names_per_layer_smoothing_by_its_target():
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args, smooth_args, smooth_suffix

    cfg = parse_config("rd-w6a6-g10-smauto")
    assert cfg["smooth"] == "auto" and smooth_suffix(cfg) == "-smauto-w6a6-g10"
    assert smooth_args("m", cfg, Path("cal"), Path("w/sm")) == [
        "smooth", "m", "--calib", "cal", "--alpha", "auto", "--out", "w/sm",
        "--w-bits", "6", "--a-bits", "6", "--groups", "10"]
    argv = quantize_args("w/sm", cfg, Path("c"), Path("w/q"))
    assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10-smauto-w6a6-g10"))
    assert smooth_args("m", parse_config("uniform-w8a8-sm50"), Path("cal"), Path("o"))[4:6] == ["--alpha", "0.5"]
    assert smooth_suffix(parse_config("aq-w4a8-ft100-smauto-mm")) == "-smauto-w4a8-g1"
    assert smooth_args("m", parse_config("aq-w4a8-smauto-mm"), Path("c"), Path("o"))[-2:] == ["--act-method", "minmax"]
    model_cfg = parse_config("uniform-w6a6-g10-smautom")
    assert smooth_suffix(model_cfg) == "-smautom-w6a6-g10"
    assert smooth_args("m", model_cfg, Path("c"), Path("o"))[-4:] == ["--criterion", "model", "--num-inputs", "40"]
    with pytest.raises(SystemExit, match="activations"):
        smooth_args("m", parse_config("uniform-w4af-smauto"), Path("c"), Path("o"))
