"""VQ first-stage and latent-diffusion training: loss goes down, resume is exact, exports load and run.

Tiny networks on synthetic 8×8 images (a bright bar whose row is the class), through the
library functions and the ``jaxquant train vq|ldm`` CLI (the data loader and the shipped
configs are swapped for tiny ones).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
import jaxquant.data
import jaxquant.train.ldm as ldm_mod
import jaxquant.train.vq as vq_mod
from jaxquant import cli
from jaxquant.errors import JaxquantError
from jaxquant.io.model_dir import load_model_dir, save_model_dir
from jaxquant.models.autoencoder import AutoencoderConfig, VQModel
from jaxquant.models.ldm import LatentDiffusion
from jaxquant.train.ldm import FMNIST_LDM, LDM_SCHEDULE, drop_labels, encode_images, make_ldm_config
from jaxquant.train.loop import TrainConfig
from jaxquant.train.vq import FMNIST_VQ, init_vq_params, load_vq, reconstruction_metrics, train_vq

TINY_VQ = {"kind": "vq", "embed_dim": 3, "n_embed": 16, "ddconfig": {
    "double_z": False, "z_channels": 3, "resolution": 8, "in_channels": 1, "out_ch": 1, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "attn_type": "none", "dropout": 0.0}}
TINY_LDM = {
    "unet": {"image_size": 4, "in_channels": 3, "out_channels": 3, "model_channels": 32, "channel_mult": [1],
             "num_res_blocks": 1, "attention_resolutions": [1], "num_head_channels": 32,
             "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32},
    "cond_stage": {"n_classes": 11, "embed_dim": 32, "key": "class_label"},
    "schedule": LDM_SCHEDULE,
    "label_dropout": 0.1,
}
VQ_ARGS = ["--batch-size", "8", "--lr", "3e-3", "--warmup", "1", "--seed", "3", "--checkpoint-every", "2",
           "--log-every", "2"]


def _data(split="train", data_dir=None):
    rng = np.random.default_rng(0 if split == "train" else 1)
    n = 48 if split == "train" else 8
    y = rng.integers(0, 8, n).astype(np.int32)
    x = np.full((n, 8, 8, 1), -1.0, np.float32)
    for i in range(n):
        x[i, y[i], 1:7] = 1.0
    return np.clip(x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), -1, 1), y


def _vq_cfg(steps):
    return TrainConfig(steps=steps, batch_size=8, learning_rate=3e-3, warmup_steps=1, seed=3,
                       checkpoint_every=2, log_every=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The CLI with Fashion-MNIST and the shipped configs replaced by synthetic data and tiny networks."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jaxquant.data, "load_fashion_mnist", _data)
        mp.setattr(vq_mod, "FMNIST_VQ", TINY_VQ)
        mp.setattr(ldm_mod, "FMNIST_LDM", TINY_LDM)
        yield tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def vq_run(tiny):
    run = tiny / "vq"
    assert cli.main(["train", "vq", "--run-dir", str(run), "--steps", "6", *VQ_ARGS]) == 0
    return run, run / "model"


@pytest.fixture(scope="module")
def ldm_run(tiny, vq_run):
    run = tiny / "ldm"
    assert cli.main(["train", "ldm", "--run-dir", str(run), "--vq", str(vq_run[1]), "--steps", "2",
                     "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "2"]) == 0
    return run, run / "model"


def test_vq_steps_lower_the_loss_and_the_export_reconstructs(vq_run):
    run, out = vq_run
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["mse"] < log[0]["mse"]
    assert all(0 < r["usage"] <= 1 and np.isfinite(r["loss"]) for r in log)

    cfg, params, meta = load_vq(out)
    assert meta.architecture == "vq-autoencoder" and cfg == AutoencoderConfig.from_dict(TINY_VQ)
    rec = meta.extra["test_reconstruction"]
    assert rec["num_images"] == 8 and rec["psnr_db"] == pytest.approx(10 * np.log10(1 / rec["mse_01"]))
    x, _ = _data("test")
    untrained = reconstruction_metrics(cfg, init_vq_params(VQModel(cfg), _data()[0], 3), x)
    assert rec["mse_01"] < untrained["mse_01"]
    xr = VQModel(cfg).apply({"params": params}, jnp.asarray(x))
    assert xr.shape == x.shape and np.all(np.isfinite(np.asarray(xr)))
    assert meta.extra["training"]["steps"] == 6


def test_vq_resume_equals_uninterrupted_run(vq_run, tmp_path):
    _, full = vq_run
    run = tmp_path / "run"
    x, _ = _data()
    train_vq(run, x, _vq_cfg(4), TINY_VQ, test_images=_data("test")[0])  # "killed" at step 4
    resumed = train_vq(run, x, _vq_cfg(6), TINY_VQ, test_images=_data("test")[0])
    _, a = load_model_dir(full)
    _, b = load_model_dir(resumed)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    assert [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()] == [2, 4, 6]


def test_ldm_export_loads_and_runs(vq_run, ldm_run):
    _, vq_dir = vq_run
    _, out = ldm_run
    m = jaxquant.load(out)
    assert m.architecture == "ldm" and m.is_class_conditional
    assert m.network_config.unconditional_label == 10 and m.sample_shape == (4, 4, 3)
    assert m.schedule.beta_schedule == "scaled_linear" and m.meta.extra["training"]["steps"] == 2
    eps = m(np.zeros((3, 4, 4, 3)), [0, 500, 999], y=[0, 7, 10])
    assert eps.shape == (3, 4, 4, 3) and np.all(np.isfinite(np.asarray(eps)))
    images = m.decode(np.random.default_rng(0).standard_normal((2, 4, 4, 3)))
    assert images.shape == (2, 8, 8, 1) and np.all(np.isfinite(np.asarray(images)))

    # The first stage is the VQ as trained, and the scale factor is 1/std of the training latents.
    cfg, vq_params, _ = load_vq(vq_dir)
    for u, v in zip(jax.tree_util.tree_leaves(vq_params), jax.tree_util.tree_leaves(m.params["first_stage"])):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    x, _ = _data()
    z = encode_images(cfg, vq_params, x)
    assert m.network_config.scale_factor == pytest.approx(1 / z.std(), rel=1e-5)
    np.testing.assert_allclose(np.asarray(m.encode(x[:4])), z[:4] * m.network_config.scale_factor, rtol=1e-5, atol=1e-5)


def test_ldm_run_refuses_another_first_stage(vq_run, ldm_run, tmp_path):
    _, vq_dir = vq_run
    run, _ = ldm_run
    meta, params = load_model_dir(vq_dir)
    params["quantize"]["embedding"]["embedding"] = params["quantize"]["embedding"]["embedding"] + 1.0
    other = save_model_dir(tmp_path / "other_vq", meta, params)
    x, y = _data()
    with pytest.raises(JaxquantError, match="another first stage"):
        ldm_mod.train_ldm(run, x, y, other, TrainConfig(steps=2, batch_size=8), TINY_LDM)


def test_cli_errors(tiny, vq_run, capsys):
    assert cli.main(["train", "ldm", "--run-dir", str(tiny / "x")]) == 2
    assert "--vq VQ_MODEL_DIR" in capsys.readouterr().err
    assert cli.main(["train", "vq", "--run-dir", str(tiny / "x"), "--vq", str(vq_run[1])]) == 2
    assert cli.main(["train", "ldm", "--run-dir", str(tiny / "x"), "--vq", str(tiny)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_label_dropout_puts_the_unconditional_label_in():
    y = jnp.arange(20000) % 10
    out = np.asarray(drop_labels(jax.random.key(0), y, 0.1, 10))
    dropped = out == 10
    assert 0.09 < dropped.mean() < 0.11
    np.testing.assert_array_equal(out[~dropped], np.asarray(y)[~dropped])
    np.testing.assert_array_equal(np.asarray(drop_labels(jax.random.key(0), y, 0.0, 10)), np.asarray(y))
    assert np.all(np.asarray(drop_labels(jax.random.key(1), y, 1.0 - 1e-7, 10)) == 10)
    # Different keys drop different examples.
    assert not np.array_equal(out, np.asarray(drop_labels(jax.random.key(1), y, 0.1, 10)))


def test_shipped_configs_fit_the_size_budget_and_use_the_compvis_schedule():
    ae = AutoencoderConfig.from_dict(FMNIST_VQ)
    cfg = make_ldm_config(ae, 32 // ae.ddconfig.downsample_factor, 1.0, FMNIST_LDM)
    assert cfg.sample_size == 8 and cfg.decoded_size == 32 and cfg.unconditional_label == 10
    shapes = jax.eval_shape(LatentDiffusion(cfg).init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))["params"]
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(shapes))
    assert set(shapes) == {"unet", "first_stage", "cond_stage"}
    assert 4 * n < 25e6, f"{n} float32 parameters exceed 25 MB"
    compvis = pytest.importorskip("checkpoints_convert.compvis")
    assert compvis._schedule_from_params({"linear_start": 0.0015, "linear_end": 0.0195}) == LDM_SCHEDULE
