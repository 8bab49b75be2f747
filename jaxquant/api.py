"""The user-facing model object: ``jaxquant.load(...)``."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import CheckpointError
from jaxquant.io.model_dir import ModelDirMeta, load_model_dir, resolve_model_path
from jaxquant import xla


class Model:
    """A loaded diffusion network with its parameters and noise schedule.

    ``m(x, t)`` (``m(x, t, y=labels)`` for class-conditional models) applies the
    network to NHWC ``x`` and integer timesteps ``t`` and returns the NHWC output
    (epsilon prediction). The forward pass is jitted once per input shape.
    """

    def __init__(self, meta: ModelDirMeta, params: dict, path: Path | None = None, dtype: Any = jnp.float32):
        from jaxquant.models import build_network

        self.meta = meta
        self.path = path
        self.module, self.network_config = build_network(meta.architecture, meta.model, dtype)
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self._check_params()

    @property
    def config(self) -> dict:
        """The network configuration (same keys as the source checkpoint's config)."""
        return self.meta.model

    @property
    def architecture(self) -> str:
        return self.meta.architecture

    @property
    def schedule(self):
        """The training noise schedule as a :class:`jaxquant.diffusion.ScheduleConfig`."""
        from jaxquant.diffusion.schedules import ScheduleConfig

        return ScheduleConfig.from_dict(self.meta.schedule)

    @property
    def is_class_conditional(self) -> bool:
        return bool(getattr(self.network_config, "is_class_conditional", False))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.network_config
        return (c.sample_size, c.sample_size, c.out_channels)

    def apply(self, params: dict, x: jax.Array, t: jax.Array, y: jax.Array | None = None) -> jax.Array:
        """Pure forward pass ``f(params, x, t, y)``; use this inside your own jit/vmap.

        Activation quantizers and bias corrections with several timestep groups use the
        group of ``t[0]`` (the group travels with the call; see :mod:`jaxquant.quant.activation`).
        """
        from jaxquant.quant.activation import at_timesteps, has_grouped

        if has_grouped(params):
            params = at_timesteps(params, t, self.schedule.num_train_timesteps)
        return self.module.apply({"params": params}, x, t, y)

    @functools.cached_property
    def _jitted(self):
        return xla.jit(self.apply)

    def __call__(self, x: Any, t: Any, y: Any = None) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x.shape[0],))
        if y is not None:
            y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
        return self._jitted(self.params, x, t, y)

    @functools.cached_property
    def _jitted_first_stage(self):
        if not hasattr(self.module, "encode"):
            from jaxquant.errors import ConfigError

            raise ConfigError(f"a {self.architecture!r} model has no first stage: encode/decode need a latent-diffusion (ldm) model")
        enc = xla.jit(lambda p, x: self.module.apply({"params": p}, x, method="encode"))
        dec = xla.jit(lambda p, z: self.module.apply({"params": p}, z, method="decode"))
        return enc, dec

    def encode(self, images: Any) -> jax.Array:
        """Latent-diffusion models: NHWC images in [-1, 1] → scaled latents (first-stage encoder)."""
        return self._jitted_first_stage[0](self.params, jnp.asarray(images, jnp.float32))

    def decode(self, latents: Any) -> jax.Array:
        """Latent-diffusion models: scaled latents → NHWC images in about [-1, 1] (first-stage decoder)."""
        return self._jitted_first_stage[1](self.params, jnp.asarray(latents, jnp.float32))

    def _check_params(self) -> None:
        """Compare the loaded tree with the architecture's expected tree (names and shapes)."""
        c = self.network_config
        h = getattr(c, "sample_size", None) or 32
        x = jax.ShapeDtypeStruct((1, h, h, c.in_channels), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.int32)
        y = jax.ShapeDtypeStruct((1,), jnp.int32) if self.is_class_conditional else None
        expected = jax.eval_shape(lambda x, t, y: self.module.init(jax.random.key(0), x, t, y), x, t, y)["params"]
        check_param_tree(expected, self.params, where=str(self.path or "the parameters"))

    def __repr__(self) -> str:
        from jaxquant.quant import serialize

        leaves = jax.tree_util.tree_leaves(self.params, is_leaf=serialize.is_container)
        n = sum(serialize.represented_size(v) for v in leaves)
        return f"Model({self.architecture}, {n / 1e6:.2f}M parameters, path={self.path})"


def check_param_tree(expected: dict, actual: dict, where: str) -> None:
    """Raise :class:`CheckpointError` listing missing/unexpected names and shape mismatches.

    A quantized weight container in ``actual`` is compared by the shape of the float
    weight it replaces (its ``shape`` field); containers that add parameters of their
    own (registered with ``replaces_weight=False``) may sit where ``expected`` has none.
    """
    from jaxquant.io.model_dir import flatten_params
    from jaxquant.quant import serialize

    e, a = flatten_params(expected), flatten_params(actual)
    missing = sorted(set(e) - set(a))
    unexpected = sorted(k for k in set(a) - set(e)
                        if not (serialize.is_container(a[k]) and not serialize.container_type(a[k]).replaces_weight))
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}")
    if unexpected:
        problems.append(f"unexpected: {', '.join(unexpected[:20])}{' …' if len(unexpected) > 20 else ''}")
    shapes = []
    for k in sorted(set(e) & set(a)):
        want, found = tuple(np.shape(e[k])), serialize.logical_shape(a[k])
        if want != found:
            entry = serialize.container_type(a[k])
            what = f"a {entry.name!r} quantized weight of shape {found}" if entry else f"{found}"
            shapes.append(f"shape of {k}: expected {want}, found {what}")
    problems += shapes[:10] + ([f"… and {len(shapes) - 10} more shape mismatches"] if len(shapes) > 10 else [])
    if problems:
        raise CheckpointError(f"{where} do not match the architecture in config.json: " + "; ".join(problems))


def load(name_or_path: str | os.PathLike, dtype: Any = jnp.float32) -> Model:
    """Load a model directory, or a shipped model by name (e.g. ``"ddpm-fmnist"``)."""
    path = resolve_model_path(name_or_path)
    meta, params = load_model_dir(path)
    if "params" in params and len(params) == 1:
        raise CheckpointError(f"'{path}' stores a wrapped variable dict; expected the bare parameter tree")
    return Model(meta, params, path, dtype)
