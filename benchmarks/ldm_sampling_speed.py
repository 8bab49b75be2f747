"""LDM sampling throughput (DDIM with classifier-free guidance): jaxquant's Flax port vs the CompVis PyTorch code.

A cin256-v2-family latent-diffusion model at reduced width: the CompVis ``UNetModel``
(``ldm.modules.diffusionmodules.openaimodel`` from ``stable-diffusion-sdkit``) with
model_channels 64, channel_mult [1, 2, 3, 5], attention at the same downsampling factors
(8, 4, 2), SpatialTransformer with context_dim 128; a class embedder
``nn.Embedding(1001, 128)`` (label 1000 = unconditional); 32×32×3 latents; a VQ-f4 first
stage at half width (ch 64, ch_mult [1, 2, 4]) decoding to 128×128 images. Random weights,
the same on both sides: the PyTorch modules are saved as a CompVis checkpoint + YAML and
converted with ``convert_compvis`` (what ``jaxquant convert --from compvis`` runs).

What is timed, per batch, on both sides from the same start noise and labels: DDIM-N
(eta 0, CompVis' "uniform" timesteps 951, 901, …, 1 for N = 20) with guidance as CompVis'
``DDIMSampler`` (one UNet call on the doubled batch, unconditional first, ``eps_u + s
(eps_c - eps_u)``), then the first-stage decode (VQ codebook lookup, ``post_quant_conv``,
CompVis ``Decoder``); ``--no-decode`` times the UNet loop only. PyTorch runs eagerly under
``inference_mode``; jaxquant runs :func:`jaxquant.diffusion.pipeline.sampling_fn`, the
jitted per-batch function ``jaxquant sample`` uses (compile time reported separately).
The sides are timed in interleaved repeats (median reported), and the JAX function also
compiled with XLA's default options for comparison. Prints images/s and the ratio;
``--json`` stores the result.

    python -m benchmarks.ldm_sampling_speed --batch 8 --steps 20 --cfg-scale 3.0   # from the repository root
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from benchmarks.common import machine, time_interleaved, write_result

LATENT = 32
N_CLASSES = 1001  # 1000 ImageNet classes + the unconditional label
UNET = {
    "image_size": LATENT, "in_channels": 3, "out_channels": 3, "model_channels": 64,
    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5], "num_heads": 1,
    "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 128,
}
VQ_F4 = {
    "embed_dim": 3, "n_embed": 8192,
    "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 4 * LATENT, "in_channels": 3, "out_ch": 3,
                 "ch": 64, "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
    "lossconfig": {"target": "torch.nn.Identity"},
}
# configs/latent-diffusion/cin256-v2.yaml with the reduced networks above.
YAML = {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
    "first_stage_key": "image", "cond_stage_key": "class_label", "image_size": LATENT, "channels": 3,
    "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss", "use_ema": False,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": UNET},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": VQ_F4},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                          "params": {"n_classes": N_CLASSES, "embed_dim": UNET["context_dim"], "key": "class_label"}},
}}}


@contextlib.contextmanager
def _omegaconf_stub():
    """The package's UNetModel imports ``omegaconf.listconfig.ListConfig`` only for a type
    check; stand in for it when omegaconf is not installed."""
    import importlib.util

    if "omegaconf" in sys.modules or importlib.util.find_spec("omegaconf") is not None:
        yield
        return
    pkg, sub = types.ModuleType("omegaconf"), types.ModuleType("omegaconf.listconfig")
    sub.ListConfig = type("ListConfig", (list,), {})
    pkg.listconfig = sub
    sys.modules["omegaconf"], sys.modules["omegaconf.listconfig"] = pkg, sub
    try:
        yield
    finally:
        del sys.modules["omegaconf"], sys.modules["omegaconf.listconfig"]


def _randomize(module, seed: int) -> None:
    """Non-trivial weights (CompVis zero-initialises output convs, which would make eps 0):
    uniform with variance 1/fan_in, embeddings variance 1, norm scales 1 ± 0.3, biases ± 0.2."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if isinstance(owner, torch.nn.Embedding):
                p.uniform_(-math.sqrt(3), math.sqrt(3), generator=g)
            elif p.ndim >= 2:
                a = math.sqrt(3 / p[0].numel())
                p.uniform_(-a, a, generator=g)
            elif name.endswith("weight"):
                p.uniform_(0.7, 1.3, generator=g)
            else:
                p.uniform_(-0.2, 0.2, generator=g)


def build_torch_ldm():
    """``(unet, first_stage, class_embedding, decode)`` from the CompVis modules, random weights."""
    import torch
    from ldm.modules.diffusionmodules import model as ae
    from ldm.modules.diffusionmodules import openaimodel

    with _omegaconf_stub():
        unet = openaimodel.UNetModel(**UNET).eval()
    dd = VQ_F4["ddconfig"]
    fs = torch.nn.Module()
    fs.encoder = ae.Encoder(**dd)  # unused here, but part of the checkpoint the converter reads
    fs.decoder = ae.Decoder(**dd)
    fs.quant_conv = torch.nn.Conv2d(dd["z_channels"], VQ_F4["embed_dim"], 1)
    fs.post_quant_conv = torch.nn.Conv2d(VQ_F4["embed_dim"], dd["z_channels"], 1)
    fs.quantize = torch.nn.Module()
    fs.quantize.embedding = torch.nn.Embedding(VQ_F4["n_embed"], VQ_F4["embed_dim"])
    fs.eval()
    emb = torch.nn.Embedding(N_CLASSES, UNET["context_dim"])
    for i, m in enumerate((unet, fs, emb)):
        _randomize(m, i)

    def decode(z):
        """CompVis ``decode_first_stage`` of a VQModelInterface (scale_factor 1): taming's
        VectorQuantizer2 nearest codebook entry, ``post_quant_conv``, ``Decoder``."""
        e = fs.quantize.embedding.weight
        zf = z.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
        zq = fs.quantize.embedding(d.argmin(1)).reshape(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        return fs.decoder(fs.post_quant_conv(zq))

    return unet, fs, emb, decode


def compvis_checkpoint(unet, fs, emb) -> dict:
    """The state dict of a CompVis LatentDiffusion holding these networks (+ schedule buffers)."""
    import torch
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    p = YAML["model"]["params"]
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in fs.state_dict().items()})
    sd["cond_stage_model.embedding.weight"] = emb.weight.detach()
    betas = make_beta_schedule("linear", p["timesteps"], p["linear_start"], p["linear_end"])
    sd["betas"] = torch.tensor(betas, dtype=torch.float32)
    sd["alphas_cumprod"] = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    return sd


def torch_ddim_runner(unet, emb, decode, steps: int, scale: float, do_decode: bool):
    """``run(x_T [B,3,H,W], labels [B]) -> (latents, images | None)``: CompVis DDIMSampler's
    loop (eta 0) with classifier-free guidance written out."""
    import torch
    from ldm.modules.diffusionmodules.util import make_beta_schedule, make_ddim_sampling_parameters, make_ddim_timesteps

    p = YAML["model"]["params"]
    alphacums = np.cumprod(1.0 - make_beta_schedule("linear", p["timesteps"], p["linear_start"], p["linear_end"]))
    ts = make_ddim_timesteps("uniform", steps, p["timesteps"], verbose=False)
    _, a, a_prev = make_ddim_sampling_parameters(alphacums, ts, 0.0, verbose=False)
    a = torch.tensor(a, dtype=torch.float32)
    a_prev = torch.tensor(np.asarray(a_prev), dtype=torch.float32)

    def run(x, labels):
        with torch.inference_mode():
            b = x.shape[0]
            c = emb(labels[:, None])
            uc = emb(torch.full_like(labels, N_CLASSES - 1)[:, None])
            c_in = torch.cat([uc, c]) if scale != 1.0 else c
            for i in reversed(range(len(ts))):
                t = torch.full((b,), int(ts[i]), dtype=torch.long)
                if scale != 1.0:
                    e_u, e_c = unet(torch.cat([x, x]), torch.cat([t, t]), context=c_in).chunk(2)
                    e = e_u + scale * (e_c - e_u)
                else:
                    e = unet(x, t, context=c_in)
                x0 = (x - (1 - a[i]).sqrt() * e) / a[i].sqrt()
                x = a_prev[i].sqrt() * x0 + (1 - a_prev[i]).sqrt() * e
            return x, (decode(x) if do_decode else None)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--no-decode", action="store_true", help="time the UNet loop only (no first-stage decode)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/ldm_sampling_speed.json")
    args = ap.parse_args()

    import jax
    import torch

    import jaxquant
    from checkpoints_convert.compvis import convert_compvis
    from jaxquant.diffusion import initial_noise
    from jaxquant.diffusion.pipeline import sampling_fn

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    b, n, s, decode = args.batch, args.steps, args.cfg_scale, not args.no_decode

    # One set of random weights; jaxquant reads them through the CompVis converter.
    unet, fs, emb, torch_decode = build_torch_ldm()
    n_unet = sum(p.numel() for p in unet.parameters())
    n_dec = sum(p.numel() for p in fs.decoder.parameters()) + sum(p.numel() for p in fs.post_quant_conv.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        import yaml

        ckpt, cfg = Path(tmp) / "model.ckpt", Path(tmp) / "config.yaml"
        torch.save({"state_dict": compvis_checkpoint(unet, fs, emb)}, ckpt)
        cfg.write_text(yaml.safe_dump(YAML, sort_keys=False))
        model = jaxquant.load(convert_compvis(ckpt, cfg, Path(tmp) / "jaxquant"))

    key = jax.random.key(0)
    x_T = initial_noise(key, (b, *model.sample_shape))
    labels = np.random.default_rng(0).integers(0, N_CLASSES - 1, b).astype(np.int32)

    # PyTorch (eager, CompVis modules).
    torch_run = torch_ddim_runner(unet, emb, torch_decode, n, s, decode)
    x_t = torch.from_numpy(np.asarray(x_T).transpose(0, 3, 1, 2).copy())
    y_t = torch.from_numpy(labels.astype(np.int64))
    torch_out = torch_run(x_t, y_t)  # warm-up

    # jaxquant: the jitted per-batch function of `jaxquant sample` (scan over steps + decode),
    # compiled with jaxquant's options (jaxquant.xla) and, for comparison, XLA's defaults.
    run = sampling_fn(model, steps=n, cfg_scale=s, decode=decode)
    run_default = run.with_xla_defaults()
    y = jax.numpy.asarray(labels)
    t0 = time.perf_counter()
    jax_out = run(model.params, x_T, key, y).block_until_ready()
    compile_s = time.perf_counter() - t0
    run_default(model.params, x_T, key, y).block_until_ready()
    times = time_interleaved({
        "torch": lambda: torch_run(x_t, y_t),
        "jax": lambda: run(model.params, x_T, key, y).block_until_ready(),
        "jax_xla_defaults": lambda: run_default(model.params, x_T, key, y).block_until_ready()}, args.repeats)
    t_torch, t_jax, t_default = (statistics.median(times[k]) for k in ("torch", "jax", "jax_xla_defaults"))

    # Same weights, noise and labels: the outputs should agree (VQ decoding may snap a few
    # latents to another codebook entry when they differ in the last bits).
    ref = (torch_out[1] if decode else torch_out[0]).numpy().transpose(0, 2, 3, 1)
    diff = np.abs(np.asarray(jax_out) - ref)
    agree = float(diff.max() / max(np.abs(ref).max(), 1e-12))
    what = "images" if decode else "latents"

    ips_torch, ips_jax = b / t_torch, b / t_jax
    timed = "UNet loop + VQ decode" if decode else "UNet loop only, no decode"
    print(f"DDIM-{n}, cfg scale {s:g}{' (doubled batch)' if s != 1.0 else ''}, batch {b}, {timed}; "
          f"cin256-v2 family at reduced width: UNet {n_unet / 1e6:.1f}M params on {LATENT}x{LATENT}x3 latents"
          + (f", decoder {n_dec / 1e6:.1f}M params -> {4 * LATENT}x{4 * LATENT} images" if decode else ""))
    print(f"  CompVis (PyTorch):   {ips_torch:7.3f} images/s  ({t_torch:.2f} s per batch)")
    print(f"  jaxquant (Flax/XLA): {ips_jax:7.3f} images/s  ({t_jax:.2f} s per batch; first call incl. compile "
          f"{compile_s:.1f} s)")
    print(f"  jaxquant, XLA's default options: {b / t_default:7.3f} images/s")
    print(f"  ratio jax/torch: {ips_jax / ips_torch:.2f}x  (XLA defaults: {t_torch / t_default:.2f}x; "
          f"median of {args.repeats} interleaved repeats)")
    print(f"  outputs ({what}): max|Δ|/max|ref| = {agree:.2e}, mean|Δ| = {float(diff.mean()):.2e}")
    if args.json:
        path = write_result("ldm_sampling_speed", {
            "batch": b, "steps": n, "cfg_scale": s, "decode": decode, "unet_params": n_unet, "decoder_params": n_dec,
            "latent_shape": [LATENT, LATENT, 3], "torch_images_per_s": ips_torch, "jax_images_per_s": ips_jax,
            "ratio": ips_jax / ips_torch, "jax_compile_s": compile_s, "max_rel_diff": agree,
            "jax_xla_defaults_images_per_s": b / t_default, "ratio_xla_defaults": t_torch / t_default,
            "times_s": times})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
