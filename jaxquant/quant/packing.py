"""Exact bit packing of b-bit integer codes into uint32 words.

Codes are stored as one contiguous little-endian bit stream per row: code ``i`` of a
row occupies bits ``[i*b, (i+1)*b)``. A row of ``n`` codes takes ``ceil(n*b/32)``
words, so the storage is the bit count rounded up per row, never a padded byte per
code. Unpacking is a gather of one or two words and shifts: cheap, jit-able and
vectorised, so the plain-XLA path unpacks inside the jitted forward.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def words_per_row(n: int, bits: int) -> int:
    """Number of uint32 words holding ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 32)


def pack(codes: np.ndarray | jax.Array, bits: int) -> jax.Array:
    """Pack unsigned codes ``[..., n]`` (values < 2**bits) into uint32 ``[..., words]``.

    Concrete codes are packed in numpy (:func:`_pack_numpy`: no compilation per shape, which
    dominated quantizing a model); traced codes take the jnp form, which gives the same words.
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if not isinstance(codes, jax.core.Tracer):
        return jnp.asarray(_pack_numpy(np.asarray(codes), bits))
    codes = jnp.asarray(codes).astype(jnp.uint32)
    *lead, n = codes.shape
    nw = words_per_row(n, bits)
    offs = np.arange(n, dtype=np.int64) * bits
    word = offs // 32
    shift = (offs % 32).astype(np.uint32)
    # Low part goes to `word`; bits spilling past 32 go to `word + 1`.
    lo = codes << shift
    spill = (shift + bits) > 32
    hi_shift = np.where(spill, 32 - shift, 0).astype(np.uint32)
    hi = jnp.where(spill, codes >> hi_shift, 0)
    flat_lo = jnp.zeros((*lead, nw + 1), jnp.uint32)
    # Bits of different codes never overlap, so OR-accumulation equals addition.
    flat_lo = flat_lo.at[..., word].add(lo)
    flat_lo = flat_lo.at[..., word + 1].add(hi.astype(jnp.uint32))
    return flat_lo[..., :nw]


def _pack_numpy(codes: np.ndarray, bits: int) -> np.ndarray:
    """:func:`pack` in numpy. Every 32 codes fill exactly ``bits`` words, so the codes are
    padded to whole blocks of 32 and each of the 32 positions of a block is shifted into
    its word (and the next, where it spills) in one vectorised step."""
    codes = codes.astype(np.uint32)
    *lead, n = codes.shape
    nw = words_per_row(n, bits)
    blocks = -(-n // 32)
    padded = np.zeros((*lead, blocks * 32), np.uint32)
    padded[..., :n] = codes
    padded = padded.reshape(*lead, blocks, 32)
    words = np.zeros((*lead, blocks, bits + 1), np.uint32)
    for j in range(32):
        word, shift = divmod(j * bits, 32)
        words[..., word] |= padded[..., j] << np.uint32(shift)
        if shift + bits > 32:
            words[..., word + 1] |= padded[..., j] >> np.uint32(32 - shift)
    return words[..., :bits].reshape(*lead, blocks * bits)[..., :nw]


def unpack(words: jax.Array, bits: int, n: int) -> jax.Array:
    """Inverse of :func:`pack`: uint32 ``[..., words]`` → int32 codes ``[..., n]``."""
    offs = np.arange(n, dtype=np.int64) * bits
    word = offs // 32
    shift = (offs % 32).astype(np.uint32)
    padded = jnp.concatenate([words, jnp.zeros((*words.shape[:-1], 1), jnp.uint32)], axis=-1)
    lo = padded[..., word] >> shift
    spill = (shift + bits) > 32
    hi_shift = np.where(spill, 32 - shift, 0).astype(np.uint32)
    hi = jnp.where(spill, padded[..., word + 1] << hi_shift, 0)
    mask = np.uint32((1 << bits) - 1)
    return ((lo | hi) & mask).astype(jnp.int32)
