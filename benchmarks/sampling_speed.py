"""DDIM-20 sampling throughput: the Flax UNet2DModel vs diffusers' PyTorch one, side by side.

Same config (google/ddpm-cifar10-32, random weights), same batch, same step count, same
process and machine. Prints images/s for both and the ratio; `--json` stores the result.

    python -m benchmarks.sampling_speed --batch 8 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from benchmarks.common import machine, time_interleaved, write_result

CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], norm_eps=1e-6,
    flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, attention_head_dim=None, norm_num_groups=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/sampling_speed.json")
    args = ap.parse_args()

    import jax
    import torch
    from diffusers import DDIMScheduler, UNet2DModel as TorchUNet

    from jaxquant.diffusion import ScheduleConfig, initial_noise, make_sampler
    from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel
    from jaxquant.xla import compiler_options

    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    b, n = args.batch, args.steps

    # PyTorch: the DDIMPipeline loop, written out so only model + scheduler are timed.
    torch.manual_seed(0)
    tnet = TorchUNet(**CIFAR10).eval()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    def torch_run():
        with torch.inference_mode():
            x = torch.randn(b, 3, 32, 32)
            sched.set_timesteps(n)
            for t in sched.timesteps:
                eps = tnet(x, t).sample
                x = sched.step(eps, t, x, eta=0.0).prev_sample
        return x

    # JAX: the whole chain is one jitted lax.scan, compiled with jaxquant's options
    # (jaxquant.xla) and, for comparison, with XLA's defaults.
    cfg = UNet2DConfig.from_dict(CIFAR10)
    module = UNet2DModel(cfg)
    params = module.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32), np.zeros((1,), np.int32))["params"]
    run = make_sampler(lambda p, x, t: module.apply({"params": p}, x, t), ScheduleConfig(), n, "ddim")
    run_default = run.with_xla_defaults()
    key = jax.random.key(0)
    x_T = initial_noise(key, (b, 32, 32, 3))
    t0 = time.perf_counter()
    run(params, x_T, key).block_until_ready()
    compile_s = time.perf_counter() - t0
    run_default(params, x_T, key).block_until_ready()
    torch_run()  # warm-up

    # Interleaved repeats, so drift in the machine's load hits all sides alike.
    sides = {"torch": torch_run, "jax": lambda: run(params, x_T, key).block_until_ready(),
             "jax_xla_defaults": lambda: run_default(params, x_T, key).block_until_ready()}
    times = time_interleaved(sides, args.repeats)
    ips = {k: b / statistics.median(v) for k, v in times.items()}
    print(f"DDIM-{n}, batch {b}, ddpm-cifar10-32 config (35.7M params), median of {args.repeats}")
    print(f"  diffusers (PyTorch):            {ips['torch']:7.3f} images/s")
    print(f"  jaxquant (Flax/XLA):            {ips['jax']:7.3f} images/s  (compile {compile_s:.1f} s; "
          f"options {dict(compiler_options()) or 'XLA defaults'})")
    print(f"  jaxquant with XLA's defaults:   {ips['jax_xla_defaults']:7.3f} images/s")
    print(f"  ratio jax/torch: {ips['jax'] / ips['torch']:.2f}x  (XLA defaults: "
          f"{ips['jax_xla_defaults'] / ips['torch']:.2f}x)")
    if args.json:
        p = write_result("sampling_speed", {"batch": b, "steps": n, "torch_images_per_s": ips["torch"],
                                            "jax_images_per_s": ips["jax"],
                                            "jax_xla_defaults_images_per_s": ips["jax_xla_defaults"],
                                            "ratio": ips["jax"] / ips["torch"],
                                            "ratio_xla_defaults": ips["jax_xla_defaults"] / ips["torch"],
                                            "jax_compile_s": compile_s, "times_s": times,
                                            "compiler_options": dict(compiler_options())})
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
