"""Rate–distortion curves: the vmapped/jitted evaluator vs a per-(site, bit width) loop.

Both compute the same curves (every weight site at 2..8 bits, every activation site at
4..8 bits, on the same calibration inputs of every timestep group) with the same
compiled forward pass; "vmapped" evaluates all candidates of a site in one call (a
``vmap`` over the candidates, sharded over devices when there are several), "loop"
calls it once per (site, bit width) from Python. Quantizing the candidate kernels is
done once beforehand and timed apart (both use it). The two ways run site by site,
alternating which goes first, so that other load on the machine falls on both alike. Models: ddpm-fmnist (the shipped
weights) and the google/ddpm-cifar10-32 configuration (random weights).

    python -m benchmarks.rd_curves_speed                         # both models, all sites
    python -m benchmarks.rd_curves_speed --models fmnist --max-sites 4 --inputs-per-group 2 --groups 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, write_result
from benchmarks.sampling_speed import CIFAR10


def _model(name: str, tmp: Path):
    import jax
    import jax.numpy as jnp

    import jaxquant
    from jaxquant.diffusion import ScheduleConfig
    from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
    from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel

    if name == "fmnist":
        return jaxquant.load("ddpm-fmnist")
    cfg = UNet2DConfig.from_dict(CIFAR10)
    params = UNet2DModel(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))["params"]
    d = save_model_dir(tmp / "cifar10", ModelDirMeta("unet2d", cfg.to_dict(), ScheduleConfig().to_dict()), params)
    return jaxquant.load(d)


def _run(problem, keys) -> tuple[dict, dict]:
    """Both ways, site by site: ``(seconds, curves)`` per way, seconds as ``[first site of
    each kind incl. compiles, the other sites]``.

    The two ways alternate which goes first at every site, so a load that changes during
    the run (another job on the machine) falls on both alike and the ratio stays fair.
    """
    from jaxquant.search import rd

    ways = {"vmapped": None, "loop": 1}  # candidates per call
    secs = {w: [0.0, 0.0] for w in ways}
    curves: dict[str, dict] = {w: {} for w in ways}
    seen: set[str] = set()
    for n, key in enumerate(keys):
        kind = key.partition(":")[0]
        part = 1 if kind in seen else 0
        seen.add(kind)
        for way in (("vmapped", "loop") if n % 2 == 0 else ("loop", "vmapped")):
            t0 = time.perf_counter()
            c = rd.compute_curves(problem, only=[key], progress=False, candidates_per_call=ways[way])
            secs[way][part] += time.perf_counter() - t0
            curves[way].update(c.curves)
    return secs, curves


def bench(name: str, args, tmp: Path) -> dict:
    from jaxquant.calib import CalibConfig, calibrate
    from jaxquant.quant.quantize import ActQuantConfig
    from jaxquant.quant.uniform import WeightQuantConfig
    from jaxquant.search import rd

    model = _model(name, tmp)
    n = max(args.inputs_per_group, 1)
    calib = calibrate(model, CalibConfig(num_samples=n, steps=max(args.groups, 2), groups=args.groups, batch_size=n,
                                         reservoir=1024, xtx=False), progress=False)
    problem = rd.RDProblem(model, calib, WeightQuantConfig(), None if args.weights_only else ActQuantConfig(bits=8),
                           config=rd.CurveConfig(inputs_per_group=n, batch_size=args.batch_size))
    sites = problem.curve_sites
    if args.max_sites:
        w = [s for s in sites if s.kind == "weight"][:args.max_sites]
        a = [s for s in sites if s.kind == "act"][:args.max_sites]
        sites = w + a
    keys = [s.key for s in sites]
    t0 = time.perf_counter()
    for s in sites:  # candidate quantizers, shared by both runs
        for b in problem.candidates(s):
            if s.kind == "weight":
                problem.weight_quant(s.name, b)
            else:
                for g in range(problem.groups):
                    problem.act_params(s, g, b)
    t_quant = time.perf_counter() - t0
    secs, curves = _run(problem, keys)
    (v_first, v_rest), (l_first, l_rest) = secs["vmapped"], secs["loop"]
    v_curves, l_curves = curves["vmapped"], curves["loop"]
    diff = max(float(np.max(np.abs(v_curves[k].err2 - l_curves[k].err2) / np.maximum(np.abs(l_curves[k].err2), 1e-30)))
               for k in keys)
    evals = sum(len(problem.candidates(s)) for s in sites)
    res = {"model": name, "sites": len(sites), "candidate_evaluations": evals, "inputs": int(len(problem.inputs.t)),
           "groups": problem.groups, "quantize_candidates_s": t_quant,
           "vmapped_first_site_s": v_first, "vmapped_rest_s": v_rest, "loop_first_site_s": l_first,
           "loop_rest_s": l_rest, "ratio_total": (l_first + l_rest) / (v_first + v_rest),
           "ratio_after_compile": l_rest / v_rest if v_rest > 0 else None,
           "max_rel_diff": diff}
    print(f"{name}: {len(sites)} sites, {evals} (site, bits) evaluations on {res['inputs']} inputs "
          f"({problem.groups} group(s)); candidate quantization {t_quant:.1f} s")
    print(f"  vmapped: first site of each kind incl. compile {v_first:6.1f} s, other sites {v_rest:6.1f} s")
    print(f"  loop:    first site of each kind incl. compile {l_first:6.1f} s, other sites {l_rest:6.1f} s")
    after = f", {res['ratio_after_compile']:.2f}x after compile" if res["ratio_after_compile"] else ""
    print(f"  ratio loop/vmapped: {res['ratio_total']:.2f}x in total{after}; curves agree to {diff:.1e} (relative)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="fmnist,cifar10", help="comma-separated: fmnist, cifar10")
    ap.add_argument("--inputs-per-group", type=int, default=8, help="calibration inputs per timestep group")
    ap.add_argument("--groups", type=int, default=2, help="timestep groups")
    ap.add_argument("--batch-size", type=int, default=16, help="inputs per call")
    ap.add_argument("--max-sites", type=int, default=0, help="only the first N weight and N activation sites (0: all)")
    ap.add_argument("--weights-only", action="store_true", help="no activation sites")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/rd_curves_speed_<models>.json")
    args = ap.parse_args()

    import jax

    print(machine(), f"{jax.device_count()} device(s)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name not in ("fmnist", "cifar10"):
                raise SystemExit(f"unknown model {name!r} (fmnist, cifar10)")
            results.append(bench(name, args, Path(tmp)))
    if args.json:
        print(f"wrote {write_result('rd_curves_speed_' + args.models.replace(',', '_'), {**vars(args), 'results': results})}")


if __name__ == "__main__":
    main()
