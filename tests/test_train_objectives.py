"""The training objectives, checked by value against reference code and written-out formulas.

- ``diffusion_loss`` (DDPM ε objective): the noised input against diffusers'
  ``DDPMScheduler.add_noise`` on the same ``x0``, noise and timesteps; the loss against
  the MSE written out; the timesteps and noise drawn as the objective says.
- ``ldm_loss``: the labels reach the network through ``drop_labels``.
- ``ema_update``: against CompVis' ``LitEma`` (``ldm/modules/ema.py``).
- ``vq_loss``: against taming's ``VectorQuantizer2`` loss written out in numpy (nearest
  entry, β-weighted commitment, the decoder fed the quantized latents), and its gradients'
  stop-gradient structure.
- ``reconstruction_metrics``: against a direct ``decode(encode(x))`` of every image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.diffusion import ScheduleConfig
from jaxquant.diffusion.schedules import alphas_cumprod
from jaxquant.models.autoencoder import AutoencoderConfig, VQModel
from jaxquant.train.ddpm import diffusion_loss
from jaxquant.train.ldm import ldm_loss
from jaxquant.train.loop import ema_update
from jaxquant.train.vq import VQLossConfig, init_vq_params, reconstruction_metrics, vq_loss


class _Recorder:
    """A stand-in network for the objectives: records its inputs, returns ``a·x_t + b``."""

    def __init__(self, a: float = 0.5, b: float = 0.1, config=None):
        self.a, self.b, self.config, self.seen = a, b, config, {}

    def apply(self, variables, xt, t, y=None, train=False, rngs=None):
        self.seen = {"xt": np.asarray(xt), "t": np.asarray(t), "y": None if y is None else np.asarray(y)}
        return self.a * xt + self.b


def _diffusers_alphas_cumprod(num_train_timesteps: int) -> np.ndarray:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=1e-4, beta_end=0.02,
                                    beta_schedule="linear")
    return sched, sched.alphas_cumprod.numpy().astype(np.float64)


def test_diffusion_loss_noises_as_diffusers_and_is_the_eps_mse():
    torch = pytest.importorskip("torch")
    T = 1000
    sched, ab_ref = _diffusers_alphas_cumprod(T)
    net = _Recorder()
    loss_fn = diffusion_loss(net, jnp.asarray(alphas_cumprod(ScheduleConfig(num_train_timesteps=T))), T, False)
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (512, 4, 4, 1)).astype(np.float32)
    key = jax.random.key(7)

    loss, _ = loss_fn({}, {"x": jnp.asarray(x0)}, key)
    t, xt = net.seen["t"], net.seen["xt"].astype(np.float64)
    # Same key, shifted x0: t and the noise are the same draws, so x_t moves by √ᾱ_t·δ.
    loss_fn({}, {"x": jnp.asarray(x0 + 0.25)}, key)
    np.testing.assert_array_equal(net.seen["t"], t)
    sqrt_ab = (net.seen["xt"].astype(np.float64) - xt) / 0.25
    np.testing.assert_allclose(sqrt_ab, np.broadcast_to(np.sqrt(ab_ref[t])[:, None, None, None], xt.shape),
                               rtol=2e-5, atol=1e-5)

    # The noise it drew, and x_t from diffusers' add_noise with that noise.
    noise = (xt - np.sqrt(ab_ref[t])[:, None, None, None] * x0) / np.sqrt(1 - ab_ref[t])[:, None, None, None]
    ref_xt = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise.astype(np.float32)),
                             torch.from_numpy(t.astype(np.int64))).numpy()
    np.testing.assert_allclose(xt, ref_xt, rtol=1e-5, atol=1e-5)
    # The ε objective: mean squared difference of the prediction and the noise.
    ref_loss = np.mean((net.a * xt + net.b - noise) ** 2)
    assert float(loss) == pytest.approx(ref_loss, rel=1e-4)

    # The draws: t uniform on [0, T), noise standard normal and independent of x0.
    assert 0 <= t.min() and t.max() < T and len(np.unique(t)) > 350
    assert abs(t.mean() - (T - 1) / 2) < 4 * T / np.sqrt(12 * len(t))
    n = noise.size
    assert abs(noise.mean()) < 4 / np.sqrt(n) and abs(noise.std() - 1) < 4 / np.sqrt(2 * n)
    assert abs(np.corrcoef(noise.ravel(), x0.ravel())[0, 1]) < 4 / np.sqrt(n)
    # Another key draws other timesteps and noise.
    loss_fn({}, {"x": jnp.asarray(x0)}, jax.random.key(8))
    assert not np.array_equal(net.seen["t"], t)


def test_diffusion_loss_drops_labels_to_the_null_label():
    T = 100
    net = _Recorder()
    ab = jnp.asarray(alphas_cumprod(ScheduleConfig(num_train_timesteps=T)))
    y = np.arange(4000) % 10
    batch = {"x": jnp.zeros((4000, 1, 1, 1)), "y": jnp.asarray(y)}
    diffusion_loss(net, ab, T, True, label_dropout=0.2, null_label=10)({}, batch, jax.random.key(0))
    seen = net.seen["y"]
    dropped = seen == 10
    assert abs(dropped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / len(y))
    np.testing.assert_array_equal(seen[~dropped], y[~dropped])
    diffusion_loss(net, ab, T, True)({}, batch, jax.random.key(0))
    np.testing.assert_array_equal(net.seen["y"], y)
    diffusion_loss(net, ab, T, False)({}, batch, jax.random.key(0))
    assert net.seen["y"] is None


def test_ldm_loss_is_the_eps_objective_after_label_dropout():
    from types import SimpleNamespace

    sched = ScheduleConfig(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear")
    net = _Recorder(config=SimpleNamespace(unconditional_label=10))
    y = np.arange(4000) % 10
    x0 = np.random.default_rng(1).standard_normal((4000, 1, 1, 2)).astype(np.float32)
    loss, _ = ldm_loss(net, sched, 0.1)({}, {"x": jnp.asarray(x0), "y": jnp.asarray(y)}, jax.random.key(3))
    seen = net.seen["y"]
    dropped = seen == 10
    assert abs(dropped.mean() - 0.1) < 4 * np.sqrt(0.1 * 0.9 / len(y))
    np.testing.assert_array_equal(seen[~dropped], y[~dropped])
    # The ε loss on the scaled_linear (CompVis) table: recover the noise from x_t, as above.
    ab = np.asarray(alphas_cumprod(sched), np.float64)[net.seen["t"]][:, None, None, None]
    xt = net.seen["xt"].astype(np.float64)
    noise = (xt - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    assert float(loss) == pytest.approx(np.mean((net.a * xt + net.b - noise) ** 2), rel=1e-4)


def test_ema_update_is_litema_with_step_counting_updates_before_this_one():
    """``ema_update(…, step=s)`` is LitEma's update number ``s`` (LitEma counts from 1).

    ``step`` is the number of optimiser steps already taken, so the first update (step 0)
    has decay 1/10 where LitEma's first has 2/11: the same warm-up, one update earlier.
    """
    torch = pytest.importorskip("torch")
    ema_mod = pytest.importorskip("ldm.modules.ema")
    decay = 0.9
    model = torch.nn.Linear(3, 2)
    lit = ema_mod.LitEma(model, decay=decay)
    params = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    ema = {k: jnp.asarray(v) for k, v in params.items()}
    rng = np.random.default_rng(0)
    # LitEma's update number s (its num_updates after the call) is ema_update's step s.
    for step in range(1, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.from_numpy(rng.standard_normal(p.shape).astype(np.float32)))
        lit(model)
        params = {k: jnp.asarray(v.detach().numpy()) for k, v in model.named_parameters()}
        ema = ema_update(ema, params, jnp.asarray(step), decay)
        shadow = dict(lit.named_buffers())
        for name, s_name in lit.m_name2s_name.items():
            np.testing.assert_allclose(np.asarray(ema[name]), shadow[s_name].numpy(), rtol=1e-5, atol=1e-6)
    # The warm-up at step 0 (1/10) and the cap (decay, reached here after 80 steps).
    e0, p = jnp.zeros(()), jnp.ones(())
    assert float(ema_update(e0, p, jnp.asarray(0), 0.999)) == pytest.approx(1 - 1 / 10)
    assert float(ema_update(e0, p, jnp.asarray(10_000), 0.9)) == pytest.approx(0.1)


TINY_VQ = {"kind": "vq", "embed_dim": 3, "n_embed": 8, "ddconfig": {
    "double_z": False, "z_channels": 3, "resolution": 8, "in_channels": 1, "out_ch": 1, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "attn_type": "none", "dropout": 0.0}}


@pytest.fixture(scope="module")
def vq():
    cfg = AutoencoderConfig.from_dict(TINY_VQ)
    module = VQModel(cfg)
    x = np.clip(np.random.default_rng(0).standard_normal((6, 8, 8, 1)) * 0.6, -1, 1).astype(np.float32)
    params = init_vq_params(module, x, seed=0, init_images=4)
    # Move the codebook off the encoder outputs it was seeded with, and two entries far
    # away, so that some entries go unused (the dead-code term).
    e = np.asarray(params["quantize"]["embedding"]["embedding"])
    e = e + np.random.default_rng(1).standard_normal(e.shape).astype(np.float32) * 0.3
    e[:2] += 10.0
    params["quantize"]["embedding"]["embedding"] = jnp.asarray(e)
    return cfg, module, params, x


def _taming_vq_loss(module, params, x, cfg: VQLossConfig) -> dict:
    """taming's VectorQuantizer2 + CompVis' pixel loss, written out in numpy (float64)."""
    z = np.asarray(module.apply({"params": params}, jnp.asarray(x), method=VQModel.encode), np.float64)
    e = np.asarray(params["quantize"]["embedding"]["embedding"], np.float64)
    zf = z.reshape(-1, e.shape[1])
    d = ((zf[:, None, :] - e[None]) ** 2).sum(-1)
    idx = d.argmin(1)
    zq = e[idx]
    # VectorQuantizer2 (legacy): β·‖sg(z_q) − z‖² + ‖z_q − sg(z)‖²; both are the same number forward.
    codebook = np.mean((zq - zf) ** 2)
    xr = np.asarray(module.apply({"params": params}, jnp.asarray(zq.reshape(z.shape), jnp.float32), True,
                                 method=VQModel.decode), np.float64)
    rec = np.mean(np.abs(xr - x)) if cfg.reconstruction == "l1" else np.mean((xr - x) ** 2)
    counts = np.bincount(idx, minlength=len(e))
    dead = counts == 0
    dead_term = d.min(0)[dead].sum() / len(e)
    p = counts[counts > 0] / len(idx)
    return {"loss": rec + cfg.codebook_weight * (1 + cfg.beta) * codebook + cfg.dead_code_weight * dead_term,
            "rec": rec, "codebook": codebook, "commit": codebook, "dead": dead_term, "usage": 1 - dead.mean(),
            "perplexity": np.exp(-(p * np.log(p)).sum()), "mse": np.mean((xr - x) ** 2), "idx": idx}


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_vq_loss_is_taming_vector_quantizer_loss(vq, reconstruction):
    _, module, params, x = vq
    cfg = VQLossConfig(beta=0.25, reconstruction=reconstruction, codebook_weight=0.7, dead_code_weight=0.5)
    loss, metrics = vq_loss(module, cfg)(params, {"x": jnp.asarray(x)}, jax.random.key(0))
    ref = _taming_vq_loss(module, params, x, cfg)
    assert 0 < ref["usage"] < 1 and ref["dead"] > 0  # every term is exercised
    assert float(loss) == pytest.approx(ref["loss"], rel=1e-5)
    for name in ("rec", "mse", "codebook", "commit", "dead", "usage", "perplexity"):
        assert float(metrics[name]) == pytest.approx(ref[name], rel=1e-5, abs=1e-9), name


def test_vq_loss_gradients_follow_the_straight_through_estimator(vq):
    """Pixel loss → decoder and encoder (gradient copied past the quantizer), never the
    codebook; codebook term → codebook only; commitment term → encoder only."""
    _, module, params, x = vq
    batch = {"x": jnp.asarray(x)}

    def grads(codebook_weight, beta):
        cfg = VQLossConfig(beta=beta, codebook_weight=codebook_weight, dead_code_weight=0.0)
        return jax.grad(lambda p: vq_loss(module, cfg)(p, batch, jax.random.key(0))[0])(params)

    def norms(tree):
        return {k: float(sum(jnp.sum(jnp.square(v)) for v in jax.tree_util.tree_leaves(tree[k])))
                for k in ("encoder", "decoder", "quantize")}

    def diff(a, b):
        return jax.tree_util.tree_map(lambda u, v: v - u, a, b)

    g_rec = grads(0.0, 0.0)
    g_book = grads(1.0, 0.0)
    g_both = grads(1.0, 1.0)
    rec, book, commit = norms(g_rec), norms(diff(g_rec, g_book)), norms(diff(g_book, g_both))
    assert rec["encoder"] > 0 and rec["decoder"] > 0 and rec["quantize"] == 0.0
    assert book["quantize"] > 0 and book["decoder"] <= 1e-12 * rec["decoder"] and book["encoder"] <= 1e-12 * rec["encoder"]
    assert commit["encoder"] > 0 and commit["decoder"] <= 1e-12 * rec["decoder"] and commit["quantize"] == 0.0
    # The codebook gradient is that of ‖z_q − sg(z)‖²: 2 (e_k − z) summed over the latents that chose e_k.
    z = np.asarray(module.apply({"params": params}, batch["x"], method=VQModel.encode), np.float64)
    e = np.asarray(params["quantize"]["embedding"]["embedding"], np.float64)
    zf = z.reshape(-1, e.shape[1])
    idx = ((zf[:, None, :] - e[None]) ** 2).sum(-1).argmin(1)
    ref = np.zeros_like(e)
    np.add.at(ref, idx, 2 * (e[idx] - zf) / zf.size)
    got = np.asarray(g_book["quantize"]["embedding"]["embedding"]) - np.asarray(g_rec["quantize"]["embedding"]["embedding"])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-7)


def test_reconstruction_metrics_are_those_of_decode_encode(vq):
    cfg, module, params, x = vq
    m = reconstruction_metrics(cfg, params, x, batch_size=4)  # a padded last batch
    xr = np.clip(np.asarray(module.apply({"params": params}, jnp.asarray(x)), np.float64), -1, 1)
    mse = np.mean((xr - x) ** 2)
    assert m["num_images"] == len(x)
    assert m["mse_pm1"] == pytest.approx(mse, rel=1e-5)
    assert m["mse_01"] == pytest.approx(np.mean(((xr + 1) / 2 - (x + 1) / 2) ** 2), rel=1e-5)
    assert m["psnr_db"] == pytest.approx(10 * np.log10(1 / m["mse_01"]), rel=1e-9)
    assert m["l1_pm1"] == pytest.approx(np.mean(np.abs(xr - x)), rel=1e-5)
    idx = _taming_vq_loss(module, params, x, VQLossConfig())["idx"]
    counts = np.bincount(idx, minlength=cfg.n_embed)
    p = counts[counts > 0] / counts.sum()
    assert m["codebook_usage"] == pytest.approx((counts > 0).mean())
    assert m["codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
