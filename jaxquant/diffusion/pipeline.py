"""Generating image batches from a loaded model: labels, guidance, batching, seeding, progress.

:func:`generate` is what ``jaxquant sample`` runs. For pixel-space models (``unet2d``) a
batch is one jitted sampling chain; for latent-diffusion models (``ldm``) the chain runs
on latents and the first-stage decoder (:meth:`jaxquant.Model.decode`, which divides by
``scale_factor``) runs inside the same jitted function, so a batch is one XLA program
from noise to images. :func:`sampling_fn` returns that per-batch function for callers
that want the float output (or the latents) instead of uint8 images.

Classifier-free guidance follows CompVis: the "no class" label is ``n_classes - 1`` of
the class embedder (1000 for the ImageNet LDM), the two predictions are mixed as
``eps_u + s * (eps_c - eps_u)`` (:func:`jaxquant.diffusion.guided_eps`), and ``s = 1`` is
the plain conditional model, evaluated without the doubled batch.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.diffusion.guidance import guided_eps
from jaxquant.diffusion.samplers import initial_noise, make_sampler
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.io.model_dir import params_digest
from jaxquant.images import to_uint8
from jaxquant import xla

__all__ = [
    "DEFAULT_STEPS",
    "default_steps",
    "num_classes",
    "unconditional_label",
    "check_labels",
    "check_cfg_scale",
    "sampling_fn",
    "generate",
]

#: Sampler steps ``jaxquant sample`` uses when ``--steps`` is not given, per architecture
#: (the LDM paper samples its class-conditional ImageNet model with DDIM-20).
DEFAULT_STEPS = {"ldm": 20}
_FALLBACK_STEPS = 50


def default_steps(model) -> int:
    """Default number of sampler steps for ``model``: 20 for ``ldm`` models, 50 otherwise."""
    return DEFAULT_STEPS.get(getattr(model, "architecture", None), _FALLBACK_STEPS)


def unconditional_label(model) -> int | None:
    """The "no class" label of classifier-free guidance, or None if the model has none.

    CompVis class embedders reserve their last row (``n_classes - 1``) for it; diffusers'
    class-conditional ``unet2d`` models have no such label.
    """
    if not model.is_class_conditional:
        return None
    return getattr(model.network_config, "unconditional_label", None)


def num_classes(model) -> int | None:
    """Number of class labels one may sample, ``0 .. num_classes(model) - 1``.

    Excludes the unconditional label (so 1000 for a CompVis ImageNet LDM with 1001
    embedder rows). None for unconditional models and for class-conditional models whose
    label range the config does not tell (``unet2d`` with ``class_embed_type="timestep"``
    and no ``num_class_embeds``).
    """
    if not model.is_class_conditional:
        return None
    c = model.network_config
    null = unconditional_label(model)
    if null is not None:
        return int(null)  # labels 0 .. n_classes - 2
    n = getattr(c, "num_class_embeds", None)
    return None if n is None else int(n)


def _check_label_input(model) -> None:
    if getattr(model.network_config, "class_embed_type", None) == "identity":
        raise ConfigError("this unet2d model has class_embed_type='identity': it takes class embedding vectors, "
                          "not integer class labels, which sampling does not support")


def check_labels(model, labels: Sequence[int] | np.ndarray | None, num: int) -> np.ndarray | None:
    """Validate class labels for ``num`` samples from ``model``; return them as int32 or None.

    Raises:
      ConfigError: labels given to an unconditional model or missing for a
        class-conditional one; wrong length; not integers; out of range (for models with
        an unconditional label, the valid range is ``[0, n_classes - 2]``: the last label
        is reserved for classifier-free guidance).
    """
    if not model.is_class_conditional:
        if labels is not None:
            raise ConfigError("this model is unconditional: do not give class labels")
        return None
    _check_label_input(model)
    if labels is None:
        raise ConfigError("this model is class-conditional: give class labels")
    arr = np.asarray(labels)
    if arr.shape != (num,):
        raise ConfigError(f"expected {num} class labels, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer)
                         or (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)))):
        raise ConfigError(f"class labels must be integers, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    n, null = num_classes(model), unconditional_label(model)
    bad = arr[(arr < 0) | ((arr >= n) if n is not None else False)]
    if bad.size:
        shown = ", ".join(str(int(v)) for v in np.unique(bad)[:10])
        if n is None:
            raise ConfigError(f"class labels must be non-negative; got {shown}")
        why = (f" (label {null} is the unconditional label, reserved for classifier-free guidance)"
               if null is not None else "")
        raise ConfigError(f"class labels must be in [0, {n - 1}] for this model{why}; got {shown}")
    return arr.astype(np.int32)


def check_cfg_scale(model, cfg_scale: Any) -> float:
    """Validate a classifier-free guidance scale for ``model``; return it as a float.

    ``1.0`` (no guidance) is valid for every model; any other value needs a
    class-conditional model with an unconditional label (:func:`unconditional_label`).

    Raises:
      ConfigError: not a finite number, or guidance on a model that cannot be guided.
    """
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(cfg_scale)):
        raise ConfigError(f"cfg_scale must be a finite number, got {cfg_scale!r}")
    cfg_scale = float(cfg_scale)
    if cfg_scale != 1.0:
        if not model.is_class_conditional:
            raise ConfigError(f"cfg_scale = {cfg_scale:g}: classifier-free guidance needs a class-conditional model, "
                              "but this model is unconditional (use cfg_scale 1)")
        if unconditional_label(model) is None:
            raise ConfigError(f"cfg_scale = {cfg_scale:g}: classifier-free guidance needs a model trained with an "
                              f"unconditional label, and this {model.architecture} model has none (use cfg_scale 1)")
    return cfg_scale


def eps_fn(model, cfg_scale: float = 1.0) -> Callable[..., jax.Array]:
    """The ε the sampler steps with, ``fn(params, x, t, y)``: ``model.apply``, or with
    ``cfg_scale != 1`` its classifier-free-guided mix (:func:`guided_eps`).

    Raises:
      ConfigError: a guidance scale the model cannot take (:func:`check_cfg_scale`).
    """
    cfg_scale = check_cfg_scale(model, cfg_scale)
    return model.apply if cfg_scale == 1.0 else guided_eps(model.apply, cfg_scale, unconditional_label(model))


def sampling_fn(
    model,
    *,
    steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    cfg_scale: float = 1.0,
    decode: bool | None = None,
) -> Callable[..., jax.Array]:
    """The jitted per-batch function :func:`generate` runs: ``fn(params, x_T, key, y) -> out``.

    ``x_T`` is the starting noise ``[B, *model.sample_shape]`` (``initial_noise(key,
    shape)`` in :func:`generate`), ``key`` drives the per-step noise of stochastic
    samplers, ``y`` the int32 labels ``[B]`` (None for unconditional models). With
    ``cfg_scale != 1`` the model is evaluated on the doubled batch (unconditional label
    first, as CompVis); with ``cfg_scale == 1`` once on the conditional batch. The output
    is float32: decoded images in about ``[-1, 1]`` when ``decode`` (default: when the
    model has a first stage, i.e. ``ldm``), else the sampler's final sample (images for
    pixel-space models, latents for ``ldm`` with ``decode=False``).

    Raises:
      ConfigError: bad sampler settings or guidance scale, or ``decode=True`` for a
        model without a first stage.
    """
    cfg_scale = check_cfg_scale(model, cfg_scale)
    has_first_stage = hasattr(model.module, "decode")
    if decode is None:
        decode = has_first_stage
    elif decode and not has_first_stage:
        raise ConfigError(f"a {model.architecture!r} model has no first stage to decode with: use decode=False")
    chain = make_sampler(eps_fn(model, cfg_scale), model.schedule, steps, sampler, eta)
    module = model.module

    def fn(params: Any, x_T: jax.Array, key: jax.Array, y: jax.Array | None = None) -> jax.Array:
        z = chain(params, x_T, key) if y is None else chain(params, x_T, key, y)
        if decode:
            z = module.apply({"params": params}, z, method="decode")
        return z.astype(jnp.float32)

    return xla.jit(fn)


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
    cfg_scale: float = 1.0,
    progress: bool = True,
    resume_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Sample ``num`` images from ``model`` (a :class:`jaxquant.Model`) as uint8 NHWC.

    Batch ``b`` starts from ``initial_noise(fold_in(key(seed), b), (batch_size,
    *model.sample_shape))``, so results depend only on the seed and the batch size (and
    the first images of a run equal those of a shorter run with the same batch size).
    The last batch is padded to the batch size (labels with 0), so the per-batch
    function (:func:`sampling_fn`) compiles once per call. Latent-diffusion models are
    sampled in latent space and decoded by the first stage in the same jitted function;
    the images (about ``[-1, 1]``) are mapped to uint8 with
    :func:`jaxquant.images.to_uint8`.

    Args:
      model: the loaded model.
      num: number of images.
      steps: sampler steps (``jaxquant sample`` defaults to :func:`default_steps`).
      sampler: "ddim" or "ddpm".
      eta: DDIM noise weight.
      seed: base seed (batch ``b`` uses ``fold_in(key(seed), b)``).
      batch_size: images per jitted call.
      labels: class labels (length ``num``) for class-conditional models; see
        :func:`check_labels` for the valid range.
      cfg_scale: classifier-free guidance scale; 1 (default) is the plain conditional
        model. Other values need a model with an unconditional label (``ldm`` with a
        class embedder).
      progress: show a progress bar (one tick per batch).
      resume_dir: where finished batches are kept (one ``.npy`` each, written as it
        finishes) so that a killed run started again with the same directory and
        arguments samples only the missing batches; the images are the same as those of
        an uninterrupted run, since each batch depends only on its index. The directory
        records the settings and a digest of the parameters, and is left in place (delete
        it once the images are saved).

    Returns:
      uint8 ``[num, H, W, C]`` (``H = W = network_config.decoded_size`` for ``ldm``).

    Raises:
      ConfigError: bad ``num``/``batch_size``, labels or guidance scale, or sampler settings.
      CheckpointError: ``resume_dir`` holds batches of other settings or parameters.
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ConfigError(f"num must be a positive integer (got {num!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer (got {batch_size!r})")
    num, batch_size = int(num), int(batch_size)
    labels = check_labels(model, labels, num)
    run = sampling_fn(model, steps=steps, sampler=sampler, eta=eta, cfg_scale=cfg_scale)
    cfg_scale = float(cfg_scale)

    shape = (batch_size, *model.sample_shape)
    base = jax.random.key(seed)
    n_batches = -(-num // batch_size)
    store = None
    if resume_dir is not None:
        store = _BatchStore(resume_dir, {
            "num": num, "steps": steps, "sampler": sampler, "eta": float(eta), "seed": seed,
            "batch_size": batch_size, "cfg_scale": cfg_scale,
            "labels": None if labels is None else zlib.crc32(np.asarray(labels, np.int64).tobytes()),
            "params": params_digest(model.params)})
    out: list[np.ndarray | None] = [None if store is None else store.load(b) for b in range(n_batches)]
    todo = [b for b in range(n_batches) if out[b] is None]
    desc = f"sample {sampler}-{steps}" + (f" cfg {cfg_scale:g}" if cfg_scale != 1.0 else "")
    for b in tqdm(todo, desc=desc, disable=not progress, unit="batch", initial=n_batches - len(todo),
                  total=n_batches):
        key = jax.random.fold_in(base, b)
        y = None
        if labels is not None:
            yb = labels[b * batch_size:(b + 1) * batch_size]
            y = jnp.asarray(np.pad(yb, (0, batch_size - len(yb))))
        x0 = run(model.params, initial_noise(key, shape), key, y)
        out[b] = np.asarray(x0)
        if store is not None:
            store.save(b, out[b])
    x = np.concatenate(out)[:num]
    return to_uint8(x)


class _BatchStore:
    """A directory of finished sampling batches (``batch-NNNNN.npy``) and the settings they
    were sampled with (``settings.json``); see :func:`generate`'s ``resume_dir``."""

    FORMAT = "jaxquant-samples-progress"

    def __init__(self, path: str | os.PathLike, settings: dict) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = self.path / "settings.json"
        record = {"format": self.FORMAT, "version": 1, "settings": settings}
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except json.JSONDecodeError:
                stored = None
            if stored != record:
                raise CheckpointError(
                    f"{self.path} holds sampling batches of other settings or parameters than this run's "
                    f"({stored.get('settings') if isinstance(stored, dict) else 'unreadable settings.json'} "
                    f"against {settings}); delete it or pass another resume_dir")
        else:
            meta.write_text(json.dumps(record, indent=1))

    def _file(self, b: int) -> Path:
        return self.path / f"batch-{b:05d}.npy"

    def load(self, b: int) -> np.ndarray | None:
        f = self._file(b)
        return np.load(f) if f.is_file() else None

    def save(self, b: int, x: np.ndarray) -> None:
        tmp = self.path / f".batch-{b:05d}.tmp.npy"
        np.save(tmp, x)
        os.replace(tmp, self._file(b))  # a kill mid-write leaves no truncated batch behind
