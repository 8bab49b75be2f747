"""Flax port of the CompVis / OpenAI ``UNetModel`` (``ldm/modules/diffusionmodules/openaimodel.py``).

This is the denoiser of the CompVis latent-diffusion checkpoints (LDM-4 ``cin256-v2``:
model_channels 192, channel_mult [1, 2, 3, 5], spatial transformers with cross-attention
to a 512-d class context) and of guided-diffusion-style pixel models. Covered:

* ``ResBlock`` (``in_layers`` / ``emb_layers`` / ``out_layers`` / ``skip_connection``),
  with ``use_scale_shift_norm`` and ``resblock_updown``;
* ``Downsample`` (strided conv or 2×2 average pool) and ``Upsample`` (nearest 2× and an
  optional conv);
* ``AttentionBlock`` (``qkv`` as a 1-d 1×1 conv, legacy or new head ordering, ``proj_out``);
* ``SpatialTransformer`` (``norm``, 1×1 ``proj_in``/``proj_out``, ``BasicTransformerBlock``:
  self-attention ``attn1``, cross-attention ``attn2``, GEGLU feed-forward ``ff.net.0.proj``
  / ``ff.net.2``, ``norm1..3``);
* class conditioning through ``label_emb`` (``num_classes``), cross-attention context, or
  none.

Module names equal the checkpoint's state-dict prefixes (``input_blocks.4.1``,
``transformer_blocks.0``, ``attn1``, ``to_q``), so a parameter's dotted path is its
PyTorch name: ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``. Anything the port
does not implement is refused by :meth:`OpenAIUNetConfig.from_dict` with an error that
names the field. Layout is NHWC.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.errors import ConfigError
from jaxquant.models.layers import Conv, Dense, GroupNorm, LayerNorm, attend, timestep_embedding, upsample_nearest2x

# Constructor arguments of CompVis' UNetModel with their defaults (``None`` for the
# required ones). The last four exist only in the Stable-Diffusion-2 copy of the file
# and are accepted at their default value only.
_REQUIRED = ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions")
_DEFAULTS: dict[str, Any] = {
    "dropout": 0.0,
    "channel_mult": (1, 2, 4, 8),
    "conv_resample": True,
    "dims": 2,
    "num_classes": None,
    "use_checkpoint": False,
    "use_fp16": False,
    "num_heads": -1,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "use_spatial_transformer": False,
    "transformer_depth": 1,
    "context_dim": None,
    "n_embed": None,
    "legacy": True,
}
_DEFAULT_ONLY: dict[str, Any] = {
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
    "use_linear_in_transformer": False,
}

NORM_GROUPS = 32  # ``normalization()`` is GroupNorm32(32, channels)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class OpenAIUNetConfig:
    """A validated ``unet_config.params`` of a CompVis latent-diffusion YAML.

    Field names and defaults are those of ``UNetModel.__init__``. ``use_checkpoint``
    (gradient checkpointing), ``use_fp16`` (jaxquant picks the compute dtype when a
    model is loaded) and ``dropout`` (inference is deterministic) are kept for the
    record but do not change the outputs.
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    n_embed: int | None = None
    legacy: bool = True

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> "OpenAIUNetConfig":
        """Build from the ``params`` dict of a ``unet_config`` (YAML) or a model directory.

        Raises:
          ConfigError: a required field is missing, a field is unknown, has the wrong
            type, or holds a value this port does not implement (the field is named).
        """
        if not isinstance(params, Mapping):
            raise ConfigError(f"unet_config.params must be a mapping, got {type(params).__name__}")
        unknown = sorted(str(k) for k in params if k not in _REQUIRED and k not in _DEFAULTS and k not in _DEFAULT_ONLY)
        if unknown:
            raise ConfigError(f"unknown UNetModel config field(s): {', '.join(unknown)}")
        missing = [k for k in _REQUIRED if k not in params]
        if missing:
            raise ConfigError(f"UNetModel config is missing the required field(s): {', '.join(missing)}")
        for key, default in _DEFAULT_ONLY.items():
            if key in params and params[key] != default:
                raise ConfigError(
                    f"UNetModel config field {key!r} = {params[key]!r} is not supported (only {default!r} is implemented)")
        kw = {k: v for k, v in params.items() if k not in _DEFAULT_ONLY}
        for key in ("channel_mult", "attention_resolutions"):
            v = kw.get(key, _DEFAULTS.get(key))
            if not isinstance(v, (list, tuple)) or not all(_is_int(i) and i > 0 for i in v):
                raise ConfigError(f"UNetModel config field {key!r} = {v!r} must be a list of positive integers")
            kw[key] = tuple(v)
        nrb = kw["num_res_blocks"]
        if _is_int(nrb):
            nrb = (nrb,) * len(kw["channel_mult"])
        if not isinstance(nrb, (list, tuple)) or not all(_is_int(i) and i >= 1 for i in nrb):
            raise ConfigError(f"UNetModel config field 'num_res_blocks' = {kw['num_res_blocks']!r} must be a positive integer "
                              "or a list of them, one per level")
        if len(nrb) != len(kw["channel_mult"]):
            raise ConfigError(f"UNetModel config field 'num_res_blocks' has {len(nrb)} entries but 'channel_mult' has "
                              f"{len(kw['channel_mult'])} levels")
        kw["num_res_blocks"] = tuple(nrb)
        c = cls(**kw)
        c.validate()
        return c

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first unsupported or inconsistent field."""
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"UNetModel config field {field!r} = {getattr(self, field)!r} {why}")

        for f in ("image_size", "in_channels", "model_channels", "out_channels", "transformer_depth"):
            if not _is_int(getattr(self, f)) or getattr(self, f) < 1:
                raise bad(f, "must be a positive integer")
        for f in ("num_heads", "num_head_channels", "num_heads_upsample"):
            v = getattr(self, f)
            if not _is_int(v) or (v < 1 and v != -1):
                raise bad(f, "must be a positive integer or -1")
        for f in ("conv_resample", "use_scale_shift_norm", "resblock_updown", "use_new_attention_order",
                  "use_spatial_transformer", "legacy", "use_checkpoint", "use_fp16"):
            if not isinstance(getattr(self, f), bool):
                raise bad(f, "must be true or false")
        if self.dims != 2:
            raise bad("dims", "is not supported (only 2-d UNets are implemented)")
        if self.n_embed is not None:
            raise bad("n_embed", "is not supported (codebook-id prediction heads are not implemented)")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 1):
            raise bad("num_classes", "is not supported (only an integer number of classes, i.e. nn.Embedding label_emb)")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise bad("dropout", "must be a number in [0, 1)")
        if self.use_spatial_transformer and self.context_dim is None:
            raise bad("context_dim", "must be set when use_spatial_transformer is true")
        if self.context_dim is not None:
            if not self.use_spatial_transformer:
                raise bad("context_dim", "needs use_spatial_transformer: true")
            if not _is_int(self.context_dim) or self.context_dim < 1:
                raise bad("context_dim", "must be a positive integer (lists of per-block context sizes are not supported)")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise bad("num_heads", "and num_head_channels = -1: one of them has to be set")
        if self.model_channels % NORM_GROUPS:
            raise bad("model_channels", f"must be divisible by {NORM_GROUPS} (GroupNorm32)")
        # The attention layout must be realisable for every attention layer: the levels
        # whose downsampling factor is listed, and the middle block (always attention).
        layers = [(self.model_channels * m, w) for level, m in enumerate(self.channel_mult)
                  if 2 ** level in self.attention_resolutions for w in ("input", "output")]
        layers.append((self.model_channels * self.channel_mult[-1], "middle"))
        for ch, where in layers:
            heads, d = self.attention_heads(ch, where)
            if heads < 1 or d < 1 or (not self.use_spatial_transformer and heads * d != ch):
                field = "num_head_channels" if self.num_head_channels != -1 else "num_heads"
                raise bad(field, f"does not divide the {ch} channels of a level into attention heads")

    def to_dict(self) -> dict:
        """The fields as JSON-able values (``from_dict(to_dict())`` round-trips)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    def attention_heads(self, ch: int, where: str = "input") -> tuple[int, int]:
        """``(heads, dim_head)`` of the attention layer at a level with ``ch`` channels.

        Reproduces UNetModel's bookkeeping: ``num_head_channels`` (when set) overrides
        ``num_heads``; with ``legacy`` a spatial transformer uses ``ch // heads`` channels
        per head; an ``AttentionBlock`` in the output blocks uses ``num_heads_upsample``.
        ``where`` is "input", "middle" or "output".
        """
        nh, nhc = self.num_heads, self.num_head_channels
        if nhc == -1:
            dim_head = ch // nh
        else:
            nh = ch // nhc
            dim_head = nhc
        if self.legacy:
            if self.use_spatial_transformer:
                dim_head = ch // nh if nh > 0 else 0
            else:
                dim_head = nhc
        if self.use_spatial_transformer:
            return nh, dim_head
        # AttentionBlock(ch, num_heads=..., num_head_channels=dim_head): the output blocks
        # pass num_heads_upsample (which defaults to num_heads), the others num_heads.
        block_heads = self.num_heads
        if where == "output" and self.num_heads_upsample != -1:
            block_heads = self.num_heads_upsample
        heads = block_heads if dim_head == -1 else (ch // dim_head if dim_head > 0 else 0)
        return heads, (ch // heads if heads > 0 else 0)


# --------------------------------------------------------------------------- blocks


class Downsample(nn.Module):
    """Strided 3×3 conv (``op``) or 2×2 average pooling."""

    channels: int
    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return Conv(self.channels, 3, strides=2, padding=1, dtype=self.dtype, name="op")(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Nearest-neighbour 2× upsampling, then an optional 3×3 conv (``conv``)."""

    channels: int
    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = upsample_nearest2x(x)
        if self.use_conv:
            x = Conv(self.channels, 3, padding=1, dtype=self.dtype, name="conv")(x)
        return x


class ResBlock(nn.Module):
    """openaimodel ``ResBlock``: pre-norm residual block conditioned on the time embedding.

    ``updown`` is None, "up" or "down" (``resblock_updown``: resampling without a conv
    between the first norm/activation and the first conv, on both branches).
    """

    out_channels: int
    use_scale_shift_norm: bool = False
    updown: str | None = None
    dropout: float = 0.0
    dtype: Any = jnp.float32
    input_split: int = 0  # channels of the first part of a concatenated (h, skip) input

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, deterministic: bool = True) -> jax.Array:
        dt = self.dtype
        h = nn.silu(GroupNorm(NORM_GROUPS, 1e-5, dt, name="in_layers.0")(x))
        if self.updown == "up":
            h, x = upsample_nearest2x(h), upsample_nearest2x(x)
        elif self.updown == "down":
            h, x = nn.avg_pool(h, (2, 2), strides=(2, 2)), nn.avg_pool(x, (2, 2), strides=(2, 2))
        h = Conv(self.out_channels, 3, padding=1, dtype=dt, input_split=self.input_split, name="in_layers.2")(h)
        n = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = Dense(n, dtype=dt, name="emb_layers.1")(nn.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = GroupNorm(NORM_GROUPS, 1e-5, dt, name="out_layers.0")(h) * (1 + scale) + shift
        else:
            h = GroupNorm(NORM_GROUPS, 1e-5, dt, name="out_layers.0")(h + e)
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = Conv(self.out_channels, 3, padding=1, dtype=dt, name="out_layers.3")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, 1, padding=0, dtype=dt, input_split=self.input_split,
                     name="skip_connection")(x)
        return x + h


class AttentionBlock(nn.Module):
    """openaimodel ``AttentionBlock``: self-attention over all positions.

    ``qkv`` is a 1×1 conv1d in the checkpoint, stored here as a Dense ``[C, 3C]``. Its
    output channels are ordered per head ``[q_h, k_h, v_h]`` (legacy,
    ``QKVAttentionLegacy``) or ``[q, k, v]`` each over all heads (new order).
    """

    heads: int
    new_order: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        d = c // self.heads
        h = GroupNorm(NORM_GROUPS, 1e-5, self.dtype, name="norm")(x).reshape(b, hgt * wid, c)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv")(h)
        if self.new_order:
            q, k, v = jnp.split(qkv, 3, axis=-1)
        else:
            per_head = qkv.reshape(b, hgt * wid, self.heads, 3, d)
            q, k, v = (per_head[:, :, :, i, :].reshape(b, hgt * wid, c) for i in range(3))
        out = attend(self, q, k, v, self.heads)
        out = Dense(c, dtype=self.dtype, name="proj_out")(out)
        return x + out.reshape(b, hgt, wid, c)


class CrossAttention(nn.Module):
    """``CrossAttention`` of ``ldm/modules/attention.py`` (self-attention when ``context`` is None)."""

    query_dim: int
    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        inner = self.heads * self.dim_head
        context = x if context is None else context
        q = Dense(inner, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = Dense(inner, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = Dense(inner, use_bias=False, dtype=self.dtype, name="to_v")(context)
        return Dense(self.query_dim, dtype=self.dtype, name="to_out.0")(attend(self, q, k, v, self.heads))


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; pre-LayerNorm residuals."""

    dim: int
    heads: int
    dim_head: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        dt = self.dtype
        x = x + CrossAttention(self.dim, self.heads, self.dim_head, dt, name="attn1")(LayerNorm(1e-5, dt, name="norm1")(x))
        x = x + CrossAttention(self.dim, self.heads, self.dim_head, dt, name="attn2")(LayerNorm(1e-5, dt, name="norm2")(x), context)
        h = Dense(self.dim * 4 * 2, dtype=dt, name="ff.net.0.proj")(LayerNorm(1e-5, dt, name="norm3")(x))
        a, gate = jnp.split(h, 2, axis=-1)
        h = a * jax.nn.gelu(gate, approximate=False)  # GEGLU with the exact (erf) GELU
        return x + Dense(self.dim, dtype=dt, name="ff.net.2")(h)


class SpatialTransformer(nn.Module):
    """GroupNorm, 1×1 ``proj_in``, ``depth`` transformer blocks over the positions, 1×1 ``proj_out``, residual."""

    heads: int
    dim_head: int
    depth: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        b, hgt, wid, c = x.shape
        inner = self.heads * self.dim_head
        h = GroupNorm(NORM_GROUPS, 1e-6, self.dtype, name="norm")(x)
        h = Conv(inner, 1, padding=0, dtype=self.dtype, name="proj_in")(h).reshape(b, hgt * wid, inner)
        for i in range(self.depth):
            h = BasicTransformerBlock(inner, self.heads, self.dim_head, self.dtype, name=f"transformer_blocks.{i}")(h, context)
        h = Conv(c, 1, padding=0, dtype=self.dtype, name="proj_out")(h.reshape(b, hgt, wid, inner))
        return x + h


# --------------------------------------------------------------------------- the network


class OpenAIUNet(nn.Module):
    """CompVis ``UNetModel`` in Flax.

    ``__call__(x, t, context=None, y=None)``: ``x`` NHWC ``[B, H, W, in_channels]``,
    ``t`` ``[B]`` timesteps, ``context`` ``[B, L, context_dim]`` for spatial transformers
    (cross-attention), ``y`` ``[B]`` integer labels when ``num_classes`` is set. ``H`` and
    ``W`` must be divisible by ``2 ** (len(channel_mult) - 1)``. Returns float32 NHWC.
    """

    config: OpenAIUNetConfig
    dtype: Any = jnp.float32

    def _attention(self, ch: int, where: str, name: str) -> nn.Module:
        cfg = self.config
        heads, dim_head = cfg.attention_heads(ch, where)
        if cfg.use_spatial_transformer:
            return SpatialTransformer(heads, dim_head, cfg.transformer_depth, self.dtype, name=name)
        return AttentionBlock(heads, cfg.use_new_attention_order, self.dtype, name=name)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        context: jax.Array | None = None,
        y: jax.Array | None = None,
        *,
        train: bool = False,
    ) -> jax.Array:
        cfg, dt, det = self.config, self.dtype, not train
        mc = cfg.model_channels
        factor = 2 ** (cfg.num_levels - 1)
        if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
            raise ConfigError(f"UNet input of shape {tuple(x.shape)}: expected NHWC with H and W divisible by {factor}")
        if cfg.num_classes is not None and y is None:
            raise ConfigError("this UNet is class-conditional (num_classes): pass class labels y")
        if cfg.num_classes is None and y is not None:
            raise ConfigError("this UNet has no label embedding (num_classes is not set): do not pass y")
        if cfg.use_spatial_transformer and context is None:
            raise ConfigError("this UNet cross-attends to a context (use_spatial_transformer): pass context")

        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        emb = timestep_embedding(t, mc, flip_sin_to_cos=True, freq_shift=0).astype(dt)  # [cos, sin], as openaimodel
        emb = Dense(cfg.time_embed_dim, dtype=dt, name="time_embed.0")(emb)
        emb = Dense(cfg.time_embed_dim, dtype=dt, name="time_embed.2")(nn.silu(emb))
        if cfg.num_classes is not None:
            emb = emb + nn.Embed(cfg.num_classes, cfg.time_embed_dim, name="label_emb")(y).astype(dt)
        if context is not None:
            context = context.astype(dt)

        def res(out_ch: int, name: str, updown: str | None = None, split: int = 0) -> ResBlock:
            return ResBlock(out_ch, cfg.use_scale_shift_norm, updown, cfg.dropout, dt, split, name=name)

        h = Conv(mc, 3, padding=1, dtype=dt, name="input_blocks.0.0")(x.astype(dt))
        hs = [h]
        ch, ds, n = mc, 1, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                ch = mult * mc
                h = res(ch, f"input_blocks.{n}.0")(h, emb, det)
                if ds in cfg.attention_resolutions:
                    h = self._call_attention(self._attention(ch, "input", f"input_blocks.{n}.1"), h, context)
                hs.append(h)
                n += 1
            if level != cfg.num_levels - 1:
                if cfg.resblock_updown:
                    h = res(ch, f"input_blocks.{n}.0", "down")(h, emb, det)
                else:
                    h = Downsample(ch, cfg.conv_resample, dt, name=f"input_blocks.{n}.0")(h)
                hs.append(h)
                ds *= 2
                n += 1

        h = res(ch, "middle_block.0")(h, emb, det)
        h = self._call_attention(self._attention(ch, "middle", "middle_block.1"), h, context)
        h = res(ch, "middle_block.2")(h, emb, det)

        n = 0
        for level in reversed(range(cfg.num_levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks[level] + 1):
                split = h.shape[-1]
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                ch = mc * mult
                h = res(ch, f"output_blocks.{n}.0", split=split)(h, emb, det)
                m = 1
                if ds in cfg.attention_resolutions:
                    h = self._call_attention(self._attention(ch, "output", f"output_blocks.{n}.1"), h, context)
                    m = 2
                if level and i == cfg.num_res_blocks[level]:
                    if cfg.resblock_updown:
                        h = res(ch, f"output_blocks.{n}.{m}", "up")(h, emb, det)
                    else:
                        h = Upsample(ch, cfg.conv_resample, dt, name=f"output_blocks.{n}.{m}")(h)
                    ds //= 2
                n += 1

        h = nn.silu(GroupNorm(NORM_GROUPS, 1e-5, dt, name="out.0")(h))
        h = Conv(cfg.out_channels, 3, padding=1, dtype=dt, name="out.2")(h)
        return h.astype(jnp.float32)

    @staticmethod
    def _call_attention(block: nn.Module, h: jax.Array, context: jax.Array | None) -> jax.Array:
        if isinstance(block, SpatialTransformer):
            return block(h, context)
        return block(h)

