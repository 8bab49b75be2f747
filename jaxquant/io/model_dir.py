"""The jaxquant model directory.

```
MODEL_DIR/
  config.json   {"format": "jaxquant-model", "format_version": 1,
                 "architecture": "unet2d", "model": {...}, "schedule": {...}, ...}
  params/       orbax PyTree checkpoint of the parameter tree
```

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
    """Write ``meta`` and ``params`` to ``path`` (replacing an existing model directory)."""
    import orbax.checkpoint as ocp

    path = Path(path).expanduser().resolve()
    if path.exists():
        if not overwrite:
            raise CheckpointError(f"'{path}' exists; choose another --out or remove it")
        if path.is_dir() and (path / "params").exists():
            shutil.rmtree(path / "params")
    path.mkdir(parents=True, exist_ok=True)
    params_np = _to_numpy_tree(params)
    ocp.PyTreeCheckpointer().save(str(path / "params"), params_np)
    (path / "config.json").write_text(json.dumps(meta.to_json(), indent=2, sort_keys=False) + "\n")
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
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"'{cfg_file}' has format_version {raw.get('format_version')!r}; this jaxquant reads version {FORMAT_VERSION}")
    extra = {k: v for k, v in raw.items() if k not in ("format", "format_version", "architecture", "model", "schedule")}
    return ModelDirMeta(raw["architecture"], raw["model"], raw.get("schedule", {}), extra)


def load_model_dir(name_or_path: str | os.PathLike) -> tuple[ModelDirMeta, dict]:
    """Read a model directory (or shipped model name): ``(meta, params as numpy tree)``."""
    import orbax.checkpoint as ocp

    path = resolve_model_path(name_or_path)
    meta = read_meta(path)
    if not (path / "params").is_dir():
        raise CheckpointError(f"'{path}' has no params/ folder: the model directory is incomplete")
    try:
        params = ocp.PyTreeCheckpointer().restore(str(path / "params"))
    except Exception as e:  # orbax raises many types for damaged files
        raise CheckpointError(f"cannot read the parameters in '{path / 'params'}': {type(e).__name__}: {e}") from None
    return meta, params


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
