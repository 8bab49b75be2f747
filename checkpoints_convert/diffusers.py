"""Convert a diffusers ``UNet2DModel`` checkpoint to a jaxquant model directory.

Accepted layouts::

    UNET_DIR/                          PIPELINE_DIR/
      config.json                        model_index.json
      diffusion_pytorch_model.safetensors  unet/config.json, unet/diffusion_pytorch_model.*
        (or .bin)                        scheduler/scheduler_config.json

The schedule comes from ``scheduler_config.json`` when one is found (in
``PIPELINE_DIR/scheduler/``, next to the UNet's ``config.json``, or in ``../scheduler/``
when the UNet folder is a pipeline's ``unet/``), else the DDPM default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from checkpoints_convert.common import load_torch_state_dict, rename_state_dict, state_dict_to_params
from jaxquant.errors import CheckpointError
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir

#: Weight file names looked for, in order of preference.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)

#: The DDPM training schedule of Ho et al. (2020), used when no scheduler config exists.
DEFAULT_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "variance_type": "fixed_small",
}

# Old diffusers AttentionBlock names (google/ddpm-* checkpoints) → current Attention names.
_DEPRECATED_ATTN = re.compile(r"^(.*\battentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTN_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_deprecated_attention(name: str) -> str:
    """Map a deprecated attention tensor name to the current one (others unchanged).

    ``mid_block.attentions.0.query.weight`` → ``mid_block.attentions.0.to_q.weight``;
    likewise ``key``→``to_k``, ``value``→``to_v``, ``proj_attn``→``to_out.0``.
    """
    m = _DEPRECATED_ATTN.match(name)
    if not m:
        return name
    return f"{m.group(1)}.{_ATTN_RENAMES[m.group(2)]}.{m.group(3)}"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} '{path}' is not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} '{path}': {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' does not hold a JSON object")
    return data


def locate_unet(src: Path) -> tuple[Path, Path, Path | None]:
    """Find ``(unet_dir, weights_file, scheduler_config_or_None)`` in a diffusers folder.

    Raises:
      CheckpointError: the folder does not exist, has no ``config.json`` (neither in
        itself nor in ``unet/``), or no weight file (the message lists the names tried).
    """
    if not src.exists():
        raise CheckpointError(f"no diffusers folder at '{src}'")
    if not src.is_dir():
        raise CheckpointError(f"'{src}' is not a folder; pass the diffusers model or pipeline folder")
    if (src / "config.json").is_file():
        unet_dir = src
    elif (src / "unet" / "config.json").is_file():
        unet_dir = src / "unet"
    else:
        raise CheckpointError(
            f"'{src}' has no config.json (looked for '{src / 'config.json'}' and '{src / 'unet' / 'config.json'}'): "
            "pass a diffusers UNet folder or a pipeline folder with unet/")
    weights = next((unet_dir / n for n in WEIGHT_FILES if (unet_dir / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"'{unet_dir}' has no weights file (looked for {', '.join(WEIGHT_FILES)})")
    candidates = [src / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"]
    if unet_dir.name == "unet":
        candidates.append(unet_dir.parent / "scheduler" / "scheduler_config.json")
    scheduler = next((c for c in candidates if c.is_file()), None)
    return unet_dir, weights, scheduler


def read_schedule(scheduler_config: Path | None, unet_config: dict) -> dict:
    """The noise schedule to store: the scheduler config's keys (``_``-prefixed dropped) or the DDPM default.

    ``num_train_timesteps`` of the UNet config fills in when the scheduler config does
    not give one (and replaces the default's when there is no scheduler config).
    """
    unet_steps = unet_config.get("num_train_timesteps")
    if scheduler_config is not None:
        raw = _read_json(scheduler_config, "scheduler config")
        schedule = {k: v for k, v in raw.items() if not k.startswith("_")}
        if unet_steps is not None:
            schedule.setdefault("num_train_timesteps", unet_steps)
    else:
        schedule = dict(DEFAULT_SCHEDULE)
        if unet_steps is not None:
            schedule["num_train_timesteps"] = unet_steps
    return schedule


def expected_params(cfg: Any) -> dict:
    """Shapes/dtypes of the Flax parameter tree of the UNet described by ``cfg`` (no compute)."""
    import jax
    import jax.numpy as jnp

    from jaxquant.models.unet2d import UNet2DModel

    module = UNet2DModel(cfg)
    side = 2 ** (len(cfg.block_out_channels) - 1)  # parameter shapes do not depend on the image size
    x = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32) if cfg.is_class_conditional else None
    return jax.eval_shape(module.init, jax.random.key(0), x, t, y)["params"]


def convert_diffusers(src_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a diffusers ``UNet2DModel`` (folder or pipeline folder) to a jaxquant model directory.

    Args:
      src_dir: a UNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``
        or ``.bin``) or a pipeline folder with ``unet/`` (and ``scheduler/``).
      out_dir: the model directory to write (created; an existing one is replaced).

    Returns:
      The absolute path of the written model directory.

    Raises:
      CheckpointError: missing folder/config/weights, unreadable files, or weights that
        do not match the config (all missing/unexpected names, shape mismatches and
        non-finite tensors are listed).
      ConfigError: the UNet config has an unknown key or an unsupported value.
    """
    from jaxquant.models.unet2d import UNet2DConfig

    src = Path(src_dir).expanduser()
    unet_dir, weights, scheduler = locate_unet(src)
    out = Path(out_dir).expanduser().resolve()
    if out in (src.resolve(), unet_dir.resolve()):
        raise CheckpointError(f"--out '{out}' is the source folder; choose another output directory")

    raw_cfg = _read_json(unet_dir / "config.json", "UNet config")
    cfg = UNet2DConfig.from_dict(raw_cfg)

    state_dict = load_torch_state_dict(weights)
    state_dict = rename_state_dict(state_dict, rename_deprecated_attention, where=f"'{weights}'")
    params = state_dict_to_params(expected_params(cfg), state_dict, where=f"'{weights}'")

    schedule = read_schedule(scheduler, raw_cfg)
    source = {
        "format": "diffusers",
        "path": str(src.resolve()),
        "weights": str(weights.relative_to(src)),
        "scheduler_config": str(scheduler.resolve()) if scheduler is not None else None,
        "class_name": raw_cfg.get("_class_name", "UNet2DModel"),
        "diffusers_version": raw_cfg.get("_diffusers_version"),
    }
    meta = ModelDirMeta("unet2d", cfg.to_dict(), schedule, extra={"source": source})
    return save_model_dir(out, meta, params)
