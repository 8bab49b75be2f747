"""Data-free calibration along the model's own sampling trajectories (as Q-Diffusion).

:func:`calibrate` runs the model's sampler from noise (classifier-free guided for
class-conditional models), keeps the inputs ``(x_t, t, y)`` it sees at every step and
the float model's outputs, and records for every quantization *site* (the input of each
dense/conv layer, and the operands of the attention matmuls) per timestep group:

* the running minimum and maximum;
* a uniform sub-sample of its values (at most ``reservoir`` per group): each call
  contributes the same number of randomly chosen values, so the sample is stratified
  uniformly over steps and batches;
* for weight layers, ``XᵀX`` summed over all inputs (conv inputs as im2col patches in
  kernel order ``(kh, kw, in)``), the statistic of activation-aware weight quantizers
  (AQ's objective ``tr(ΔW XᵀX ΔWᵀ)``). Layers whose ``XᵀX`` does not fit the memory
  limit together are processed in further passes over the stored inputs.

Everything is written to ``CALIB_DIR`` with orbax after each batch of samples, so a
killed run resumes from the last finished batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant.diffusion.samplers import ddim_step, ddpm_step, initial_noise, previous_timesteps, step_noise
from jaxquant.diffusion.schedules import sampling_timesteps
from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.models.introspect import conv_layers
from jaxquant.quant.activation import timestep_group
from jaxquant import xla

CALIB_FORMAT = "jaxquant-calibration"
CALIB_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Settings of a calibration run.

    Attributes:
      num_samples: trajectories sampled from noise.
      steps: sampler steps per trajectory (the timesteps calibrated).
      groups: timestep groups (equal-width bins over ``[0, T)``).
      batch_size: trajectories per batch.
      sampler: "ddim" (eta 0) or "ddpm".
      cfg_scale: classifier-free guidance scale (class-conditional models).
      reservoir: values kept per site and group.
      xtx: accumulate ``XᵀX`` of weight-layer inputs.
      memory_limit_mb: bound on ``XᵀX`` accumulators held at once.
      seed: PRNG seed (noise, labels, sub-sampling).
    """

    num_samples: int = 64
    steps: int = 20
    groups: int = 1
    batch_size: int = 32
    sampler: str = "ddim"
    cfg_scale: float = 1.0
    reservoir: int = 4096
    xtx: bool = True
    memory_limit_mb: int = 2048
    seed: int = 0

    def __post_init__(self):
        for name in ("num_samples", "steps", "groups", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"calibration {name} must be positive, got {getattr(self, name)} "
                                  f"(jaxquant calibrate: --{name.replace('_', '-')})")
        if self.groups > self.steps:
            raise ConfigError(f"{self.groups} timestep groups need at least as many steps (got {self.steps})")


@dataclasses.dataclass
class Calibration:
    """Result of :func:`calibrate` (see the module docstring)."""

    config: CalibConfig
    timesteps: np.ndarray           # [S] the sampler's timesteps
    step_groups: np.ndarray         # [S] timestep group of each step
    inputs: np.ndarray              # [S, N, H, W, C] x_t fed to the model
    labels: np.ndarray | None       # [N] class labels (conditional models)
    outputs: np.ndarray             # [S, N, H, W, C] float model outputs (guided eps)
    lo: dict[str, np.ndarray]       # site -> [G, P] minimum (P = 2 parts for split inputs)
    hi: dict[str, np.ndarray]       # site -> [G, P] maximum
    samples: dict[str, np.ndarray]  # site -> [G, P, R] sub-sampled values
    xtx: dict[str, np.ndarray]      # weight layer -> [K, K]
    xtx_count: dict[str, int]       # rows accumulated

    @property
    def sites(self) -> list[str]:
        return sorted(self.lo)


def site_name(path: tuple, leaf: str) -> str:
    """Name of a recorded activation: the layer path for a layer's input, else path.leaf."""
    base = ".".join(str(p) for p in path)
    return base if leaf == "input" else f"{base}.{leaf}"


def _flatten_calib(tree: dict, prefix: tuple = ()) -> dict[str, jax.Array]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, tuple):  # sow stores a tuple of recorded values
            out[site_name(prefix, k)] = v[0]
        else:
            out.update(_flatten_calib(v, prefix + (k,)))
    return out


def trajectory_labels(calib: Calibration) -> np.ndarray:
    """The calibration trajectories' class labels (zeros for an unconditional model)."""
    return calib.labels if calib.labels is not None else np.zeros((calib.inputs.shape[1],), np.int32)


def _model_fns(model, cfg_scale: float):
    """Return ``(eps_fn(params, x, t, y), capture_fn(params, x, t, y))``."""
    module = model.module

    def apply(params, x, t, y, mutable):
        return module.apply({"params": params}, x, t, y, mutable=mutable) if mutable else \
            module.apply({"params": params}, x, t, y)

    conditional = model.is_class_conditional
    null = getattr(model.network_config, "unconditional_label", None)
    if conditional and cfg_scale != 1.0 and null is None:
        raise ConfigError("classifier-free guidance needs a model with an unconditional label")

    def eps_fn(params, x, t, y):
        if conditional and cfg_scale != 1.0:
            xx, tt = jnp.concatenate([x, x]), jnp.concatenate([t, t])
            yy = jnp.concatenate([jnp.full_like(y, null), y])
            e = apply(params, xx, tt, yy, None)
            eu, ec = jnp.split(e, 2)
            return eu + cfg_scale * (ec - eu)
        return apply(params, x, t, y if conditional else None, None)

    def capture(params, x, t, y):
        # The quantized model sees the same doubled batch under guidance.
        if conditional and cfg_scale != 1.0:
            x, t, y = jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([jnp.full_like(y, null), y])
        _, state = apply(params, x, t, y if conditional else None, ["calib"])
        return _flatten_calib(state["calib"])

    return eps_fn, capture


def _trajectory_fn(model, cfg: CalibConfig, eps_fn):
    sched = model.schedule
    ts = sampling_timesteps(sched, cfg.steps)
    prevs = previous_timesteps(sched, cfg.steps, cfg.sampler)

    @xla.jit
    def run(params, key, y):
        x = initial_noise(key, (cfg.batch_size, *model.sample_shape))

        def body(x, step):
            t, tp, i = step
            tb = jnp.full((x.shape[0],), t, jnp.int32)
            e = eps_fn(params, x, tb, y)
            if cfg.sampler == "ddim":
                xn = ddim_step(sched, x, e, t, tp, 0.0, None)
            else:
                xn = ddpm_step(sched, x, e, t, tp, step_noise(key, i, x.shape))
            return xn, (x, e)

        _, (xs, es) = jax.lax.scan(body, x, (jnp.asarray(ts, jnp.int32), jnp.asarray(prevs, jnp.int32),
                                              jnp.arange(len(ts), dtype=jnp.int32)))
        return xs, es

    return run, ts


def calibrate(model, cfg: CalibConfig, out_dir: str | Path | None = None, progress: bool = True) -> Calibration:
    """Run the calibration described in the module docstring; resumes from ``out_dir``.

    Args:
      model: a :class:`jaxquant.Model` (float parameters).
      cfg: the run's settings.
      out_dir: where to save (and resume from); ``None`` keeps everything in memory.
    """
    import orbax.checkpoint as ocp

    params = model.params
    eps_fn, capture = _model_fns(model, cfg.cfg_scale)
    run, ts = _trajectory_fn(model, cfg, eps_fn)
    T = model.schedule.num_train_timesteps
    step_groups = np.asarray(timestep_group(jnp.asarray(ts), cfg.groups, T))
    n_batches = math.ceil(cfg.num_samples / cfg.batch_size)
    base = jax.random.key(cfg.seed)
    n_cls = _num_classes(model)

    # Sites and their shapes, from one traced capture.
    y0 = jnp.zeros((cfg.batch_size,), jnp.int32)
    x0 = jnp.zeros((cfg.batch_size, *model.sample_shape), jnp.float32)
    shapes = jax.eval_shape(capture, params, x0, jnp.zeros((cfg.batch_size,), jnp.int32), y0)
    sites = sorted(shapes)
    splits = {n: c.input_split for n, c in conv_layers(model).items() if c.input_split}
    parts = {s: 2 if s in splits else 1 for s in sites}
    calls_per_group = {g: int((step_groups == g).sum()) * n_batches for g in range(cfg.groups)}
    per_call = {g: max(1, math.ceil(cfg.reservoir / max(c, 1))) for g, c in calls_per_group.items()}
    R = cfg.reservoir

    state = {
        "batches_done": np.zeros((), np.int32),
        "inputs": np.zeros((len(ts), n_batches * cfg.batch_size, *model.sample_shape), np.float32),
        "outputs": np.zeros((len(ts), n_batches * cfg.batch_size, *model.sample_shape), np.float32),
        "labels": np.zeros((n_batches * cfg.batch_size,), np.int32),
        "lo": {s: np.full((cfg.groups, parts[s]), np.inf, np.float32) for s in sites},
        "hi": {s: np.full((cfg.groups, parts[s]), -np.inf, np.float32) for s in sites},
        "samples": {s: np.zeros((cfg.groups, parts[s], R), np.float32) for s in sites},
    }
    mngr = None
    if out_dir is not None:
        out_dir = Path(out_dir).resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_meta(out_dir, cfg, ts, step_groups, complete=False)
        mngr = ocp.CheckpointManager(out_dir / "progress", options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
        if mngr.latest_step() is not None:
            state = _restore_state(mngr, state)

    @xla.jit
    def site_stats(params, x, t, y, key):
        acts = capture(params, x, t, y)
        out = {}
        for i, s in enumerate(sites):
            a = acts[s].astype(jnp.float32)
            pieces = [a[..., :splits[s]], a[..., splits[s]:]] if s in splits else [a]
            los, his, vals = [], [], []
            for j, piece in enumerate(pieces):
                v = piece.ravel()
                idx = jax.random.randint(jax.random.fold_in(key, 2 * i + j), (R,), 0, v.shape[0])
                los.append(v.min())
                his.append(v.max())
                vals.append(v[idx])
            out[s] = (jnp.stack(los), jnp.stack(his), jnp.stack(vals))
        return out

    start = int(state["batches_done"])
    bar = tqdm(total=n_batches, initial=start, desc="calibrate", disable=not progress, unit="batch")
    for b in range(start, n_batches):
        kb = jax.random.fold_in(base, b)
        y = (jax.random.randint(jax.random.fold_in(kb, 1), (cfg.batch_size,), 0, n_cls) if n_cls
             else jnp.zeros((cfg.batch_size,), jnp.int32))
        xs, es = run(params, kb, y)
        sl = slice(b * cfg.batch_size, (b + 1) * cfg.batch_size)
        state["inputs"][:, sl] = np.asarray(xs)
        state["outputs"][:, sl] = np.asarray(es)
        state["labels"][sl] = np.asarray(y)
        for si, t in enumerate(ts):
            g = int(step_groups[si])
            tb = jnp.full((cfg.batch_size,), int(t), jnp.int32)
            stats = site_stats(params, xs[si], tb, y, jax.random.fold_in(kb, 1000 + si))
            # Position of this call among the group's calls: its slot in the reservoir.
            call = b * int((step_groups == g).sum()) + int((step_groups[:si] == g).sum())
            k = per_call[g]
            pos = (np.arange(k) + call * k) % R
            for s, (lo, hi, vals) in stats.items():
                state["lo"][s][g] = np.minimum(state["lo"][s][g], np.asarray(lo))
                state["hi"][s][g] = np.maximum(state["hi"][s][g], np.asarray(hi))
                state["samples"][s][g][:, pos] = np.asarray(vals)[:, :k]
        state["batches_done"] = np.asarray(b + 1, np.int32)
        if mngr is not None:
            mngr.save(b + 1, args=ocp.args.StandardSave(state))
            mngr.wait_until_finished()
        bar.update(1)
    bar.close()

    n = cfg.num_samples
    calib = Calibration(cfg, np.asarray(ts), step_groups, state["inputs"][:, :n], state["labels"][:n] if n_cls else None,
                        state["outputs"][:, :n], state["lo"], state["hi"], state["samples"], {}, {})
    if cfg.xtx:
        calib.xtx, calib.xtx_count = accumulate_xtx(model, calib, progress=progress)
    if out_dir is not None:
        save_calibration(calib, out_dir)
    return calib


def _num_classes(model) -> int:
    c = model.network_config
    if not model.is_class_conditional:
        return 0
    n = getattr(c, "num_class_embeds", None) or getattr(c, "num_classes", None)
    if n is None:
        raise ConfigError("cannot tell the number of classes of this model")
    # CompVis class embedders reserve the last label for "no class".
    return int(n) - 1 if getattr(c, "unconditional_label", None) is not None else int(n)


def _gram(rows: jax.Array) -> jax.Array:
    return jnp.dot(rows.T, rows, precision=jax.lax.Precision.HIGHEST)


def conv_input_xtx(x: jax.Array, kh: int, kw: int, strides, padding, method: str = "shift") -> jax.Array:
    """``rowsᵀ·rows`` of the im2col rows of an NHWC input ``x`` (kernel order ``(kh, kw, c)``),
    without forming the rows for stride-1 convolutions (``method="im2col"``: form them,
    the reference).

    Block ``(p, q)`` of the result (taps ``p = (a, b)``, ``q = (a', b')``, each ``C×C``) is
    ``Σ x[u, v]ᵀ x[u + a'-a, v + b'-b]`` over the image positions ``(u, v)`` that tap ``p``
    reads: a shifted autocorrelation of the image, restricted to a window. A ``kh×kw``
    kernel has ``(2kh-1)(2kw-1)`` shifts, half of them transposes of the others, against
    ``(kh·kw)²`` blocks; so each block is the full correlation at its shift (computed
    once per shift) minus the few border rows and columns outside its window, or the
    window sum itself when that is smaller. Only blocks with ``p ≤ q`` are computed; the
    rest are transposes. For a 3×3 convolution on 32×32 inputs that is about 4× fewer
    multiply-adds than ``rowsᵀ·rows``, with the same result up to float rounding.
    Strided convolutions fall back to the im2col rows.
    """
    if method == "im2col" or tuple(strides) != (1, 1):
        return _gram(_conv_rows(x, kh, kw, strides, padding))
    (pt, pb), (pl, pr) = padding
    _, h, w, c = x.shape
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1

    def corr(u0, u1, v0, v1, d, e):  # Σ over u in [u0, u1), v in [v0, v1) of x[u, v]ᵀ x[u+d, v+e]
        if u1 <= u0 or v1 <= v0:
            return None
        lhs = x[:, u0:u1, v0:v1].reshape(-1, c)
        rhs = x[:, u0 + d:u1 + d, v0 + e:v1 + e].reshape(-1, c)
        return jnp.dot(lhs.T, rhs, precision=jax.lax.Precision.HIGHEST)

    def valid(d, n):  # positions u with u and u+d inside [0, n)
        return max(0, -d), min(n, n - d)

    full: dict[tuple[int, int], jax.Array] = {}

    def full_corr(d, e):
        if (-d, -e) in full:
            return full[(-d, -e)].T
        if (d, e) not in full:
            (u0, u1), (v0, v1) = valid(d, h), valid(e, w)
            f = corr(u0, u1, v0, v1, d, e)
            full[(d, e)] = jnp.zeros((c, c), x.dtype) if f is None else f
        return full[(d, e)]

    taps = [(a, b) for a in range(kh) for b in range(kw)]
    blocks: dict[tuple[int, int], jax.Array] = {}
    for i, (a, b) in enumerate(taps):
        for j in range(i, len(taps)):
            a2, b2 = taps[j]
            d, e = a2 - a, b2 - b
            (u0, u1), (v0, v1) = valid(d, h), valid(e, w)
            # the image rows / columns tap (a, b) reads, among the valid ones
            r0, r1 = max(u0, a - pt), min(u1, a - pt + ho)
            c0, c1 = max(v0, b - pl), min(v1, b - pl + wo)
            if r1 <= r0 or c1 <= c0:
                blk = jnp.zeros((c, c), x.dtype)
            elif (r1 - r0) * (c1 - c0) <= (u1 - u0) * (v1 - v0) - (r1 - r0) * (c1 - c0):
                blk = corr(r0, r1, c0, c1, d, e)
            else:
                blk = full_corr(d, e)
                for part in (corr(u0, r0, v0, v1, d, e), corr(r1, u1, v0, v1, d, e),
                             corr(r0, r1, v0, c0, d, e), corr(r0, r1, c1, v1, d, e)):
                    if part is not None:
                        blk = blk - part
            blocks[(i, j)] = blk
    return jnp.block([[blocks[(i, j)] if i <= j else blocks[(j, i)].T for j in range(len(taps))]
                      for i in range(len(taps))])


def _conv_rows(x: jax.Array, kh: int, kw: int, strides, padding) -> jax.Array:
    """im2col rows of an NHWC input in kernel order (kh, kw, in)."""
    p = jax.lax.conv_general_dilated_patches(x, (kh, kw), strides, padding,
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    c = x.shape[-1]
    p = p.reshape(*p.shape[:-1], c, kh, kw)
    p = jnp.moveaxis(p, -3, -1)  # -> (kh, kw, c)
    return p.reshape(-1, kh * kw * c)


def accumulate_xtx(model, calib: Calibration, progress: bool = True,
                   conv_method: str = "shift") -> tuple[dict, dict]:
    """``XᵀX`` of every weight layer's input over all calibration inputs.

    Every dense/conv layer the denoiser runs gets one (not an LDM's first stage).

    Conv rows are im2col patches with the layer's own stride and padding (read off
    the network by :func:`jaxquant.models.introspect.conv_layers`). ``conv_method``
    ``"shift"`` (default) sums them as shifted autocorrelations without forming the rows
    (:func:`conv_input_xtx`); ``"im2col"`` forms the rows and multiplies (the reference,
    kept for comparisons).
    """
    if conv_method not in ("shift", "im2col"):
        raise ConfigError(f"conv_method must be 'shift' or 'im2col', not {conv_method!r}")
    from jaxquant.quant.rules import layer_kernels

    cfg = calib.config
    _, capture = _model_fns(model, cfg.cfg_scale)
    bs = cfg.batch_size
    shapes = jax.eval_shape(capture, model.params, jnp.zeros((bs, *model.sample_shape)),
                            jnp.zeros((bs,), jnp.int32), jnp.zeros((bs,), jnp.int32))
    # Only the layers the denoiser runs (an LDM's first stage is not called while sampling).
    kernels = {n: k for n, k in layer_kernels(model.params).items() if n in shapes}
    limit = cfg.memory_limit_mb * 2**20
    sizes = {n: int(np.prod(k.shape[:-1])) ** 2 * 4 for n, k in kernels.items()}
    for n, s in sizes.items():
        if s > limit:
            raise ConfigError(f"XᵀX of layer {n} needs {s / 2**20:.0f} MiB, over the {cfg.memory_limit_mb} MiB limit")
    chunks, cur, used = [], [], 0
    for n in kernels:
        if used + sizes[n] > limit:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(n)
        used += sizes[n]
    chunks.append(cur)
    geom = {n: (c.strides, c.padding) for n, c in conv_layers(model).items()}

    xtx, count = {}, {}
    S, N = calib.inputs.shape[:2]
    total = len(chunks) * S * math.ceil(N / bs)
    bar = tqdm(total=total, desc="XᵀX", disable=not progress, unit="call")
    for names in chunks:
        # the accumulators are updated in place (donated): no fresh [K, K] buffers per call
        @xla.jit(donate_argnames=("acc_state",))
        def acc(params, acc_state, x, t, y, names=tuple(names)):
            acts = capture(params, x, t, y)
            new = {}
            for n in names:
                k = kernels[n]
                a = acts[n].astype(jnp.float32)
                if len(k.shape) == 2 or k.shape[:2] == (1, 1):
                    new[n] = acc_state[n] + _gram(a.reshape(-1, a.shape[-1]))
                else:
                    strides, pad = geom[n]
                    new[n] = acc_state[n] + conv_input_xtx(a, k.shape[0], k.shape[1], strides, pad, conv_method)
            return new

        state = {n: jnp.zeros((int(np.prod(kernels[n].shape[:-1])),) * 2, jnp.float32) for n in names}

        def rows_of(n):  # rows accumulated: positions (× kernel windows) of every call
            k, a = kernels[n], shapes[n].shape
            per_call = int(np.prod(a[:-1]))
            if len(k.shape) == 4 and k.shape[:2] != (1, 1):
                strides, _ = geom[n]
                per_call = a[0] * (a[1] // strides[0]) * (a[2] // strides[1])
            return per_call * S * (N // bs)
        for si in range(S):
            t = jnp.full((bs,), int(calib.timesteps[si]), jnp.int32)
            for start in range(0, N, bs):
                x = calib.inputs[si, start:start + bs]
                y = calib.labels[start:start + bs] if calib.labels is not None else np.zeros(len(x), np.int32)
                if len(x) < bs:  # pad: padded rows are removed by zero weight below
                    raise ConfigError("num_samples must be a multiple of batch_size for XᵀX accumulation")
                state = acc(model.params, state, jnp.asarray(x), t, jnp.asarray(y))
                bar.update(1)
        for n in names:
            xtx[n] = np.asarray(state[n])
            count[n] = rows_of(n)
    bar.close()
    return xtx, count


def _write_meta(out_dir: Path, cfg: CalibConfig, ts, step_groups, complete: bool) -> None:
    meta = {"format": CALIB_FORMAT, "format_version": CALIB_VERSION, "config": dataclasses.asdict(cfg),
            "timesteps": [int(t) for t in ts], "step_groups": [int(g) for g in step_groups], "complete": complete}
    old = out_dir / "calibration.json"
    if old.exists():
        prev = json.loads(old.read_text())
        if prev.get("config") != meta["config"]:
            raise CheckpointError(f"'{out_dir}' holds a calibration with other settings; use another --out")
    old.write_text(json.dumps(meta, indent=2) + "\n")


def _restore_state(mngr, template: dict) -> dict:
    import orbax.checkpoint as ocp

    restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(template))
    return jax.tree_util.tree_map(np.array, restored)


def save_calibration(calib: Calibration, out_dir: str | Path) -> Path:
    """Write the finished calibration (orbax arrays + ``calibration.json``)."""
    import orbax.checkpoint as ocp
    import shutil

    out_dir = Path(out_dir).resolve()
    data = {"inputs": calib.inputs, "outputs": calib.outputs, "timesteps": calib.timesteps,
            "step_groups": calib.step_groups, "lo": calib.lo, "hi": calib.hi, "samples": calib.samples,
            "xtx": calib.xtx}
    if calib.labels is not None:
        data["labels"] = calib.labels
    if (out_dir / "data").exists():
        shutil.rmtree(out_dir / "data")
    ocp.PyTreeCheckpointer().save(str(out_dir / "data"), data)
    _write_meta(out_dir, calib.config, calib.timesteps, calib.step_groups, complete=True)
    if (out_dir / "progress").exists():
        shutil.rmtree(out_dir / "progress")
    return out_dir


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration directory written by :func:`calibrate`."""
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    meta_file = path / "calibration.json"
    if not meta_file.is_file():
        raise CheckpointError(f"'{path}' is not a calibration directory (no calibration.json)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != CALIB_FORMAT or meta.get("format_version") != CALIB_VERSION:
        raise CheckpointError(f"'{path}': unknown calibration format {meta.get('format')!r} v{meta.get('format_version')}")
    if not meta.get("complete"):
        raise CheckpointError(f"'{path}' holds an unfinished calibration: rerun `jaxquant calibrate` with the same settings to resume")
    d = ocp.PyTreeCheckpointer().restore(str(path / "data"))
    cfg = CalibConfig(**meta["config"])
    return Calibration(cfg, d["timesteps"], d["step_groups"], d["inputs"], d.get("labels"), d["outputs"],
                       d["lo"], d["hi"], d["samples"], d.get("xtx", {}), {})
