"""Additive vector quantization (AQ) of weights, as in AQLM / AQUATIC-Diff.

A weight viewed as a matrix ``W [out, K]`` (see :func:`~jaxquant.quant.uniform.as_matrix`)
is cut, row by row, into ``J = K / g`` vectors of ``g`` consecutive entries. Each vector
is the sum of ``M`` codewords, one from each of ``M`` codebooks of ``2**B`` entries, times
a per-row scale::

    Ŵ[r, j·g:(j+1)·g] = s_r · Σ_m C_m[codes[r, j, m]]

Storage: ``codes`` (``B`` bits each, bit-packed), ``codebooks`` float16 ``[M, 2**B, g]``
and ``scales`` float16 ``[out]`` — :func:`aq_bits_per_weight` is the paper's formula.

**Objective.** With ``H = XᵀX`` (``[K, K]``, accumulated over the layer's calibration
inputs ``X``, columns in the same order as ``W``) the codes, codebooks and scales
minimise the output error of the layer::

    E(codes, C, s) = tr((W - Ŵ) H (W - Ŵ)ᵀ) = Σ_r ‖X (w_r - ŵ_r)ᵀ‖²

reported relative to ``tr(W H Wᵀ)`` (so 0 is lossless and 1 is "all zeros").

**Algorithm** (:func:`quantize_matrix`):

1. Scales ``s_r`` = RMS of row ``r`` (so the codebooks live in a unit-scale space).
2. Residual k-means, one codebook at a time, over the ``out·J`` vectors of ``W / s``
   (Lloyd iterations on a seeded subsample, then every vector assigned), weighted by
   the diagonal of the objective (``s_r² H_aa`` for coordinate ``a``) unless
   ``kmeans_weighted=False``.
3. Alternate until the relative improvement of one round is below ``tol`` or
   ``max_iters`` rounds ran:

   a. *Codebooks and scales* by Adam with the codes fixed, on the exact objective
      (float32 codebooks and log-scale offsets; the gradient is ``-2 (W - Ŵ) H``
      pulled back through the decoder, one ``[out, K] @ [K, K]`` product per step). The
      best iterate is rounded to float16 and kept only if it beats the previous
      float16 state, so the reported objective never rises.
   b. *Codes* by beam search (:func:`_beam_search_codes`): slots are visited in order
      (group ``j`` outer, codebook ``m`` inner); at each slot every row scores all
      ``2**B`` replacement codes for each of its ``beam_size`` hypotheses, in parallel
      over rows, and keeps the ``beam_size`` best. Hypotheses persist across groups, so
      a code chosen in one group can be compensated in later ones. The score is the
      exact change of ``E`` (cross-group terms included), see that function.

**Kernel-aware grouping.** For a ``kh×kw`` convolution ``K`` is ordered
``(kh, kw, in)``, so one input channel's spatial kernel is not contiguous. With
``kernel_grouping`` the columns of ``W`` (and rows/columns of ``H``) are first permuted
to ``(in, kh, kw)`` order (:func:`kernel_group_permutation`); with ``g = kh·kw`` one
vector is then exactly one 3×3 kernel. The permutation is implied by the static flag and
undone by :meth:`AQWeight.dequantize`.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.errors import ConfigError
from jaxquant.quant import dispatch, packing
from jaxquant.quant.uniform import as_matrix, from_matrix

CODEBOOK_DTYPE = jnp.float16
SCALE_DTYPE = jnp.float16
DEFAULT_MAX_ITERS = 5  # quantize_matrix's rounds of (Adam, beam search) unless told otherwise


def aq_bits_per_weight(out: int, k: int, num_codebooks: int, nbits: int, group_size: int) -> float:
    """Ideal bits per weight of AQ on an ``[out, k]`` matrix (AQLM's formula).

    ``[N/g·M·B (codes) + M·2^B·g·16 (float16 codebooks) + out·16 (scales)] / N`` with
    ``N = out·k``. The stored form (:class:`AQWeight` with ``packed=True``) matches it up
    to rounding each row's code stream to whole 32-bit words.
    """
    n = out * k
    return (n / group_size * num_codebooks * nbits + num_codebooks * 2 ** nbits * group_size * 16
            + out * 16) / n


def aq_stored_bits(shape: tuple[int, ...], num_codebooks: int, nbits: int, group_size: int) -> int:
    """Exact bits an :class:`AQWeight` (``packed=True``) of a kernel of ``shape`` stores.

    Codes as uint32 words (each row's ``J·M`` codes one ``nbits``-bit stream, rounded up
    to whole words), float16 codebooks ``[M, 2**B, g]`` and float16 scales ``[out]``:
    what :func:`jaxquant.quant.accounting.storage_report` counts for the stored weight,
    computed from the shape alone (for planning). :func:`aq_bits_per_weight` is the
    same without the word rounding.
    """
    out, k = int(shape[-1]), int(np.prod(shape[:-1]))
    words = packing.words_per_row(k // group_size * num_codebooks, nbits)
    return out * words * 32 + num_codebooks * 2 ** nbits * group_size * 16 + out * 16


def kernel_group_permutation(shape: tuple[int, ...]) -> np.ndarray:
    """Column permutation for kernel-aware grouping of an HWIO conv kernel.

    ``W[:, perm]`` reorders the ``K = kh·kw·in`` columns of :func:`as_matrix` from
    ``(kh, kw, in)`` to ``(in, kh, kw)``, so the ``kh·kw`` taps of one input channel are
    contiguous; ``H[perm][:, perm]`` is the matching ``XᵀX``. Undo with ``np.argsort(perm)``.
    """
    if len(shape) != 4:
        raise ConfigError(f"kernel-aware grouping needs a 4-D (HWIO) conv kernel, got shape {tuple(shape)}")
    kh, kw, cin, _ = shape
    return np.arange(kh * kw * cin).reshape(kh * kw, cin).T.reshape(-1)


def _to_kernel_groups(w: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``[out, K]`` in (kh, kw, in) order → (in, kh, kw) order (same as ``w[:, perm]``)."""
    kh, kw, cin, _ = shape
    return w.reshape(w.shape[0], kh * kw, cin).transpose(0, 2, 1).reshape(w.shape[0], -1)


def _from_kernel_groups(w: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_to_kernel_groups`."""
    kh, kw, cin, _ = shape
    return w.reshape(w.shape[0], cin, kh * kw).transpose(0, 2, 1).reshape(w.shape[0], -1)


@partial(jax.jit, static_argnames="shape")
def _kernel_group_xtx(h: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``h[perm][:, perm]`` for :func:`kernel_group_permutation` (one fused copy)."""
    kh, kw, cin, _ = shape
    t = kh * kw
    return h.reshape(t, cin, t, cin).transpose(1, 0, 3, 2).reshape(t * cin, t * cin)


@jax.jit
def _prepare_xtx(h: jax.Array) -> jax.Array:
    """Symmetrise ``XᵀX`` and scale it to unit mean diagonal (the relative objective does
    not depend on its scale; this keeps float32 sums well inside range)."""
    h = 0.5 * (h + h.T)
    return h / jnp.maximum(jnp.mean(jnp.diag(h)), 1e-30)


def _decode(codes: jax.Array, codebooks: jax.Array) -> jax.Array:
    """Σ_m codebooks[m, codes[..., m]]: int codes ``[out, J, M]`` → float32 ``[out, J, g]``."""
    m = codebooks.shape[0]
    vecs = codebooks.astype(jnp.float32)[jnp.arange(m), codes]  # [out, J, M, g]
    return vecs.sum(-2)


@flax.struct.dataclass
class AQWeight:
    """An additively quantized weight, stored in the place of the float kernel.

    Attributes:
      codes: packed form: uint32 ``[out, words]``, the ``J·M`` codes of a row (``J = K/g``,
        row-major over ``[J, M]``) as one ``nbits``-bit stream (:mod:`~jaxquant.quant.packing`);
        unpacked form: uint8 (``nbits ≤ 8``) or uint16 ``[out, J, M]``.
      codebooks: float16 ``[M, 2**nbits, g]``.
      scales: float16 ``[out]``, one per output channel.
      shape: the float kernel's shape (HWIO conv or ``[in, out]`` dense).
      group_size, num_codebooks, nbits: ``g``, ``M``, ``B``.
      kernel_grouping: groups run over the ``(in, kh, kw)`` column order
        (:func:`kernel_group_permutation`) instead of the kernel order ``(kh, kw, in)``.
      packed: whether ``codes`` is the bit-packed form.
    """

    codes: jax.Array
    codebooks: jax.Array
    scales: jax.Array
    shape: tuple = flax.struct.field(pytree_node=False)
    group_size: int = flax.struct.field(pytree_node=False)
    num_codebooks: int = flax.struct.field(pytree_node=False)
    nbits: int = flax.struct.field(pytree_node=False)
    kernel_grouping: bool = flax.struct.field(pytree_node=False, default=False)
    packed: bool = flax.struct.field(pytree_node=False, default=True)

    @property
    def out_features(self) -> int:
        return int(self.shape[-1])

    @property
    def in_size(self) -> int:
        """``K``: number of weights per output channel."""
        return int(np.prod(self.shape[:-1]))

    @property
    def num_groups(self) -> int:
        """``J = K / g``: vectors per output channel."""
        return self.in_size // self.group_size

    @property
    def num_weights(self) -> int:
        return int(np.prod(self.shape))

    def ideal_bits_per_weight(self) -> float:
        """:func:`aq_bits_per_weight` of this weight (codes at exactly ``nbits`` bits)."""
        return aq_bits_per_weight(self.out_features, self.in_size, self.num_codebooks, self.nbits,
                                  self.group_size)

    def describe(self) -> str:
        return f"AQ {self.num_codebooks}x{self.nbits} g{self.group_size}" + (" kernel" if self.kernel_grouping else "")

    def int_codes(self) -> jax.Array:
        """Codes as int32 ``[out, J, M]`` whatever the storage form."""
        out, j, m = self.out_features, self.num_groups, self.num_codebooks
        if self.packed:
            return packing.unpack(self.codes, self.nbits, j * m).reshape(out, j, m)
        return self.codes.astype(jnp.int32)

    def dequantize_matrix(self, dtype: Any = jnp.float32) -> jax.Array:
        """``[out, K]`` in kernel order (as :func:`as_matrix` of the float kernel)."""
        v = _decode(self.int_codes(), self.codebooks)
        w = (v * self.scales.astype(jnp.float32)[:, None, None]).reshape(self.out_features, self.in_size)
        if self.kernel_grouping:
            w = _from_kernel_groups(w, self.shape)
        return w.astype(dtype)

    def dequantize(self, dtype: Any = jnp.float32) -> jax.Array:
        """The dense kernel this weight represents, in the float kernel's layout."""
        return from_matrix(self.dequantize_matrix(jnp.float32), self.shape).astype(dtype)

    def to_packed(self) -> "AQWeight":
        if self.packed:
            return self
        flat = self.codes.reshape(self.out_features, -1)
        return dataclasses.replace(self, codes=packing.pack(flat, self.nbits), packed=True)

    def to_unpacked(self) -> "AQWeight":
        """One uint8/uint16 per code, ``[out, J, M]``; same values as the packed form."""
        if not self.packed:
            return self
        return dataclasses.replace(self, codes=self.int_codes().astype(_code_dtype(self.nbits)), packed=False)


dispatch.register_weight_type(AQWeight, lambda w, dtype: w.dequantize(dtype))


def _code_dtype(nbits: int):
    return jnp.uint8 if nbits <= 8 else jnp.uint16


def validate_aq(w: AQWeight) -> None:
    """Check dtypes and shapes of a (rebuilt) :class:`AQWeight`; raises ``ValueError``."""
    shape = tuple(int(d) for d in w.shape)
    if len(shape) < 2:
        raise ValueError(f"shape {shape} is not a kernel shape")
    out, k = shape[-1], int(np.prod(shape[:-1]))
    m, b, g = w.num_codebooks, w.nbits, w.group_size
    if not (isinstance(m, int) and m >= 1 and isinstance(b, int) and 1 <= b <= 16 and isinstance(g, int)
            and g >= 1 and k % g == 0):
        raise ValueError(f"num_codebooks={m}, nbits={b}, group_size={g} invalid for shape {shape}")
    if w.kernel_grouping and len(shape) != 4:
        raise ValueError(f"kernel_grouping needs a 4-D conv kernel shape, got {shape}")
    j = k // g
    codes = (((out, packing.words_per_row(j * m, b)), np.uint32) if w.packed
             else ((out, j, m), np.dtype(_code_dtype(b))))
    want = {"codes": codes, "codebooks": ((m, 2 ** b, g), np.dtype(CODEBOOK_DTYPE)),
            "scales": ((out,), np.dtype(SCALE_DTYPE))}
    for f, (shp, dtype) in want.items():
        a = getattr(w, f)
        if a is None or tuple(np.shape(a)) != shp or np.dtype(a.dtype) != np.dtype(dtype):
            found = "missing" if a is None else f"{np.dtype(a.dtype)} {tuple(np.shape(a))}"
            raise ValueError(f"{f} should be {np.dtype(dtype)} {shp}, found {found}")


# --------------------------------------------------------------------------- helpers


def _argmin_last(x: jax.Array) -> jax.Array:
    """First index of the minimum along the last axis (XLA:CPU's argmin is several times
    slower than a min and a masked min)."""
    n = x.shape[-1]
    lo = jnp.min(x, -1, keepdims=True)
    idx = jnp.min(jnp.where(x <= lo, jnp.arange(n, dtype=jnp.int32), n), -1)
    return jnp.minimum(idx, n - 1)


def _smallest(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``k`` smallest values along the last axis and their indices (ties: lower index)."""
    if k == 1:
        idx = _argmin_last(x)[..., None]
        return jnp.take_along_axis(x, idx, -1), idx
    neg, idx = jax.lax.top_k(-x, k)
    return -neg, idx.astype(jnp.int32)


def _objective(w: jax.Array, h: jax.Array, codes: jax.Array, codebooks: jax.Array, scales: jax.Array) -> jax.Array:
    """``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` (unnormalised)."""
    out, k = w.shape
    r = w - scales[:, None] * _decode(codes, codebooks).reshape(out, k)
    return jnp.sum(r * (r @ h))


_objective_jit = jax.jit(_objective)


# --------------------------------------------------------------------------- k-means init


@partial(jax.jit, static_argnames=("n", "iters", "fit_points", "chunk"))
def _kmeans(x: jax.Array, wt: jax.Array, key: jax.Array, *, n: int, iters: int, fit_points: int,
            chunk: int = 8192) -> tuple[jax.Array, jax.Array]:
    """Weighted k-means of the rows of ``x [P, g]`` with per-coordinate weights ``wt [P, g]``.

    Distance ``Σ_a wt_a (x_a - c_a)²``; centroids are per-coordinate weighted means.
    Lloyd iterations run on a seeded subsample of ``fit_points`` rows (all rows when
    fewer); then every row is assigned. An empty cluster keeps its centroid.

    Returns:
      ``(centroids [n, g], assignment int32 [P])``.
    """
    p, g = x.shape
    k_fit, k_init = jax.random.split(key)
    if fit_points < p:
        sel = jax.random.choice(k_fit, p, (fit_points,), replace=False)
        xf, wf = x[sel], wt[sel]
    else:
        xf, wf = x, wt
    pf = xf.shape[0]
    init = jax.random.choice(k_init, pf, (n,), replace=pf < n)
    cent = xf[init]

    def assign(c, xs, ws):
        # Σ_a w (x - c)² minus the c-independent Σ_a w x².
        d = -2.0 * (ws * xs) @ c.T + ws @ (c * c).T
        return _argmin_last(d)

    def lloyd(_, c):
        a = assign(c, xf, wf)
        num = jax.ops.segment_sum(wf * xf, a, n)
        den = jax.ops.segment_sum(wf, a, n)
        return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), c)

    cent = jax.lax.fori_loop(0, iters, lloyd, cent)
    pad = (-p) % chunk
    xc = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, g)
    wc = jnp.pad(wt, ((0, pad), (0, 0))).reshape(-1, chunk, g)
    a = jax.lax.map(lambda xw: assign(cent, *xw), (xc, wc)).reshape(-1)[:p]
    return cent, a


def _residual_kmeans(wn: jax.Array, wt: jax.Array, key: jax.Array, m: int, n: int, iters: int,
                     fit_points: int) -> tuple[jax.Array, jax.Array]:
    """Codebooks ``[M, n, g]`` and codes ``[P, M]`` of the vectors ``wn [P, g]``, one
    codebook at a time, each fitted to what the previous ones left."""
    resid = wn
    books, codes = [], []
    for key_m in jax.random.split(key, m):
        c, a = _kmeans(resid, wt, key_m, n=n, iters=iters, fit_points=fit_points)
        c = c.astype(CODEBOOK_DTYPE).astype(jnp.float32)  # as it will be stored
        resid = resid - c[a]
        books.append(c)
        codes.append(a)
    return jnp.stack(books), jnp.stack(codes, -1)


# --------------------------------------------------------------------------- (a) Adam


@partial(jax.jit, static_argnames=("steps", "lr"))
def _adam_codebooks_scales(w, h, codes, codebooks, scales, norm, *, steps: int, lr: float):
    """Adam on (float32 codebooks, log-scale offsets) with the codes fixed.

    Minimises ``E / norm``. Returns the best iterate seen (iterates ``0..steps``,
    iterate 0 being the input) as ``(codebooks f32, scales f32, objective)``.
    """
    import optax

    out, k = w.shape
    opt = optax.adam(lr)

    def recon(theta):
        c, t = theta
        return (scales * jnp.exp(t))[:, None] * _decode(codes, c).reshape(out, k)

    def value_and_grad(theta):
        what, pullback = jax.vjp(recon, theta)
        r = w - what
        g = r @ h
        # dE/dŴ = -2 (W - Ŵ) H (H symmetric): one product serves the value and the gradient.
        return jnp.sum(r * g) / norm, pullback(-2.0 * g / norm)[0]

    theta0 = (codebooks.astype(jnp.float32), jnp.zeros((out,), jnp.float32))

    def step(_, state):
        theta, opt_state, best, best_theta = state
        val, grad = value_and_grad(theta)
        better = val < best
        best_theta = jax.tree.map(lambda a, b: jnp.where(better, a, b), theta, best_theta)
        best = jnp.minimum(val, best)
        updates, opt_state = opt.update(grad, opt_state, theta)
        return optax.apply_updates(theta, updates), opt_state, best, best_theta

    state = (theta0, opt.init(theta0), jnp.asarray(jnp.inf, jnp.float32), theta0)
    theta, _, best, best_theta = jax.lax.fori_loop(0, steps, step, state)
    final = _objective(w, h, codes, theta[0], scales * jnp.exp(theta[1])) / norm
    better = final < best
    best_theta = jax.tree.map(lambda a, b: jnp.where(better, a, b), theta, best_theta)
    c, t = best_theta
    return c, scales * jnp.exp(t), jnp.minimum(final, best)


# --------------------------------------------------------------------------- (b) beam search


def _pick(a: jax.Array, parent: jax.Array) -> jax.Array:
    """``a[parent[b, r], r, ...]`` for ``a [beam, out, ...]`` and ``parent [beam, out]``."""
    idx = parent.reshape(parent.shape + (1,) * (a.ndim - 2))
    return jnp.take_along_axis(a, idx, axis=0)


@partial(jax.jit, static_argnames=("beam", "groups_per_block"))
def _beam_search_codes(w, h, codes, codebooks, scales, *, beam: int, groups_per_block: int):
    """Re-encode every code by beam search on the exact objective ``E``.

    Per row ``r`` (rows are independent: ``E`` is a sum over rows) and hypothesis ``b``
    keep the residual ``ρ = w_r - ŵ_r``, its loss ``L = ρ H ρᵀ`` and ``γ = ρ H``. Changing
    the code of slot ``m`` in group ``j`` from ``c`` to ``k`` changes the group's
    reconstruction by ``δ = s_r (C_m[k] - C_m[c])`` and the loss by exactly::

        ΔL(k) = -2 δ·γ_j + δ H_jj δᵀ
              = [2 s C_m[c]·γ_j + s² n_c] - 2 s C_m[k]·(γ_j + s H_jj C_m[c]) + s² n_k

    with ``γ_j`` the ``g`` entries of ``γ`` in group ``j``, ``H_jj`` the ``g×g`` diagonal
    block and ``n_k = C_m[k] H_jj C_m[k]ᵀ``. The interaction with every other group enters
    through ``γ_j``, which is kept exact: after a change, ``γ`` moves by ``-δ H[j, :]``.
    So all ``2**B`` candidates of all ``beam`` hypotheses of all rows are scored with one
    ``[beam·out, g] @ [g, 2**B]`` product; each row keeps its ``beam`` best (hypothesis,
    code) pairs. Keeping the current code is always a candidate, so the best loss never
    rises.

    ``γ`` is updated lazily in blocks of ``groups_per_block`` groups (as GPTQ does): inside
    a block only the block's columns are refreshed from the accumulated changes ``D``
    (``γ = γ_origin - D H``), and the full ``[beam, out, K]`` state is rebuilt once per
    block by one matrix product and one gather of the surviving hypotheses' origins.

    Args:
      w: ``[out, K]`` float32; h: ``[K, K]``; codes: int32 ``[out, J, M]``;
      codebooks: float32 ``[M, 2**B, g]``; scales: float32 ``[out]``.
      groups_per_block: must divide ``J``.

    Returns:
      ``(codes int32 [out, J, M], per-row loss [out])`` of the best hypothesis.
    """
    out, k = w.shape
    _, j_total, m_total = codes.shape
    _, n, g = codebooks.shape
    nb = groups_per_block
    bc = nb * g
    n_blocks = j_total // nb

    r0 = w - scales[:, None] * _decode(codes, codebooks).reshape(out, k)
    g0 = r0 @ h
    l0 = jnp.sum(r0 * g0, -1)
    gam = jnp.broadcast_to(g0, (beam, out, k))
    loss = jnp.concatenate([l0[None], jnp.full((beam - 1, out), jnp.inf, jnp.float32)])
    all_codes = jnp.broadcast_to(codes, (beam, out, j_total, m_total))
    s = scales[None, :, None]  # broadcast over [beam, out, ·]

    def block(i, state):
        gam, loss, all_codes = state
        c0 = i * bc
        h_rows = jax.lax.dynamic_slice_in_dim(h, c0, bc, 0)          # [bc, K]
        h_blk = jax.lax.dynamic_slice_in_dim(h_rows, c0, bc, 1)      # [bc, bc]
        gam_blk = jax.lax.dynamic_slice_in_dim(gam, c0, bc, 2)       # [beam, out, bc]
        blk_codes = jax.lax.dynamic_slice_in_dim(all_codes, i * nb, nb, 2)
        origin = jnp.broadcast_to(jnp.arange(beam, dtype=jnp.int32)[:, None], (beam, out))
        delta = jnp.zeros((beam, out, bc), jnp.float32)

        def slot(carry, t):
            origin, delta, blk_codes, loss = carry
            jl, m = t // m_total, t % m_total
            h_col = jax.lax.dynamic_slice_in_dim(h_blk, jl * g, g, 1)   # [bc, g]
            h_jj = jax.lax.dynamic_slice_in_dim(h_col, jl * g, g, 0)    # [g, g]
            cm = codebooks[m]                                           # [n, g]
            p = cm @ h_jj
            nk = jnp.sum(p * cm, -1)                                    # [n]
            gj = _pick(jax.lax.dynamic_slice_in_dim(gam_blk, jl * g, g, 2), origin)
            gj = gj - jnp.einsum("brc,cg->brg", delta, h_col)          # γ_j per hypothesis
            cur = blk_codes[:, :, jl, m]                                # [beam, out]
            base = loss + 2 * scales * jnp.sum(cm[cur] * gj, -1) + scales ** 2 * nk[cur]
            z = gj + s * p[cur]
            score = (base[..., None] - 2 * s * jnp.einsum("brg,ng->brn", z, cm)
                     + s ** 2 * nk)                                     # [beam, out, n]
            flat = score.transpose(1, 0, 2).reshape(out, beam * n)
            best, idx = _smallest(flat, beam)                           # [out, beam]
            parent, new = (idx // n).T, (idx % n).T                     # [beam, out]
            origin = _pick(origin, parent)
            delta = _pick(delta, parent)
            blk_codes = _pick(blk_codes, parent)
            old = blk_codes[:, :, jl, m]
            step = s * (cm[new] - cm[old])                              # [beam, out, g]
            delta = jax.lax.dynamic_update_slice_in_dim(
                delta, jax.lax.dynamic_slice_in_dim(delta, jl * g, g, 2) + step, jl * g, 2)
            blk_codes = blk_codes.at[:, :, jl, m].set(new)
            return (origin, delta, blk_codes, best.T), None

        (origin, delta, blk_codes, loss), _ = jax.lax.scan(
            slot, (origin, delta, blk_codes, loss), jnp.arange(nb * m_total))
        gam = _pick(gam, origin) - jnp.einsum("brc,ck->brk", delta, h_rows)
        all_codes = jax.lax.dynamic_update_slice_in_dim(_pick(all_codes, origin), blk_codes, i * nb, 2)
        return gam, loss, all_codes

    gam, loss, all_codes = jax.lax.fori_loop(0, n_blocks, block, (gam, loss, all_codes))
    best = _argmin_last(loss.T)                                         # [out]
    rows = jnp.arange(out)
    return all_codes[best, rows], loss[best, rows]


def _block_groups(j: int, g: int, block_columns: int) -> int:
    """Groups per beam-search block: the largest divisor of ``J`` with at most
    ``block_columns`` columns (1 when ``J`` is prime: correct, only slower)."""
    target = max(1, block_columns // g)
    divisors = [d for d in range(1, min(j, target) + 1) if j % d == 0]
    return divisors[-1]


# --------------------------------------------------------------------------- driver


def _check_config(k: int, num_codebooks: int, nbits: int, group_size: int, beam_size: int) -> None:
    if not isinstance(nbits, int) or not 1 <= nbits <= 16:
        raise ConfigError(f"AQ nbits (bits per code) must be 1..16, got {nbits}")
    if not isinstance(num_codebooks, int) or num_codebooks < 1:
        raise ConfigError(f"AQ num_codebooks must be a positive int, got {num_codebooks}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ConfigError(f"AQ group_size must be a positive int, got {group_size}")
    if k % group_size:
        raise ConfigError(f"AQ group_size {group_size} does not divide the {k} weights per output channel; "
                          f"choose a divisor of {k} (e.g. 8, or 9 for 3×3 convs with kernel_grouping)")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ConfigError(f"AQ beam_size must be a positive int, got {beam_size}")


def _as_key(key: Any) -> jax.Array:
    if isinstance(key, (int, np.integer)):
        return jax.random.key(int(key))
    return key


def quantize_matrix(
    w: Any,
    xtx: Any,
    num_codebooks: int,
    nbits: int,
    group_size: int,
    *,
    key: Any,
    beam_size: int = 4,
    max_iters: int = DEFAULT_MAX_ITERS,
    adam_steps: int = 20,
    lr: float = 3e-2,
    tol: float = 0.01,
    kmeans_iters: int = 30,
    kmeans_points: int = 128,
    kmeans_weighted: bool = True,
    block_columns: int = 128,
    packed: bool = True,
    shape: tuple[int, ...] | None = None,
    kernel_grouping: bool = False,
    init: AQWeight | None = None,
    progress: Callable[[dict], None] | bool | None = None,
) -> tuple[AQWeight, list[dict]]:
    """Additively quantize ``W [out, K]`` minimising ``tr((W - Ŵ) XᵀX (W - Ŵ)ᵀ)``.

    See the module docstring for the algorithm. ``W``'s columns are grouped as given
    (``g`` consecutive columns per vector); use :func:`quantize_kernel` for Flax kernels.

    Args:
      w: ``[out, K]`` float weight matrix.
      xtx: ``[K, K]`` positive semi-definite ``XᵀX`` (its overall scale does not matter).
      num_codebooks, nbits, group_size: ``M``, ``B`` (codebooks of ``2**B`` entries), ``g``.
      key: PRNG key or int seed (k-means initialisation); the result is a deterministic
        function of the inputs and the key.
      beam_size: hypotheses kept per row during the code search (1 = greedy).
      max_iters: at most this many (Adam, beam search) rounds.
      adam_steps, lr: Adam steps per round and its learning rate (codebooks are in units
        of the row RMS; scales are trained as log offsets).
      tol: stop when a round improves the objective by less than this fraction.
      kmeans_iters, kmeans_points: Lloyd iterations, fitted on at most
        ``kmeans_points · 2**B`` vectors; kmeans_weighted: weight coordinates by
        ``s_r² H_aa`` (else plain k-means).
      block_columns: width of the lazy-update blocks of the beam search (speed only).
      packed: store codes bit-packed (``B`` bits each) rather than one uint8/uint16 each.
      shape, kernel_grouping: the float kernel shape recorded in the result (default:
        the dense kernel ``(K, out)``) and whether ``w``'s columns are already in
        kernel-grouped order; normally set by :func:`quantize_kernel`.
      init: continue from this :class:`AQWeight` (same configuration) instead of k-means,
        e.g. to resume an interrupted run.
      progress: called with each history record; ``True`` prints them.

    Returns:
      ``(AQWeight, history)``; ``history`` has one record per phase,
      ``{"round", "phase" ("init" | "adam" | "beam"), "objective", "seconds"}``, where
      ``objective`` is ``E / tr(W XᵀX Wᵀ)`` of the stored (float16) state after the phase.

    Raises:
      ConfigError: bad sizes, ``g`` not dividing ``K``, or non-finite inputs.
    """
    t_start = time.perf_counter()
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ConfigError(f"quantize_matrix expects a [out, K] matrix, got shape {w.shape}")
    out, k = w.shape
    _check_config(k, num_codebooks, nbits, group_size, beam_size)
    h = jnp.asarray(xtx, jnp.float32)
    if h.shape != (k, k):
        raise ConfigError(f"XᵀX has shape {h.shape}, expected ({k}, {k}) for a weight with {k} inputs per row")
    if not bool(jnp.all(jnp.isfinite(w))) or not bool(jnp.all(jnp.isfinite(h))):
        raise ConfigError("cannot quantize with NaN or Inf entries in the weight or XᵀX")
    shape = tuple(int(d) for d in shape) if shape is not None else (k, out)
    if int(np.prod(shape[:-1])) != k or shape[-1] != out:
        raise ConfigError(f"shape {shape} does not match a [{out}, {k}] matrix")
    h = _prepare_xtx(h)
    norm = float(jnp.sum(w * (w @ h)))
    if norm <= 0:
        norm = 1.0  # W is zero (or in the null space of XᵀX): any reconstruction is exact
    m, n, g = num_codebooks, 2 ** nbits, group_size
    j = k // g
    key = _as_key(key)
    history: list[dict] = []

    def record(rnd, phase, obj):
        rec = {"round": rnd, "phase": phase, "objective": float(obj),
               "seconds": round(time.perf_counter() - t_start, 3)}
        history.append(rec)
        if progress is True:
            print(f"AQ {m}x{nbits} g{g} [{out}x{k}] round {rnd} {phase}: objective {rec['objective']:.5f} "
                  f"({rec['seconds']:.1f} s)", flush=True)
        elif callable(progress):
            progress(rec)

    if init is not None:
        if (init.num_codebooks, init.nbits, init.group_size, init.out_features, init.in_size) != (m, nbits, g, out, k):
            raise ConfigError(f"init is {init.describe()} for {init.out_features}x{init.in_size}, "
                              f"not AQ {m}x{nbits} g{g} for {out}x{k}")
        codes = init.int_codes()
        books = init.codebooks.astype(jnp.float32)
        scales = init.scales.astype(jnp.float32)
    else:
        # 1. Per-row scales: RMS, so codewords are O(1).
        scales = jnp.sqrt(jnp.mean(w * w, -1)).astype(SCALE_DTYPE).astype(jnp.float32)
        safe = jnp.where(scales > 0, scales, 1.0)
        wn = (w / safe[:, None]).reshape(out * j, g)
        if kmeans_weighted:
            wt = (scales[:, None] ** 2 * jnp.diag(h)[None, :]).reshape(out * j, g)
            wt = wt / jnp.maximum(jnp.mean(wt), 1e-30) + 1e-6  # keep every point in play
        else:
            wt = jnp.ones_like(wn)
        # 2. Residual k-means, one codebook at a time.
        books, codes = _residual_kmeans(wn, wt, key, m, n, kmeans_iters, min(out * j, kmeans_points * n))
        codes = codes.reshape(out, j, m)
    obj = float(_objective_jit(w, h, codes, books, scales)) / norm
    record(0, "init", obj)

    nb = _block_groups(j, g, block_columns)
    for rnd in range(1, max_iters + 1):
        before = obj
        # (a) codebooks + scales by Adam, codes fixed; keep the float16 result only if better.
        if adam_steps > 0:
            c32, s32, _ = _adam_codebooks_scales(w, h, codes, books, scales, norm, steps=adam_steps, lr=lr)
            c16 = c32.astype(CODEBOOK_DTYPE).astype(jnp.float32)
            s16 = s32.astype(SCALE_DTYPE).astype(jnp.float32)
            new = float(_objective_jit(w, h, codes, c16, s16)) / norm
            if new < obj:
                books, scales, obj = c16, s16, new
            record(rnd, "adam", obj)
        # (b) codes by beam search with codebooks and scales fixed.
        new_codes, _ = _beam_search_codes(w, h, codes, books, scales, beam=beam_size, groups_per_block=nb)
        new = float(_objective_jit(w, h, new_codes, books, scales)) / norm
        if new <= obj:
            codes, obj = new_codes, new
        record(rnd, "beam", obj)
        if before <= 0 or (before - obj) / before < tol:
            break

    qw = AQWeight(codes.astype(_code_dtype(nbits)), books.astype(CODEBOOK_DTYPE), scales.astype(SCALE_DTYPE),
                  shape=shape, group_size=g, num_codebooks=m, nbits=nbits, kernel_grouping=kernel_grouping,
                  packed=False)
    return (qw.to_packed() if packed else qw), history


def quantize_kernel(
    kernel: Any,
    xtx: Any,
    num_codebooks: int,
    nbits: int,
    group_size: int,
    *,
    kernel_grouping: bool | None = None,
    **kwargs: Any,
) -> tuple[AQWeight, list[dict]]:
    """AQ of a Flax kernel (HWIO conv or ``[in, out]`` dense); see :func:`quantize_matrix`.

    Args:
      kernel: the float kernel; ``xtx`` is ``XᵀX`` of its input rows with ``K`` in kernel
        order ``(kh, kw, in)``, as :mod:`jaxquant.calib.calibration` accumulates it.
      kernel_grouping: group one input channel's ``kh×kw`` taps together (permute
        ``W``'s columns and ``XᵀX`` to ``(in, kh, kw)`` order). ``None``: on for
        convolutions with a spatial window when ``g`` is a multiple of ``kh·kw``.
      **kwargs: passed to :func:`quantize_matrix` (``key`` is required).
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    shape = tuple(kernel.shape)
    spatial = len(shape) == 4 and shape[0] * shape[1] > 1
    if kernel_grouping is None:
        kernel_grouping = spatial and group_size % (shape[0] * shape[1]) == 0
    if kernel_grouping and len(shape) != 4:
        raise ConfigError(f"kernel_grouping needs a 4-D (HWIO) conv kernel, got shape {shape}")
    w = as_matrix(kernel)
    h = jnp.asarray(xtx, jnp.float32)
    if kernel_grouping:
        if h.shape != (w.shape[1],) * 2:
            raise ConfigError(f"XᵀX has shape {h.shape}, expected ({w.shape[1]}, {w.shape[1]}) for kernel {shape}")
        w = _to_kernel_groups(w, shape)
        h = _kernel_group_xtx(h, shape)
    return quantize_matrix(w, h, num_codebooks, nbits, group_size, shape=shape,
                           kernel_grouping=bool(kernel_grouping), **kwargs)


def relative_error(weight: Any, kernel: Any, xtx: Any) -> float:
    """``tr(ΔW XᵀX ΔWᵀ) / tr(W XᵀX Wᵀ)`` of any stored weight against the float kernel
    (``xtx`` in kernel order), for comparing quantizers on the same footing."""
    kernel = jnp.asarray(kernel, jnp.float32)
    w = as_matrix(kernel)
    d = w - as_matrix(dispatch.materialize(weight, jnp.float32))
    h = jnp.asarray(xtx, jnp.float32)
    return float(jnp.sum(d * (d @ h)) / jnp.sum(w * (w @ h)))


@jax.jit
def _best_single_changes(resid_h: jax.Array, codes: jax.Array, codebooks: jax.Array, scales: jax.Array,
                         h_blocks: jax.Array):
    """For every vector of a block of rows, the best change of one code.

    Minimises ``ΔE = 2·u·δ + δᵀ H_jj δ`` over single-code changes ``δ = s_r (C_m[c] - C_m[old])``
    of vector ``(r, j)``: the exact change of ``‖T - Ŵ‖²_H`` when only that vector moves,
    with ``u`` the vector's slice of ``(Ŵ - T) H``. ``resid_h [rows, J, g]``, ``codes`` int32
    ``[rows, J, M]``, ``h_blocks [J, g, g]`` (the diagonal blocks of ``H``). Returns
    ``(gain = -ΔE, slot, code)``, each ``[rows, J]``.
    """
    m = codes.shape[-1]
    s = scales.astype(jnp.float32)[:, None, None]
    cb = codebooks.astype(jnp.float32)  # [M, N, g]
    quad = jnp.einsum("mng,jgh,mnh->mjn", cb, h_blocks, cb)  # C_cᵀ H_jj C_c
    gains, news = [], []
    for slot in range(m):
        old = cb[slot][codes[..., slot]]  # [rows, J, g]
        h_old = jnp.einsum("rjg,jgh->rjh", old, h_blocks)
        old_quad = jnp.sum(h_old * old, -1)[..., None]
        lin = jnp.einsum("rjg,ng->rjn", resid_h, cb[slot]) - jnp.sum(resid_h * old, -1)[..., None]
        d_e = 2.0 * s * lin + s * s * (quad[slot][None] - 2.0 * jnp.einsum("rjh,nh->rjn", h_old, cb[slot]) + old_quad)
        best = jnp.argmin(d_e, -1)
        gain = -jnp.take_along_axis(d_e, best[..., None], -1)[..., 0]
        gains.append(jnp.where(best == codes[..., slot], 0.0, gain))  # keeping the code is no change
        news.append(best)
    gains, news = jnp.stack(gains, -1), jnp.stack(news, -1)  # [rows, J, M]
    slot = jnp.argmax(gains, -1)
    pick = lambda a: jnp.take_along_axis(a, slot[..., None], -1)[..., 0]  # noqa: E731
    return pick(gains), slot, pick(news)


def greedy_code_update(weight: AQWeight, target: Any, max_changes: int, *, xtx: Any = None,
                       row_chunk: int = 256) -> tuple[AQWeight, int]:
    """Move at most ``max_changes`` codes of ``weight`` so that it comes closer to ``target``.

    For every vector (row ``r``, group ``j``) the best change of a *single* code (one
    codebook slot, any codeword) is found by exhaustive search, scored by the exact
    decrease of ``‖target - Ŵ‖²_H = tr((T - Ŵ) H (T - Ŵ)ᵀ)`` when only that vector moves
    (``H = xtx``, or the identity); the ``max_changes`` largest strictly positive
    decreases are applied (at most one code per vector; changes in one row interact
    through ``H``'s off-diagonal blocks, which the ranking ignores). Codebooks and scales
    are kept. This is the code step of PV-tuning-style fine-tuning
    (:func:`jaxquant.quant.aq_model.finetune_block`).

    Args:
      weight: the AQ weight to update (packed or not; the result has the same form).
      target: ``[out, K]`` in kernel order (as :func:`~jaxquant.quant.uniform.as_matrix`).
      max_changes: the budget: at most this many codes change.
      xtx: ``[K, K]`` metric in kernel order (e.g. the layer's ``XᵀX``); default identity.
      row_chunk: rows scored at once (bounds memory at ``row_chunk·J·2**B`` floats).

    Returns:
      ``(updated weight, number of codes changed)``.
    """
    target = jnp.asarray(target, jnp.float32)
    out, k, g = weight.out_features, weight.in_size, weight.group_size
    if target.shape != (out, k):
        raise ConfigError(f"target has shape {target.shape}, expected ({out}, {k}) for {weight.describe()}")
    h = jnp.eye(k, dtype=jnp.float32) if xtx is None else jnp.asarray(xtx, jnp.float32)
    if h.shape != (k, k):
        raise ConfigError(f"xtx has shape {h.shape}, expected ({k}, {k}) for {weight.describe()}")
    resid = weight.dequantize_matrix(jnp.float32) - target
    if weight.kernel_grouping:
        resid, h = _to_kernel_groups(resid, weight.shape), _kernel_group_xtx(h, weight.shape)
    j = weight.num_groups
    resid_h = (resid @ h).reshape(out, j, g)
    h_blocks = h.reshape(j, g, j, g)[jnp.arange(j), :, jnp.arange(j), :]  # [J, g, g]
    codes = weight.int_codes()
    gain, slot, new = [], [], []
    for lo in range(0, out, row_chunk):
        hi = min(out, lo + row_chunk)
        a, b, c = _best_single_changes(resid_h[lo:hi], codes[lo:hi], weight.codebooks, weight.scales[lo:hi],
                                       h_blocks)
        gain.append(a), slot.append(b), new.append(c)
    gain, slot, new = (jnp.concatenate(v) for v in (gain, slot, new))
    budget = int(min(max(max_changes, 0), gain.size))
    if budget == 0:
        return weight, 0
    top_gain, top = jax.lax.top_k(gain.reshape(-1), budget)
    top = top[top_gain > 0]
    rows, groups = top // j, top % j
    codes = codes.at[rows, groups, slot.reshape(-1)[top]].set(new.reshape(-1)[top])
    updated = dataclasses.replace(weight, codes=codes.astype(_code_dtype(weight.nbits)), packed=False)
    return (updated.to_packed() if weight.packed else updated), int(top.size)
