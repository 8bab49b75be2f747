"""Generating image batches from a loaded model: batching, seeding, progress."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.diffusion.samplers import initial_noise, make_sampler
from jaxquant.errors import ConfigError
from jaxquant.images import to_uint8


def generate(
    model,
    num: int,
    *,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    labels: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Sample ``num`` images from ``model`` (a :class:`jaxquant.Model`) as uint8 NHWC.

    Batch ``b`` uses the key ``fold_in(key(seed), b)``, so results do not depend on
    anything but the seed and the batch size. The last batch is padded to the batch
    size, so the sampler compiles once.

    Args:
      labels: class labels (length ``num``) for class-conditional models.
    """
    if num < 1:
        raise ConfigError(f"--num must be at least 1 (got {num})")
    if model.is_class_conditional:
        if labels is None:
            raise ConfigError("this model is class-conditional: give class labels")
        labels = np.asarray(labels, np.int32)
        if labels.shape != (num,):
            raise ConfigError(f"expected {num} class labels, got shape {labels.shape}")
    elif labels is not None:
        raise ConfigError("this model is unconditional: do not give class labels")

    run = make_sampler(model.apply, model.schedule, steps, sampler, eta)
    shape = (batch_size, *model.sample_shape)
    base = jax.random.key(seed)
    out = []
    n_batches = -(-num // batch_size)
    for b in tqdm(range(n_batches), desc=f"sample {sampler}-{steps}", disable=not progress, unit="batch"):
        key = jax.random.fold_in(base, b)
        extra = ()
        if labels is not None:
            yb = labels[b * batch_size:(b + 1) * batch_size]
            extra = (jnp.asarray(np.pad(yb, (0, batch_size - len(yb)))),)
        x0 = run(model.params, initial_noise(key, shape), key, *extra)
        out.append(np.asarray(x0))
    x = np.concatenate(out)[:num]
    return to_uint8(x)
