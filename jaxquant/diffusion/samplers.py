"""DDIM and DDPM samplers in pure jnp, matching diffusers' schedulers step for step.

The model enters as an epsilon predictor ``eps_fn(x, t) -> eps`` with ``x`` NHWC
float32 ``[B, H, W, C]`` and ``t`` int32 ``[B]``. A whole sampling run is one
:func:`jax.lax.scan` over the timesteps, so it is traced and compiled once.

Semantics that follow diffusers (and so may surprise):

* DDIM's "previous" timestep is always ``t - num_train_timesteps // num_steps``,
  whatever ``timestep_spacing`` says; with "linspace"/"trailing" spacing it need not be
  the next timestep the model is evaluated at (see :func:`previous_timesteps`).
* DDPM's previous timestep is the next entry of the schedule (``-1`` after the last),
  and noise is added at every step whose current timestep is ``> 0``. With
  ``steps_offset=1`` or "trailing" spacing the last timestep is positive, so the last
  step adds noise too (tiny for "fixed_small", ``sqrt(1 - alphas_cumprod[t])`` for
  "fixed_large").
* The returned sample is not clipped or rescaled; pipelines map it to images with
  ``clip(x / 2 + 0.5, 0, 1)``.

Randomness: :func:`sample` and the function built by :func:`make_sampler` split their
``key`` once; the first half draws the starting noise (:func:`initial_noise`), the
second the per-step noise (:func:`step_noise`, folded in with the step index).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.schedules import (
    ScheduleConfig,
    alphas_cumprod,
    check_num_steps,
    final_alpha_cumprod,
    sampling_timesteps,
)
from jaxquant.errors import ConfigError
from jaxquant import xla

__all__ = [
    "SAMPLERS",
    "ddim_step",
    "ddpm_step",
    "predict_x0",
    "previous_timesteps",
    "initial_noise",
    "step_noise",
    "sample",
    "make_sampler",
]

SAMPLERS = ("ddim", "ddpm")

ArrayLike = Any


def _check_cfg(cfg: Any) -> ScheduleConfig:
    if not isinstance(cfg, ScheduleConfig):
        raise ConfigError(f"expected a ScheduleConfig, got {type(cfg).__name__}")
    return cfg


def _check_sampler(sampler: Any, eta: Any) -> float:
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r} (known: {', '.join(SAMPLERS)})")
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise ConfigError(f"eta must be a number, got {eta!r}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ConfigError(f"eta = {eta} is out of range: it must be between 0 and 1")
    if sampler == "ddpm" and eta != 0.0:
        raise ConfigError(f"eta = {eta} applies only to the 'ddim' sampler; use eta = 0 with 'ddpm'")
    return eta


def _per_sample(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a scalar or ``[B]`` array to broadcast against a rank-``ndim`` batch."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _alphas(cfg: ScheduleConfig, t: ArrayLike, t_prev: ArrayLike, final: ArrayLike, ndim: int):
    ac = jnp.asarray(alphas_cumprod(cfg))
    t = _per_sample(jnp.asarray(t, jnp.int32), ndim)
    t_prev = _per_sample(jnp.asarray(t_prev, jnp.int32), ndim)
    a_t = ac[t]
    a_prev = jnp.where(t_prev >= 0, ac[jnp.maximum(t_prev, 0)], jnp.float32(final))
    return t, a_t, a_prev


def _predict_x0(cfg: ScheduleConfig, x: jax.Array, eps: jax.Array, a_t: jax.Array, b_t: jax.Array) -> jax.Array:
    x0 = (x - b_t**0.5 * eps) / a_t**0.5
    if cfg.clip_sample:
        r = jnp.float32(cfg.clip_sample_range)
        x0 = jnp.clip(x0, -r, r)
    return x0


def predict_x0(cfg: ScheduleConfig, x: ArrayLike, eps: ArrayLike, t: ArrayLike) -> jax.Array:
    """The clean sample ``x̂₀ = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t`` that a DDIM/DDPM step predicts.

    Clipped to ``±clip_sample_range`` when ``cfg.clip_sample``, exactly as inside
    :func:`ddim_step` and :func:`ddpm_step`.

    Args:
      cfg: the schedule.
      x: noisy sample ``x_t``, float32 ``[B, ...]``.
      eps: the model's epsilon prediction, same shape.
      t: timestep, an int scalar or ``[B]``.
    """
    cfg = _check_cfg(cfg)
    x = jnp.asarray(x, jnp.float32)
    a_t = jnp.asarray(alphas_cumprod(cfg))[_per_sample(jnp.asarray(t, jnp.int32), x.ndim)]
    return _predict_x0(cfg, x, jnp.asarray(eps, jnp.float32), a_t, 1.0 - a_t)


def ddim_step(
    cfg: ScheduleConfig,
    x: ArrayLike,
    eps: ArrayLike,
    t: ArrayLike,
    t_prev: ArrayLike,
    eta: ArrayLike = 0.0,
    noise: ArrayLike | None = None,
) -> jax.Array:
    """One DDIM update ``x_t -> x_{t_prev}``, as diffusers' ``DDIMScheduler.step``.

    Matches ``step(eps, t, x, eta=eta, use_clipped_model_output=False,
    variance_noise=noise)`` with the scheduler's ``num_inference_steps`` such that
    ``t_prev = t - num_train_timesteps // num_inference_steps``: x0 is predicted from
    epsilon, clipped when ``cfg.clip_sample``, and the "previous" cumulative alpha is
    ``final_alpha_cumprod(cfg)`` when ``t_prev < 0``.

    Args:
      cfg: the schedule.
      x: current sample, float32 ``[B, ...]``.
      eps: the model's epsilon prediction, same shape as ``x``.
      t, t_prev: current and previous timestep, int scalars or ``[B]`` arrays
        (``t_prev`` may be negative on the last step).
      eta: DDIM noise weight, 0 (deterministic) to 1 (DDPM-like).
      noise: standard normal noise shaped like ``x``; required for a stochastic step
        (``eta > 0``). When None no noise is added.

    Returns:
      The float32 sample at ``t_prev``.
    """
    cfg = _check_cfg(cfg)
    x = jnp.asarray(x, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    if noise is None and not isinstance(eta, jax.Array) and float(eta) != 0.0:
        raise ValueError("ddim_step with eta > 0 needs `noise` (standard normal, shaped like x)")
    _, a_t, a_prev = _alphas(cfg, t, t_prev, final_alpha_cumprod(cfg), x.ndim)
    b_t = 1.0 - a_t
    x0 = _predict_x0(cfg, x, eps, a_t, b_t)
    b_prev = 1.0 - a_prev
    variance = (b_prev / b_t) * (1.0 - a_t / a_prev)
    std = jnp.asarray(eta, jnp.float32) * variance**0.5
    direction = (1.0 - a_prev - std**2) ** 0.5 * eps
    x_prev = a_prev**0.5 * x0 + direction
    if noise is not None:
        x_prev = x_prev + std * jnp.asarray(noise, jnp.float32)
    return x_prev


def ddim_eps_coefficient(cfg: ScheduleConfig, t: ArrayLike, t_prev: ArrayLike) -> np.ndarray:
    """``∂x_{t_prev} / ∂ε`` of a deterministic DDIM step (:func:`ddim_step`, ``eta = 0``).

    ``√(1−ᾱ_prev) − √ᾱ_prev·√(1−ᾱ_t)/√ᾱ_t``, float64 and shaped like ``t``: an error
    ``δ`` in the model's ε moves the next sample by this times ``δ`` (exactly when x0 is
    not clipped). Negative, since ``ᾱ_prev > ᾱ_t``.
    """
    cfg = _check_cfg(cfg)
    ac = np.asarray(alphas_cumprod(cfg), np.float64)
    t = np.asarray(t, np.int64)
    t_prev = np.asarray(t_prev, np.int64)
    a_t = ac[t]
    a_prev = np.where(t_prev >= 0, ac[np.maximum(t_prev, 0)], float(final_alpha_cumprod(cfg)))
    return np.sqrt(1.0 - a_prev) - np.sqrt(a_prev * (1.0 - a_t) / a_t)


def ddpm_step(
    cfg: ScheduleConfig,
    x: ArrayLike,
    eps: ArrayLike,
    t: ArrayLike,
    t_prev: ArrayLike,
    noise: ArrayLike | None = None,
) -> jax.Array:
    """One ancestral DDPM update ``x_t -> x_{t_prev}``, as diffusers' ``DDPMScheduler.step``.

    ``t_prev`` is the next timestep of the (possibly strided) schedule, ``-1`` after
    the last one (diffusers' ``previous_timestep``); the step then uses the posterior
    of ``x_{t_prev}`` given x0 and ``x_t`` with ``1 - alphas_cumprod[t] /
    alphas_cumprod[t_prev]`` as the step's beta. The noise standard deviation is the
    posterior one (``variance_type="fixed_small"``, variance clamped to >= 1e-20) or
    ``sqrt(beta)`` ("fixed_large"); noise is added only where ``t > 0``.

    Args:
      cfg: the schedule.
      x: current sample, float32 ``[B, ...]``.
      eps: the model's epsilon prediction, same shape as ``x``.
      t, t_prev: current and previous timestep, int scalars or ``[B]`` arrays.
      noise: standard normal noise shaped like ``x``; None gives the posterior mean.

    Returns:
      The float32 sample at ``t_prev``.
    """
    cfg = _check_cfg(cfg)
    x = jnp.asarray(x, jnp.float32)
    eps = jnp.asarray(eps, jnp.float32)
    t, a_t, a_prev = _alphas(cfg, t, t_prev, 1.0, x.ndim)
    b_t = 1.0 - a_t
    b_prev = 1.0 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1.0 - cur_alpha
    x0 = _predict_x0(cfg, x, eps, a_t, b_t)
    c_x0 = (a_prev**0.5 * cur_beta) / b_t
    c_xt = cur_alpha**0.5 * b_prev / b_t
    x_prev = c_x0 * x0 + c_xt * x
    if noise is not None:
        if cfg.variance_type == "fixed_small":
            std = jnp.maximum(b_prev / b_t * cur_beta, jnp.float32(1e-20)) ** 0.5
        else:  # fixed_large
            std = cur_beta**0.5
        std = jnp.where(t > 0, std, jnp.float32(0.0))
        x_prev = x_prev + std * jnp.asarray(noise, jnp.float32)
    return x_prev


def previous_timesteps(cfg: ScheduleConfig, num_steps: int, sampler: str = "ddim") -> np.ndarray:
    """The ``t_prev`` diffusers pairs with each entry of :func:`sampling_timesteps`.

    DDIM: ``t - num_train_timesteps // num_steps`` (negative on the last step).
    DDPM: the next timestep of the schedule, ``-1`` after the last.
    """
    cfg = _check_cfg(cfg)
    _check_sampler(sampler, 0.0)
    ts = sampling_timesteps(cfg, num_steps)
    if sampler == "ddim":
        return ts - cfg.num_train_timesteps // int(num_steps)
    return np.concatenate([ts[1:], np.array([-1], dtype=ts.dtype)])


def _split(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    k_init, k_steps = jax.random.split(key)
    return k_init, k_steps


def initial_noise(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The starting noise ``x_T`` that :func:`sample` draws from ``key``."""
    return jax.random.normal(_split(key)[0], tuple(shape), jnp.float32)


def step_noise(key: jax.Array, step_index: ArrayLike, shape: Sequence[int]) -> jax.Array:
    """The noise :func:`sample` (run with ``key``) adds at step ``step_index`` (0-based)."""
    k = jax.random.fold_in(_split(key)[1], jnp.asarray(step_index, jnp.uint32))
    return jax.random.normal(k, tuple(shape), jnp.float32)


def _build_chain(cfg: ScheduleConfig, num_steps: Any, sampler: str, eta: Any):
    """Validate arguments and return ``run(eps_fn, x_T, key) -> x0`` (traceable)."""
    cfg = _check_cfg(cfg)
    eta = _check_sampler(sampler, eta)
    n = check_num_steps(cfg, num_steps)
    ts = sampling_timesteps(cfg, n)
    prevs = previous_timesteps(cfg, n, sampler)
    xs = (
        jnp.asarray(ts, jnp.int32),
        jnp.asarray(prevs, jnp.int32),
        jnp.arange(len(ts), dtype=jnp.int32),
    )
    stochastic = sampler == "ddpm" or eta > 0.0

    def run(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x_T: jax.Array, key: jax.Array) -> jax.Array:
        x_T = jnp.asarray(x_T, jnp.float32)
        batch = x_T.shape[0]

        def body(x, step):
            t, t_prev, i = step
            eps = eps_fn(x, jnp.full((batch,), t, jnp.int32)).astype(jnp.float32)
            noise = step_noise(key, i, x.shape) if stochastic else None
            if sampler == "ddim":
                x = ddim_step(cfg, x, eps, t, t_prev, eta, noise)
            else:
                x = ddpm_step(cfg, x, eps, t, t_prev, noise)
            return x, None

        x0, _ = jax.lax.scan(body, x_T, xs)
        return x0

    return run


def sample(
    eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
    cfg: ScheduleConfig,
    shape: Sequence[int],
    *,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    key: jax.Array,
    x_T: ArrayLike | None = None,
) -> jax.Array:
    """Run a full sampling chain and return the final sample (float32, unclipped).

    The loop over timesteps is a single :func:`jax.lax.scan`; ``sample`` may itself be
    called under :func:`jax.jit` (``shape``, ``num_steps``, ``sampler`` and ``eta``
    are then static).

    Args:
      eps_fn: ``eps_fn(x, t) -> eps`` with ``x`` float32 ``[B, H, W, C]``, ``t`` int32
        ``[B]``; close over the parameters (and any conditioning).
      cfg: the schedule.
      shape: shape of the sample, ``(B, H, W, C)``; must equal ``x_T.shape`` if given.
      num_steps: number of model evaluations, 1 to ``num_train_timesteps``.
      sampler: "ddim" or "ddpm".
      eta: DDIM noise weight in ``[0, 1]``; must be 0 for "ddpm".
      key: PRNG key; the start noise is :func:`initial_noise` and the per-step noise
        :func:`step_noise` of this key.
      x_T: optional starting sample (then ``key`` only drives the per-step noise).

    Raises:
      ConfigError: unknown sampler, bad ``num_steps`` or ``eta``, mismatched shape.
    """
    run = _build_chain(cfg, num_steps, sampler, eta)
    shape = tuple(int(s) for s in shape)
    if x_T is None:
        x_T = initial_noise(key, shape)
    elif tuple(jnp.shape(x_T)) != shape:
        raise ConfigError(f"x_T has shape {tuple(jnp.shape(x_T))} but shape = {shape}")
    return run(eps_fn, x_T, key)


def make_sampler(
    eps_apply: Callable[..., jax.Array],
    cfg: ScheduleConfig,
    num_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
) -> Callable[..., jax.Array]:
    """A jitted ``fn(params, x_T, key, *extra_args) -> x0`` for batch-after-batch use.

    ``eps_apply(params, x, t, *extra_args) -> eps`` is the model (``t`` int32 ``[B]``).
    The schedule, step count, sampler and eta are fixed here, so the function compiles
    once per input shape/dtype and is reused for every batch. ``fn(params,
    initial_noise(key, shape), key)`` equals ``sample(..., key=key)`` with the same
    model.

    Raises:
      ConfigError: unknown sampler, bad ``num_steps`` or ``eta``.
    """
    run = _build_chain(cfg, num_steps, sampler, eta)

    def fn(params: Any, x_T: jax.Array, key: jax.Array, *extra_args: Any) -> jax.Array:
        return run(lambda x, t: eps_apply(params, x, t, *extra_args), x_T, key)

    return xla.jit(fn)
