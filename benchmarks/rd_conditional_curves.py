"""How much of a conditional weight curve is signal: stored curves side by side.

Reads the single-site curves of a directory (``rd-curves-gG``) and each set of weight
curves measured given an activation plan under it (``given-acts-*``, made by
``--rd-conditional-weights``), and prints per candidate width, summed over the weight
sites and the timestep groups (normalised MSE):

* the single-site points (each weight alone on the float network);
* the conditional points, and the share of them below zero;
* the largest conditional point in magnitude at the top width, where a weight alone
  changes the output least: a floor that the allocation cannot tell from signal.

    python -m benchmarks.rd_conditional_curves --curves runs/quality/ddpm-fmnist/rd-curves-g10 --json

No model is run; reading the curves takes a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxquant.search.rd import RDCurves, load_curves


def weight_points(curves: RDCurves) -> tuple[tuple[int, ...], dict[str, np.ndarray]]:
    """``(bits, {site key: [M] normalised MSE summed over groups})`` of the weight curves."""
    out, bits = {}, None
    for c in curves.of_kind("weight"):
        if bits is not None and c.bits != bits:
            raise SystemExit(f"{c.site.key}: candidate widths {c.bits} differ from {bits}")
        bits = c.bits
        out[c.site.key] = curves.distortion(c.site.key, "mse").sum(axis=0)
    if bits is None:
        raise SystemExit("the curves hold no weight site")
    return bits, out


def compare(alone: RDCurves, given: RDCurves) -> dict:
    """Per width: summed single-site and conditional points, negative share, top-width floor."""
    bits, a = weight_points(alone)
    gbits, g = weight_points(given)
    if gbits != bits:
        raise SystemExit(f"the conditional curves' widths {gbits} differ from the single-site ones' {bits}")
    keys = [k for k in g if k in a]
    A = np.stack([a[k] for k in keys])
    G = np.stack([g[k] for k in keys])
    return {"bits": list(bits), "sites": len(keys), "reference": given.settings.get("config", ""),
            "alone_sum": A.sum(axis=0).tolist(), "given_sum": G.sum(axis=0).tolist(),
            "given_negative_share": (G < 0).mean(axis=0).tolist(),
            "top_width_alone_max": float(np.abs(A[:, -1]).max()),
            "top_width_given_max": float(np.abs(G[:, -1]).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--curves", required=True, help="single-site curves directory (holding given-acts-* ones)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/rd_conditional_curves_MODEL.json")
    args = ap.parse_args()
    root = Path(args.curves)
    alone = load_curves(root)
    subs = sorted(p for p in root.glob("given-acts-*") if (p / "curves.json").exists())
    if not subs:
        raise SystemExit(f"no conditional curves (given-acts-*) under '{root}'; make them with "
                         "jaxquant quantize --method rd --rd-conditional-weights")
    result = {"curves": str(root), "given": {}}
    for sub in subs:
        r = compare(alone, load_curves(sub))
        result["given"][sub.name] = r
        print(f"\n{sub.name}: {r['sites']} weight sites, normalised MSE summed over sites and groups")
        print(f"{'bits':>4s} {'alone':>10s} {'given':>10s} {'given < 0':>10s}")
        for j, b in enumerate(r["bits"]):
            print(f"{b:4d} {r['alone_sum'][j]:10.3e} {r['given_sum'][j]:10.3e} {r['given_negative_share'][j]:10.2f}")
        print(f"largest single point at {r['bits'][-1]} bits: alone {r['top_width_alone_max']:.2e}, "
              f"given {r['top_width_given_max']:.2e}")
    if args.json:
        from benchmarks.common import write_result

        model = root.parent.name
        print(f"wrote {write_result('rd_conditional_curves_' + model, result)}")


if __name__ == "__main__":
    main()
