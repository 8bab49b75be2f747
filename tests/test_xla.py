"""jaxquant.xla.jit: jax.jit with the package's compiler options."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxquant import xla


def _conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_jit_matches_plain_jit_and_xla_defaults():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 16, 8)) * 0.1, jnp.float32)
    f = xla.jit(_conv)
    ref = jax.jit(_conv)(x, w)
    np.testing.assert_allclose(np.asarray(f(x, w)), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(f.with_xla_defaults()(x, w)), np.asarray(ref), rtol=0, atol=0)
    # the options are those the module documents, or none on a jaxlib that lacks them
    assert dict(xla.compiler_options()) in ({}, xla.CPU_OPTIONS)
    assert xla.compiler_options("xla-default") == ()
    g = xla.jit(_conv, options="xla-default")
    np.testing.assert_allclose(np.asarray(g(x, w)), np.asarray(ref), rtol=0, atol=0)
    with pytest.raises(ValueError, match="option set"):
        xla.jit(_conv, options="fastest")


def test_decorator_forms_static_args_and_nesting():
    @xla.jit
    def double(x):
        return 2 * x

    @xla.jit(static_argnames="n")
    def power(x, n):
        return x ** n

    # nested inside jit, grad and vmap: compiler options only apply at the top level
    outer = jax.jit(lambda x: double(x) + power(x, n=3))
    x = jnp.arange(4.0)
    np.testing.assert_allclose(np.asarray(outer(x)), 2 * np.arange(4.0) + np.arange(4.0) ** 3)
    np.testing.assert_allclose(float(jax.grad(lambda v: power(v, n=2))(3.0)), 6.0)
    np.testing.assert_allclose(np.asarray(jax.vmap(double)(x)), 2 * np.arange(4.0))
    assert double.__name__ == "double"
    assert "stablehlo" in double.lower(x).as_text() or "func" in double.lower(x).as_text()


def test_env_switch_restores_xla_defaults():
    code = "from jaxquant import xla; print(dict(xla.compiler_options()))"
    env = {**os.environ, "JAXQUANT_XLA_DEFAULTS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "{}"


def test_compiled_executables_are_released_when_mappings_near_the_cap(tmp_path, monkeypatch):
    f = jax.jit(lambda x: x * 2.0)
    f(jnp.ones(3)).block_until_ready()
    assert f._cache_size() == 1
    limit = tmp_path / "max_map_count"
    limit.write_text(f"{10 ** 9}\n")
    monkeypatch.setattr(xla, "_MAP_LIMIT_FILE", str(limit))
    assert xla.release_compiled_if_crowded() is False  # far from the cap: caches kept
    assert f._cache_size() == 1
    limit.write_text("16\n")  # any process has more than 8 mappings
    assert xla.release_compiled_if_crowded() is True
    assert f._cache_size() == 0
    np.testing.assert_allclose(np.asarray(f(jnp.ones(3))), 2.0)  # recompiles on the next call
    monkeypatch.setattr(xla, "_MAP_LIMIT_FILE", str(tmp_path / "absent"))
    assert xla.release_compiled_if_crowded() is False  # no /proc: a no-op
