"""Do a quantized model's samples lose contrast against the float model's? Pixel tones, paired.

FID against the test set moves more than the FID against the float model's own samples
would predict, and along the float model's own gap to the data (BENCHMARKS, "FID against
the test set follows the FID against FP's own samples"). On Fashion-MNIST that gap is
visible in the pixels: the test images' backgrounds are black, the float model's samples
leave only a quarter of their pixels below 2 % of full scale. This script compares sample
sets drawn from the same noises (``jaxquant sample`` / the quality table's ``*-samples.npz``,
uint8) with a reference set (the float model's samples), pixel by pixel:

* ``dark``: the share of pixels at most ``--dark`` (uint8 levels, default 5 ≈ 2 %);
* ``lift on dark``: the mean change, in uint8 levels, of the pixels the reference has at
  most ``--dark``;
* ``change on bright``: the same for the pixels the reference has at ``--bright`` or above;
* ``rms change``: the root mean square change over all pixels.

A model that lifts the dark pixels and dims the bright ones flattens the contrast.

    python -m benchmarks.sample_tones --ref runs/quality/ddpm-fmnist/fp-samples.npz \\
        runs/quality/ddpm-fmnist/{aq-w4a8-...-nq256,aq-w4a8-...-nq256-fa}-samples.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import write_result


def load_uint8(path: str | Path) -> np.ndarray:
    """The ``arr_0`` (uint8 NHWC) images of an ADM-style sample ``.npz``."""
    with np.load(path) as f:
        x = f["arr_0"] if "arr_0" in f else f[list(f.keys())[0]]
    if x.dtype != np.uint8:
        raise SystemExit(f"{path}: expected uint8 images, found {x.dtype}")
    return x


def tones(x: np.ndarray, ref: np.ndarray, dark: int = 5, bright: int = 50) -> dict:
    """The measures above for images ``x`` against ``ref`` (same noises, same shape)."""
    if x.shape != ref.shape:
        raise SystemExit(f"sample sets differ in shape: {x.shape} against {ref.shape}")
    d = x.astype(np.int32) - ref.astype(np.int32)
    dark_ref, bright_ref = ref <= dark, ref >= bright
    return {"dark": float(np.mean(x <= dark)), "lift_on_dark": float(d[dark_ref].mean()),
            "change_on_bright": float(d[bright_ref].mean()), "rms_change": float(np.sqrt(np.mean(d.astype(np.float64) ** 2)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", nargs="+", help="sample .npz files drawn from the reference's noises")
    ap.add_argument("--ref", required=True, help="the float model's samples (.npz)")
    ap.add_argument("--dark", type=int, default=5, help="uint8 level at or below which a pixel is dark")
    ap.add_argument("--bright", type=int, default=50, help="uint8 level at or above which a pixel is bright")
    ap.add_argument("--json", default=None, metavar="TAG", help="write benchmarks/results/sample_tones_TAG.json")
    args = ap.parse_args()

    ref = load_uint8(args.ref)
    result = {"ref": args.ref, "dark_level": args.dark, "bright_level": args.bright,
              "ref_dark": float(np.mean(ref <= args.dark)), "samples": {}}
    print(f"{'samples':80s} {'dark':>6s} {'lift on dark':>12s} {'on bright':>9s} {'rms':>6s}")
    print(f"{args.ref[-80:]:80s} {result['ref_dark']:6.3f}")
    for path in args.samples:
        r = tones(load_uint8(path), ref, args.dark, args.bright)
        result["samples"][path] = r
        print(f"{path[-80:]:80s} {r['dark']:6.3f} {r['lift_on_dark']:+12.3f} {r['change_on_bright']:+9.3f} "
              f"{r['rms_change']:6.2f}")
    if args.json:
        print(f"wrote {write_result('sample_tones_' + args.json, result)}")


if __name__ == "__main__":
    main()
