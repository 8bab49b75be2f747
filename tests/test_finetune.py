"""Block fine-tuning of uniformly quantized models with their activation quantizers in
place: straight-through rounding (LSQ gradients), per-timestep-group minibatches and
errors, what is and is not trained, and the ``jaxquant finetune`` command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import cli
from jaxquant.calib import calibration as calib_mod
from jaxquant.quant.accounting import storage_report
from jaxquant.quant.activation import ActQuant, at_timestep_group, fake_quant, is_act_quant, round_ste, timestep_group
from jaxquant.errors import ConfigError
from jaxquant.quant.aq_model import (NETWORK, _calibration_pairs, _unrolled_errors, block_of, block_output_error,
                                     block_units, finetune_block, finetune_model, model_blocks)
from jaxquant.quant.quantize import ActQuantConfig, quantize_uniform
from jaxquant.quant.uniform import UniformWeight, WeightQuantConfig


def test_round_ste_value_and_gradient():
    v = jax.random.normal(jax.random.key(0), (1000,)) * 7
    np.testing.assert_array_equal(np.asarray(round_ste(v)), np.asarray(jnp.round(v)))
    np.testing.assert_array_equal(np.asarray(jax.grad(lambda a: jnp.sum(round_ste(a) * 3.0))(v)), 3.0)


def test_fake_quant_gradients_are_lsq():
    """d/ds of Σ fake_quant(x, s, z) is Σ (round(x/s) − x/s) over unclipped entries plus
    Σ (q_clip − z) over clipped ones (LSQ, Esser et al. 2020); d/dx is 1 inside the range
    and 0 outside."""
    x = jax.random.normal(jax.random.key(1), (4000,), jnp.float32) * 2
    s, z, qmax = jnp.float32(0.05), jnp.float32(20.0), 63
    gs = float(jax.grad(lambda sc: jnp.sum(fake_quant(x, sc, z, qmax)))(s))
    v = np.asarray(x, np.float64) / float(s)
    inside = (v >= -float(z)) & (v <= qmax - float(z))
    want = np.sum((np.round(v) - v)[inside]) + np.sum((np.clip(v, -float(z), qmax - float(z)))[~inside])
    assert inside.sum() > 100 and (~inside).sum() > 100
    np.testing.assert_allclose(gs, want, rtol=1e-3)
    gx = np.asarray(jax.grad(lambda a: jnp.sum(fake_quant(a, s, z, qmax)))(x))
    np.testing.assert_array_equal(gx, inside.astype(np.float32))
    # The same values as rounding before clipping.
    old = float(s) * (np.clip(np.round(np.asarray(x) / float(s)) + float(z), 0, qmax) - float(z))
    np.testing.assert_array_equal(np.asarray(fake_quant(x, s, z, qmax)), old.astype(np.float32))


@pytest.fixture(scope="module")
def quantized(model_dir, calib):
    m = jaxquant.load(model_dir)
    qparams = quantize_uniform(m, calib, WeightQuantConfig(bits=3), ActQuantConfig(bits=4), progress=False)
    return m, jaxquant.Model(m.meta, qparams)


def _block_outputs(model, params, units, x, t):
    wanted = set(units)
    _, state = model.module.apply({"params": params}, x, t, None, mutable=["intermediates"],
                                  capture_intermediates=lambda mdl, name: name == "__call__"
                                  and tuple(mdl.scope.path) in wanted)
    return jax.tree_util.tree_leaves(state["intermediates"])


def test_block_error_with_timestep_groups_is_the_long_way(quantized, calib):
    """With 2-group activation quantizers, the block error (pairs batched by group) is the
    mean over the block's outputs of ‖q − f‖² / ‖f‖², each pair run with its own group's
    quantizers, computed here one pair at a time."""
    m, q = quantized
    block = "down_blocks.1"
    units = tuple(block_units(q.params, block))
    x, t, _ = _calibration_pairs(q, calib)
    groups = np.asarray(timestep_group(jnp.asarray(t), 2, m.schedule.num_train_timesteps))
    assert set(groups) == {0, 1}
    ref_params = dict(q.params)
    for u in units:  # the float block in the quantized network
        node, src = ref_params, m.params
        for k in u[:-1]:
            node[k] = dict(node[k])
            node, src = node[k], src[k]
        node[u[-1]] = src[u[-1]]
    outputs = jax.jit(lambda p, g, xi, ti: _block_outputs(q, at_timestep_group(p, g), units, xi, ti))
    num = den = 0.0
    for i in range(len(t)):
        xi, ti = jnp.asarray(x[i:i + 1]), jnp.asarray(t[i:i + 1])
        qo = outputs(q.params, int(groups[i]), xi, ti)
        fo = outputs(ref_params, int(groups[i]), xi, ti)
        num = num + np.array([np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
                              for a, b in zip(qo, fo)])
        den = den + np.array([np.sum(np.asarray(b, np.float64) ** 2) for b in fo])
    want = float(np.mean(num / den))
    got = block_output_error(q, q.params, m.params, block, calib, num_pairs=None, batch_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_finetune_block_tunes_scales_and_keeps_codes_and_zero_points(quantized, calib):
    m, q = quantized
    block = "down_blocks.1"
    tuned, rec = finetune_block(q, q.params, m.params, block, calib, steps=16, lr=3e-3, batch_size=4,
                                lr_relative=True)
    assert rec["kept"] and rec["error_after"] < rec["error_before"]
    np.testing.assert_allclose(rec["error_after"], block_output_error(q, tuned, m.params, block, calib,
                                                                      num_pairs=32, batch_size=4), rtol=1e-5)
    changed_act = changed_w = 0
    for u in block_units(q.params, block):
        a, b = q.params, tuned
        for k in u:
            a, b = a[k], b[k]
        la = jax.tree_util.tree_leaves(a, is_leaf=lambda v: isinstance(v, (ActQuant, UniformWeight)))
        lb = jax.tree_util.tree_leaves(b, is_leaf=lambda v: isinstance(v, (ActQuant, UniformWeight)))
        for va, vb in zip(la, lb):
            if is_act_quant(va):
                np.testing.assert_array_equal(np.asarray(va.zero), np.asarray(vb.zero))
                assert vb.scale.dtype == va.scale.dtype
                changed_act += int(not np.array_equal(np.asarray(va.scale), np.asarray(vb.scale)))
            elif isinstance(va, UniformWeight):
                np.testing.assert_array_equal(np.asarray(va.codes), np.asarray(vb.codes))
                np.testing.assert_array_equal(np.asarray(va.zero), np.asarray(vb.zero))
                assert vb.scale.dtype == va.scale.dtype
                changed_w += int(not np.array_equal(np.asarray(va.scale), np.asarray(vb.scale)))
    assert changed_act > 0 and changed_w > 0
    # Both groups' activation ranges learn: each group trains on its own pairs.
    acts = [v for v in jax.tree_util.tree_leaves(tuned, is_leaf=is_act_quant) if is_act_quant(v)]
    before = [v for v in jax.tree_util.tree_leaves(q.params, is_leaf=is_act_quant) if is_act_quant(v)]
    moved = np.array([np.any(np.asarray(a.scale) != np.asarray(b.scale), axis=1) for a, b in zip(acts, before)
                      if np.any(np.asarray(a.scale) != np.asarray(b.scale))])
    assert moved[:, 0].any() and moved[:, 1].any()
    # Outside the block nothing changes.
    for name in (k for k in q.params if not k.startswith(block + ".")):
        for va, vb in zip(jax.tree_util.tree_leaves(q.params[name]), jax.tree_util.tree_leaves(tuned[name])):
            np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))


def test_network_error_is_the_output_error_the_long_way(quantized, calib):
    """The NETWORK pseudo-block's error is ‖ε_q − ε_f‖² / ‖ε_f‖² of the whole network's
    output over all calibration pairs, each run by the model's own forward (which picks
    each timestep's activation group itself)."""
    m, q = quantized
    x, t, _ = _calibration_pairs(q, calib)
    num = den = 0.0
    for i in range(0, len(t), 8):
        xb, tb = jnp.asarray(x[i:i + 8]), jnp.asarray(t[i:i + 8])
        eq = np.asarray(q.apply(q.params, xb, tb), np.float64)
        ef = np.asarray(m.apply(m.params, xb, tb), np.float64)
        num, den = num + np.sum((eq - ef) ** 2), den + np.sum(ef ** 2)
    got = block_output_error(q, q.params, m.params, NETWORK, calib, num_pairs=None, batch_size=4)
    np.testing.assert_allclose(got, num / den, rtol=1e-4)
    assert block_units(q.params, NETWORK) == [(k,) for k in q.params]


def test_network_stage_tunes_end_to_end(quantized, calib):
    """End-to-end tuning lowers the output error and trains float leaves in and outside the
    blocks (the embeddings too); codes stay."""
    m, q = quantized
    tuned, rec = finetune_block(q, q.params, m.params, NETWORK, calib, steps=16, lr=3e-3, batch_size=4,
                                lr_relative=True)
    assert rec["block"] == NETWORK and rec["kept"] and rec["error_after"] < rec["error_before"]
    changed = set()
    for name in q.params:
        for va, vb in zip(jax.tree_util.tree_leaves(q.params[name]), jax.tree_util.tree_leaves(tuned[name])):
            if not np.issubdtype(np.asarray(va).dtype, np.floating):
                np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))  # codes
            elif not np.array_equal(np.asarray(va), np.asarray(vb)):
                changed.add(name)
    assert {block_of(n) for n in changed} >= {None, *model_blocks(q.params)}


def _unroll_inputs(calib, s, k, n):
    from jaxquant.diffusion.samplers import previous_timesteps

    ts = np.asarray(calib.timesteps, np.int32)
    tps = np.asarray(previous_timesteps(calib_sched(calib), len(ts), "ddim"), np.int32)
    return jnp.asarray(calib.inputs[s, :n]), ts[s:s + k], tps[s:s + k]


def calib_sched(calib):
    from jaxquant.diffusion.schedules import ScheduleConfig

    return ScheduleConfig(num_train_timesteps=100)  # build_tiny's schedule


def test_unrolled_errors_the_long_way(quantized, calib):
    """Each step's term of the unrolled loss: both models step from their own states by
    DDIM (each model call picking its timestep group), ‖x^q − x^f‖² against the first
    step's c₀²·‖ε^f₀‖²;
    with one step and no clipping it is the one-step relative ε error."""
    import dataclasses

    from jaxquant.diffusion.samplers import ddim_eps_coefficient, ddim_step

    m, q = quantized
    sched = q.schedule
    assert calib_sched(calib) == sched
    x, ts, tps = _unroll_inputs(calib, 1, 3, 4)
    coef = ddim_eps_coefficient(sched, ts, tps)
    num, den = _unrolled_errors(q.apply, sched, q.params, m.params, x, jnp.asarray(ts), jnp.asarray(tps),
                                jnp.asarray(coef, jnp.float32), None)
    xq = xf = x
    for j in range(3):
        t = jnp.full((4,), ts[j], jnp.int32)
        ef = m.apply(m.params, xf, t)
        xq, xf = ddim_step(sched, xq, q.apply(q.params, xq, t), ts[j], tps[j]), ddim_step(sched, xf, ef, ts[j], tps[j])
        np.testing.assert_allclose(float(num[j]), float(jnp.sum((xq - xf) ** 2)), rtol=1e-4)
        if j == 0:
            den0 = coef[0] ** 2 * float(jnp.sum(ef ** 2))
        np.testing.assert_allclose(float(den[j]), den0, rtol=1e-4)
    assert len({int(calib.step_groups[s]) for s in (1, 2, 3)}) == 2  # the unroll crosses a group boundary
    plain = dataclasses.replace(sched, clip_sample=False)
    a, b = _unrolled_errors(q.apply, plain, q.params, m.params, x, jnp.asarray(ts[:1]), jnp.asarray(tps[:1]),
                            jnp.asarray(coef[:1], jnp.float32), None)
    t = jnp.full((4,), ts[0], jnp.int32)
    eq, ef = q.apply(q.params, x, t), m.apply(m.params, x, t)
    np.testing.assert_allclose(float(a[0] / b[0]), float(jnp.sum((eq - ef) ** 2) / jnp.sum(ef ** 2)), rtol=1e-3)


def test_network_stage_with_an_unrolled_loss(quantized, calib):
    """unroll = 2: the held-out 2-step error falls, the record carries the one-step errors
    (the one-step stage's held-out measure), codes and zero points stay; misuse is refused."""
    m, q = quantized
    tuned, rec = finetune_block(q, q.params, m.params, NETWORK, calib, steps=12, lr=3e-3, batch_size=4,
                                eval_pairs=8, lr_relative=True, unroll=2)
    assert rec["unroll"] == 2 and rec["kept"] and rec["error_after"] < rec["error_before"]
    one = block_output_error(q, q.params, m.params, NETWORK, calib, num_pairs=8, batch_size=4,
                             seed=_network_seed())
    np.testing.assert_allclose(rec["one_step_before"], one, rtol=1e-6)
    np.testing.assert_allclose(rec["one_step_after"], block_output_error(q, tuned, m.params, NETWORK, calib,
                                                                         num_pairs=8, batch_size=4,
                                                                         seed=_network_seed()), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(q.params), jax.tree_util.tree_leaves(tuned)):
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree_util.tree_leaves(q.params, is_leaf=is_act_quant),
                    jax.tree_util.tree_leaves(tuned, is_leaf=is_act_quant)):
        if is_act_quant(a):
            np.testing.assert_array_equal(np.asarray(a.zero), np.asarray(b.zero))
    bad = [dict(block="mid_block", unroll=2), dict(block=NETWORK, unroll=0), dict(block=NETWORK, unroll=5),
           dict(block=NETWORK, unroll=2, code_update_every=2)]
    for kw in bad:
        block = kw.pop("block")
        with pytest.raises(ConfigError):
            finetune_block(q, q.params, m.params, block, calib, steps=1, **kw)
    with pytest.raises(ConfigError, match="ddim"):
        import dataclasses
        ddpm_cal = dataclasses.replace(calib, config=dataclasses.replace(calib.config, sampler="ddpm"))
        finetune_block(q, q.params, m.params, NETWORK, ddpm_cal, steps=1, unroll=2)
    with pytest.raises(ConfigError, match="blocks"):
        finetune_model(q, q.params, m.params, calib, steps=1, unroll=2, progress=False)


def test_network_stage_with_a_one_step_ddim_loss(quantized, calib):
    """step_loss with unroll = 1: the stage takes the DDIM-step path (record ``unroll`` 1,
    ``step_loss``), its held-out error falls, and where the sampler's clip binds it is not the
    one-step ε error (on a schedule without the clip the term is that error: see the long-way
    test); misuse is refused."""
    import dataclasses

    from jaxquant.diffusion.samplers import ddim_eps_coefficient

    m, q = quantized
    tuned, rec = finetune_block(q, q.params, m.params, NETWORK, calib, steps=12, lr=3e-3, batch_size=4,
                                eval_pairs=8, lr_relative=True, step_loss=True)
    assert rec["unroll"] == 1 and rec["step_loss"] and rec["kept"] and rec["error_after"] < rec["error_before"]
    # the clip binds on this calibration: one clipped step's term differs from the ε error
    x, ts, tps = _unroll_inputs(calib, 0, 1, 4)
    coef = jnp.asarray(ddim_eps_coefficient(q.schedule, ts, tps), jnp.float32)
    a, b = _unrolled_errors(q.apply, q.schedule, q.params, m.params, x, jnp.asarray(ts), jnp.asarray(tps), coef,
                            None)
    plain = dataclasses.replace(q.schedule, clip_sample=False)
    a0, b0 = _unrolled_errors(q.apply, plain, q.params, m.params, x, jnp.asarray(ts), jnp.asarray(tps), coef, None)
    assert q.schedule.clip_sample and abs(float(a[0] / b[0]) / float(a0[0] / b0[0]) - 1) > 0.05
    for kw in (dict(block="mid_block"), dict(block=NETWORK, code_update_every=2),
               dict(block=NETWORK, min_snr_gamma=2.0)):
        block = kw.pop("block")
        with pytest.raises(ConfigError):
            finetune_block(q, q.params, m.params, block, calib, steps=1, step_loss=True, **kw)
    with pytest.raises(ConfigError, match="DDIM-step loss"):
        finetune_model(q, q.params, m.params, calib, steps=1, step_loss=True, progress=False)


def test_network_stage_with_balanced_steps(quantized, calib):
    """balance_steps: each start step's term is divided by its value before the stage, here
    recomputed for the first start step from the training starts the stage measures it on
    (up to 32 per step); the held-out error then starts near 1; misuse is refused."""
    from jaxquant.diffusion.samplers import ddim_eps_coefficient
    from jaxquant.quant.aq_model import _split_pool

    m, q = quantized
    tuned, rec = finetune_block(q, q.params, m.params, NETWORK, calib, steps=12, lr=3e-3, batch_size=4,
                                eval_pairs=8, lr_relative=True, step_loss=True, balance_steps=True)
    n_steps, n_traj = calib.inputs.shape[:2]
    assert rec["balance_steps"] and len(rec["step_scales"]) == n_steps and rec["kept"]
    assert rec["error_after"] < rec["error_before"] and 0.3 < rec["error_before"] < 3
    _, pool, bs = _split_pool(n_steps * n_traj, 8, _network_seed(), 4)
    members = np.sort((pool[pool // n_traj == 0] % n_traj)[:32])
    x, ts, tps = _unroll_inputs(calib, 0, 1, n_traj)
    coef = jnp.asarray(ddim_eps_coefficient(q.schedule, ts, tps), jnp.float32)
    a, b = _unrolled_errors(q.apply, q.schedule, q.params, m.params, x[members], jnp.asarray(ts), jnp.asarray(tps),
                            coef, None)
    np.testing.assert_allclose(rec["step_scales"][0], float(a[0] / b[0]), rtol=1e-4)
    assert len(set(np.round(rec["step_scales"], 8))) > 1
    with pytest.raises(ConfigError, match="balance_steps"):
        finetune_block(q, q.params, m.params, NETWORK, calib, steps=1, balance_steps=True)


@pytest.mark.parametrize("unroll", [1, 2])
def test_network_stage_keeps_the_average_of_its_iterates(quantized, calib, monkeypatch, unroll):
    """ema = d: the tuned values are Σ_s d^(T-s)·θ_s / Σ_s d^(T-s) over the Adam iterates,
    recomputed here from the iterates themselves, not the last iterate; codes stay; a decay
    outside (0, 1) and code updates are refused."""
    from jaxquant.quant import aq_model

    m, q = quantized
    seen = []
    update = aq_model._IterateAverage.update

    def spy(self, theta):
        seen.append([np.asarray(v, np.float64) for v in theta])
        update(self, theta)

    monkeypatch.setattr(aq_model._IterateAverage, "update", spy)
    d, steps = 0.7, 8
    tuned, rec = finetune_block(q, q.params, m.params, NETWORK, calib, steps=steps, lr=3e-3, batch_size=4,
                                eval_pairs=8, lr_relative=True, unroll=unroll, ema=d)
    assert rec["ema"] == d and rec["kept"] and len(seen) == steps
    units = tuple(block_units(q.params, NETWORK))
    _, _, leaves, train_idx, _ = aq_model._trainable(q.params, m.params, units)
    got = jax.tree_util.tree_leaves([aq_model._get(tuned, u) for u in units])
    w = d ** np.arange(steps - 1, -1, -1)
    moved_off_last = 0
    for k, i in enumerate(train_idx):
        want = sum(wi * it[k] for wi, it in zip(w, seen)) / w.sum()
        np.testing.assert_allclose(np.asarray(got[i], np.float64), want.astype(np.asarray(leaves[i]).dtype),
                                   rtol=2e-5, atol=1e-7)
        moved_off_last += not np.allclose(np.asarray(got[i], np.float64), seen[-1][k], rtol=1e-6, atol=0)
    assert moved_off_last > len(train_idx) // 2
    for i, (a, b) in enumerate(zip(leaves, got)):
        if i not in set(train_idx):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ConfigError, match="decay"):
            finetune_block(q, q.params, m.params, NETWORK, calib, steps=1, ema=bad)
    with pytest.raises(ConfigError, match="code updates"):
        finetune_block(q, q.params, m.params, "mid_block", calib, steps=1, code_update_every=1, ema=0.9)


def _network_seed():
    from jaxquant.quant.aq_model import _as_key, _seed_of

    return _seed_of(_as_key(0), "finetune:" + NETWORK)


def test_cli_finetune(model_dir, calib, tmp_path, capsys):
    cal = calib_mod.save_calibration(calib, tmp_path / "cal")
    qdir, out = tmp_path / "q", tmp_path / "qft"
    assert cli.main(["quantize", str(model_dir), "--w-bits", "4", "--a-bits", "6", "--calib", str(cal),
                     "--out", str(qdir)]) == 0
    assert cli.main(["finetune", str(qdir), "--calib", str(cal), "--steps", "6", "--batch", "4",
                     "--blocks", "mid_block", "up_blocks.1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "block output error" in text and "wrote" in text
    recs = json.loads((out / "finetune.json").read_text())
    assert [r["block"] for r in recs] == ["mid_block", "up_blocks.1"]
    assert all(r["error_after"] <= r["error_before"] for r in recs)
    q = jaxquant.load(qdir)
    assert model_blocks(q.params) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    ft = jaxquant.load(out)
    x, t, _ = _calibration_pairs(q, calib)
    assert np.all(np.isfinite(np.asarray(ft.apply(ft.params, jnp.asarray(x[:8]), jnp.asarray(t[:8])))))
    assert ft.meta.extra["finetune"]["steps"] == 6 and ft.meta.extra["finetune"]["lr_relative"]
    assert storage_report(ft.params).total_bytes == storage_report(jaxquant.load(qdir).params).total_bytes
    assert cli.main(["finetune", str(qdir), "--calib", str(cal), "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert cli.main(["finetune", str(out), "--calib", str(cal), "--steps", "3", "--batch", "4", "--blocks", "network",
                     "--unroll", "2", "--out", str(tmp_path / "un")]) == 0
    assert "2-step DDIM state error" in capsys.readouterr().out
    un = jaxquant.load(tmp_path / "un")
    assert un.meta.extra["finetune"]["unroll"] == 2 and un.meta.extra["finetune_earlier"][0]["steps"] == 6
    assert cli.main(["finetune", str(qdir), "--calib", str(cal), "--steps", "3", "--unroll", "2",
                     "--out", str(tmp_path / "y")]) == 2  # the blocks: refused
    assert cli.main(["finetune", str(out), "--calib", str(cal), "--steps", "3", "--batch", "4", "--blocks", "network",
                     "--ema", "0.9", "--out", str(tmp_path / "ema")]) == 0
    assert jaxquant.load(tmp_path / "ema").meta.extra["finetune"]["ema"] == 0.9
    assert json.loads((tmp_path / "ema" / "finetune.json").read_text())[0]["ema"] == 0.9
    assert "ema" not in un.meta.extra["finetune"]


def test_quality_table_names_for_reconstruction():
    from pathlib import Path

    from benchmarks.quality_table import NETWORK_LR, network_args, parse_config, quantize_args

    cfg = parse_config("rd-w6a6-g10-sm50-rec300")
    assert cfg["reconstruct_steps"] == 300
    assert parse_config("aq-w4a8-ft100-sens-rmin1-rec50")["reconstruct_steps"] == 50
    rounds = quantize_args("m", parse_config("aq-w2a8-ft100-it15-sens-rmin1p5"), Path("c"), Path("w/q"))
    assert rounds[rounds.index("--aq-rounds") + 1] == "15"
    assert "--aq-rounds" not in quantize_args("m", parse_config("aq-w2a8-ft100-sens"), Path("c"), Path("w/q"))
    measured = quantize_args("m", parse_config("aq-w2a8-ft100-sens-rmin1p5-plm"), Path("c"), Path("w/q"))
    assert measured[measured.index("--aq-planning") + 1] == "measured"
    assert "--aq-planning" not in rounds
    fa = parse_config("aq-w2a8-ft100-sens-rmin1p5-rec300-net600-fa")
    assert fa["float_acts"] and fa["network_steps"] == 600  # the stages of the model it samples
    assert "float_acts" not in parse_config("aq-w2a8-ft100-sens-rmin1p5-rec300-net600")
    with pytest.raises(SystemExit):
        parse_config("fp-fa")
    with pytest.raises(SystemExit, match="known sets"):
        parse_config("aq-w2a8-ft100-sens-rmin1p5-rec300-net600-faxyz")
    assert quantize_args("m", cfg, Path("c"), Path("w/q")) == quantize_args("m", parse_config("rd-w6a6-g10-sm50"),
                                                                            Path("c"), Path("w/q"))
    net = parse_config("aq-w2a8-ft100-sens-rmin1-rec300-net500")
    assert net["reconstruct_steps"] == 300 and net["network_steps"] == 500
    argv = network_args(Path("w/q-rec300"), Path("c"), 500, Path("w/q-rec300-net500"))
    args = cli.build_parser().parse_args(argv)
    assert args.blocks == [NETWORK] and args.steps == 500 and args.lr == NETWORK_LR


def test_quality_table_partial_float_activations_name_two_shortcut_inputs():
    import re

    from benchmarks.quality_table import parse_config
    from jaxquant.models.introspect import conv_layers

    cfg = parse_config("aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256-fasc3")
    assert cfg["network_calib_samples"] == 256 and isinstance(cfg["float_acts"], str)
    hit = [n for n in conv_layers(jaxquant.load("ddpm-fmnist")) if re.search(cfg["float_acts"], n + ".input_quant")]
    assert hit == ["up_blocks.3.resnets.0.conv_shortcut", "up_blocks.3.resnets.1.conv_shortcut"]
    assert parse_config("aq-w4a8-ft100-sens-rmin1-rec300-net600-fa")["float_acts"] is True


def test_quality_table_quantizes_a_set_of_activation_sites_wider():
    """``-a16sc3``: the quantize stage gets ``--a-bits-at PATTERN=16`` for the sites of ``-fasc3``,
    so every stage above it is built on its own quantized model."""
    from pathlib import Path

    from benchmarks.quality_table import ACT_SITE_SETS, parse_config, quantize_args, stage_names

    name = "aq-w4a8-a16sc3-ft100-sens-rmin1-plm-sm50fr-rec300-net600-nq256"
    cfg = parse_config(name)
    assert cfg["a_bits_at"] == (ACT_SITE_SETS["sc3"], 16) and cfg["a_bits"] == 8
    argv = quantize_args("ddpm-fmnist", cfg, Path("c"), Path("w/q"))
    args = cli.build_parser().parse_args(argv)
    assert args.a_bits_at == [ACT_SITE_SETS["sc3"] + "=16"] and args.a_bits == 8
    assert "--a-bits-at" not in quantize_args("m", parse_config("aq-w4a8-ft100-sens-rmin1"), Path("c"), Path("w/q"))
    assert stage_names(name)[0] == "aq-w4a8-a16sc3-ft100-sens-rmin1-plm-sm50fr"  # its own quantized model
    assert parse_config("uniform-w4a8-a12sc3")["a_bits_at"][1] == 12
    with pytest.raises(SystemExit, match="known sets"):
        parse_config("aq-w4a8-a16xyz")
    with pytest.raises(SystemExit, match="needs quantized activations"):
        parse_config("uniform-w4af-a16sc3")
    with pytest.raises(SystemExit, match="unknown part"):
        parse_config("rd-w6a6-g10-a16sc3")  # rd chooses every site's bits


def test_quality_table_seeds_the_network_stage():
    from pathlib import Path

    from benchmarks.quality_table import network_args, parse_config, stage_names

    name = "aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256-ms5-sd1"
    cfg = parse_config(name)
    assert cfg["network_seed"] == 1 and cfg["network_min_snr"] == 5
    # the stages below the network stage are the unseeded configuration's, shared
    assert stage_names(name) == stage_names("aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256")
    args = cli.build_parser().parse_args(network_args(Path("q"), Path("c"), 600, Path("o"), seed=1))
    assert args.seed == 1
    assert "--seed" not in network_args(Path("q"), Path("c"), 600, Path("o"))
    with pytest.raises(SystemExit, match="needs -netN"):
        parse_config("aq-w4a8-ft100-sens-rmin1-rec300-sd1")


def test_quality_table_averages_the_network_stages_iterates():
    from pathlib import Path

    from benchmarks.quality_table import network_args, network_name, parse_config, stage_names

    name = "aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256-sd1-ema995"
    cfg = parse_config(name)
    assert cfg["network_ema"] == 0.995 and cfg["network_seed"] == 1 and parse_config(
        name.replace("ema995", "ema99"))["network_ema"] == 0.99
    assert stage_names(name) == stage_names("aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256")
    assert network_name(name) == name
    args = cli.build_parser().parse_args(network_args(Path("q"), Path("c"), 600, Path("o"), ema=0.995))
    assert args.ema == 0.995
    assert "--ema" not in network_args(Path("q"), Path("c"), 600, Path("o"))
    with pytest.raises(SystemExit, match="needs -netN"):
        parse_config("aq-w4a8-ft100-rec300-ema995")


def test_quality_table_names_for_the_network_stages_calibration():
    from pathlib import Path

    from benchmarks.quality_table import network_calib_dir, parse_config, stage_names

    name = "aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256"
    cfg = parse_config(name)
    assert cfg["network_calib_samples"] == 256 and cfg["network_calib_on_policy"]
    assert stage_names(name) == ("aq-w4a8-ft100-sens-rmin1", "aq-w4a8-ft100-sens-rmin1-rec300")
    own = network_calib_dir(cfg, Path("w"), stage_names(name)[1])
    assert own == Path("w/aq-w4a8-ft100-sens-rmin1-rec300-calib-n256")
    shared = parse_config("rd-w6a6-g10-sm50-net600-nc128")
    assert not shared["network_calib_on_policy"]
    assert stage_names("rd-w6a6-g10-sm50-net600-nc128") == ("rd-w6a6-g10-sm50", "rd-w6a6-g10-sm50")
    assert network_calib_dir(shared, Path("w"), "rd-w6a6-g10-sm50") == Path("w/calib-g10-sm50-n128")
    assert "network_calib_samples" not in parse_config("aq-w4a8-ft100-rec300-net600")


def test_quality_table_names_for_the_unrolled_network_stage():
    from pathlib import Path

    from benchmarks.quality_table import NETWORK_LR, UNROLL_LR, network_args, network_name, parse_config, stage_names

    name = "aq-w2a8-ft100-sens-rmin1p5-rec300-net600-un3s400"
    cfg = parse_config(name)
    assert (cfg["unroll"], cfg["unroll_steps"], cfg["network_steps"]) == (3, 400, 600)
    assert stage_names(name) == ("aq-w2a8-ft100-sens-rmin1p5", "aq-w2a8-ft100-sens-rmin1p5-rec300")
    assert network_name(name) == "aq-w2a8-ft100-sens-rmin1p5-rec300-net600"
    args = cli.build_parser().parse_args(network_args(Path("w/n"), Path("c"), 400, Path("w/o"), 3, UNROLL_LR))
    assert (args.unroll, args.steps, args.lr, args.blocks) == (3, 400, UNROLL_LR, [NETWORK])
    assert parse_config(name.replace("un3", "un1"))["unroll"] == 1  # the control: one-step loss, same rate
    plain = cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o")))
    assert (plain.unroll, plain.lr) == (1, NETWORK_LR)
    with pytest.raises(SystemExit):
        parse_config("aq-w2a8-ft100-rec300-un3s400")


def test_quality_table_names_for_the_ddim_step_loss():
    """-slK: the network stage's loss is the DDIM state after K steps, at the unrolled loss's
    rate; the model it starts from is the name without it."""
    from pathlib import Path

    from benchmarks.quality_table import NETWORK_LR, UNROLL_LR, network_args, network_lr, parse_config, stage_names

    name = "aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256-ema995-sl"
    assert network_lr(parse_config(name)) == UNROLL_LR
    assert network_lr(parse_config(name.replace("-sl", ""))) == NETWORK_LR
    fast = parse_config(name.replace("-sl", "-slb-lr1e3"))
    assert network_lr(fast) == 1e-3 and fast["network_balance_steps"]
    assert network_lr(parse_config(name.replace("-sl", "-lr3e4"))) == 3e-4
    assert stage_names(name + "-lr1e3")[1] == "aq-w4a8-ft100-sens-rmin1-rec300"
    cfg = parse_config(name)
    assert cfg["network_step_loss"] == 1 and cfg["network_ema"] == 0.995
    assert stage_names(name) == ("aq-w4a8-ft100-sens-rmin1", "aq-w4a8-ft100-sens-rmin1-rec300")
    assert stage_names(name.replace("-sl", "-sl3-sd1"))[1] == "aq-w4a8-ft100-sens-rmin1-rec300"
    assert parse_config(name.replace("-sl", "-sl3"))["network_step_loss"] == 3
    assert "network_balance_steps" not in cfg
    balanced = parse_config(name.replace("-sl", "-slb3"))
    assert (balanced["network_step_loss"], balanced["network_balance_steps"]) == (3, True)
    assert stage_names(name.replace("-sl", "-slb"))[1] == "aq-w4a8-ft100-sens-rmin1-rec300"
    args = cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o"), step_loss=True,
                                                      balance_steps=True))
    assert args.step_loss and args.balance_steps
    args = cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o"), lr=UNROLL_LR,
                                                      step_loss=True))
    assert (args.step_loss, args.unroll, args.lr) == (True, 1, UNROLL_LR)
    args = cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o"), 3, UNROLL_LR,
                                                      step_loss=True))
    assert (args.step_loss, args.unroll, args.lr) == (True, 3, UNROLL_LR)
    plain = cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o")))
    assert (plain.step_loss, plain.lr) == (False, NETWORK_LR)
    for bad in ("aq-w4a8-ft100-rec300-sl", "aq-w4a8-ft100-rec300-net600-sl-un3s400",
                "aq-w4a8-ft100-rec300-net600-ms5-sl", "aq-w4a8-ft100-rec300-lr1e3"):
        with pytest.raises(SystemExit):
            parse_config(bad)


def test_sample_drift_drops_the_activation_quantizers_a_pattern_names(quantized):
    import re

    from benchmarks.sample_drift import _without_act_quant, count_act_quant

    _, q = quantized
    paths = []

    def visit(node, prefix):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else k
            if is_act_quant(v):
                paths.append(p)
            elif isinstance(v, dict):
                visit(v, p)

    visit(q.params, "")
    assert len(paths) == count_act_quant(q.params) > 0
    for pattern in (r"attentions", r"^up_blocks\.1\.", r"\.(q|k|v)_quant$"):
        want = sum(not re.search(pattern, p) for p in paths)
        assert 0 < want < len(paths)
        assert count_act_quant(_without_act_quant(q.params, pattern)) == want
    assert count_act_quant(_without_act_quant(q.params)) == 0


def test_sample_drift_puts_back_the_float_kernels_a_pattern_names(quantized, calib):
    """``--float-weights-at``: exactly the matching layers' quantized kernels become the
    source's float kernels, and nothing else changes; with every kernel put back and the
    activation quantizers dropped, the model computes the float model's output."""
    import re

    from flax.traverse_util import flatten_dict

    from benchmarks.sample_drift import _without_act_quant, count_act_quant, with_float_weights
    from jaxquant.quant.dispatch import is_quantized_weight

    m, q = quantized

    def flat(tree):
        return flatten_dict(tree, sep=".", is_leaf=lambda _, x: is_quantized_weight(x))

    flat_q, flat_m = flat(q.params), flat(m.params)
    qlayers = [p[: -len(".kernel")] for p, v in flat_q.items() if is_quantized_weight(v)]
    assert qlayers
    for pattern in (r"^up_blocks\.1\.", r"attentions"):
        want = {n for n in qlayers if re.search(pattern, n)}
        assert 0 < len(want) < len(qlayers)
        params, n = with_float_weights(q.params, m.params, pattern)
        assert n == len(want)
        got = flat(params)
        assert got.keys() == flat_q.keys()
        for path, v in got.items():
            if path.endswith(".kernel") and path[: -len(".kernel")] in want:
                np.testing.assert_array_equal(np.asarray(v), np.asarray(flat_m[path]))
            else:
                assert v is flat_q[path]
        assert count_act_quant(params) == count_act_quant(q.params)
    params, n = with_float_weights(q.params, m.params, ".")
    assert n == len(qlayers)
    params = _without_act_quant(params)
    x, t, _ = _calibration_pairs(q, calib)
    out = m.module.apply({"params": params}, x[:4], t[:4], None)
    ref = m.module.apply({"params": m.params}, x[:4], t[:4], None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sample_drift_float_kernels_follow_tuned_smoothing_factors(quantized, calib):
    """A smoothed layer whose factors moved after quantization (tuning trains them) gets the
    source's kernel rescaled to its own factors: with every kernel put back and the
    activation quantizers dropped, the model still computes the float model's output; a
    layer smoothed on one side only is refused."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    from benchmarks.sample_drift import _without_act_quant, with_float_weights
    from jaxquant.quant.dispatch import is_quantized_weight
    from jaxquant.quant.smooth import ChannelSmooth, smooth_params

    m, q = quantized
    flat_q = flatten_dict(q.params)  # tuple keys: layer names may hold dots
    layers = sorted(p[:-1] for p, v in flat_q.items() if is_quantized_weight(v))[:3]
    rng = np.random.default_rng(0)
    amax = {".".join(n): rng.uniform(0.1, 5.0, flat_q[n + ("kernel",)].shape[-2]) for n in layers}
    source = smooth_params(m.params, amax, 0.5)
    flat_s = flatten_dict(source)
    tuned = dict(flat_q)
    for n in layers:  # factors "tuned" up to 5 % away from the source's
        inv = np.asarray(flat_s[n + ("input_smooth",)].inv_scale) * rng.uniform(0.95, 1.05, flat_q[n + ("kernel",)].shape[-2])
        tuned[n + ("input_smooth",)] = ChannelSmooth(np.asarray(inv, np.float32))
    tuned = unflatten_dict(tuned)
    params, n = with_float_weights(tuned, source, ".")
    assert n == sum(is_quantized_weight(v) for v in flat_q.values())
    params = _without_act_quant(params)
    x, t, _ = _calibration_pairs(q, calib)
    out = m.module.apply({"params": params}, x[:4], t[:4], None)
    ref = m.module.apply({"params": m.params}, x[:4], t[:4], None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit, match="smoothed"):
        with_float_weights(tuned, m.params, ".")


def test_step_error_by_site_the_long_way(quantized, calib):
    """``benchmarks.step_error_by_site``: each step's error is Σ‖ε̂ − ε‖² / Σ‖ε‖² of the
    quantized against the float model on that step's calibration inputs (checked by hand at
    one step); with every kernel float and every activation quantizer dropped it vanishes;
    and the bands average the right steps."""
    from benchmarks.sample_drift import _without_act_quant, with_float_weights
    from benchmarks.step_error_by_site import band_means, band_names, step_errors

    m, q = quantized
    errs = step_errors(q, q.params, m, calib, num=4)
    assert errs.shape == (calib.inputs.shape[0],) and np.all(errs > 0)
    s = 1
    x = np.asarray(calib.inputs[s, :4], np.float32)
    t = np.full((4,), int(calib.timesteps[s]), np.int32)
    e_q = np.asarray(q.apply(q.params, jnp.asarray(x), jnp.asarray(t)), np.float64)
    e_f = np.asarray(m.apply(m.params, jnp.asarray(x), jnp.asarray(t)), np.float64)
    np.testing.assert_allclose(errs[s], np.sum((e_q - e_f) ** 2) / np.sum(e_f ** 2), rtol=1e-4)
    params, _ = with_float_weights(_without_act_quant(q.params), m.params, ".")
    assert np.all(step_errors(q, params, m, calib, num=4) < 1e-10)

    assert band_names([150, 500]) == ["t >= 500", "150 <= t < 500", "t < 150"]
    ts = np.array([900, 600, 400, 200, 100, 0])
    np.testing.assert_allclose(band_means(ts, np.arange(6.0), [500, 150]), [0.5, 2.5, 4.5])
    assert np.isnan(band_means(ts, np.arange(6.0), [950, 920])[1])


def test_sample_drift_float_acts_during_a_timestep_range(quantized, calib):
    """``--float-acts-during LO-HI``: at timesteps inside the range the model computes what
    it computes with its activation quantizers dropped (to the 24-bit step; the tiny model's
    4-bit ranges clip inputs up to 2-4x beyond them, which 8x still covers), outside it
    what it computes as stored; ranges are parsed and checked."""
    from benchmarks.sample_drift import _without_act_quant, float_acts_during, parse_t_range
    from jaxquant.quant.activation import at_timestep_group

    m, q = quantized
    stored = at_timestep_group(q.params, 0)  # one-group quantizers, as the quality table's
    params = float_acts_during(stored, 50, 100, steps=4, num_train=100)
    x = jnp.asarray(np.asarray(calib.inputs[0, :4], np.float32))
    for t, ref in ((60, _without_act_quant(stored)), (99, _without_act_quant(stored)), (10, stored), (49, stored)):
        tt = jnp.full((4,), t, jnp.int32)
        np.testing.assert_allclose(np.asarray(q.apply(params, x, tt)), np.asarray(q.apply(ref, x, tt)),
                                   rtol=0, atol=2e-5)  # a 24-bit step over 8x the range
    tt = jnp.full((4,), 10, jnp.int32)
    assert not np.allclose(np.asarray(q.apply(stored, x, tt)), np.asarray(q.apply(_without_act_quant(stored), x, tt)),
                           atol=1e-5)
    assert parse_t_range("500-1000") == (500, 1000)
    for bad in ("1000-500", "500", "a-b"):
        with pytest.raises(SystemExit, match="bad timestep range"):
            parse_t_range(bad)
    with pytest.raises(SystemExit, match="one-group"):
        float_acts_during(q.params, 50, 100, steps=4, num_train=100)


def test_min_snr_weights_and_the_weighted_network_error_the_long_way(quantized, calib):
    """``min_snr_weights``: ``min(SNR_t, γ)/SNR_t`` from the schedule's ᾱ (1 where SNR ≤ γ);
    the weighted NETWORK error is Σ_i w_i‖ε_q,i − ε_f,i‖² / Σ_i ‖ε_f,i‖², by hand; unit
    weights give the unweighted error."""
    from jaxquant.diffusion.schedules import alphas_cumprod
    from jaxquant.quant.aq_model import _block_error, _loss_outputs, _pair_groups, _set_paths, min_snr_weights

    m, q = quantized
    x, t, y = _calibration_pairs(q, calib)
    a = np.asarray(alphas_cumprod(q.schedule), np.float64)[t]
    snr = a / (1 - a)
    w = min_snr_weights(q.schedule, t, 2.0)
    np.testing.assert_allclose(w, np.minimum(snr, 2.0) / snr, rtol=1e-6)
    assert np.all(w[snr <= 2.0] == 1.0) and np.all(w[snr > 2.0] < 1.0) and np.any(snr > 2.0) and np.any(snr <= 2.0)
    with pytest.raises(ConfigError, match="gamma"):
        min_snr_weights(q.schedule, t, 0.0)

    num = den = 0.0
    for i in range(0, len(t), 8):
        xb, tb = jnp.asarray(x[i:i + 8]), jnp.asarray(t[i:i + 8])
        eq = np.asarray(q.apply(q.params, xb, tb), np.float64)
        ef = np.asarray(m.apply(m.params, xb, tb), np.float64)
        num += np.sum(w[i:i + 8] * np.sum((eq - ef) ** 2, axis=(1, 2, 3)))
        den += np.sum(ef ** 2)
    units = tuple(block_units(q.params, NETWORK))
    ref = _set_paths(q.params, {u: m.params[u[0]] for u in units})
    outs, idx = _loss_outputs(NETWORK, units), np.arange(len(t))
    groups = _pair_groups(q, q.params, (x, t, y))
    got = _block_error(q, outs, q.params, ref, (x, t, y), idx, 4, groups, w)
    np.testing.assert_allclose(got, num / den, rtol=1e-4)
    ones = _block_error(q, outs, q.params, ref, (x, t, y), idx, 4, groups, np.ones_like(w))
    np.testing.assert_allclose(ones, _block_error(q, outs, q.params, ref, (x, t, y), idx, 4, groups), rtol=1e-6)


def test_network_stage_with_min_snr_weighting(quantized, calib):
    """``min_snr_gamma``: the weighted network stage lowers its weighted held-out error and
    records γ; it refuses an unrolled loss and code updates."""
    m, q = quantized
    tuned, rec = finetune_block(q, q.params, m.params, NETWORK, calib, steps=16, lr=3e-3, batch_size=4,
                                lr_relative=True, min_snr_gamma=2.0)
    assert rec["min_snr_gamma"] == 2.0 and rec["kept"] and rec["error_after"] < rec["error_before"]
    with pytest.raises(ConfigError, match="one-step"):
        finetune_block(q, q.params, m.params, NETWORK, calib, steps=1, unroll=2, min_snr_gamma=2.0)
    with pytest.raises(ConfigError, match="one-step"):
        finetune_block(q, q.params, m.params, "mid_block", calib, steps=1, code_update_every=1, min_snr_gamma=2.0)


def test_quality_table_names_for_the_weighted_network_stage():
    from pathlib import Path

    from benchmarks.quality_table import network_args, network_name, parse_config, stage_names

    name = "aq-w4a8-ft100-sens-rmin1-rec300-net600-nq256-ms5"
    cfg = parse_config(name)
    assert cfg["network_min_snr"] == 5.0 and parse_config(name.replace("ms5", "ms2p5"))["network_min_snr"] == 2.5
    assert stage_names(name) == ("aq-w4a8-ft100-sens-rmin1", "aq-w4a8-ft100-sens-rmin1-rec300")
    assert network_name(name) == name
    args = cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o"), min_snr_gamma=2.5))
    assert args.min_snr_gamma == 2.5 and args.blocks == [NETWORK]
    assert cli.build_parser().parse_args(network_args(Path("w/r"), Path("c"), 600, Path("w/o"))).min_snr_gamma is None
    with pytest.raises(SystemExit, match="needs -netN"):
        parse_config("aq-w4a8-ft100-rec300-ms5")
