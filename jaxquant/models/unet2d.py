"""Flax port of the diffusers ``UNet2DModel`` family (the DDPM checkpoints).

Covers every option used by ``google/ddpm-cifar10-32``, ``-celebahq-256``,
``-church-256`` and ``-bedroom-256`` plus class conditioning; anything else is refused
by :func:`UNet2DConfig.from_dict` with an error naming the field. Module names follow
diffusers' state-dict names, so the parameter path of a layer joined by dots *is* its
diffusers name (``down_blocks.1.attentions.0.to_q``).

Layout is NHWC; timesteps are ``[B]`` integers (or floats).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.errors import ConfigError
from jaxquant.models.layers import Conv, Dense, GroupNorm, attend, attention, timestep_embedding, upsample_nearest2x  # noqa: F401

DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("UpBlock2D", "AttnUpBlock2D")
MID_BLOCKS = ("UNetMidBlock2D", None)

# Every constructor argument of diffusers' UNet2DModel with its default. A config key
# outside this table is an error; a key inside it whose value we do not implement is
# an error too (see _SUPPORTED).
_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}

_SUPPORTED: dict[str, tuple] = {
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "resnet_time_scale_shift": ("default", "scale_shift"),
    "class_embed_type": (None, "timestep", "identity"),
    "mid_block_type": MID_BLOCKS,
}


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """A validated diffusers ``UNet2DModel`` configuration."""

    sample_size: int | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: float = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple = _DEFAULTS["down_block_types"]
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple = _DEFAULTS["up_block_types"]
    block_out_channels: tuple = _DEFAULTS["block_out_channels"]
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict) -> "UNet2DConfig":
        """Build from a diffusers ``config.json`` dict; keys starting with ``_`` are metadata.

        Raises:
          ConfigError: on an unknown key, an unsupported value, or inconsistent lengths.
        """
        if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
            raise ConfigError(
                f"config '_class_name' is {cfg['_class_name']!r}; this converter reads UNet2DModel configs")
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DEFAULTS)
        if unknown:
            raise ConfigError(f"unknown UNet2DModel config key(s): {', '.join(unknown)}")
        kw = {k: v for k, v in cfg.items() if not k.startswith("_")}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if isinstance(kw.get("sample_size"), (list, tuple)):
            s = kw["sample_size"]
            if len(s) != 2 or s[0] != s[1]:
                raise ConfigError(f"config 'sample_size' {s!r}: only square samples are supported")
            kw["sample_size"] = s[0]
        c = cls(**kw)
        c.validate()
        return c

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unsupported field."""
        for key, allowed in _SUPPORTED.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"config '{key}' = {getattr(self, key)!r} is not supported (supported: {list(allowed)})")
        for i, b in enumerate(self.down_block_types):
            if b not in DOWN_BLOCKS:
                raise ConfigError(f"config 'down_block_types[{i}]' = {b!r} is not supported (supported: {list(DOWN_BLOCKS)})")
        for i, b in enumerate(self.up_block_types):
            if b not in UP_BLOCKS:
                raise ConfigError(f"config 'up_block_types[{i}]' = {b!r} is not supported (supported: {list(UP_BLOCKS)})")
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"config 'down_block_types' ({len(self.down_block_types)}), 'up_block_types' "
                f"({len(self.up_block_types)}) and 'block_out_channels' ({n}) must have the same length")
        if self.norm_num_groups is None:
            raise ConfigError("config 'norm_num_groups' = None is not supported")
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ConfigError(f"config 'block_out_channels' entry {ch} is not divisible by norm_num_groups={self.norm_num_groups}")
        if self.class_embed_type == "identity" and self.num_class_embeds is not None:
            raise ConfigError("config 'num_class_embeds' cannot be combined with class_embed_type='identity'")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def is_class_conditional(self) -> bool:
        return self.class_embed_type is not None or self.num_class_embeds is not None


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (pre-norm, time embedding added or scale-shifted)."""

    out_channels: int
    groups: int
    eps: float
    time_scale_shift: str = "default"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    dtype: Any = jnp.float32
    input_split: int = 0  # channels of the first part of a concatenated (h, skip) input

    @nn.compact
    def __call__(self, x, temb, deterministic: bool = True):
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x)
        h = nn.silu(h)
        h = Conv(self.out_channels, 3, padding=1, dtype=self.dtype, input_split=self.input_split, name="conv1")(h)
        n = self.out_channels * (2 if self.time_scale_shift == "scale_shift" else 1)
        t = Dense(n, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
        if self.time_scale_shift == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h) * (1 + scale) + shift
        else:
            h = GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h + t)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = Conv(self.out_channels, 3, padding=1, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=self.dtype, input_split=self.input_split,
                     name="conv_shortcut")(x)
        return (x + h) / self.output_scale_factor


class SpatialSelfAttention(nn.Module):
    """diffusers ``Attention`` as used by the UNet2D attention blocks.

    GroupNorm (optional), q/k/v projections, softmax in float32, ``to_out.0``, then the
    residual connection and division by ``rescale_output_factor``.
    """

    heads: int
    dim_head: int
    groups: int | None
    eps: float
    rescale_output_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = x
        if self.groups is not None:
            h = GroupNorm(self.groups, self.eps, self.dtype, name="group_norm")(h)
        h = h.reshape(b, hgt * wid, c)
        inner = self.heads * self.dim_head
        q = Dense(inner, dtype=self.dtype, name="to_q")(h)
        k = Dense(inner, dtype=self.dtype, name="to_k")(h)
        v = Dense(inner, dtype=self.dtype, name="to_v")(h)
        out = attend(self, q, k, v, self.heads)
        out = Dense(c, dtype=self.dtype, name="to_out.0")(out)
        out = out.reshape(b, hgt, wid, c)
        return (out + x) / self.rescale_output_factor


class UNet2DModel(nn.Module):
    """The diffusers ``UNet2DModel`` in Flax; ``__call__(x, t, y=None)`` returns NHWC output."""

    config: UNet2DConfig
    dtype: Any = jnp.float32

    def _heads(self, channels: int) -> tuple[int, int]:
        dim_head = self.config.attention_head_dim or channels
        return channels // dim_head, dim_head

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        cfg = self.config
        det = not train
        boc = cfg.block_out_channels
        g, eps, dt = cfg.norm_num_groups, cfg.norm_eps, self.dtype
        x = x.astype(dt)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, boc[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
        temb = temb.astype(dt)
        temb = Dense(cfg.time_embed_dim, dtype=dt, name="time_embedding.linear_1")(temb)
        temb = Dense(cfg.time_embed_dim, dtype=dt, name="time_embedding.linear_2")(nn.silu(temb))
        if cfg.is_class_conditional:
            if y is None:
                raise ConfigError("this model is class-conditional: pass class labels y")
            if cfg.class_embed_type == "timestep":
                c = timestep_embedding(y, boc[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift)
                c = Dense(cfg.time_embed_dim, dtype=dt, name="class_embedding.linear_1")(c.astype(dt))
                c = Dense(cfg.time_embed_dim, dtype=dt, name="class_embedding.linear_2")(nn.silu(c))
            elif cfg.class_embed_type == "identity":
                c = y.astype(dt)
            else:
                c = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding")(y).astype(dt)
            temb = temb + c
        elif y is not None:
            raise ConfigError("this model is unconditional: do not pass class labels")

        h = Conv(boc[0], 3, padding=1, dtype=dt, name="conv_in")(x)
        skips = [h]
        for i, btype in enumerate(cfg.down_block_types):
            out_ch = boc[i]
            for j in range(cfg.layers_per_block):
                h = ResnetBlock2D(out_ch, g, eps, cfg.resnet_time_scale_shift, dropout=cfg.dropout, dtype=dt,
                                  name=f"down_blocks.{i}.resnets.{j}")(h, temb, det)
                if btype == "AttnDownBlock2D":
                    heads, dh = self._heads(out_ch)
                    h = SpatialSelfAttention(heads, dh, g, eps, dtype=dt, name=f"down_blocks.{i}.attentions.{j}")(h)
                skips.append(h)
            if i < len(boc) - 1:
                p = cfg.downsample_padding
                pad = ((0, 1), (0, 1)) if p == 0 else ((p, p), (p, p))
                h = Conv(out_ch, 3, strides=2, padding=pad, dtype=dt, name=f"down_blocks.{i}.downsamplers.0.conv")(h)
                skips.append(h)

        if cfg.mid_block_type is not None:
            msf = cfg.mid_block_scale_factor
            h = ResnetBlock2D(boc[-1], g, eps, cfg.resnet_time_scale_shift, msf, cfg.dropout, dt,
                              name="mid_block.resnets.0")(h, temb, det)
            if cfg.add_attention:
                heads, dh = self._heads(boc[-1])
                attn_groups = cfg.attn_norm_num_groups
                if attn_groups is None and cfg.resnet_time_scale_shift == "default":
                    attn_groups = g
                h = SpatialSelfAttention(heads, dh, attn_groups, eps, msf, dt, name="mid_block.attentions.0")(h)
            h = ResnetBlock2D(boc[-1], g, eps, cfg.resnet_time_scale_shift, msf, cfg.dropout, dt,
                              name="mid_block.resnets.1")(h, temb, det)

        rev = list(reversed(boc))
        for i, btype in enumerate(cfg.up_block_types):
            out_ch = rev[i]
            for j in range(cfg.layers_per_block + 1):
                split = h.shape[-1]
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = ResnetBlock2D(out_ch, g, eps, cfg.resnet_time_scale_shift, dropout=cfg.dropout, dtype=dt,
                                  input_split=split, name=f"up_blocks.{i}.resnets.{j}")(h, temb, det)
                if btype == "AttnUpBlock2D":
                    heads, dh = self._heads(out_ch)
                    h = SpatialSelfAttention(heads, dh, g, eps, dtype=dt, name=f"up_blocks.{i}.attentions.{j}")(h)
            if i < len(boc) - 1:
                h = upsample_nearest2x(h)
                h = Conv(out_ch, 3, padding=1, dtype=dt, name=f"up_blocks.{i}.upsamplers.0.conv")(h)

        h = GroupNorm(g, eps, dt, name="conv_norm_out")(h)
        h = nn.silu(h)
        h = Conv(cfg.out_channels, 3, padding=1, dtype=dt, name="conv_out")(h)
        return h.astype(jnp.float32)
