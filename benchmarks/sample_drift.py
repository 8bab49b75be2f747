"""How far do a quantized model's samples drift from the float model's, from the same noise?

The RD distortions (``jaxquant.search.rd``) perturb one step and compare one output. This
script measures the end of whole trajectories instead: every model samples the same
initial noise (DDIM, the quality table's seed and batch size, so these are the first
images of its 10 000-sample runs), and each quantized sample is compared with the float
model's sample from the same noise:

* pixel: ``Σ‖x̂ − x‖² / Σ‖x‖²`` of the images in ``[-1, 1]``;
* features: the same ratio for the fmnist classifier's pool features (FID's features);
* class agreement: the share of samples the classifier puts in the float sample's class;
* paired FID: the Fréchet distance between the quantized and the float samples' pool
  features (what ``jaxquant eval SAMPLES --ref FP_SAMPLES`` gives for whole sample sets;
  it grows as ``--num`` falls, so compare rows of one run or of equal ``--num``);
* dark pixels: per model alone, the share of pixels below 2 % of full scale (Fashion-MNIST's
  backgrounds are black: the float model leaves a quarter of its pixels there, the test
  set two thirds; a model that lifts them makes hazier images);
* and, per model alone, the entropy of its predicted-class histogram (nats, at most
  ``ln 10 = 2.30``) and the mean top-class probability: a loss of diversity shows as a
  lower entropy and a higher confidence.

With ``--float-acts`` every quantized model runs with its activation quantizers removed
(weights as stored, activations float), which separates what a weight plan does from
what it does together with the activation quantizers. ``--float-acts-at REGEX ...`` drops
only the matching ones, one row per pattern; ``--float-weights-at REGEX ...`` instead puts
the float kernels of ``--float-source`` back into the matching layers (one row per pattern),
which says where the weights' share sits (in a model whose other parameters were tuned
around its quantized weights, the network stage's, it also takes away that compensation).
``--float-acts-during LO-HI ...`` drops every activation quantizer at the sampling steps
with ``LO <= t < HI`` only (one row per range; the quantizers become one group per step
of the sampler), which says when the activations' drift is made.

An error made at every step in the same direction accumulates over a trajectory, which a
single-step measure (with or without a lookahead of float steps) cannot see; if a model
that the single-step measures rate best drifts furthest here, that is the reason.

    python -m benchmarks.sample_drift --model ddpm-fmnist \\
        --quantized runs/quality/ddpm-fmnist/{uniform-w4a4,uniform-w4a4-g10,rd-w4a4-g10} --num 500
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import numpy as np

from benchmarks.common import relative_sq_error, write_result


def _stats(feats: dict) -> dict:
    logits = np.asarray(feats["logits"], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    cls = logits.argmax(-1)
    hist = np.bincount(cls, minlength=logits.shape[1]) / len(cls)
    nz = hist[hist > 0]
    return {"class": cls, "entropy": float(-(nz * np.log(nz)).sum()), "confidence": float(p.max(-1).mean()),
            "histogram": hist.tolist()}


def dark_share(x: np.ndarray) -> float:
    """The share of pixels of images in ``[-1, 1]`` below 2 % of full scale."""
    return float(np.mean(np.asarray(x) < -0.96))


def _without_act_quant(tree, pattern: str | None = None, prefix: str = ""):
    """The parameter tree without its activation quantizers (:class:`ActQuant` leaves), or
    without those whose dotted path (``up_blocks.3.resnets.0.conv1.input_quant``) matches
    the regular expression ``pattern`` (``re.search``)."""
    from jaxquant.quant.activation import ActQuant

    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            path = f"{prefix}.{k}" if prefix else k
            if isinstance(v, ActQuant) and (pattern is None or re.search(pattern, path)):
                continue
            out[k] = _without_act_quant(v, pattern, path)
        return out
    return tree


def with_float_weights(tree, source, pattern: str, prefix: str = "") -> tuple[dict, int]:
    """The parameter tree with the quantized weights of the layers whose dotted path
    (``up_blocks.3.resnets.0.conv1``) matches ``pattern`` (``re.search``) replaced by the
    float kernels at the same paths of ``source``, the float model the quantized one was
    made from (for a smoothed model, the smoothed float model, whose kernels carry the
    smoothing factors; rescaled to the factors the quantized layer holds now, which tuning
    moves); and how many were.
    Everything else, the activation quantizers and the tuned float parameters included,
    stays as stored: what the layers' weight quantization costs, with the rest in place."""
    from jaxquant.quant.dispatch import is_quantized_weight

    if not isinstance(tree, dict):
        return tree, 0
    out, n = {}, 0
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else k
        if is_quantized_weight(v) and re.search(pattern, prefix):
            src = source.get(k) if isinstance(source, dict) else None
            if src is None or is_quantized_weight(src) or np.shape(src) != tuple(v.shape):
                raise SystemExit(f"--float-source has no float kernel of {v.shape} at {path}")
            out[k], n = _resmoothed(src, source.get("input_smooth"), tree.get("input_smooth"), path), n + 1
        else:
            out[k], m = with_float_weights(v, source.get(k) if isinstance(source, dict) else None, pattern, path)
            n += m
    return out, n


def parse_t_range(text: str) -> tuple[int, int]:
    """``"500-1000"`` → ``(500, 1000)``: the timesteps ``500 <= t < 1000``."""
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if not m or int(m[1]) >= int(m[2]):
        raise SystemExit(f"bad timestep range {text!r}: expected LO-HI with LO < HI, e.g. 500-1000")
    return int(m[1]), int(m[2])


def float_acts_during(tree, lo: int, hi: int, steps: int, num_train: int):
    """The parameter tree with every (one-group) activation quantizer rebuilt with one group
    per step of a ``steps``-step sampler (``num_train / steps`` timesteps each): the stored
    quantizer in the groups outside ``lo <= t < hi``, and inside it a 24-bit step over 8
    times the stored range, which neither clips nor rounds measurably (float activations;
    :func:`benchmarks.act_error_sources.per_step_variant`)."""
    from benchmarks.act_error_sources import per_step_variant

    width = num_train // steps  # per_step_variant refuses a num_train that steps does not divide
    return per_step_variant(tree, steps, num_train, lambda _, g: not (lo <= g * width and (g + 1) * width <= hi),
                            widen=8.0)


def _resmoothed(kernel, source_smooth, smooth, path: str):
    """The source's float kernel for a layer whose channel smoothing was tuned after it was
    quantized: the layer divides its input by ``1/smooth.inv_scale`` where the source divided
    by ``1/source_smooth.inv_scale``, so the kernel's input rows are scaled by their ratio to
    keep ``x @ W`` (without this, a factor tuned 3 % away scales the layer's output by 3 %)."""
    if smooth is None and source_smooth is None:
        return kernel
    if smooth is None or source_smooth is None:
        raise SystemExit(f"{path}: one of the quantized layer and --float-source is smoothed, the other not; "
                         "pass the smoothed float model the quantized one was made from")
    from jaxquant.quant.smooth import scale_kernel_inputs

    return scale_kernel_inputs(kernel, np.asarray(source_smooth.inv_scale, np.float64)
                               / np.asarray(smooth.inv_scale, np.float64))


def count_act_quant(tree) -> int:
    from jaxquant.quant.activation import is_act_quant

    return sum(is_act_quant(v) for v in jax.tree_util.tree_leaves(tree, is_leaf=is_act_quant))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ddpm-fmnist", help="the float model (name or directory)")
    ap.add_argument("--quantized", nargs="+", required=True, help="quantized model directories")
    ap.add_argument("--num", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg-scale", type=float, default=1.0)
    ap.add_argument("--float-acts", action="store_true", help="drop the quantized models' activation quantizers")
    ap.add_argument("--float-acts-at", nargs="+", default=None, metavar="REGEX",
                    help="one row per pattern and model: drop only the activation quantizers whose path matches "
                    "(e.g. 'attentions' or '^up_blocks\\.3\\.'); where the activations' drift comes from")
    ap.add_argument("--float-acts-during", nargs="+", default=None, metavar="LO-HI",
                    help="one row per range and model: every activation quantizer dropped at the steps with "
                    "LO <= t < HI only (e.g. 500-1000); when the activations' drift is made")
    ap.add_argument("--float-weights-at", nargs="+", default=None, metavar="REGEX",
                    help="one row per pattern and model: the quantized weights of the layers whose path matches "
                    "replaced by --float-source's kernels (activation quantizers kept); where the weights' drift "
                    "comes from")
    ap.add_argument("--float-source", default=None,
                    help="the float model the quantized ones were made from, for --float-weights-at "
                    "(default --model; a smoothed model's smoothed source)")
    ap.add_argument("--json", action="store_true",
                    help="write benchmarks/results/sample_drift_MODEL[_float_acts][_TAG].json")
    ap.add_argument("--tag", default=None, help="suffix of the JSON result's name (keeps earlier results)")
    args = ap.parse_args()

    import jaxquant
    from benchmarks.quality_table import sample_labels
    from jaxquant.diffusion.pipeline import generate
    from jaxquant.eval.features import extract_features, get_feature_net
    from jaxquant.eval.metrics import frechet_distance_from_features

    net = get_feature_net("fmnist")

    if sum(x is not None for x in (args.float_acts_at, args.float_weights_at, args.float_acts_during)) > 1:
        ap.error("--float-acts-at, --float-weights-at and --float-acts-during are separate runs")
    t_ranges = [parse_t_range(r) for r in args.float_acts_during or []]
    source = jaxquant.load(args.float_source or args.model).params if args.float_weights_at else None

    def run(path: str, float_acts: bool = False, pattern: str | None = None,
            weights_pattern: str | None = None, t_range: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
        model = jaxquant.load(path)
        if t_range is not None:
            params = float_acts_during(model.params, *t_range, args.steps, model.schedule.num_train_timesteps)
            print(f"  {path}: activation quantizers dropped at {t_range[0]} <= t < {t_range[1]}", flush=True)
            model = jaxquant.Model(model.meta, params, model.path)
        if weights_pattern is not None:
            params, n = with_float_weights(model.params, source, weights_pattern)
            print(f"  {path}: {n} quantized weights float (matching {weights_pattern!r})", flush=True)
            model = jaxquant.Model(model.meta, params, model.path)
        if float_acts or pattern is not None:
            params = _without_act_quant(model.params, pattern)
            print(f"  {path}: {count_act_quant(model.params) - count_act_quant(params)} activation quantizers "
                  f"dropped" + (f" (matching {pattern!r})" if pattern else ""), flush=True)
            model = jaxquant.Model(model.meta, params, model.path)
        t0 = time.perf_counter()
        imgs = generate(model, args.num, steps=args.steps, seed=args.seed, batch_size=args.batch,
                        labels=sample_labels(model, args.num), cfg_scale=args.cfg_scale, progress=False)
        print(f"  sampled {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return imgs.astype(np.float64) / 127.5 - 1.0, extract_features(net, imgs, batch_size=250)

    x_fp, f_fp = run(args.model)
    fp = {**_stats(f_fp), "dark_pixels": dark_share(x_fp)}
    pool_fp = np.asarray(f_fp["pool"], np.float64)
    result = {"model": args.model, "num": args.num, "steps": args.steps, "seed": args.seed,
              "cfg_scale": args.cfg_scale, "float_acts": args.float_acts, "float_acts_at": args.float_acts_at, "fp": {k: v for k, v in fp.items() if k != "class"}, "quantized": {}}
    rows = [("FP", 0.0, 0.0, 0.0, 1.0, fp["dark_pixels"], fp["entropy"], fp["confidence"])]
    if args.float_weights_at:
        result["float_weights_at"], result["float_source"] = args.float_weights_at, args.float_source or args.model
        variants = [(p, None, pat, None) for p in args.quantized for pat in args.float_weights_at]
    elif args.float_acts_at:
        variants = [(p, pat, None, None) for p in args.quantized for pat in args.float_acts_at]
    elif t_ranges:
        result["float_acts_during"] = args.float_acts_during
        variants = [(p, None, None, r) for p in args.quantized for r in t_ranges]
    else:
        variants = [(p, None, None, None) for p in args.quantized]
    for path, pattern, weights_pattern, t_range in variants:
        x, f = run(path, args.float_acts, pattern, weights_pattern, t_range)
        if pattern is not None:
            path = f"{path} [float acts at {pattern}]"
        if weights_pattern is not None:
            path = f"{path} [float weights at {weights_pattern}]"
        if t_range is not None:
            path = f"{path} [float acts at {t_range[0]} <= t < {t_range[1]}]"
        s = _stats(f)
        pool = np.asarray(f["pool"], np.float64)
        r = {"pixel": relative_sq_error(x, x_fp), "features": relative_sq_error(pool, pool_fp),
             "paired_fid": frechet_distance_from_features(pool, pool_fp),
             "class_agreement": float(np.mean(s["class"] == fp["class"])), "dark_pixels": dark_share(x),
             "entropy": s["entropy"], "confidence": s["confidence"], "histogram": s["histogram"]}
        result["quantized"][path] = r
        rows.append((path, r["pixel"], r["features"], r["paired_fid"], r["class_agreement"], r["dark_pixels"],
                     r["entropy"], r["confidence"]))
        print(f"  pixel {r['pixel']:.4f}  features {r['features']:.4f}  paired FID {r['paired_fid']:.4f}", flush=True)
    print(f"\n{args.num} samples from the same noise, each compared with the float model's")
    print(f"{'model':50s} {'pixel':>8s} {'features':>9s} {'paired FID':>10s} {'same class':>10s} {'dark px':>8s} "
          f"{'entropy':>8s} {'confidence':>10s}")
    for name, px, ft, pf, agree, dark, ent, conf in rows:
        print(f"{name:50s} {px:8.4f} {ft:9.4f} {pf:10.4f} {agree:10.3f} {dark:8.3f} {ent:8.3f} {conf:10.3f}")
    if args.json:
        name = "sample_drift_" + args.model.rstrip("/").split("/")[-1] + ("_float_acts" if args.float_acts else "")
        name += f"_{args.tag}" if args.tag else ""
        print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
