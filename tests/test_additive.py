"""Additive quantization (AQ): objective, beam search, layout, bits, storage, dispatch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.errors import CheckpointError, ConfigError
from jaxquant.models.layers import Conv, Dense
from jaxquant.quant import additive as aq
from jaxquant.quant import dispatch, packing, serialize
from jaxquant.quant.accounting import leaf_storage, storage_report
from jaxquant.quant.uniform import WeightQuantConfig, as_matrix, quantize_weight

OUT, K = 64, 144


def _problem(seed=0, out=OUT, k=K):
    """A random weight and a random correlated, unevenly scaled PSD XᵀX."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(out, k)).astype(np.float32) * 0.05
    mix = rng.normal(size=(k, k)) * 0.3 + np.eye(k)
    x = rng.normal(size=(4 * k, k)) @ mix * rng.uniform(0.2, 3.0, size=k)
    return w, (x.T @ x).astype(np.float32)


def _weighted_error(w, w_hat, xtx):
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum(d * (d @ xtx)) / np.sum(w * (w @ xtx)))


@pytest.fixture(scope="module")
def problem():
    return _problem()


@pytest.fixture(scope="module")
def aq2x8(problem):
    w, xtx = problem
    return aq.quantize_matrix(w, xtx, 2, 8, 8, key=0, beam_size=4, max_iters=4, tol=0.0)


def test_objective_decreases_and_matches_the_stored_weight(problem, aq2x8):
    w, xtx = problem
    qw, hist = aq2x8
    objs = [r["objective"] for r in hist]
    assert hist[0]["phase"] == "init" and {r["phase"] for r in hist[1:]} == {"adam", "beam"}
    assert all(b <= a * (1 + 1e-5) for a, b in zip(objs, objs[1:])), objs
    assert objs[-1] < 0.6 * objs[0]
    # The reported objective is that of the stored float16 weight; W is [out, K], so the
    # result is a dense kernel [K, out].
    assert qw.shape == (K, OUT)
    assert _weighted_error(w, as_matrix(qw.dequantize()), xtx) == pytest.approx(objs[-1], rel=1e-3)
    assert aq.relative_error(qw, w.T, xtx) == pytest.approx(objs[-1], rel=1e-3)


def test_aq_beats_uniform_2bit(problem, aq2x8):
    # Note: at 64×144 the two 256-entry codebooks dominate the storage (≈9 bits/weight);
    # this checks the optimisation, the bit-budget comparison is for real layer sizes.
    w, xtx = problem
    qw, _ = aq2x8
    e_aq = aq.relative_error(qw, w.T, xtx)
    for gs in (None, 8):
        uw = quantize_weight(w.T, WeightQuantConfig(bits=2, group_size=gs))
        assert e_aq < 0.5 * aq.relative_error(uw, w.T, xtx)


def test_more_codebooks_lower_error(problem, aq2x8):
    w, xtx = problem
    one, _ = aq.quantize_matrix(w, xtx, 1, 8, 8, key=0, beam_size=4, max_iters=4, tol=0.0)
    assert aq.relative_error(aq2x8[0], w.T, xtx) < 0.7 * aq.relative_error(one, w.T, xtx)


def test_wider_beam_lower_error_and_tracked_loss_is_exact(problem):
    w, xtx = problem
    init, _ = aq.quantize_matrix(w, xtx, 2, 8, 8, key=0, max_iters=0)
    wj = jnp.asarray(w)
    h = jnp.asarray(xtx) / np.mean(np.diag(xtx))
    codes, books, s = init.int_codes(), init.codebooks.astype(jnp.float32), init.scales.astype(jnp.float32)
    e0 = float(aq._objective(wj, h, codes, books, s))
    errs = {}
    for beam in (1, 8):
        new, rows = aq._beam_search_codes(wj, h, codes, books, s, beam=beam, groups_per_block=6)
        exact = float(aq._objective(wj, h, new, books, s))
        assert float(rows.sum()) == pytest.approx(exact, rel=1e-4)  # incremental bookkeeping is exact
        errs[beam] = exact
    assert errs[8] < errs[1] < e0


def test_deterministic_for_a_fixed_key(problem):
    w, xtx = problem
    kw = dict(beam_size=2, max_iters=1, adam_steps=5)
    a, ha = aq.quantize_matrix(w, xtx, 1, 6, 8, key=3, **kw)
    b, hb = aq.quantize_matrix(w, xtx, 1, 6, 8, key=jax.random.key(3), **kw)
    c, _ = aq.quantize_matrix(w, xtx, 1, 6, 8, key=4, **kw)
    for f in ("codes", "codebooks", "scales"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
    assert [r["objective"] for r in ha] == [r["objective"] for r in hb]
    assert not np.array_equal(np.asarray(a.codebooks), np.asarray(c.codebooks))


def test_kernel_grouping_layout_is_exact_by_hand():
    kh, kw_, cin, cout, b = 3, 3, 4, 5, 4
    rng = np.random.default_rng(1)
    books = rng.normal(size=(1, 2 ** b, 9)).astype(np.float16)
    codes = rng.integers(0, 2 ** b, size=(cout, cin, 1)).astype(np.uint8)
    scales = rng.uniform(0.5, 2.0, size=cout).astype(np.float16)
    qw = aq.AQWeight(jnp.asarray(codes), jnp.asarray(books), jnp.asarray(scales), shape=(kh, kw_, cin, cout),
                     group_size=9, num_codebooks=1, nbits=b, kernel_grouping=True, packed=False)
    want = np.zeros((kh, kw_, cin, cout), np.float32)
    for o in range(cout):
        for i in range(cin):  # one vector = input channel i's 3×3 kernel, taps in (kh, kw) order
            v = books[0, codes[o, i, 0]].astype(np.float32) * np.float32(scales[o])
            want[:, :, i, o] = v.reshape(kh, kw_)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), want)
    np.testing.assert_array_equal(np.asarray(qw.to_packed().dequantize()), want)
    # The explicit permutation agrees with the reshape used inside.
    perm = aq.kernel_group_permutation((kh, kw_, cin, cout))
    m = rng.normal(size=(cout, kh * kw_ * cin)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(aq._to_kernel_groups(m, qw.shape)), m[:, perm])
    np.testing.assert_array_equal(np.asarray(aq._from_kernel_groups(m[:, perm], qw.shape)), m)
    h = rng.normal(size=(36, 36)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(aq._kernel_group_xtx(h, qw.shape)), h[perm][:, perm])


def test_quantize_kernel_with_kernel_grouping():
    rng = np.random.default_rng(2)
    kernel = rng.normal(size=(3, 3, 8, 16)).astype(np.float32) * 0.1
    x = rng.normal(size=(300, 72)) * rng.uniform(0.2, 3.0, size=72)
    xtx = (x.T @ x).astype(np.float32)  # in kernel order (kh, kw, in)
    qw, hist = aq.quantize_kernel(kernel, xtx, 1, 5, 9, key=0, beam_size=2, max_iters=1)
    assert qw.kernel_grouping and qw.shape == kernel.shape and qw.describe() == "AQ 1x5 g9 kernel"
    # The objective was computed on permuted W and XᵀX; measured in kernel order it agrees.
    assert aq.relative_error(qw, kernel, xtx) == pytest.approx(hist[-1]["objective"], rel=1e-3)
    flat, _ = aq.quantize_kernel(kernel, xtx, 1, 5, 9, key=0, beam_size=2, max_iters=1, kernel_grouping=False)
    assert not flat.kernel_grouping
    assert aq.relative_error(flat, kernel, xtx) == pytest.approx(_[-1]["objective"], rel=1e-3)


def test_config_errors(problem):
    w, xtx = problem
    with pytest.raises(ConfigError, match="does not divide"):
        aq.quantize_matrix(w, xtx, 2, 8, 7, key=0)
    with pytest.raises(ConfigError, match="XᵀX has shape"):
        aq.quantize_matrix(w, xtx[:8, :8], 2, 8, 8, key=0)
    with pytest.raises(ConfigError, match="nbits"):
        aq.quantize_matrix(w, xtx, 2, 17, 8, key=0)
    with pytest.raises(ConfigError, match="NaN"):
        aq.quantize_matrix(np.full_like(w, np.nan), xtx, 2, 8, 8, key=0)
    with pytest.raises(ConfigError, match="4-D"):
        aq.quantize_kernel(w.T, xtx, 2, 8, 8, key=0, kernel_grouping=True)


@pytest.mark.parametrize("m,b,g,want", [(1, 16, 8, 27.3), (2, 8, 9, 2.01), (4, 8, 9, 4.01)])
def test_bits_per_weight_matches_anchors(m, b, g, want):
    # A 192→192 3×3 conv (ANCHORS.md).
    # ANCHORS quotes them rounded: 27.29 → 27.3, 2.009 → 2.01, 4.009 → 4.01.
    digits = len(str(want).split(".")[1])
    assert round(aq.aq_bits_per_weight(192, 9 * 192, m, b, g), digits) == want


def _hand_weight(shape, m, b, g, packed=True, seed=0, kernel_grouping=False):
    rng = np.random.default_rng(seed)
    out, k = shape[-1], int(np.prod(shape[:-1]))
    codes = rng.integers(0, 2 ** b, size=(out, k // g, m)).astype(np.uint8 if b <= 8 else np.uint16)
    qw = aq.AQWeight(jnp.asarray(codes), jnp.asarray(rng.normal(size=(m, 2 ** b, g)).astype(np.float16)),
                     jnp.asarray(rng.uniform(0.5, 2, size=out).astype(np.float16)), shape=tuple(shape),
                     group_size=g, num_codebooks=m, nbits=b, kernel_grouping=kernel_grouping, packed=False)
    return qw.to_packed() if packed else qw


@pytest.mark.parametrize("m,b,g", [(2, 8, 9), (4, 8, 9), (1, 12, 8)])
def test_storage_accounting_counts_the_stored_arrays(m, b, g):
    shape = (3, 3, 192, 192)
    qw = _hand_weight(shape, m, b, g, kernel_grouping=True)
    out, k = 192, 9 * 192
    stored = sum(int(np.asarray(a).size) * np.dtype(a.dtype).itemsize * 8
                 for a in (qw.codes, qw.codebooks, qw.scales))
    st = leaf_storage("conv", qw)
    assert st.bits == stored and st.num_weights == out * k and st.config == f"AQ {m}x{b} g{g} kernel"
    assert st.detail["codes"] == out * packing.words_per_row(k // g * m, b) * 32
    # Packed codes: the stored bits are the formula's, up to whole 32-bit words per row.
    ideal = aq.aq_bits_per_weight(out, k, m, b, g) * out * k
    assert ideal <= st.bits < ideal + out * 32
    if (k // g * m * b) % 32 == 0:
        assert st.bits == round(ideal)
    # Unpacked: one uint8/uint16 per code, counted as such.
    un = leaf_storage("conv", qw.to_unpacked())
    assert un.detail["codes"] == out * (k // g) * m * (8 if b <= 8 else 16)
    np.testing.assert_array_equal(np.asarray(qw.dequantize()), np.asarray(qw.to_unpacked().dequantize()))


def test_serialize_round_trip_and_validation():
    qw = _hand_weight((3, 3, 8, 16), 2, 6, 9, kernel_grouping=True)
    tree = {"conv": {"kernel": qw, "bias": jnp.zeros(16)}}
    plain, manifest = serialize.to_storable(tree)
    entry = manifest["layers"]["conv.kernel"]
    assert entry["type"] == "aq" and entry["version"] == 1
    assert sorted(entry["arrays"]) == ["codebooks", "codes", "scales"]
    back = serialize.from_storable(plain, manifest)["conv"]["kernel"]
    assert isinstance(back, aq.AQWeight) and back.kernel_grouping and back.shape == qw.shape
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qw.dequantize()))
    assert storage_report(tree).total_bits == storage_report({"conv": {"kernel": back, "bias": jnp.zeros(16)}}).total_bits
    bad = dict(plain["conv"]["kernel"], codebooks=plain["conv"]["kernel"]["codebooks"].astype(np.float32))
    with pytest.raises(CheckpointError, match="codebooks should be float16"):
        serialize.from_storable({"conv": {"kernel": bad, "bias": plain["conv"]["bias"]}}, manifest)


def test_dispatch_inside_flax_conv_and_dense():
    qw = _hand_weight((3, 3, 8, 16), 2, 6, 9, kernel_grouping=True)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 8))
    bias = jnp.linspace(-1, 1, 16)
    y = Conv(16).apply({"params": {"kernel": qw, "bias": bias}}, x)
    ref = jax.lax.conv_general_dilated(x, qw.dequantize(), (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST) + bias
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    y = jax.jit(lambda p, x: Conv(16).apply({"params": p}, x))({"kernel": qw, "bias": bias}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)

    dw = _hand_weight((24, 16), 2, 4, 8)
    xd = jax.random.normal(jax.random.key(1), (3, 24))
    y = Dense(16).apply({"params": {"kernel": dw, "bias": bias}}, xd)
    np.testing.assert_allclose(np.asarray(y), np.asarray(xd @ dw.dequantize() + bias), rtol=1e-5, atol=1e-5)
    assert dispatch.materialize(dw).shape == (24, 16)


def test_init_resumes_from_a_previous_result(problem, aq2x8):
    w, xtx = problem
    qw, hist = aq2x8
    more, h2 = aq.quantize_matrix(w, xtx, 2, 8, 8, key=0, beam_size=4, max_iters=1, init=qw)
    assert h2[0]["objective"] == pytest.approx(hist[-1]["objective"], rel=1e-5)
    assert h2[-1]["objective"] <= h2[0]["objective"]
    with pytest.raises(ConfigError, match="init is"):
        aq.quantize_matrix(w, xtx, 1, 8, 8, key=0, init=qw)



def _with_moves(qw, changes):
    """``qw`` (unpacked) with ``changes`` = [(row, group, slot, code)] applied to its codes."""
    codes = np.array(qw.int_codes())
    for r, j, m, c in changes:
        codes[r, j, m] = c
    return dataclasses.replace(qw.to_unpacked(), codes=jnp.asarray(codes.astype(np.uint8)))


@pytest.mark.parametrize("kernel_grouping", [False, True])
def test_greedy_code_update_recovers_single_code_moves(aq2x8, kernel_grouping):
    qw = aq2x8[0]
    if kernel_grouping:  # a 3x3 conv: the target is given in kernel order and permuted inside
        kernel = np.random.default_rng(5).normal(size=(3, 3, 16, 16)).astype(np.float32) * 0.1
        qw, _ = aq.quantize_kernel(kernel, np.eye(144, dtype=np.float32), 2, 6, 9, key=0, beam_size=2, max_iters=1)
        assert qw.kernel_grouping
    n = 1 << qw.nbits
    codes = np.asarray(qw.int_codes())
    # Five vectors get one different code each (a codeword far from the current one).
    changes = [(r, j, m, (int(codes[r, j, m]) + n // 2) % n)
               for r, j, m in [(0, 0, 0), (3, 5, 1), (7, 2, 0), (10, 1, 1), (12, 3, 0)]]
    target = as_matrix(_with_moves(qw, changes).dequantize())
    # Already at the target: nothing to change.
    same, k = aq.greedy_code_update(qw, as_matrix(qw.dequantize()), 100)
    assert k == 0 and np.array_equal(np.asarray(same.codes), np.asarray(qw.codes))
    # A budget above the number of moves recovers exactly those moves, in the stored form.
    got, k = aq.greedy_code_update(qw, target, 50)
    assert k == 5 and got.packed == qw.packed
    np.testing.assert_array_equal(np.asarray(got.int_codes()), np.asarray(_with_moves(qw, changes).codes))
    # A budget of two applies the two largest gains, and no more (several row blocks).
    two, k = aq.greedy_code_update(qw, target, 2, row_chunk=4)
    assert k == 2 and int(np.sum(np.asarray(two.int_codes()) != codes)) == 2

    def err(w):
        return float(np.sum((np.asarray(as_matrix(w.dequantize()), np.float64) - np.asarray(target)) ** 2))

    gains = sorted(err(qw) - err(_with_moves(qw, [c])) for c in changes)
    assert err(qw) - err(two) == pytest.approx(gains[-1] + gains[-2], rel=1e-4)
    with pytest.raises(ConfigError, match="target has shape"):
        aq.greedy_code_update(qw, target[:, :-1], 2)


def test_greedy_code_update_in_the_xtx_metric(problem, aq2x8):
    w, xtx = problem
    qw = aq2x8[0]
    h = np.asarray(xtx, np.float64) / np.mean(np.diag(xtx))
    # (The float weight itself is no target: aq2x8 is a local optimum of exactly this error.)
    w_hat = np.asarray(as_matrix(qw.dequantize()), np.float64)
    target = w_hat + np.random.default_rng(1).normal(size=w_hat.shape) * np.std(np.asarray(w) - w_hat) * 2

    def err(q):
        d = np.asarray(as_matrix(q.dequantize()), np.float64) - target
        return float(np.sum(d * (d @ h)))

    one, k = aq.greedy_code_update(qw, target, 1, xtx=h)
    assert k == 1 and err(one) < err(qw)
    # The chosen move beats every other single move tried: 200 random (row, group, slot, code).
    rng = np.random.default_rng(0)
    codes = np.asarray(qw.int_codes())
    for _ in range(200):
        r, j, m = rng.integers(64), rng.integers(codes.shape[1]), rng.integers(2)
        c = int(rng.integers(256))
        if c != codes[r, j, m]:
            assert err(_with_moves(qw, [(r, j, m, c)])) >= err(one) - 1e-9 * err(qw)
    # More budget, more decrease; a non-square metric is refused.
    many, k = aq.greedy_code_update(qw, target, 64, xtx=h)
    assert k > 1 and err(many) < err(one)
    with pytest.raises(ConfigError, match="xtx has shape"):
        aq.greedy_code_update(qw, target, 2, xtx=h[:-1])
