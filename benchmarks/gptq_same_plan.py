"""A quantized model's plan with its weights re-rounded by error feedback (GPTQ).

Every uniformly quantized kernel of ``--quantized`` is quantized again from the float
model it came from, at the same bits and form, with ``error_feedback=True`` on the
calibration's ``XᵀX``; activation quantizers, smoothing factors and float layers are
kept. The result has the same size and plan, so ``benchmarks.sample_drift`` on both
separates what the rounding does from what the plan does.

    python -m benchmarks.gptq_same_plan --quantized runs/quality/ddpm-fmnist/rd-w6a6-g10-sm50 \\
        --calib runs/quality/ddpm-fmnist/calib-g10-sm50 --damp 0.01 --out runs/bc/rd-w6a6-g10-sm50-gptqplan
    python -m benchmarks.sample_drift --quantized runs/bc/rd-w6a6-g10-sm50-gptqplan [--float-acts] --num 500
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantized", required=True, help="quantized model directory (uniform or rd)")
    ap.add_argument("--float", default=None, help="its float model (default: the one its config.json names)")
    ap.add_argument("--calib", required=True, help="calibration of the float model, with XᵀX")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from tqdm.auto import tqdm

    import jaxquant
    from jaxquant.calib import load_calibration
    from jaxquant.io.model_dir import save_model_dir
    from jaxquant.quant.quantize import weight_statistics
    from jaxquant.quant.rules import apply_plan, layer_kernels
    from jaxquant.quant.uniform import UniformWeight, WeightQuantConfig, quantize_weight

    q = jaxquant.load(args.quantized)
    source = args.float or q.meta.extra.get("quantized", {}).get("source")
    if not source:
        raise SystemExit(f"{args.quantized} does not name its float model; pass --float")
    f = jaxquant.load(source)
    plan = {n: WeightQuantConfig(bits=k.bits, symmetric=k.symmetric,
                                 group_size=None if k.group_size == k.in_size else k.group_size,
                                 packed=k.packed, error_feedback=True, damp=args.damp)
            for n, k in layer_kernels(q.params).items() if isinstance(k, UniformWeight)}
    if not plan:
        raise SystemExit(f"{args.quantized} holds no uniformly quantized kernel")
    xtx = weight_statistics(load_calibration(args.calib), plan)
    floats = layer_kernels(f.params)
    params = apply_plan(q.params, plan, lambda n, k, c: quantize_weight(floats[n], c, xtx[n]),
                        progress=lambda it: tqdm(it, desc="re-round", unit="layer"))
    meta = q.meta
    meta.extra = {**meta.extra, "gptq_same_plan": {"from": args.quantized, "calibration": args.calib,
                                                   "damp": args.damp}}
    save_model_dir(args.out, meta, params)
    print(f"wrote {args.out}: {len(plan)} kernels re-rounded with error feedback (damping {args.damp})")


if __name__ == "__main__":
    main()
