"""How jaxquant compiles: :func:`jit`, ``jax.jit`` plus the XLA options chosen here.

One place decides the compiler options of every jitted function in the package.

CPU: jaxlib 0.10 routes convolutions, matmuls and some elementwise work on the CPU
backend through YNNPACK fusions by default. For the diffusion networks of this package
(dense 3×3 and 1×1 convolutions of 32–512 channels at 4–32 px) XLA's own Eigen-based
convolutions are faster on the machines we measured (DDIM-20 sampling of the
ddpm-cifar10-32 config: 1.10× PyTorch instead of 0.74×, ``benchmarks/sampling_speed.py``,
``BENCHMARKS.md``), so their functions compile with ``xla_cpu_experimental_ynn_fusion_type``
empty (no YNNPACK fusions): the option set ``"dense-conv"``, the default of :func:`jit`.
The feature networks and the metrics use it too: EfficientNet-Lite0 writes its depthwise
convolutions as fused shifted multiply-adds
(:func:`jaxquant.eval.efficientnet.depthwise_conv2d`; XLA's grouped convolutions were
6-13x slower with or without YNNPACK), after which it runs 1.6x faster without YNNPACK,
the FID Inception-v3 1.9x, and the 10000 x 10000 x 1280 distance blocks of precision /
recall 4.5x (4.0 s vs 18-22 s; numpy with OpenBLAS: 5.0 s). The option set
``"xla-default"`` (XLA's own choices) stays for comparisons
(``benchmarks/sampling_speed.py``). Results agree with the default path to float32
rounding (about 1e-6 relative).

The option is used only where it exists: the first compilation probes it once, and a
jaxlib that does not know it (older or newer releases) or a non-CPU default backend gets
plain ``jax.jit``. Set ``JAXQUANT_XLA_DEFAULTS=1`` to always compile with XLA's defaults.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax

#: Compiler options used on the CPU backend for dense-convolution networks (see above).
CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}

#: Named option sets :func:`jit` accepts.
OPTION_SETS = ("dense-conv", "xla-default")


@functools.lru_cache(maxsize=None)
def compiler_options(options: str = "dense-conv") -> tuple[tuple[str, str], ...]:
    """The options :func:`jit` adds under option set ``options`` on the current default
    backend (empty if none apply)."""
    if options not in OPTION_SETS:
        raise ValueError(f"unknown XLA option set {options!r} (known: {OPTION_SETS})")
    if options == "xla-default" or os.environ.get("JAXQUANT_XLA_DEFAULTS", "") not in ("", "0"):
        return ()
    if jax.default_backend() != "cpu":
        return ()
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(CPU_OPTIONS))(jax.numpy.zeros((), jax.numpy.float32))
    except Exception:  # this jaxlib does not know the option: keep XLA's defaults
        return ()
    return tuple(CPU_OPTIONS.items())


def _tracing() -> bool:
    """Whether we are inside a trace (a jit, grad, vmap, … of an enclosing function)."""
    try:
        from jax._src import core
    except ImportError:  # pragma: no cover - layout of a future jax
        return True
    check = getattr(core, "trace_state_clean", None)
    return True if check is None else not check()


class _Jitted:
    """``jax.jit(fun, **kwargs)`` built at first use, so that importing a module with
    decorated functions does not initialise a JAX backend.

    Compiler options belong to top-level compilations only: called inside an enclosing
    trace, the plain ``jax.jit`` of the function is used (the enclosing compilation's
    options apply to it).
    """

    def __init__(self, fun: Callable, options: str, kwargs: dict[str, Any]):
        self._fun, self._options, self._kwargs, self._jitted, self._plain = fun, options, kwargs, None, None
        functools.update_wrapper(self, fun)

    def _get(self) -> Any:
        if self._jitted is None:
            kwargs = dict(self._kwargs)
            opts = dict(compiler_options(self._options))
            if opts:
                kwargs["compiler_options"] = {**opts, **(kwargs.get("compiler_options") or {})}
            self._jitted = jax.jit(self._fun, **kwargs)
        return self._jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _tracing():
            if self._plain is None:
                self._plain = jax.jit(self._fun, **self._kwargs)
            return self._plain(*args, **kwargs)
        return self._get()(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._get().lower(*args, **kwargs)

    def with_xla_defaults(self) -> Any:
        """The same function under plain ``jax.jit`` (XLA's default options), for comparisons."""
        return jax.jit(self._fun, **self._kwargs)

    def __getattr__(self, name: str) -> Any:  # eval_shape, trace, clear_cache, …
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit(fun: Callable | None = None, /, *, options: str = "dense-conv", **kwargs: Any) -> Any:
    """``jax.jit`` with jaxquant's compiler options; usable as ``@jit`` or ``@jit(static_argnames=…)``.

    Args:
      fun: the function.
      options: the option set, ``"dense-conv"`` (diffusion networks, the default) or
        ``"xla-default"`` (XLA's own choices, for comparisons).
      **kwargs: the keyword arguments of :func:`jax.jit`; ``compiler_options`` given
        here override jaxquant's.
    """
    if options not in OPTION_SETS:
        raise ValueError(f"unknown XLA option set {options!r} (known: {OPTION_SETS})")
    if fun is None:
        return functools.partial(jit, options=options, **kwargs)
    return _Jitted(fun, options, kwargs)


#: Where Linux tells a process's memory mappings and their cap (module attributes, so tests can point elsewhere).
_MAPS_FILE, _MAP_LIMIT_FILE = "/proc/self/maps", "/proc/sys/vm/max_map_count"


def release_compiled_if_crowded(fraction: float = 0.5) -> bool:
    """Drop JAX's compiled executables when the process's memory mappings near the limit.

    Every XLA CPU executable keeps about five memory mappings of JIT'd code, and Linux caps a
    process at ``vm.max_map_count`` (65 530 by default). A long run that compiles for many
    shapes (AQ over hundreds of layers, several quantize-sample-evaluate configurations in
    one process) passes the cap, and LLVM then fails with "Cannot allocate memory" and the
    process dies. Called between units of such work, this clears JAX's caches
    (``jax.clear_caches``; later calls recompile) once the mappings pass ``fraction`` of the
    cap. Returns whether it cleared; a no-op where ``/proc`` does not tell.
    """
    try:
        with open(_MAP_LIMIT_FILE) as f:
            limit = int(f.read().strip())
        with open(_MAPS_FILE, "rb") as f:
            used = sum(1 for _ in f)
    except (OSError, ValueError):
        return False
    if used <= fraction * limit:
        return False
    jax.clear_caches()
    return True
