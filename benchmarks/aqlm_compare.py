"""``quantize_matrix`` vs the reference AQLM quantizer on the same matrices and XᵀX.

Both sides quantize the same ``W [out, k]`` with the same ``XᵀX`` (the problem of
``benchmarks.aq_encoding``) at the same configuration: ``M`` codebooks of ``2**B``
entries, ``g`` consecutive input columns per vector, one scale per output row, codebook
values in 16 bits, the same beam size. Reported per side: the relative weighted error
``tr(ΔW·XᵀX·ΔWᵀ) / tr(W·XᵀX·Wᵀ)`` (computed here, in float64, by one function for both),
wall time, stored bits per weight by each side's own accounting, and the error after
every code-search round with its time, so the two can also be compared at equal time.

The reference is the layer-wise path of AQLM (``AQEngine.quantize`` from
github.com/Vahe1994/AQLM): it is not on PyPI (the ``aqlm`` package holds only inference
kernels) and nothing is downloaded here, so point ``--aqlm-src`` (or ``$AQLM_SRC``) at a
checkout. Its settings default to those of AQLM's README (Adam lr 1e-4, 100 steps per
epoch, relative tolerance 0.01, k-means 100 iterations); ours to ``quantize_matrix``'s
defaults. Both sides use all cores (torch threads = ``os.cpu_count()``).

    python -m benchmarks.aqlm_compare --aqlm-src ~/src/AQLM --out 256 --k 2304 --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

from benchmarks.aq_encoding import encoding_problem
from benchmarks.common import machine, write_result


def weighted_error(w_hat: np.ndarray, w: np.ndarray, h: np.ndarray) -> float:
    """``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` in float64, ``W`` and ``Ŵ`` as ``[out, k]``."""
    w = np.asarray(w, np.float64)
    d = np.asarray(w_hat, np.float64) - w
    h = np.asarray(h, np.float64)
    return float(np.einsum("ij,jk,ik->", d, h, d) / np.einsum("ij,jk,ik->", w, h, w))


def run_aqlm(src: Path, W: np.ndarray, H: np.ndarray, args: argparse.Namespace) -> dict:
    """Quantize with the reference ``AQEngine``; error after each epoch's beam search."""
    import torch

    if not (src / "aq_engine.py").is_file():
        raise SystemExit(f"{src} has no aq_engine.py: --aqlm-src must be a checkout of github.com/Vahe1994/AQLM")
    sys.path.insert(0, str(src))
    from aq_engine import AQEngine

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)  # AQEngine draws its beam-search shuffling seeds from `random`
    out, k = W.shape
    layer = torch.nn.Linear(k, out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(W))
    engine = AQEngine(layer)
    engine.XTX = torch.from_numpy(H.astype(np.float64) / H.shape[0])  # AQLM keeps XᵀX / n; the scale is irrelevant
    settings = Namespace(
        devices=[torch.device("cpu")], num_codebooks=args.codebooks, nbits_per_codebook=args.nbits,
        in_group_size=args.group, out_group_size=1, codebook_value_nbits=16, codebook_value_num_groups=1,
        scale_nbits=0, init_max_iter=args.aqlm_init_iters, init_max_points_per_centroid=None, lr=args.aqlm_lr,
        beam_size=args.beam, max_epochs=args.aqlm_epochs, steps_per_epoch=args.aqlm_steps,
        relative_mse_tolerance=args.tol, print_frequency=10 ** 9)
    history: list[dict] = []
    search = engine.beam_search_update_codes_
    t0 = time.perf_counter()

    def recorded_search(*a, **kw):
        with contextlib.redirect_stderr(io.StringIO()):  # AQLM's per-slot progress bars (one line per slot)
            result = search(*a, **kw)
        with torch.no_grad():
            w_hat = engine.quantized_weight().double().numpy()
        history.append({"round": len(history) + 1, "seconds": time.perf_counter() - t0,
                        "error": weighted_error(w_hat, W, H)})
        print(f"  AQLM epoch {len(history)}: error {history[-1]['error']:.5f} at {history[-1]['seconds']:.1f} s", flush=True)
        return result

    engine.beam_search_update_codes_ = recorded_search
    qw = engine.quantize(args=settings, verbose=False)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        w_hat = qw().double().numpy()
    return {"seconds": wall, "error": weighted_error(w_hat, W, H), "bits_per_weight": qw.estimate_nbits_per_parameter(),
            "settings": {k: v for k, v in vars(settings).items() if k != "devices"}, "history": history}


def run_ours(W: np.ndarray, H: np.ndarray, args: argparse.Namespace) -> dict:
    """Quantize with ``quantize_matrix`` (compile time included); error after each beam round."""
    import jax

    from jaxquant.quant import additive as aq

    settings = dict(beam_size=args.beam, max_iters=args.rounds, adam_steps=args.adam_steps, tol=args.tol)
    t0 = time.perf_counter()
    qw, hist = aq.quantize_matrix(W, H, args.codebooks, args.nbits, args.group, key=args.seed, **settings)
    jax.block_until_ready(qw.codes)
    wall = time.perf_counter() - t0
    w_hat = np.asarray(qw.dequantize(), np.float64).T  # dequantize() gives the [k, out] kernel
    stored = sum(int(a.size) * a.dtype.itemsize * 8 for a in (qw.codes, qw.codebooks, qw.scales)) / W.size
    history = [{"round": r["round"], "seconds": r["seconds"], "error": r["objective"]}
               for r in hist if r["phase"] == "beam"]
    for r in history:
        print(f"  jaxquant round {r['round']}: error {r['error']:.5f} at {r['seconds']:.1f} s", flush=True)
    return {"seconds": wall, "error": weighted_error(w_hat, W, H), "bits_per_weight": stored,
            "settings": settings, "history": history}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aqlm-src", type=Path, default=os.environ.get("AQLM_SRC"),
                    help="checkout of github.com/Vahe1994/AQLM (default: $AQLM_SRC)")
    ap.add_argument("--out", type=int, default=512)
    ap.add_argument("--k", type=int, default=4608)
    ap.add_argument("--codebooks", type=int, default=2)
    ap.add_argument("--nbits", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--beam", type=int, default=4)
    ap.add_argument("--tol", type=float, default=0.01, help="relative-improvement stopping tolerance (both sides)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=5, help="ours: at most this many (Adam, beam search) rounds")
    ap.add_argument("--adam-steps", type=int, default=20, help="ours: Adam steps per round")
    ap.add_argument("--aqlm-epochs", type=int, default=100, help="AQLM: at most this many epochs")
    ap.add_argument("--aqlm-steps", type=int, default=100, help="AQLM: Adam steps per epoch")
    ap.add_argument("--aqlm-lr", type=float, default=1e-4)
    ap.add_argument("--aqlm-init-iters", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.aqlm_src is None:
        raise SystemExit("give --aqlm-src (or set $AQLM_SRC) to a checkout of github.com/Vahe1994/AQLM")

    print(machine())
    W, H = encoding_problem(args.out, args.k, seed=args.seed)
    config = f"{args.codebooks}x{args.nbits} g{args.group}, beam {args.beam}, W {args.out}x{args.k}"
    print(f"{config}: jaxquant.quantize_matrix", flush=True)
    ours = run_ours(W, H, args)
    print(f"{config}: reference AQLM AQEngine.quantize", flush=True)
    ref = run_aqlm(args.aqlm_src.expanduser(), W, H, args)
    print(f"\n{'':10s} {'error':>8s} {'seconds':>8s} {'bits/w':>7s} {'rounds':>6s}")
    for name, r in (("jaxquant", ours), ("AQLM", ref)):
        print(f"{name:10s} {r['error']:8.5f} {r['seconds']:8.1f} {r['bits_per_weight']:7.3f} {len(r['history']):6d}")
    better = [h for h in ref["history"] if h["error"] <= ours["error"]]
    reach = f"{better[0]['seconds']:.1f} s" if better else "never (within its run)"
    print(f"time ratio AQLM/jaxquant: {ref['seconds'] / ours['seconds']:.2f}x; "
          f"error ratio AQLM/jaxquant: {ref['error'] / ours['error']:.3f}; AQLM reaches jaxquant's error at: {reach}")
    if args.json:
        path = write_result("aqlm_compare", {"config": config, "jaxquant": ours, "aqlm": ref,
                                             "aqlm_reaches_ours_at_s": better[0]["seconds"] if better else None})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
