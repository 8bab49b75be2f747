"""Storing quantized weight containers in a model directory, by name and version.

A quantized parameter tree holds pytree containers (:class:`~jaxquant.quant.uniform.UniformWeight`,
…) where the float kernels were. On disk the arrays stay in the orbax array store and
the rest goes to ``config.json``:

* :func:`to_storable` turns every container leaf into a plain dict of its array fields
  (``None`` fields omitted), so the tree is nested dicts of arrays again, and returns a
  manifest describing what each such dict was::

      {"written_by": "jaxquant 0.1.0",
       "layers": {"down_blocks.1.resnets.0.conv1.kernel":
                    {"type": "uniform", "version": 1, "arrays": ["codes", "scale", "zero"],
                     "static": {"bits": 4, "shape": [3, 3, 32, 64], "group_size": 288,
                                "packed": true}}}}

* :func:`from_storable` rebuilds the containers from the plain tree and the manifest.

Container classes are registered once by a short, stable type name and a format
version (:func:`register_container`). Bump the version whenever the meaning or layout of
the stored fields changes, and pass ``upgrade`` to keep reading the old versions. A file
naming a type or a version this jaxquant does not know raises
:class:`~jaxquant.errors.CheckpointError` saying so, never a wrong model.

Registered here: ``"biascorr"`` v1 (:class:`~jaxquant.quant.bias_correction.BiasCorrection`),
``"uniform"`` v1 (:class:`~jaxquant.quant.uniform.UniformWeight`) and
``"act"`` v2 (:class:`~jaxquant.quant.activation.ActQuant`, which adds parameters such
as ``<layer>.input_quant`` rather than replacing one; v2 allows a tuple of per-group
``bits``, and quantizers with one bit width are still written as v1 so that older
jaxquant versions keep reading them). A new container type registers
itself in its own module and adds that module to :data:`CONTAINER_MODULES`, so loading
a file that names it imports it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from jaxquant.errors import CheckpointError

#: Key of the manifest in a model directory's ``config.json``.
MANIFEST_KEY = "quantization"

#: Modules that register container types when imported; looked up lazily when a file
#: names a type that is not registered yet (so loading does not import every quantizer).
CONTAINER_MODULES: dict[str, str] = {}

Upgrade = Callable[[int, dict, dict], tuple[dict, dict]]
Validate = Callable[[Any], None]


@dataclasses.dataclass(frozen=True)
class ContainerType:
    """A registered container class.

    Attributes:
      cls: the ``flax.struct.dataclass`` class; array fields are its pytree fields,
        static fields its ``pytree_node=False`` fields (JSON-able: ints, floats, bools,
        strings, ``None`` and tuples of those).
      name: stable type name written to files (``"uniform"``).
      version: the version written; files of versions ``1..version`` are readable.
      upgrade: ``fn(old_version, arrays, static) -> (arrays, static)`` turning the stored
        fields of an older version into the current one (``None``: only ``version`` reads).
      validate: ``fn(container)`` raising ``ValueError`` when a rebuilt container is
        inconsistent (wrong dtype or shape of a stored array).
      replaces_weight: ``True`` when the container stands in for a float parameter of the
        architecture (a quantized kernel, compared by its ``shape`` field); ``False`` for
        containers that add parameters of their own (an activation quantizer).
      version_of: ``fn(container) -> int``, the version written for one instance (the
        oldest version that can represent it, so older readers keep reading what they
        can); ``None``: always ``version``.
    """

    cls: type
    name: str
    version: int
    upgrade: Upgrade | None = None
    validate: Validate | None = None
    replaces_weight: bool = True
    version_of: Callable[[Any], int] | None = None

    @property
    def array_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.cls) if f.metadata.get("pytree_node", True))

    @property
    def static_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.cls) if not f.metadata.get("pytree_node", True))


_BY_NAME: dict[str, ContainerType] = {}
_BY_CLASS: dict[type, ContainerType] = {}


def register_container(
    cls: type,
    name: str,
    version: int,
    *,
    upgrade: Upgrade | None = None,
    validate: Validate | None = None,
    replaces_weight: bool = True,
    version_of: Callable[[Any], int] | None = None,
) -> ContainerType:
    """Register a weight/quantizer container class for saving and loading.

    Args:
      cls: a ``flax.struct.dataclass`` whose pytree fields are arrays (or ``None``).
      name: the type name stored in ``config.json``; never reuse a name for another format.
      version: current format version (≥ 1) of this type.
      upgrade: reads older versions, see :class:`ContainerType`.
      validate: checks a rebuilt container, see :class:`ContainerType`.
      replaces_weight: see :class:`ContainerType`; such a class needs a ``shape`` field.
      version_of: see :class:`ContainerType`.

    Returns:
      The registry entry. Registering the same class under the same name again replaces
      the entry (module reloads); a name or class already taken by another raises.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a flax.struct.dataclass to be stored")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"container version must be an int ≥ 1, got {version!r}")
    other = _BY_NAME.get(name)
    if other is not None and other.cls is not cls:
        raise ValueError(f"container type name {name!r} is already used by {other.cls.__qualname__}")
    other = _BY_CLASS.get(cls)
    if other is not None and other.name != name:
        raise ValueError(f"{cls.__qualname__} is already registered as {other.name!r}")
    entry = ContainerType(cls, name, version, upgrade, validate, replaces_weight, version_of)
    if replaces_weight and "shape" not in entry.static_fields:
        raise ValueError(f"{cls.__qualname__} replaces a weight, so it needs a static 'shape' field "
                         "(the float weight's shape, checked against the architecture)")
    _BY_NAME[name] = entry
    _BY_CLASS[cls] = entry
    return entry


def registered_types() -> dict[str, ContainerType]:
    """``{type name: entry}`` of every registered container."""
    return dict(_BY_NAME)


def container_type(x: Any) -> ContainerType | None:
    """The registry entry of ``x``'s class, or ``None`` when ``x`` is not a registered container."""
    return _BY_CLASS.get(type(x))


def is_container(x: Any) -> bool:
    """Whether ``x`` is an instance of a registered container class."""
    return type(x) in _BY_CLASS


def logical_shape(leaf: Any) -> tuple[int, ...]:
    """Shape of the float parameter a leaf represents (a container's ``shape`` field,
    else the array's shape)."""
    entry = container_type(leaf)
    if entry is not None and entry.replaces_weight:
        return tuple(int(d) for d in leaf.shape)
    return tuple(np.shape(leaf))


def represented_size(leaf: Any) -> int:
    """Number of float parameters a leaf stands for (0 for containers that add parameters)."""
    entry = container_type(leaf)
    if entry is not None and not entry.replaces_weight:
        return 0
    return int(np.prod(logical_shape(leaf)))


def _jaxquant_version() -> str:
    from jaxquant import __version__

    return __version__


# --------------------------------------------------------------------------- saving


def _is_array(x: Any) -> bool:
    if isinstance(x, (np.ndarray, np.generic, int, float, bool)):
        return True
    return hasattr(x, "dtype") and hasattr(x, "shape") and not dataclasses.is_dataclass(x)  # jax.Array & co.


def _to_json(value: Any, where: str) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)):
        return [_to_json(v, where) for v in value]
    raise CheckpointError(f"{where} is a {type(value).__name__}; static fields of stored containers must be "
                          "ints, floats, bools, strings, None or tuples of those")


def _from_json(value: Any) -> Any:
    # Static fields live in the treedef, so they must be hashable: lists come back as tuples.
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def to_storable(params: Any) -> tuple[dict, dict]:
    """Split a (possibly quantized) parameter tree into arrays and a JSON manifest.

    Args:
      params: nested dicts whose leaves are arrays or registered containers.

    Returns:
      ``(plain, manifest)``: ``plain`` is the same nested dicts with each container
      replaced by ``{field: numpy array}`` of its non-``None`` array fields and every
      other leaf as a numpy array (bit-exact); ``manifest`` is
      ``{"written_by": "jaxquant X", "layers": {dotted path: entry}}`` with one entry
      ``{"type", "version", "arrays", "static"}`` per container (``layers`` is empty for
      a float tree).

    Raises:
      CheckpointError: a leaf is neither an array nor a registered container, or a
        static field cannot be written as JSON.
    """
    layers: dict[str, dict] = {}

    def visit(node: Any, path: tuple[str, ...]) -> Any:
        name = ".".join(path)
        if isinstance(node, Mapping):  # dict, or flax's FrozenDict
            return {k: visit(v, path + (str(k),)) for k, v in node.items()}
        entry = container_type(node)
        if entry is not None:
            if name in layers:
                raise CheckpointError(f"two parameters share the dotted name {name!r}; cannot store the tree")
            arrays = {f: np.asarray(getattr(node, f)) for f in entry.array_fields if getattr(node, f) is not None}
            static = {f: _to_json(getattr(node, f), f"static field {f!r} of {name}") for f in entry.static_fields}
            version = entry.version_of(node) if entry.version_of is not None else entry.version
            layers[name] = {"type": entry.name, "version": version, "arrays": sorted(arrays), "static": static}
            return arrays
        if not _is_array(node):
            from jaxquant.quant import dispatch

            what = "a quantized weight type" if dispatch.is_quantized_weight(node) else "not an array"
            raise CheckpointError(
                f"parameter {name or '<root>'} is a {type(node).__qualname__} ({what}) that is not registered for "
                f"saving; register it with jaxquant.quant.serialize.register_container({type(node).__name__}, "
                "name, version)")
        return np.asarray(node)

    plain = visit(params, ())
    return plain, {"written_by": f"jaxquant {_jaxquant_version()}", "layers": layers}


# --------------------------------------------------------------------------- loading


def _lookup(type_name: str) -> ContainerType | None:
    if type_name not in _BY_NAME and type_name in CONTAINER_MODULES:
        importlib.import_module(CONTAINER_MODULES[type_name])
    return _BY_NAME.get(type_name)


def _rebuild(name: str, stored: Any, spec: Any, written_by: str) -> Any:
    """One container from its stored dict of arrays and its manifest entry."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise CheckpointError(f"the quantization manifest entry of {name} is malformed ({spec!r}); "
                              "config.json is damaged")
    type_name, version = spec["type"], spec.get("version")
    entry = _lookup(type_name)
    here = f"jaxquant {_jaxquant_version()}"
    if entry is None:
        known = ", ".join(sorted(_BY_NAME)) or "none"
        raise CheckpointError(
            f"layer {name} is stored as quantizer type {type_name!r} version {version}, which {here} does not "
            f"know (known types: {known}); the file was written by {written_by}: load it with that jaxquant "
            "version or newer (pip install -U jaxquant)")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"layer {name}: quantizer type {type_name!r} has an invalid version {version!r} "
                              "in config.json; the file is damaged")
    if version > entry.version:
        raise CheckpointError(
            f"layer {name} is stored as {type_name!r} version {version}, newer than the version {entry.version} "
            f"that {here} reads; the file was written by {written_by}: upgrade jaxquant to that version or "
            "newer (pip install -U jaxquant)")
    if version < entry.version and entry.upgrade is None:
        raise CheckpointError(f"layer {name} is stored as {type_name!r} version {version}; {here} reads only "
                              f"version {entry.version} of this type. Re-quantize the model, or load and "
                              f"re-save it with {written_by}")
    if not isinstance(stored, dict):
        raise CheckpointError(f"layer {name} is listed in config.json as a {type_name!r} quantized weight, but "
                              f"params/ holds a plain array there; params/ and config.json do not belong together")
    listed = spec.get("arrays")
    listed = sorted(stored) if listed is None else list(listed)
    missing = [a for a in listed if a not in stored]
    if missing:
        raise CheckpointError(f"layer {name} ({type_name!r}): array(s) {', '.join(missing)} missing from params/; "
                              "the model directory is incomplete or damaged")
    unexpected = sorted(set(stored) - set(listed))
    if unexpected:
        raise CheckpointError(f"layer {name} ({type_name!r}): unexpected array(s) {', '.join(unexpected)} in "
                              "params/; params/ and config.json do not belong together")
    arrays = {a: stored[a] for a in listed}
    static = {k: _from_json(v) for k, v in (spec.get("static") or {}).items()}
    if version < entry.version:
        arrays, static = entry.upgrade(version, arrays, static)
    fields = set(entry.array_fields) | set(entry.static_fields)
    bad = sorted((set(arrays) | set(static)) - fields)
    if bad:
        raise CheckpointError(f"layer {name}: {type_name!r} version {version} has no field(s) {', '.join(bad)}; "
                              "config.json is damaged")
    kwargs = {f: arrays.get(f) for f in entry.array_fields}
    kwargs.update(static)
    try:
        obj = entry.cls(**kwargs)
        if entry.validate is not None:
            entry.validate(obj)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"layer {name}: the stored {type_name!r} weight is inconsistent ({e}); "
                              "the model directory is damaged") from None
    return obj


def from_storable(plain: dict, manifest: dict | None) -> dict:
    """Inverse of :func:`to_storable`: rebuild the containers listed in ``manifest``.

    Args:
      plain: nested dicts of arrays as restored from the array store.
      manifest: the manifest written by :func:`to_storable` (``None`` or no layers: a
        float tree, returned unchanged).

    Raises:
      CheckpointError: a type or version this jaxquant cannot read, a listed layer or
        array missing from ``plain``, or an inconsistent stored container.
    """
    if not manifest:
        return plain
    if not isinstance(manifest, dict) or not isinstance(manifest.get("layers", {}), dict):
        raise CheckpointError(f"the {MANIFEST_KEY!r} entry of config.json is malformed; config.json is damaged")
    layers = manifest.get("layers") or {}
    written_by = str(manifest.get("written_by", "an unknown jaxquant version"))
    found: set[str] = set()

    def visit(node: Any, path: tuple[str, ...]) -> Any:
        name = ".".join(path)
        if name in layers:
            found.add(name)
            return _rebuild(name, node, layers[name], written_by)
        if isinstance(node, dict):
            return {k: visit(v, path + (str(k),)) for k, v in node.items()}
        return node

    out = visit(plain, ())
    missing = [n for n in layers if n not in found]
    if missing:
        raise CheckpointError(f"quantized layer(s) {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''} "
                              "listed in config.json are missing from params/; the model directory is incomplete")
    return out


# --------------------------------------------------------------------------- built-in types


def _validate_uniform(w: Any) -> None:
    from jaxquant.quant import packing
    from jaxquant.quant.uniform import SCALE_DTYPE

    out, k = int(w.shape[-1]), int(np.prod(w.shape[:-1]))
    if not 1 <= w.bits <= 16 or w.group_size < 1 or k % w.group_size:
        raise ValueError(f"bits={w.bits}, group_size={w.group_size} invalid for shape {tuple(w.shape)}")
    groups = (out, k // w.group_size)
    codes = ((out, packing.words_per_row(k, w.bits)), np.uint32) if w.packed else ((out, k), np.uint8)
    want = {"codes": codes, "scale": (groups, np.dtype(SCALE_DTYPE))}
    if w.zero is not None:
        want["zero"] = (groups, np.uint8)
    for f, (shape, dtype) in want.items():
        a = getattr(w, f)
        if a is None or tuple(np.shape(a)) != shape or np.dtype(a.dtype) != np.dtype(dtype):
            found = "missing" if a is None else f"{np.dtype(a.dtype)} {tuple(np.shape(a))}"
            raise ValueError(f"{f} should be {np.dtype(dtype)} {shape}, found {found}")


def _validate_act(a: Any) -> None:
    shape = tuple(np.shape(a.scale))
    if len(shape) != 2 or tuple(np.shape(a.zero)) != shape or shape[1] != (2 if a.split else 1):
        raise ValueError(f"scale {shape} and zero {tuple(np.shape(a.zero))} should both be "
                         f"[groups, {2 if a.split else 1}]")
    bits = a.bits if isinstance(a.bits, tuple) else (a.bits,)
    if isinstance(a.bits, tuple) and len(bits) != shape[0]:
        raise ValueError(f"{len(bits)} per-group bit widths for {shape[0]} timestep groups")
    if not all(isinstance(b, int) and 1 <= b <= 16 for b in bits):
        raise ValueError(f"bits {a.bits!r} should be 1..16")


def _act_version(a: Any) -> int:
    """v1 holds one bit width; per-group bit widths (a tuple) need v2."""
    return 2 if isinstance(a.bits, tuple) else 1


def _upgrade_act(version: int, arrays: dict, static: dict) -> tuple[dict, dict]:
    return arrays, static  # v1 is v2 with a single bit width


def _register_builtin() -> None:
    from jaxquant.quant.activation import ActQuant
    from jaxquant.quant.uniform import UniformWeight

    register_container(UniformWeight, "uniform", 1, validate=_validate_uniform)
    from jaxquant.quant.additive import AQWeight, validate_aq
    register_container(AQWeight, "aq", 1, validate=validate_aq)
    from jaxquant.quant.smooth import ChannelSmooth
    register_container(ChannelSmooth, "smooth", 1, replaces_weight=False)
    from jaxquant.quant.bias_correction import BiasCorrection, validate_bias_correction
    register_container(BiasCorrection, "biascorr", 1, replaces_weight=False, validate=validate_bias_correction)
    if ActQuant not in _BY_CLASS:  # unless its module registered it itself
        # Activation quantizers add parameters (``<layer>.input_quant``, ``<attn>.q_quant``…).
        register_container(ActQuant, "act", 2, upgrade=_upgrade_act, validate=_validate_act,
                           replaces_weight=False, version_of=_act_version)


_register_builtin()
