"""The jaxquant model directory.

```
MODEL_DIR/
  config.json   {"format": "jaxquant-model", "format_version": 1,
                 "architecture": "unet2d", "model": {...}, "schedule": {...}, ...,
                 "checksums": {"algorithm": "crc32", "arrays": {"dotted.path": int}},
                 "quantization": {"written_by": ..., "layers": {...}}}   (quantized only)
  params/       orbax PyTree checkpoint of the parameter tree
```

A quantized tree is stored as plain arrays: each weight container becomes a dict of
its array fields and is described in ``"quantization"`` (see
:mod:`jaxquant.quant.serialize`); such directories have ``format_version`` 2, so a
jaxquant that cannot rebuild quantized weights refuses them instead of misreading them.
``"checksums"`` holds a CRC-32 of every stored array (dtype and shape included):
orbax detects a truncated file but restores flipped bytes silently, so loading compares
them (directories written without checksums load unchecked).

The parameter tree is nested dicts keyed by module name; the dotted path of a leaf's
parent is the layer's name in the source checkpoint. Shipped models live in
``jaxquant/assets/<name>/`` and load by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxquant.errors import CheckpointError

FORMAT = "jaxquant-model"
FORMAT_VERSION = 1
#: ``format_version`` of directories holding quantized weight containers.
QUANTIZED_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (FORMAT_VERSION, QUANTIZED_FORMAT_VERSION)
CHECKSUMS_KEY = "checksums"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


@dataclasses.dataclass
class ModelDirMeta:
    """Contents of ``config.json`` of a model directory."""

    architecture: str
    model: dict
    schedule: dict = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": self.architecture,
            "model": self.model,
            "schedule": self.schedule,
            **self.extra,
        }


def shipped_models() -> list[str]:
    """Names of the models shipped inside the package."""
    if not ASSETS_DIR.is_dir():
        return []
    return sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "config.json").is_file())


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """Turn a shipped model name or a directory path into an existing model directory."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve()
    shipped = ASSETS_DIR / str(name_or_path)
    if (shipped / "config.json").is_file():
        return shipped
    raise CheckpointError(
        f"no model directory at '{name_or_path}' and no shipped model of that name "
        f"(shipped: {', '.join(shipped_models()) or 'none'})")


def save_model_dir(path: str | os.PathLike, meta: ModelDirMeta, params: Any, *, overwrite: bool = True) -> Path:
    """Write ``meta`` and ``params`` to ``path`` (replacing an existing model directory).

    ``params`` may hold quantized weight containers registered with
    :func:`jaxquant.quant.serialize.register_container`; their manifest goes to
    ``config.json`` (``"quantization"``) and the directory gets ``format_version`` 2.
    """
    import orbax.checkpoint as ocp

    from jaxquant.quant.serialize import MANIFEST_KEY, to_storable

    path = Path(path).expanduser().resolve()
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"'{path}' exists; choose another --out or remove it")
        if path.is_dir() and (path / "params").exists():
            shutil.rmtree(path / "params")
    path.mkdir(parents=True, exist_ok=True)
    plain, manifest = to_storable(params)
    params_np = _to_numpy_tree(plain)
    ocp.PyTreeCheckpointer().save(str(path / "params"), params_np)
    cfg = meta.to_json()
    cfg.pop(MANIFEST_KEY, None)  # a manifest read with the meta describes other params
    cfg[CHECKSUMS_KEY] = {"algorithm": "crc32", "arrays": array_checksums(params_np)}
    if manifest["layers"]:
        cfg["format_version"] = QUANTIZED_FORMAT_VERSION
        cfg[MANIFEST_KEY] = manifest
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=False) + "\n")
    return path


def read_meta(path: str | os.PathLike) -> ModelDirMeta:
    """Read and check ``config.json`` of a model directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"'{path}' has no config.json: not a jaxquant model directory")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"'{cfg_file}' is not valid JSON ({e})") from None
    if raw.get("format") != FORMAT:
        hint = ""
        if raw.get("_class_name") or (path / "diffusion_pytorch_model.safetensors").exists():
            hint = f"; it looks like a diffusers folder: convert it with `jaxquant convert --from diffusers {path} --out MODEL_DIR`"
        raise CheckpointError(f"'{cfg_file}' is not a jaxquant model config{hint}")
    version = raw.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        newer = isinstance(version, int) and version > max(READABLE_FORMAT_VERSIONS)
        raise CheckpointError(
            f"'{cfg_file}' has format_version {version!r}; this jaxquant reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
            + ("; the directory was written by a newer jaxquant: upgrade (pip install -U jaxquant)" if newer else ""))
    extra = {k: v for k, v in raw.items() if k not in ("format", "format_version", "architecture", "model", "schedule")}
    return ModelDirMeta(raw["architecture"], raw["model"], raw.get("schedule", {}), extra)


def load_model_dir(name_or_path: str | os.PathLike) -> tuple[ModelDirMeta, dict]:
    """Read a model directory (or shipped model name): ``(meta, params as numpy tree)``.

    Quantized weights come back as their containers (``UniformWeight``, …), rebuilt from
    the ``"quantization"`` manifest; arrays are checked against the recorded checksums.
    ``meta.extra`` does not keep the manifest or the checksums (they describe the file).

    Raises:
      CheckpointError: missing/unreadable/corrupted files, a quantizer type or version
        this jaxquant cannot read, or params/ not matching config.json.
    """
    import orbax.checkpoint as ocp

    from jaxquant.quant.serialize import MANIFEST_KEY, from_storable

    path = resolve_model_path(name_or_path)
    meta = read_meta(path)
    if not (path / "params").is_dir():
        raise CheckpointError(f"'{path}' has no params/ folder: the model directory is incomplete")
    try:
        params = ocp.PyTreeCheckpointer().restore(str(path / "params"))
    except Exception as e:  # orbax raises many types for damaged files
        detail = str(e).split(" [tensorstore_spec=")[0]  # drop the long store spec tensorstore appends
        detail = detail if len(detail) <= 400 else detail[:400] + " …"
        raise CheckpointError(f"cannot read the parameters in '{path / 'params'}' (truncated or damaged files?): "
                              f"{type(e).__name__}: {detail}") from None
    manifest = meta.extra.pop(MANIFEST_KEY, None)
    checksums = meta.extra.pop(CHECKSUMS_KEY, None)
    if checksums is not None:
        _verify_checksums(path / "params", params, checksums)
    return meta, from_storable(params, manifest)


def params_digest(params: Any) -> str:
    """A 128-bit BLAKE2 hex digest of a parameter tree: every leaf's path, dtype, shape and
    bytes. Progress stores (AQ layers, resumable sampling) record it to refuse resuming
    with other parameters."""
    import hashlib

    import jax

    h = hashlib.blake2b(digest_size=16)
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def array_checksums(tree: dict) -> dict[str, int]:
    """``{dotted path: CRC-32}`` of every array of a nested dict (dtype and shape included)."""
    import zlib

    out = {}
    for name, a in flatten_params(tree).items():
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        head = zlib.crc32(f"{a.dtype.str}{a.shape}".encode())
        out[name] = zlib.crc32(a.reshape(-1).view(np.uint8), head)
    return out


def _verify_checksums(where: Path, params: dict, checksums: Any) -> None:
    recorded = checksums.get("arrays") if isinstance(checksums, dict) else None
    if not isinstance(recorded, dict) or checksums.get("algorithm") != "crc32":
        raise CheckpointError(f"the checksums in config.json next to '{where}' are malformed; config.json is damaged")
    actual = array_checksums(params)
    missing = sorted(set(recorded) - set(actual))
    if missing:
        raise CheckpointError(f"array(s) {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''} recorded in "
                              f"config.json are missing from '{where}': the model directory is incomplete")
    unexpected = sorted(set(actual) - set(recorded))
    if unexpected:
        raise CheckpointError(f"'{where}' holds array(s) {', '.join(unexpected[:10])} not recorded in config.json: "
                              "params/ and config.json do not belong together")
    bad = [k for k in actual if actual[k] != recorded[k]]
    if bad:
        raise CheckpointError(f"array(s) {', '.join(bad[:10])}{' …' if len(bad) > 10 else ''} in '{where}' do not "
                              "match their checksums in config.json: the files are corrupted; re-export or "
                              "re-download the model directory")


def params_disk_bytes(name_or_path: str | os.PathLike) -> int:
    """Bytes on disk of all files under a model directory's ``params/``."""
    params = resolve_model_path(name_or_path) / "params"
    return sum(f.stat().st_size for f in params.rglob("*") if f.is_file())


def _to_numpy_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _to_numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree)


def flatten_params(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested param dict to ``{"dotted.module.path.leaf": array}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten_params(v, name))
        else:
            out[name] = v
    return out
