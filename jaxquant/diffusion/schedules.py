"""Noise schedules: beta tables, cumulative alpha products and inference timesteps.

Everything here reproduces what diffusers' ``DDPMScheduler`` / ``DDIMScheduler``
compute, bit for bit:

* betas are built in float32 the way ``torch.linspace`` builds them on CPU (step
  computed in float32, each value formed with one fused multiply-add, the second half
  counted back from the end point), or, for ``squaredcos_cap_v2``, in float64 Python
  arithmetic and rounded once to float32;
* ``alphas_cumprod`` is a running product accumulated in float64 and rounded to
  float32 element by element, which is what ``torch.cumprod`` does on CPU for float32
  input;
* inference timesteps follow ``set_timesteps`` for the "leading", "trailing" and
  "linspace" spacings.

These tables are plain NumPy (they are constants of a sampling run); the samplers in
:mod:`jaxquant.diffusion.samplers` turn them into jnp constants.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from jaxquant.errors import ConfigError

__all__ = [
    "ScheduleConfig",
    "betas",
    "alphas_cumprod",
    "final_alpha_cumprod",
    "sampling_timesteps",
    "check_num_steps",
    "BETA_SCHEDULES",
    "TIMESTEP_SPACINGS",
    "VARIANCE_TYPES",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
PREDICTION_TYPES = ("epsilon",)

# diffusers config keys that do not change DDPM/DDIM sampling as long as they hold the
# value given here; any other value is a feature we do not implement.
_IGNORED_IF_DEFAULT: dict[str, Any] = {
    "trained_betas": None,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
}
# Keys read only by features rejected above (dynamic thresholding): any value is fine.
_IGNORED_ALWAYS = frozenset({"dynamic_thresholding_ratio", "sample_max_value"})


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class ScheduleConfig:
    """The part of a diffusers DDPM/DDIM scheduler config that affects sampling.

    Field names and defaults are those of diffusers' ``DDPMScheduler`` /
    ``DDIMScheduler``. ``variance_type`` is read only by the DDPM sampler and
    ``set_alpha_to_one`` only by the DDIM sampler, as in diffusers.

    Attributes:
      num_train_timesteps: length of the training noise chain ``T``.
      beta_start, beta_end: end points of the "linear" / "scaled_linear" schedules.
      beta_schedule: "linear", "scaled_linear" (linspace of square roots, squared) or
        "squaredcos_cap_v2" (Nichol & Dhariwal cosine schedule, betas capped at 0.999).
      clip_sample: clip the predicted x0 to ``[-clip_sample_range, clip_sample_range]``
        at every step.
      clip_sample_range: the clipping bound.
      set_alpha_to_one: DDIM only; at the last step the "previous" cumulative alpha is
        1 when True, ``alphas_cumprod[0]`` when False.
      steps_offset: added to the "leading" inference timesteps.
      timestep_spacing: "leading", "trailing" or "linspace".
      variance_type: DDPM only; "fixed_small" (posterior variance) or "fixed_large"
        (beta_t).
      prediction_type: only "epsilon" is supported.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ConfigError:
            return ConfigError(
                f"scheduler config field {name!r} = {getattr(self, name)!r} is not supported: expected {expected}"
            )

        if not _is_int(self.num_train_timesteps) or self.num_train_timesteps < 1:
            raise bad("num_train_timesteps", "a positive integer")
        for name in ("beta_start", "beta_end"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(float(v)) or float(v) < 0:
                raise bad(name, "a non-negative number")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise bad("beta_schedule", f"one of {', '.join(BETA_SCHEDULES)}")
        for name in ("clip_sample", "set_alpha_to_one"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise bad(name, "true or false")
        if not _is_real(self.clip_sample_range) or not float(self.clip_sample_range) > 0:
            raise bad("clip_sample_range", "a positive number")
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            raise bad("steps_offset", "a non-negative integer")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise bad("timestep_spacing", f"one of {', '.join(TIMESTEP_SPACINGS)}")
        if self.variance_type not in VARIANCE_TYPES:
            raise bad("variance_type", f"one of {', '.join(VARIANCE_TYPES)}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise bad("prediction_type", "'epsilon' (the only prediction type implemented)")
        # Normalise numeric types so equal configs hash equal and round-trip through JSON.
        for name, typ in (
            ("num_train_timesteps", int),
            ("beta_start", float),
            ("beta_end", float),
            ("clip_sample", bool),
            ("clip_sample_range", float),
            ("set_alpha_to_one", bool),
            ("steps_offset", int),
        ):
            object.__setattr__(self, name, typ(getattr(self, name)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ScheduleConfig":
        """Build from a diffusers ``scheduler_config.json`` dict (DDPM or DDIM).

        Keys starting with ``_`` (``_class_name``, ``_diffusers_version``) are
        ignored, as are keys that do not change sampling at their default value
        (``trained_betas=None``, ``thresholding=False``, ``rescale_betas_zero_snr=False``)
        and the dynamic-thresholding parameters. Any other key, or one of those keys
        with a value we do not implement, raises :class:`ConfigError` naming it.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"scheduler config must be a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if not isinstance(key, str):
                raise ConfigError(f"scheduler config has a non-string key {key!r}")
            if key.startswith("_") or key in _IGNORED_ALWAYS:
                continue
            if key in _IGNORED_IF_DEFAULT:
                default = _IGNORED_IF_DEFAULT[key]
                if value is default or value == default and type(value) is type(default):
                    continue
                raise ConfigError(
                    f"scheduler config field {key!r} = {value!r} is not supported "
                    f"(only {default!r} is implemented)"
                )
            if key not in fields:
                raise ConfigError(
                    f"unknown scheduler config field {key!r} (known: {', '.join(sorted(fields))})"
                )
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict; ``from_dict(to_dict())`` gives back ``self``.

        The dict is also accepted by diffusers' ``DDPMScheduler.from_config`` /
        ``DDIMScheduler.from_config`` (which ignore the keys the other one uses).
        """
        return dataclasses.asdict(self)


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` as torch computes it on CPU.

    The step is computed in float32; the first ``n // 2`` values are
    ``start + step * i`` and the rest ``end - step * (n - 1 - i)``, each rounded once
    (torch uses a fused multiply-add). The float64 expression below is exact before
    its final rounding for every ``n`` a schedule uses (``step * i`` has at most
    24 + 31 significant bits).
    """
    a = np.float32(start)
    b = np.float32(end)
    if n == 1:
        return np.array([a], dtype=np.float32)
    step = np.float32((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    half = n // 2
    low = np.float64(a) + np.float64(step) * i
    high = np.float64(b) - np.float64(step) * (n - 1 - i)
    return np.where(np.arange(n) < half, low, high).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule, as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    out = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(out, dtype=np.float64).astype(np.float32)


@functools.lru_cache(maxsize=64)
def _tables(cfg: ScheduleConfig) -> tuple[np.ndarray, np.ndarray]:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        b = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        r = _torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n)
        b = (r * r).astype(np.float32)
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        b = _cosine_betas(n)
    else:  # pragma: no cover - rejected by ScheduleConfig
        raise ConfigError(f"unknown beta_schedule {cfg.beta_schedule!r}")
    alphas = np.float32(1.0) - b
    ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
    b.setflags(write=False)
    ac.setflags(write=False)
    return b, ac


def betas(cfg: ScheduleConfig) -> np.ndarray:
    """The float32 beta table ``[num_train_timesteps]`` (read-only), equal to diffusers'."""
    return _tables(cfg)[0]


def alphas_cumprod(cfg: ScheduleConfig) -> np.ndarray:
    """The float32 ``prod_{s<=t} (1 - beta_s)`` table ``[num_train_timesteps]`` (read-only)."""
    return _tables(cfg)[1]


def final_alpha_cumprod(cfg: ScheduleConfig) -> np.float32:
    """DDIM's cumulative alpha "before" timestep 0: 1, or ``alphas_cumprod[0]``."""
    return np.float32(1.0) if cfg.set_alpha_to_one else alphas_cumprod(cfg)[0]


def check_num_steps(cfg: ScheduleConfig, num_steps: Any) -> int:
    """Return ``num_steps`` as an int, or raise :class:`ConfigError` if out of range."""
    if not _is_int(num_steps):
        raise ConfigError(f"num_steps must be an integer, got {num_steps!r}")
    if not 1 <= int(num_steps) <= cfg.num_train_timesteps:
        raise ConfigError(
            f"num_steps = {num_steps} is out of range: it must be between 1 and "
            f"num_train_timesteps = {cfg.num_train_timesteps}"
        )
    return int(num_steps)


def sampling_timesteps(cfg: ScheduleConfig, num_steps: int) -> np.ndarray:
    """The descending int64 timesteps of an ``num_steps``-step sampling run.

    Equal to ``scheduler.set_timesteps(num_steps); scheduler.timesteps`` of diffusers'
    ``DDPMScheduler`` and ``DDIMScheduler`` (the two compute them identically), with
    two exceptions where diffusers would produce an unusable schedule:

    * "trailing": for some ``num_steps`` (e.g. 61 of 1000) floating-point rounding in
      diffusers' ``np.arange`` yields one extra timestep ``-1``; we return the first
      ``num_steps`` values, i.e. diffusers' schedule without that entry.
    * "leading" with ``steps_offset`` large enough to push the first timestep to
      ``num_train_timesteps`` or beyond (e.g. 1000 steps with ``steps_offset=1``)
      raises :class:`ConfigError`; diffusers would fail with an index error when
      sampling.

    Raises:
      ConfigError: ``num_steps`` not in ``[1, num_train_timesteps]``, or the case above.
    """
    n = check_num_steps(cfg, num_steps)
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif cfg.timestep_spacing == "leading":
        ratio = T // n
        ts = (np.arange(n) * ratio)[::-1].astype(np.int64) + cfg.steps_offset
        if ts[0] >= T:
            raise ConfigError(
                f"steps_offset = {cfg.steps_offset} with {n} 'leading' steps gives timestep {int(ts[0])}, "
                f"outside the model's range [0, {T - 1}]; use fewer steps or steps_offset = 0"
            )
    elif cfg.timestep_spacing == "trailing":
        ratio = T / n
        ts = np.round(np.arange(T, 0, -ratio)).astype(np.int64)[:n] - 1
    else:  # pragma: no cover - rejected by ScheduleConfig
        raise ConfigError(f"unknown timestep_spacing {cfg.timestep_spacing!r}")
    return np.ascontiguousarray(ts)


def compvis_schedule(linear_start: float, linear_end: float, timesteps: int = 1000,
                     beta_schedule: str = "scaled_linear") -> dict:
    """The schedule dict of a CompVis latent-diffusion model, sampled as CompVis does.

    CompVis "linear" betas are ``linspace(sqrt(start), sqrt(end))**2``: diffusers'
    ``scaled_linear``. CompVis' DDIM sampler uses no x0 clipping, timesteps
    ``range(0, T, T//S) + 1`` (leading spacing, offset 1) and ``alphas_cumprod[0]`` as
    the last step's previous cumulative alpha (``set_alpha_to_one=False``).
    """
    return {
        "num_train_timesteps": timesteps,
        "beta_start": linear_start,
        "beta_end": linear_end,
        "beta_schedule": beta_schedule,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "variance_type": "fixed_small",
        "prediction_type": "epsilon",
    }
