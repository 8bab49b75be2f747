"""Convert a CompVis latent-diffusion checkpoint (``.ckpt`` + YAML) to a jaxquant model directory.

Input: the checkpoint (``.ckpt`` Lightning file ``{"state_dict": ...}`` read weights-only,
a bare state dict, or ``.safetensors``) and the YAML it was trained with, e.g.
``configs/latent-diffusion/cin256-v2.yaml``. The YAML is read with PyYAML (no
omegaconf); its ``model.params`` give

* ``unet_config.params`` → :class:`~jaxquant.models.openai_unet.OpenAIUNetConfig`,
* ``first_stage_config`` → :class:`~jaxquant.models.autoencoder.AutoencoderConfig`,
* ``cond_stage_config`` → a class embedder, or ``__is_unconditional__``,
* ``linear_start`` / ``linear_end`` / ``timesteps`` / ``beta_schedule`` → the schedule,
* ``scale_factor`` (or the checkpoint's ``scale_factor`` buffer with ``scale_by_std``).

Checkpoint tensors are split by prefix: ``model.diffusion_model.`` → ``unet``,
``first_stage_model.`` → ``first_stage``, ``cond_stage_model.`` → ``cond_stage``.
``model_ema.*`` (EMA copies), first-stage loss modules and the schedule buffers are not
part of the networks; the schedule buffers, when present, must agree with the YAML.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from checkpoints_convert.common import load_torch_state_dict, state_dict_to_params, torch_name_for
from jaxquant.diffusion.schedules import compvis_schedule
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir

#: The LatentDiffusion classes whose inference this converter reproduces.
LDM_TARGETS = ("ldm.models.diffusion.ddpm.LatentDiffusion",)
CLASS_EMBEDDER_TARGETS = ("ldm.modules.encoders.modules.ClassEmbedder",)

#: Flax subtree → checkpoint prefix.
PREFIXES = {"unet": "model.diffusion_model.", "first_stage": "first_stage_model.", "cond_stage": "cond_stage_model."}

#: Buffers of ``LatentDiffusion`` that are not network weights (schedule tables, scale factor).
NON_NETWORK_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "lvlb_weights", "logvar", "cond_ids", "scale_factor",
)
# Prefixes of tensors that belong to training only.
_TRAINING_PREFIXES = ("model_ema.", "first_stage_model.loss.", "first_stage_model.model_ema.")

# LatentDiffusion / DDPM constructor arguments: those that change inference are read
# (and refused at unsupported values); the rest are training or logging settings.
_LDM_INFERENCE_KEYS = {
    "unet_config", "first_stage_config", "cond_stage_config", "conditioning_key", "timesteps", "beta_schedule",
    "linear_start", "linear_end", "cosine_s", "given_betas", "parameterization", "scale_factor", "scale_by_std",
    "image_size", "channels", "v_posterior", "concat_mode", "cond_stage_forward", "use_positional_encodings",
}
_LDM_TRAINING_KEYS = {
    "num_timesteps_cond", "cond_stage_key", "cond_stage_trainable", "first_stage_key", "log_every_t", "monitor",
    "use_ema", "loss_type", "ckpt_path", "ignore_keys", "load_only_unet", "learn_logvar", "logvar_init",
    "original_elbo_weight", "l_simple_weight", "clip_denoised", "scheduler_config",
    "make_it_fit", "ucg_training", "reset_ema", "reset_num_ema_updates", "use_fp16", "embedding_dropout",
}


# --------------------------------------------------------------------------- YAML


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a CompVis YAML config with PyYAML's safe loader.

    Raises:
      ConfigError: the file is missing, not YAML, or has no ``model`` mapping.
    """
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"no YAML config at '{p}' (pass the model's config, e.g. configs/latent-diffusion/cin256-v2.yaml)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"'{p}' is not valid YAML ({e})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        raise ConfigError(f"'{p}' has no 'model' section: not a CompVis latent-diffusion config")
    return dict(data)


def _number(params: Mapping[str, Any], key: str, default: float) -> float:
    """``params[key]`` as a float. PyYAML reads ``1e-4`` (no dot) as a string, OmegaConf
    as a number: accept numeric strings too."""
    v = params.get(key, default)
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise ConfigError(f"model.params field {key!r} = {v!r} must be a number")
    return float(v)


def _schedule_from_params(params: Mapping[str, Any]) -> dict:
    """The jaxquant/diffusers schedule dict equivalent to a DDPM's beta settings."""
    n = params.get("timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"model.params field 'timesteps' = {n!r} must be a positive integer")
    start = _number(params, "linear_start", 1e-4)
    end = _number(params, "linear_end", 2e-2)
    kind = params.get("beta_schedule", "linear")
    if params.get("given_betas") is not None:
        raise ConfigError("model.params field 'given_betas' is not supported (explicit beta tables are not implemented)")
    if kind == "linear":
        # CompVis "linear" is torch.linspace(start**0.5, end**0.5, n, float64)**2, i.e. the
        # square of a linspace of square roots: diffusers' "scaled_linear" (computed there in
        # float32; the tables agree to ~1e-7 relative, see check_schedule_buffers).
        beta_schedule = "scaled_linear"
    elif kind == "cosine":
        if _number(params, "cosine_s", 8e-3) != 8e-3:
            raise ConfigError(f"model.params field 'cosine_s' = {params['cosine_s']!r} is not supported (only 0.008)")
        beta_schedule = "squaredcos_cap_v2"  # identical to CompVis' cosine with cosine_s = 0.008
    else:
        raise ConfigError(f"model.params field 'beta_schedule' = {kind!r} is not supported (supported: linear, cosine)")
    return compvis_schedule(start, end, n, beta_schedule)


def compvis_betas(schedule: Mapping[str, Any]) -> np.ndarray:
    """The float64 betas CompVis' ``make_beta_schedule`` builds for a schedule dict from this module."""
    n = schedule["num_train_timesteps"]
    if schedule["beta_schedule"] == "scaled_linear":
        return np.linspace(schedule["beta_start"] ** 0.5, schedule["beta_end"] ** 0.5, n, dtype=np.float64) ** 2
    s = 8e-3
    t = np.arange(n + 1, dtype=np.float64) / n + s
    a = np.cos(t / (1 + s) * np.pi / 2) ** 2
    a = a / a[0]
    return np.clip(1 - a[1:] / a[:-1], 0, 0.999)


def ldm_config_from_yaml(raw: Mapping[str, Any]):
    """``(LDMConfig, schedule dict, scale_by_std)`` from a parsed CompVis YAML.

    Raises:
      ConfigError: an unsupported target or field (named).
    """
    from jaxquant.models.autoencoder import AutoencoderConfig
    from jaxquant.models.ldm import ClassEmbedderConfig, LDMConfig
    from jaxquant.models.openai_unet import OpenAIUNetConfig

    model = raw["model"]
    target = model.get("target")
    if target not in LDM_TARGETS:
        raise ConfigError(f"model.target {target!r} is not supported (supported: {', '.join(LDM_TARGETS)})")
    params = dict(model.get("params") or {})
    unknown = sorted(str(k) for k in params if k not in _LDM_INFERENCE_KEYS and k not in _LDM_TRAINING_KEYS)
    if unknown:
        raise ConfigError(f"unknown model.params field(s): {', '.join(unknown)}")
    if params.get("parameterization", "eps") != "eps":
        raise ConfigError(f"model.params field 'parameterization' = {params['parameterization']!r} is not supported "
                          "(only 'eps', epsilon prediction)")
    if params.get("cond_stage_forward") is not None:
        raise ConfigError(f"model.params field 'cond_stage_forward' = {params['cond_stage_forward']!r} is not supported")
    if params.get("use_positional_encodings", False):
        raise ConfigError("model.params field 'use_positional_encodings' = True is not supported")
    if params.get("v_posterior", 0.0) != 0.0:
        raise ConfigError(f"model.params field 'v_posterior' = {params['v_posterior']!r} is not supported (only 0)")
    for key in ("unet_config", "first_stage_config", "cond_stage_config"):
        if key not in params:
            raise ConfigError(f"model.params has no {key!r}")

    unet_cfg = params["unet_config"]
    if not isinstance(unet_cfg, Mapping) or unet_cfg.get("target") != "ldm.modules.diffusionmodules.openaimodel.UNetModel":
        got = unet_cfg.get("target") if isinstance(unet_cfg, Mapping) else unet_cfg
        raise ConfigError(f"unet_config target {got!r} is not supported (supported: ldm.modules.diffusionmodules.openaimodel.UNetModel)")
    unet = OpenAIUNetConfig.from_dict(unet_cfg.get("params") or {})
    first_stage = AutoencoderConfig.from_compvis(params["first_stage_config"])

    cs_raw = params["cond_stage_config"]
    conditioning_key = params.get("conditioning_key")
    if conditioning_key is None:  # CompVis' default
        conditioning_key = "concat" if params.get("concat_mode", True) else "crossattn"
    if cs_raw == "__is_unconditional__":
        cond_stage, conditioning_key = None, None  # CompVis drops the conditioning key too
    elif isinstance(cs_raw, Mapping) and cs_raw.get("target") in CLASS_EMBEDDER_TARGETS:
        cp = dict(cs_raw.get("params") or {})
        extra = sorted(set(cp) - {"embed_dim", "n_classes", "key", "ucg_rate"})
        if extra:
            raise ConfigError(f"unknown cond_stage_config field(s): {', '.join(extra)}")
        n_classes, embed_dim = cp.get("n_classes", 1000), cp.get("embed_dim")
        for key, v in (("n_classes", n_classes), ("embed_dim", embed_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"cond_stage_config field {key!r} = {v!r} must be a positive integer")
        cond_stage = ClassEmbedderConfig(n_classes, embed_dim, str(cp.get("key", "class")))
        if conditioning_key != "crossattn":
            raise ConfigError(f"model.params field 'conditioning_key' = {conditioning_key!r} is not supported with a "
                              "class embedder (supported: crossattn)")
    else:
        got = cs_raw.get("target") if isinstance(cs_raw, Mapping) else cs_raw
        raise ConfigError(f"cond_stage_config {got!r} is not supported (supported: {', '.join(CLASS_EMBEDDER_TARGETS)} "
                          "or __is_unconditional__)")
    if "channels" in params and params["channels"] != unet.in_channels:
        raise ConfigError(f"model.params field 'channels' = {params['channels']!r} does not match the UNet's "
                          f"in_channels ({unet.in_channels})")
    # model.params.image_size is the latent side LatentDiffusion samples at; the UNet's own
    # image_size may differ (Stable Diffusion v1: 64 vs 32) and does not change the network.
    image_size = params.get("image_size", unet.image_size)
    cfg = LDMConfig(unet, first_stage, cond_stage, conditioning_key, _number(params, "scale_factor", 1.0), image_size)
    return cfg, _schedule_from_params(params), bool(params.get("scale_by_std", False))


# --------------------------------------------------------------------------- checkpoint


def check_schedule_buffers(state_dict: Mapping[str, np.ndarray], schedule: Mapping[str, Any], where: str) -> None:
    """Compare the checkpoint's ``betas`` / ``alphas_cumprod`` with the YAML's schedule.

    Raises:
      CheckpointError: a buffer has the wrong length or values (the YAML does not
        belong to this checkpoint).
    """
    betas = compvis_betas(schedule)
    expected = {"betas": betas, "alphas_cumprod": np.cumprod(1.0 - betas)}
    for name, want in expected.items():
        if name not in state_dict:
            continue
        got = np.asarray(state_dict[name], np.float64).reshape(-1)
        if got.shape != want.shape:
            raise CheckpointError(f"{where}: buffer '{name}' has {got.size} entries but the YAML says timesteps = "
                                  f"{want.size}; is this the YAML of this checkpoint?")
        err = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-12)))
        if err > 1e-5:
            raise CheckpointError(
                f"{where}: buffer '{name}' differs from the YAML schedule ({schedule['beta_schedule']} "
                f"{schedule['beta_start']}→{schedule['beta_end']}, relative error {err:.2g}); is this the YAML of this checkpoint?")


def _ldm_name(path: Sequence[str], prefix: str = "") -> str:
    head, *rest = path
    return PREFIXES[head] + torch_name_for(rest)


def _ignored(name: str) -> bool:
    return name.startswith(_TRAINING_PREFIXES) or name in NON_NETWORK_BUFFERS


def expected_params(cfg: Any) -> dict:
    """Shapes of the "ldm" parameter tree for an :class:`LDMConfig` (no compute)."""
    import jax
    import jax.numpy as jnp

    from jaxquant.models.ldm import LatentDiffusion

    side = 2 ** (cfg.unet.num_levels - 1)
    x = jax.ShapeDtypeStruct((1, side, side, cfg.unet.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if cfg.is_class_conditional else None
    return jax.eval_shape(LatentDiffusion(cfg).init, jax.random.key(0), x, t, y)["params"]


def convert_compvis(ckpt: str | os.PathLike, config: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a CompVis latent-diffusion checkpoint and its YAML to a jaxquant "ldm" model directory.

    Args:
      ckpt: ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` (torch pickle, read weights-only;
        ``{"state_dict": ...}`` unwrapped) or ``.safetensors``.
      config: the model's YAML (``configs/latent-diffusion/cin256-v2.yaml``).
      out_dir: the model directory to write (an existing one is replaced).

    Returns:
      The absolute path of the written model directory.

    Raises:
      ConfigError: the YAML is missing, unreadable or names an unsupported feature.
      CheckpointError: the checkpoint is unreadable, holds code, or does not match the
        YAML (all missing/unexpected tensors, shape mismatches, non-finite tensors and a
        disagreeing schedule are reported).
    """
    ckpt_path = Path(ckpt).expanduser()
    yaml_path = Path(config).expanduser()
    raw = read_yaml(yaml_path)
    cfg, schedule, scale_by_std = ldm_config_from_yaml(raw)
    from jaxquant.diffusion.schedules import ScheduleConfig

    ScheduleConfig.from_dict(schedule)  # validates the numbers
    out = Path(out_dir).expanduser().resolve()
    if out == ckpt_path.resolve() or out == ckpt_path.resolve().parent:
        raise CheckpointError(f"--out '{out}' would overwrite the checkpoint's folder; choose another output directory")

    state_dict = load_torch_state_dict(ckpt_path)
    where = f"'{ckpt_path}'"
    check_schedule_buffers(state_dict, schedule, where)
    if scale_by_std:
        if "scale_factor" not in state_dict:
            raise CheckpointError(f"{where}: the YAML sets scale_by_std but the checkpoint has no 'scale_factor' buffer")
        cfg = dataclasses.replace(cfg, scale_factor=float(np.asarray(state_dict["scale_factor"]).reshape(())))
    params = state_dict_to_params(expected_params(cfg), state_dict, name_fn=_ldm_name, ignore=_ignored, where=where)
    del state_dict

    source = {
        "format": "compvis",
        "checkpoint": str(ckpt_path.resolve()),
        "config": str(yaml_path.resolve()),
        "unet_params": "model.diffusion_model.*",
        "first_stage_target": raw["model"]["params"]["first_stage_config"]["target"],
    }
    meta = ModelDirMeta("ldm", cfg.to_dict(), schedule, extra={"source": source})
    return save_model_dir(out, meta, params)
