"""Rate–distortion mixed precision: SSIM, Lagrangian allocation, curves, plans, CLI.

One tiny random UNet2DModel; only the mid block is quantized (rules), so the curves
cover 10 weight layers, their 10 inputs and one attention's q/k/v, measured on two
timestep groups.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

import jaxquant
from jaxquant import cli
from jaxquant.calib import CalibConfig, calibrate, load_calibration
from jaxquant.calib.calibration import save_calibration
from jaxquant.diffusion import ScheduleConfig
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.io.model_dir import ModelDirMeta, load_model_dir, save_model_dir
from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel
from jaxquant.quant import serialize
from jaxquant.quant.accounting import storage_report
from jaxquant.quant.activation import ActQuant, at_timestep_group, fake_quant
from jaxquant.quant.quantize import ActQuantConfig
from jaxquant.quant.rules import FIRST_LAST_LAYERS, Rule
from jaxquant.quant.uniform import UniformWeight, WeightQuantConfig
from jaxquant.search import distortion as dist
from jaxquant.search import plots, rd

TINY = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": None,
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
}
WCFG = WeightQuantConfig(clip_search=4)  # a short clipping search keeps the test fast
RULES = [Rule(FIRST_LAST_LAYERS, None), Rule(r"mid_block\..*", WCFG), Rule(r".*", None)]
RULES_YAML = "- pattern: 'mid_block\\..*'\n  config: {clip_search: 4}\n- pattern: '.*'\n  config: null\n"
ACFG = ActQuantConfig(bits=8)
CCFG = rd.CurveConfig(inputs_per_group=3, batch_size=8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(model, calibration, calibration dir, problem, curves, curves dir)``."""
    root = tmp_path_factory.mktemp("rd")
    cfg = UNet2DConfig.from_dict(TINY)
    module = UNet2DModel(cfg)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                                jnp.zeros((1,), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    mdir = save_model_dir(root / "tiny", ModelDirMeta("unet2d", cfg.to_dict(),
                                                      ScheduleConfig(num_train_timesteps=100).to_dict()), params)
    model = jaxquant.load(mdir)
    # The calibration settings of test_quant_uniform (compiles are shared through the cache).
    calib = calibrate(model, CalibConfig(num_samples=8, steps=4, groups=2, batch_size=4, reservoir=512, xtx=False),
                      progress=False)
    save_calibration(calib, root / "calib")
    calib = load_calibration(root / "calib")
    problem = rd.RDProblem(model, calib, WCFG, ACFG, RULES, CCFG)
    curves = rd.compute_curves(problem, root / "curves", progress=False)
    return model, calib, root / "calib", problem, curves, root / "curves"


# --------------------------------------------------------------------------- SSIM


@pytest.mark.parametrize("gaussian,sample_cov,win", [(False, True, 7), (False, False, 5), (True, False, 7),
                                                     (True, True, 7)])
def test_ssim_matches_skimage(gaussian, sample_cov, win):
    rng = np.random.default_rng(win + 10 * gaussian + sample_cov)
    x = rng.standard_normal((3, 16, 13, 2))
    y = 0.8 * x + 0.4 * rng.standard_normal(x.shape) + 0.1
    data_range = rng.uniform(2, 6, (3, 2))
    cfg = dist.SSIMConfig(win_size=win, gaussian=gaussian, sample_covariance=sample_cov)
    ours = np.asarray(dist.ssim(x, y, data_range, cfg))
    ref = np.array([[structural_similarity(x[i, ..., c], y[i, ..., c], data_range=data_range[i, c],
                                           win_size=None if gaussian else win, gaussian_weights=gaussian,
                                           use_sample_covariance=sample_cov) for c in range(2)] for i in range(3)])
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    # Unbatched forms, and identical images.
    assert float(dist.ssim(x[0, ..., 0], x[0, ..., 0], 1.0, cfg)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(np.asarray(dist.ssim(x[1], y[1], 3.0, cfg)),
                               [structural_similarity(x[1, ..., c], y[1, ..., c], data_range=3.0,
                                                     win_size=None if gaussian else win, gaussian_weights=gaussian,
                                                     use_sample_covariance=sample_cov) for c in range(2)], atol=2e-6)


def test_output_stats_and_distortions():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((4, 9, 9, 2)).astype(np.float32)
    out = ref + 0.1 * rng.standard_normal(ref.shape).astype(np.float32)
    st = np.asarray(dist.output_stats(jnp.asarray(out), jnp.asarray(ref)))
    np.testing.assert_allclose(st[:, 0], np.sum((out - ref) ** 2, axis=(1, 2, 3)), rtol=1e-5)
    sk = [np.mean([1 - structural_similarity(out[i, ..., c], ref[i, ..., c], data_range=np.ptp(ref[i, ..., c]))
                   for c in range(2)]) for i in range(4)]
    np.testing.assert_allclose(st[:, 1], sk, atol=3e-6)
    ref2 = float(np.sum(ref.astype(np.float64) ** 2))
    mse = dist.distortion("mse", st[:, 0].sum(), ref2, st[:, 1].sum(), 4)
    assert mse == pytest.approx(np.sum((out - ref) ** 2) / ref2, rel=1e-5)
    both = dist.distortion("mse+ssim", st[:, 0].sum(), ref2, st[:, 1].sum(), 4)
    assert both == pytest.approx(mse + np.mean(sk), rel=1e-5)
    # 1 − SSIM keeps its precision for tiny perturbations (float32 SSIM would round it away).
    tiny = ref + 1e-4 * rng.standard_normal(ref.shape).astype(np.float32)
    got = np.asarray(dist.dssim(tiny, ref, 4.0))
    want = [[1 - structural_similarity(tiny[i, ..., c].astype(np.float64), ref[i, ..., c].astype(np.float64),
                                       data_range=4.0) for c in range(2)] for i in range(4)]
    np.testing.assert_allclose(got, want, rtol=2e-3)
    with pytest.raises(ConfigError, match="unknown distortion"):
        dist.distortion("psnr", 1, 1, 1, 1)
    with pytest.raises(ConfigError, match="odd"):
        dist.SSIMConfig(win_size=4)


# --------------------------------------------------------------------------- allocation


def _dp_optimum(sizes, dists, cap):
    """Exact ``best[c]``: least total distortion with total (integer) size ≤ c, c = 0..cap."""
    best = np.zeros(cap + 1)
    for s, d in zip(sizes, dists):
        new = np.full(cap + 1, np.inf)
        for si, di in zip(s, d):
            si = int(si)
            if si <= cap:
                new[si:] = np.minimum(new[si:], best[:cap + 1 - si] + di)
        best = new
    return np.minimum.accumulate(best)


def _hull_sizes(s, d):
    """Sizes of the lower convex hull of one curve's (size, distortion) points, from its
    smallest size up to its least-distortion point."""
    pts = sorted(zip(s, d))
    hull = []
    for p in pts:
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
            hull.pop()
        hull.append(p)
    # Keep the decreasing part: points beyond the least distortion are never chosen.
    best = int(np.argmin([q[1] for q in hull]))
    return np.array([q[0] for q in hull[:best + 1]])


def _instance(rng, n, m, convex, unit):
    sizes, dists = [], []
    for _ in range(n):
        if unit:  # sizes 1..m (bit widths of one weight)
            s = np.arange(1, m + 1)
        else:
            s = np.cumsum(rng.integers(1, 6, m))
        if convex:
            # convex in size: slopes decrease in magnitude along the curve
            slopes = np.sort(rng.exponential(1.0, m - 1))[::-1]
            d = np.concatenate([[0.0], -np.cumsum(slopes * np.diff(s))]) + 10.0
        else:
            d = rng.uniform(0, 5, m)  # any shape: non-monotone, non-convex
        sizes.append(s.astype(float))
        dists.append(d)
    return sizes, dists


@pytest.mark.parametrize("convex,unit", [(True, True), (True, False), (False, True), (False, False)])
def test_lagrangian_allocation_is_optimal_at_its_own_size(convex, unit):
    rng = np.random.default_rng(7 + 2 * convex + unit)
    for trial in range(25):
        n, m = int(rng.integers(2, 7)), int(rng.integers(2, 6))
        sizes, dists = _instance(rng, n, m, convex, unit)
        lo, hi = int(sum(s.min() for s in sizes)), int(sum(s.max() for s in sizes))
        opt = _dp_optimum(sizes, dists, hi)
        for budget in rng.integers(lo, hi + 1, 4):
            a = rd.allocate(list(zip(sizes, dists)), float(budget))
            chosen_s = sum(s[j] for s, j in zip(sizes, a.choice))
            chosen_d = sum(d[j] for d, j in zip(dists, a.choice))
            assert a.size == pytest.approx(chosen_s) and a.distortion == pytest.approx(chosen_d)
            assert a.size <= budget
            # On the lower convex hull: nothing of at most its size is better.
            assert a.distortion <= opt[int(round(a.size))] + 1e-9
            if convex and unit:  # equal steps on convex curves: the Lagrangian optimum is exact
                assert a.distortion == pytest.approx(opt[budget], abs=1e-9)
            # Within one step of the budget frontier: it leaves less than one step of a lower
            # convex hull (the only points equal slopes can pick) unused, so it is at least as
            # good as the optimum of a budget one step smaller.
            step = max(np.diff(_hull_sizes(s, d)).max(initial=0) for s, d in zip(sizes, dists))
            if a.lam == 0.0:  # the budget does not bind: every curve at its least distortion
                assert a.distortion == pytest.approx(opt[hi], abs=1e-9)
                continue
            assert a.size >= budget - step - 1e-9
            assert a.distortion <= opt[max(int(np.ceil(budget - step)), lo)] + 1e-9
    with pytest.raises(ConfigError, match="infeasible bit budget"):
        rd.allocate([(np.array([2.0, 3.0]), np.array([1.0, 0.0]))] * 3, 5.0)
    big = rd.allocate([(np.array([2.0, 3.0, 4.0]), np.array([1.0, 0.5, 0.6]))], 100.0)
    assert list(big.choice) == [1] and big.lam == 0.0  # unconstrained: least distortion


# --------------------------------------------------------------------------- curves and plans


def test_curves_sizes_and_shapes(setup):
    _, _, _, problem, curves, _ = setup
    kinds = [c.site.kind for c in curves.curves.values()]
    assert kinds.count("weight") == 10 and kinds.count("act") == 13  # mid block: 10 layers, 10 inputs, q/k/v
    assert {s.name for s in problem.sites if s.kind == "probs"} == {"mid_block.attentions.0.probs"}
    for c in curves.of_kind("weight"):
        d = curves.distortion(c.site.key)
        assert d.shape == (2, 7) and np.all(d >= 0) and np.all(d[:, -1] < d[:, 0])
        # Sizes are the accounting of the stored container at each width.
        for b, size in zip(c.bits, c.sizes):
            q = problem.weight_quant(c.site.name, b)
            assert isinstance(q, UniformWeight) and q.bits == b
            assert size == storage_report({"k": q}).total_bits
    for c in curves.of_kind("act"):
        assert list(c.sizes) == [c.site.numel * b for b in c.bits] and c.bits == rd.ACT_BITS
        d = curves.distortion(c.site.key, "mse")
        assert d.shape == (2, 5) and np.all(d[:, -1] < d[:, 0]) and np.all(c.dssim > -1e-6)
    assert curves.count.tolist() == [3, 3]


def test_single_site_plans_measure_their_curve_points(setup):
    """A plan quantizing one site, run through the ordinary quantized forward pass
    (UniformWeight / ActQuant with per-group bits), has exactly its curve point."""
    _, _, _, problem, curves, _ = setup
    w = curves.curves["weight:mid_block.resnets.0.conv1"]
    # The activation whose 4-bit quantization hurts most, at 4 bits in group 0 and 5 in group 1.
    a = max(curves.of_kind("act"), key=lambda c: curves.distortion(c.site.key)[:, 0].min())
    for plan, (key, cols) in (
        (rd.RDPlan("mse", {w.site.name: 3}, {}, False, 0, 0, [], 0, []), (w.site.key, [w.bits.index(3)] * 2)),
        (rd.RDPlan("mse", {}, {a.site.name: (4, 5)}, False, 0, 0, [], 0, []), (a.site.key, [0, 1])),
    ):
        params = rd.quantize_rd(problem, plan)
        sums = rd.measure_distortion(problem, params)
        for kind in dist.DISTORTIONS:
            want = curves.distortion(key, kind)[[0, 1], cols]
            # Equal up to float32 rounding (the vmapped evaluation sums in another order).
            np.testing.assert_allclose(rd.group_distortion(curves, sums, kind), want, rtol=1e-3)
        other = curves.distortion(key)[[0, 1], [c + 1 for c in cols]]  # the next width is far off
        assert np.all(np.abs(rd.group_distortion(curves, sums) / other - 1) > 0.05)
    node = params
    for k in a.site.node:
        node = node[k]
    assert node[a.site.leaf].bits == (4, 5) and not any(isinstance(v, UniformWeight) for v in node.values())


def test_plan_meets_budgets_and_round_trips(setup, tmp_path):
    model, _, _, problem, curves, _ = setup
    plan = rd.allocate_plan(curves, 4, 6, "mse+ssim")
    assert plan.weight_size <= plan.weight_budget and all(s <= plan.act_budget for s in plan.act_size)
    uniform4 = sum(problem.weight_size(c.site.name, 4) for c in curves.of_kind("weight"))
    assert plan.weight_budget == pytest.approx(uniform4)
    np.testing.assert_allclose(plan.predicted, rd.predicted_distortion(curves, plan.weight_bits, plan.act_bits,
                                                                      "mse+ssim"))
    assert len(set(plan.weight_bits.values())) > 1  # mixed precision
    params = rd.quantize_rd(problem, plan)
    rep = storage_report(params)
    assert sum(r.bits for r in rep.quantized) == plan.weight_size
    # Per-group activation bits are stored (as "act" v2) and come back.
    assert any(len(set(v)) > 1 for v in plan.act_bits.values())  # some site has per-group widths
    d = save_model_dir(tmp_path / "q", model.meta, params)
    manifest = json.loads((d / "config.json").read_text())["quantization"]["layers"]
    for site in problem.act_sites:
        entry = manifest.get(".".join(site.node + (site.leaf,)))
        if site.kind == "act":
            bits = plan.act_bits[site.name]
            assert entry["version"] == (2 if len(set(bits)) > 1 else 1)
            assert entry["static"]["bits"] == (list(bits) if len(set(bits)) > 1 else bits[0])
    _, loaded = load_model_dir(d)
    x, t = jnp.asarray(problem.inputs.x[:3]), jnp.asarray(problem.inputs.t[:3])
    np.testing.assert_array_equal(np.asarray(jax.jit(model.apply)(loaded, x, t)),
                                  np.asarray(jax.jit(model.apply)(params, x, t)))
    with pytest.raises(ConfigError, match="infeasible bit budget"):
        rd.allocate_plan(curves, 2, 3)  # 3-bit activations are below every candidate
    pg = rd.allocate_plan(curves, 8, None, per_group_weights=True)
    assert pg.weight_size <= pg.weight_budget and all(len(v) == 2 for v in pg.weight_bits.values())
    with pytest.raises(ConfigError, match="per-group weight copies"):
        rd.quantize_rd(problem, pg)


def test_weight_floor_keeps_every_layer_at_or_above_it(setup):
    _, _, _, problem, curves, _ = setup
    free = rd.allocate_plan(curves, 4, 6)
    assert min(free.weight_bits.values()) < 4  # without a floor some layer goes below the average
    # At the average itself the floor leaves one feasible plan: every layer at 4 bits.
    at4 = rd.allocate_plan(curves, 4, 6, min_weight_bits=4)
    assert set(at4.weight_bits.values()) == {4} and at4.min_weight_bits == 4
    assert at4.weight_size <= at4.weight_budget == free.weight_budget
    assert at4.act_bits == free.act_bits  # activations are allocated apart from the weights
    floor3 = rd.allocate_plan(curves, 5, 6, min_weight_bits=3)
    assert min(floor3.weight_bits.values()) >= 3 and floor3.weight_size <= floor3.weight_budget
    np.testing.assert_allclose(floor3.predicted, rd.predicted_distortion(curves, floor3.weight_bits,
                                                                        floor3.act_bits, "mse"))
    # Per-group copies (2 groups here) share one budget: at 8 bits, about 4 bits per copy.
    pg = rd.allocate_plan(curves, 8, None, per_group_weights=True, min_weight_bits=3)
    assert all(min(v) >= 3 for v in pg.weight_bits.values()) and pg.weight_size <= pg.weight_budget
    assert min(min(v) for v in rd.allocate_plan(curves, 8, None, per_group_weights=True).weight_bits.values()) < 3
    with pytest.raises(ConfigError, match="above the average"):
        rd.allocate_plan(curves, 4, 6, min_weight_bits=5)


def test_joint_measurement_and_additivity(setup, tmp_path):
    _, _, _, problem, curves, _ = setup
    rng = np.random.default_rng(3)
    wb = {c.site.name: int(rng.choice(c.bits)) for c in curves.of_kind("weight")}
    ab = {c.site.name: (int(rng.choice(c.bits)), int(rng.choice(c.bits))) for c in curves.of_kind("act")}
    plan = rd.RDPlan("mse", wb, ab, False, 0, 0, [], 0, [])
    # The one-compile joint evaluator equals the real quantized model (probs quantizers included).
    real = rd.group_distortion(curves, rd.measure_distortion(problem, rd.quantize_rd(problem, plan)))
    np.testing.assert_allclose(rd.joint_distortion(problem, curves, wb, ab), real, rtol=1e-4)
    add = rd.additivity_check(problem, curves, num_plans=4, progress=False)
    assert add.measured.shape == add.predicted.shape == (4, 2)
    assert np.all(add.measured > 0) and np.isfinite(add.r2) and add.pearson_r2 > 0.5
    pngs = [plots.plot_additivity(add, tmp_path / "a.png"), plots.plot_curves(curves, tmp_path / "c.png"),
            plots.plot_allocation(rd.allocate_plan(curves, 4, 6), curves, tmp_path / "p.png")]
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_curves_resume_and_refuse_other_settings(setup, tmp_path, monkeypatch):
    model, calib, _, problem, curves, _ = setup
    keys = list(curves.curves)[:4]
    calls = []
    real = rd._evaluate_site

    class Killed(Exception):
        pass

    def count_then_die(problem, site, *a):
        calls.append(site.key)
        if len(calls) == 3:
            raise Killed
        return real(problem, site, *a)

    monkeypatch.setattr(rd, "_evaluate_site", count_then_die)
    with pytest.raises(Killed):
        rd.compute_curves(problem, tmp_path, only=keys, progress=False)
    saved = json.loads((tmp_path / "curves.json").read_text())
    assert list(saved["curves"]) == keys[:2]
    calls.clear()
    resumed = rd.compute_curves(problem, tmp_path, only=keys, progress=False)
    assert calls == keys[2:]  # finished sites are skipped
    for k in keys:
        np.testing.assert_allclose(resumed.curves[k].err2, curves.curves[k].err2, rtol=1e-6)
    other = rd.RDProblem(model, calib, WCFG, ActQuantConfig(bits=8, method="percentile"), RULES, CCFG)
    with pytest.raises(CheckpointError, match="another model, calibration or settings"):
        rd.compute_curves(other, tmp_path, only=keys[:1], progress=False)


def test_activation_quantizer_with_per_group_bits():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    aq = ActQuant(jnp.array([[0.02], [0.3]]), jnp.array([[128.0], [7.0]]), (8, 4))
    assert aq.describe() == "act 8/4b x2 groups" and aq.group_bits == (8, 4)
    f = jax.jit(lambda g, x: at_timestep_group({"q": aq}, g)["q"](x))
    np.testing.assert_array_equal(np.asarray(f(0, x)), np.asarray(fake_quant(x, jnp.float32(0.02), 128.0, 255)))
    np.testing.assert_array_equal(np.asarray(f(1, x)), np.asarray(fake_quant(x, jnp.float32(0.3), 7.0, 15)))
    plain, manifest = serialize.to_storable({"l": {"input_quant": aq}})
    assert manifest["layers"]["l.input_quant"]["version"] == 2
    back = serialize.from_storable(plain, json.loads(json.dumps(manifest)))["l"]["input_quant"]
    assert back.bits == (8, 4) and back.qmax is None
    manifest["layers"]["l.input_quant"]["static"]["bits"] = [8, 4, 4]
    with pytest.raises(CheckpointError, match="3 per-group bit widths for 2 timestep groups"):
        serialize.from_storable(plain, manifest)


def test_sharded_candidates_match_one_device(setup, tmp_path):
    """With two (host) devices the candidate axis is sharded; the curves are the same."""
    model, _, cdir, _, curves, _ = setup
    keys = ["weight:mid_block.attentions.0.to_v", "act:mid_block.resnets.1.conv2"]
    script = textwrap.dedent(f"""
        import json, jax, numpy as np, jaxquant
        from jaxquant.calib import load_calibration
        from jaxquant.quant.quantize import ActQuantConfig
        from jaxquant.quant.rules import FIRST_LAST_LAYERS, Rule
        from jaxquant.quant.uniform import WeightQuantConfig
        from jaxquant.search import rd
        assert jax.device_count() == 2
        w = WeightQuantConfig(clip_search=4)
        rules = [Rule(FIRST_LAST_LAYERS, None), Rule(r"mid_block\\..*", w), Rule(r".*", None)]
        p = rd.RDProblem(jaxquant.load({str(model.path)!r}), load_calibration({str(cdir)!r}), w,
                         ActQuantConfig(bits=8), rules, rd.CurveConfig(inputs_per_group=3, batch_size=8))
        c = rd.compute_curves(p, only={keys!r}, progress=False)
        print(json.dumps({{k: v.err2.tolist() for k, v in c.curves.items()}}))
    """)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    for k in keys:
        np.testing.assert_allclose(got[k], curves.curves[k].err2, rtol=1e-5)


def test_cli_rd_quantize_info_and_curves(setup, tmp_path, capsys):
    model, _, cdir, _, curves, curves_dir = setup
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES_YAML)
    cdir2 = tmp_path / "curves"
    shutil.copytree(curves_dir, cdir2)  # same settings: the CLI resumes all sites
    assert cli.main(["rd-curves", str(model.path), "--calib", str(cdir), "--rules", str(rules), "--rd-inputs", "3",
                     "--out", str(cdir2)]) == 0
    assert (cdir2 / "curves.png").is_file() and "10 weight and 13 activation sites" in capsys.readouterr().out
    q = tmp_path / "q"
    assert cli.main(["quantize", str(model.path), "--method", "rd", "--w-bits", "4", "--a-bits", "6",
                     "--distortion", "mse+ssim", "--calib", str(cdir), "--rules", str(rules), "--rd-inputs", "3",
                     "--curves", str(cdir2), "--rd-additivity", "2", "--out", str(q)]) == 0
    out = capsys.readouterr().out
    assert "additivity over 2 random plans" in out and "bits per quantized weight" in out
    report_dir = tmp_path / "q.rd"
    for f in ("plan.json", "report.json", "report.md", "allocation.png", "additivity.png"):
        assert (report_dir / f).is_file() and not (cdir2 / f).exists(), f
    plan = json.loads((report_dir / "plan.json").read_text())
    assert plan == rd.allocate_plan(curves, 4, 6, "mse+ssim").to_json()
    info = cli.info_report(str(q))
    rows = {r["name"]: r for r in info["layers"]}
    for layer, bits in plan["weight_bits"].items():
        row = rows[layer + ".kernel"]
        c = curves.curves["weight:" + layer]
        assert row["config"].startswith(f"uniform {bits}b") and row["bits"] == c.sizes[c.bits.index(bits)]
    assert info["totals"]["quantized_bits"] == plan["weight_size"] <= plan["weight_budget"]
    assert rows["mid_block.attentions.0.probs_quant"]["config"].startswith("act 16b")
    loaded = jaxquant.load(q)
    meta = loaded.meta.extra["quantized"]
    assert meta["method"] == "rd" and meta["weight_bits"] == plan["weight_bits"]
    problem = setup[3]
    for s in problem.act_sites:
        if s.kind == "act":
            node = loaded.params
            for k in s.node:
                node = node[k]
            assert list(node[s.leaf].group_bits) == plan["act_bits"][s.name]
    assert cli.main(["sample", str(q), "--num", "2", "--steps", "2", "--batch-size", "2",
                     "--out", str(tmp_path / "s.npz")]) == 0
    # A weight floor at the average leaves every layer at it; it is recorded with the model.
    q2 = tmp_path / "q2"
    assert cli.main(["quantize", str(model.path), "--method", "rd", "--w-bits", "4", "--a-bits", "6",
                     "--calib", str(cdir), "--rules", str(rules), "--rd-inputs", "3", "--curves", str(cdir2),
                     "--rd-min-w-bits", "4", "--rd-additivity", "0", "--no-plots", "--out", str(q2)]) == 0
    assert "no weight layer below 4 bits" in capsys.readouterr().out
    meta2 = jaxquant.load(q2).meta.extra["quantized"]
    assert meta2["rd_min_w_bits"] == 4 and set(meta2["weight_bits"].values()) == {4}


def test_guided_models_are_measured_with_the_unconditional_label_too():
    from types import SimpleNamespace

    steps, n = 4, 3

    def problem(cfg_scale):
        calib = SimpleNamespace(inputs=np.arange(steps * n * 2, dtype=np.float32).reshape(steps, n, 2),
                                timesteps=np.array([90, 60, 30, 0]), step_groups=[0, 0, 1, 1],
                                labels=np.array([3, 1, 2]), config=SimpleNamespace(cfg_scale=cfg_scale))
        model = SimpleNamespace(is_class_conditional=True, network_config=SimpleNamespace(unconditional_label=10))
        return SimpleNamespace(calib=calib, groups=2, config=rd.CurveConfig(inputs_per_group=2), model=model,
                               _forward_float=lambda x, t, y, chain: x * 0)

    plain = rd.RDProblem._select_inputs(problem(1.0))
    assert len(plain.x) == 4 and set(plain.y) <= {1, 2, 3}
    guided = rd.RDProblem._select_inputs(problem(3.0))
    assert len(guided.x) == 8
    np.testing.assert_array_equal(guided.x[:4], plain.x)
    np.testing.assert_array_equal(guided.x[4:], plain.x)
    np.testing.assert_array_equal(guided.y[:4], plain.y)
    assert list(guided.y[4:]) == [10] * 4 and list(guided.group) == list(plain.group) * 2


# --------------------------------------------------------------------------- lookahead


@pytest.fixture(scope="module")
def lookahead(setup):
    """A problem whose distortion is measured on x̂₀ two float DDIM steps ahead, and the
    curves of one weight and one activation site."""
    import dataclasses

    model, calib, *_ = setup
    problem = rd.RDProblem(model, calib, WCFG, ACFG, RULES, dataclasses.replace(CCFG, lookahead=2))
    keys = ["weight:mid_block.resnets.0.conv1", "act:mid_block.resnets.0.conv1"]
    return problem, rd.compute_curves(problem, only=keys, progress=False)


def test_lookahead_reference_is_x0_of_the_float_trajectory_k_steps_on(setup, lookahead):
    """The float reference after ``k`` float DDIM steps from a calibration input is the
    x̂₀ that the calibration's own (float) trajectory predicts ``k`` steps later, or at its
    last step when fewer remain."""
    from jaxquant.diffusion import predict_x0

    model, calib, *_ = setup
    problem, _ = lookahead
    inp = problem.inputs
    S = len(calib.timesteps)
    ts = [int(t) for t in calib.timesteps]
    ends = set()
    for b in range(len(inp.t)):
        si = ts.index(int(inp.t[b]))
        n = int(np.argmin(np.abs(calib.inputs[si] - inp.x[b]).reshape(calib.inputs.shape[1], -1).max(axis=1)))
        np.testing.assert_array_equal(calib.inputs[si, n], inp.x[b])
        s2 = min(si + 2, S - 1)
        ends.add(si + 2 > S - 1)
        x2 = jnp.asarray(calib.inputs[s2, n][None])
        t2 = jnp.full((1,), ts[s2], jnp.int32)
        want = predict_x0(model.schedule, x2, model(x2, t2), t2)[0]
        np.testing.assert_allclose(inp.ref[b], np.asarray(want), rtol=0, atol=2e-4)
    assert ends == {True, False}  # both the full lookahead and the clamped one are covered
    assert inp.chain[0].shape == (len(inp.t), 3) and inp.chain[2][:, 0].all()
    assert inp.chain[3][:, 0].all() and not inp.chain[3][:, 1:].any()  # only the first step is quantized


def test_lookahead_curve_point_is_the_perturbed_step_then_float_steps(setup, lookahead):
    """A weight curve point with a lookahead equals: the quantized model at the input's
    step, then float DDIM steps (written out here), then x̂₀ against the reference; the
    ordinary quantized forward pass (``measure_distortion``) agrees too."""
    from jaxquant.diffusion import ddim_step, predict_x0

    model, calib, *_ = setup
    problem, curves = lookahead
    layer = "mid_block.resnets.0.conv1"
    params = rd.quantize_rd(problem, rd.RDPlan("mse", {layer: 3}, {}, False, 0, 0, [], 0, []))
    inp = problem.inputs
    ts, prevs, on, _ = inp.chain
    err2 = np.zeros(problem.groups)
    for b in range(len(inp.t)):
        x = jnp.asarray(inp.x[b][None])
        p = params
        for j in range(3):
            t = jnp.asarray(ts[b, j:j + 1])
            eps = model.module.apply({"params": p}, x, t, None)
            if on[b, j]:
                x0 = predict_x0(model.schedule, x, eps, t)
            if j < 2 and on[b, j + 1]:
                x = ddim_step(model.schedule, x, eps, t, jnp.asarray(prevs[b, j:j + 1]))
            p = model.params
        err2[inp.group[b]] += float(np.sum(np.square(np.asarray(x0)[0] - inp.ref[b])))
    c = curves.curves[f"weight:{layer}"]
    np.testing.assert_allclose(c.err2[:, c.bits.index(3)], err2, rtol=2e-3)
    np.testing.assert_allclose(rd.measure_distortion(problem, params)[:, 0], err2, rtol=2e-3)
    # What is measured changed: the seed's curve of the same site is another quantity.
    _, _, _, plain, plain_curves, _ = setup
    assert not np.allclose(plain_curves.curves[f"weight:{layer}"].err2, c.err2, rtol=0.05)
    a = curves.curves[f"act:{layer}"]
    assert a.err2.shape == (2, 5) and np.all(a.err2[:, -1] < a.err2[:, 0])


def test_lookahead_needs_a_deterministic_unguided_calibration(setup):
    from types import SimpleNamespace

    model, *_ = setup
    with pytest.raises(ConfigError, match="lookahead"):
        rd.CurveConfig(lookahead=-1)
    for sampler, scale, cond, msg in (("ddpm", 1.0, False, "DDIM trajectory"),
                                      ("ddim", 3.0, True, "classifier-free guidance")):
        calib = SimpleNamespace(config=SimpleNamespace(groups=2, sampler=sampler, cfg_scale=scale))
        fake = SimpleNamespace(is_class_conditional=cond, params=model.params)
        with pytest.raises(ConfigError, match=msg):
            rd.RDProblem(fake if cond else model, calib, WCFG, ACFG, RULES, rd.CurveConfig(lookahead=1))


def test_lookahead_from_the_cli_and_the_quality_table_names():
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args

    for cmd in ("rd-curves", "quantize"):
        args = cli.build_parser().parse_args([cmd, "M", "--out", "D", "--rd-lookahead", "2"])
        assert cli._rd_configs(args, None)[3].lookahead == 2
    args = cli.build_parser().parse_args(["rd-curves", "M", "--out", "D"])
    assert cli._rd_configs(args, None)[3].lookahead is None
    cfg = parse_config("rd-w4a4-g10-la2")
    assert cfg["lookahead"] == 2 and cfg["groups"] == 10
    argv = quantize_args("m", cfg, Path("c"), Path("w/q"))
    assert argv[argv.index("--rd-lookahead") + 1] == "2"
    assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10-la2"))  # kept apart from the seed's curves
    plain = quantize_args("m", parse_config("rd-w4a4-g10"), Path("c"), Path("w/q"))
    assert "--rd-lookahead" not in plain and plain[plain.index("--curves") + 1] == str(Path("w/rd-curves-g10"))


def _extended_act_curves(setup, act_bits):
    """``(problem, curves, activation keys)`` of the setup's activation sites measured with
    the candidates ``act_bits`` (a superset of the seed's 4..8); checks that the new
    problem is never resumed from the seed's curves, that each curve has the candidates and
    their sizes, and that its 4..8 points equal the seed's."""
    _, calib, _, problem, curves, _ = setup
    cfg = rd.CurveConfig(act_bits=act_bits, inputs_per_group=3, batch_size=8)
    ext = rd.RDProblem(problem.model, calib, WCFG, ACFG, RULES, cfg)
    assert ext.fingerprint() != problem.fingerprint()
    acts = [c.site.key for c in curves.of_kind("act")]
    ec = rd.compute_curves(ext, None, progress=False, only=acts)
    seed_cols = [act_bits.index(b) for b in rd.ACT_BITS]
    for key in acts:
        c = ec.curves[key]
        assert c.bits == act_bits and list(c.sizes) == [c.site.numel * b for b in c.bits]
        for kind in dist.DISTORTIONS:
            np.testing.assert_allclose(ec.distortion(key, kind)[:, seed_cols], curves.distortion(key, kind),
                                       rtol=1e-5, atol=1e-12)
    return ext, ec, acts


#: The rms relative output error below which two float32 evaluations of the same quantized
#: model (vmapped for the curves, one by one for a plan) cannot be told apart: about eight
#: float32 epsilons. A 12-16-bit activation's error sits there.
FLOAT32_RMS_FLOOR = 1e-6


def assert_same_mse_distortion(actual, desired) -> None:
    """Two normalised-MSE distortions of the same quantization agree: to 0.1 %, or both
    within :data:`FLOAT32_RMS_FLOOR` of each other on the rms scale, where the order of
    float32 sums (which differs between CPUs) decides the digits."""
    np.testing.assert_allclose(np.sqrt(actual), np.sqrt(desired), rtol=5e-4, atol=FLOAT32_RMS_FLOOR)


def test_wide_activation_candidates(setup):
    """Activation candidates above 8 bits (``act_candidates(16)``): the 4..8 points equal
    the seed's curves, the wide ones use the calibration's full range and are measured
    like any other point, and an average of 8 bits can now keep some sites wider."""
    from jaxquant.quant.activation import range_to_scale_zero
    from jaxquant.quant.quantize import site_extremes

    _, calib, _, _, curves, _ = setup
    assert rd.act_candidates(8) == rd.ACT_BITS and rd.act_candidates(16) == (4, 5, 6, 7, 8, 10, 12, 14, 16)
    assert rd.act_candidates(11) == (4, 5, 6, 7, 8, 10, 11)
    for bad in (7, 17):
        with pytest.raises(ConfigError, match="widest activation candidate"):
            rd.act_candidates(bad)
    with pytest.raises(ConfigError, match="2..16"):
        rd.CurveConfig(act_bits=(4, 8, 17))
    wide, wc, acts = _extended_act_curves(setup, rd.act_candidates(16))
    for key in acts:
        d = wc.distortion(key, "mse")
        assert np.all(d[:, -1] < d[:, wc.curves[key].bits.index(8)])  # 16 bits, full range, beat 8 with clipping
    # Above 8 bits a candidate's range is the full range the calibration saw, at every group.
    site = next(s for s in wide.sites if s.key == acts[0])
    lo, hi = site_extremes(calib, site.name, wide._merges_parts(site))
    for g in range(2):
        scale, zero = wide.act_params(site, g, 12)
        want = [range_to_scale_zero(float(lo[g, j]), float(hi[g, j]), 12) for j in range(lo.shape[1])]
        np.testing.assert_allclose(scale[:len(want)], [w[0] for w in want], rtol=1e-6)
        np.testing.assert_allclose(zero[:len(want)], [w[1] for w in want])
    # A wide single-site plan measured through the stored quantizers has its curve points.
    key = acts[0]
    plan = rd.RDPlan("mse", {}, {wc.curves[key].site.name: (12, 16)}, False, 0, 0, [], 0, [])
    sums = rd.measure_distortion(wide, rd.quantize_rd(wide, plan))
    cols = [wc.curves[key].bits.index(12), wc.curves[key].bits.index(16)]
    assert_same_mse_distortion(rd.group_distortion(wc, sums), wc.distortion(key)[[0, 1], cols])
    # At an average of 8 bits the seed's candidates leave no choice (the budget does not
    # bind: each site takes its least distortion, at 8 bits or where 6-7 are no worse);
    # wide ones spend the same budget unevenly. The wide plan is on the lower convex hull
    # of its curves (no plan of at most its size does better), and the seed's plan is one
    # of those plans, so it predicts no more distortion.
    narrow8 = rd.allocate_activations(curves, 8)
    assert max(b for v in narrow8[0].values() for b in v) == 8
    bits, size, budget, predicted = rd.allocate_activations(wc, 8)
    assert all(s <= budget for s in size) and budget == narrow8[2]
    widths = {b for v in bits.values() for b in v}
    assert max(widths) > 8 and min(widths) < 8
    assert np.all(np.asarray(size) >= np.asarray(narrow8[1])) and np.all(predicted <= narrow8[3])


def test_narrow_activation_candidates(setup):
    """Activation candidates below 4 bits (``act_candidates(8, 2)``): the 4..8 points equal
    the seed's curves, a 2- or 3-bit quantizer is measured and built like any other, and
    an average of 4 bits, which the seed's candidates can only meet with every site at 4,
    now spends its budget unevenly for less predicted distortion."""
    curves = setup[4]
    assert rd.act_candidates(8, 2) == (2, 3, 4, 5, 6, 7, 8)
    assert rd.act_candidates(12, 3) == (3, 4, 5, 6, 7, 8, 10, 12)
    for bad in (1, 5):
        with pytest.raises(ConfigError, match="narrowest activation candidate"):
            rd.act_candidates(8, bad)
    with pytest.raises(ConfigError, match="2..16"):
        rd.CurveConfig(act_bits=(1, 4, 8))
    narrow, nc, acts = _extended_act_curves(setup, rd.act_candidates(8, 2))
    for key in acts:
        d = nc.distortion(key, "mse")
        assert np.all(d[:, 0] > d[:, 2])  # 2 bits cost more than 4
    # A 2/3-bit single-site plan measured through the stored quantizers has its curve points.
    key = acts[0]
    site = nc.curves[key].site
    plan = rd.RDPlan("mse", {}, {site.name: (2, 3)}, False, 0, 0, [], 0, [])
    params = rd.quantize_rd(narrow, plan)
    quant = params
    for k in site.node:
        quant = quant[k]
    assert quant[site.leaf].group_bits == (2, 3)
    sums = rd.measure_distortion(narrow, params)
    assert_same_mse_distortion(rd.group_distortion(nc, sums), nc.distortion(key)[[0, 1], [0, 1]])
    # At an average of 4 bits the seed's candidates put every site at 4; narrow ones let
    # the allocation trade, on the lower convex hull of the curves, so it predicts no more.
    seed4 = rd.allocate_activations(curves, 4)
    assert {b for v in seed4[0].values() for b in v} == {4}
    bits, size, budget, predicted = rd.allocate_activations(nc, 4)
    assert all(s <= budget for s in size) and budget == seed4[2]
    widths = {b for v in bits.values() for b in v}
    assert min(widths) < 4 < max(widths)
    assert np.all(predicted <= seed4[3])


def test_wide_activation_candidates_from_the_cli_and_the_quality_table_names():
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args

    for cmd in ("rd-curves", "quantize"):
        args = cli.build_parser().parse_args([cmd, "M", "--out", "D", "--rd-max-a-bits", "12"])
        assert cli._rd_configs(args, 8)[3].act_bits == (4, 5, 6, 7, 8, 10, 12)
    args = cli.build_parser().parse_args(["rd-curves", "M", "--out", "D"])
    assert cli._rd_configs(args, 8)[3].act_bits == rd.ACT_BITS
    cfg = parse_config("rd-w8a8-g2-ac16")
    assert cfg["max_act_bits"] == 16 and cfg["groups"] == 2
    argv = quantize_args("m", cfg, Path("c"), Path("w/q"))
    assert argv[argv.index("--rd-max-a-bits") + 1] == "16"
    assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g2-ac16"))  # kept apart from the seed's
    assert "--rd-max-a-bits" not in quantize_args("m", parse_config("rd-w8a8-g2"), Path("c"), Path("w/q"))
    args = cli.build_parser().parse_args(["quantize", "M", "--out", "D", "--rd-min-a-bits", "2", "--rd-max-a-bits", "10"])
    assert cli._rd_configs(args, 4)[3].act_bits == (2, 3, 4, 5, 6, 7, 8, 10)
    cfg = parse_config("rd-w4a4-g2-am2-ac16")
    assert cfg["min_act_bits"] == 2 and cfg["max_act_bits"] == 16
    argv = quantize_args("m", cfg, Path("c"), Path("w/q"))
    assert argv[argv.index("--rd-min-a-bits") + 1] == "2"
    assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g2-am2-ac16"))


# --------------------------------------------------------------------------- feature space


@pytest.fixture(scope="module")
def feature_problem(setup):
    """A problem measured on the features of x̂₀ (lookahead 1) under a tiny random feature
    network registered for the test, with the curves of one weight site."""
    import dataclasses

    import flax.linen as fnn

    from jaxquant.eval import features

    class Tiny(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.silu(fnn.Conv(6, (3, 3))(x))
            pool = fnn.Dense(5)(h.reshape(h.shape[0], -1))
            return {"pool": pool, "spatial": h, "logits": pool[:, :3]}

    module = Tiny()
    variables = module.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    prepare = lambda x: x.astype(jnp.float32).mean(-1, keepdims=True) / 127.5 - 1.0  # noqa: E731
    net = features.make_feature_net("rd-test", module, variables, input_size=8, spatial_layer="conv",
                                    prepare=prepare)
    saved = dict(features._REGISTRY)
    features.register_feature_net("rd-test", lambda: net, overwrite=True)
    try:
        model, calib, *_ = setup
        problem = rd.RDProblem(model, calib, WCFG, ACFG, RULES,
                               dataclasses.replace(CCFG, lookahead=1, features="rd-test"))
        curves = rd.compute_curves(problem, only=["weight:mid_block.resnets.0.conv1"], progress=False)
    finally:
        features._REGISTRY.clear()
        features._REGISTRY.update(saved)
    return problem, curves, net


def test_feature_curve_point_is_the_feature_error_of_the_written_out_x0(setup, feature_problem):
    """A feature-space curve point: the quantized step, a float DDIM step, x̂₀ mapped to
    pixels as the pipelines do (not rounded), the feature network's pool vector, squared
    error against the float trajectory's; the reference energy is that of the features."""
    from jaxquant.diffusion import ddim_step, predict_x0

    model, calib, *_ = setup
    problem, curves, net = feature_problem
    layer = "mid_block.resnets.0.conv1"
    params = rd.quantize_rd(problem, rd.RDPlan("mse", {layer: 3}, {}, False, 0, 0, [], 0, []))
    inp = problem.inputs
    ts, prevs, on, _ = inp.chain
    feats = lambda x0: np.asarray(net(np.clip(np.asarray(x0) / 2 + 0.5, 0, 1) * 255.0)["pool"])[0]  # noqa: E731

    def x0_of(b, p):
        x = jnp.asarray(inp.x[b][None])
        for j in range(2):
            t = jnp.asarray(ts[b, j:j + 1])
            eps = model.module.apply({"params": p if j == 0 else model.params}, x, t, None)
            if on[b, j]:
                x0 = predict_x0(model.schedule, x, eps, t)
            if j == 0 and on[b, 1]:
                x = ddim_step(model.schedule, x, eps, t, jnp.asarray(prevs[b, :1]))
        return x0

    err2, ref2 = np.zeros(problem.groups), np.zeros(problem.groups)
    for b in range(len(inp.t)):
        ref = feats(x0_of(b, model.params))
        np.testing.assert_allclose(inp.ref[b], ref, rtol=1e-4, atol=1e-5)
        err2[inp.group[b]] += float(np.sum(np.square(feats(x0_of(b, params)) - ref)))
        ref2[inp.group[b]] += float(np.sum(np.square(ref)))
    assert inp.ref.shape == (len(inp.t), 5)
    np.testing.assert_allclose(curves.ref2, ref2, rtol=1e-4)
    c = curves.curves[f"weight:{layer}"]
    tol = 1e-3 * err2.max()  # float32 rounding of a group whose error is 1e-3 of the other's
    np.testing.assert_allclose(c.err2[:, c.bits.index(3)], err2, rtol=2e-3, atol=tol)
    assert c.err2[:, 0].sum() > c.err2[:, -1].sum() > 0  # 2 bits cost more than 8
    np.testing.assert_allclose(rd.measure_distortion(problem, params)[:, 0], err2, rtol=2e-3, atol=tol)


def test_feature_curves_refuse_ssim_and_say_what_they_measure(feature_problem):
    problem, curves, _ = feature_problem
    assert curves.settings["features"] == "rd-test:pool"
    assert problem.config.lookahead == 1 and rd.CurveConfig(features="fmnist").lookahead == 0
    assert np.isnan(next(iter(curves.curves.values())).dssim).all()
    key = next(iter(curves.curves))
    assert np.isfinite(curves.distortion(key, "mse")).all()
    with pytest.raises(ConfigError, match="no SSIM"):
        curves.distortion(key, "mse+ssim")
    with pytest.raises(ConfigError, match="feature_output"):
        rd.CurveConfig(features="fmnist", feature_output="spatial")
    with pytest.raises(ConfigError, match="unknown feature network"):
        rd.RDProblem(problem.model, problem.calib, WCFG, ACFG, RULES, rd.CurveConfig(features="nope"))


def test_features_from_the_cli_and_the_quality_table_names():
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args

    for cmd in ("rd-curves", "quantize"):
        args = cli.build_parser().parse_args([cmd, "M", "--out", "D", "--rd-features", "fmnist"])
        ccfg = cli._rd_configs(args, None)[3]
        assert (ccfg.features, ccfg.feature_output, ccfg.lookahead) == ("fmnist", "pool", 0)
    cfg = parse_config("rd-w4a4-g10-la2-feat")
    argv = quantize_args("m", cfg, Path("c"), Path("w/q"))
    assert argv[argv.index("--rd-features") + 1] == "fmnist" and argv[argv.index("--rd-lookahead") + 1] == "2"
    assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10-la2-feat"))
    argv = quantize_args("m", parse_config("rd-w4a4-g10-feat"), Path("c"), Path("w/q"))
    assert "--rd-lookahead" not in argv and argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10-feat"))
    args = cli.build_parser().parse_args(["quantize", "M", "--out", "D", "--rd-trajectory"])
    assert cli._rd_configs(args, None)[3].trajectory
    argv = quantize_args("m", parse_config("rd-w4a4-g1-traj"), Path("c"), Path("w/q"))
    assert "--rd-trajectory" in argv and argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g1-traj"))


# --------------------------------------------------------------------------- whole trajectories


def test_trajectory_curve_point_quantizes_every_step_of_its_group(setup):
    """Trajectory curves: each input starts at its group's first calibration step, the
    site is quantized at every step of that group and float after it, and the sample's
    x̂₀ at the last step is compared with the float trajectory's (the calibration's)."""
    import dataclasses

    from jaxquant.diffusion import ddim_step, predict_x0

    model, calib, *_ = setup
    problem = rd.RDProblem(model, calib, WCFG, ACFG, RULES, dataclasses.replace(CCFG, trajectory=True))
    layer = "mid_block.resnets.0.conv1"
    curves = rd.compute_curves(problem, only=[f"weight:{layer}"], progress=False)
    inp = problem.inputs
    steps_of = np.asarray(calib.step_groups)
    ts_all = [int(t) for t in calib.timesteps]
    S = len(ts_all)
    assert sorted(set(inp.t.tolist())) == sorted(ts_all[int(np.flatnonzero(steps_of == g)[0])] for g in range(2))
    ts, prevs, on, perturbed = inp.chain
    for idx in problem.batches(8):  # each batch shares one pattern of quantized steps
        assert (perturbed[idx] == perturbed[idx[0]]).all()
    params = rd.quantize_rd(problem, rd.RDPlan("mse", {layer: 3}, {}, False, 0, 0, [], 0, []))
    err2 = np.zeros(problem.groups)
    for b in range(len(inp.t)):
        x = jnp.asarray(inp.x[b][None])
        first = ts_all.index(int(inp.t[b]))
        n = int(np.argmin(np.abs(calib.inputs[first] - inp.x[b]).reshape(calib.inputs.shape[1], -1).max(axis=1)))
        for s in range(first, S):
            t = jnp.full((1,), ts_all[s], jnp.int32)
            p = params if steps_of[s] == inp.group[b] else model.params
            eps = model.module.apply({"params": p}, x, t, None)
            x0 = predict_x0(model.schedule, x, eps, t)
            if s < S - 1:
                x = ddim_step(model.schedule, x, eps, t, jnp.full((1,), int(prevs[b, s - first]), jnp.int32))
        # the float reference is x̂₀ of the calibration's own trajectory at its last step
        xl = jnp.asarray(calib.inputs[S - 1, n][None])
        tl = jnp.full((1,), ts_all[-1], jnp.int32)
        np.testing.assert_allclose(inp.ref[b], np.asarray(predict_x0(model.schedule, xl, model(xl, tl), tl))[0],
                                   rtol=0, atol=2e-4)
        err2[inp.group[b]] += float(np.sum(np.square(np.asarray(x0)[0] - inp.ref[b])))
    c = curves.curves[f"weight:{layer}"]
    np.testing.assert_allclose(c.err2[:, c.bits.index(3)], err2, rtol=2e-3)
    np.testing.assert_allclose(rd.measure_distortion(problem, params)[:, 0], err2, rtol=2e-3)
    # the group whose steps come first repeats its error over more steps than a lookahead does
    assert perturbed.sum(axis=1).min() == min(np.bincount(steps_of))
    with pytest.raises(ConfigError, match="leave lookahead unset"):
        rd.CurveConfig(trajectory=True, lookahead=2)


def test_curves_made_before_new_settings_keep_their_fingerprint(setup):
    """Settings added later (features, trajectory) at their defaults do not change the
    fingerprint, so stored curves still resume."""
    *_, problem, _, _ = setup
    cfg = problem.fingerprint()["config"]
    assert "features" not in cfg and "trajectory" not in cfg and "lookahead" in cfg
    assert "act_context" not in cfg and "context_reference" not in cfg


# --------------------------------------------------------------------------- weights given the activations


def test_conditional_weight_curve_point_is_its_increase_over_the_planned_activations(setup):
    """With an activation context, a weight curve point is what the weight adds to the
    distortion of the activations quantized as planned, both measured through the
    ordinary quantized forward pass."""
    import dataclasses

    model, calib, _, problem, curves, _ = setup
    context = rd.allocate_activations(curves, 5)[0]
    assert set(context) == {c.site.name for c in curves.of_kind("act")}
    assert len({b for v in context.values() for b in v}) > 1  # a mixed-precision plan
    cproblem = rd.RDProblem(model, calib, WCFG, ACFG, RULES, dataclasses.replace(CCFG, act_context=context))
    assert [s.kind for s in cproblem.curve_sites] == ["weight"] * 10
    assert cproblem.context == {k: tuple(v) for k, v in context.items()}
    fp = cproblem.fingerprint()
    assert fp["act_context"] == rd.context_digest(context) and fp != problem.fingerprint()
    layer = "mid_block.resnets.0.conv1"
    cc = rd.compute_curves(cproblem, only=[f"weight:{layer}"], progress=False).curves[f"weight:{layer}"]

    def measured(weight_bits):
        plan = rd.RDPlan("mse", weight_bits, context, False, 0, 0, [], 0, [])
        return rd.measure_distortion(problem, rd.quantize_rd(problem, plan))

    base = measured({})
    np.testing.assert_allclose(rd._evaluator(cproblem).context_sums(), base, rtol=1e-4)
    for b in (2, 3, 8):
        j = cc.bits.index(b)
        inc = measured({layer: b}) - base
        np.testing.assert_allclose(cc.err2[:, j], inc[:, 0], rtol=2e-3, atol=1e-4 * base[:, 0].max())
        np.testing.assert_allclose(cc.dssim[:, j], inc[:, 1], rtol=2e-3, atol=1e-4 * max(base[:, 1].max(), 1e-3))
    alone = curves.curves[f"weight:{layer}"]
    assert not np.allclose(cc.err2, alone.err2, rtol=1e-2)  # the activations change what the weight costs
    # Against the context's own output: the weight's error on the quantized activations' inputs.
    vs = rd.RDProblem(model, calib, WCFG, ACFG, RULES,
                      dataclasses.replace(CCFG, act_context=context, context_reference="context"))
    assert vs.fingerprint() != fp
    cv = rd.compute_curves(vs, only=[f"weight:{layer}"], progress=False).curves[f"weight:{layer}"]
    fwd = jax.jit(lambda p, g, x, t: model.module.apply({"params": at_timestep_group(p, g)}, x, t, None))
    ctx_params = rd.quantize_rd(problem, rd.RDPlan("mse", {}, context, False, 0, 0, [], 0, []))
    inp = problem.inputs
    for b in (2, 8):
        both = rd.quantize_rd(problem, rd.RDPlan("mse", {layer: b}, context, False, 0, 0, [], 0, []))
        err2 = np.zeros(2)
        for g in range(2):
            j = np.flatnonzero(inp.group == g)
            x, t = jnp.asarray(inp.x[j]), jnp.asarray(inp.t[j])
            err2[g] = float(np.sum(np.square(np.asarray(fwd(both, g, x, t)) - np.asarray(fwd(ctx_params, g, x, t)))))
        np.testing.assert_allclose(cv.err2[:, cv.bits.index(b)], err2, rtol=2e-3, atol=1e-6 * base[:, 0].max())
    assert np.all(cv.err2 >= 0) and np.all(np.diff(cv.err2.sum(0)[:3]) < 0)
    with pytest.raises(ConfigError, match="context_reference"):
        rd.CurveConfig(context_reference="fp")
    with pytest.raises(ConfigError, match="not an activation site"):
        rd.RDProblem(model, calib, WCFG, ACFG, RULES, dataclasses.replace(CCFG, act_context={"nope": (4, 4)}))
    with pytest.raises(ConfigError, match="widths for 2"):
        rd.RDProblem(model, calib, WCFG, ACFG, RULES,
                     dataclasses.replace(CCFG, act_context={next(iter(context)): (4,)}))
    with pytest.raises(ConfigError, match="activation quantizer settings"):
        rd.RDProblem(model, calib, WCFG, None, RULES, dataclasses.replace(CCFG, act_context=context))


def test_quantize_with_conditional_weights(setup, tmp_path):
    """``conditional_weights``: the activation plan is the ordinary one; the weights are
    allocated on curves measured given it (stored apart, resumable), and the prediction
    is the plan's measured activation distortion plus the weights' increments."""
    import dataclasses

    model, calib, _, problem, curves, cdir = setup
    work = tmp_path / "curves"
    shutil.copytree(cdir, work)
    res = rd.quantize_model_rd(model, calib, 4, 5, weights=WCFG, acts=ACFG, rules=RULES, config=CCFG,
                               out_dir=tmp_path / "out", curves_dir=work, conditional_weights=True,
                               additivity_plans=0, plots=False, progress=False)
    plain = rd.allocate_plan(curves, 4, 5)
    assert res.plan.act_bits == plain.act_bits and res.plan.weight_size <= res.plan.weight_budget
    sub = work / f"given-acts-{rd.context_digest(plain.act_bits)}"
    stored = rd.load_curves(sub)
    assert len(stored.curves) == 10 and stored.settings["act_context"] == rd.context_digest(plain.act_bits)
    assert rd.load_curves(work).settings == curves.settings  # the single-site curves are untouched
    cproblem = rd.RDProblem(model, calib, WCFG, ACFG, RULES, dataclasses.replace(CCFG, act_context=plain.act_bits))
    base = rd.group_distortion(curves, rd._evaluator(cproblem).context_sums())
    np.testing.assert_allclose(res.plan.predicted, base + rd.predicted_distortion(res.curves, res.plan.weight_bits, {}),
                               rtol=1e-6)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["weight_curves"] == str(sub)
    assert "given the planned activations" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ConfigError, match="quantized activations"):
        rd.quantize_model_rd(model, calib, 4, None, weights=WCFG, rules=RULES, config=CCFG, curves_dir=work,
                             conditional_weights=True, additivity_plans=0, plots=False, progress=False)


def test_conditional_weights_from_the_cli_and_the_quality_table_names():
    from pathlib import Path

    from benchmarks.quality_table import parse_config, quantize_args

    for extra, ref in (([], "float"), (["context"], "context")):
        args = cli.build_parser().parse_args(["quantize", "M", "--out", "D", "--rd-conditional-weights", *extra])
        assert args.rd_conditional_weights == ref and cli._rd_configs(args, 4)[3].context_reference == ref
    for name, ref in (("rd-w4a4-g10-cond", "float"), ("rd-w4a4-g10-condctx", "context")):
        argv = quantize_args("m", parse_config(name), Path("c"), Path("w/q"))
        assert argv[argv.index("--rd-conditional-weights") + 1] == ref
        assert argv[argv.index("--curves") + 1] == str(Path("w/rd-curves-g10"))
    with pytest.raises(SystemExit):
        parse_config("uniform-w4a4-cond")


def test_conditional_curves_benchmark_compares_like_with_like(setup):
    """benchmarks/rd_conditional_curves: sums per width over the shared weight sites and the
    share of negative conditional points."""
    import copy

    from benchmarks.rd_conditional_curves import compare

    *_, curves, _ = setup
    given = copy.deepcopy(curves)
    key = next(iter(c.site.key for c in given.of_kind("weight")))
    given.curves[key].err2 = given.curves[key].err2 - 2 * given.curves[key].err2.max()  # all below zero
    r = compare(curves, given)
    alone = np.sum([curves.distortion(c.site.key).sum(axis=0) for c in curves.of_kind("weight")], axis=0)
    np.testing.assert_allclose(r["alone_sum"], alone)
    assert r["sites"] == 10 and r["given_negative_share"] == [0.1] * len(r["bits"])
    np.testing.assert_allclose(np.asarray(r["alone_sum"]) - r["given_sum"],
                               2 * curves.curves[key].err2.max() * (1 / curves.ref2).sum())


def test_fixed_act_weights_benchmark_variants(setup):
    """benchmarks/fixed_act_weights: every variant has the same activation quantizers; the
    uniform variant is ``quantize_uniform``'s model; the "more bits" variants never lower
    a layer's width; the float variant has float weights."""
    from benchmarks.fixed_act_weights import VARIANTS, build, variant_widths
    from jaxquant.quant.activation import is_act_quant
    from jaxquant.quant.quantize import ActQuantConfig, quantize_uniform
    from jaxquant.quant.rules import default_rules, layer_kernels, resolve
    from jaxquant.quant.uniform import WeightQuantConfig

    model, calib, *_ = setup
    layers = resolve(layer_kernels(model.params), default_rules(WeightQuantConfig(4)))
    quantized = [n for n, c in layers.items() if c is not None]
    assert 0 < len(quantized) < len(layers)  # first and last layer float
    rd_plan = {n: [3, 8, 5][i % 3] for i, n in enumerate(quantized)}
    widths = {v: variant_widths(v, layers, rd_plan, 4) for v in VARIANTS}
    for v in VARIANTS:
        assert all(widths[v][n] is None for n, c in layers.items() if c is None)
    assert all(b is None for b in widths["float"].values())
    for n in quantized:
        assert widths["uniform"][n] == 4 and widths["rd"][n] == rd_plan[n]
        assert widths["uniform+rd-top"][n] == (8 if rd_plan[n] == 8 else 4) >= widths["uniform"][n]
        assert widths["rd-floor"][n] == max(rd_plan[n], 4) >= widths["rd"][n]

    def acts(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_act_quant)
        return {jax.tree_util.keystr(p): a for p, a in leaves if is_act_quant(a)}

    built = {v: build(model, calib, layers, widths[v], 4) for v in ("float", "uniform", "rd")}
    reference = quantize_uniform(model, calib, WeightQuantConfig(4), ActQuantConfig(4), progress=False)
    ref_acts = acts(reference)
    assert ref_acts
    for v, tree in built.items():
        got = acts(tree)
        assert got.keys() == ref_acts.keys(), v
        for k, a in ref_acts.items():
            np.testing.assert_array_equal(got[k].scale, a.scale)
            np.testing.assert_array_equal(got[k].zero, a.zero)
            assert got[k].bits == a.bits and got[k].split == a.split
    for (p, x), (_, y) in zip(jax.tree_util.tree_leaves_with_path(built["uniform"]),
                              jax.tree_util.tree_leaves_with_path(reference)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))
    flat_float = dict(jax.tree_util.tree_leaves_with_path(built["float"], is_leaf=is_act_quant))
    for p, x in jax.tree_util.tree_leaves_with_path(model.params):
        np.testing.assert_array_equal(np.asarray(flat_float[p]), np.asarray(x))


def test_curves_speed_benchmark_runs_both_ways_site_by_site(setup):
    """benchmarks/rd_curves_speed: both ways measure every site, give the curves of
    ``compute_curves`` (stored in the fixture), and time first sites apart from the rest."""
    from benchmarks.rd_curves_speed import _run

    *_, problem, curves, _ = setup
    keys = [c.site.key for c in curves.of_kind("weight")][:2] + [c.site.key for c in curves.of_kind("act")][:2]
    secs, got = _run(problem, keys)
    assert set(secs) == set(got) == {"vmapped", "loop"}
    for way in ("vmapped", "loop"):
        assert list(got[way]) == keys
        assert all(s > 0 for s in secs[way])  # two kinds: first and further sites both timed
        for k in keys:
            np.testing.assert_allclose(got[way][k].err2, curves.curves[k].err2, rtol=1e-5, err_msg=f"{way} {k}")
            np.testing.assert_allclose(got[way][k].dssim, curves.curves[k].dssim, rtol=1e-5, atol=1e-7)
