"""Wall time of whole-model AQ at W2: calibration (with XᵀX) + every layer + block fine-tuning.

The network is google/ddpm-cifar10-32's UNet2DModel (35.7 M parameters) with random
weights (norms and biases perturbed so activations have structure); ``--channels``,
``--layers-per-block`` and ``--sample-size`` shrink it for a quick run. Weights are
quantized with AQUATIC-Diff's W2 preset (2x8, g9 for 3x3 convs, g8 otherwise) or, with
``--target``, planned to an average bit budget. Prints the time of each stage, weights
encoded per second, the slowest layers and the stored bits per weight.

    python -m benchmarks.aq_model_time                     # full size (hours on 2 CPU cores)
    python -m benchmarks.aq_model_time --channels 32,32,32,32 --layers-per-block 1 --sample-size 8 \\
        --num-samples 4 --calib-steps 2 --rounds 1 --beam 2 --finetune-steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from benchmarks.common import machine, write_result
from benchmarks.sampling_speed import CIFAR10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", default=None, help="block_out_channels, e.g. 32,32,32,32 (default: cifar10's)")
    ap.add_argument("--layers-per-block", type=int, default=None)
    ap.add_argument("--sample-size", type=int, default=None)
    ap.add_argument("--preset", default="W2", choices=["W2", "W4"])
    ap.add_argument("--target", type=float, default=None, help="plan to this average bits/weight instead")
    ap.add_argument("--num-samples", type=int, default=32, help="calibration trajectories")
    ap.add_argument("--calib-steps", type=int, default=10, help="sampler steps per calibration trajectory")
    ap.add_argument("--beam", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="AQ rounds (Adam + beam search) per layer at most")
    ap.add_argument("--finetune-steps", type=int, default=0)
    ap.add_argument("--progress-dir", default=None,
                    help="keep finished layers/blocks here so a killed run resumes (default: a temporary directory); "
                         "a resumed run reports the stored per-layer seconds")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/aq_model_time.json")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxquant.api import Model
    from jaxquant.calib import CalibConfig, calibrate
    from jaxquant.diffusion import ScheduleConfig
    from jaxquant.io.model_dir import ModelDirMeta
    from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel
    from jaxquant.quant.accounting import storage_report
    from jaxquant.quant.aq_model import preset_plan, quantize_aq
    from jaxquant.quant.quantize import ActQuantConfig
    from jaxquant.quant.rules import default_rules, layer_kernels, resolve

    print(machine())
    conf = dict(CIFAR10)
    if args.channels:
        conf["block_out_channels"] = [int(c) for c in args.channels.split(",")]
    if args.layers_per_block:
        conf["layers_per_block"] = args.layers_per_block
    if args.sample_size:
        conf["sample_size"] = args.sample_size
    cfg = UNet2DConfig.from_dict(conf)
    s = cfg.sample_size
    params = UNet2DModel(cfg).init(jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1,), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [v + 0.05 * jax.random.normal(k, v.shape)
                                                 for v, k in zip(leaves, keys)])
    model = Model(ModelDirMeta("unet2d", cfg.to_dict(), ScheduleConfig().to_dict()), params)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    print(f"UNet2DModel {conf['block_out_channels']} x{conf['layers_per_block']}, {s}x{s}: "
          f"{n_params / 1e6:.2f} M parameters")

    t0 = time.perf_counter()
    calib = calibrate(model, CalibConfig(num_samples=args.num_samples, steps=args.calib_steps, groups=1,
                                         batch_size=min(32, args.num_samples), xtx=True), progress=False)
    t_calib = time.perf_counter() - t0

    kernels = layer_kernels(model.params)
    names = [n for n, c in resolve(kernels, default_rules("aq")).items() if c is not None]
    plan = None if args.target else preset_plan({n: kernels[n] for n in names}, args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        progress_dir = args.progress_dir or tmp
        t0 = time.perf_counter()
        res = quantize_aq(model, calib, args.target, ActQuantConfig(bits=8), plan=plan, beam_size=args.beam,
                          finetune_steps=args.finetune_steps, progress_dir=progress_dir,
                          aq_options={"max_iters": args.rounds})
        t_aq = time.perf_counter() - t0
    t_layers = sum(r["seconds"] for r in res.layers)
    t_ft = sum(b["seconds"] for b in res.blocks)
    n_aq = sum(int(np.prod(kernels[n].shape)) for n in res.plan)
    rep = storage_report(res.params)
    what = f"target {args.target:g}" if args.target else f"preset {args.preset}"
    print(f"AQ {what}, beam {args.beam}, at most {args.rounds} rounds, {args.finetune_steps} fine-tuning steps/block")
    print(f"  calibration (XᵀX):   {t_calib:9.1f} s  ({args.num_samples} trajectories x {args.calib_steps} steps)")
    print(f"  AQ layers:           {t_layers:9.1f} s  ({len(res.plan)} layers, {n_aq / 1e6:.2f} M weights, "
          f"{n_aq / max(t_layers, 1e-9):,.0f} weights/s)")
    print(f"  block fine-tuning:   {t_ft:9.1f} s  ({len(res.blocks)} blocks)")
    print(f"  quantize_aq total:   {t_aq:9.1f} s  (incl. saving progress and activation ranges)")
    print(f"  total:               {t_calib + t_aq:9.1f} s;  peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print(f"  stored: {rep.bits_per_quantized_weight:.3f} bits per quantized weight, "
          f"{rep.bits_per_weight:.3f} bits per weight overall")
    slow = sorted(res.layers, key=lambda r: -r["seconds"])[:5]
    print("  slowest layers: " + "; ".join(f"{r['name']} {r['config']} {r['seconds']:.1f} s" for r in slow))
    if args.json:
        out = {"config": conf, "preset": None if args.target else args.preset, "target": args.target,
               "beam": args.beam, "rounds": args.rounds, "finetune_steps": args.finetune_steps,
               "calibration_s": t_calib, "aq_layers_s": t_layers, "finetune_s": t_ft, "total_s": t_calib + t_aq,
               "aq_weights": n_aq, "bits_per_quantized_weight": rep.bits_per_quantized_weight}
        print(f"wrote {write_result('aq_model_time', out)}")


if __name__ == "__main__":
    main()
