"""How much does FID move when only the weights change, under fixed activation quantizers?

At W4A4 on ``ddpm-fmnist`` the RD weight plan loses to uniform 4-bit weights by FID
(BENCHMARKS.md), although its weights alone are 9x closer to the float model's samples.
This script asks whether FID at that activation width still ranks weight plans at all: it
keeps one set of activation quantizers (every site at ``--a-bits``, ranges per timestep
group from the quality table's calibration, exactly the quantizers of
``uniform-w4a4-g10`` and ``rd-w4a4-g10``) and varies only the weights:

* ``float``: float weights (no weight error at all);
* ``uniform``: every layer at ``--w-bits`` (the ``uniform-wWaA-gG`` row's model);
* ``rd``: the RD plan's widths (``--rd-plan``; the ``rd-w4a4-g10`` row's model);
* ``uniform+rd-top``: uniform, but the layers the RD plan keeps at its widest width get
  that width (strictly more bits than ``uniform`` in every layer);
* ``rd-floor``: the RD plan with every layer raised to at least ``--w-bits`` (strictly
  more bits than ``rd``).

If FID were a monotone function of weight precision at this activation width, ``float``
would be best and the two "more bits" variants would beat the plans they extend. The
models are quantized with the library's own code (``quantize_weight``,
``attach_act_quantizers``; first and last layer float), sampled with the quality table's
seed and batch size, and evaluated as its rows are. Samples are kept under ``--work`` and
reused, so a killed run resumes.

    python -m benchmarks.fixed_act_weights --model ddpm-fmnist --num 10000 \\
        --variants float uniform+rd-top
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = ("float", "uniform", "rd", "uniform+rd-top", "rd-floor")


def variant_widths(variant: str, layers: dict, rd_plan: dict[str, int], w_bits: int) -> dict:
    """``{layer: bits or None}`` of a variant; ``layers`` maps every weight layer to its
    default plan entry (``None``: kept float, as the first and last layer)."""
    top = max(rd_plan.values()) if rd_plan else w_bits
    out = {}
    for name, cfg in layers.items():
        if cfg is None or variant == "float":
            out[name] = None
        elif variant == "uniform":
            out[name] = w_bits
        elif variant == "rd":
            out[name] = rd_plan[name]
        elif variant == "uniform+rd-top":
            out[name] = top if rd_plan[name] == top else w_bits
        elif variant == "rd-floor":
            out[name] = max(rd_plan[name], w_bits)
        else:
            raise ValueError(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    return out


def build(model, calib, layers: dict, widths: dict, a_bits: int) -> dict:
    """The parameter tree with weights at ``widths`` and every activation at ``a_bits``.

    The activation quantizers sit at the inputs of the layers the default plan
    (``layers``) quantizes, whatever ``widths`` says, so every variant has the same ones."""
    from jaxquant.quant.quantize import ActQuantConfig, attach_act_quantizers
    from jaxquant.quant.rules import apply_plan
    from jaxquant.quant.uniform import WeightQuantConfig, quantize_weight

    plan = {n: (None if b is None else WeightQuantConfig(b)) for n, b in widths.items()}
    params = apply_plan(model.params, plan, lambda n, k, c: quantize_weight(k, c)) if any(plan.values()) else model.params
    act_plan = {n: (None if c is None else True) for n, c in layers.items()}
    return attach_act_quantizers(model, calib, params, act_plan, ActQuantConfig(a_bits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ddpm-fmnist")
    ap.add_argument("--w-bits", type=int, default=4)
    ap.add_argument("--a-bits", type=int, default=4)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--calib", default=None, help="default: runs/quality/MODEL/calib-gG (the quality table's)")
    ap.add_argument("--rd-plan", default=None, help="default: runs/quality/MODEL/rd-wWaA-gG.rd/plan.json")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--num", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref", default="fashion-mnist-test")
    ap.add_argument("--features", default="fmnist")
    ap.add_argument("--work", default=None, help="samples and models (default runs/quality/MODEL/fixed-acts)")
    args = ap.parse_args()

    import jaxquant
    from benchmarks.common import machine, write_result
    from jaxquant.calib.calibration import load_calibration
    from jaxquant.diffusion.pipeline import generate
    from jaxquant.eval.evaluate import evaluate
    from jaxquant.images import save_samples_npz
    from jaxquant.quant.accounting import storage_report
    from jaxquant.quant.rules import default_rules, layer_kernels, resolve
    from jaxquant.quant.uniform import WeightQuantConfig

    tag = Path(args.model).name
    base = Path("runs/quality") / tag
    calib_dir = Path(args.calib or base / f"calib-g{args.groups}")
    plan_path = Path(args.rd_plan or base / f"rd-w{args.w_bits}a{args.a_bits}-g{args.groups}.rd" / "plan.json")
    work = Path(args.work or base / "fixed-acts")
    work.mkdir(parents=True, exist_ok=True)
    model = jaxquant.load(args.model)
    calib = load_calibration(calib_dir)
    rd_plan = json.loads(plan_path.read_text())["weight_bits"]
    layers = resolve(layer_kernels(model.params), default_rules(WeightQuantConfig(args.w_bits)))

    name = f"fixed_act_weights_{tag}_a{args.a_bits}"
    out = Path(__file__).resolve().parent / "results" / f"{name}.json"
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update({"model": args.model, "w_bits": args.w_bits, "a_bits": args.a_bits, "groups": args.groups,
                   "calib": str(calib_dir), "rd_plan": str(plan_path), "num": args.num, "steps": args.steps,
                   "seed": args.seed, "batch": args.batch, "features": args.features,
                   "date": time.strftime("%Y-%m-%d"), "machine": machine()})
    rows = result.setdefault("variants", {})
    for v in args.variants:
        t0 = time.time()
        widths = variant_widths(v, layers, rd_plan, args.w_bits)
        params = build(model, calib, layers, widths, args.a_bits)
        qmodel = jaxquant.Model(model.meta, params, model.path)
        npz = work / f"{v}-a{args.a_bits}-g{args.groups}-samples.npz"
        if not npz.is_file():
            imgs = generate(qmodel, args.num, steps=args.steps, seed=args.seed, batch_size=args.batch)
            save_samples_npz(imgs, npz, None)
        metrics = evaluate(str(npz), args.ref, args.features, progress=False)
        rep = storage_report(params)
        bits = [b for b in widths.values() if b is not None]
        rows[v] = {"weight_bits_histogram": {str(b): bits.count(b) for b in sorted(set(bits))},
                   "total_bytes": rep.total_bytes, "bits_per_quantized_weight": rep.bits_per_quantized_weight,
                   "metrics": metrics, "seconds": round(time.time() - t0, 1)}
        m = metrics
        print(f"{v:16s} {rep.total_bytes:>11,d} B  FID {m['fid']:.3f}  sFID {m['sfid']:.3f}  IS {m['inception_score']:.2f}  "
              f"precision {m['precision']:.3f}  recall {m['recall']:.3f}", flush=True)
        write_result(name, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
