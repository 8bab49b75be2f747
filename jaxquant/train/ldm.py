"""Training a class-conditional latent-diffusion model (``jaxquant train ldm``) on frozen VQ latents.

The denoiser is the CompVis ``UNetModel`` with ``SpatialTransformer`` cross-attention to
a learned class embedding (``ClassEmbedder``): the code path of LDM-4 ``cin256-v2``, at
Fashion-MNIST size (:data:`FMNIST_LDM`). The recipe follows CompVis' ``LatentDiffusion``:

* the training images are encoded once by the frozen first stage
  (:func:`jaxquant.train.vq.train_vq`): ``VQModelInterface.encode``, i.e. the
  unquantized ``quant_conv`` output; the decoder snaps latents to the codebook;
* ``scale_factor = 1 / std`` of those latents (CompVis' ``scale_by_std``), so the
  diffusion model sees unit-variance data;
* epsilon-prediction MSE at uniform timesteps, CompVis' "linear" schedule
  ``linear_start = 0.0015``, ``linear_end = 0.0195``, 1000 steps (``scaled_linear`` in
  diffusers terms), the same schedule dict the CompVis converter writes;
* label dropout (probability 0.1) to the unconditional label ``n_classes - 1`` (10:
  the class embedder has 11 rows), which trains the unconditional model used by
  classifier-free guidance (:func:`jaxquant.diffusion.guidance.guided_eps`).

The UNet and the class embedder are trained (CompVis ``cond_stage_trainable``); the
first stage is not. The exported ``"ldm"`` model directory holds all three parameter
subtrees (EMA weights of the trained two, the VQ weights as given), so
``jaxquant.load(dir)`` gives ``m(x, t, y=labels)`` on latents and ``m.decode(latents)``.
"""

from __future__ import annotations

import copy
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.schedules import ScheduleConfig, alphas_cumprod
from jaxquant.errors import ConfigError, JaxquantError
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
from jaxquant.diffusion.schedules import compvis_schedule
from jaxquant.models.autoencoder import AutoencoderConfig
from jaxquant.models.ldm import ClassEmbedder, ClassEmbedderConfig, LatentDiffusion, LDMConfig
from jaxquant.models.openai_unet import OpenAIUNet, OpenAIUNetConfig
from jaxquant.train.ddpm import diffusion_loss
from jaxquant.train.loop import TrainConfig, train
from jaxquant.train.vq import compile_once, encode_images, load_vq

# CompVis "linear" betas 0.0015 → 0.0195 (cin256-v2's), as the compvis converter writes them:
# diffusers "scaled_linear", DDIM with CompVis' conventions (no clipping, leading spacing + 1).
LDM_SCHEDULE: dict = compvis_schedule(0.0015, 0.0195, 1000)

# The shipped Fashion-MNIST LDM: cin256-v2's UNetModel layout (spatial transformers with
# cross-attention to a class embedding at every attention level and in the middle block)
# on 8×8×3 VQ-f4 latents: two levels (8×8 and 4×4, both with attention), 64/128 channels,
# 32-channel heads, 128-d context. 4.28M UNet parameters; with the 0.95M FMNIST_VQ first
# stage and the 11×128 embedder the exported directory is about 21 MB in float32.
# ``image_size``, ``in_channels`` and ``out_channels`` are taken from the first stage.
FMNIST_LDM: dict = {
    "unet": {
        "image_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "model_channels": 64,
        "channel_mult": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [1, 2],
        "num_head_channels": 32,
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 128,
        "dropout": 0.0,
    },
    "cond_stage": {"n_classes": 11, "embed_dim": 128, "key": "class_label"},
    "schedule": LDM_SCHEDULE,
    "label_dropout": 0.1,
}


def drop_labels(key: jax.Array, labels: jax.Array, p: float, null_label: int) -> jax.Array:
    """Replace each label by ``null_label`` with probability ``p`` (classifier-free-guidance training)."""
    labels = jnp.asarray(labels, jnp.int32)
    if p <= 0:
        return labels
    drop = jax.random.bernoulli(key, p, labels.shape)
    return jnp.where(drop, jnp.int32(null_label), labels)


def ldm_loss(module: LatentDiffusion, schedule: ScheduleConfig, label_dropout: float) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """Epsilon loss on latents with label dropout: ``loss_fn(params, batch, key)``.

    ``params`` holds the trained subtrees (``unet``, ``cond_stage``); ``batch`` is
    ``{"x": scaled latents, "y": labels}``. The labels pass through :func:`drop_labels`
    and then :func:`jaxquant.train.ddpm.diffusion_loss` (the DDPM objective).
    """
    null = module.config.unconditional_label
    inner = diffusion_loss(module, jnp.asarray(alphas_cumprod(schedule)), schedule.num_train_timesteps, True)

    def loss_fn(params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        kdrop, krest = jax.random.split(key)
        y = drop_labels(kdrop, batch["y"], label_dropout, null)
        return inner(params, {"x": batch["x"], "y": y}, krest)

    return loss_fn


def _fingerprint(params: Any) -> int:
    from jaxquant.io.model_dir import array_checksums

    return zlib.crc32(repr(sorted(array_checksums(jax.tree_util.tree_map(np.asarray, params)).items())).encode())


def _cached_latents(run_dir: Path, images: np.ndarray, ae_cfg: AutoencoderConfig, vq_params: Any) -> np.ndarray:
    """Encode the training set once per run directory (``latents.npz``, tied to the VQ weights and the images)."""
    cache = run_dir / "latents.npz"
    fp = np.asarray([_fingerprint(vq_params), len(images), zlib.crc32(np.ascontiguousarray(images).view(np.uint8))],
                    np.int64)
    if cache.is_file():
        with np.load(cache) as f:
            if np.array_equal(f["fingerprint"], fp):
                return f["latents"]
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            raise JaxquantError(f"run directory '{run_dir}' was started with another first stage or other training "
                                "images; resume with the same --vq, or use a new --run-dir")
    z = encode_images(ae_cfg, vq_params, images)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "latents.tmp.npz"
    np.savez(tmp, latents=z, fingerprint=fp)
    tmp.replace(cache)
    return z


def make_ldm_config(ae_cfg: AutoencoderConfig, latent_side: int, scale_factor: float, ldm_config: dict) -> LDMConfig:
    """The :class:`LDMConfig` of ``ldm_config`` (:data:`FMNIST_LDM` form) on top of a first stage.

    The UNet's ``image_size`` becomes the latent side, its ``in_channels`` /
    ``out_channels`` the first stage's ``embed_dim``.
    """
    u = dict(ldm_config["unet"])
    u.update(image_size=latent_side, in_channels=ae_cfg.embed_dim, out_channels=ae_cfg.embed_dim)
    cs = ClassEmbedderConfig(**ldm_config["cond_stage"])
    return LDMConfig(OpenAIUNetConfig.from_dict(u), ae_cfg, cs, "crossattn", float(scale_factor), latent_side)


def init_ldm_params(config: LDMConfig, seed: int) -> dict:
    """Fresh ``{"unet", "cond_stage"}`` subtrees of a :class:`LatentDiffusion` (no first stage).

    Initialised network by network, so the first stage (loaded, not trained) is not
    initialised and compiled for nothing; the subtrees are those of ``LatentDiffusion.init``.
    """
    ku, kc = jax.random.split(jax.random.key(seed))
    side, cs = config.image_size, config.cond_stage
    unet = compile_once(OpenAIUNet(config.unet).init, ku, jnp.zeros((1, side, side, config.unet.in_channels), jnp.float32),
                        jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, cs.embed_dim), jnp.float32))["params"]
    cond = ClassEmbedder(cs).init(kc, jnp.zeros((1,), jnp.int32))["params"]
    return {"unet": unet, "cond_stage": cond}


def train_ldm(
    run_dir: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    vq_dir: str | Path,
    cfg: TrainConfig,
    ldm_config: dict | None = None,
    export_dir: str | Path | None = None,
    extra_meta: dict | None = None,
) -> Path:
    """Train a class-conditional LDM on the latents of ``images`` under the VQ of ``vq_dir``; export EMA weights.

    Args:
      run_dir: checkpoints, ``train_log.jsonl`` and ``latents.npz`` (the encoded training
        set); rerunning resumes bit for bit (the run refuses another VQ).
      images: training images ``[N, H, W, C]`` in [-1, 1].
      labels: integer class labels ``[N]`` in ``[0, n_classes - 1)`` (the last label
        is the unconditional one).
      vq_dir: model directory written by :func:`jaxquant.train.vq.train_vq`.
      cfg: optimisation settings.
      ldm_config: ``{"unet", "cond_stage", "schedule", "label_dropout"}`` (default
        :data:`FMNIST_LDM`).
      export_dir: the "ldm" model directory (default ``run_dir/model``), rewritten at every
        checkpoint.
      extra_meta: merged into the ``"training"`` record.

    Returns:
      The exported model directory.
    """
    ldm_config = copy.deepcopy(ldm_config or FMNIST_LDM)
    run_dir = Path(run_dir)
    ae_cfg, vq_params, vq_meta = load_vq(vq_dir)
    f = ae_cfg.ddconfig.downsample_factor
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] % f:
        raise ConfigError(f"training images of shape {images.shape}: expected square NHWC images with a side "
                          f"divisible by the first stage's factor {f}")
    labels = np.asarray(labels, np.int32)
    n_classes = ldm_config["cond_stage"]["n_classes"]
    if labels.shape != (len(images),) or labels.min() < 0 or labels.max() >= n_classes - 1:
        raise ConfigError(f"labels must be [N] integers in [0, {n_classes - 1}) (label {n_classes - 1} is the "
                          f"unconditional one); got shape {labels.shape}, range [{labels.min()}, {labels.max()}]")
    schedule = ScheduleConfig.from_dict(ldm_config.get("schedule", LDM_SCHEDULE))
    label_dropout = float(ldm_config.get("label_dropout", 0.1))
    if not 0 <= label_dropout < 1:
        raise ConfigError(f"label_dropout = {label_dropout} must be in [0, 1)")

    t0 = time.time()
    z = _cached_latents(run_dir, images, ae_cfg, vq_params)
    scale_factor = float(1.0 / np.std(z.astype(np.float64)))
    latents = (z * np.float32(scale_factor)).astype(np.float32)
    print(f"train ldm: {len(z)} latents {z.shape[1:]} ({time.time() - t0:.0f}s), scale_factor {scale_factor:.5f}")

    lcfg = make_ldm_config(ae_cfg, latents.shape[1], scale_factor, ldm_config)
    module = LatentDiffusion(lcfg)
    params = init_ldm_params(lcfg, cfg.seed)  # the trained subtrees; the first stage stays frozen
    count = {k: sum(int(v.size) for v in jax.tree_util.tree_leaves(t))
             for k, t in {**params, "first_stage": vq_params}.items()}
    loss_fn = ldm_loss(module, schedule, label_dropout)
    export_dir = Path(export_dir or run_dir / "model")
    t_start = time.time()

    def export(state: Any) -> None:
        tree = {"unet": state.ema_params["unet"], "first_stage": vq_params, "cond_stage": state.ema_params["cond_stage"]}
        meta = ModelDirMeta("ldm", lcfg.to_dict(), schedule.to_dict(), extra={
            "training": {"steps": int(state.step), "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                         "ema_decay": cfg.ema_decay, "label_dropout": label_dropout,
                         "unconditional_label": lcfg.unconditional_label, "parameters": count,
                         "scale_factor": "1/std of the training latents (CompVis scale_by_std)",
                         "session_wall_s": round(time.time() - t_start, 1), **(extra_meta or {})},
            "first_stage": {"source": str(Path(vq_dir).resolve()),
                            "test_reconstruction": vq_meta.extra.get("test_reconstruction"),
                            "training_steps": (vq_meta.extra.get("training") or {}).get("steps")}})
        save_model_dir(export_dir, meta, tree)

    print(f"train ldm: UNet {count['unet'] / 1e6:.2f}M + embedder {count['cond_stage'] / 1e3:.1f}k trained, "
          f"first stage {count['first_stage'] / 1e6:.2f}M frozen; run dir {run_dir}")
    train(run_dir, params, loss_fn, lambda idx: {"x": jnp.asarray(latents[idx]), "y": jnp.asarray(labels[idx])},
          len(latents), cfg, description="ldm", on_checkpoint=export)
    return export_dir
