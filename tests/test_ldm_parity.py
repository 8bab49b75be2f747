"""Parity and error tests of the latent-diffusion port and ``jaxquant convert --from compvis``.

The reference is the CompVis code as shipped in the PyPI package ``stable-diffusion-sdkit``
(``ldm/modules/diffusionmodules/openaimodel.py``, ``ldm/modules/attention.py``,
``ldm/modules/diffusionmodules/model.py``), installed with ``--no-deps`` next to ``einops``.
Every network gets random weights (fixed seeds) with norm scales and biases perturbed, since
their init values (1/0) and CompVis' zero-initialised output convs would hide layout
mistakes. Tolerance: max|Δ| / max|ref| ≤ 1e-4 in float32.

The cin256-v2 test runs the real network sizes (400.9M-parameter UNet, 55M-parameter VQ-f4)
through a fake CompVis ``.ckpt`` + YAML, the CLI converter and ``jaxquant.load``. To stay
fast on a 2-core CPU it evaluates the fully convolutional networks at a smaller spatial size
than the 64×64 latents / 256×256 images they are trained on; every layer, channel width and
attention layer is still exercised.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("einops")
pytest.importorskip("yaml")
pytest.importorskip("ldm.modules.diffusionmodules.openaimodel")

import jax  # noqa: E402
import yaml  # noqa: E402
from ldm.modules.diffusionmodules import model as ref_ae  # noqa: E402
from ldm.modules.diffusionmodules import openaimodel as ref_unet  # noqa: E402
from ldm.modules.diffusionmodules.util import make_beta_schedule  # noqa: E402

import jaxquant  # noqa: E402
from checkpoints_convert.common import state_dict_to_params  # noqa: E402
from checkpoints_convert.compvis import convert_compvis  # noqa: E402
from jaxquant import cli  # noqa: E402
from jaxquant.diffusion.schedules import ScheduleConfig, alphas_cumprod  # noqa: E402
from jaxquant.errors import CheckpointError, ConfigError  # noqa: E402
from jaxquant.io.model_dir import flatten_params  # noqa: E402
from jaxquant.models.openai_unet import OpenAIUNet, OpenAIUNetConfig  # noqa: E402

REL_TOL = 1e-4

# configs/latent-diffusion/cin256-v2.yaml (model section).
CIN256_UNET = {
    "image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 192,
    "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 5],
    "num_heads": 1, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512,
}
VQ_F4_DDCONFIG = {
    "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
CIN256 = {
    "unet": CIN256_UNET,
    "first_stage": {"target": "ldm.models.autoencoder.VQModelInterface",
                    "params": {"embed_dim": 3, "n_embed": 8192, "ddconfig": VQ_F4_DDCONFIG,
                               "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                   "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"}},
    "extra": {"linear_start": 0.0015, "linear_end": 0.0195, "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": 1000, "first_stage_key": "image", "cond_stage_key": "class_label", "image_size": 64,
              "channels": 3, "cond_stage_trainable": True, "conditioning_key": "crossattn", "monitor": "val/loss",
              "use_ema": False},
}

# The same layout at small width, with attention in the autoencoder as well.
SMALL = {
    "unet": {"image_size": 16, "in_channels": 3, "out_channels": 3, "model_channels": 32,
             "attention_resolutions": [4, 2], "num_res_blocks": 1, "channel_mult": [1, 2, 3], "num_heads": 1,
             "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 64},
    "first_stage": {"target": "ldm.models.autoencoder.VQModelInterface",
                    "params": {"embed_dim": 3, "n_embed": 64,
                               "ddconfig": {"double_z": False, "z_channels": 3, "resolution": 32, "in_channels": 3,
                                            "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                                            "attn_resolutions": [16], "dropout": 0.0},
                               "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage": {"target": "ldm.modules.encoders.modules.ClassEmbedder",
                   "params": {"n_classes": 11, "embed_dim": 64, "key": "class_label"}},
    "extra": {"linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "conditioning_key": "crossattn",
              "image_size": 16, "channels": 3},
}

# Unconditional LDM with a KL first stage (the LSUN / CelebA-HQ layout) and a scale factor.
SMALL_KL_UNCOND = {
    "unet": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 16,
             "use_scale_shift_norm": True},
    "first_stage": {"target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {"embed_dim": 4, "monitor": "val/rec_loss",
                               "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3,
                                            "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                                            "attn_resolutions": [8], "dropout": 0.0},
                               "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage": "__is_unconditional__",
    "extra": {"linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "scale_factor": 0.18215,
              "image_size": 8, "channels": 4, "conditioning_key": None},
}


# ----------------------------------------------------------------------------- reference models


@contextlib.contextmanager
def omegaconf_stub():
    """The SD2 copy of UNetModel imports ``omegaconf.listconfig.ListConfig`` only to
    ``type()``-compare ``context_dim`` with it; provide a stand-in class when omegaconf
    is not installed (it is not needed for anything else here)."""
    if "omegaconf" in sys.modules or _has_module("omegaconf"):
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


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def randomize(module, seed: int) -> None:
    """Fill every parameter with non-trivial values (uniform noise, cheaper than normal at 400M
    parameters): weights of variance 1/fan_in, embeddings of variance 1, 1-d ``weight`` (norm
    scales) 1 ± 0.3, biases ± 0.2."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if isinstance(_owner(module, name), torch.nn.Embedding):
                p.uniform_(-math.sqrt(3), math.sqrt(3), generator=g)
            elif p.ndim >= 2:
                a = math.sqrt(3 / p[0].numel())
                p.uniform_(-a, a, generator=g)
            elif name.endswith("weight"):
                p.uniform_(0.7, 1.3, generator=g)
            else:
                p.uniform_(-0.2, 0.2, generator=g)


def on_cpu_uninitialised(build):
    """``build()`` on the meta device, then real (uninitialised) CPU storage: skips torch's
    default init, which :func:`randomize` overwrites anyway."""
    with torch.device("meta"):
        m = build()
    return m.to_empty(device="cpu").eval()


def _owner(module, param_name: str):
    return module.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else module


def make_ref_unet(params: dict, seed: int):
    params = dict(params)
    if params.get("transformer_depth", 1) > 1 and params.get("context_dim") is not None:
        # The SD2 copy indexes context_dim per transformer block; CompVis' takes one int.
        params["context_dim"] = [params["context_dim"]] * params["transformer_depth"]
    with omegaconf_stub():
        m = on_cpu_uninitialised(lambda: ref_unet.UNetModel(**params))
    randomize(m, seed)
    return m


class RefFirstStage(torch.nn.Module):
    """CompVis VQModelInterface / AutoencoderKL inference path with the package's Encoder/Decoder.
    (Their wrapper classes need pytorch_lightning; the forward is a few lines.)"""

    def __init__(self, fs: dict):
        super().__init__()
        p = fs["params"]
        dd = p["ddconfig"]
        self.kind = "kl" if fs["target"].endswith("AutoencoderKL") else "vq"
        self.encoder = ref_ae.Encoder(**dd)
        self.decoder = ref_ae.Decoder(**dd)
        zq = 2 * p["embed_dim"] if self.kind == "kl" else p["embed_dim"]
        self.quant_conv = torch.nn.Conv2d(2 * dd["z_channels"] if dd["double_z"] else dd["z_channels"], zq, 1)
        self.post_quant_conv = torch.nn.Conv2d(p["embed_dim"], dd["z_channels"], 1)
        if self.kind == "vq":
            self.quantize = torch.nn.Module()
            self.quantize.embedding = torch.nn.Embedding(p["n_embed"], p["embed_dim"])

    def encode(self, x):
        h = self.quant_conv(self.encoder(x))
        return torch.chunk(h, 2, dim=1)[0] if self.kind == "kl" else h  # KL: the posterior mean

    def quantize_indices(self, z):
        """taming VectorQuantizer2: argmin of |z|² + |e|² - 2 z·e."""
        e = self.quantize.embedding.weight
        zf = z.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
        d = zf.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
        return d.argmin(1).reshape(z.shape[0], z.shape[2], z.shape[3])

    def decode(self, z):
        if self.kind == "vq":
            z = self.quantize.embedding(self.quantize_indices(z)).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z))


@dataclasses.dataclass
class RefLDM:
    unet: torch.nn.Module
    first_stage: RefFirstStage
    embedding: torch.nn.Embedding | None
    scale_factor: float

    def eps(self, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
            context = None if y is None else self.embedding(torch.from_numpy(y.astype(np.int64))[:, None])
            out = self.unet(x, torch.from_numpy(t.astype(np.int64)), context=context)
        return out.numpy().transpose(0, 2, 3, 1)

    def encode(self, images_nhwc: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = self.first_stage.encode(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))))
        return z.numpy().transpose(0, 2, 3, 1) * self.scale_factor

    def decode(self, latents_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with torch.no_grad():
            z = torch.from_numpy(np.ascontiguousarray(latents_nhwc.transpose(0, 3, 1, 2))) / self.scale_factor
            idx = self.first_stage.quantize_indices(z).numpy() if self.first_stage.kind == "vq" else None
            img = self.first_stage.decode(z)
        return img.numpy().transpose(0, 2, 3, 1), idx


def make_ref_ldm(spec: dict, seed: int) -> RefLDM:
    unet = make_ref_unet(spec["unet"], seed)
    fs = on_cpu_uninitialised(lambda: RefFirstStage(spec["first_stage"]))
    randomize(fs, seed + 1)
    emb = None
    if isinstance(spec["cond_stage"], dict):
        cp = spec["cond_stage"]["params"]
        emb = torch.nn.Embedding(cp["n_classes"], cp["embed_dim"])
        randomize(emb, seed + 2)
    return RefLDM(unet, fs, emb, spec["extra"].get("scale_factor", 1.0))


def compvis_state_dict(ref: RefLDM, spec: dict) -> dict:
    """The tensors a CompVis LatentDiffusion checkpoint of ``ref`` holds (incl. schedule buffers)."""
    sd = {f"model.diffusion_model.{k}": v for k, v in ref.unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in ref.first_stage.state_dict().items()})
    if ref.embedding is not None:
        sd["cond_stage_model.embedding.weight"] = ref.embedding.weight.detach()
    ex = spec["extra"]
    betas = make_beta_schedule("linear", ex["timesteps"], ex["linear_start"], ex["linear_end"])
    ac = np.cumprod(1.0 - betas)
    for name, value in (("betas", betas), ("alphas_cumprod", ac), ("alphas_cumprod_prev", np.append(1.0, ac[:-1])),
                        ("sqrt_alphas_cumprod", np.sqrt(ac)), ("posterior_variance", betas * (1.0 - np.append(1.0, ac[:-1])) / (1.0 - ac))):
        sd[name] = torch.tensor(value, dtype=torch.float32)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return sd


def compvis_yaml(spec: dict) -> dict:
    spec = copy.deepcopy(spec)
    params = spec["extra"]
    params["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": spec["unet"]}
    params["first_stage_config"] = spec["first_stage"]
    params["cond_stage_config"] = spec["cond_stage"]
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}}


def write_compvis(tmp: Path, ref: RefLDM, spec: dict, sd: dict | None = None, yaml_doc: dict | None = None) -> tuple[Path, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = tmp / "model.ckpt", tmp / "config.yaml"
    torch.save({"state_dict": compvis_state_dict(ref, spec) if sd is None else sd}, ckpt)
    cfg.write_text(yaml.safe_dump(compvis_yaml(spec) if yaml_doc is None else yaml_doc, sort_keys=False))
    return ckpt, cfg


def cli_convert(ckpt: Path, cfg: Path, out: Path) -> None:
    assert cli.main(["convert", "--from", "compvis", str(ckpt), "--config", str(cfg), "--out", str(out)]) == 0


def expect_cli_error(capsys, ckpt: Path, cfg: Path, out: Path, *needles: str) -> str:
    rc = cli.main(["convert", "--from", "compvis", str(ckpt), "--config", str(cfg), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err and err.startswith("jaxquant convert: error:")
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr:\n{err}"
    return err


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all()
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def check_ldm(ref: RefLDM, m, latent: int, image: int, timesteps, labels, batch: int, seed: int = 0) -> dict:
    """Compare eps (cycling timesteps/labels through batches), encode and decode; return the errors."""
    rng = np.random.default_rng(seed)
    errs = {}
    x = rng.standard_normal((batch, latent, latent, m.network_config.in_channels)).astype(np.float32)
    ts = np.asarray(timesteps)
    for start in range(0, len(ts), batch):
        t = np.resize(ts[start:start + batch], batch)
        y = None if labels is None else np.resize(np.asarray(labels)[start:start + batch], batch).astype(np.int32)
        e = rel_err(m(x, t, y), ref.eps(x, t, y))
        errs[f"eps t={t.tolist()} y={None if y is None else y.tolist()}"] = e
        assert e <= REL_TOL, f"eps t={t.tolist()} y={y}: max|Δ|/max|ref| = {e:.3g}"

    images = rng.uniform(-1, 1, (1, image, image, 3)).astype(np.float32)
    errs["encode"] = e = rel_err(m.encode(images), ref.encode(images))
    assert e <= REL_TOL, f"encode: {e:.3g}"

    zside = image // m.network_config.first_stage.ddconfig.downsample_factor
    fs = m.network_config.first_stage
    if fs.kind == "vq":
        # Latents next to codebook entries, so the nearest entry is unambiguous in float32.
        book = np.asarray(m.params["first_stage"]["quantize"]["embedding"]["embedding"])
        idx = rng.integers(0, book.shape[0], (1, zside, zside))
        z = (book[idx] + 1e-3 * rng.standard_normal((1, zside, zside, book.shape[1]))).astype(np.float32)
        z *= m.network_config.scale_factor
    else:
        z = rng.standard_normal((1, zside, zside, fs.embed_dim)).astype(np.float32)
    ref_img, ref_idx = ref.decode(z)
    if ref_idx is not None:
        np.testing.assert_array_equal(ref_idx, idx)
    errs["decode"] = e = rel_err(m.decode(z), ref_img)
    assert e <= REL_TOL, f"decode: {e:.3g}"
    return errs


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- cin256-v2 at real sizes


def test_cin256_v2_real_sizes(tmp_path):
    """The LDM-4 ImageNet network at its real widths/depths, through .ckpt + YAML → CLI → load."""
    try:
        _check_cin256(tmp_path)
    finally:  # the converted model directory holds 1.8 GB
        shutil.rmtree(tmp_path, ignore_errors=True)


def _check_cin256(tmp_path: Path) -> None:
    ref = make_ref_ldm(CIN256, seed=0)
    assert n_params(ref.unet) == 400_920_579
    assert n_params(ref.first_stage) == 55_322_782
    ckpt, cfg = write_compvis(tmp_path / "src", ref, CIN256)
    cli_convert(ckpt, cfg, tmp_path / "dst")
    ckpt.unlink()  # 1.8 GB; not needed any more

    m = jaxquant.load(tmp_path / "dst")
    assert m.architecture == "ldm" and m.is_class_conditional
    assert m.sample_shape == (64, 64, 3)
    assert m.network_config.unconditional_label == 1000 and m.network_config.decoded_size == 256
    written = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert written["schedule"]["beta_schedule"] == "scaled_linear"
    assert written["model"]["unet"]["channel_mult"] == [1, 2, 3, 5]
    flat = flatten_params(m.params)
    assert flat["unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q.kernel"].shape == (384, 384)
    assert flat["unet.input_blocks.4.1.transformer_blocks.0.attn2.to_k.kernel"].shape == (512, 384)
    assert flat["first_stage.quantize.embedding.embedding"].shape == (8192, 3)
    assert flat["cond_stage.embedding.embedding"].shape == (1001, 512)

    # UNet at a 16×16 latent (bottom level 2×2; the 8×/4×/2× attention levels at 2/4/8 px);
    # first stage on 32×32 images (8×8 latents).
    errs = check_ldm(ref, m, latent=16, image=32, timesteps=(0, 999, 500, 10), labels=(1000, 3, 417, 999), batch=4)
    print("cin256-v2 parity (max|Δ|/max|ref|):", {k: f"{v:.2e}" for k, v in errs.items()})


# ----------------------------------------------------------------------------- reduced width


@pytest.mark.parametrize("spec", [SMALL, SMALL_KL_UNCOND], ids=["vq-classembedder", "kl-unconditional"])
def test_reduced_width_ldm(tmp_path, spec):
    ref = make_ref_ldm(spec, seed=3)
    ckpt, cfg = write_compvis(tmp_path / "src", ref, spec)
    cli_convert(ckpt, cfg, tmp_path / "dst")
    m = jaxquant.load(tmp_path / "dst")
    conditional = isinstance(spec["cond_stage"], dict)
    assert m.is_class_conditional == conditional
    assert m.network_config.scale_factor == spec["extra"].get("scale_factor", 1.0)
    labels = (0, 10, 5, 7) if conditional else None
    errs = check_ldm(ref, m, latent=spec["unet"]["image_size"], image=32, timesteps=(0, 999, 500, 10), labels=labels, batch=2)
    print(f"{spec['first_stage']['target']} parity:", {k: f"{v:.2e}" for k, v in errs.items()})


UNET_VARIANTS = {
    "attentionblock-legacy": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 4},
    "attentionblock-neworder-headch-scaleshift-updown-labels": {
        "image_size": 8, "in_channels": 4, "out_channels": 8, "model_channels": 32, "attention_resolutions": [1, 2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": -1, "num_head_channels": 16,
        "use_new_attention_order": True, "use_scale_shift_norm": True, "resblock_updown": True, "num_classes": 10},
    "attentionblock-upsample-heads-avgpool": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [2],
        "num_res_blocks": [1, 2], "channel_mult": [1, 2], "num_heads": 2, "num_heads_upsample": 4,
        "conv_resample": False},
    "transformer-depth2-heads2-nonlegacy": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 64, "attention_resolutions": [1, 2],
        "num_res_blocks": 1, "channel_mult": [1, 1], "num_heads": 2, "use_spatial_transformer": True,
        "transformer_depth": 2, "context_dim": 24, "legacy": False},
    "transformer-headch-legacy": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 64, "attention_resolutions": [2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 32, "use_spatial_transformer": True,
        "context_dim": 16},
}


@pytest.mark.parametrize("name", list(UNET_VARIANTS))
def test_unet_variants(name):
    params = UNET_VARIANTS[name]
    ref = make_ref_unet(params, seed=5)
    cfg = OpenAIUNetConfig.from_dict(params)
    module = OpenAIUNet(cfg)
    rng = np.random.default_rng(1)
    b, s = 2, params["image_size"]
    x = rng.standard_normal((b, s, s, params["in_channels"])).astype(np.float32)
    t = np.array([3, 871])
    y = np.array([9, 2]) if cfg.num_classes else None
    ctx = rng.standard_normal((b, 4, cfg.context_dim)).astype(np.float32) if cfg.context_dim else None  # 4 tokens
    shapes = jax.eval_shape(module.init, jax.random.key(0), x, t, ctx, y)["params"]
    params_jax = state_dict_to_params(shapes, {k: v.numpy() for k, v in ref.state_dict().items()})
    out = module.apply({"params": params_jax}, x, t, ctx, y)
    context = None if ctx is None else torch.from_numpy(ctx)
    if context is not None and cfg.transformer_depth > 1:
        context = [context] * cfg.transformer_depth  # the SD2 copy's per-block context list
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t), context=context,
                   y=None if y is None else torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)
    e = rel_err(out, want)
    assert e <= REL_TOL, f"{name}: max|Δ|/max|ref| = {e:.3g}"


def test_schedule_matches_compvis(tmp_path):
    """The stored schedule reproduces CompVis' make_beta_schedule("linear") tables (float32)."""
    from checkpoints_convert.compvis import ldm_config_from_yaml

    _, schedule, _ = ldm_config_from_yaml(compvis_yaml(CIN256))
    sc = ScheduleConfig.from_dict(schedule)
    betas = make_beta_schedule("linear", 1000, 0.0015, 0.0195)
    want = np.cumprod(1.0 - betas).astype(np.float32)
    np.testing.assert_allclose(alphas_cumprod(sc), want, rtol=2e-6)
    assert sc.steps_offset == 1 and not sc.set_alpha_to_one and not sc.clip_sample


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def small_ref():
    return make_ref_ldm(SMALL, seed=7)


def test_safetensors_checkpoint(small_ref, tmp_path):
    """A .safetensors state dict converts to the same parameters as the .ckpt (parity: above)."""
    from safetensors.torch import save_file

    from jaxquant.io.model_dir import load_model_dir

    ckpt, cfg = write_compvis(tmp_path / "src", small_ref, SMALL)
    sd = {k: v.contiguous() for k, v in compvis_state_dict(small_ref, SMALL).items()}
    save_file(sd, str(tmp_path / "src" / "model.safetensors"))
    a = flatten_params(load_model_dir(convert_compvis(ckpt, cfg, tmp_path / "a"))[1])
    b = flatten_params(load_model_dir(convert_compvis(tmp_path / "src" / "model.safetensors", cfg, tmp_path / "b"))[1])
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["source"]["format"] == "compvis" and meta["architecture"] == "ldm"


def test_error_missing_and_unexpected(small_ref, tmp_path, capsys):
    sd = compvis_state_dict(small_ref, SMALL)
    del sd["model.diffusion_model.out.2.weight"], sd["first_stage_model.quantize.embedding.weight"]
    sd["model.diffusion_model.extra_head.weight"] = torch.zeros(3)
    sd["cond_stage_model.transformer.bogus"] = torch.zeros(3)
    ckpt, cfg = write_compvis(tmp_path / "src", small_ref, SMALL, sd=sd)
    with pytest.raises(CheckpointError) as exc:
        convert_compvis(ckpt, cfg, tmp_path / "dst")
    msg = str(exc.value)
    assert "missing tensors (2): first_stage_model.quantize.embedding.weight, model.diffusion_model.out.2.weight" in msg
    assert "unexpected tensors (2): cond_stage_model.transformer.bogus, model.diffusion_model.extra_head.weight" in msg
    assert "model_ema" not in msg and "betas" not in msg
    expect_cli_error(capsys, ckpt, cfg, tmp_path / "dst", "model.diffusion_model.out.2.weight", "cond_stage_model.transformer.bogus")
    assert not (tmp_path / "dst").exists()


def test_error_shape_mismatch(small_ref, tmp_path, capsys):
    sd = compvis_state_dict(small_ref, SMALL)
    sd["cond_stage_model.embedding.weight"] = torch.zeros(1000, 64)
    sd["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"] = torch.zeros(64, 512)
    ckpt, cfg = write_compvis(tmp_path / "src", small_ref, SMALL, sd=sd)
    expect_cli_error(capsys, ckpt, cfg, tmp_path / "dst",
                     "cond_stage_model.embedding.weight: expected (11, 64), found (1000, 64)",
                     "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight: expected (64, 64), found (64, 512)")


class _RunsCode:
    """Pickles to a call of os.system: must never be unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_error_pickle_with_code(small_ref, tmp_path, capsys):
    marker = tmp_path / "executed"
    ckpt, cfg = write_compvis(tmp_path / "src", small_ref, SMALL)
    torch.save({"state_dict": {"betas": torch.zeros(3)}, "callbacks": _RunsCode(marker)}, ckpt)
    expect_cli_error(capsys, ckpt, cfg, tmp_path / "dst", "needs more than tensors", "does not run code")
    assert not marker.exists()


def test_error_schedule_disagrees(small_ref, tmp_path, capsys):
    doc = compvis_yaml(SMALL)
    doc["model"]["params"]["linear_end"] = 0.012  # the checkpoint's betas end at 0.0195
    ckpt, cfg = write_compvis(tmp_path / "src", small_ref, SMALL, yaml_doc=doc)
    expect_cli_error(capsys, ckpt, cfg, tmp_path / "dst", "buffer 'betas' differs from the YAML schedule")


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["unet_config"]["params"].update(use_linear_in_transformer=True), "'use_linear_in_transformer'"),
    (lambda p: p["unet_config"]["params"].update(made_up_option=1), "made_up_option"),
    (lambda p: p["unet_config"]["params"].update(dims=3), "'dims'"),
    (lambda p: p["first_stage_config"]["params"]["ddconfig"].update(attn_type="linear"), "'attn_type'"),
    (lambda p: p.update(parameterization="x0"), "'parameterization'"),
    (lambda p: p.update(beta_schedule="sqrt"), "'beta_schedule'"),
    (lambda p: p.update(conditioning_key="concat"), "'conditioning_key'"),
    (lambda p: p["unet_config"]["params"].pop("context_dim"), "'context_dim'"),
], ids=["linear-transformer", "unknown-field", "dims", "attn-type", "parameterization", "beta-schedule",
        "conditioning-key", "missing-context-dim"])
def test_error_unsupported_config(tmp_path, capsys, edit, needle):
    doc = compvis_yaml(SMALL)
    edit(doc["model"]["params"])
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=needle.replace("'", ".")):
        convert_compvis(tmp_path / "none.ckpt", cfg, tmp_path / "dst")
    expect_cli_error(capsys, tmp_path / "none.ckpt", cfg, tmp_path / "dst", needle)


def test_error_cli_needs_config(tmp_path, capsys):
    rc = cli.main(["convert", "--from", "compvis", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "dst")])
    err = capsys.readouterr().err
    assert rc != 0 and "--config" in err and "Traceback" not in err
