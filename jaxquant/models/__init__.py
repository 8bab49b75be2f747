"""Flax networks and the table that builds them from a model directory's config."""

from __future__ import annotations

from typing import Any

from jaxquant.errors import ConfigError


def build_network(architecture: str, model_config: dict, dtype: Any = None) -> tuple[Any, Any]:
    """Return ``(flax_module, config_object)`` for a model directory's architecture."""
    import jax.numpy as jnp

    dtype = dtype or jnp.float32
    if architecture == "unet2d":
        from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel

        cfg = UNet2DConfig.from_dict(model_config)
        return UNet2DModel(cfg, dtype=dtype), cfg
    if architecture == "ldm":
        from jaxquant.models.ldm import LatentDiffusion, LDMConfig

        cfg = LDMConfig.from_dict(model_config)
        return LatentDiffusion(cfg, dtype=dtype), cfg
    raise ConfigError(f"unknown architecture {architecture!r} in the model directory (known: unet2d, ldm)")
