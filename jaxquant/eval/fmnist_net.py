"""The project's Fashion-MNIST classifier, used as an in-domain feature network.

A small all-convolutional network (GroupNorm, SiLU) on 32×32 grayscale inputs:

=========  ==========================================  ==========================
output     tensor                                      used for
=========  ==========================================  ==========================
``pool``   256-d penultimate activations               FID-type distance, P/R
``spatial``8×8×64 activations of the third stage      sFID-type distance (first 7 channels)
``logits`` 10 classes                                  IS-type score, accuracy
=========  ==========================================  ==========================

Numbers computed on these features are labelled ``fmnist`` everywhere; they are not
Inception FIDs and are not comparable with published FIDs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.models.layers import Conv, Dense, GroupNorm

if TYPE_CHECKING:
    from jaxquant.eval.features import FeatureNet

FMNIST_NET_CONFIG = {"widths": [16, 32, 64], "features": 256, "groups": 8, "dropout": 0.3}


class FmnistNet(nn.Module):
    """Classifier on ``[N, 32, 32, 1]`` inputs in [-1, 1]; returns ``(logits, feats)``."""

    widths: tuple = (16, 32, 64)
    features: int = 256
    groups: int = 8
    dropout: float = 0.3

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
        h = x
        feats = {}
        for i, w in enumerate(self.widths):
            for j in range(2):
                h = Conv(w, 3, padding=1, name=f"stage{i}.conv{j}")(h)
                h = nn.silu(GroupNorm(self.groups, 1e-5, name=f"stage{i}.norm{j}")(h))
            if i == 2:
                feats["spatial"] = h
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = h.reshape(h.shape[0], -1)
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = nn.silu(Dense(self.features, name="fc")(h))
        feats["pool"] = h
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        logits = Dense(10, name="head")(h)
        feats["logits"] = logits
        return logits, feats


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """uint8 ``[N, 32, 32, 1]`` (or 28×28, padded) → float32 in [-1, 1]."""
    x = jnp.asarray(images_uint8, jnp.float32)
    if x.shape[-1] == 3:  # RGB input: luminance as the network was trained on grayscale
        x = x.mean(-1, keepdims=True)
    if x.shape[1] == 28:
        x = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    return x / 127.5 - 1.0


def build(config: dict | None = None) -> FmnistNet:
    """The Fashion-MNIST classifier module, from :data:`FMNIST_NET_CONFIG` with ``config``'s keys overriding it."""
    c = {**FMNIST_NET_CONFIG, **(config or {})}
    return FmnistNet(tuple(c["widths"]), c["features"], c["groups"], c["dropout"])


def fmnist_feature_net(weights: str = "fmnist-classifier") -> FeatureNet:
    """The classifier as a :class:`jaxquant.eval.features.FeatureNet` named ``fmnist``.

    ``weights`` is a model directory written by ``jaxquant train classifier`` or a
    shipped name (default: the shipped ``fmnist-classifier``).
    """
    from jaxquant.errors import CheckpointError
    from jaxquant.eval.features import make_feature_net
    from jaxquant.io.model_dir import load_model_dir

    meta, params = load_model_dir(weights)
    if meta.architecture != "fmnist-classifier":
        raise CheckpointError(f"'{weights}' holds a {meta.architecture!r} model, not the fmnist classifier")
    net = build(meta.model)

    def apply_fn(variables, x):
        return net.apply(variables, x)[1]

    return make_feature_net("fmnist", net, {"params": params}, input_size=32,
                            spatial_layer="stage2.norm1 (8x8x64)", apply_fn=apply_fn,
                            prepare=preprocess)
