"""Which layers does an RD distortion call cheap, and does a lookahead change that?

RD W4A4 on ddpm-fmnist puts the low-resolution path (``down_blocks.3``, the mid block,
``up_blocks.0``) at 3-bit weights and loses to uniform W4A4 by FID. This probe measures,
for a few low-resolution and a few full-resolution layers, the whole-model distortion
(normalised MSE, summed over timestep groups) with only that layer's weights at a low
width, under each measure:

* ``none``: the seed's, the network output of the perturbed step;
* ``K`` (0, 2, 5, ...): x̂₀ after ``K`` float DDIM steps (``CurveConfig.lookahead``;
  ``K`` ≥ the steps left runs to the end of the trajectory).

With ``--features NET`` (e.g. ``fmnist``) every measure compares that network's pool
features of x̂₀ instead of pixels (``CurveConfig.features``; ``none`` becomes ``K = 0``).

If a measure that follows the error to (or towards) the sample rated the low-resolution
layers as costly, it would be the proxy to allocate with. A second part quantizes the
whole low-resolution set together at the low width and compares the measured joint
distortion with the sum of the single-layer points (additivity within that set). A third
part (``--models``) measures whole quantized models (any method, any number of activation
groups, run as sampling runs them) on the same inputs, so that models whose FIDs are known
can be ranked by each measure. A fourth part (``--trajectories N``) quantizes one layer (and
then the whole low-resolution set) at *every* step of ``N`` whole DDIM trajectories and
compares the final samples with the float model's from the same noise (pixels, and the
fmnist pool features): the drift that an error repeated at every step accumulates.

    python -m benchmarks.rd_lookahead_probe --calib runs/quality/ddpm-fmnist/calib-g10
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np

from benchmarks.common import relative_sq_error, write_result

LOW = ["down_blocks.3.resnets.0.conv1", "mid_block.resnets.0.conv1", "up_blocks.0.resnets.0.conv1"]
HIGH = ["down_blocks.0.resnets.0.conv1", "up_blocks.3.resnets.0.conv1", "time_embedding.linear_1"]
#: The layers RD W4A4 (10 groups, MSE) put at 3 bits.
LOW_SET = r"down_blocks\.3\..*|mid_block\.resnets\..*|mid_block\.attentions\.0\.to_[qk]|up_blocks\.0\.resnets\..*"


def _lookahead(v: str) -> int | None:
    return None if v == "none" else int(v)


def _model_distortion(model, problem, params) -> np.ndarray:
    """``[G]`` normalised MSE of a quantized parameter tree on ``problem``'s inputs, with
    each activation quantizer narrowed to the input's timestep as sampling does."""
    import jax
    import jax.numpy as jnp

    from jaxquant.quant.activation import at_timesteps
    from jaxquant.search.distortion import output_stats

    module, T = model.module, model.schedule.num_train_timesteps

    def apply(p, x, t, y):
        return module.apply({"params": at_timesteps(p, t, T)}, x, t, y)

    @jax.jit
    def stats(q, fp, x, t, chain, ref):
        return output_stats(problem.output(q, fp, x, t, None, chain, apply), ref)

    inp = problem.inputs
    err2 = np.zeros(problem.groups)
    for t in np.unique(inp.t):  # one timestep per call, as at_timesteps assumes
        j = np.flatnonzero(inp.t == t)
        chain = None if inp.chain is None else tuple(jnp.asarray(a[j]) for a in inp.chain)
        st = np.asarray(stats(params, model.params, jnp.asarray(inp.x[j]), jnp.asarray(inp.t[j]), chain,
                              jnp.asarray(inp.ref[j])))
        np.add.at(err2, inp.group[j], st[:, 0])
    return err2 / inp.ref_energy(problem.groups)


def _trajectory_drift(model, layers, low, bits: int, num: int, steps: int) -> dict:
    """Part 4: ``{layer: {"pixel", "features"}}`` drift of whole trajectories with the
    layer's (or a named set's) weights at ``bits`` at every step, against the float model."""
    import jax
    import jax.numpy as jnp

    from jaxquant.diffusion.pipeline import sampling_fn
    from jaxquant.diffusion.samplers import initial_noise
    from jaxquant.eval.features import get_feature_net
    from jaxquant.quant import dispatch
    from jaxquant.quant.rules import _split_name, layer_kernels
    from jaxquant.quant.uniform import WeightQuantConfig, quantize_weight

    fn = sampling_fn(model, steps=steps)
    x_T = initial_noise(jax.random.key(0), (num, *model.sample_shape))
    key = jax.random.key(1)
    net = get_feature_net("fmnist")
    kernels = layer_kernels(model.params)

    def sample(params):
        x = np.asarray(fn(params, x_T, key), np.float64)
        img = np.clip(x / 2 + 0.5, 0, 1).astype(np.float32) * 255.0  # unrounded, as the RD feature curves
        return x, np.asarray(net(img)["pool"], np.float64)

    def with_bits(names):
        params = jax.tree_util.tree_map(lambda a: a, model.params)
        for n in names:
            node = params
            for k in _split_name(model.params, n):
                node = node[k]
            q = quantize_weight(kernels[n], WeightQuantConfig(bits=bits))
            node["kernel"] = jnp.asarray(dispatch.materialize(q), kernels[n].dtype)
        return params

    x_fp, f_fp = sample(model.params)
    out = {}
    print(f"whole trajectories ({num} noises, DDIM-{steps}) with the weights at {bits} bits at every step; "
          "drift of the final samples from the float ones (normalised squared error)")
    for item in layers:
        label, names = item if isinstance(item, tuple) else (item, [item])
        x, f = sample(with_bits(names))
        d = {"pixel": relative_sq_error(x, x_fp), "features": relative_sq_error(f, f_fp)}
        out[label] = d
        kind = "set " if len(names) > 1 else "low " if label in low else "high"
        print(f"  {kind} {label:34s} pixel {d['pixel']:10.3e}  features {d['features']:10.3e}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ddpm-fmnist")
    ap.add_argument("--calib", required=True, help="a calibration of the model (its groups are the curves')")
    ap.add_argument("--low", nargs="+", default=LOW)
    ap.add_argument("--high", nargs="+", default=HIGH)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 8])
    ap.add_argument("--lookaheads", nargs="*", default=["none", "0", "2", "5", "19"])
    ap.add_argument("--joint-set", default=LOW_SET, help="regex of the layers quantized together in part 2")
    ap.add_argument("--joint-lookaheads", nargs="*", default=["none"])
    ap.add_argument("--models", nargs="*", default=[], help="quantized model directories (part 3)")
    ap.add_argument("--model-lookaheads", nargs="*", default=["none"])
    ap.add_argument("--inputs-per-group", type=int, default=8)
    ap.add_argument("--features", default=None, help="compare this feature network's features of x̂₀ (e.g. fmnist)")
    ap.add_argument("--trajectories", type=int, default=0,
                    help="part 4: whole DDIM trajectories per layer (0: skip)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of part 4")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/rd_lookahead_probe.json")
    args = ap.parse_args()

    import jaxquant
    from jaxquant.calib import load_calibration
    from jaxquant.quant.rules import Rule, layer_kernels
    from jaxquant.quant.uniform import WeightQuantConfig
    from jaxquant.search import rd

    model = jaxquant.load(args.model)
    calib = load_calibration(args.calib)
    low_bits = min(args.bits)

    def problem(layers, bits, la):
        rules = [Rule(re.escape(n), WeightQuantConfig()) for n in layers]
        cfg = rd.CurveConfig(weight_bits=tuple(bits), inputs_per_group=args.inputs_per_group, lookahead=la,
                             features=args.features)
        return rd.RDProblem(model, calib, None, None, rules, cfg)

    result = {"model": args.model, "calib": args.calib, "groups": int(calib.config.groups), "bits": args.bits,
              "inputs_per_group": args.inputs_per_group, "features": args.features, "single": {}, "joint": {},
              "models": {}}
    layers = args.low + args.high
    print(f"whole-model distortion (normalised MSE summed over {calib.config.groups} groups) with one layer's "
          f"weights at {low_bits} bits; ratio to the mean of the full-resolution layers")
    for name in args.lookaheads:
        la = _lookahead(name)
        t0 = time.perf_counter()
        curves = rd.compute_curves(problem(layers, args.bits, la), progress=False)
        d = {n: curves.distortion(f"weight:{n}", "mse") for n in layers}  # [G, M]
        col = curves.curves[f"weight:{layers[0]}"].bits.index(low_bits)
        tot = {n: float(v[:, col].sum()) for n, v in d.items()}
        ref = float(np.mean([tot[n] for n in args.high]))
        result["single"][name] = {"seconds": time.perf_counter() - t0,
                                  "layers": {n: {"total": tot[n], "ratio": tot[n] / ref, "per_group": d[n][:, col].tolist()}
                                             for n in layers}}
        print(f"lookahead {name} ({time.perf_counter() - t0:.0f} s)")
        for n in layers:
            print(f"  {'low ' if n in args.low else 'high'} {n:34s} {tot[n]:10.3e}  ratio {tot[n] / ref:8.4f}")

    joint = [n for n in layer_kernels(model.params) if re.fullmatch(args.joint_set, n)]
    for name in args.joint_lookaheads:
        la = _lookahead(name)
        p = problem(joint, (low_bits,), la)
        curves = rd.compute_curves(p, progress=False)
        bits = {n: low_bits for n in joint}
        meas = rd.joint_distortion(p, curves, bits, {})
        pred = rd.predicted_distortion(curves, bits, {})
        result["joint"][name] = {"layers": joint, "measured": meas.tolist(), "predicted": pred.tolist()}
        print(f"joint, lookahead {name}: {len(joint)} layers at {low_bits} bits: measured {meas.sum():.3e}, "
              f"sum of single layers {pred.sum():.3e} (per group: measured {np.array2string(meas, precision=2)})")
    for name in args.model_lookaheads:
        p = problem(joint, (low_bits,), _lookahead(name))
        for d in args.models:
            meas = _model_distortion(model, p, jaxquant.load(d).params)
            result["models"].setdefault(name, {})[d] = meas.tolist()
            print(f"model {d}, lookahead {name}: {meas.sum():.4e} (per group {np.array2string(meas, precision=3)})")
    if args.trajectories:
        result["trajectories"] = _trajectory_drift(model, layers + [("low set", joint)], args.low, low_bits,
                                                   args.trajectories, args.steps)
    if args.json:
        name = "rd_lookahead_probe" + (f"_{args.features}" if args.features else "")
        print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
