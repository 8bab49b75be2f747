"""Calibration cost at ddpm-cifar10-32 sizes: wall time and peak memory.

Random weights (cost does not depend on them), N samples × S DDIM steps, G timestep
groups. Two phases, timed apart, as ``calibrate`` runs them:

1. trajectories: the model's own DDIM sampler, every layer's inputs captured per step
   (ranges, reservoir samples, the float outputs as references);
2. ``XᵀX`` of every weight layer's input (im2col rows for convolutions, summed as shifted
   autocorrelations) over all steps and samples: one jitted call per (step, batch) that
   reruns the network and adds every layer's ``XᵀX``. Every call does the same work, so ``--xtx-steps K`` times the phase on
   K evenly spaced steps of the S and also prints the total projected linearly to all S
   (labelled as projected); by default all S steps are run. ``--compare-im2col`` also
   runs the same steps with the im2col reference (rows formed, then ``rowsᵀ·rows``) and
   prints the ratio of the two, measured in the same run.

Peak resident memory of the process is read after each phase.

    python -m benchmarks.calibration_cost --num-samples 256 --steps 20 --groups 10
    python -m benchmarks.calibration_cost --num-samples 256 --steps 20 --groups 10 --xtx-steps 2
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_result
from benchmarks.sampling_speed import CIFAR10


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-xtx", action="store_true", help="skip the XᵀX phase")
    ap.add_argument("--xtx-steps", type=int, default=None,
                    help="time the XᵀX phase on this many of the steps and project to all (default: all)")
    ap.add_argument("--compare-im2col", action="store_true",
                    help="also time the XᵀX phase with the im2col reference on the same steps")
    ap.add_argument("--memory-limit-mb", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.xtx_steps is not None and not 1 <= args.xtx_steps <= args.steps:
        raise SystemExit(f"--xtx-steps must be within 1..{args.steps}")

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxquant
    from jaxquant.calib import CalibConfig, calibrate
    from jaxquant.calib.calibration import accumulate_xtx
    from jaxquant.diffusion import ScheduleConfig
    from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
    from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel

    print(machine())
    cfg = UNet2DConfig.from_dict(CIFAR10)
    params = UNet2DModel(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))["params"]
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    res = {**vars(args), "params": n_params}
    with tempfile.TemporaryDirectory() as tmp:
        mdir = save_model_dir(Path(tmp) / "m", ModelDirMeta("unet2d", cfg.to_dict(), ScheduleConfig().to_dict()), params)
        model = jaxquant.load(mdir)
        ccfg = CalibConfig(num_samples=args.num_samples, steps=args.steps, groups=args.groups,
                           batch_size=args.batch_size, xtx=False, memory_limit_mb=args.memory_limit_mb)
        t0 = time.perf_counter()
        calib = calibrate(model, ccfg, out_dir=Path(tmp) / "calib")
        res["trajectories_s"] = time.perf_counter() - t0
        res["trajectories_peak_rss_mb"] = _peak_mb()
    print(f"calibration of ddpm-cifar10-32 ({n_params / 1e6:.1f}M params, random weights): N={args.num_samples} x "
          f"S={args.steps} steps, G={args.groups}, batch {args.batch_size}")
    print(f"  trajectories, ranges and samples (saved with orbax): {res['trajectories_s']:.1f} s, "
          f"peak RSS {res['trajectories_peak_rss_mb']:.0f} MiB, {len(calib.sites)} sites")
    if not args.no_xtx:
        k = args.xtx_steps or args.steps
        keep = np.unique(np.linspace(0, args.steps - 1, k).round().astype(int))
        sub = dataclasses.replace(calib, timesteps=calib.timesteps[keep], step_groups=calib.step_groups[keep],
                                  inputs=calib.inputs[keep], outputs=calib.outputs[keep])
        t0 = time.perf_counter()
        xtx, _ = accumulate_xtx(model, sub)
        wall = time.perf_counter() - t0
        peak = _peak_mb()
        if args.compare_im2col:
            t0 = time.perf_counter()
            ref, _ = accumulate_xtx(model, sub, conv_method="im2col")
            res["xtx_im2col_s"] = time.perf_counter() - t0
            res["xtx_max_rel_diff"] = max(float(np.abs(xtx[n] - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-30))
                                          for n in ref)
            del ref
        res.update(xtx_steps_run=len(keep), xtx_s=wall, xtx_peak_rss_mb=peak,
                   xtx_mb=sum(v.nbytes for v in xtx.values()) / 2**20, xtx_layers=len(xtx))
        calls = len(keep) * -(-args.num_samples // args.batch_size)
        line = (f"  XᵀX of {len(xtx)} layers ({res['xtx_mb']:.0f} MiB): {wall:.1f} s for {len(keep)} of {args.steps} "
                f"steps ({calls} calls, {wall / calls:.1f} s/call), peak RSS {res['xtx_peak_rss_mb']:.0f} MiB")
        if len(keep) < args.steps:
            res["xtx_projected_s"] = wall * args.steps / len(keep)
            line += f"; all {args.steps} steps projected: {res['xtx_projected_s']:.0f} s"
        print(line)
        if args.compare_im2col:
            print(f"  im2col reference on the same steps: {res['xtx_im2col_s']:.1f} s, "
                  f"{res['xtx_im2col_s'] / wall:.2f}x the shift-based time (largest difference "
                  f"{res['xtx_max_rel_diff']:.1e} of a layer's largest entry)")
        total = res["trajectories_s"] + res.get("xtx_projected_s", wall)
        print(f"  calibration with XᵀX: {total:.0f} s" + (" (XᵀX part projected)" if len(keep) < args.steps else ""))
    if args.json:
        print(f"wrote {write_result('calibration_cost', res)}")


if __name__ == "__main__":
    main()
