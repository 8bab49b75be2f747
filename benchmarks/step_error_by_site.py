"""Which quantizers make a quantized model's one-step error? Drop them and see.

:mod:`benchmarks.sample_drift` answers "where" from whole trajectories, at about five
minutes per row for 2 000 samples. This script answers it for one denoiser call in a
minute for many rows: on the calibration inputs of every step (a calibration directory,
best one recorded from the quantized model's own trajectories), the quantized model's
noise prediction is compared with its float source's,
``Σ‖ε̂ − ε‖² / Σ‖ε‖²`` summed over the step's inputs, once as stored and once per
pattern with

* ``--float-acts-at REGEX ...``: the activation quantizers whose dotted path matches
  dropped (:func:`benchmarks.sample_drift._without_act_quant`), or
* ``--float-weights-at REGEX ...``: the float kernels of ``--float-source`` put back
  into the matching layers (:func:`benchmarks.sample_drift.with_float_weights`).

The table gives the error averaged over bands of timesteps (``--bands``, the lower
edges, default 500, 150 and 25: ``t ≥ 500``, ``150 ≤ t < 500``, ``25 ≤ t < 150`` and
``t < 25``, which with DDIM-20 is the last step alone); the JSON result keeps every step. The prediction compared is the guided one at the calibration's
guidance scale, with its labels, as calibration recorded it.

    python -m benchmarks.step_error_by_site \\
        --quantized runs/quality/ddpm-fmnist/aq-w4a8-...-nq256 \\
        --float-source runs/quality/ddpm-fmnist/smoothed-sm50fr \\
        --calib runs/quality/ddpm-fmnist/aq-w4a8-...-rec300-calib-n256 \\
        --float-acts-at . conv_shortcut '^up_blocks\\.3\\.' --json --tag w4
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import machine, write_result
from benchmarks.sample_drift import _without_act_quant, count_act_quant, with_float_weights


def band_names(edges: list[int]) -> list[str]:
    """``[500, 150]`` → ``["t >= 500", "150 <= t < 500", "t < 150"]``."""
    edges = sorted(edges, reverse=True)
    names = [f"t >= {edges[0]}"] + [f"{lo} <= t < {hi}" for hi, lo in zip(edges, edges[1:])]
    return names + [f"t < {edges[-1]}"]


def band_means(timesteps: np.ndarray, errors: np.ndarray, edges: list[int]) -> list[float]:
    """The mean of ``errors`` over the steps in each band of :func:`band_names` (nan if none)."""
    edges = sorted(edges, reverse=True)
    bounds = [(edges[0], np.inf)] + list(zip(edges[1:], edges)) + [(-np.inf, edges[-1])]
    return [float(errors[(timesteps >= lo) & (timesteps < hi)].mean()) if np.any((timesteps >= lo) & (timesteps < hi))
            else float("nan") for lo, hi in bounds]


def step_errors(model, params, float_model, calib, num: int, batch_size: int = 64) -> np.ndarray:
    """The relative one-step error ``Σ‖ε̂ − ε‖² / Σ‖ε‖²`` of ``model`` with ``params`` against
    ``float_model`` at each calibration step, on the step's first ``num`` inputs (the
    guided prediction at the calibration's guidance scale, its labels for a conditional
    model)."""
    import jax
    import jax.numpy as jnp

    from jaxquant.calib.calibration import _model_fns, trajectory_labels
    from jaxquant.quant.activation import at_timesteps

    T = model.schedule.num_train_timesteps

    def fn(m, p):
        eps_fn, _ = _model_fns(m, calib.config.cfg_scale)
        return jax.jit(lambda x, t, y: eps_fn(at_timesteps(p, t, T), x, t, y))

    f_q, f_f = fn(model, params), fn(float_model, float_model.params)
    labels = trajectory_labels(calib)
    out = []
    for s in range(calib.inputs.shape[0]):
        num_sq = den_sq = 0.0
        for start in range(0, num, batch_size):
            x = jnp.asarray(np.asarray(calib.inputs[s, start:min(num, start + batch_size)], np.float32))
            t = jnp.full((x.shape[0],), int(calib.timesteps[s]), jnp.int32)
            y = jnp.asarray(labels[start:start + x.shape[0]], jnp.int32)
            e_q, e_f = np.asarray(f_q(x, t, y), np.float64), np.asarray(f_f(x, t, y), np.float64)
            num_sq += float(np.sum((e_q - e_f) ** 2))
            den_sq += float(np.sum(e_f ** 2))
        out.append(num_sq / den_sq)
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantized", required=True, help="the quantized model directory")
    ap.add_argument("--float-source", required=True,
                    help="the float model it was made from (a smoothed model's smoothed source)")
    ap.add_argument("--calib", required=True, help="a calibration directory whose inputs are compared on")
    ap.add_argument("--num", type=int, default=48, help="inputs per step")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--float-acts-at", nargs="+", metavar="REGEX",
                       help="one row per pattern: the matching activation quantizers dropped")
    group.add_argument("--float-weights-at", nargs="+", metavar="REGEX",
                       help="one row per pattern: --float-source's kernels in the matching layers")
    ap.add_argument("--bands", type=int, nargs="+", default=[500, 150, 25],
                    help="lower edges of the timestep bands (the default's last band is DDIM's final step, t = 0, "
                    "whose error the sampler scales by about 0.01)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/step_error_by_site_MODEL[_TAG].json")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    import jaxquant
    from jaxquant.calib.calibration import load_calibration

    q, f = jaxquant.load(args.quantized), jaxquant.load(args.float_source)
    calib = load_calibration(args.calib)
    num = min(args.num, calib.inputs.shape[1])
    ts = np.asarray(calib.timesteps, np.int64)
    variants: list[tuple[str, dict, int]] = [("as stored", q.params, 0)]
    for pat in args.float_acts_at or []:
        p = _without_act_quant(q.params, pat)
        variants.append((f"float acts at {pat}", p, count_act_quant(q.params) - count_act_quant(p)))
    for pat in args.float_weights_at or []:
        p, n = with_float_weights(q.params, f.params, pat)
        variants.append((f"float weights at {pat}", p, n))
    names = band_names(args.bands)
    result = {"quantized": args.quantized, "float_source": args.float_source, "calib": args.calib, "num": num,
              "timesteps": ts.tolist(), "bands": names, "machine": machine(), "rows": {}}
    print(f"{'variant':60s} {'count':>5s} " + " ".join(f"{n:>15s}" for n in names), flush=True)
    for name, params, count in variants:
        errs = step_errors(q, params, f, calib, num)
        bands = band_means(ts, errs, args.bands)
        result["rows"][name] = {"count": count, "per_step": errs.tolist(), "bands": bands}
        print(f"{name:60s} {count:5d} " + " ".join(f"{b:15.3e}" for b in bands), flush=True)
    if args.json:
        tag = f"_{args.tag}" if args.tag else ""
        print(f"wrote {write_result('step_error_by_site_' + args.quantized.rstrip('/').split('/')[-1] + tag, result)}")


if __name__ == "__main__":
    main()
