"""Calibration cost at ddpm-cifar10-32 sizes: wall time and peak memory.

Random weights (cost does not depend on them), N samples × S DDIM steps, G timestep
groups, with and without the XᵀX statistics. Prints one line per phase and the peak
resident memory of the process.

    python -m benchmarks.calibration_cost --num-samples 256 --steps 20 --groups 10
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine, write_result
from benchmarks.sampling_speed import CIFAR10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-xtx", action="store_true")
    ap.add_argument("--memory-limit-mb", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    import jaxquant
    from jaxquant.calib import CalibConfig, calibrate
    from jaxquant.diffusion import ScheduleConfig
    from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
    from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel

    print(machine())
    cfg = UNet2DConfig.from_dict(CIFAR10)
    params = UNet2DModel(cfg).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))["params"]
    with tempfile.TemporaryDirectory() as tmp:
        mdir = save_model_dir(Path(tmp) / "m", ModelDirMeta("unet2d", cfg.to_dict(), ScheduleConfig().to_dict()), params)
        model = jaxquant.load(mdir)
        ccfg = CalibConfig(num_samples=args.num_samples, steps=args.steps, groups=args.groups,
                           batch_size=args.batch_size, xtx=not args.no_xtx, memory_limit_mb=args.memory_limit_mb)
        t0 = time.perf_counter()
        calib = calibrate(model, ccfg, out_dir=Path(tmp) / "calib")
        wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    xtx_mb = sum(v.nbytes for v in calib.xtx.values()) / 2**20
    print(f"calibration of ddpm-cifar10-32 (35.7M params, random weights): N={args.num_samples} x S={args.steps} steps, "
          f"G={args.groups}, XᵀX={'yes' if not args.no_xtx else 'no'}")
    print(f"  wall time {wall:.1f} s, peak RSS {peak_mb:.0f} MiB, XᵀX statistics {xtx_mb:.0f} MiB, "
          f"{len(calib.sites)} sites")
    if args.json:
        print(f"wrote {write_result('calibration_cost', {**vars(args), 'wall_s': wall, 'peak_rss_mb': peak_mb, 'xtx_mb': xtx_mb})}")


if __name__ == "__main__":
    main()
