"""Latent diffusion (CompVis ``LatentDiffusion``) as one Flax module: architecture "ldm".

The module holds three parameter subtrees, one per network of the CompVis checkpoint:

=============  ===========================  =====================================
subtree        checkpoint prefix            network
=============  ===========================  =====================================
``unet``       ``model.diffusion_model.``   :class:`~jaxquant.models.openai_unet.OpenAIUNet`
``first_stage`` ``first_stage_model.``      :class:`~jaxquant.models.autoencoder.VQModel` / ``AutoencoderKL``
``cond_stage`` ``cond_stage_model.``        :class:`ClassEmbedder` (absent when unconditional)
=============  ===========================  =====================================

``module.apply(v, x, t, y)`` is the denoiser on latents (labels → context
``[B, 1, embed_dim]`` → UNet cross-attention), so samplers use it like any other
epsilon model; ``method="encode"`` / ``method="decode"`` run the first stage with the
``scale_factor`` of the YAML applied (``encode`` multiplies, ``decode`` divides), as
CompVis' ``get_first_stage_encoding`` / ``decode_first_stage`` do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.errors import ConfigError
from jaxquant.models.autoencoder import AutoencoderConfig, build_autoencoder
from jaxquant.models.openai_unet import OpenAIUNet, OpenAIUNetConfig

CONDITIONING_KEYS = (None, "crossattn")


@dataclasses.dataclass(frozen=True)
class ClassEmbedderConfig:
    """``ldm.modules.encoders.modules.ClassEmbedder``: ``n_classes`` × ``embed_dim`` table.

    CompVis uses the last class (``n_classes - 1``, 1000 for ImageNet) as the
    "no class" label of classifier-free guidance.
    """

    n_classes: int
    embed_dim: int
    key: str = "class"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LDMConfig:
    """Configuration of a latent-diffusion model directory (``model`` entry of ``config.json``)."""

    unet: OpenAIUNetConfig
    first_stage: AutoencoderConfig
    cond_stage: ClassEmbedderConfig | None
    conditioning_key: str | None
    scale_factor: float = 1.0
    image_size: int | None = None  # latent side to sample at; None: the UNet's image_size

    def __post_init__(self) -> None:
        if self.conditioning_key not in CONDITIONING_KEYS:
            raise ConfigError(f"latent-diffusion 'conditioning_key' = {self.conditioning_key!r} is not supported "
                              f"(supported: {list(CONDITIONING_KEYS)})")
        if (self.cond_stage is None) != (self.conditioning_key is None):
            raise ConfigError("latent-diffusion config: a class embedder needs conditioning_key 'crossattn' and an "
                              "unconditional model needs conditioning_key None")
        if self.cond_stage is not None and self.unet.context_dim != self.cond_stage.embed_dim:
            raise ConfigError(f"UNetModel config field 'context_dim' = {self.unet.context_dim!r} does not match the class "
                              f"embedder's embed_dim = {self.cond_stage.embed_dim}")
        if self.cond_stage is None and self.unet.use_spatial_transformer:
            raise ConfigError("UNetModel config field 'use_spatial_transformer' = True needs a conditioning model, "
                              "but the model is unconditional")
        if self.unet.num_classes is not None:
            raise ConfigError("UNetModel config field 'num_classes' is not supported inside a latent-diffusion model "
                              "(CompVis conditions LDMs through the cond stage)")
        if self.unet.in_channels != self.first_stage.embed_dim or self.unet.out_channels != self.first_stage.embed_dim:
            raise ConfigError(f"UNetModel in_channels/out_channels ({self.unet.in_channels}/{self.unet.out_channels}) "
                              f"must equal the first stage's embed_dim ({self.first_stage.embed_dim})")
        if not isinstance(self.scale_factor, (int, float)) or isinstance(self.scale_factor, bool) or not self.scale_factor > 0:
            raise ConfigError(f"latent-diffusion 'scale_factor' = {self.scale_factor!r} must be a positive number")
        object.__setattr__(self, "scale_factor", float(self.scale_factor))
        if self.image_size is None:
            object.__setattr__(self, "image_size", self.unet.image_size)
        factor = 2 ** (self.unet.num_levels - 1)
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1 or self.image_size % factor:
            raise ConfigError(f"latent-diffusion 'image_size' = {self.image_size!r} must be a positive multiple of {factor} "
                              "(the UNet's downsampling factor)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LDMConfig":
        """Build from a model directory's ``model`` dict (see :meth:`to_dict`)."""
        known = {"unet", "first_stage", "cond_stage", "conditioning_key", "scale_factor", "image_size"}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ConfigError(f"unknown latent-diffusion config field(s): {', '.join(unknown)}")
        for key in ("unet", "first_stage"):
            if key not in d:
                raise ConfigError(f"latent-diffusion config is missing the field {key!r}")
        cs = d.get("cond_stage")
        if cs is not None:
            extra = sorted(set(cs) - {"n_classes", "embed_dim", "key"})
            if extra:
                raise ConfigError(f"unknown class-embedder config field(s): {', '.join(extra)}")
            cs = ClassEmbedderConfig(**cs)
        return cls(OpenAIUNetConfig.from_dict(d["unet"]), AutoencoderConfig.from_dict(d["first_stage"]), cs,
                   d.get("conditioning_key"), d.get("scale_factor", 1.0), d.get("image_size"))

    def to_dict(self) -> dict:
        return {
            "unet": self.unet.to_dict(),
            "first_stage": self.first_stage.to_dict(),
            "cond_stage": None if self.cond_stage is None else self.cond_stage.to_dict(),
            "conditioning_key": self.conditioning_key,
            "scale_factor": self.scale_factor,
            "image_size": self.image_size,
        }

    # The attributes jaxquant.Model reads from any network config.
    @property
    def sample_size(self) -> int:
        """Side of the latents to sample (64 for cin256-v2)."""
        return self.image_size

    @property
    def in_channels(self) -> int:
        return self.unet.in_channels

    @property
    def out_channels(self) -> int:
        return self.unet.out_channels

    @property
    def is_class_conditional(self) -> bool:
        return self.cond_stage is not None

    @property
    def num_classes(self) -> int | None:
        """Number of class labels including the unconditional one (1001 for cin256-v2)."""
        return None if self.cond_stage is None else self.cond_stage.n_classes

    @property
    def unconditional_label(self) -> int | None:
        """The "no class" label for classifier-free guidance: ``n_classes - 1`` as in CompVis."""
        return None if self.cond_stage is None else self.cond_stage.n_classes - 1

    @property
    def decoded_size(self) -> int:
        """Side of the decoded image for a latent of side :attr:`sample_size` (256 for cin256-v2)."""
        return self.sample_size * self.first_stage.ddconfig.downsample_factor


class ClassEmbedder(nn.Module):
    """Class label → cross-attention context ``[B, 1, embed_dim]`` (``embedding`` table)."""

    config: ClassEmbedderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        table = nn.Embed(self.config.n_classes, self.config.embed_dim, name="embedding")
        return table(jnp.asarray(y, jnp.int32)[:, None]).astype(self.dtype)


class LatentDiffusion(nn.Module):
    """UNet on latents + first-stage autoencoder + class embedder (see the module docstring)."""

    config: LDMConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        cfg = self.config
        self.unet = OpenAIUNet(cfg.unet, self.dtype)
        self.first_stage = build_autoencoder(cfg.first_stage, self.dtype)
        if cfg.cond_stage is not None:
            self.cond_stage = ClassEmbedder(cfg.cond_stage, self.dtype)

    def conditioning(self, y: jax.Array) -> jax.Array:
        """Cross-attention context ``[B, 1, embed_dim]`` of labels ``y`` (CompVis ``get_learned_conditioning``)."""
        if self.config.cond_stage is None:
            raise ConfigError("this latent-diffusion model is unconditional: it has no class embedder")
        return self.cond_stage(y)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False) -> jax.Array:
        """Epsilon prediction for NHWC latents ``x`` at timesteps ``t`` (labels ``y`` when class-conditional)."""
        if self.is_initializing():
            self._init_first_stage()
        if self.config.cond_stage is not None:
            if y is None:
                raise ConfigError("this model is class-conditional: pass class labels y")
            return self.unet(x, t, context=self.conditioning(y), train=train)
        if y is not None:
            raise ConfigError("this model is unconditional: do not pass class labels")
        return self.unet(x, t, train=train)

    def encode(self, images: jax.Array) -> jax.Array:
        """NHWC images in [-1, 1] → latents times ``scale_factor``.

        VQ: the unquantized ``quant_conv`` output (``VQModelInterface.encode``); KL: the
        posterior mean (CompVis samples the posterior; the mean is its deterministic part).
        """
        return self.first_stage.encode(images) * self.config.scale_factor

    def decode(self, latents: jax.Array) -> jax.Array:
        """Latents (divided by ``scale_factor``; VQ: snapped to the codebook) → NHWC images in about [-1, 1]."""
        return self.first_stage.decode(latents / self.config.scale_factor)

    def _init_first_stage(self) -> None:
        # ``init`` only runs ``__call__``; touch the first stage on a minimal input so its
        # parameters exist too (shapes do not depend on the spatial size).
        dd = self.config.first_stage.ddconfig
        side = dd.downsample_factor
        self.first_stage.encode(jnp.zeros((1, side, side, dd.in_channels), jnp.float32))
        self.first_stage.decode(jnp.zeros((1, 1, 1, self.config.first_stage.embed_dim), jnp.float32))
