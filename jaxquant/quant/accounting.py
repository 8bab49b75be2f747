"""Exact storage accounting of a (possibly quantized) parameter tree.

Every array that would be written to disk is counted at its stored dtype: codes,
scales, zero points, codebooks, and the float tensors left untouched. The "bits per
weight" of a quantized layer is its total storage (codes + scales + zero points + …)
divided by the number of weights it replaces; the model-level figure divides the whole
tree's storage by the whole tree's number of parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxquant.quant import serialize


@dataclasses.dataclass
class LayerStorage:
    """Storage of one leaf of the parameter tree (a float tensor or a quantized weight)."""

    name: str
    kind: str                 # "float32", "float16", … or the container class name
    num_weights: int          # parameters represented
    bits: int                 # bits stored (all arrays of the leaf)
    detail: dict              # bits per component, e.g. {"codes": …, "scale": …}
    config: str = ""          # e.g. "uniform 4b asym g=K"

    @property
    def bits_per_weight(self) -> float:
        return self.bits / max(self.num_weights, 1)


@dataclasses.dataclass
class StorageReport:
    """Exact storage of a parameter tree, one :class:`LayerStorage` per layer; totals in bits, bytes and weights."""

    layers: list[LayerStorage]

    @property
    def total_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return -(-self.total_bits // 8)

    @property
    def num_weights(self) -> int:
        return sum(layer.num_weights for layer in self.layers)

    @property
    def quantized(self) -> list[LayerStorage]:
        """Quantized weights (containers that replace a weight; not activation quantizers)."""
        return [layer for layer in self.layers if layer.kind in _CONTAINERS and layer.num_weights > 0]

    @property
    def bits_per_weight(self) -> float:
        """All storage over all parameters (untouched float tensors included)."""
        return self.total_bits / max(self.num_weights, 1)

    @property
    def bits_per_quantized_weight(self) -> float:
        """Storage of the quantized layers over the weights they replace."""
        q = self.quantized
        return sum(layer.bits for layer in q) / max(sum(layer.num_weights for layer in q), 1)

    def table(self, only_quantized: bool = False) -> str:
        rows = [layer for layer in self.layers if not only_quantized or layer.kind in _CONTAINERS]
        w = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{w}}  {'storage':<28} {'weights':>10} {'bytes':>11} {'bits/w':>7}"]
        for r in rows:
            lines.append(f"{r.name:<{w}}  {(r.config or r.kind):<28} {r.num_weights:>10d} "
                         f"{-(-r.bits // 8):>11d} {r.bits_per_weight:>7.3f}")
        lines.append(f"{'total':<{w}}  {'':<28} {self.num_weights:>10d} {self.total_bytes:>11d} "
                     f"{self.bits_per_weight:>7.3f}")
        if self.quantized:
            lines.append(f"quantized layers: {len(self.quantized)}, "
                         f"{self.bits_per_quantized_weight:.3f} bits per quantized weight")
        return "\n".join(lines)


# Container classes (registered with the dispatch) and how to describe them.
_CONTAINERS: dict[str, Any] = {}


def _array_bits(a: Any) -> int:
    a = np.asarray(a) if not hasattr(a, "dtype") else a
    return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize * 8


def leaf_storage(name: str, leaf: Any) -> LayerStorage:
    """Storage of one parameter-tree leaf."""
    if serialize.is_container(leaf):
        parts = {}
        for field in dataclasses.fields(leaf):
            v = getattr(leaf, field.name)
            if field.metadata.get("pytree_node", True) and v is not None:
                parts[field.name] = _array_bits(v)
        kind = type(leaf).__name__
        _CONTAINERS[kind] = type(leaf)
        describe = getattr(leaf, "describe", None)
        return LayerStorage(name, kind, int(leaf.num_weights), sum(parts.values()), parts,
                            describe() if describe else kind)
    return LayerStorage(name, str(np.dtype(leaf.dtype)), int(np.prod(np.shape(leaf))), _array_bits(leaf), {})


def storage_report(params: dict) -> StorageReport:
    """Per-leaf storage of a parameter tree, in tree order, named by dotted path."""
    leaves = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=serialize.is_container)[0]
    out = []
    for path, leaf in leaves:
        name = ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        out.append(leaf_storage(name, leaf))
    return StorageReport(out)
