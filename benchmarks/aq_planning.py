"""AQ layer planning by number of weights vs by measured sensitivity, at one bit budget.

For a pixel-space model and its calibration (with ``XᵀX``):

1. measures every AQ layer's sensitivity ``s`` (output distortion per unit of relative
   weight error, :func:`jaxquant.search.rd.weight_sensitivity`);
2. plans the layers' ``M×B gG`` to ``--w-bits`` average stored bits twice: every weight
   alike (``count``, ``--aq-weighting count``) and by ``s`` (``sensitivity``, the default
   of ``jaxquant quantize --method aq``);
3. quantizes both plans (no block fine-tuning, float activations: the plans alone) with
   the same keys, and measures the relative error ``‖ε̂ − ε‖² / ‖ε‖²`` of the network
   output against the float model on Fashion-MNIST test images noised to each of
   ``--timesteps`` with the model's own schedule.

Prints the sensitivity spread, both plans' predicted objective ``Σ s·d``, and the
measured errors; ``--json`` writes ``benchmarks/results/aq_planning_MODEL_wB.json``.
Everything is resumable under ``--work`` (curves, quantized layers).

    python -m benchmarks.aq_planning --model ddpm-fmnist --calib runs/quality/ddpm-fmnist/calib-g1 --w-bits 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ddpm-fmnist")
    ap.add_argument("--calib", required=True, help="calibration directory with XᵀX (jaxquant calibrate)")
    ap.add_argument("--w-bits", type=float, default=2.0, help="average stored bits per quantized weight")
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--timesteps", type=int, nargs="+", default=[999, 500, 250, 50, 5])
    ap.add_argument("--images", type=int, default=32, help="noised test images per timestep")
    ap.add_argument("--work", default=None, help="curves and quantized layers (default runs/aq_planning/MODEL)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import jaxquant
    from jaxquant.calib.calibration import load_calibration
    from jaxquant.data.fmnist import load_fashion_mnist
    from jaxquant.diffusion.schedules import alphas_cumprod
    from jaxquant.quant.aq_model import plan_bits, proxy_distortion, quantize_aq, resolve_aq_rules
    from jaxquant.quant.rules import layer_kernels
    from jaxquant.search.rd import weight_sensitivity

    print(machine())
    model = jaxquant.load(args.model)
    if model.is_class_conditional or hasattr(model.module, "encode"):
        raise SystemExit("aq_planning measures pixel-space unconditional models (noised test images)")
    calib = load_calibration(args.calib)
    work = Path(args.work or f"runs/aq_planning/{Path(args.model).name}")
    kernels = layer_kernels(model.params)
    names, _ = resolve_aq_rules(kernels, None)

    t0 = time.perf_counter()
    sens = weight_sensitivity(model, calib, names, out_dir=work / "sensitivity")
    t_sens = time.perf_counter() - t0
    per_weight = {n: s / np.prod(np.shape(kernels[n])) for n, s in sens.items()}
    order = sorted(per_weight, key=per_weight.get)
    print(f"sensitivity per weight s/N: {per_weight[order[0]]:.2e} ({order[0]}) .. "
          f"{per_weight[order[-1]]:.2e} ({order[-1]}), measured in {t_sens:.0f} s")

    x0, _ = load_fashion_mnist("test")
    x0 = x0[:args.images]
    ac = np.asarray(alphas_cumprod(model.schedule), np.float64)
    rng = np.random.default_rng(0)
    inputs = []
    for t in args.timesteps:
        noise = rng.standard_normal(x0.shape).astype(np.float32)
        xt = (np.sqrt(ac[t]) * x0 + np.sqrt(1 - ac[t]) * noise).astype(np.float32)
        inputs.append((jnp.asarray(xt), jnp.full((len(xt),), t, jnp.int32)))
    fwd = jax.jit(lambda p, x, t: model.module.apply({"params": p}, x, t))
    refs = [np.asarray(fwd(model.params, x, t), np.float64) for x, t in inputs]

    def output_errors(params) -> list[float]:
        return [float(np.sum((np.asarray(fwd(params, x, t), np.float64) - r) ** 2) / np.sum(r ** 2))
                for (x, t), r in zip(inputs, refs)]

    rows = {}
    for weighting in ("count", "sensitivity"):
        t0 = time.perf_counter()
        res = quantize_aq(model, calib, args.w_bits, None, beam_size=args.beam,
                          layer_weighting="count" if weighting == "count" else sens,
                          min_code_bits=0.0,  # the two weightings alone (quantize_aq's floor is 1 by default)
                          progress_dir=work / f"{weighting}-w{args.w_bits:g}")
        secs = time.perf_counter() - t0
        rows[weighting] = {
            "bits_per_weight": plan_bits(kernels, res.plan),
            "predicted": float(sum(sens[n] * proxy_distortion(c, np.shape(kernels[n])) for n, c in res.plan.items())),
            "output_error": dict(zip(map(str, args.timesteps), output_errors(res.params))),
            "plan": {n: c.describe() for n, c in res.plan.items()},
            "layer_bits": {r["name"]: r["bits_per_weight"] for r in res.layers},
            "quantize_s": round(secs, 1)}

    head = "| planning | bits/w | predicted Σ s·d | " + " | ".join(f"t={t}" for t in args.timesteps) + " |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    for w, r in rows.items():
        print(f"| {w} | {r['bits_per_weight']:.3f} | {r['predicted']:.2e} | "
              + " | ".join(f"{v:.2e}" for v in r["output_error"].values()) + " |")
    print("most / least sensitive layers per weight, stored bits per weight (count -> sensitivity):")
    for n in order[::-1][:5] + order[:5]:
        print(f"  {n:45s} s/N {per_weight[n]:.2e}  {rows['count']['layer_bits'][n]:.2f} -> "
              f"{rows['sensitivity']['layer_bits'][n]:.2f}")
    if args.json:
        write_result(f"aq_planning_{Path(args.model).name}_w{args.w_bits:g}", {
            "model": args.model, "calib": args.calib, "w_bits": args.w_bits,
            "beam": args.beam, "timesteps": args.timesteps, "images": args.images,
            "sensitivity": sens, "sensitivity_s": round(t_sens, 1), "rows": rows})


if __name__ == "__main__":
    main()
