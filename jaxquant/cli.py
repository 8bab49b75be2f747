"""The ``jaxquant`` command: thin layers over the library functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxquant.errors import JaxquantError


def _cmd_convert(args: argparse.Namespace) -> int:
    if args.source_format == "diffusers":
        try:
            from checkpoints_convert.diffusers import convert_diffusers
        except ImportError as e:
            raise JaxquantError(f"conversion needs the torch extra ({e}); install it with: pip install 'jaxquant[torch]'") from None
        out = convert_diffusers(args.src, args.out)
    else:
        raise JaxquantError(f"unknown --from {args.source_format!r}")
    print(f"wrote {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxquant.train.loop import TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr,
                      warmup_steps=args.warmup, ema_decay=args.ema, seed=args.seed,
                      checkpoint_every=args.checkpoint_every)
    if args.what == "ddpm":
        from jaxquant.data import load_fashion_mnist
        from jaxquant.train.ddpm import FMNIST_UNET, train_ddpm

        images, _ = load_fashion_mnist("train", args.data_dir)
        out = train_ddpm(args.run_dir, images, FMNIST_UNET, cfg, export_dir=args.export,
                         extra_meta={"data": "Fashion-MNIST train (60 000), padded to 32x32, [-1, 1]"})
    else:
        raise JaxquantError(f"unknown training target {args.what!r}")
    print(f"wrote {out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import jaxquant
    from jaxquant.diffusion.pipeline import generate
    from jaxquant.images import save_grid, save_samples_npz

    model = jaxquant.load(args.model)
    labels = None
    if model.is_class_conditional:
        n_cls = model.config.get("num_class_embeds") or 0
        labels = np.arange(args.num) % max(n_cls, 1)
    images = generate(model, args.num, steps=args.steps, sampler=args.sampler, eta=args.eta,
                      seed=args.seed, batch_size=args.batch_size, labels=labels)
    npz = save_samples_npz(images, args.out, labels)
    png = save_grid(images[: args.grid], Path(args.out).with_suffix(".png"), scale=2)
    print(f"wrote {npz} ({images.shape[0]} images, uint8 NHWC) and {png}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import jaxquant
    from jaxquant.diffusion.pipeline import generate
    from jaxquant.images import save_grid, save_samples_npz

    out = Path(args.out)
    model = jaxquant.load("ddpm-fmnist")
    print(f"loaded ddpm-fmnist: {model}")
    images = generate(model, args.num, steps=args.steps, sampler="ddim", seed=args.seed, batch_size=args.num)
    npz = save_samples_npz(images, out / "ddpm-fmnist-samples.npz")
    png = save_grid(images, out / "ddpm-fmnist-samples.png", scale=3)
    print(f"wrote a grid of {args.num} DDIM-{args.steps} samples to {png} (arrays: {npz})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint to a jaxquant model directory")
    c.add_argument("src", help="diffusers folder (config.json + diffusion_pytorch_model.safetensors|.bin)")
    c.add_argument("--from", dest="source_format", required=True, choices=["diffusers"])
    c.add_argument("--out", required=True, help="output model directory")
    c.set_defaults(fn=_cmd_convert)
    s = sub.add_parser("sample", help="sample images; writes an ADM-style .npz and a PNG grid")
    s.add_argument("model", nargs="?", default="ddpm-fmnist", help="model directory or shipped name")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise weight")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--grid", type=int, default=64, help="images in the PNG grid")
    s.add_argument("--out", default="samples.npz")
    s.set_defaults(fn=_cmd_sample)

    d = sub.add_parser("demo", help="sample a grid from the shipped ddpm-fmnist model")
    d.add_argument("--out", default="jaxquant-demo")
    d.add_argument("--num", type=int, default=36)
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)

    tr = sub.add_parser("train", help="train one of the small shipped models (resumes from --run-dir)")
    tr.add_argument("what", choices=["ddpm"])
    tr.add_argument("--run-dir", required=True, help="checkpoints and log; rerun to resume")
    tr.add_argument("--export", default=None, help="model directory for the EMA weights (default RUN_DIR/model)")
    tr.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX directory")
    tr.add_argument("--steps", type=int, default=3000)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--warmup", type=int, default=200)
    tr.add_argument("--ema", type=float, default=0.999)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint-every", type=int, default=250)
    tr.set_defaults(fn=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. JaxquantErrors print one line, no traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except JaxquantError as e:
        print(f"jaxquant {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
