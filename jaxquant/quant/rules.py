"""Which layer gets which quantizer: ordered (path-regex → config) rules.

A layer is named by its dotted path in the parameter tree (the source checkpoint's
module name, e.g. ``down_blocks.1.attentions.0.to_q``). Rules are tried in order; the
first whose regex matches the whole name decides. A rule with config ``None`` keeps
the layer in full precision. Only ``kernel`` leaves (dense and conv weights) are
candidates; biases, norms and embeddings stay float.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax

from jaxquant.errors import ConfigError

#: First and last layers of the supported networks; kept float by default, as the seeds do.
FIRST_LAST_LAYERS = r"conv_in|conv_out|input_blocks\.0\.0|out\.2|unet\.(conv_in|conv_out|input_blocks\.0\.0|out\.2)"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One quantization rule: layers whose whole name matches ``pattern`` get ``config``."""

    pattern: str
    config: Any  # a quantizer config, or None for full precision

    def matches(self, name: str) -> bool:
        return re.fullmatch(self.pattern, name) is not None


#: Parts of a latent-diffusion model that are not the denoiser: the first-stage
#: autoencoder and the conditioning model stay float, as in the seeds.
NOT_DENOISER = r"(first_stage|cond_stage)\..*"


def default_rules(config: Any) -> list[Rule]:
    """First/last layer (and an LDM's autoencoder) float, everything else ``config``."""
    return [Rule(FIRST_LAST_LAYERS, None), Rule(NOT_DENOISER, None), Rule(r".*", config)]


def layer_kernels(params: dict) -> dict[str, Any]:
    """``{layer name: kernel}`` for every dense/conv weight, in tree order."""
    out = {}

    def visit(tree: dict, prefix: str) -> None:
        for k, v in tree.items():
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                visit(v, name)
            elif k == "kernel":
                out[prefix] = v

    visit(params, "")
    return out


def resolve(names: Iterable[str], rules: Sequence[Rule]) -> dict[str, Any]:
    """Map each layer name to the config of the first matching rule (``None`` = float)."""
    plan = {}
    for name in names:
        plan[name] = next((r.config for r in rules if r.matches(name)), None)
    return plan


def apply_plan(params: dict, plan: dict[str, Any], quantize: Callable[[str, Any, Any], Any],
               progress: Callable[[Iterable], Iterable] | None = None) -> dict:
    """Return a copy of ``params`` with ``kernel`` of each planned layer replaced by
    ``quantize(name, kernel, config)``."""
    todo = [(n, c) for n, c in plan.items() if c is not None]
    it = progress(todo) if progress else todo
    new = _copy_dicts(params)
    for name, cfg in it:
        node = new
        for p in _split_name(new, name):
            node = node[p]
        node["kernel"] = quantize(name, node["kernel"], cfg)
    return new


def _copy_dicts(tree: Any) -> Any:
    """Copy the nested dicts (not the arrays) so the input tree is left unchanged."""
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _split_name(tree: dict, name: str) -> list[str]:
    """Split a dotted layer name into the nested dict keys (keys may contain dots)."""
    parts, node, rest = [], tree, name
    while rest:
        match = max((k for k in node if rest == k or rest.startswith(k + ".")), key=len, default=None)
        if match is None:
            raise ConfigError(f"layer {name!r} not found in the parameter tree")
        parts.append(match)
        node = node[match]
        rest = rest[len(match) + 1:]
    return parts


def load_rules(path: str | Path, make_config: Callable[[dict], Any]) -> list[Rule]:
    """Read rules from YAML: a list of ``{pattern: REGEX, config: {...} | null}``.

    ``make_config`` turns each config mapping into a quantizer config (and raises
    :class:`ConfigError` for bad fields).
    """
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read rules file '{path}': {e}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"rules file '{path}' must hold a list of {{pattern, config}} entries")
    rules = []
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or "pattern" not in entry:
            raise ConfigError(f"rules file '{path}', entry {i}: expected a mapping with 'pattern' and 'config'")
        unknown = set(entry) - {"pattern", "config"}
        if unknown:
            raise ConfigError(f"rules file '{path}', entry {i}: unknown key(s) {sorted(unknown)}")
        try:
            re.compile(entry["pattern"])
        except re.error as e:
            raise ConfigError(f"rules file '{path}', entry {i}: bad regex {entry['pattern']!r}: {e}") from None
        cfg = entry.get("config")
        rules.append(Rule(entry["pattern"], None if cfg is None else make_config(cfg)))
    return rules
