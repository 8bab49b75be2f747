"""Training a VQ-f4 first-stage autoencoder (``jaxquant train vq``) for the latent-diffusion model.

The network is the CompVis/taming :class:`~jaxquant.models.autoencoder.VQModel` (the
same code path as the LDM-4 ImageNet first stage), trained as a plain VQ-VAE
(van den Oord et al. 2017): **without the GAN discriminator and the LPIPS perceptual
loss** of CompVis' ``VQLPIPSWithDiscriminator``. The objective per batch is

* reconstruction: mean ``|x - x̂|`` (L1, CompVis' pixel term) or mean ``(x - x̂)²`` (L2);
* codebook loss ``mean (sg(z) - e)²`` (moves the chosen codebook entries to the encoder
  outputs) plus ``β · mean (z - sg(e))²`` (commitment, β = 0.25), as taming's
  ``VectorQuantizer2``, with the straight-through estimator ``z + sg(e - z)`` feeding
  the decoder;
* a dead-code term (jaxquant's addition, see below).

Codebook updates are plain gradient steps (the shared AdamW loop), not EMA k-means.
Against codebook collapse, the usual failure of gradient codebooks, two measures that
fit a pure ``loss_fn(params, batch, key)`` (so the run stays resumable bit for bit):

1. data-dependent initialisation: the codebook starts as ``n_embed`` distinct encoder
   outputs of the (randomly initialised) encoder on training images, instead of
   taming's tiny ``uniform(±1/n_embed)`` cloud that lets one entry win everything;
2. "soft restarts": every entry that no latent of the batch chose is pulled towards its
   nearest (stop-gradient) encoder output of the batch, ``dead_code_weight · Σ_dead
   min_i |sg(z_i) - e_k|² / n_embed``. Used entries get no such pull. Under Adam each
   dead entry moves by about the learning rate per step, so it re-joins the data within
   a few hundred steps instead of staying dead.

The exported model directory (architecture ``"vq-autoencoder"``, the EMA weights) is
written at every checkpoint and holds the test-set reconstruction error
(``"test_reconstruction"``: MSE and PSNR, codebook usage); :func:`load_vq` reads it back
and :func:`jaxquant.train.ldm.train_ldm` uses it as the frozen first stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.io.model_dir import ModelDirMeta, load_model_dir, save_model_dir
from jaxquant.models.autoencoder import AutoencoderConfig, VQModel
from jaxquant.train.loop import TrainConfig, train
from jaxquant import xla

#: ``architecture`` of an exported VQ autoencoder directory.
VQ_ARCHITECTURE = "vq-autoencoder"

# The shipped Fashion-MNIST first stage: the VQ-f4 code path of cin256-v2's first stage
# (3 levels, no attention resolutions, vanilla mid-block attention, embed_dim 3) at a width
# that trains on two CPU cores and leaves room for the UNet in the 25 MB LDM budget:
# 32×32×1 images → 8×8×3 latents, 0.95M parameters.
FMNIST_VQ: dict = {
    "kind": "vq",
    "embed_dim": 3,
    "n_embed": 512,
    "ddconfig": {
        "double_z": False,
        "z_channels": 3,
        "resolution": 32,
        "in_channels": 1,
        "out_ch": 1,
        "ch": 32,
        "ch_mult": [1, 2, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
}

RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class VQLossConfig:
    """Weights of the VQ-VAE objective (see the module docstring).

    Attributes:
      beta: commitment weight β (taming: 0.25).
      reconstruction: "l1" (CompVis' pixel loss) or "l2".
      codebook_weight: weight of the codebook + commitment terms (taming: 1.0).
      dead_code_weight: weight of the pull of unused codebook entries towards the batch's
        encoder outputs (0 disables it).
      init_images: training images whose encoder outputs seed the codebook (0: taming's
        ``uniform(±1/n_embed)`` initialisation).
    """

    beta: float = 0.25
    reconstruction: str = "l1"
    codebook_weight: float = 1.0
    dead_code_weight: float = 1.0
    init_images: int = 256

    def __post_init__(self) -> None:
        if self.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ConfigError(f"VQ reconstruction loss {self.reconstruction!r} is not supported "
                              f"(supported: {list(RECONSTRUCTION_LOSSES)})")
        for f in ("beta", "codebook_weight", "dead_code_weight"):
            if not getattr(self, f) >= 0:
                raise ConfigError(f"VQ loss weight {f!r} = {getattr(self, f)!r} must be non-negative")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sqdist(z: jax.Array, e: jax.Array) -> jax.Array:
    """``[N, K]`` squared distances as :class:`VectorQuantizer` computes them (same argmin)."""
    return (jnp.sum(z * z, axis=1, keepdims=True) + jnp.sum(e * e, axis=1)[None, :]
            - 2.0 * jnp.dot(z, e.T, precision=jax.lax.Precision.HIGHEST))


def vq_loss(module: VQModel, loss_cfg: VQLossConfig) -> Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]:
    """The VQ-VAE objective as ``loss_fn(params, batch, key) -> (loss, metrics)`` (``batch["x"]`` NHWC).

    Metrics: ``rec`` (reconstruction term), ``mse``, ``codebook``, ``commit``, ``dead``
    (dead-code term), ``usage`` (fraction of codebook entries chosen in the batch) and
    ``perplexity`` (of the batch's code histogram).
    """
    sg = jax.lax.stop_gradient

    def loss_fn(params: Any, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        del key  # deterministic objective
        x = batch["x"]
        z = module.apply({"params": params}, x, method=VQModel.encode)
        e = params["quantize"]["embedding"]["embedding"]
        k, d = e.shape
        zf = z.reshape(-1, d)
        dist = _sqdist(sg(zf), e)  # gradient reaches only e (dead-code term)
        idx = jnp.argmin(dist, axis=1)
        zq = e[idx]
        codebook = jnp.mean(jnp.square(sg(zf) - zq))
        commit = jnp.mean(jnp.square(zf - sg(zq)))
        z_st = (zf + sg(zq - zf)).reshape(z.shape)
        xr = module.apply({"params": params}, z_st, True, method=VQModel.decode)
        err = xr - x
        rec = jnp.mean(jnp.abs(err)) if loss_cfg.reconstruction == "l1" else jnp.mean(jnp.square(err))
        counts = jnp.zeros((k,), jnp.float32).at[idx].add(1.0)
        dead = counts == 0
        dead_term = jnp.sum(jnp.where(dead, jnp.min(dist, axis=0), 0.0)) / k
        loss = (rec + loss_cfg.codebook_weight * (codebook + loss_cfg.beta * commit)
                + loss_cfg.dead_code_weight * dead_term)
        p = counts / zf.shape[0]
        perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
        return loss, {"rec": rec, "mse": jnp.mean(jnp.square(err)), "codebook": codebook, "commit": commit,
                      "dead": dead_term, "usage": 1.0 - jnp.mean(dead), "perplexity": perplexity}

    return loss_fn


def compile_once(fn: Callable, *args: Any) -> Any:
    """``jax.jit(fn)(*args)`` compiled without XLA's backend optimisation, for code that runs once.

    Parameter initialisation (a threefry stream and an initializer per parameter) takes
    seconds to compile with optimisation and microseconds to run; eager execution is no
    better (a compile per primitive). Same random streams, hence the same parameters up
    to float rounding of the initializers.
    """
    lowered = jax.jit(fn).lower(*args)
    try:
        compiled = lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
    except Exception:  # a backend without that option
        compiled = lowered.compile()
    return compiled(*args)


def init_vq_params(module: VQModel, images: np.ndarray, seed: int, init_images: int = 256) -> dict:
    """Random VQModel parameters with the codebook seeded from encoder outputs.

    ``n_embed`` distinct latent vectors of the freshly initialised encoder on the first
    ``init_images`` images (a seeded random choice, plus 1e-3 relative noise so equal
    latents of the flat background do not give equal entries). With ``init_images = 0``
    the codebook keeps taming's ``uniform(±1/n_embed)`` initialisation.
    """
    cfg = module.config
    kp, kc, kn = jax.random.split(jax.random.key(seed), 3)
    params = compile_once(module.init, kp, jnp.zeros((1, *images.shape[1:]), jnp.float32))["params"]
    params = jax.tree_util.tree_map(lambda a: a, params)  # a fresh nested dict
    k = cfg.n_embed
    if init_images <= 0:
        e = jax.random.uniform(kc, (k, cfg.embed_dim), minval=-1.0 / k, maxval=1.0 / k)
    else:
        z = encode_images(cfg, params, images[:init_images]).reshape(-1, cfg.embed_dim)
        rng = np.random.default_rng([seed, 1])
        uniq = np.unique(np.round(z, 4), axis=0)
        pool = uniq if len(uniq) >= k else z
        pick = rng.choice(len(pool), size=k, replace=len(pool) < k)
        scale = float(np.std(z)) or 1.0
        e = jnp.asarray(pool[pick]) + 1e-3 * scale * jax.random.normal(kn, (k, cfg.embed_dim))
    params["quantize"]["embedding"]["embedding"] = e.astype(jnp.float32)
    return params


@functools.lru_cache(maxsize=8)
def _encode_fn(config: AutoencoderConfig) -> Callable:
    module = VQModel(config)
    return xla.jit(lambda p, x: module.apply({"params": p}, x, method=VQModel.encode))


def encode_images(config: AutoencoderConfig, params: Any, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Unscaled latents ``VQModel.encode`` (the unquantized ``quant_conv`` output) of NHWC ``images``."""
    enc = _encode_fn(config)
    batch_size = max(1, min(batch_size, len(images)))
    out = []
    for i in range(0, len(images), batch_size):
        x = np.asarray(images[i:i + batch_size], np.float32)
        m = len(x)
        if m < batch_size:  # pad to one compiled shape
            x = np.concatenate([x, np.zeros((batch_size - m, *x.shape[1:]), np.float32)])
        out.append(np.asarray(enc(params, jnp.asarray(x)))[:m])
    return np.concatenate(out)


@functools.lru_cache(maxsize=8)
def _recon_fn(config: AutoencoderConfig) -> Callable:
    """Jitted ``(params, x) -> (per-image squared error, per-image abs error, code indices)``."""
    module = VQModel(config)

    @xla.jit
    def step(p: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        z = module.apply({"params": p}, x, method=VQModel.encode)
        idx = module.apply({"params": p}, z, method=lambda m, h: m.quantize.indices(h))
        xr = jnp.clip(module.apply({"params": p}, z, method=VQModel.decode), -1.0, 1.0)
        return jnp.sum(jnp.square(xr - x), axis=(1, 2, 3)), jnp.sum(jnp.abs(xr - x), axis=(1, 2, 3)), idx

    return step


def reconstruction_metrics(config: AutoencoderConfig, params: Any, images: np.ndarray, batch_size: int = 250) -> dict:
    """Reconstruction error of the exported (inference) path ``decode(encode(x))`` on ``images``.

    Reconstructions are clipped to [-1, 1] like saved images. Returns ``mse_01`` (MSE
    with pixels scaled to [0, 1]), ``psnr_db`` (``10·log10(1 / mse_01)``, from the mean
    MSE), ``mse_pm1`` (MSE in the model's [-1, 1] range), ``l1_pm1``, ``codebook_usage``
    (fraction of entries used on these images), ``codebook_perplexity`` and
    ``num_images``.
    """
    step = _recon_fn(config)
    n = len(images)
    batch_size = max(1, min(batch_size, n))

    sq, ab, counts = 0.0, 0.0, np.zeros(config.n_embed, np.int64)
    for i in range(0, n, batch_size):
        x = np.asarray(images[i:i + batch_size], np.float32)
        m = len(x)
        if m < batch_size:  # pad to one compiled shape
            x = np.concatenate([x, np.zeros((batch_size - m, *x.shape[1:]), np.float32)])
        s, a, idx = (np.asarray(v) for v in step(params, jnp.asarray(x)))
        sq += float(s[:m].sum())
        ab += float(a[:m].sum())
        counts += np.bincount(idx[:m].reshape(-1), minlength=config.n_embed)
    pixels = n * int(np.prod(images.shape[1:]))
    mse = sq / pixels
    p = counts / counts.sum()
    perplexity = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    mse01 = mse / 4.0
    return {"num_images": n, "mse_01": mse01, "psnr_db": 10.0 * math.log10(1.0 / max(mse01, 1e-12)),
            "mse_pm1": mse, "l1_pm1": ab / pixels, "codebook_usage": float((counts > 0).mean()),
            "codebook_perplexity": perplexity}


def train_vq(
    run_dir: str | Path,
    images: np.ndarray,
    cfg: TrainConfig,
    vq_config: dict | None = None,
    loss: VQLossConfig | None = None,
    test_images: np.ndarray | None = None,
    export_dir: str | Path | None = None,
    extra_meta: dict | None = None,
    checkpoint_eval_images: int = 1000,
) -> Path:
    """Train a VQModel on NHWC ``images`` in [-1, 1]; export the EMA weights; return the directory.

    Args:
      run_dir: checkpoints and ``train_log.jsonl``; rerunning resumes (see
        :func:`jaxquant.train.loop.train`).
      images: training images ``[N, H, W, C]`` in [-1, 1] (H, W divisible by the
        downsampling factor).
      cfg: optimisation settings (AdamW, warm-up, EMA, checkpoint interval).
      vq_config: first-stage config in model-directory form (default :data:`FMNIST_VQ`).
      loss: objective weights (default :class:`VQLossConfig`).
      test_images: held-out images; their reconstruction error goes into the exported
        ``config.json`` (the first ``checkpoint_eval_images`` at intermediate
        checkpoints, all of them at the end).
      export_dir: model directory to write (default ``run_dir/model``); rewritten at
        every checkpoint so a killed run leaves a usable first stage.
      extra_meta: merged into the ``"training"`` record.
    """
    ae_cfg = AutoencoderConfig.from_dict(vq_config or FMNIST_VQ)
    if ae_cfg.kind != "vq":
        raise ConfigError(f"train_vq trains VQ autoencoders; the config has kind {ae_cfg.kind!r}")
    f = ae_cfg.ddconfig.downsample_factor
    if images.ndim != 4 or images.shape[1] % f or images.shape[2] % f or images.shape[3] != ae_cfg.ddconfig.in_channels:
        raise ConfigError(f"training images of shape {images.shape} do not fit the autoencoder: expected "
                          f"[N, H, W, {ae_cfg.ddconfig.in_channels}] with H and W divisible by {f}")
    loss = loss or VQLossConfig()
    module = VQModel(ae_cfg)
    params = init_vq_params(module, images, cfg.seed, loss.init_images)
    n_params = sum(int(v.size) for v in jax.tree_util.tree_leaves(params))
    loss_fn = vq_loss(module, loss)
    export_dir = Path(export_dir or Path(run_dir) / "model")
    t_start = time.time()

    def export(ema_params: Any, step: int, eval_images: np.ndarray | None) -> None:
        extra: dict = {"training": {
            "steps": step, "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
            "ema_decay": cfg.ema_decay, "parameters": n_params, "loss": loss.to_dict(),
            "objective": "VQ-VAE: reconstruction + codebook + beta*commitment (straight-through), "
                         "gradient codebook with data init and dead-code pull; no GAN, no LPIPS",
            "session_wall_s": round(time.time() - t_start, 1), **(extra_meta or {})}}
        if eval_images is not None and len(eval_images):
            extra["test_reconstruction"] = reconstruction_metrics(ae_cfg, ema_params, eval_images)
        save_model_dir(export_dir, ModelDirMeta(VQ_ARCHITECTURE, ae_cfg.to_dict(), {}, extra=extra), ema_params)

    def on_checkpoint(state: Any) -> None:
        sub = None if test_images is None else test_images[:checkpoint_eval_images]
        export(state.ema_params, int(state.step), sub)

    print(f"train vq: {n_params / 1e6:.2f}M parameters, {images.shape[0]} images, run dir {run_dir}")
    state = train(run_dir, params, loss_fn, lambda idx: {"x": jnp.asarray(images[idx])}, images.shape[0], cfg,
                  description="vq", on_checkpoint=on_checkpoint)
    export(state.ema_params, int(state.step), test_images)
    return export_dir


def load_vq(path: str | Path) -> tuple[AutoencoderConfig, dict, ModelDirMeta]:
    """Read a directory written by :func:`train_vq`: ``(config, params, meta)``.

    Raises:
      CheckpointError: not a VQ autoencoder directory, or its parameters do not fit its config.
    """
    from jaxquant.api import check_param_tree

    meta, params = load_model_dir(path)
    if meta.architecture != VQ_ARCHITECTURE:
        raise CheckpointError(f"'{path}' holds a {meta.architecture!r} model, not a VQ autoencoder "
                              f"(train one with `jaxquant train vq`)")
    cfg = AutoencoderConfig.from_dict(meta.model)
    if cfg.kind != "vq":
        raise CheckpointError(f"'{path}' holds a {cfg.kind!r} autoencoder, not a VQ one")
    side = cfg.ddconfig.downsample_factor
    expected = jax.eval_shape(VQModel(cfg).init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, side, side, cfg.ddconfig.in_channels), jnp.float32))["params"]
    check_param_tree(expected, params, where=f"the parameters in '{path}'")
    return cfg, params, meta
