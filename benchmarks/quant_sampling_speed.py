"""Sampling time of quantized models vs the float model, measured side by side.

Loads the float model and every given quantized model directory (e.g. the ones
``benchmarks.quality_table`` wrote under ``runs/quality/MODEL/``), compiles the jitted
DDIM sampling function of each (the plain-XLA path: packed or fake-quantized weights are
dequantized inside the jitted forward, activations fake-quantized per timestep group),
then times one batch per model in interleaved rounds, so load that drifts during the run
hits every model alike. Prints seconds per batch (median), images/s and the ratio to the
float model; ``--json`` writes ``benchmarks/results/quant_sampling_speed_MODEL.json``.

    python -m benchmarks.quant_sampling_speed --model ddpm-fmnist \\
        --quantized runs/quality/ddpm-fmnist/uniform-w8a8 runs/quality/ddpm-fmnist/uniform-w4a8
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from benchmarks.common import machine, time_interleaved, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ddpm-fmnist", help="the float model (directory or shipped name)")
    ap.add_argument("--quantized", nargs="+", required=True, help="quantized model directories")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import jaxquant
    from benchmarks.quality_table import batch_sampler
    from jaxquant.quant.accounting import storage_report

    print(machine())
    models = {"fp": jaxquant.load(args.model)}
    for q in args.quantized:
        models[Path(q).name] = jaxquant.load(q)
    sides, info = {}, {}
    for name, m in models.items():
        sides[name] = batch_sampler(m, args.steps, args.batch, args.cfg_scale, seed=0)
        rep = storage_report(m.params)
        info[name] = {"bytes": rep.total_bytes, "bits_per_weight": rep.bits_per_weight}
    times = time_interleaved(sides, args.repeats)
    fp = statistics.median(times["fp"])
    print(f"DDIM-{args.steps}, batch {args.batch}, {args.repeats} interleaved rounds (median)")
    print(f"{'model':24s} {'bytes':>12s} {'bits/w':>7s} {'s/batch':>8s} {'img/s':>7s} {'time vs fp':>10s}")
    rows = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {**info[name], "seconds_per_batch": med, "times": ts, "images_per_s": args.batch / med,
                      "time_ratio_to_fp": med / fp}
        print(f"{name:24s} {info[name]['bytes']:12,d} {info[name]['bits_per_weight']:7.2f} {med:8.2f} "
              f"{args.batch / med:7.2f} {med / fp:9.2f}x")
    if args.json:
        tag = Path(args.model).name
        path = write_result(f"quant_sampling_speed_{tag}", {"model": args.model, "steps": args.steps,
                                                             "batch": args.batch, "repeats": args.repeats,
                                                             "models": rows})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
