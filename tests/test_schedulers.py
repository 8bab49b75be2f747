"""Noise schedules and DDIM/DDPM samplers against diffusers' schedulers, step by step."""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.diffusion import (
    ScheduleConfig,
    alphas_cumprod,
    betas,
    ddim_step,
    ddpm_step,
    initial_noise,
    make_sampler,
    predict_x0,
    previous_timesteps,
    sample,
    sampling_timesteps,
    step_noise,
)
from jaxquant.errors import ConfigError

SHAPE = (2, 6, 6, 3)  # NHWC
TOL = 1e-5


def _diffusers():
    diffusers = pytest.importorskip("diffusers")
    torch = pytest.importorskip("torch")
    return diffusers, torch


# --- a fake, deterministic epsilon model, written identically for torch and jnp -----------
#
# eps(x, t) = k_t * x + 0.2 * tanh(c_t * x), where k_t * x is the exact noise prediction
# for data ~ N(0, 0.5^2) and the tanh term makes it nonlinear. A denoiser-like model
# keeps the unclipped chains at O(1) magnitude, so an absolute tolerance of 1e-5 is
# meaningful (a plain tanh(c_t * x) makes unclipped DDIM grow past 100, where one
# float32 ulp is already 7.6e-6).


def _fake_tables(T: int, ac: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = ac.astype(np.float64)
    k = np.sqrt(1.0 - a) / (0.25 * a + 1.0 - a)
    c = 0.5 + 1.5 * np.arange(T) / T
    return k.astype(np.float32), c.astype(np.float32)


def _eps_jnp(x: jax.Array, t: jax.Array, cfg: ScheduleConfig) -> jax.Array:
    k, c = _fake_tables(cfg.num_train_timesteps, alphas_cumprod(cfg))
    t = jnp.asarray(t, jnp.int32)
    k, c = jnp.asarray(k)[t], jnp.asarray(c)[t]
    if t.ndim:
        k = k.reshape(k.shape + (1,) * (x.ndim - 1))
        c = c.reshape(c.shape + (1,) * (x.ndim - 1))
    return x * k + jnp.float32(0.2) * jnp.tanh(x * c)


def _eps_torch(torch, x, t: int, sched):
    k, c = _fake_tables(sched.config.num_train_timesteps, sched.alphas_cumprod.numpy())
    return x * torch.tensor(k[t]) + torch.tensor(np.float32(0.2)) * torch.tanh(x * torch.tensor(c[t]))


def _nchw(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 3, 1, 2))


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1))


def _torch_chain(cfg, num_steps, sampler, x_T, noises, eta=0.0, monkeypatch=None):
    """Run diffusers' scheduler with the fake model; returns every intermediate (NHWC)."""
    diffusers, torch = _diffusers()
    cls = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
    sched = cls.from_config(cfg.to_dict())
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(_nchw(x_T))
    current = {}
    calls = []
    if sampler == "ddpm":

        def fake_randn(shape, generator=None, device=None, dtype=None, **_):
            calls.append(current["t"])
            assert tuple(shape) == tuple(current["noise"].shape)
            return current["noise"].to(dtype)

        monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, "randn_tensor", fake_randn)
    out = []
    for i, t in enumerate(sched.timesteps):
        eps = _eps_torch(torch, x, int(t), sched)
        noise = torch.from_numpy(_nchw(noises[i]))
        if sampler == "ddim":
            kw = {"variance_noise": noise} if eta > 0 else {}
            x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=False, **kw).prev_sample
        else:
            current.update(t=int(t), noise=noise)
            x = sched.step(eps, t, x).prev_sample
        out.append(_nhwc(x.numpy()))
    if sampler == "ddpm":  # diffusers draws noise exactly on the steps with t > 0
        assert calls == [int(t) for t in sched.timesteps if int(t) > 0]
    return out


def _jnp_chain(cfg, num_steps, sampler, x_T, noises, eta=0.0):
    ts = sampling_timesteps(cfg, num_steps)
    prevs = previous_timesteps(cfg, num_steps, sampler)
    x = jnp.asarray(x_T)
    out = []
    for i, (t, tp) in enumerate(zip(ts, prevs)):
        eps = _eps_jnp(x, jnp.full((x.shape[0],), t, jnp.int32), cfg)
        if sampler == "ddim":
            x = ddim_step(cfg, x, eps, int(t), int(tp), eta, noises[i] if eta > 0 else None)
        else:
            x = ddpm_step(cfg, x, eps, int(t), int(tp), noises[i])
        out.append(np.asarray(x))
    return out


def _random_inputs(seed, num_steps):
    rng = np.random.default_rng(seed)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((num_steps,) + SHAPE).astype(np.float32)
    return x_T, noises


def _assert_chains_close(ours, theirs):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert np.all(np.isfinite(a)), f"step {i}: non-finite values"
        err = float(np.max(np.abs(a - b)))
        assert err <= TOL, f"step {i}: max abs diff {err:.3g}"


# --- schedules ---------------------------------------------------------------------------

BETA_CASES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear", num_train_timesteps=4000, beta_start=2e-5, beta_end=0.03),
    dict(beta_schedule="scaled_linear", num_train_timesteps=37),
]


@pytest.mark.parametrize("kw", BETA_CASES, ids=lambda kw: f"{kw['beta_schedule']}")
def test_betas_and_alphas_cumprod_match_diffusers(kw):
    diffusers, _ = _diffusers()
    cfg = ScheduleConfig(**kw)
    ref = diffusers.DDPMScheduler(**kw)
    assert betas(cfg).dtype == np.float32 and alphas_cumprod(cfg).dtype == np.float32
    np.testing.assert_allclose(betas(cfg), ref.betas.numpy(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    # In fact the tables are reproduced bit for bit.
    np.testing.assert_array_equal(alphas_cumprod(cfg), ref.alphas_cumprod.numpy())
    np.testing.assert_array_equal(alphas_cumprod(cfg), diffusers.DDIMScheduler(**kw).alphas_cumprod.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_sampling_timesteps_match_diffusers(spacing, offset):
    diffusers, _ = _diffusers()
    cfg = ScheduleConfig(timestep_spacing=spacing, steps_offset=offset)
    for n in (1, 3, 10, 20, 50, 250, 999, 1000):
        for cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
            ref = cls(timestep_spacing=spacing, steps_offset=offset)
            ref.set_timesteps(n)
            expected = ref.timesteps.numpy()
            if spacing == "leading" and offset and expected[0] >= cfg.num_train_timesteps:
                # diffusers hands out timestep 1000 here and fails later when indexing.
                assert (n, int(expected[0])) == (1000, 1000)
                with pytest.raises(ConfigError, match="steps_offset"):
                    sampling_timesteps(cfg, n)
                continue
            ours = sampling_timesteps(cfg, n)
            assert ours.dtype == np.int64 and len(ours) == n
            np.testing.assert_array_equal(ours, expected, err_msg=f"{spacing} n={n} offset={offset}")


def test_trailing_drops_diffusers_spurious_last_timestep():
    diffusers, _ = _diffusers()
    ref = diffusers.DDPMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(61)
    expected = ref.timesteps.numpy()
    assert len(expected) == 62 and expected[-1] == -1  # the diffusers rounding artefact
    ours = sampling_timesteps(ScheduleConfig(timestep_spacing="trailing"), 61)
    np.testing.assert_array_equal(ours, expected[:61])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_previous_timesteps_match_diffusers(spacing):
    diffusers, _ = _diffusers()
    cfg = ScheduleConfig(timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    ref = diffusers.DDPMScheduler.from_config(cfg.to_dict())
    for n in (1, 7, 20):
        ref.set_timesteps(n)
        expected = [int(ref.previous_timestep(t)) for t in ref.timesteps]
        np.testing.assert_array_equal(previous_timesteps(cfg, n, "ddpm"), expected)
    np.testing.assert_array_equal(
        previous_timesteps(cfg, 20, "ddim"), sampling_timesteps(cfg, 20) - cfg.num_train_timesteps // 20
    )


# --- single steps and whole chains -------------------------------------------------------

LDM = dict(
    beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)
DDIM_CASES = [
    (dict(clip_sample=clip), n, eta) for clip in (True, False) for eta in (0.0, 0.5) for n in (10, 20)
] + [
    (dict(timestep_spacing="trailing"), 10, 0.5),
    (dict(timestep_spacing="linspace", clip_sample=False), 20, 0.0),
    (LDM, 10, 0.0),
    (LDM, 20, 0.5),
    (dict(beta_schedule="squaredcos_cap_v2"), 10, 1.0),
    (dict(clip_sample_range=2.0, set_alpha_to_one=False), 1, 0.5),
]
DDPM_CASES = [
    (dict(clip_sample=clip, variance_type=var), n)
    for clip in (True, False) for var in ("fixed_small", "fixed_large") for n in (10, 20)
] + [
    (dict(timestep_spacing="trailing", variance_type="fixed_large"), 10),  # noise on the last step
    (dict(steps_offset=1, variance_type="fixed_large", clip_sample=False), 20),
    (dict(timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"), 10),
    (LDM, 10),
    (dict(), 1),
]


@pytest.mark.parametrize("kw,n,eta", DDIM_CASES)
def test_ddim_chain_matches_diffusers(kw, n, eta):
    cfg = ScheduleConfig(**kw)
    x_T, noises = _random_inputs(1000 + n, n)
    theirs = _torch_chain(cfg, n, "ddim", x_T, noises, eta=eta)
    ours = _jnp_chain(cfg, n, "ddim", x_T, noises, eta=eta)
    _assert_chains_close(ours, theirs)


@pytest.mark.parametrize("kw,n", DDPM_CASES)
def test_ddpm_chain_matches_diffusers(kw, n, monkeypatch):
    cfg = ScheduleConfig(**kw)
    x_T, noises = _random_inputs(2000 + n, n)
    theirs = _torch_chain(cfg, n, "ddpm", x_T, noises, monkeypatch=monkeypatch)
    ours = _jnp_chain(cfg, n, "ddpm", x_T, noises)
    _assert_chains_close(ours, theirs)


def test_steps_accept_per_sample_timesteps():
    cfg = ScheduleConfig(clip_sample=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    t, tp = np.array([900, 40], np.int32), np.array([850, -1], np.int32)
    for step in (
        lambda t_, tp_: ddim_step(cfg, x, eps, t_, tp_, 0.3, noise),
        lambda t_, tp_: ddpm_step(cfg, x, eps, t_, tp_, noise),
    ):
        both = np.asarray(step(t, tp))
        for b in range(2):
            one = np.asarray(step(int(t[b]), int(tp[b])))[b]
            np.testing.assert_allclose(both[b], one, rtol=0, atol=1e-6)


def test_ddim_eps_coefficient_is_the_steps_derivative():
    """ddim_eps_coefficient is ∂ddim_step/∂ε (eta 0, no clipping), also on the last step
    (t_prev < 0: the final alpha) and per sample."""
    from jaxquant.diffusion.samplers import ddim_eps_coefficient

    cfg = ScheduleConfig(clip_sample=False)
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    t, tp = np.array([999, 500, 40], np.int32), np.array([949, 450, -1], np.int32)
    got = ddim_eps_coefficient(cfg, t, tp)
    for k in range(3):
        d = jax.jvp(lambda e: ddim_step(cfg, x, e, int(t[k]), int(tp[k])), (jnp.zeros(SHAPE),),
                    (jnp.ones(SHAPE),))[1]
        np.testing.assert_allclose(np.asarray(d), got[k], rtol=1e-4)
    assert np.all(got < 0) and got.shape == (3,)


@pytest.mark.parametrize("clip", [True, False])
def test_predict_x0_matches_diffusers_pred_original_sample(clip):
    """``predict_x0`` is the ``pred_original_sample`` of diffusers' DDIM step (clipped alike),
    per sample when ``t`` is ``[B]``."""
    diffusers, torch = _diffusers()
    cfg = ScheduleConfig(clip_sample=clip, clip_sample_range=1.5)
    sched = diffusers.DDIMScheduler.from_config(cfg.to_dict())
    sched.set_timesteps(10)
    rng = np.random.default_rng(3)
    x = (2 * rng.standard_normal(SHAPE)).astype(np.float32)
    eps = rng.standard_normal(SHAPE).astype(np.float32)
    t = np.array([901, 1], np.int32)
    got = np.asarray(predict_x0(cfg, x, eps, t))
    for b in range(2):
        want = sched.step(torch.from_numpy(_nchw(eps[b:b + 1])), int(t[b]), torch.from_numpy(_nchw(x[b:b + 1])),
                          eta=0.0).pred_original_sample
        np.testing.assert_allclose(got[b:b + 1], _nhwc(want.numpy()), rtol=1e-5, atol=1e-5)
    assert (np.abs(got).max() <= 1.5) == clip


# --- the scanned sampler ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,n,sampler,eta",
    [
        (dict(), 10, "ddim", 0.0),
        (dict(clip_sample=False), 20, "ddim", 0.5),
        (dict(variance_type="fixed_large"), 10, "ddpm", 0.0),
        (dict(steps_offset=1, clip_sample=False), 20, "ddpm", 0.0),
    ],
)
def test_sample_matches_step_loop_and_diffusers(kw, n, sampler, eta, monkeypatch):
    cfg = ScheduleConfig(**kw)
    key = jax.random.PRNGKey(7)
    got = np.asarray(sample(lambda x, t: _eps_jnp(x, t, cfg), cfg, SHAPE, num_steps=n, sampler=sampler, eta=eta, key=key))
    assert got.dtype == np.float32 and got.shape == SHAPE
    x_T = np.asarray(initial_noise(key, SHAPE))
    noises = np.stack([np.asarray(step_noise(key, i, SHAPE)) for i in range(n)])
    loop = _jnp_chain(cfg, n, sampler, x_T, noises, eta=eta)
    np.testing.assert_allclose(got, loop[-1], rtol=0, atol=TOL)
    # An explicit x_T replaces the drawn start noise; the key still drives the step noise.
    again = sample(
        lambda x, t: _eps_jnp(x, t, cfg), cfg, SHAPE, num_steps=n, sampler=sampler, eta=eta, key=key, x_T=x_T
    )
    np.testing.assert_array_equal(np.asarray(again), got)
    if importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("torch") is not None:
        theirs = _torch_chain(cfg, n, sampler, x_T, noises, eta=eta, monkeypatch=monkeypatch)
        np.testing.assert_allclose(got, theirs[-1], rtol=0, atol=TOL)


def test_make_sampler_compiles_once_and_matches_sample():
    cfg = ScheduleConfig(clip_sample=False)

    def eps_apply(params, x, t, scale):
        return _eps_jnp(x, t, cfg) * params["w"] * scale

    fn = make_sampler(eps_apply, cfg, 10, "ddim", 0.5)
    params = {"w": jnp.float32(0.9)}
    for seed in (1, 2, 3):
        key = jax.random.PRNGKey(seed)
        x_T = initial_noise(key, SHAPE)
        got = fn(params, x_T, key, jnp.float32(1.1))
        ref = sample(
            lambda x, t: eps_apply(params, x, t, jnp.float32(1.1)), cfg, SHAPE, num_steps=10, eta=0.5, key=key
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=0, atol=1e-6)
        params = {"w": params["w"] + 0.01}
    if hasattr(fn, "_cache_size"):
        assert fn._cache_size() == 1


def test_sample_is_deterministic_in_key():
    cfg = ScheduleConfig()
    eps_fn = lambda x, t: _eps_jnp(x, t, cfg)  # noqa: E731
    a = sample(eps_fn, cfg, SHAPE, num_steps=5, sampler="ddpm", key=jax.random.PRNGKey(3))
    b = sample(eps_fn, cfg, SHAPE, num_steps=5, sampler="ddpm", key=jax.random.PRNGKey(3))
    c = sample(eps_fn, cfg, SHAPE, num_steps=5, sampler="ddpm", key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.max(np.abs(np.asarray(a) - np.asarray(c))) > 1e-3


# --- configs and errors --------------------------------------------------------------------


def test_from_dict_accepts_diffusers_configs_and_round_trips():
    # Shaped like google/ddpm-cifar10-32's scheduler_config.json.
    hub_like = {
        "_class_name": "DDPMScheduler", "_diffusers_version": "0.1.1", "beta_end": 0.02,
        "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True,
        "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small",
    }
    assert ScheduleConfig.from_dict(hub_like) == ScheduleConfig()
    assert ScheduleConfig.from_dict(ScheduleConfig(**LDM).to_dict()) == ScheduleConfig(**LDM)
    diffusers, _ = _diffusers()
    for cls, kw in ((diffusers.DDPMScheduler, dict(variance_type="fixed_large")), (diffusers.DDIMScheduler, LDM)):
        cfg = ScheduleConfig.from_dict(dict(cls(**kw).config))
        assert cfg == ScheduleConfig(**kw)
        assert ScheduleConfig.from_dict(cfg.to_dict()) == cfg
        assert hash(cfg) == hash(ScheduleConfig.from_dict(cfg.to_dict()))


@pytest.mark.parametrize(
    "d,field",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type"),
        ({"prediction_type": "sample"}, "prediction_type"),
        ({"thresholding": True}, "thresholding"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"skip_prk_steps": True}, "skip_prk_steps"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ],
)
def test_bad_config_raises_naming_field(d, field):
    with pytest.raises(ConfigError, match=field):
        ScheduleConfig.from_dict(d)


def test_bad_prediction_type_in_constructor():
    with pytest.raises(ConfigError, match="prediction_type"):
        ScheduleConfig(prediction_type="v_prediction")


@pytest.mark.parametrize("n", [0, -3, 1001, 2.5, None])
def test_bad_num_steps_raise(n):
    cfg = ScheduleConfig()
    eps_fn = lambda x, t: x  # noqa: E731
    with pytest.raises(ConfigError, match="num_steps"):
        sampling_timesteps(cfg, n)
    with pytest.raises(ConfigError, match="num_steps"):
        sample(eps_fn, cfg, SHAPE, num_steps=n, key=jax.random.PRNGKey(0))
    with pytest.raises(ConfigError, match="num_steps"):
        make_sampler(lambda p, x, t: x, cfg, n)


def test_bad_sampler_and_eta_raise():
    cfg = ScheduleConfig()
    eps_fn = lambda x, t: x  # noqa: E731
    key = jax.random.PRNGKey(0)
    with pytest.raises(ConfigError, match="sampler"):
        sample(eps_fn, cfg, SHAPE, num_steps=10, sampler="euler", key=key)
    with pytest.raises(ConfigError, match="sampler"):
        make_sampler(lambda p, x, t: x, cfg, 10, "pndm")
    with pytest.raises(ConfigError, match="eta"):
        sample(eps_fn, cfg, SHAPE, num_steps=10, sampler="ddpm", eta=0.5, key=key)
    with pytest.raises(ConfigError, match="eta"):
        sample(eps_fn, cfg, SHAPE, num_steps=10, sampler="ddim", eta=-0.1, key=key)
    with pytest.raises(ConfigError, match="shape"):
        sample(eps_fn, cfg, SHAPE, num_steps=10, key=key, x_T=np.zeros((1, 2, 2, 3), np.float32))
