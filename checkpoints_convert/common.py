"""Format-independent pieces of the PyTorch → Flax checkpoint conversion.

The Flax networks in :mod:`jaxquant.models` name their submodules after the PyTorch
modules they port, so the dotted path of a parameter's parent module *is* the torch
module name::

    Flax:  params["down_blocks.1.attentions.0"]["to_q"]["kernel"]   (in, out)
    torch: state_dict["down_blocks.1.attentions.0.to_q.weight"]      (out, in)

:func:`state_dict_to_params` walks the *expected* Flax tree (from
``jax.eval_shape(module.init, ...)``), derives each leaf's torch name with
:func:`torch_name_for`, converts the layout with :func:`torch_to_flax`, and reports every
problem at once (missing, unexpected, wrong shape, non-finite) in a single
:class:`~jaxquant.errors.CheckpointError`. :func:`load_torch_state_dict` reads
``.safetensors`` or a weights-only torch pickle without ever executing pickled code.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from jaxquant.errors import CheckpointError

#: Flax leaf name → suffix of the torch parameter name.
LEAF_TO_TORCH: dict[str, str] = {
    "kernel": "weight",  # Dense [in, out] ↔ Linear [out, in]; Conv HWIO ↔ Conv OIHW
    "scale": "weight",  # GroupNorm / LayerNorm
    "embedding": "weight",  # nn.Embed ↔ nn.Embedding (same layout)
    "bias": "bias",
}

TORCH_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# --------------------------------------------------------------------------- names


def torch_name_for(path: Sequence[str], prefix: str = "") -> str:
    """Torch state-dict name of the Flax leaf at ``path``.

    ``path`` is the key path from the top of the ``params`` tree to the leaf, e.g.
    ``("down_blocks.1.attentions.0", "to_q", "kernel")`` →
    ``"down_blocks.1.attentions.0.to_q.weight"``. Leaves other than
    ``kernel``/``scale``/``embedding``/``bias`` keep their own name (a bare
    ``nn.Parameter`` in torch). ``prefix`` is prepended verbatim (e.g.
    ``"model.diffusion_model."``).
    """
    if not path:
        raise ValueError("empty parameter path")
    *modules, leaf = (str(p) for p in path)
    suffix = LEAF_TO_TORCH.get(leaf, leaf)
    return prefix + ".".join([*modules, suffix])


def rename_state_dict(
    state_dict: Mapping[str, np.ndarray],
    rename: Callable[[str], str],
    where: str = "the checkpoint",
) -> dict[str, np.ndarray]:
    """Return a copy of ``state_dict`` with every key passed through ``rename``.

    Raises:
      CheckpointError: when two source names map to the same new name (e.g. a file
        holding both a deprecated and the current name of one tensor).
    """
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    clashes = []
    for name, value in state_dict.items():
        new = rename(name)
        if new in out:
            clashes.append(f"{origin[new]} and {name} (both become {new})")
            continue
        out[new] = value
        origin[new] = name
    if clashes:
        raise CheckpointError(f"{where} holds the same tensor under two names: " + "; ".join(sorted(clashes)))
    return out


# --------------------------------------------------------------------------- layouts


def expected_torch_shape(leaf: str, flax_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape the torch tensor must have for a Flax leaf of ``flax_shape``.

    ``kernel`` of rank 2 is a Linear weight (``[in, out]`` → ``(out, in)``); of rank
    ≥ 3 a convolution (``(*spatial, in, out)`` → ``(out, in, *spatial)``); every other
    leaf has the same layout in both frameworks.
    """
    s = tuple(int(d) for d in flax_shape)
    if leaf == "kernel" and len(s) == 2:
        return (s[1], s[0])
    if leaf == "kernel" and len(s) >= 3:
        return (s[-1], s[-2], *s[:-2])
    return s


def torch_to_flax(leaf: str, array: np.ndarray, flax_shape: Sequence[int]) -> np.ndarray | None:
    """Convert one torch tensor to the Flax layout of ``flax_shape``; ``None`` if it cannot fit.

    Convolutions go OIHW → HWIO (any number of spatial dims), Linear weights are
    transposed, and a ``(out, in, 1, 1)`` convolution weight is accepted for a Dense
    kernel (1×1 convolutions used as projections). Everything else must already have
    the expected shape.
    """
    flax_shape = tuple(int(d) for d in flax_shape)
    want = expected_torch_shape(leaf, flax_shape)
    a = np.asarray(array)
    if leaf == "kernel" and len(flax_shape) == 2 and a.ndim > 2 and a.shape[2:] == (1,) * (a.ndim - 2):
        a = a.reshape(a.shape[:2])
    if a.shape != want:
        return None
    if leaf == "kernel" and a.ndim == 2:
        a = a.T
    elif leaf == "kernel" and a.ndim >= 3:
        a = np.transpose(a, (*range(2, a.ndim), 1, 0))
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------- mapping


def _leaves(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, (*path, str(key)))
        else:
            yield (*path, str(key)), value


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes' bfloat16/float8 (registered by jax) are not np.floating subtypes
    return dtype.kind == "f" or dtype.name.startswith(("bfloat16", "float8", "float6", "float4"))


def _float32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if _is_float(a.dtype) and a.dtype != np.float32 else a


def _non_finite_note(a: np.ndarray) -> str | None:
    if not _is_float(a.dtype):
        return None
    a = _float32(a)
    finite = np.isfinite(a)
    if finite.all():
        return None
    n_nan = int(np.isnan(a).sum())
    n_inf = int(a.size - finite.sum()) - n_nan
    parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else ""]
    return ", ".join(p for p in parts if p)


def state_dict_to_params(
    expected: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    *,
    prefix: str = "",
    ignore: Callable[[str], bool] | None = None,
    name_fn: Callable[[Sequence[str], str], str] = torch_name_for,
    where: str = "the checkpoint",
) -> dict:
    """Build the Flax parameter tree described by ``expected`` from a torch state dict.

    Args:
      expected: the Flax ``params`` tree whose leaves have ``.shape`` (and optionally
        ``.dtype``), typically ``jax.eval_shape(module.init, ...)["params"]``.
      state_dict: torch tensor name → numpy array (see :func:`load_torch_state_dict`).
      prefix: prepended to every derived torch name (for checkpoints holding the
        network under a sub-module, e.g. ``"model.diffusion_model."``).
      ignore: predicate on torch names that are allowed to be left over (other
        networks or buffers stored in the same file); others are "unexpected".
      name_fn: ``(path, prefix) -> torch name``; defaults to :func:`torch_name_for`.
      where: how the source is named in error messages.

    Returns:
      A nested dict of numpy arrays with exactly the structure of ``expected``, in
      the expected dtype (float32 unless the tree says otherwise).

    Raises:
      CheckpointError: listing, in one message, all missing tensor names, all
        unexpected tensor names (both sorted), each shape mismatch (torch name,
        expected and found shape in torch layout) and each tensor holding NaN/Inf.
    """
    params: dict = {}
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    non_finite: list[str] = []
    for path, leaf in _leaves(expected):
        name = name_fn(path, prefix)
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        src = np.asarray(state_dict[name])
        flax_shape = tuple(np.shape(leaf))
        converted = torch_to_flax(path[-1], src, flax_shape)
        if converted is None:
            want = expected_torch_shape(path[-1], flax_shape)
            mismatched.append(f"{name}: expected {want}, found {tuple(src.shape)}")
            continue
        note = _non_finite_note(converted)
        if note:
            non_finite.append(f"{name} ({note})")
            continue
        dtype = getattr(leaf, "dtype", None)
        dtype = np.float32 if dtype is None else dtype
        _set(params, path, converted.astype(dtype, copy=False))
    unexpected = sorted(k for k in state_dict if k not in used and not (ignore and ignore(k)))

    problems = []
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(sorted(missing)))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}, torch layout): " + "; ".join(sorted(mismatched)))
    if non_finite:
        problems.append(f"non-finite tensors (NaN/Inf) ({len(non_finite)}): " + "; ".join(sorted(non_finite)))
    if problems:
        raise CheckpointError(f"{where} does not match the network architecture:\n  " + "\n  ".join(problems))
    return params


# --------------------------------------------------------------------------- reading


def _to_numpy(value: Any, name: str, where: str) -> np.ndarray:
    """torch tensor → numpy; floating types become float32."""
    import torch

    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: entry '{name}' is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided or value.is_quantized:
        raise CheckpointError(f"{where}: tensor '{name}' has an unsupported storage ({value.layout}, quantized={value.is_quantized})")
    t = value.detach().cpu()
    if t.is_floating_point():
        t = t.to(torch.float32)
    elif t.is_complex():
        raise CheckpointError(f"{where}: tensor '{name}' is complex ({t.dtype})")
    return t.numpy()


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise CheckpointError(f"reading '{path}' needs the safetensors package ({e}); pip install 'jaxquant[torch]'") from None
    out: dict[str, np.ndarray] = {}
    fallback: list[str] = []
    try:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():
                try:
                    out[name] = _float32(f.get_tensor(name))
                except TypeError:  # numpy has no such dtype (bfloat16, float8): read through torch
                    fallback.append(name)
        if fallback:
            try:
                import torch  # noqa: F401
            except ImportError:
                raise CheckpointError(
                    f"'{path}' stores {', '.join(fallback[:5])} in a dtype numpy cannot hold (e.g. bfloat16); "
                    "reading it needs torch: pip install 'jaxquant[torch]'") from None
            with safe_open(str(path), framework="pt") as f:
                for name in fallback:
                    out[name] = _to_numpy(f.get_tensor(name), name, str(path))
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...
        raise CheckpointError(f"cannot read '{path}' as safetensors: {type(e).__name__}: {e}") from None
    return out


def _unpickling_detail(message: str) -> str:
    for line in message.splitlines():
        line = line.strip()
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line
    return "not a weights-only torch file"


def _load_torch_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(f"reading '{path}' needs torch ({e}); pip install 'jaxquant[torch]' or use a .safetensors file") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = _unpickling_detail(str(e))
        if "GLOBAL" in detail:
            raise CheckpointError(
                f"'{path}' is a pickle that needs more than tensors to load ({detail}); jaxquant only reads "
                "plain tensor state dicts and does not run code stored in a checkpoint. Re-save the state dict "
                "(torch.save(model.state_dict(), ...)) or convert it to .safetensors where you trust the file") from None
        raise CheckpointError(f"'{path}' is not a readable torch checkpoint ({detail})") from None
    except Exception as e:  # corrupt zip, truncated file, ...
        raise CheckpointError(f"cannot read '{path}' as a torch checkpoint: {type(e).__name__}: {e}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"'{path}' holds a {type(obj).__name__}, not a state dict (name → tensor)")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointError(
            f"'{path}' is not a plain state dict: entries {', '.join(bad[:10])}{' …' if len(bad) > 10 else ''} are not tensors")
    return {str(k): _to_numpy(v, str(k), str(path)) for k, v in obj.items()}


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict as ``{name: numpy array}``, floating tensors as float32.

    ``.safetensors`` is read with the safetensors numpy API (torch only for dtypes
    numpy lacks, e.g. bfloat16). ``.bin``/``.pt``/``.pth``/``.ckpt`` are read with
    ``torch.load(..., weights_only=True)``; a Lightning-style ``{"state_dict": ...}``
    wrapper is unwrapped.

    Raises:
      CheckpointError: the file is missing or unreadable, has an unknown suffix, or
        is a pickle that would need anything beyond tensors (refused, never executed).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no checkpoint file at '{p}'")
    if p.suffix == ".safetensors":
        return _load_safetensors(p)
    if p.suffix in TORCH_FILE_SUFFIXES:
        return _load_torch_pickle(p)
    raise CheckpointError(
        f"'{p}': unknown checkpoint type '{p.suffix}' (expected .safetensors or {', '.join(TORCH_FILE_SUFFIXES)})")
