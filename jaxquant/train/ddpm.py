"""Training a diffusers-style ``UNet2DModel`` DDPM with the epsilon objective."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.schedules import ScheduleConfig, alphas_cumprod
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel
from jaxquant.train.loop import TrainConfig, train

# The shipped ddpm-fmnist network: the UNet2DModel code path of google/ddpm-cifar10-32
# (DDPM timestep embedding, asymmetric-padding downsampling, one attention level at
# 16×16) at a width that trains on two CPU cores.
FMNIST_UNET = {
    "sample_size": 32,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
    "norm_eps": 1e-6,
    "attention_head_dim": None,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "downsample_padding": 0,
}


def diffusion_loss(module: Any, alphas_bar: jax.Array, num_train_timesteps: int, conditional: bool,
                   label_dropout: float = 0.0, null_label: int | None = None) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """Epsilon-prediction MSE at uniformly drawn timesteps: ``loss_fn(params, batch, key)``."""

    def loss_fn(params, batch, key):
        x0 = batch["x"]
        kt, kn, kd, kdrop = jax.random.split(key, 4)
        t = jax.random.randint(kt, (x0.shape[0],), 0, num_train_timesteps)
        noise = jax.random.normal(kn, x0.shape)
        ab = alphas_bar[t][:, None, None, None]
        xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
        y = None
        if conditional:
            y = batch["y"]
            if label_dropout > 0:
                drop = jax.random.bernoulli(kdrop, label_dropout, y.shape)
                y = jnp.where(drop, null_label, y)
        pred = module.apply({"params": params}, xt, t, y, train=True, rngs={"dropout": kd})
        return jnp.mean(jnp.square(pred - noise)), {}

    return loss_fn


def train_ddpm(
    run_dir: str | Path,
    images: np.ndarray,
    unet_config: dict,
    cfg: TrainConfig,
    schedule: ScheduleConfig | None = None,
    labels: np.ndarray | None = None,
    export_dir: str | Path | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Train a UNet2DModel DDPM on NHWC ``images`` in [-1, 1]; export EMA weights.

    The EMA parameters are written as a jaxquant model directory (``export_dir``,
    default ``run_dir/model``) at every checkpoint, so a killed run still leaves a
    usable model; rerunning the same command resumes.
    """
    schedule = schedule or ScheduleConfig()
    ucfg = UNet2DConfig.from_dict(unet_config)
    module = UNet2DModel(ucfg)
    cond = ucfg.is_class_conditional
    key = jax.random.key(cfg.seed)
    x1 = jnp.zeros((1, *images.shape[1:]), jnp.float32)
    t1 = jnp.zeros((1,), jnp.int32)
    params = module.init(key, x1, t1, jnp.zeros((1,), jnp.int32) if cond else None)["params"]
    n_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(params))
    ab = jnp.asarray(alphas_cumprod(schedule))
    loss_fn = diffusion_loss(module, ab, schedule.num_train_timesteps, cond)

    def get_batch(idx):
        b = {"x": jnp.asarray(images[idx])}
        if cond:
            b["y"] = jnp.asarray(labels[idx])
        return b

    export_dir = Path(export_dir or Path(run_dir) / "model")
    t_start = time.time()

    def export(state):
        meta = ModelDirMeta("unet2d", ucfg.to_dict(), schedule.to_dict(), extra={
            "training": {"steps": int(state.step), "batch_size": cfg.batch_size,
                         "learning_rate": cfg.learning_rate, "ema_decay": cfg.ema_decay,
                         "parameters": n_params, "session_wall_s": round(time.time() - t_start, 1),
                         **(extra_meta or {})}})
        save_model_dir(export_dir, meta, state.ema_params)

    print(f"train ddpm: {n_params / 1e6:.2f}M parameters, {images.shape[0]} images, run dir {run_dir}")
    train(run_dir, params, loss_fn, get_batch, images.shape[0], cfg, description="ddpm", on_checkpoint=export)
    return export_dir
