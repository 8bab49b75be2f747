"""Classifier-free guidance (Ho & Salimans 2022) for class-conditional epsilon models.

CompVis' LDM sampling scripts evaluate the model once on the conditional and the
unconditional inputs stacked along the batch and mix the two predictions:
``eps = eps_u + s * (eps_c - eps_u)``. The unconditional input is the class label
``n_classes - 1`` (1000 for the ImageNet LDM, whose class embedder has 1001 rows), which
:attr:`jaxquant.models.ldm.LDMConfig.unconditional_label` gives.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxquant.errors import ConfigError

__all__ = ["guided_eps"]


def guided_eps(
    eps_apply: Callable[..., jax.Array],
    scale: float | jax.Array,
    null_label: int,
) -> Callable[..., jax.Array]:
    """Wrap ``eps_apply(params, x, t, y)`` into its classifier-free-guided version.

    The returned ``fn(params, x, t, y)`` runs ``eps_apply`` once on the batch
    ``[x; x]`` with labels ``[null_label…; y]`` and returns
    ``eps_u + scale * (eps_c - eps_u)`` for the ``B`` inputs; ``scale = 1`` is the plain
    conditional model, ``scale = 0`` the unconditional one. It has the signature
    :func:`jaxquant.diffusion.make_sampler` expects (labels as the extra argument)::

        m = jaxquant.load(...)
        eps = guided_eps(m.apply, 7.5, m.network_config.unconditional_label)
        run = make_sampler(eps, m.schedule, 20, "ddim")
        latents = run(m.params, x_T, key, labels)

    Args:
      eps_apply: the class-conditional model, ``(params, x [B,...], t [B], y [B]) -> eps``.
      scale: guidance scale ``s`` (a Python number or a traced scalar).
      null_label: the "no class" label (CompVis: ``n_classes - 1``).

    Raises:
      ConfigError: ``null_label`` is not a non-negative integer.
    """
    if isinstance(null_label, bool) or not isinstance(null_label, int) or null_label < 0:
        raise ConfigError(f"null_label must be a non-negative integer class label, got {null_label!r}")

    def fn(params: Any, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        b = x.shape[0]
        y = jnp.asarray(y, jnp.int32)
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        eps = eps_apply(
            params,
            jnp.concatenate([x, x], axis=0),
            jnp.concatenate([t, t], axis=0),
            jnp.concatenate([jnp.full_like(y, null_label), y], axis=0),  # unconditional first, as CompVis
        )
        eps_u, eps_c = eps[:b], eps[b:]
        return eps_u + jnp.asarray(scale, eps.dtype) * (eps_c - eps_u)

    return fn
