"""Noise schedules and samplers (DDPM, DDIM) matching diffusers' schedulers; classifier-free guidance."""

from jaxquant.diffusion.guidance import guided_eps
from jaxquant.diffusion.samplers import (
    SAMPLERS,
    ddim_step,
    ddpm_step,
    initial_noise,
    make_sampler,
    predict_x0,
    previous_timesteps,
    sample,
    step_noise,
)
from jaxquant.diffusion.schedules import (
    ScheduleConfig,
    alphas_cumprod,
    betas,
    check_num_steps,
    final_alpha_cumprod,
    sampling_timesteps,
)

__all__ = [
    "ScheduleConfig",
    "betas",
    "alphas_cumprod",
    "final_alpha_cumprod",
    "sampling_timesteps",
    "check_num_steps",
    "SAMPLERS",
    "ddim_step",
    "ddpm_step",
    "predict_x0",
    "previous_timesteps",
    "initial_noise",
    "step_noise",
    "sample",
    "make_sampler",
    "guided_eps",
]
