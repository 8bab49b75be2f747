"""AQ encoding cost: ``quantize_matrix`` on a 512×4608 matrix at 2×8 g8 and g9.

Random Gaussian W and a random PSD XᵀX (8192 rows with uneven column scales and a
rank-64 shared factor). Prints wall time, weights per second (total and per core),
the relative weighted error reached, stored bits per weight, peak memory, and uniform
2-bit on the same matrix for comparison.

    python -m benchmarks.aq_encoding --rounds 3 --beam 4 --json
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np

from benchmarks.common import machine, write_result


def encoding_problem(out: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark's ``W [out, k]`` (Gaussian, std 0.02) and PSD ``XᵀX [k, k]``.

    ``X`` has 8192 rows with uneven column scales (uniform in [0.2, 3]) plus a shared
    rank-64 component, so ``XᵀX`` is far from a multiple of the identity, as real layer
    inputs are.
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((out, k)) * 0.02).astype(np.float32)
    colscale = rng.uniform(0.2, 3.0, k).astype(np.float32)
    V = rng.standard_normal((64, k)).astype(np.float32) * 0.5
    acc = jax.jit(lambda H, x: H + x.T @ x)
    H = jnp.zeros((k, k), jnp.float32)
    for _ in range(8):
        z = rng.standard_normal((1024, k)).astype(np.float32) * colscale + rng.standard_normal((1024, 64)).astype(np.float32) @ V
        H = acc(H, jnp.asarray(z))
    return W, np.asarray(H)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--adam-steps", type=int, default=20)
    ap.add_argument("--out", type=int, default=512)
    ap.add_argument("--k", type=int, default=4608)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from jaxquant.quant import additive as aq
    from jaxquant.quant.uniform import WeightQuantConfig, quantize_weight

    print(machine())
    out, K = args.out, args.k
    W, H = encoding_problem(out, K)
    settings = dict(beam_size=args.beam, max_iters=args.rounds, adam_steps=args.adam_steps, lr=3e-2, tol=0.01)
    results = {}
    cores = os.cpu_count() or 1
    for g in (8, 9):
        t0 = time.perf_counter()
        if g == 8:
            kernel = W.T
            qw, hist = aq.quantize_matrix(W, H, 2, 8, 8, key=0, **settings)
        else:
            kernel = W.T.reshape(3, 3, K // 9, out)  # a 3×3 conv: one vector per input channel's kernel
            qw, hist = aq.quantize_kernel(kernel, H, 2, 8, 9, key=0, **settings)
        jax.block_until_ready(qw.codes)
        wall = time.perf_counter() - t0
        stored = sum(int(a.size) * a.dtype.itemsize * 8 for a in (qw.codes, qw.codebooks, qw.scales)) / (out * K)
        r = dict(wall_s=wall, weights_per_s=out * K / wall, weights_per_s_per_core=out * K / wall / cores,
                 rel_error=aq.relative_error(qw, kernel, H), init_error=hist[0]["objective"],
                 bits_per_weight=stored, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        results[f"2x8 g{g}"] = r
        print(f"AQ 2x8 g{g}: {wall:.1f} s, {r['weights_per_s']:.0f} weights/s ({r['weights_per_s_per_core']:.0f} per core), "
              f"error {r['init_error']:.4f} -> {r['rel_error']:.4f}, {stored:.3f} bits/weight, peak RSS {r['peak_rss_mb']:.0f} MiB")
    for gs in (None, 128):
        uw = quantize_weight(W.T, WeightQuantConfig(bits=2, group_size=gs))
        e = aq.relative_error(uw, W.T, H)
        results[f"uniform 2b g{gs or 'channel'}"] = {"rel_error": e}
        print(f"uniform 2-bit ({'per channel' if gs is None else f'groups of {gs}'}): error {e:.4f}")
    if args.json:
        print(f"wrote {write_result('aq_encoding', {'settings': settings, 'results': results})}")


if __name__ == "__main__":
    main()
