"""Uniform quantizers, packing, activation quantizers, calibration and the quantize command."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import cli
from jaxquant.calib import CalibConfig, calibrate, load_calibration
from jaxquant.calib import calibration as calib_mod
from jaxquant.errors import ConfigError
from jaxquant.quant import packing
from jaxquant.quant.accounting import storage_report
from jaxquant.quant.activation import ActQuant, at_timestep_group, fake_quant, timestep_group
from jaxquant.quant.quantize import ActQuantConfig, quantize_uniform
from jaxquant.quant.rules import FIRST_LAST_LAYERS, Rule, default_rules, layer_kernels, load_rules, resolve
from jaxquant.quant.uniform import WeightQuantConfig, quantize_weight

@pytest.mark.parametrize("bits", range(1, 9))
def test_packing_round_trips_with_exact_word_count(bits):
    rng = np.random.default_rng(bits)
    for n in (1, 9, 31, 32, 33, 99):
        codes = rng.integers(0, 2**bits, (3, n))
        words = packing.pack(codes, bits)
        assert words.shape == (3, -(-n * bits // 32)) and words.dtype == jnp.uint32
        np.testing.assert_array_equal(np.asarray(packing.unpack(words, bits, n)), codes)
        # Concrete codes are packed in numpy, traced ones in jnp: the same words.
        traced = jax.jit(lambda c: packing.pack(c, bits))(jnp.asarray(codes, jnp.uint32))
        np.testing.assert_array_equal(np.asarray(traced), np.asarray(words))
    # The bit stream itself: code i at bits [i·b, (i+1)·b) of the row, little-endian words.
    codes = rng.integers(0, 2**bits, (2, 45))
    words = np.asarray(packing.pack(codes, bits))
    stream = np.unpackbits(words.astype("<u4").view(np.uint8), axis=-1, bitorder="little")
    for r in range(2):
        for i in range(45):
            assert int(sum(int(v) << j for j, v in enumerate(stream[r, i * bits:(i + 1) * bits]))) == codes[r, i]


def test_weight_quantizer_error_falls_with_bits_and_clipping_helps():
    k = jax.random.normal(jax.random.key(0), (3, 3, 16, 12)) * jnp.linspace(0.1, 2, 12)
    errs = []
    for b in (2, 3, 4, 6, 8):
        q = quantize_weight(k, WeightQuantConfig(bits=b))
        errs.append(float(jnp.mean(jnp.square(q.dequantize() - k))))
        codes = np.asarray(q.int_codes())
        assert codes.min() >= 0 and codes.max() < 2**b
    assert all(a > b for a, b in zip(errs, errs[1:]))
    for sym in (True, False):
        no_clip = quantize_weight(k, WeightQuantConfig(bits=3, symmetric=sym, clip_search=1)).dequantize()
        clip = quantize_weight(k, WeightQuantConfig(bits=3, symmetric=sym)).dequantize()
        # Clipping is chosen per channel to minimise the error; it can only help.
        per_ch = lambda w: jnp.sum(jnp.square(w - k).reshape(-1, 12), 0)  # noqa: E731
        assert bool(jnp.all(per_ch(clip) <= per_ch(no_clip) + 1e-6))


def _reference_clip_search(w, bits, symmetric, ratios):
    """Per group of ``w [groups, gs]``, every candidate ratio's (codes, scale, zero, squared
    error), written out in numpy from the module docstring's definitions: the range
    ``r·[min, max]`` (symmetric: ``r·max|w|`` on ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric:
    widened to contain 0, with an integer zero point), a float16 scale, rounding to nearest."""
    qmax = 2 ** bits - 1
    out = []
    for row in np.asarray(w, np.float64):
        cands = []
        for r in ratios:
            lo, hi = r * row.min(), r * row.max()
            if symmetric:
                s16 = np.float16(max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1))
                s = float(s16) if s16 != 0 else 1.0
                q = np.clip(np.round(row / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                codes, zero, deq = q + 2 ** (bits - 1), None, q * s
            else:
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                s16 = np.float16((hi - lo) / qmax)
                s = float(s16) if s16 != 0 else 1.0
                zero = np.clip(np.round(-lo / s), 0, qmax)
                codes = np.clip(np.round(row / s) + zero, 0, qmax)
                deq = (codes - zero) * s
            cands.append((codes, np.float16(s), zero, float(np.sum((deq - row) ** 2))))
        out.append(cands)
    return out


@pytest.mark.parametrize("bits,symmetric,group_size", [(2, False, None), (4, False, None), (3, True, None),
                                                       (4, False, 8), (6, True, 8)])
def test_weight_quantizer_is_the_brute_force_clip_search(bits, symmetric, group_size):
    """Codes, scales and zero points equal those of the candidate ratio with the least
    squared error per group, recomputed in float64 (ties: any minimiser)."""
    from jaxquant.quant.uniform import as_matrix

    rng = np.random.default_rng(bits)
    kernel = (rng.standard_t(4, (3, 3, 8, 6)) * np.linspace(0.05, 1.0, 6)).astype(np.float32)
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, group_size=group_size, clip_search=25, clip_min=0.3)
    q = quantize_weight(kernel, cfg).to_fake()
    w = np.asarray(as_matrix(kernel))
    gs = group_size or w.shape[1]
    groups = w.reshape(-1, gs)
    codes = np.asarray(q.codes).reshape(-1, gs).astype(np.int64)
    scale = np.asarray(q.scale).reshape(-1)
    zero = None if symmetric else np.asarray(q.zero).reshape(-1)
    ref = _reference_clip_search(groups, bits, symmetric, np.linspace(0.3, 1.0, 25))
    chosen_ratio_not_one = 0
    for i, cands in enumerate(ref):
        best = min(c[3] for c in cands)
        ok = [j for j, c in enumerate(cands) if c[3] <= best * (1 + 1e-6) + 1e-12]
        match = [j for j in ok if np.array_equal(cands[j][0], codes[i]) and cands[j][1] == scale[i]
                 and (symmetric or cands[j][2] == zero[i])]
        assert match, f"group {i}: codes/scale/zero are not those of a least-error ratio"
        chosen_ratio_not_one += match[0] != len(cands) - 1
    assert chosen_ratio_not_one > 0  # the search clipped somewhere, so it was exercised
    # And the dequantized kernel is scale · (code − zero) in the kernel's layout.
    z = 2 ** (bits - 1) if symmetric else zero[:, None]
    deq = ((codes - z) * scale.astype(np.float64)[:, None]).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(as_matrix(q.dequantize())), deq, rtol=1e-6, atol=1e-7)


def test_fake_and_packed_forms_are_identical_and_grouped_scales_work():
    k = jax.random.normal(jax.random.key(2), (40, 24))
    for cfg in (WeightQuantConfig(bits=3), WeightQuantConfig(bits=5, symmetric=True, group_size=8)):
        q = quantize_weight(k, cfg)
        assert q.packed and not q.to_fake().packed
        np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(q.to_fake().dequantize()))
    assert quantize_weight(k, WeightQuantConfig(bits=4, group_size=8)).scale.shape == (24, 5)
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_weight(k, WeightQuantConfig(bits=4, group_size=7))
    with pytest.raises(ConfigError, match="2..8"):
        WeightQuantConfig(bits=1)


def test_accounting_counts_every_stored_bit():
    k = jax.random.normal(jax.random.key(3), (3, 3, 10, 6))  # K = 90 weights per output channel
    q = quantize_weight(k, WeightQuantConfig(bits=3))
    rep = storage_report({"layer": {"kernel": q, "bias": jnp.zeros(6)}})
    words = -(-90 * 3 // 32)
    expected = 6 * words * 32 + 6 * 16 + 6 * 8  # packed codes + f16 scales + u8 zero points
    (bias, kern) = rep.layers
    assert kern.bits == expected and kern.num_weights == 540
    assert bias.bits == 6 * 32
    assert rep.total_bits == expected + 6 * 32
    assert rep.bits_per_quantized_weight == pytest.approx(expected / 540)


def test_activation_quantizer_groups_and_split():
    x = jax.random.normal(jax.random.key(4), (2, 4, 4, 6)) * jnp.array([1, 1, 1, 10, 10, 10.0])
    aq = ActQuant(jnp.array([[0.01, 0.2], [0.05, 0.5]]), jnp.array([[128.0, 128.0], [128.0, 128.0]]), 8, split=3)
    with pytest.raises(ConfigError, match="select one per call"):
        aq(x)
    g1 = aq.select(1)
    y = g1(x)
    np.testing.assert_allclose(y[..., :3], fake_quant(x[..., :3], jnp.float32(0.05), jnp.float32(128.0), 255))
    np.testing.assert_allclose(y[..., 3:], fake_quant(x[..., 3:], jnp.float32(0.5), jnp.float32(128.0), 255))
    tree = at_timestep_group({"a": {"input_quant": aq, "kernel": jnp.ones(3)}}, 0)
    assert tree["a"]["input_quant"].num_groups == 1 and float(tree["a"]["input_quant"].scale[0, 1]) == pytest.approx(0.2)
    assert [int(timestep_group(t, 4, 1000)) for t in (0, 249, 250, 999)] == [0, 0, 1, 3]


def test_rules_first_match_wins_and_yaml_loads(tmp_path):
    names = ["conv_in", "down_blocks.0.resnets.0.conv1", "mid_block.attentions.0.to_q", "conv_out"]
    plan = resolve(names, [Rule(FIRST_LAST_LAYERS, None), Rule(r"mid_block\..*", 8), Rule(".*", 4)])
    assert plan == {"conv_in": None, "down_blocks.0.resnets.0.conv1": 4, "mid_block.attentions.0.to_q": 8, "conv_out": None}
    f = tmp_path / "rules.yaml"
    f.write_text("- pattern: 'conv_in|conv_out'\n  config: null\n- pattern: '.*attentions.*'\n  config: {bits: 8}\n"
                 "- pattern: '.*'\n  config: {bits: 4, symmetric: true}\n")
    rules = load_rules(f, lambda d: WeightQuantConfig(**d))
    assert rules[1].config == WeightQuantConfig(bits=8) and rules[2].config.symmetric
    f.write_text("- pattern: '('\n  config: null\n")
    with pytest.raises(ConfigError, match="bad regex"):
        load_rules(f, lambda d: WeightQuantConfig(**d))


def test_calibration_ranges_and_xtx_match_direct_computation(model_dir, calib):
    m = jaxquant.load(model_dir)
    _, capture = calib_mod._model_fns(m, 1.0)
    site = "down_blocks.0.resnets.0.conv1"
    g0_steps = np.flatnonzero(calib.step_groups == 0)
    vals = []
    for s in g0_steps:
        for b in range(0, 8, 4):
            acts = capture(m.params, jnp.asarray(calib.inputs[s, b:b + 4]), jnp.full((4,), calib.timesteps[s]),
                           jnp.zeros((4,), jnp.int32))
            vals.append(np.asarray(acts[site]).ravel())
    vals = np.concatenate(vals)
    assert calib.lo[site][0, 0] == pytest.approx(vals.min()) and calib.hi[site][0, 0] == pytest.approx(vals.max())
    # The sub-sample holds observed values (up to float differences of jitted vs eager code).
    srt = np.sort(vals)
    pos = np.clip(np.searchsorted(srt, calib.samples[site][0, 0]), 1, len(srt) - 1)
    near = np.minimum(np.abs(srt[pos] - calib.samples[site][0, 0]), np.abs(srt[pos - 1] - calib.samples[site][0, 0]))
    assert near.max() < 1e-4

    # XᵀX of a 3×3 conv equals the explicit im2col product over all calibration inputs.
    xtx = np.zeros((72, 72))
    for s in range(len(calib.timesteps)):
        acts = capture(m.params, jnp.asarray(calib.inputs[s]), jnp.full((8,), calib.timesteps[s]), jnp.zeros((8,), jnp.int32))
        a = np.pad(np.asarray(acts[site], np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
        rows = np.stack([a[:, i:i + 8, j:j + 8, :] for i in range(3) for j in range(3)], axis=3)  # (kh,kw) then in
        rows = rows.reshape(-1, 72)
        xtx += rows.T @ rows
    np.testing.assert_allclose(calib.xtx[site], xtx, rtol=2e-4, atol=1e-3)
    assert calib.xtx_count[site] == 8 * 8 * 8 * 4


@pytest.mark.parametrize("h,w,kh,kw,strides,padding", [
    (8, 8, 3, 3, (1, 1), ((1, 1), (1, 1))),   # SAME 3x3, the UNet case
    (5, 7, 3, 3, (1, 1), ((0, 0), (0, 0))),   # VALID, non-square
    (6, 6, 3, 3, (1, 1), ((2, 0), (0, 1))),   # asymmetric padding
    (2, 2, 3, 3, (1, 1), ((1, 1), (1, 1))),   # image smaller than the kernel window
    (4, 4, 3, 3, (1, 1), ((3, 3), (3, 3))),   # padding wider than the kernel
    (9, 9, 5, 3, (1, 1), ((2, 2), (1, 1))),   # non-square kernel
    (8, 8, 3, 3, (2, 2), ((1, 1), (1, 1))),   # strided: the im2col fallback
])
def test_conv_input_xtx_equals_the_im2col_product(h, w, kh, kw, strides, padding):
    x = np.random.default_rng(h * 31 + kh).standard_normal((2, h, w, 3)).astype(np.float32)
    xp = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
    ho = (xp.shape[1] - kh) // strides[0] + 1
    wo = (xp.shape[2] - kw) // strides[1] + 1
    rows = np.stack([xp[:, i:i + strides[0] * ho:strides[0], j:j + strides[1] * wo:strides[1], :]
                     for i in range(kh) for j in range(kw)], axis=3).reshape(-1, kh * kw * 3)
    got = np.asarray(jax.jit(lambda a: calib_mod.conv_input_xtx(a, kh, kw, strides, padding))(jnp.asarray(x)))
    np.testing.assert_allclose(got, rows.T @ rows, rtol=1e-5, atol=1e-4)


def test_accumulate_xtx_methods_agree(model_dir, calib):
    m = jaxquant.load(model_dir)
    shift, n1 = calib_mod.accumulate_xtx(m, calib, progress=False)
    ref, n2 = calib_mod.accumulate_xtx(m, calib, progress=False, conv_method="im2col")
    assert n1 == n2 and shift.keys() == ref.keys() == calib.xtx.keys()
    for n in ref:
        np.testing.assert_allclose(shift[n], ref[n], rtol=1e-4, atol=1e-4 * np.abs(ref[n]).max())
    with pytest.raises(ConfigError, match="conv_method"):
        calib_mod.accumulate_xtx(m, calib, conv_method="fft")


def test_split_sites_have_two_ranges(calib):
    split_sites = [s for s, v in calib.lo.items() if v.shape[1] == 2]
    assert "up_blocks.0.resnets.0.conv_shortcut" in split_sites
    assert all(s.startswith("up_blocks.") for s in split_sites)


def test_calibration_resumes_after_a_kill(model_dir, tmp_path, monkeypatch):
    m = jaxquant.load(model_dir)
    cfg = CalibConfig(num_samples=8, steps=2, groups=1, batch_size=4, reservoir=64, xtx=False)
    full = calibrate(m, cfg, progress=False)
    out = tmp_path / "cal"

    real_save = calib_mod.save_calibration
    calls = {"n": 0}

    class Killed(Exception):
        pass

    import orbax.checkpoint as ocp
    real = ocp.CheckpointManager.save

    def save_then_die(self, *a, **k):
        r = real(self, *a, **k)
        calls["n"] += 1
        raise Killed
    monkeypatch.setattr(ocp.CheckpointManager, "save", save_then_die)
    with pytest.raises(Killed):
        calibrate(m, cfg, out_dir=out, progress=False)
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    resumed = calibrate(m, cfg, out_dir=out, progress=False)
    assert calls["n"] == 1 and real_save is calib_mod.save_calibration
    np.testing.assert_array_equal(resumed.inputs, full.inputs)
    for s in full.sites:
        np.testing.assert_array_equal(resumed.samples[s], full.samples[s])
    again = load_calibration(out)
    np.testing.assert_array_equal(again.outputs, full.outputs)


def test_quantized_model_fake_equals_packed_and_bits_get_closer(model_dir, calib):
    m = jaxquant.load(model_dir)
    x = jnp.asarray(calib.inputs[1])
    t = jnp.full((8,), int(calib.timesteps[1]))
    ref = m.apply(m.params, x, t)
    errs = []
    for wb, ab in ((4, 6), (8, 8)):
        q = quantize_uniform(m, calib, WeightQuantConfig(bits=wb), ActQuantConfig(bits=ab), progress=False)
        fake = quantize_uniform(m, calib, WeightQuantConfig(bits=wb, packed=False), ActQuantConfig(bits=ab), progress=False)
        y, yf = jax.jit(m.apply)(q, x, t), jax.jit(m.apply)(fake, x, t)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(yf))
        errs.append(float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref)))
        kernels = layer_kernels(q)
        assert not hasattr(kernels["conv_in"], "bits") and not hasattr(kernels["conv_out"], "bits")
        assert isinstance(q["up_blocks.0.resnets.0"]["conv_shortcut"]["input_quant"], ActQuant)
        assert q["up_blocks.0.resnets.0"]["conv_shortcut"]["input_quant"].split == 16
        assert q["down_blocks.1.attentions.0"]["probs_quant"].bits == 16
    assert errs[1] < errs[0]
    w8 = quantize_uniform(m, calib, WeightQuantConfig(bits=8), None, progress=False)
    y8 = jax.jit(m.apply)(w8, x, t)
    assert float(jnp.linalg.norm(y8 - ref) / jnp.linalg.norm(ref)) < 0.03  # W8 with float activations


def test_cli_calibrate_quantize_sample(model_dir, tmp_path, capsys):
    cal, qdir = tmp_path / "cal", tmp_path / "q"
    common = ["--num-samples", "4", "--steps", "2", "--batch-size", "4"]
    assert cli.main(["calibrate", str(model_dir), *common, "--groups", "2", "--no-xtx", "--out", str(cal)]) == 0
    assert cli.main(["quantize", str(model_dir), "--w-bits", "4", "--a-bits", "8", "--calib", str(cal),
                     "--out", str(qdir)]) == 0
    assert "bits per quantized weight" in capsys.readouterr().out
    assert cli.main(["quantize", str(model_dir), "--w-bits", "4", "--a-bits", "8", "--calib", str(cal),
                     "--groups", "3", "--out", str(qdir)]) == 2
    assert cli.main(["sample", str(qdir), "--num", "2", "--steps", "3", "--batch-size", "2",
                     "--out", str(tmp_path / "s.npz")]) == 0
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (2, 8, 8, 1)


def test_minmax_activation_ranges_cover_every_calibrated_value(model_dir, calib):
    """``method="minmax"``: each group's range is the calibration's full range (up to the
    zero point's rounding, half a step), where MSE ranges clip; a split input merged
    into one range takes the extremes of both parts."""
    from jaxquant.quant.quantize import act_quantizer, attach_act_quantizers, site_extremes
    from jaxquant.quant.rules import _split_name

    m = jaxquant.load(model_dir)
    plan = resolve(layer_kernels(m.params), default_rules(WeightQuantConfig(8)))
    q = attach_act_quantizers(m, calib, m.params, plan, ActQuantConfig(6, method="minmax"))
    name = "down_blocks.0.resnets.0.conv1"
    node = q
    for k in _split_name(q, name):
        node = node[k]
    a = node["input_quant"]
    s, z = np.asarray(a.scale), np.asarray(a.zero)
    lo, hi = -z * s, (63 - z) * s
    want_lo, want_hi = np.minimum(calib.lo[name], 0), np.maximum(calib.hi[name], 0)
    assert np.all(np.abs(lo - want_lo) <= 0.5 * s + 1e-6) and np.all(np.abs(hi - want_hi) <= 0.5 * s + 1e-6)
    mse = act_quantizer(np.asarray(calib.samples[name]), 6, ActQuantConfig(6))
    assert np.all(np.asarray(mse.scale) <= s + 1e-7)  # MSE ranges are never wider
    split_site = next(n for n in calib.sites if np.shape(calib.lo[n])[1] == 2)
    lo2, hi2 = site_extremes(calib, split_site, merge_parts=True)
    np.testing.assert_array_equal(lo2[:, 0], np.min(calib.lo[split_site], axis=1))
    np.testing.assert_array_equal(hi2[:, 0], np.max(calib.hi[split_site], axis=1))
    with pytest.raises(ConfigError, match="extremes"):
        act_quantizer(np.asarray(calib.samples[name]), 6, ActQuantConfig(6, method="minmax"))


def test_percentile_and_mse_activation_ranges_by_value():
    """``percentile``: the range is numpy's percentiles of the sub-sample (widened to contain
    0), as scale and integer zero point. ``mse``: the clipped range's quantization MSE is
    within 1 % of the best of a 20x finer search over the same ratios, and below min/max's."""
    from jaxquant.quant.activation import mse_range, range_to_scale_zero
    from jaxquant.quant.quantize import act_quantizer

    rng = np.random.default_rng(0)
    samples = np.stack([rng.standard_t(3, (2, 4000)) * 0.5 + 0.3, rng.gamma(2.0, 1.0, (2, 4000))])  # [G=2, P=2, R]
    q = act_quantizer(samples, 6, ActQuantConfig(6, method="percentile", percentile=99.5), split=5)
    for g in range(2):
        for p in range(2):
            lo, hi = np.percentile(samples[g, p], 0.5), np.percentile(samples[g, p], 99.5)
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            scale = (hi - lo) / 63
            assert np.asarray(q.scale)[g, p] == pytest.approx(scale, rel=1e-6)
            assert np.asarray(q.zero)[g, p] == np.clip(np.round(-lo / scale), 0, 63)
    np.testing.assert_array_equal(np.asarray(q.scale), range_to_scale_zero(*np.percentile(
        samples, [0.5, 99.5], axis=-1), 6)[0])

    def mse(v, lo, hi, bits):
        s, z = range_to_scale_zero(lo, hi, bits)
        s, z = float(s), float(z)
        return np.mean((s * (np.clip(np.round(v / s) + z, 0, 2 ** bits - 1) - z) - v) ** 2)

    for v in (samples[0, 0], samples[1, 1], rng.laplace(size=5000)):
        for bits in (4, 8):
            lo, hi = mse_range(v, bits)
            fine = min(mse(v, r * v.min(), r * v.max(), bits) for r in np.linspace(0.2, 1.0, 1200))
            got = mse(v, lo, hi, bits)
            assert got <= fine * 1.01 and got <= mse(v, v.min(), v.max(), bits)


def _numpy_obs_codes(w, scale, zero, bits, h, damp):
    """Reference for error-feedback rounding, written the long way (optimal brain surgeon
    with an explicit inverse, no Cholesky): round column i, spread its error with row i of
    H⁻¹, then eliminate i from H⁻¹."""
    w = np.array(w, np.float64)
    out, k = w.shape
    h = np.array(h, np.float64) + damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.inv(h)
    s = np.asarray(scale, np.float32).astype(np.float64)[:, 0]
    z = np.asarray(zero, np.float64)[:, 0]
    codes = np.zeros((out, k), np.int64)
    for i in range(k):
        q = np.clip(np.round(w[:, i] / s) + z, 0, 2 ** bits - 1)
        codes[:, i] = q
        err = (w[:, i] - (q - z) * s) / hinv[i, i]
        w[:, i + 1:] -= np.outer(err, hinv[i, i + 1:])
        hinv = hinv - np.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def test_error_feedback_rounding_matches_the_long_way_and_beats_nearest():
    from jaxquant.quant.uniform import as_matrix

    rng = np.random.default_rng(0)
    k, out, n = 72, 16, 2000
    x = rng.normal(size=(n, k)) @ (np.eye(k) + 2 * rng.normal(size=(k, k)) / np.sqrt(k))
    h = x.T @ x
    kernel = rng.normal(size=(3, 3, 8, out)).astype(np.float32)
    w = np.asarray(as_matrix(jnp.asarray(kernel)))
    for bits in (3, 6):
        rtn = quantize_weight(kernel, WeightQuantConfig(bits=bits, packed=False))
        ef = quantize_weight(kernel, WeightQuantConfig(bits=bits, packed=False, error_feedback=True), h)
        np.testing.assert_array_equal(np.asarray(ef.scale), np.asarray(rtn.scale))  # only the codes change
        ref = _numpy_obs_codes(w, rtn.scale, rtn.zero, bits, h, 0.01)
        assert np.mean(np.asarray(ef.int_codes()) == ref) > 0.99

        def out_err(qw):
            d = np.asarray(as_matrix(qw.dequantize()), np.float64) - w
            return float(np.trace(d @ h @ d.T))
        assert out_err(ef) < 0.75 * out_err(rtn)
    # with uncorrelated inputs there is nothing to feed back: round to nearest exactly
    diag = np.diag(np.diag(h))
    for sym in (False, True):
        a = quantize_weight(kernel, WeightQuantConfig(bits=4, symmetric=sym, error_feedback=True), diag)
        b = quantize_weight(kernel, WeightQuantConfig(bits=4, symmetric=sym))
        np.testing.assert_array_equal(np.asarray(a.int_codes()), np.asarray(b.int_codes()))
    with pytest.raises(ConfigError, match="XᵀX"):
        quantize_weight(kernel, WeightQuantConfig(bits=4, error_feedback=True))
    with pytest.raises(ConfigError, match="does not fit"):
        quantize_weight(kernel, WeightQuantConfig(bits=4, error_feedback=True), np.eye(5))


def test_cli_gptq_lowers_every_layers_weighted_error(model_dir, calib, tmp_path, capsys):
    from jaxquant.quant.uniform import as_matrix
    from jaxquant.search.rd import _form

    assert "error_feedback" not in _form(WeightQuantConfig())  # curves stored before --gptq keep their name
    cal = calib_mod.save_calibration(calib, tmp_path / "cal")
    dirs = {}
    for flag in ([], ["--gptq"]):
        dirs[bool(flag)] = tmp_path / ("gptq" if flag else "rtn")
        assert cli.main(["quantize", str(model_dir), "--w-bits", "3", "--a-bits", "none", "--calib", str(cal),
                         *flag, "--out", str(dirs[bool(flag)])]) == 0
    m = jaxquant.load(model_dir)
    rtn, ef = (layer_kernels(jaxquant.load(dirs[f]).params) for f in (False, True))
    assert storage_report(jaxquant.load(dirs[True]).params).total_bytes == \
        storage_report(jaxquant.load(dirs[False]).params).total_bytes
    ratios = []
    for name, w in layer_kernels(m.params).items():
        if not hasattr(rtn[name], "bits"):
            continue
        h, wm = np.asarray(calib.xtx[name], np.float64), np.asarray(as_matrix(jnp.asarray(w)), np.float64)
        e = [float(np.trace(d @ h @ d.T)) for d in
             (np.asarray(as_matrix(q[name].dequantize()), np.float64) - wm for q in (rtn, ef))]
        ratios.append(e[1] / e[0])
    assert ratios and max(ratios) < 1.0 and np.mean(ratios) < 0.8
    nox = tmp_path / "noxtx"
    assert cli.main(["calibrate", str(model_dir), "--num-samples", "4", "--steps", "2", "--batch-size", "4",
                     "--no-xtx", "--out", str(nox)]) == 0
    assert cli.main(["quantize", str(model_dir), "--w-bits", "3", "--gptq", "--calib", str(nox),
                     "--out", str(tmp_path / "x")]) == 2


def test_quality_table_names_for_gptq():
    """``-gptq``: the flag, and RD curves kept apart from those of rounded-to-nearest weights."""
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args

    argv = quantize_args("m", parse_config("rd-w6a6-g10-sm50-gptq"), Path("c"), Path("w/q"))
    assert "--gptq" in argv and argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10-sm50-gptq"))
    assert "--gptq" in quantize_args("m", parse_config("uniform-w6a6-gptq"), Path("c"), Path("w/q"))
    assert "--gptq" not in quantize_args("m", parse_config("uniform-w6a6"), Path("c"), Path("w/q"))
    with pytest.raises(SystemExit):
        parse_config("aq-w4a8-gptq")


def test_site_bits_give_the_named_activation_quantizers_their_bits(model_dir, calib):
    """``ActQuantConfig.site_bits``: the first pattern matching a quantizer's whole name sets
    its bits, everything else keeps ``bits`` (probabilities ``softmax_bits``); a 16-bit input
    covers the calibration's whole range and is float to within half its step there."""
    from jaxquant.quant.quantize import _site_samples, site_extremes

    m = jaxquant.load(model_dir)
    sc = r"up_blocks\.0\.resnets\.\d+\.conv_shortcut\.input_quant"
    acts = ActQuantConfig(bits=6, site_bits=((sc, 16), (r".*\.probs_quant", 12), (r".*", 16)))
    bits, cfg = acts.at_site("up_blocks.0.resnets.1.conv_shortcut.input_quant", 6)
    assert bits == 16 and cfg.method == "minmax"  # above 8 bits: the whole calibrated range
    assert acts.at_site("x.probs_quant", 16)[0] == 12 and acts.site_override("y") == 16
    low = ActQuantConfig(bits=8, site_bits=((r"y", 6),))
    assert low.at_site("y", 8) == (6, low)  # at 8 bits or fewer: the config's own ranges
    assert ActQuantConfig(6).at_site("y", 6) == (6, ActQuantConfig(6))
    q = quantize_uniform(m, calib, WeightQuantConfig(bits=8), ActQuantConfig(6, site_bits=((sc, 16), (r".*\.probs_quant", 12))),
                         progress=False)
    base = quantize_uniform(m, calib, WeightQuantConfig(bits=8), ActQuantConfig(6), progress=False)

    def quantizers(tree, prefix=""):
        for k, v in tree.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, ActQuant):
                yield name, v
            elif isinstance(v, dict):
                yield from quantizers(v, name)

    got, want = dict(quantizers(q)), dict(quantizers(base))
    assert got.keys() == want.keys()
    wide = {n for n in got if n.startswith("up_blocks.0.resnets.") and n.endswith("conv_shortcut.input_quant")}
    assert len(wide) >= 2
    for n, aq in got.items():
        expect = 16 if n in wide else 12 if n.endswith("probs_quant") else 6
        assert aq.bits == expect, n
        if expect == 6:  # the quantizers the exceptions do not name are those of the plain config
            np.testing.assert_array_equal(aq.scale, want[n].scale)
    for n in wide:  # the whole calibrated range, to within the zero point's rounding
        layer = n.rsplit(".", 1)[0]
        lo, hi = site_extremes(calib, layer, False)
        aq = got[n]
        scale, zero = np.asarray(aq.scale), np.asarray(aq.zero)
        np.testing.assert_allclose(scale, (hi - lo) / 65535, rtol=1e-3)
        assert np.all(-zero * scale <= lo + scale) and np.all((65535 - zero) * scale >= hi - scale)
        v = _site_samples(calib, layer)  # [G, 2, R]: the two parts of the split input
        for g in range(aq.num_groups):
            for j in range(2):
                one = ActQuant(scale[g:g + 1, j:j + 1], zero[g:g + 1, j:j + 1], 16)
                err = np.abs(np.asarray(one(jnp.asarray(v[g, j]))) - v[g, j]).max()
                assert err <= 0.5 * scale[g, j] * (1 + 1e-3)  # float up to half a 16-bit step


def test_site_bits_are_checked(model_dir, calib):
    m = jaxquant.load(model_dir)
    with pytest.raises(ConfigError, match="4..16"):
        ActQuantConfig(8, site_bits=((r".*", 17),))
    with pytest.raises(ConfigError, match="regular expression"):
        ActQuantConfig(8, site_bits=((r"up_blocks[", 16),))
    with pytest.raises(ConfigError, match="matches none"):  # a typo must not pass silently
        quantize_uniform(m, calib, WeightQuantConfig(bits=8),
                         ActQuantConfig(8, site_bits=((r"up_block\.0\..*\.input_quant", 16),)), progress=False)
    with pytest.raises(ConfigError, match="matches none"):  # the whole name, not a part of it
        quantize_uniform(m, calib, WeightQuantConfig(bits=8),
                         ActQuantConfig(8, site_bits=((r"conv_shortcut", 16),)), progress=False)


def test_cli_a_bits_at(model_dir, tmp_path, capsys):
    cal, qdir = tmp_path / "cal", tmp_path / "q"
    assert cli.main(["calibrate", str(model_dir), "--num-samples", "4", "--steps", "2", "--batch-size", "4",
                     "--groups", "2", "--no-xtx", "--out", str(cal)]) == 0
    pattern = r"up_blocks\.0\.resnets\.0\.conv_shortcut\.input_quant"
    common = ["quantize", str(model_dir), "--w-bits", "4", "--calib", str(cal), "--out", str(qdir)]
    assert cli.main([*common, "--a-bits", "8", "--a-bits-at", f"{pattern}=16"]) == 0
    q = jaxquant.load(qdir)
    assert q.params["up_blocks.0.resnets.0"]["conv_shortcut"]["input_quant"].bits == 16
    assert q.params["up_blocks.0.resnets.1"]["conv_shortcut"]["input_quant"].bits == 8
    assert q.meta.extra["quantized"]["a_bits_at"] == [[pattern, 16]]
    capsys.readouterr()
    assert cli.main([*common, "--a-bits", "8", "--a-bits-at", pattern]) == 2
    assert "REGEX=BITS" in capsys.readouterr().err
    assert cli.main([*common, "--a-bits", "none", "--a-bits-at", f"{pattern}=16"]) == 2
    assert cli.main([*common, "--method", "rd", "--a-bits", "8", "--a-bits-at", f"{pattern}=16"]) == 2
    assert "rd chooses" in capsys.readouterr().err
