"""Classifier-free guidance: one batched call, CompVis' mixing formula, sampler compatibility."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.diffusion import ScheduleConfig, guided_eps, initial_noise, make_sampler
from jaxquant.errors import ConfigError

NULL = 1000


def toy_eps(params, x, t, y):
    """A label- and time-dependent stand-in for a class-conditional UNet."""
    return params["w"] * x + jnp.sin(y.astype(jnp.float32))[:, None, None, None] + 1e-3 * t[:, None, None, None]


def test_guided_eps_formula_and_single_call():
    calls = []

    def counting(params, x, t, y):
        calls.append(x.shape[0])
        return toy_eps(params, x, t, y)

    params = {"w": jnp.float32(0.5)}
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t = jnp.array([5, 500, 999])
    y = jnp.array([1, 7, 999])
    s = 7.5
    out = guided_eps(counting, s, NULL)(params, x, t, y)
    assert calls == [6]  # one call on the stacked batch
    eps_c = toy_eps(params, x, t, y)
    eps_u = toy_eps(params, x, t, jnp.full_like(y, NULL))
    np.testing.assert_allclose(out, eps_u + s * (eps_c - eps_u), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guided_eps(toy_eps, 1.0, NULL)(params, x, t, y), eps_c, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(guided_eps(toy_eps, 0.0, NULL)(params, x, t, y), eps_u, rtol=1e-6, atol=1e-6)


def test_guided_eps_in_sampler():
    cfg = ScheduleConfig(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)
    params = {"w": jnp.float32(0.1)}
    key = jax.random.key(1)
    x_T = initial_noise(key, (2, 4, 4, 3))
    labels = jnp.array([3, 999])
    run = make_sampler(guided_eps(toy_eps, 3.0, NULL), cfg, 5, "ddim")
    out = run(params, x_T, key, labels)
    assert out.shape == x_T.shape and bool(jnp.isfinite(out).all())
    other = run(params, x_T, key, jnp.array([4, 999]))
    assert not np.allclose(out[0], other[0]) and np.allclose(out[1], other[1])


@pytest.mark.parametrize("bad", [-1, 1.5, True, None])
def test_guided_eps_rejects_bad_null_label(bad):
    with pytest.raises(ConfigError, match="null_label"):
        guided_eps(toy_eps, 2.0, bad)
