"""Where does the error of 8-bit activations come from? Sample drift with float weights.

Uniform W8A8 costs ``ddpm-fmnist`` about 8 % FID (BENCHMARKS.md), and the 8-bit weights
alone almost nothing. This script takes the float model, quantizes only its activations
(the quality table's quantizers: per-tensor, MSE ranges from ``calib-g1``, first and last
layer float) and switches parts of the error on and off. Every variant samples the same
noise as the float model (DDIM, the quality table's seed and batch size) and is compared
with the float samples as :mod:`benchmarks.sample_drift` does (pixel and feature drift):

* ``A8``: the quantizers as they are;
* ``clipping only``: the same ranges, but a 24-bit step inside them, so only the
  clipping of values outside the range is left;
* ``rounding at t >= T only`` / ``at t < T only``: the 8-bit step at the steps of one
  side of ``--split-t``, clipping only at the other (one quantizer group per DDIM step);
* ``rounding in the full-resolution blocks only`` / ``everywhere else``;
* ``min/max ranges``: the calibration's full ranges, no clipping;
* ``smoothed a=A``: the model smoothed first (:mod:`jaxquant.quant.smooth`), calibrated
  anew and its activations quantized as in ``A8``; with ``a = 1`` every input channel is
  scaled to the same maximum, which with float weights is the same as per-channel ranges;
* ``smoothed a=A, full resolution only``: the same, but only the layers whose input is
  at full resolution are smoothed (``--full-res-alphas``; ``jaxquant smooth --layers
  full-resolution``).

    python -m benchmarks.act_error_sources --model ddpm-fmnist --num 500
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

FINE_BITS = 24  # a step 2^16 times finer than 8 bits: rounding error gone, clipping kept


def _name(path) -> str:
    keys = [str(getattr(k, "key", k)) for k in path]
    return ".".join(keys[:-1]) if keys[-1] == "input_quant" else ".".join(keys[:-1]) + "." + keys[-1][:-len("_quant")]


def per_step_variant(params, steps: int, num_train: int, keep, widen: float | None = None):
    """Every activation quantizer rebuilt with one group per step of a ``steps``-step DDIM
    (``T / steps`` timesteps each), its own range, and its own step where
    ``keep(site, group)``; elsewhere a ``FINE_BITS`` step over the same range (clipping
    kept) or, with ``widen``, over ``±widen`` times the range's larger side (``widen = 8``:
    neither clipping nor rounding left, float activations in effect)."""
    import jax
    import jax.numpy as jnp

    from jaxquant.quant.activation import ActQuant, is_act_quant

    if num_train % steps:
        raise SystemExit(f"{num_train} training timesteps do not split into {steps} equal groups")

    def conv(path, a):
        if not is_act_quant(a):
            return a
        if a.num_groups != 1:
            raise SystemExit("per-step quantizers are built from one-group activation quantizers")
        s, z = np.asarray(a.scale[0], np.float64), np.asarray(a.zero[0], np.float64)
        bits0 = a.group_bits[0]
        lo, hi = -z * s, (2 ** bits0 - 1 - z) * s
        if widen is not None:
            hi = widen * np.maximum(-lo, hi)
            lo = -hi
        fine_scale = (hi - lo) / (2 ** FINE_BITS - 1)
        name, bits, sc, ze = _name(path), [], [], []
        for g in range(steps):
            kept = keep(name, g)
            bits.append(bits0 if kept else FINE_BITS)
            sc.append(s if kept else fine_scale)
            ze.append(z if kept else np.round(-lo / fine_scale))
        return ActQuant(jnp.asarray(np.stack(sc), jnp.float32), jnp.asarray(np.stack(ze), jnp.float32),
                        tuple(bits), a.split)

    return jax.tree_util.tree_map_with_path(conv, params, is_leaf=is_act_quant)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ddpm-fmnist")
    ap.add_argument("--a-bits", type=int, default=8)
    ap.add_argument("--calib", default=None, help="default: runs/quality/MODEL/calib-g1 (one group)")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-t", type=int, default=150, help="timestep splitting the late from the early steps")
    ap.add_argument("--full-res", default="down_blocks.0.,up_blocks.3.",
                    help="comma-separated name prefixes of the full-resolution blocks")
    ap.add_argument("--alphas", type=float, nargs="*", default=[0.5, 1.0], help="smoothing strengths to try")
    ap.add_argument("--full-res-alphas", type=float, nargs="*", default=[],
                    help="smoothing strengths to try on the full-resolution blocks' layers alone")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    ap.add_argument("--only", nargs="*", default=None, help="run only these variants (and the float reference)")
    args = ap.parse_args()

    import jaxquant
    from benchmarks.common import machine, relative_sq_error, write_result
    from jaxquant.calib import CalibConfig, calibrate, load_calibration
    from jaxquant.diffusion.pipeline import generate
    from jaxquant.eval.features import extract_features, get_feature_net
    from jaxquant.quant.quantize import ActQuantConfig, attach_act_quantizers
    from jaxquant.quant.rules import default_rules, layer_kernels, resolve
    from jaxquant.quant.smooth import smooth_model
    from jaxquant.quant.uniform import WeightQuantConfig

    tag = Path(args.model).name
    fp = jaxquant.load(args.model)
    calib = load_calibration(args.calib or f"runs/quality/{tag}/calib-g1")
    if calib.config.groups != 1:
        raise SystemExit("act_error_sources needs a one-group calibration")
    T = fp.schedule.num_train_timesteps
    plan = resolve(layer_kernels(fp.params), default_rules(WeightQuantConfig(8)))
    acfg = ActQuantConfig(args.a_bits)
    base = attach_act_quantizers(fp, calib, fp.params, plan, acfg)
    prefixes = tuple(p for p in args.full_res.split(",") if p)
    full_res = lambda n: n.startswith(prefixes)  # noqa: E731
    per_group = T // args.steps  # timesteps per group; group g holds t in [g·per_group, (g+1)·per_group)
    t_group = args.split_t // per_group

    net = get_feature_net("fmnist")

    def run(model, params):
        m = jaxquant.Model(model.meta, params)
        imgs = generate(m, args.num, steps=args.steps, seed=args.seed, batch_size=args.batch, progress=False)
        x = imgs.astype(np.float64) / 127.5 - 1.0
        return x, np.asarray(extract_features(net, imgs, batch_size=250)["pool"], np.float64)

    variants = {
        f"A{args.a_bits}": lambda: (fp, base),
        "clipping only": lambda: (fp, per_step_variant(base, args.steps, T, lambda n, g: False)),
        f"rounding at t >= {args.split_t} only": lambda: (fp, per_step_variant(base, args.steps, T, lambda n, g: g >= t_group)),
        f"rounding at t < {args.split_t} only": lambda: (fp, per_step_variant(base, args.steps, T, lambda n, g: g < t_group)),
        "rounding in the full-resolution blocks only": lambda: (fp, per_step_variant(base, args.steps, T, lambda n, g: full_res(n))),
        "rounding everywhere else": lambda: (fp, per_step_variant(base, args.steps, T, lambda n, g: not full_res(n))),
        "min/max ranges (no clipping)": lambda: (fp, attach_act_quantizers(
            fp, calib, fp.params, plan, dataclasses.replace(acfg, method="minmax"))),
    }

    def smoothed(alpha, layers="all"):
        sm = smooth_model(fp, calib, alpha, layers=layers, progress=False)
        c = calibrate(sm, CalibConfig(num_samples=calib.config.num_samples, steps=calib.config.steps, groups=1,
                                      batch_size=calib.config.batch_size, xtx=False, seed=calib.config.seed),
                      progress=False)
        return sm, attach_act_quantizers(sm, c, sm.params, plan, acfg)

    for a in args.alphas:
        variants[f"smoothed a={a:g}"] = lambda a=a: smoothed(a)
    for a in args.full_res_alphas:
        variants[f"smoothed a={a:g}, full resolution only"] = lambda a=a: smoothed(a, "full-resolution")
    if args.only is not None:
        unknown = set(args.only) - set(variants)
        if unknown:
            raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.only}

    x0, f0 = run(fp, fp.params)
    result = {"model": args.model, "a_bits": args.a_bits, "num": args.num, "steps": args.steps, "seed": args.seed,
              "split_t": args.split_t, "full_res": list(prefixes), "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "variants": {}}
    print(f"{args.num} samples, float weights, drift from the float model's samples")
    for name, make in variants.items():
        t0 = time.time()
        model, params = make()
        x, f = run(model, params)
        r = {"pixel": relative_sq_error(x, x0), "features": relative_sq_error(f, f0)}
        result["variants"][name] = r
        print(f"{name:45s} pixel {r['pixel']:.5f}  features {r['features']:.5f}  ({time.time() - t0:.0f} s)", flush=True)
    suffix = f"_{args.tag}" if args.tag else ""
    print(f"wrote {write_result(f'act_error_sources_{tag}_a{args.a_bits}{suffix}', result)}")


if __name__ == "__main__":
    main()
