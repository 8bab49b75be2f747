"""Flax port of the CompVis first-stage autoencoders (``ldm/modules/diffusionmodules/model.py``).

``Encoder`` / ``Decoder`` cover every ``ddconfig`` of that family (``ch``, ``ch_mult``,
``num_res_blocks``, ``attn_resolutions``, ``resamp_with_conv``, ``double_z``,
``give_pre_end``, ``tanh_out``, ``attn_type`` "vanilla" or "none"). On top of them:

* :class:`VQModel`: ``quant_conv`` → nearest codebook entry (``quantize.embedding``,
  L2 distance as taming's ``VectorQuantizer2``) → ``post_quant_conv`` → decoder. The
  LDM-4 ImageNet first stage is VQ-f4 (embed_dim 3, n_embed 8192, ch 128,
  ch_mult [1, 2, 4], two res blocks per level, no attention resolutions).
* :class:`AutoencoderKL`: ``quant_conv`` gives the Gaussian posterior's mean and
  log-variance; :meth:`AutoencoderKL.encode` returns the mean (deterministic).

Module names follow the checkpoint (``encoder.down.1.block.0.conv1``,
``decoder.up.2.upsample.conv``, ``quantize.embedding``). Layout NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.errors import ConfigError
from jaxquant.models.layers import Conv, GroupNorm, attend, upsample_nearest2x

_DD_REQUIRED = ("ch", "out_ch", "num_res_blocks", "attn_resolutions", "in_channels", "resolution", "z_channels")
_DD_DEFAULTS: dict[str, Any] = {
    "ch_mult": (1, 2, 4, 8),
    "dropout": 0.0,
    "resamp_with_conv": True,
    "double_z": True,
    "use_linear_attn": False,
    "attn_type": "vanilla",
    "give_pre_end": False,
    "tanh_out": False,
}
ATTN_TYPES = ("vanilla", "none")

#: ``first_stage_config.target`` values and the kind of autoencoder they are.
FIRST_STAGE_TARGETS = {
    "ldm.models.autoencoder.VQModelInterface": "vq",
    "ldm.models.autoencoder.VQModel": "vq",
    "taming.models.vqgan.VQModel": "vq",
    "ldm.models.autoencoder.AutoencoderKL": "kl",
}
# VQModel / AutoencoderKL constructor arguments that only matter for training or for
# loading inside CompVis (ignored here), and those accepted only at one value.
_AE_IGNORED = frozenset({
    "lossconfig", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels", "monitor", "batch_resize_range",
    "scheduler_config", "lr_g_factor", "use_ema", "sane_index_shape", "beta", "ema_decay", "learn_logvar",
})
_AE_DEFAULT_ONLY: dict[str, Any] = {"remap": None}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class DDConfig:
    """A validated CompVis ``ddconfig`` (the Encoder/Decoder constructor arguments)."""

    ch: int
    out_ch: int
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    resolution: int
    z_channels: int
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    double_z: bool = True
    use_linear_attn: bool = False
    attn_type: str = "vanilla"
    give_pre_end: bool = False
    tanh_out: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DDConfig":
        """Build from a ``ddconfig`` mapping.

        Raises:
          ConfigError: unknown or missing field, or an unsupported value (named).
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"ddconfig must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _DD_REQUIRED and k not in _DD_DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown ddconfig field(s): {', '.join(unknown)}")
        missing = [k for k in _DD_REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"ddconfig is missing the required field(s): {', '.join(missing)}")
        kw = dict(d)
        for key in ("ch_mult", "attn_resolutions"):
            v = kw.get(key, _DD_DEFAULTS.get(key))
            if not isinstance(v, (list, tuple)) or not all(_is_int(i) and i > 0 for i in v):
                raise ConfigError(f"ddconfig field {key!r} = {v!r} must be a list of positive integers")
            kw[key] = tuple(v)
        c = cls(**kw)
        c.validate()
        return c

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unsupported field."""
        for f in ("ch", "out_ch", "num_res_blocks", "in_channels", "resolution", "z_channels"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 1:
                raise ConfigError(f"ddconfig field {f!r} = {getattr(self, f)!r} must be a positive integer")
        if self.use_linear_attn:
            raise ConfigError("ddconfig field 'use_linear_attn' = True is not supported (linear attention is not implemented)")
        if self.attn_type not in ATTN_TYPES:
            raise ConfigError(f"ddconfig field 'attn_type' = {self.attn_type!r} is not supported (supported: {list(ATTN_TYPES)})")
        if self.ch % 32:
            raise ConfigError(f"ddconfig field 'ch' = {self.ch} must be divisible by 32 (GroupNorm with 32 groups)")
        for f in ("resamp_with_conv", "double_z", "give_pre_end", "tanh_out"):
            if not isinstance(getattr(self, f), bool):
                raise ConfigError(f"ddconfig field {f!r} = {getattr(self, f)!r} must be true or false")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """The first stage of a latent-diffusion model: ``kind`` "vq" or "kl", ``embed_dim``, ``ddconfig``.

    ``n_embed`` is the VQ codebook size (None for "kl").
    """

    kind: str
    embed_dim: int
    ddconfig: DDConfig
    n_embed: int | None = None

    @classmethod
    def from_compvis(cls, first_stage_config: Mapping[str, Any]) -> "AutoencoderConfig":
        """Build from a YAML ``first_stage_config`` (``target`` + ``params``).

        Raises:
          ConfigError: unknown target, unknown/unsupported field (named).
        """
        if not isinstance(first_stage_config, Mapping):
            raise ConfigError(f"first_stage_config must be a mapping with target and params, got {first_stage_config!r}")
        target = first_stage_config.get("target")
        if target not in FIRST_STAGE_TARGETS:
            raise ConfigError(f"first_stage_config target {target!r} is not supported (supported: {', '.join(FIRST_STAGE_TARGETS)})")
        kind = FIRST_STAGE_TARGETS[target]
        params = dict(first_stage_config.get("params") or {})
        known = {"embed_dim", "ddconfig"} | ({"n_embed"} if kind == "vq" else set())
        for key, default in _AE_DEFAULT_ONLY.items():
            if params.get(key, default) != default:
                raise ConfigError(f"first_stage_config field {key!r} = {params[key]!r} is not supported (only {default!r})")
        unknown = sorted(str(k) for k in params if k not in known and k not in _AE_IGNORED and k not in _AE_DEFAULT_ONLY)
        if unknown:
            raise ConfigError(f"unknown first_stage_config field(s) for {target}: {', '.join(unknown)}")
        for key in sorted(known):
            if key not in params:
                raise ConfigError(f"first_stage_config is missing the field {key!r}")
        return cls.from_dict({"kind": kind, "embed_dim": params["embed_dim"], "n_embed": params.get("n_embed"),
                              "ddconfig": params["ddconfig"]})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AutoencoderConfig":
        """Build from :meth:`to_dict` output (a model directory's ``first_stage`` entry)."""
        unknown = sorted(str(k) for k in d if k not in ("kind", "embed_dim", "n_embed", "ddconfig"))
        if unknown:
            raise ConfigError(f"unknown first-stage config field(s): {', '.join(unknown)}")
        kind = d.get("kind")
        if kind not in ("vq", "kl"):
            raise ConfigError(f"first-stage config field 'kind' = {kind!r} is not supported (supported: ['vq', 'kl'])")
        dd = DDConfig.from_dict(d.get("ddconfig") or {})
        embed_dim, n_embed = d.get("embed_dim"), d.get("n_embed")
        if not _is_int(embed_dim) or embed_dim < 1:
            raise ConfigError(f"first-stage config field 'embed_dim' = {embed_dim!r} must be a positive integer")
        if kind == "vq":
            if not _is_int(n_embed) or n_embed < 1:
                raise ConfigError(f"first-stage config field 'n_embed' = {n_embed!r} must be a positive integer")
            if dd.double_z:
                raise ConfigError("ddconfig field 'double_z' = True does not fit a VQ first stage (CompVis VQ models use false)")
        else:
            n_embed = None
            if not dd.double_z:
                raise ConfigError("ddconfig field 'double_z' = False does not fit a KL first stage (its encoder gives mean and log-variance)")
        return cls(kind, embed_dim, dd, n_embed)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "embed_dim": self.embed_dim, "n_embed": self.n_embed, "ddconfig": self.ddconfig.to_dict()}


# --------------------------------------------------------------------------- blocks


def _norm(name: str, dtype: Any) -> GroupNorm:
    return GroupNorm(32, 1e-6, dtype, name=name)  # ``Normalize``: GroupNorm(32, eps=1e-6)


class ResnetBlock(nn.Module):
    """``ResnetBlock`` without time embedding (``temb_channels=0``), ``nin_shortcut`` on a channel change."""

    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        dt = self.dtype
        h = Conv(self.out_channels, 3, padding=1, dtype=dt, name="conv1")(nn.silu(_norm("norm1", dt)(x)))
        h = nn.Dropout(self.dropout)(nn.silu(_norm("norm2", dt)(h)), deterministic=deterministic)
        h = Conv(self.out_channels, 3, padding=1, dtype=dt, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=dt, name="nin_shortcut")(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over positions; ``q``/``k``/``v``/``proj_out`` are 1×1 convs."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = _norm("norm", self.dtype)(x)
        q, k, v = (Conv(c, 1, padding=0, dtype=self.dtype, name=n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        out = attend(self, q, k, v, 1).reshape(b, hgt, wid, c)
        return x + Conv(c, 1, padding=0, dtype=self.dtype, name="proj_out")(out)


def _attn(attn_type: str, name: str, dtype: Any):
    if attn_type == "none":
        return lambda h: h  # nn.Identity: no parameters
    return AttnBlock(dtype, name=name)


class Encoder(nn.Module):
    """CompVis ``Encoder``: NHWC image → ``z_channels`` (×2 with ``double_z``) at 1/2^(levels-1) size."""

    config: DDConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cfg, dt, det = self.config, self.dtype, not train
        h = Conv(cfg.ch, 3, padding=1, dtype=dt, name="conv_in")(x.astype(dt))
        res = cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            for j in range(cfg.num_res_blocks):
                h = ResnetBlock(cfg.ch * mult, cfg.dropout, dt, name=f"down.{i}.block.{j}")(h, det)
                if res in cfg.attn_resolutions:
                    h = _attn(cfg.attn_type, f"down.{i}.attn.{j}", dt)(h)
            if i != len(cfg.ch_mult) - 1:
                if cfg.resamp_with_conv:  # asymmetric padding: one row/column at the bottom/right
                    h = Conv(h.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), dtype=dt, name=f"down.{i}.downsample.conv")(h)
                else:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                res //= 2
        c = h.shape[-1]
        h = ResnetBlock(c, cfg.dropout, dt, name="mid.block_1")(h, det)
        h = _attn(cfg.attn_type, "mid.attn_1", dt)(h)
        h = ResnetBlock(c, cfg.dropout, dt, name="mid.block_2")(h, det)
        h = nn.silu(_norm("norm_out", dt)(h))
        z = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return Conv(z, 3, padding=1, dtype=dt, name="conv_out")(h)


class Decoder(nn.Module):
    """CompVis ``Decoder``: ``z_channels`` latents → NHWC image (``out_ch`` channels)."""

    config: DDConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = False) -> jax.Array:
        cfg, dt, det = self.config, self.dtype, not train
        levels = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (levels - 1)
        h = Conv(block_in, 3, padding=1, dtype=dt, name="conv_in")(z.astype(dt))
        h = ResnetBlock(block_in, cfg.dropout, dt, name="mid.block_1")(h, det)
        h = _attn(cfg.attn_type, "mid.attn_1", dt)(h)
        h = ResnetBlock(block_in, cfg.dropout, dt, name="mid.block_2")(h, det)
        for i in reversed(range(levels)):
            for j in range(cfg.num_res_blocks + 1):
                h = ResnetBlock(cfg.ch * cfg.ch_mult[i], cfg.dropout, dt, name=f"up.{i}.block.{j}")(h, det)
                if res in cfg.attn_resolutions:
                    h = _attn(cfg.attn_type, f"up.{i}.attn.{j}", dt)(h)
            if i != 0:
                h = upsample_nearest2x(h)
                if cfg.resamp_with_conv:
                    h = Conv(h.shape[-1], 3, padding=1, dtype=dt, name=f"up.{i}.upsample.conv")(h)
                res *= 2
        if cfg.give_pre_end:
            return h.astype(jnp.float32)
        h = nn.silu(_norm("norm_out", dt)(h))
        h = Conv(cfg.out_ch, 3, padding=1, dtype=dt, name="conv_out")(h)
        if cfg.tanh_out:
            h = jnp.tanh(h)
        return h.astype(jnp.float32)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry lookup (``quantize.embedding``, ``[n_embed, embed_dim]``).

    Distances are ``|z|² + |e|² - 2 z·e`` as taming's ``VectorQuantizer2``; ties go to the
    lowest index (``argmin``).
    """

    n_embed: int
    embed_dim: int

    def setup(self) -> None:
        self.embedding = nn.Embed(self.n_embed, self.embed_dim, name="embedding")

    def indices(self, z: jax.Array) -> jax.Array:
        """Codebook indices ``[B, H, W]`` of NHWC latents ``z``."""
        e = self.embedding.embedding.astype(jnp.float32)
        e2 = jnp.sum(e * e, axis=1)

        def one(zi):  # one image at a time keeps the [H·W, n_embed] distance matrix small
            zf = zi.reshape(-1, zi.shape[-1]).astype(jnp.float32)
            d = (jnp.sum(zf * zf, axis=1, keepdims=True) + e2[None, :]
                 - 2.0 * jnp.dot(zf, e.T, precision=jax.lax.Precision.HIGHEST))
            return jnp.argmin(d, axis=1).reshape(zi.shape[:-1])

        return jax.lax.map(one, z)

    def lookup(self, idx: jax.Array) -> jax.Array:
        """Codebook vectors ``[..., embed_dim]`` of integer indices."""
        return self.embedding(idx).astype(jnp.float32)

    def __call__(self, z: jax.Array) -> jax.Array:
        """Replace every latent vector by its nearest codebook entry."""
        return self.lookup(self.indices(z))


class VQModel(nn.Module):
    """CompVis/taming ``VQModel`` (as ``VQModelInterface``): ``encode`` stops before quantization."""

    config: AutoencoderConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg.ddconfig, self.dtype)
        self.decoder = Decoder(cfg.ddconfig, self.dtype)
        self.quant_conv = Conv(cfg.embed_dim, 1, padding=0, dtype=self.dtype)
        self.post_quant_conv = Conv(cfg.ddconfig.z_channels, 1, padding=0, dtype=self.dtype)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)

    def encode(self, x: jax.Array) -> jax.Array:
        """NHWC images (in [-1, 1]) → unquantized latents ``[B, H/f, W/f, embed_dim]``."""
        return self.quant_conv(self.encoder(x)).astype(jnp.float32)

    def decode(self, h: jax.Array, force_not_quantize: bool = False) -> jax.Array:
        """Latents → NHWC images; latents are snapped to the codebook unless ``force_not_quantize``."""
        q = h if force_not_quantize else self.quantize(h)
        return self.decoder(self.post_quant_conv(q))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))


class AutoencoderKL(nn.Module):
    """CompVis ``AutoencoderKL``; :meth:`encode` returns the posterior mean."""

    config: AutoencoderConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.encoder = Encoder(cfg.ddconfig, self.dtype)
        self.decoder = Decoder(cfg.ddconfig, self.dtype)
        self.quant_conv = Conv(2 * cfg.embed_dim, 1, padding=0, dtype=self.dtype)
        self.post_quant_conv = Conv(cfg.ddconfig.z_channels, 1, padding=0, dtype=self.dtype)

    def moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Posterior ``(mean, logvar)`` of NHWC images; logvar clipped to [-30, 20] as CompVis."""
        m = self.quant_conv(self.encoder(x)).astype(jnp.float32)
        mean, logvar = jnp.split(m, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, x: jax.Array) -> jax.Array:
        """NHWC images → posterior mean ``[B, H/f, W/f, embed_dim]``."""
        return self.moments(x)[0]

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents → NHWC images."""
        return self.decoder(self.post_quant_conv(z))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x))


def build_autoencoder(cfg: AutoencoderConfig, dtype: Any = jnp.float32) -> nn.Module:
    """The Flax module of a first-stage config (:class:`VQModel` or :class:`AutoencoderKL`)."""
    return VQModel(cfg, dtype) if cfg.kind == "vq" else AutoencoderKL(cfg, dtype)
