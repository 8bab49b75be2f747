"""Sampling latent-diffusion models: DDIM in latent space, classifier-free guidance, decoding, CLI.

The model is a tiny class-conditional LDM with the cin256-v2 layout (CompVis UNetModel with
a SpatialTransformer, VQ first stage, class embedder whose last row is the unconditional
label) at reduced width, with random weights; it is built from shapes only (no init
compile), so the tests stay small.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jaxquant
from checkpoints_convert.compvis import expected_params, ldm_config_from_yaml
from jaxquant import cli
from jaxquant.api import Model
from jaxquant.diffusion import ddim_step, initial_noise, previous_timesteps, sampling_timesteps
from jaxquant.diffusion.pipeline import (check_labels, default_steps, generate, num_classes, sampling_fn,
                                         unconditional_label)
from jaxquant.errors import ConfigError, JaxquantError
from jaxquant.images import to_uint8
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel

N_CLASSES = 5  # labels 0..3, 4 = unconditional (CompVis: n_classes - 1)

# A CompVis YAML of the cin256-v2 family (tests/test_ldm_parity.py's SMALL, narrower and shallower).
TINY_LDM_YAML = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "conditioning_key": "crossattn",
    "image_size": 8, "channels": 3,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 1, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": 32}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 16,
        "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                          "params": {"n_classes": N_CLASSES, "embed_dim": 32, "key": "class_label"}},
}}}

TINY_UNET2D = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": None,
}


def _random_params(shapes, seed: int) -> dict:
    """Non-trivial random weights on a tree of ShapeDtypeStructs (norm scales near 1)."""
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, s in flat:
        name = str(path[-1].key)
        if name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(s.shape)
        elif name == "embedding":
            v = rng.standard_normal(s.shape)
        elif len(s.shape) >= 2:
            v = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        else:
            v = 0.1 * rng.standard_normal(s.shape)
        out.append(v.astype(np.float32))
    return jax.tree_util.tree_unflatten(tree, out)


@pytest.fixture(scope="module")
def ldm_dir(tmp_path_factory):
    cfg, schedule, _ = ldm_config_from_yaml(TINY_LDM_YAML)
    path = tmp_path_factory.mktemp("ldm") / "tiny-ldm"
    return save_model_dir(path, ModelDirMeta("ldm", cfg.to_dict(), schedule), _random_params(expected_params(cfg), 0))


@pytest.fixture(scope="module")
def ldm(ldm_dir):
    return jaxquant.load(ldm_dir)


def _unet2d_dir(path, **extra):
    cfg = {**TINY_UNET2D, **extra}
    module = UNet2DModel(UNet2DConfig.from_dict(cfg))
    y = jnp.zeros((1,), jnp.int32) if extra else None
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                                                y)["params"])
    return save_model_dir(path, ModelDirMeta("unet2d", cfg, {"num_train_timesteps": 100}), _random_params(shapes, 1))


@pytest.fixture
def traced_batches(monkeypatch):
    """Batch sizes ``Model.apply`` is traced with (one entry per trace, i.e. per compile)."""
    seen: list[int] = []
    original = Model.apply

    def recording(self, params, x, t, y=None):
        seen.append(int(x.shape[0]))
        return original(self, params, x, t, y)

    monkeypatch.setattr(Model, "apply", recording)
    return seen


def _reference_latents(model, key, labels, steps: int, scale: float) -> np.ndarray:
    """DDIM written out step by step with separate conditional / unconditional model calls."""
    sched = model.schedule
    null = np.full_like(labels, model.network_config.cond_stage.n_classes - 1)
    x = initial_noise(key, (len(labels), *model.sample_shape))
    for t, t_prev in zip(sampling_timesteps(sched, steps), previous_timesteps(sched, steps, "ddim")):
        tt = jnp.full((len(labels),), int(t), jnp.int32)
        eps_c = model(x, tt, labels)
        eps_u = model(x, tt, null)
        x = ddim_step(sched, x, eps_u + scale * (eps_c - eps_u), int(t), int(t_prev))
    return np.asarray(x)


def test_generate_matches_reference_loop(ldm, traced_batches):
    steps, scale, seed, batch = 3, 3.0, 11, 2
    labels = np.array([3, 0, 2], np.int32)
    images = generate(ldm, 3, steps=steps, seed=seed, batch_size=batch, labels=labels, cfg_scale=scale, progress=False)
    assert traced_batches == [2 * batch]  # one compile for both batches; guidance doubles the batch
    assert images.dtype == np.uint8 and images.shape == (3, 16, 16, 3)
    assert ldm.network_config.decoded_size == 16 and unconditional_label(ldm) == N_CLASSES - 1

    latents_fn = sampling_fn(ldm, steps=steps, cfg_scale=scale, decode=False)
    base = jax.random.key(seed)
    ref_latents, got_latents = [], []
    for b, y in enumerate((labels[:2], np.array([labels[2], 0], np.int32))):  # last batch padded with label 0
        key = jax.random.fold_in(base, b)
        ref_latents.append(_reference_latents(ldm, key, y, steps, scale))
        x_T = initial_noise(key, (batch, 8, 8, 3))
        got_latents.append(np.asarray(latents_fn(ldm.params, x_T, key, jnp.asarray(y))))
    ref, got = np.concatenate(ref_latents)[:3], np.concatenate(got_latents)[:3]
    assert np.abs(ref).max() > 0.1
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())

    want = to_uint8(np.asarray(ldm.decode(ref)))
    diff = np.abs(images.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert len(np.unique(images)) > 20  # decoded pictures, not a constant


def test_cli_class_labels_rows_and_defaults(ldm_dir, tmp_path, capsys, traced_batches):
    out = tmp_path / "s" / "samples.npz"
    rc = cli.main(["sample", str(ldm_dir), "--class-labels", "3,0,2", "--per-class", "2", "--batch-size", "4",
                   "--seed", "5", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "ddim-20:" in stdout  # the LDM default step count
    assert traced_batches == [4]  # cfg scale 1: plain conditional batch, compiled once for both batches
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(labels, [3, 3, 0, 0, 2, 2])
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    assert grid.shape == (2 * (3 * 18 + 2), 2 * (2 * 18 + 2), 3)  # 3 class rows x 2, 2-px padding, upscaled 2x
    grid = grid[::2, ::2]
    for i, img in enumerate(images):
        r, c = divmod(i, 2)  # row = class
        np.testing.assert_array_equal(grid[2 + r * 18: 2 + r * 18 + 16, 2 + c * 18: 2 + c * 18 + 16], img)


def _plan(model, *argv):
    args = cli.build_parser().parse_args(["sample", "x", *argv])
    return cli._sample_plan(model, args)


def test_cli_label_plans(ldm):
    labels, classes, per = _plan(ldm, "--classes", "all", "--per-class", "3")
    assert classes == [0, 1, 2, 3] and per == 3  # the unconditional label 4 is not a class
    np.testing.assert_array_equal(labels, np.repeat([0, 1, 2, 3], 3))
    labels, classes, per = _plan(ldm, "--class-labels", "2, 1")
    np.testing.assert_array_equal(labels, [2, 2, 2, 2, 1, 1, 1, 1])  # default 4 per class
    labels, classes, _ = _plan(ldm, "--num", "50", "--seed", "3")
    assert classes is None and labels.shape == (50,) and set(labels.tolist()) == {0, 1, 2, 3}
    np.testing.assert_array_equal(labels, _plan(ldm, "--num", "50", "--seed", "3")[0])
    assert default_steps(ldm) == 20 and num_classes(ldm) == 4
    for argv, needle in [(("--classes", "all", "--num", "8"), "--per-class"),
                         (("--per-class", "2",), "--class-labels or --classes"),
                         (("--class-labels", "1,x"), "comma-separated integers"),
                         (("--class-labels", "1", "--per-class", "0"), "--per-class must be at least 1"),
                         (("--class-labels", "1", "--grid", "4"), "--grid-rows")]:
        with pytest.raises(JaxquantError, match=needle):
            _plan(ldm, *argv)


@pytest.mark.parametrize("bad", [[0, 4], [-1, 0], [0, 7]])
def test_bad_labels(ldm, ldm_dir, tmp_path, capsys, bad):
    with pytest.raises(ConfigError, match=r"class labels must be in \[0, 3\]") as exc:
        generate(ldm, 2, steps=2, labels=bad, cfg_scale=3.0, progress=False)
    if 4 in bad:
        assert "label 4 is the unconditional label" in str(exc.value)
    rc = cli.main(["sample", str(ldm_dir), "--class-labels=" + ",".join(map(str, bad)), "--steps", "2",
                   "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "class labels must be in [0, 3]" in err
    assert not (tmp_path / "x.npz").exists()


def test_label_checks(ldm):
    with pytest.raises(ConfigError, match="class-conditional: give class labels"):
        generate(ldm, 2, steps=2, progress=False)
    with pytest.raises(ConfigError, match="expected 3 class labels"):
        generate(ldm, 3, steps=2, labels=[0, 1], progress=False)
    with pytest.raises(ConfigError, match="integers"):
        check_labels(ldm, [0.5, 1.0], 2)
    with pytest.raises(ConfigError, match="cfg_scale must be a finite number"):
        generate(ldm, 2, steps=2, labels=[0, 1], cfg_scale=float("nan"), progress=False)


def test_guidance_needs_unconditional_label(tmp_path, capsys):
    cond = jaxquant.load(_unet2d_dir(tmp_path / "cond", num_class_embeds=3))
    uncond = jaxquant.load(_unet2d_dir(tmp_path / "uncond"))
    assert unconditional_label(cond) is None and num_classes(cond) == 3 and default_steps(cond) == 50
    with pytest.raises(ConfigError, match="unconditional label, and this unet2d model has none"):
        generate(cond, 2, steps=2, labels=[0, 2], cfg_scale=2.0, progress=False)
    with pytest.raises(ConfigError, match="this model is unconditional"):
        generate(uncond, 2, steps=2, cfg_scale=2.0, progress=False)
    with pytest.raises(ConfigError, match=r"class labels must be in \[0, 2\]"):
        generate(cond, 2, steps=2, labels=[0, 3], progress=False)
    rc = cli.main(["sample", str(tmp_path / "cond"), "--class-labels", "0,1", "--cfg-scale", "3",
                   "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "has none (use cfg_scale 1)" in err
    # Class rows work for unet2d class-conditional models too (no guidance).
    labels, classes, per = _plan(cond, "--classes", "all", "--per-class", "2")
    np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
    with pytest.raises(JaxquantError, match="need a class-conditional model"):
        _plan(uncond, "--class-labels", "0")


def test_calibration_with_xtx_covers_the_denoiser_only(ldm):
    from jaxquant.calib import CalibConfig, calibrate
    from jaxquant.quant.rules import layer_kernels

    calib = calibrate(ldm, CalibConfig(num_samples=2, steps=2, batch_size=2, cfg_scale=3.0, xtx=True),
                      progress=False)
    kernels = layer_kernels(ldm.params)
    denoiser = {n for n in kernels if not n.startswith(("first_stage.", "cond_stage."))}
    assert set(calib.xtx) == denoiser and len(denoiser) < len(kernels)
    for n, h in calib.xtx.items():
        k = int(np.prod(kernels[n].shape[:-1]))
        assert h.shape == (k, k) and np.all(np.isfinite(h))
        np.testing.assert_allclose(h, h.T, rtol=1e-4, atol=1e-4 * float(np.abs(h).max()))
        assert np.all(np.diag(h) >= 0) and calib.xtx_count[n] > 0


def test_unrolled_network_loss_steps_with_the_guided_eps(ldm):
    """The network stage's unrolled loss on a guided calibration steps both models with
    the classifier-free-guided ε at the calibration's scale and the trajectories' labels:
    its held-out error is the 2-step state error computed the long way."""
    from jaxquant.calib import CalibConfig, calibrate
    from jaxquant.diffusion.guidance import guided_eps
    from jaxquant.diffusion.samplers import ddim_eps_coefficient, ddim_step, previous_timesteps
    from jaxquant.quant.aq_model import NETWORK, finetune_block

    calib = calibrate(ldm, CalibConfig(num_samples=2, steps=2, batch_size=2, cfg_scale=3.0, xtx=False),
                      progress=False)
    noisy = jax.tree_util.tree_map(
        lambda a: a * (1 + 0.05 * jax.random.normal(jax.random.key(3), a.shape, a.dtype)), ldm.params)
    _, rec = finetune_block(ldm, noisy, ldm.params, NETWORK, calib, steps=1, batch_size=2, eval_pairs=None,
                            unroll=2)
    eps = guided_eps(ldm.apply, 3.0, ldm.network_config.unconditional_label)
    ts = np.asarray(calib.timesteps)
    tps = previous_timesteps(ldm.schedule, 2, "ddim")
    coef = ddim_eps_coefficient(ldm.schedule, ts, tps)
    y = jnp.asarray(calib.labels)
    xq = xf = jnp.asarray(calib.inputs[0])
    ratios = []
    for j in range(2):
        t = jnp.full((2,), ts[j], jnp.int32)
        ef = eps(ldm.params, xf, t, y)
        xq = ddim_step(ldm.schedule, xq, eps(noisy, xq, t, y), ts[j], tps[j])
        xf = ddim_step(ldm.schedule, xf, ef, ts[j], tps[j])
        if j == 0:
            den = coef[0] ** 2 * float(jnp.sum(ef ** 2))
        ratios.append(float(jnp.sum((xq - xf) ** 2)) / den)
    assert rec["unroll"] == 2
    np.testing.assert_allclose(rec["error_before"], np.mean(ratios), rtol=1e-3)
