"""Per-timestep-group empirical bias correction: the corrected layer means equal the float
model's, the reported errors are the model's, storage, grouped selection and the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import cli
from jaxquant.calib import calibration as calib_mod
from jaxquant.errors import ConfigError
from jaxquant.quant.accounting import storage_report
from jaxquant.quant.activation import at_timestep_group, timestep_group
from jaxquant.quant.bias_correction import (BiasCorrection, BiasCorrectionConfig, _forward_fns, bias_correct,
                                            is_bias_correction, without_corrections)
from jaxquant.quant.quantize import ActQuantConfig, quantize_uniform
from jaxquant.quant.uniform import WeightQuantConfig


@pytest.fixture(scope="module")
def corrected(model_dir, calib):
    m = jaxquant.load(model_dir)
    qparams = quantize_uniform(m, calib, WeightQuantConfig(bits=3), ActQuantConfig(bits=5), progress=False)
    q = jaxquant.Model(m.meta, qparams)
    return m, q, bias_correct(q, m, calib, BiasCorrectionConfig(num_samples=8), progress=False)


def _group_batch(calib, g, T):
    groups = np.asarray(timestep_group(jnp.asarray(calib.timesteps), calib.config.groups, T))
    steps = np.repeat(np.flatnonzero(groups == g), 8)
    idx = np.tile(np.arange(8), len(steps) // 8)
    return (jnp.asarray(calib.inputs[steps, idx]), jnp.asarray(calib.timesteps[steps], jnp.int32),
            jnp.zeros((len(idx),), jnp.int32))


def test_corrected_layer_means_equal_the_float_models(model_dir, calib, corrected):
    """On each group's calibration inputs, every layer's mean output per channel in the
    corrected model (layers before it corrected too) is the float model's, up to the
    float16 storage of the corrections; before, it was not."""
    m, q, res = corrected
    means, _, _ = _forward_fns(m, 1.0)
    T = m.schedule.num_train_timesteps
    assert res.groups == 2 and res.rows == [16, 16]
    for g in range(2):
        batch = _group_batch(calib, g, T)
        ref, before, after = (means(p, *batch) for p in (m.params, q.params, res.params))
        gaps_before, gaps_after = [], []
        for name, r in ref.items():
            r = np.asarray(r)
            tol = 2e-3 * np.max(np.abs(res.deltas[name][g])) + 1e-6
            np.testing.assert_allclose(np.asarray(after[name]), r, atol=tol, err_msg=name)
            gaps_before.append(np.max(np.abs(np.asarray(before[name]) - r)))
            gaps_after.append(np.max(np.abs(np.asarray(after[name]) - r)))
        assert max(gaps_before) > 10 * max(gaps_after)


def test_reported_errors_are_the_models(model_dir, calib, corrected):
    m, q, res = corrected
    T = m.schedule.num_train_timesteps
    for g in range(2):
        batch = _group_batch(calib, g, T)
        ref = np.asarray(m.apply(m.params, *batch[:2]), np.float64)
        for params, want, off in ((q.params, res.error_before, res.bias_before),
                                  (res.params, res.error_after, res.bias_after)):
            d = np.asarray(m.apply(params, *batch[:2]), np.float64) - ref
            energy = np.sum(ref ** 2)
            np.testing.assert_allclose(want[g], np.sum(d ** 2) / energy, rtol=1e-4)
            mean = d.reshape(-1, d.shape[-1]).mean(0)
            np.testing.assert_allclose(off[g], np.sum(mean ** 2) * d.size / d.shape[-1] / energy, rtol=1e-3,
                                       atol=1e-12)
    assert np.all(res.bias_after < res.bias_before)


def test_storage_selection_and_round_trip(model_dir, calib, corrected, tmp_path):
    from jaxquant.io.model_dir import save_model_dir

    m, q, res = corrected
    leaves = [v for v in jax.tree_util.tree_leaves(res.params, is_leaf=is_bias_correction) if is_bias_correction(v)]
    assert leaves and all(v.delta.dtype == jnp.float16 and v.num_groups == 2 for v in leaves)
    # conv_in sees the float model's input with float weights: nothing to correct, nothing stored
    assert "bias_correction" not in res.params["conv_in"]
    extra = sum(int(np.prod(v.delta.shape)) * 2 for v in leaves)
    assert storage_report(res.params).total_bytes == storage_report(q.params).total_bytes + extra
    sel = at_timestep_group({"c": leaves[0]}, 1)["c"]
    np.testing.assert_array_equal(np.asarray(sel.delta[0]), np.asarray(leaves[0].delta[1]))
    with pytest.raises(ConfigError, match="select one per call"):
        leaves[0].corrected(None)
    save_model_dir(tmp_path / "bc", m.meta, res.params)
    back = jaxquant.load(tmp_path / "bc")
    x = jnp.asarray(calib.inputs[0, :4])
    t = jnp.full((4,), int(calib.timesteps[0]), jnp.int32)
    np.testing.assert_array_equal(np.asarray(back.apply(back.params, x, t)), np.asarray(m.apply(res.params, x, t)))
    assert without_corrections(res.params)["up_blocks.0.resnets.0"].keys() == q.params["up_blocks.0.resnets.0"].keys()
    assert isinstance(leaves[0], BiasCorrection)


def test_cli_bias_correct(model_dir, calib, tmp_path, capsys):
    import json

    cal = calib_mod.save_calibration(calib, tmp_path / "cal")
    qdir, out = tmp_path / "q", tmp_path / "qbc"
    assert cli.main(["quantize", str(model_dir), "--w-bits", "4", "--a-bits", "6", "--calib", str(cal),
                     "--out", str(qdir)]) == 0
    assert cli.main(["bias-correct", str(qdir), "--calib", str(cal), "--samples", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layers corrected" in text and "error before" in text
    report = json.loads((out / "bias_correction.json").read_text())
    assert report["groups"] == 2 and report["rows"] == [8, 8] and len(report["error_after"]) == 2
    assert jaxquant.load(out).meta.extra["bias_correction"]["samples"] == 4
    assert cli.main(["bias-correct", str(qdir), "--calib", str(cal), "--groups", "9", "--out",
                     str(tmp_path / "x")]) == 2
