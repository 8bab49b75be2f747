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
        if args.config is not None:
            raise JaxquantError("--config applies to --from compvis only (a diffusers folder carries its config.json)")
        out = convert_diffusers(args.src, args.out)
    elif args.source_format == "compvis":
        if args.config is None:
            raise JaxquantError("--from compvis needs the model's YAML: --config configs/latent-diffusion/cin256-v2.yaml")
        try:
            from checkpoints_convert.compvis import convert_compvis
        except ImportError as e:
            raise JaxquantError(f"conversion needs the torch extra ({e}); install it with: pip install 'jaxquant[torch]'") from None
        out = convert_compvis(args.src, args.config, args.out)
    else:
        raise JaxquantError(f"unknown --from {args.source_format!r}")
    print(f"wrote {out}")
    return 0


#: Per-target defaults of ``jaxquant train`` (``--steps``, ``--lr``, ``--warmup``, ``--ema``).
TRAIN_DEFAULTS = {
    "ddpm": {"steps": 3000, "lr": 5e-4, "warmup": 200, "ema": 0.999},
    "classifier": {"steps": 3000, "lr": 5e-4, "warmup": 200, "ema": 0.999},
    "vq": {"steps": 3000, "lr": 5e-4, "warmup": 200, "ema": 0.999},
    "ldm": {"steps": 20000, "lr": 5e-4, "warmup": 500, "ema": 0.9995},
}


def _cmd_train(args: argparse.Namespace) -> int:
    from jaxquant.train.loop import TrainConfig

    d = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in TRAIN_DEFAULTS[args.what].items()}
    if args.vq is not None and args.what != "ldm":
        raise JaxquantError("--vq applies to `jaxquant train ldm` only")
    cfg = TrainConfig(steps=d["steps"], batch_size=args.batch_size, learning_rate=d["lr"],
                      warmup_steps=d["warmup"], ema_decay=d["ema"], seed=args.seed,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every)
    if args.what == "ddpm":
        from jaxquant.data import load_fashion_mnist
        from jaxquant.train.ddpm import FMNIST_UNET, train_ddpm

        images, _ = load_fashion_mnist("train", args.data_dir)
        out = train_ddpm(args.run_dir, images, FMNIST_UNET, cfg, export_dir=args.export,
                         extra_meta={"data": "Fashion-MNIST train (60 000), padded to 32x32, [-1, 1]"})
    elif args.what == "classifier":
        from jaxquant.data import load_fashion_mnist
        from jaxquant.train.classifier import train_classifier

        out, acc = train_classifier(args.run_dir, load_fashion_mnist("train", args.data_dir),
                                    load_fashion_mnist("test", args.data_dir), cfg, export_dir=args.export)
        print(f"test accuracy {acc:.4f}")
    elif args.what == "vq":
        from jaxquant.data import load_fashion_mnist
        from jaxquant.io.model_dir import read_meta
        from jaxquant.train.vq import FMNIST_VQ, train_vq

        images, _ = load_fashion_mnist("train", args.data_dir)
        test_images, _ = load_fashion_mnist("test", args.data_dir)
        out = train_vq(args.run_dir, images, cfg, FMNIST_VQ, test_images=test_images, export_dir=args.export,
                       extra_meta={"data": "Fashion-MNIST train (60 000), padded to 32x32, [-1, 1]; "
                                           "test_reconstruction on the test split"})
        rec = read_meta(out).extra.get("test_reconstruction") or {}
        if rec:
            print(f"test reconstruction: PSNR {rec['psnr_db']:.2f} dB, MSE {rec['mse_01']:.5f} (pixels in [0, 1]), "
                  f"codebook usage {rec['codebook_usage']:.1%}")
    elif args.what == "ldm":
        if args.vq is None:
            raise JaxquantError("`jaxquant train ldm` needs the first stage: --vq VQ_MODEL_DIR "
                                "(train one with `jaxquant train vq`)")
        from jaxquant.data import load_fashion_mnist
        from jaxquant.train.ldm import FMNIST_LDM, train_ldm

        images, labels = load_fashion_mnist("train", args.data_dir)
        out = train_ldm(args.run_dir, images, labels, args.vq, cfg, FMNIST_LDM, export_dir=args.export,
                        extra_meta={"data": "Fashion-MNIST train (60 000) with labels, padded to 32x32, [-1, 1]"})
    else:
        raise JaxquantError(f"unknown training target {args.what!r}")
    print(f"wrote {out}")
    return 0


#: Class rows in the PNG grid of ``jaxquant sample --classes all`` unless ``--grid-rows`` says otherwise.
GRID_MAX_CLASS_ROWS = 100


def _parse_class_labels(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` (``--class-labels``)."""
    try:
        labels = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise JaxquantError(f"--class-labels {text!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if not labels:
        raise JaxquantError("--class-labels: give at least one class label, e.g. 0,1,2")
    return labels


def _sample_plan(model, args: argparse.Namespace) -> tuple[np.ndarray | None, list[int] | None, int]:
    """``(labels, classes, per_class)`` of a ``jaxquant sample`` run.

    Class mode (``--class-labels`` / ``--classes all``): ``per_class`` images of each
    class, class-major (the grid shows a row per class). Otherwise ``--num`` images, with
    labels drawn uniformly from every class (seeded by ``--seed``) when the model is
    class-conditional; ``classes`` is None and ``per_class`` 0.
    """
    from jaxquant.diffusion.pipeline import num_classes

    n_cls = num_classes(model)
    for flag, value in (("--grid", args.grid), ("--grid-rows", args.grid_rows), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise JaxquantError(f"{flag} must be at least 1 (got {value})")
    if args.class_labels is not None or args.classes is not None:
        if not model.is_class_conditional:
            raise JaxquantError("--class-labels/--classes need a class-conditional model; this model is unconditional")
        if args.num is not None:
            raise JaxquantError("--num is the number of images with random labels; with --class-labels/--classes "
                                "give the images per class with --per-class")
        if args.grid is not None:
            raise JaxquantError("--grid counts images of random-label samples; with --class-labels/--classes the grid "
                                "has a row per class: use --grid-rows")
        per_class = 4 if args.per_class is None else args.per_class
        if per_class < 1:
            raise JaxquantError(f"--per-class must be at least 1 (got {per_class})")
        if args.classes == "all":
            if n_cls is None:
                raise JaxquantError("cannot tell the number of classes of this model; give --class-labels")
            classes = list(range(n_cls))
        else:
            classes = _parse_class_labels(args.class_labels)
        return np.repeat(np.asarray(classes, np.int64), per_class), classes, per_class
    if args.per_class is not None or args.grid_rows is not None:
        raise JaxquantError("--per-class/--grid-rows need --class-labels or --classes all")
    num = 64 if args.num is None else args.num
    if num < 1:
        raise JaxquantError(f"--num must be at least 1 (got {num})")
    if not model.is_class_conditional:
        return None, None, 0
    if n_cls is None:
        raise JaxquantError("cannot tell the number of classes of this model to draw random labels; "
                            "give --class-labels")
    return np.random.default_rng(args.seed).integers(0, n_cls, num), None, 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import jaxquant
    from jaxquant.diffusion.pipeline import default_steps, generate
    from jaxquant.images import save_grid, save_samples_npz

    model = jaxquant.load(args.model)
    labels, classes, per_class = _sample_plan(model, args)
    total = len(labels) if labels is not None else (64 if args.num is None else args.num)
    steps = default_steps(model) if args.steps is None else args.steps
    batch = min(64, total) if args.batch_size is None else args.batch_size
    images = generate(model, total, steps=steps, sampler=args.sampler, eta=args.eta, seed=args.seed,
                      batch_size=batch, labels=labels, cfg_scale=args.cfg_scale, resume_dir=args.resume)
    npz = save_samples_npz(images, args.out, labels)
    scale = 2 if images.shape[1] < 64 else 1
    png_path = Path(args.out).with_suffix(".png")
    if classes is not None:
        rows = min(len(classes), GRID_MAX_CLASS_ROWS if args.grid_rows is None else args.grid_rows)
        png = save_grid(images[: rows * per_class], png_path, nrow=per_class, scale=scale)
        grid = f"{rows} of {len(classes)} class rows x {per_class}" if rows < len(classes) else \
            f"a row per class, {rows} x {per_class}"
    else:
        shown = min(64 if args.grid is None else args.grid, total)
        png = save_grid(images[:shown], png_path, scale=scale)
        grid = f"{shown} images"
    what = f"{total} images, uint8 NHWC" + (", labels in arr_1" if labels is not None else "")
    guided = f", cfg scale {args.cfg_scale:g}" if args.cfg_scale != 1.0 else ""
    print(f"{args.sampler}-{steps}{guided}: wrote {npz} ({what}) and {png} ({grid})")
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


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from jaxquant.eval.evaluate import evaluate, format_report

    result = evaluate(args.samples, args.ref, args.features, batch_size=args.batch_size,
                      num_samples=args.num, progress=not args.no_progress)
    print(format_report(result))
    if args.json is not None:
        out = Path(args.json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise JaxquantError(f"cannot write {out}: {e}") from None
        print(f"wrote {out}")
    return 0


def info_report(model: str) -> dict:
    """Storage of a model directory as a JSON-able dict (what ``jaxquant info --json`` prints).

    Keys: ``model``, ``architecture``, ``layers`` (one row per stored leaf: name, kind,
    config, num_weights, bits, bytes, bits_per_weight, detail), ``totals`` (all leaves
    and the quantized ones) and ``disk`` (bytes of ``params/`` on disk).
    """
    from jaxquant.io.model_dir import load_model_dir, params_disk_bytes, resolve_model_path
    from jaxquant.quant.accounting import storage_report

    path = resolve_model_path(model)
    meta, params = load_model_dir(path)
    report = storage_report(params)
    q = report.quantized
    layers = [{"name": r.name, "kind": r.kind, "config": r.config or r.kind, "num_weights": r.num_weights,
               "bits": r.bits, "bytes": -(-r.bits // 8), "bits_per_weight": r.bits_per_weight,
               "detail": r.detail} for r in report.layers]
    disk = params_disk_bytes(path)
    return {
        "model": str(path),
        "architecture": meta.architecture,
        "layers": layers,
        "totals": {
            "layers": len(report.layers), "num_weights": report.num_weights, "bits": report.total_bits,
            "bytes": report.total_bytes, "bits_per_weight": report.bits_per_weight,
            "quantized_layers": len(q), "quantized_weights": sum(r.num_weights for r in q),
            "quantized_bits": sum(r.bits for r in q),
            "bits_per_quantized_weight": report.bits_per_quantized_weight if q else None,
        },
        "disk": {"params_bytes": disk, "params_bytes_over_accounted": disk / max(report.total_bytes, 1)},
    }


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from jaxquant.quant.accounting import LayerStorage, StorageReport

    info = info_report(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    report = StorageReport([LayerStorage(r["name"], r["kind"], r["num_weights"], r["bits"], r["detail"], r["config"])
                            for r in info["layers"]])
    t = info["totals"]
    print(f"{info['model']} ({info['architecture']})")
    print(report.table())
    line = f"average bits per weight: {t['bits_per_weight']:.3f} over all {t['num_weights']} weights"
    if t["quantized_layers"]:
        line += (f"; {t['bits_per_quantized_weight']:.3f} per quantized weight "
                 f"({t['quantized_weights']} weights in {t['quantized_layers']} layers)")
    print(line)
    d = info["disk"]
    print(f"params/ on disk: {d['params_bytes']} bytes ({d['params_bytes_over_accounted']:.3f} x the "
          f"{t['bytes']} bytes accounted; the rest is orbax metadata, less its zstd compression)")
    return 0


def _calib_config(args: argparse.Namespace, xtx: bool):
    from jaxquant.calib import CalibConfig

    return CalibConfig(num_samples=args.num_samples, steps=args.steps, groups=1 if args.groups is None else args.groups,
                       batch_size=args.batch_size, cfg_scale=args.cfg_scale, seed=args.seed,
                       reservoir=args.reservoir, xtx=xtx, memory_limit_mb=args.memory_limit_mb)


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int, default=64, help="calibration trajectories")
    p.add_argument("--steps", type=int, default=20, help="sampler steps per trajectory")
    p.add_argument("--groups", type=int, default=1, help="timestep groups (a scale per group)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (class-conditional models)")
    p.add_argument("--reservoir", type=int, default=4096, help="activation values kept per site and group")
    p.add_argument("--memory-limit-mb", type=int, default=2048, help="bound on XᵀX accumulators held at once")
    p.add_argument("--seed", type=int, default=0)


def _add_gptq_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gptq", action="store_true",
                   help="uniform, rd: choose weight codes by sequential rounding with error feedback on the "
                        "calibration's XᵀX (GPTQ) instead of rounding to nearest; same size, needs a calibration "
                        "with XᵀX")
    p.add_argument("--gptq-damp", type=float, default=0.01, metavar="D",
                   help="--gptq: D · mean(diag XᵀX) added to the diagonal (default 0.01)")


def _weight_config(args: argparse.Namespace, **kw):
    """The uniform weight quantizer the flags describe (``bits`` from ``kw``, if any)."""
    from jaxquant.quant.uniform import WeightQuantConfig

    return WeightQuantConfig(symmetric=args.symmetric, group_size=args.group_size, error_feedback=args.gptq,
                             damp=args.gptq_damp, **kw)


def _add_rd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distortion", choices=["mse", "mse+ssim"], default="mse",
                   help="rd: output distortion, normalised MSE or MSE + (1 - SSIM) (seed 002)")
    p.add_argument("--rd-inputs", type=int, default=8, metavar="N",
                   help="rd: calibration inputs per timestep group the curves are measured on")
    p.add_argument("--rd-lookahead", type=int, default=None, metavar="K",
                   help="rd: measure the distortion on the clean sample predicted after K further float DDIM "
                        "steps (0: at the perturbed step) instead of the network output (default: the seed's)")
    p.add_argument("--rd-features", default=None, metavar="NET",
                   help="rd: measure the distortion on this feature network's features (e.g. fmnist) of the "
                        "predicted clean sample, not on pixels; implies --rd-lookahead 0 unless given")
    p.add_argument("--rd-trajectory", action="store_true",
                   help="rd: measure along whole trajectories: the site quantized at every step of its timestep "
                        "group from the group's first step, the final sample compared (errors that accumulate "
                        "over steps count; a trajectory of forward passes per input)")
    p.add_argument("--rd-feature-output", choices=["pool", "logits"], default="pool",
                   help="rd: which output of --rd-features is compared")
    p.add_argument("--rd-max-a-bits", type=int, default=8, metavar="B",
                   help="rd: widest activation candidate, 8..16 (default 8, the seed's 4..8); above 8 the "
                        "candidates are 10, 12, ..., B, with the calibration's full range, so that at an average "
                        "of --a-bits a few sensitive sites can be kept wider at the others' expense")
    p.add_argument("--rd-min-a-bits", type=int, default=4, metavar="B",
                   help="rd: narrowest activation candidate, 2..4 (default 4, the seed's 4..8); below 4 an "
                        "average of 4 bits leaves the allocation a choice (insensitive sites narrower, so that "
                        "sensitive ones can be wider)")


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import jaxquant
    from jaxquant.calib import calibrate

    model = jaxquant.load(args.model)
    calib = calibrate(model, _calib_config(args, xtx=not args.no_xtx), out_dir=args.out)
    print(f"wrote {args.out}: {len(calib.sites)} sites, {calib.inputs.shape[1]} trajectories x "
          f"{calib.inputs.shape[0]} steps, {calib.config.groups} timestep group(s)")
    return 0


def _load_or_calibrate(args: argparse.Namespace, model, xtx: bool):
    """The calibration named by ``--calib``, or a fresh one from the calibration flags."""
    from jaxquant.calib import calibrate, load_calibration

    if args.calib:
        calib = load_calibration(args.calib)
        if args.groups not in (None, calib.config.groups):
            raise JaxquantError(f"--groups {args.groups} differs from the calibration's {calib.config.groups} groups")
        if xtx and not calib.xtx:
            raise JaxquantError(f"calibration '{args.calib}' has no XᵀX statistics (made with --no-xtx?)")
        return calib
    return calibrate(model, _calib_config(args, xtx=xtx))


def _act_config(args: argparse.Namespace):
    """The :class:`~jaxquant.quant.quantize.ActQuantConfig` of ``jaxquant quantize``'s
    activation options (``--a-bits-at REGEX=BITS`` becomes ``site_bits``)."""
    from jaxquant.quant.quantize import ActQuantConfig

    site_bits = []
    for item in args.a_bits_at or ():
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise JaxquantError(f"--a-bits-at {item!r}: expected REGEX=BITS, e.g. "
                                r"'up_blocks\.3\.resnets\.\d+\.conv_shortcut\.input_quant=16'")
        site_bits.append((pattern, int(bits)))
    if site_bits and args.a_bits is None:
        raise JaxquantError("--a-bits-at needs quantized activations (--a-bits 4..8)")
    return ActQuantConfig(bits=args.a_bits, method=args.act_method, softmax_bits=args.softmax_bits,
                          site_bits=tuple(site_bits))


def _quantize_uniform(args: argparse.Namespace, model) -> tuple[dict, dict]:
    """``--method uniform``: per-channel uniform weights, per-group activation ranges."""
    from jaxquant.quant.quantize import quantize_uniform
    from jaxquant.quant.rules import load_rules
    from jaxquant.quant.uniform import WeightQuantConfig

    if args.w_bits != int(args.w_bits):
        raise JaxquantError(f"--method uniform needs an integer --w-bits (got {args.w_bits}); aq and rd take averages")
    wcfg = _weight_config(args, bits=int(args.w_bits))
    acfg = _act_config(args)
    rules = load_rules(args.rules, lambda d: WeightQuantConfig(**d)) if args.rules else None
    calib = (_load_or_calibrate(args, model, xtx=wcfg.error_feedback)
             if acfg.bits is not None or wcfg.error_feedback else None)
    params = quantize_uniform(model, calib, wcfg, acfg, rules)
    return params, {
        "method": "uniform", "w_bits": int(args.w_bits), "a_bits": args.a_bits,
        "timestep_groups": calib.config.groups if calib else None, "symmetric": args.symmetric,
        "group_size": args.group_size, "act_method": args.act_method, "softmax_bits": args.softmax_bits,
        "a_bits_at": [list(x) for x in acfg.site_bits], "gptq": args.gptq,
        "gptq_damp": args.gptq_damp if args.gptq else None, "rules": args.rules}


#: ``jaxquant quantize --method M``: fn(args, model) -> (quantized params, manifest dict).
QUANTIZE_METHODS: dict = {"uniform": _quantize_uniform}


def _aq_rule_config(value):
    """A ``--rules`` entry's config for ``--method aq``: ``{}``/``"auto"`` lets the planner
    choose, ``"2x8 g9"`` or ``{num_codebooks, nbits, group_size}`` fixes the configuration."""
    from jaxquant.quant.aq_model import AQConfig

    if value in ({}, "auto"):
        return "auto"
    if isinstance(value, str):
        return AQConfig.parse(value)
    try:
        return AQConfig(**value)
    except TypeError as e:
        raise JaxquantError(f"AQ rule config {value!r}: {e}; expected {{num_codebooks, nbits, group_size}}, "
                            "'MxB gG' or 'auto'") from None


def _quantize_aq(args: argparse.Namespace, model) -> tuple[dict, dict]:
    """``--method aq``: additive quantization (AQUATIC-Diff) planned to an average of
    ``--w-bits`` stored bits per weight (or the paper's ``--aq-preset``), optional block
    fine-tuning, activations at ``--a-bits``; resumable from ``--aq-progress``."""
    from jaxquant.quant.additive import DEFAULT_MAX_ITERS
    from jaxquant.quant.aq_model import DEFAULT_MIN_CODE_BITS, check_aq_budget, plan_table, preset_plan, quantize_aq
    from jaxquant.quant.rules import layer_kernels, load_rules

    if args.aq_rounds is not None and args.aq_rounds < 1:
        raise JaxquantError(f"--aq-rounds must be at least 1, got {args.aq_rounds}")
    acfg = _act_config(args)
    rules = load_rules(args.rules, _aq_rule_config) if args.rules else None
    floor = args.aq_min_code_bits  # with --aq-preset, given: an error from quantize_aq
    if floor is None and not args.aq_preset:
        floor = DEFAULT_MIN_CODE_BITS
    if not args.aq_preset:  # an infeasible --w-bits fails here, not after calibrating
        check_aq_budget(model.params, float(args.w_bits), rules=rules, planning=args.aq_planning or "gaussian",
                        min_code_bits=floor)
    calib = _load_or_calibrate(args, model, xtx=True)
    progress_dir = args.aq_progress or f"{str(args.out).rstrip('/')}.progress"
    plan = None
    if args.aq_preset:
        from jaxquant.quant.aq_model import resolve_aq_rules

        kernels = layer_kernels(model.params)
        names, _ = resolve_aq_rules(kernels, rules)
        plan = preset_plan({n: kernels[n] for n in names}, args.aq_preset)
    result = quantize_aq(model, calib, None if plan else float(args.w_bits), acfg, plan=plan, rules=rules,
                         beam_size=args.beam, finetune_steps=args.finetune_steps,
                         code_update_every=args.code_update_every, code_budget=args.code_budget,
                         layer_weighting=args.aq_weighting, min_code_bits=floor,
                         planning=args.aq_planning or "gaussian", progress_dir=progress_dir,
                         aq_options=None if args.aq_rounds is None else {"max_iters": args.aq_rounds},
                         key=args.seed)
    kernels = layer_kernels(model.params)
    print(plan_table(kernels, result.plan))
    print(result.table())
    return result.params, {
        "method": "aq", "w_bits": None if args.aq_preset else float(args.w_bits), "preset": args.aq_preset,
        "a_bits": args.a_bits, "timestep_groups": calib.config.groups, "beam": args.beam,
        "rounds": args.aq_rounds or DEFAULT_MAX_ITERS,
        "weighting": None if args.aq_preset else (args.aq_weighting or "sensitivity"),
        "min_code_bits": floor, "planning": None if args.aq_preset else (args.aq_planning or "gaussian"),
        "finetune_steps": args.finetune_steps, "code_update_every": args.code_update_every,
        "code_budget": args.code_budget, "act_method": args.act_method, "softmax_bits": args.softmax_bits,
        "a_bits_at": [list(x) for x in acfg.site_bits], "rules": args.rules,
        "plan": {n: c.describe() for n, c in result.plan.items()},
        "blocks": result.blocks}


QUANTIZE_METHODS["aq"] = _quantize_aq


def _rd_configs(args: argparse.Namespace, a_bits):
    """``(weights, acts, rules, curve config)`` of ``--method rd`` / ``rd-curves`` (curves
    made by either are reused by the other when these agree)."""
    from jaxquant.quant.quantize import ActQuantConfig
    from jaxquant.quant.rules import load_rules
    from jaxquant.quant.uniform import WeightQuantConfig
    from jaxquant.search.rd import CurveConfig, act_candidates

    wcfg = _weight_config(args)
    acfg = None if a_bits is None else ActQuantConfig(bits=min(max(int(round(a_bits)), 4), 8), method=args.act_method,
                                                      softmax_bits=args.softmax_bits)
    rules = load_rules(args.rules, lambda d: WeightQuantConfig(**d)) if args.rules else None
    reference = getattr(args, "rd_conditional_weights", None) or "float"
    return wcfg, acfg, rules, CurveConfig(act_bits=act_candidates(args.rd_max_a_bits, args.rd_min_a_bits),
                                          inputs_per_group=args.rd_inputs, seed=args.seed,
                                          lookahead=args.rd_lookahead, features=args.rd_features,
                                          feature_output=args.rd_feature_output, trajectory=args.rd_trajectory,
                                          context_reference=reference)


def _quantize_rd(args: argparse.Namespace, model) -> tuple[dict, dict]:
    """``--method rd``: rate–distortion mixed precision (seed 002): single-site curves of
    every weight and activation, Lagrangian allocation to average ``--w-bits`` /
    ``--a-bits`` (activation bits per timestep group); curves resume from ``--curves``."""
    from jaxquant.search.rd import check_rd_budget, quantize_model_rd

    if args.a_bits_at:
        raise JaxquantError("--a-bits-at is for --method uniform and aq: rd chooses every site's bits itself")
    wcfg, acfg, rules, ccfg = _rd_configs(args, args.a_bits)
    check_rd_budget(args.w_bits, args.a_bits, ccfg, args.rd_min_w_bits)  # before calibrating
    calib = _load_or_calibrate(args, model, xtx=wcfg.error_feedback)
    report_dir = f"{str(args.out).rstrip('/')}.rd"
    curves_dir = args.curves or report_dir
    result = quantize_model_rd(model, calib, args.w_bits, args.a_bits, weights=wcfg, acts=acfg, rules=rules,
                               config=ccfg, distortion=args.distortion, out_dir=report_dir, curves_dir=curves_dir,
                               min_weight_bits=args.rd_min_w_bits,
                               conditional_weights=args.rd_conditional_weights is not None,
                               additivity_plans=args.rd_additivity,
                               plots=not args.no_plots)
    plan = result.plan
    print(Path(result.files["report"]).read_text().rstrip())
    return result.params, {
        "method": "rd", "w_bits": args.w_bits, "a_bits": args.a_bits, "distortion": args.distortion,
        "timestep_groups": calib.config.groups, "symmetric": args.symmetric, "group_size": args.group_size,
        "gptq": args.gptq, "gptq_damp": args.gptq_damp if args.gptq else None,
        "act_method": args.act_method, "softmax_bits": args.softmax_bits, "rules": args.rules,
        "rd_inputs": args.rd_inputs, "rd_min_w_bits": args.rd_min_w_bits,
        "rd_lookahead": ccfg.lookahead, "rd_features": args.rd_features,
        "rd_feature_output": args.rd_feature_output if args.rd_features else None,
        "rd_trajectory": args.rd_trajectory, "rd_conditional_weights": args.rd_conditional_weights,
        "rd_act_candidates": list(ccfg.act_bits),
        "curves": str(curves_dir),
        "predicted_distortion": plan.predicted,
        "measured_distortion": result.measured,
        "additivity_r2": result.additivity.r2 if result.additivity is not None else None,
        "weight_bits": plan.weight_bits, "act_bits": {k: list(v) for k, v in plan.act_bits.items()}}


QUANTIZE_METHODS["rd"] = _quantize_rd


def _parse_alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alpha takes a number in [0, 1] or 'auto', got {text!r}") from None


def _cmd_smooth(args: argparse.Namespace) -> int:
    import json

    import jaxquant
    from jaxquant.calib import load_calibration
    from jaxquant.io.model_dir import save_model_dir
    from jaxquant.quant.rules import load_rules
    from jaxquant.quant.smooth import DEFAULT_ALPHAS, AlphaSearchConfig, channel_absmax, search_alphas, smooth_model, smoothed_layers

    model = jaxquant.load(args.model)
    calib = load_calibration(args.calib)
    rules = load_rules(args.rules, lambda d: d) if args.rules else None
    if args.alpha != "auto":
        smoothed = smooth_model(model, calib, args.alpha, rules=rules, layers=args.layers)
        save_model_dir(args.out, smoothed.meta, smoothed.params)
        print(f"wrote {args.out}: a float model with smoothed layer inputs (alpha {args.alpha}, {args.layers} layers: "
              f"{len(smoothed_layers(model, rules, args.layers))}); calibrate it anew before quantizing")
        return 0

    from jaxquant.quant.quantize import ActQuantConfig
    from jaxquant.quant.uniform import WeightQuantConfig

    if args.a_bits is None:
        raise JaxquantError("--alpha auto needs --a-bits (and --w-bits): the target the layers are scored at")
    cfg = AlphaSearchConfig(WeightQuantConfig(bits=args.w_bits, symmetric=args.symmetric),
                            ActQuantConfig(bits=args.a_bits, method=args.act_method),
                            groups=args.groups or calib.config.groups,
                            alphas=tuple(args.alphas) if args.alphas else DEFAULT_ALPHAS,
                            num_inputs=args.num_inputs, seed=args.seed, criterion=args.criterion)
    amax = channel_absmax(model, calib, smoothed_layers(model, rules, args.layers))
    choices = search_alphas(model, calib, cfg, rules=rules, act_absmax=amax, layers=args.layers)
    smoothed = smooth_model(model, calib, {n: c.alpha for n, c in choices.items()}, rules=rules, act_absmax=amax,
                            layers=args.layers)
    save_model_dir(args.out, smoothed.meta, smoothed.params)
    key = lambda a: "none" if a is None else f"{a:g}"  # noqa: E731
    report = {"target": {"w_bits": args.w_bits, "a_bits": args.a_bits, "groups": cfg.groups,
                         "act_method": args.act_method, "symmetric": args.symmetric},
              "criterion": cfg.criterion, "alphas": list(cfg.alphas), "num_inputs": cfg.num_inputs, "calibration": str(args.calib),
              "layers": {n: {"alpha": c.alpha, "gain": c.gain, "errors": {key(a): e for a, e in c.errors.items()}}
                         for n, c in choices.items()}}
    (Path(args.out) / "smoothing.json").write_text(json.dumps(report, indent=1))
    counts: dict[str, int] = {}
    for c in choices.values():
        counts[key(c.alpha)] = counts.get(key(c.alpha), 0) + 1
    unsmoothed = sum(c.errors[None] for c in choices.values())
    chosen = sum(c.errors[c.alpha] for c in choices.values())
    print(f"alpha per layer at W{args.w_bits}A{args.a_bits} ({cfg.groups} timestep groups): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print(f"summed relative {cfg.criterion} error {unsmoothed:.4g} unsmoothed -> {chosen:.4g} chosen "
          f"({unsmoothed / max(chosen, 1e-30):.2f}x lower)")
    if not args.no_plots:
        from jaxquant.search.plots import plot_smoothing

        png = plot_smoothing(choices, Path(args.out) / "smoothing.png",
                             f"smoothing per layer at W{args.w_bits}A{args.a_bits}, {cfg.criterion} error")
        print(f"plot: {png}")
    print(f"wrote {args.out} (choices in {Path(args.out) / 'smoothing.json'}): a float model with smoothed layer "
          f"inputs; calibrate it anew before quantizing")
    return 0


def _add_refinement_args(parser: argparse.ArgumentParser) -> None:
    """The arguments of a command that refines a quantized model against its float model."""
    parser.add_argument("model", help="quantized model directory")
    parser.add_argument("--calib", required=True, help="calibration directory of the float model")
    parser.add_argument("--float", default=None, help="the float model it was quantized from (default: the one "
                                                      "its config.json names)")


def _float_source(qmodel, args: argparse.Namespace) -> str:
    """``--float``, else the float model the quantized model's config names; refuses a model
    with neither quantized weights nor activation quantizers (nothing to refine)."""
    import jax

    from jaxquant.quant.activation import is_act_quant
    from jaxquant.quant.dispatch import is_quantized_weight

    def stored(x):
        return is_quantized_weight(x) or is_act_quant(x)

    if not any(stored(leaf) for leaf in jax.tree_util.tree_leaves(qmodel.params, is_leaf=stored)):
        raise JaxquantError(f"{args.model} is a float model (no quantized weights or activation quantizers): "
                            f"quantize it first with `jaxquant quantize`, then refine the result")
    source = args.float or qmodel.meta.extra.get("quantized", {}).get("source")
    if not source:
        raise JaxquantError(f"{args.model} does not name the float model it was quantized from; pass --float")
    return source


def _cmd_finetune(args: argparse.Namespace) -> int:
    import json

    import jaxquant
    from jaxquant.calib import load_calibration
    from jaxquant.io.model_dir import save_model_dir
    from jaxquant.quant.accounting import storage_report
    from jaxquant.quant.aq_model import RECONSTRUCT_LR, finetune_model

    qmodel = jaxquant.load(args.model)
    source = _float_source(qmodel, args)
    if args.steps <= 0:
        raise JaxquantError(f"--steps must be positive, got {args.steps}")
    lr = RECONSTRUCT_LR if args.lr is None else args.lr
    params, records = finetune_model(qmodel, qmodel.params, jaxquant.load(source).params,
                                     load_calibration(args.calib), steps=args.steps, lr=lr,
                                     lr_relative=not args.absolute_lr, batch_size=args.batch,
                                     eval_pairs=args.eval_pairs, key=args.seed, blocks=args.blocks,
                                     unroll=args.unroll, step_loss=args.step_loss,
                                     balance_steps=args.balance_steps,
                                     min_snr_gamma=args.min_snr_gamma, ema=args.ema)
    meta = qmodel.meta
    earlier = list(meta.extra.get("finetune_earlier", []))
    if "finetune" in meta.extra:  # a model tuned before (blocks, then the network): keep that record too
        earlier.append(meta.extra["finetune"])
    meta.extra = {**meta.extra, "finetune": {"float": str(source), "calibration": str(args.calib),
                                             "steps": args.steps, "lr": lr,
                                             "lr_relative": not args.absolute_lr, "batch": args.batch,
                                             "seed": args.seed, "blocks": [r["block"] for r in records],
                                             **({"unroll": args.unroll} if args.unroll != 1 else {}),
                                             **({"step_loss": True} if args.step_loss else {}),
                                             **({"balance_steps": True} if args.balance_steps else {}),
                                             **({"min_snr_gamma": args.min_snr_gamma}
                                                if args.min_snr_gamma is not None else {}),
                                             **({"ema": args.ema} if args.ema is not None else {})}}
    if earlier:
        meta.extra["finetune_earlier"] = earlier
    save_model_dir(args.out, meta, params)
    (Path(args.out) / "finetune.json").write_text(json.dumps(records, indent=1))
    for r in records:
        what = f"{r['unroll']}-step DDIM state error" if "unroll" in r else "block output error"
        print(f"{r['block']:<24} {what} {r['error_before']:.4g} -> {r['error_after']:.4g}"
              + ("" if r["kept"] else " (not lower: kept as it was)") + f"  {r['seconds']:.0f} s")
        if "unroll" in r:
            print(f"{'':<24} one-step output error {r['one_step_before']:.4g} -> {r['one_step_after']:.4g}")
    rep = storage_report(params)
    print(f"wrote {args.out}: {rep.total_bytes} bytes, {rep.bits_per_weight:.3f} bits per weight overall")
    return 0


def _cmd_bias_correct(args: argparse.Namespace) -> int:
    import json

    import jaxquant
    from jaxquant.calib import load_calibration
    from jaxquant.io.model_dir import save_model_dir
    from jaxquant.quant.accounting import storage_report
    from jaxquant.quant.bias_correction import BiasCorrectionConfig, bias_correct

    qmodel = jaxquant.load(args.model)
    source = _float_source(qmodel, args)
    result = bias_correct(qmodel, jaxquant.load(source), load_calibration(args.calib),
                          BiasCorrectionConfig(num_samples=args.samples, groups=args.groups,
                                               chunk_rows=args.chunk_rows))
    meta = qmodel.meta
    meta.extra = {**meta.extra, "bias_correction": {"float": str(source), "calibration": str(args.calib),
                                                    "samples": args.samples, "groups": result.groups}}
    save_model_dir(args.out, meta, result.params)
    (Path(args.out) / "bias_correction.json").write_text(json.dumps(result.to_json(), indent=1))
    print(result.summary())
    rep = storage_report(result.params)
    print(f"wrote {args.out}: {rep.total_bytes} bytes, {rep.bits_per_weight:.3f} bits per weight overall "
          f"(per-layer results in {Path(args.out) / 'bias_correction.json'})")
    return 0


def _cmd_rd_curves(args: argparse.Namespace) -> int:
    import jaxquant
    from jaxquant.search import plots
    from jaxquant.search.rd import RDProblem, compute_curves

    model = jaxquant.load(args.model)
    wcfg, acfg, rules, ccfg = _rd_configs(args, None if args.weights_only else 8)
    calib = _load_or_calibrate(args, model, xtx=wcfg.error_feedback)
    problem = RDProblem(model, calib, wcfg, acfg, rules, ccfg)
    curves = compute_curves(problem, args.out)
    png = plots.plot_curves(curves, Path(args.out) / "curves.png", args.distortion)
    n_w, n_a = len(curves.of_kind("weight")), len(curves.of_kind("act"))
    print(f"wrote {Path(args.out) / 'curves.json'} ({n_w} weight and {n_a} activation sites, {curves.groups} "
          f"timestep group(s)) and {png}")
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    import jaxquant
    from jaxquant.io.model_dir import save_model_dir
    from jaxquant.quant.accounting import storage_report

    if args.method not in QUANTIZE_METHODS:
        raise JaxquantError(f"--method {args.method} is not available yet (available: {', '.join(QUANTIZE_METHODS)})")
    model = jaxquant.load(args.model)
    params, manifest = QUANTIZE_METHODS[args.method](args, model)
    meta = model.meta
    meta.extra = {**meta.extra, "quantized": {**manifest, "source": str(model.path)}}
    save_model_dir(args.out, meta, params)
    rep = storage_report(params)
    print(f"wrote {args.out}: {rep.total_bytes} bytes, {rep.bits_per_quantized_weight:.3f} bits per quantized "
          f"weight, {rep.bits_per_weight:.3f} bits per weight overall")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``jaxquant`` argument parser: one sub-command per stage, each with ``fn`` set to its handler."""
    p = argparse.ArgumentParser(prog="jaxquant", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a PyTorch checkpoint to a jaxquant model directory")
    c.add_argument("src", help="diffusers folder (config.json + diffusion_pytorch_model.safetensors|.bin), "
                   "or a CompVis .ckpt/.safetensors with --from compvis")
    c.add_argument("--from", dest="source_format", required=True, choices=["diffusers", "compvis"])
    c.add_argument("--config", default=None, help="--from compvis: the model's YAML (e.g. cin256-v2.yaml)")
    c.add_argument("--out", required=True, help="output model directory")
    c.set_defaults(fn=_cmd_convert)
    s = sub.add_parser("sample", help="sample images; writes an ADM-style .npz and a PNG grid",
                       description="Sample images; writes an ADM-style .npz (arr_0: uint8 NHWC images, arr_1: "
                       "class labels of class-conditional models) and a PNG grid next to it. Class-conditional "
                       "models: --class-labels 0,1,2 or --classes all sample --per-class images of each class "
                       "(class-major; the grid has a row per class); otherwise --num images with random labels.")
    s.add_argument("model", nargs="?", default="ddpm-fmnist", help="model directory or shipped name")
    s.add_argument("--num", type=int, default=None,
                   help="number of images (default 64); class-conditional models get random labels")
    cls = s.add_mutually_exclusive_group()
    cls.add_argument("--class-labels", default=None, metavar="L1,L2,…",
                     help="sample these classes, --per-class images each (class-conditional models)")
    cls.add_argument("--classes", choices=["all"], default=None,
                     help="'all': sample every class, --per-class images each (class-conditional models)")
    s.add_argument("--per-class", type=int, default=None,
                   help="images per class with --class-labels/--classes (default 4)")
    s.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance scale (models with an unconditional label, e.g. CompVis LDMs); "
                   "1 = no guidance (default)")
    s.add_argument("--steps", type=int, default=None, help="sampler steps (default: 20 for ldm models, 50 otherwise)")
    s.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise weight")
    s.add_argument("--seed", type=int, default=0, help="batch b starts from noise of fold_in(key(seed), b)")
    s.add_argument("--resume", default=None, metavar="DIR",
                   help="keep finished batches in DIR, so that the same command after a kill samples only the "
                   "missing ones (same images as an uninterrupted run); delete DIR once the .npz is written")
    s.add_argument("--batch-size", type=int, default=None,
                   help="images per jitted call (default: 64, or the number of images if fewer)")
    s.add_argument("--grid", type=int, default=None, help="images in the PNG grid without class labels (default 64)")
    s.add_argument("--grid-rows", type=int, default=None,
                   help=f"class rows in the PNG grid with --class-labels/--classes (default: all, at most "
                   f"{GRID_MAX_CLASS_ROWS})")
    s.add_argument("--out", default="samples.npz")
    s.set_defaults(fn=_cmd_sample)

    d = sub.add_parser("demo", help="sample a grid from the shipped ddpm-fmnist model")
    d.add_argument("--out", default="jaxquant-demo")
    d.add_argument("--num", type=int, default=36)
    d.add_argument("--steps", type=int, default=50)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=_cmd_demo)

    tr = sub.add_parser("train", help="train one of the small shipped models (resumes from --run-dir)")
    tr.add_argument("what", choices=["ddpm", "classifier", "vq", "ldm"],
                    help="ddpm: pixel UNet; classifier: FID feature net; vq: VQ-f4 first stage; "
                    "ldm: class-conditional latent diffusion on a trained vq (--vq)")
    tr.add_argument("--run-dir", required=True, help="checkpoints and log; rerun to resume")
    tr.add_argument("--export", default=None, help="model directory for the EMA weights (default RUN_DIR/model)")
    tr.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX directory")
    tr.add_argument("--vq", default=None, metavar="VQ_MODEL_DIR", help="ldm: the first stage written by `train vq`")
    tr.add_argument("--steps", type=int, default=None,
                    help="total steps (default: ddpm/classifier/vq 3000, ldm 20000)")
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-4)")
    tr.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 200; ldm 500)")
    tr.add_argument("--ema", type=float, default=None, help="EMA decay (default 0.999; ldm 0.9995)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--checkpoint-every", type=int, default=250)
    tr.add_argument("--log-every", type=int, default=50, help="steps between train_log.jsonl lines")
    tr.set_defaults(fn=_cmd_train)

    ev = sub.add_parser("eval", help="FID / sFID / IS / precision-recall of samples against a reference")
    ev.add_argument("samples", help="samples .npz (arr_0: uint8 [N, H, W, C], as written by `jaxquant sample`)")
    ev.add_argument("--ref", required=True, help="reference .npz (guided-diffusion batch) or a built-in "
                    "reference: fashion-mnist-test, fashion-mnist-train")
    ev.add_argument("--features", required=True, metavar="NET",
                    help="feature network: inception, efficientnet-lite0 or fmnist (numbers from a network "
                    "other than inception are labelled with its name)")
    ev.add_argument("--batch-size", type=int, default=100, help="images per feature-network call")
    ev.add_argument("--num", type=int, default=None, help="use only the first N samples")
    ev.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(fn=_cmd_eval)

    cal = sub.add_parser("calibrate", help="record layer inputs along the model's own sampling trajectories")
    cal.add_argument("model", help="model directory or shipped name")
    _add_calib_args(cal)
    cal.add_argument("--no-xtx", action="store_true", help="skip the XᵀX statistics (only needed by AQ)")
    cal.add_argument("--out", required=True, help="calibration directory (rerun to resume)")
    cal.set_defaults(fn=_cmd_calibrate)

    sm = sub.add_parser("smooth", help="move input-channel range from activations into weights (SmoothQuant); "
                                       "writes a float model that computes the same function")
    sm.add_argument("model", help="model directory or shipped name (float)")
    sm.add_argument("--calib", required=True, help="a calibration of MODEL (jaxquant calibrate; --no-xtx suffices)")
    sm.add_argument("--alpha", type=_parse_alpha, default=0.5,
                    help="migration strength in [0, 1]: s_j = max|x_j|^alpha / max|W_j|^(1-alpha); 'auto': per layer, "
                         "the strength (or none) with the smallest layer output error at --w-bits/--a-bits")
    sm.add_argument("--w-bits", type=int, default=8, help="auto: the target's weight bits (uniform, per channel)")
    sm.add_argument("--a-bits", type=int, default=None, help="auto: the target's activation bits")
    sm.add_argument("--groups", type=int, default=None,
                    help="auto: the target's timestep groups (activation ranges per group; default: the calibration's)")
    sm.add_argument("--act-method", choices=["mse", "percentile", "minmax"], default="mse",
                    help="auto: how the target chooses activation ranges")
    sm.add_argument("--symmetric", action="store_true", help="auto: symmetric weight quantizer")
    sm.add_argument("--alphas", type=float, nargs="+", default=None, metavar="A",
                    help="auto: the strengths tried (default 0, 0.1, ..., 1), besides no smoothing")
    sm.add_argument("--criterion", choices=["layer", "model"], default="layer",
                    help="auto: score a candidate by the error of the layer's own output, or of the model's output "
                         "with only that layer smoothed and quantized (a forward pass per candidate and step)")
    sm.add_argument("--num-inputs", type=int, default=64, help="auto: calibration inputs the layers are scored on")
    sm.add_argument("--no-plots", action="store_true", help="auto: do not write OUT/smoothing.png")
    sm.add_argument("--seed", type=int, default=0, help="auto: which inputs and values are used")
    sm.add_argument("--rules", default=None, help="YAML rules: the layers they quantize are smoothed "
                                                  "(default: all but the first and last layer)")
    sm.add_argument("--layers", choices=["all", "full-resolution"], default="all",
                    help="smooth all the rules' layers, or only those whose input is at the network's full resolution")
    sm.add_argument("--out", required=True, help="output model directory")
    sm.set_defaults(fn=_cmd_smooth)

    qz = sub.add_parser("quantize", help="quantize weights (and activations) and write a model directory")
    qz.add_argument("model", help="model directory or shipped name")
    qz.add_argument("--method", default="uniform", choices=["uniform", "aq", "rd"])
    qz.add_argument("--w-bits", type=float, default=4,
                    help="uniform: bits of every quantized weight (an integer); aq, rd: the average (e.g. 3.88)")
    qz.add_argument("--a-bits", type=lambda v: None if v in ("none", "32", "float") else int(v), default=8,
                    help="activation bits (4..8, or 'none' to keep activations float)")
    qz.add_argument("--symmetric", action="store_true", help="symmetric weight quantizer (default asymmetric)")
    qz.add_argument("--group-size", type=int, default=None, help="weights per scale (default: per output channel)")
    _add_gptq_args(qz)
    qz.add_argument("--act-method", choices=["mse", "percentile", "minmax"], default="mse")
    qz.add_argument("--softmax-bits", type=int, default=16, help="bits of the attention probabilities")
    qz.add_argument("--a-bits-at", action="append", default=None, metavar="REGEX=BITS",
                    help="uniform, aq: give the activation quantizers whose whole name matches REGEX "
                         "(LAYER.input_quant, ATTENTION.q_quant/k_quant/v_quant/probs_quant) BITS (4..16) "
                         "instead of --a-bits; repeatable, the first match wins; the manifest records them")
    _add_rd_args(qz)
    qz.add_argument("--curves", default=None, metavar="DIR",
                    help="rd: curves directory, resumable and shareable between budgets (default OUT.rd; "
                         "the plan, report and plots always go to OUT.rd)")
    qz.add_argument("--rd-min-w-bits", type=int, default=None, metavar="B",
                    help="rd: no weight layer below B bits (default: any candidate width)")
    qz.add_argument("--rd-conditional-weights", nargs="?", const="float", default=None, choices=["float", "context"],
                    help="rd: plan the activations first, then measure the weight curves with the activations "
                         "quantized as planned (in CURVES/given-acts-<digest>) and allocate the weights on those; "
                         "each weight point is its increase over the planned activations' distortion (float, the "
                         "default) or its error against the output with those activations and float weights "
                         "(context)")
    qz.add_argument("--rd-additivity", type=int, default=16, metavar="N",
                    help="rd: random plans of the additivity check (0: skip)")
    qz.add_argument("--no-plots", action="store_true", help="rd: do not write PNG plots")
    qz.add_argument("--rules", default=None, help="YAML list of {pattern: REGEX, config: {bits: …} | null}")
    qz.add_argument("--calib", default=None, help="calibration directory (default: calibrate now)")
    qz.add_argument("--beam", type=int, default=8, help="aq: beam width of the code search")
    qz.add_argument("--aq-rounds", type=int, default=None, metavar="N",
                    help="aq: most alternations of codebook updates and code search per layer (default: quantize_matrix's "
                    "max_iters, 5; the objective often still falls a few %% per round there)")
    qz.add_argument("--finetune-steps", type=int, default=0,
                    help="aq: Adam steps of block fine-tuning per UNet block (0: none)")
    qz.add_argument("--code-update-every", type=int, default=0,
                    help="aq: PV-style code updates every N fine-tuning steps (0: codes frozen)")
    qz.add_argument("--code-budget", type=float, default=0.01,
                    help="aq: fraction of a layer's codes one code update may change (default 0.01)")
    qz.add_argument("--aq-weighting", choices=["sensitivity", "count"], default=None,
                    help="aq: how the planner weighs each layer's error: by the measured output distortion per "
                    "unit of its error (sensitivity, the default: weight RD curves at 2-4 bits first, a few "
                    "minutes), or by its number of weights (count)")
    qz.add_argument("--aq-min-code-bits", type=float, default=None, metavar="R",
                    help="aq: plan no layer below R code bits per weight (M·B/g; default 1; 0: no floor)")
    qz.add_argument("--aq-planning", choices=["gaussian", "measured"], default=None,
                    help="aq: the planner's distortion model: the proxy fitted on a Gaussian weight over g >= 4 "
                    "(gaussian, the default), or groups of 1 and 2 weights too, a proxy fitted on real layers "
                    "and each layer's offset measured by one AQ run of it (measured, a few minutes more)")
    qz.add_argument("--aq-preset", choices=["W2", "W4"], default=None,
                    help="aq: AQUATIC-Diff's configuration for every layer (2x8 / 4x8, g9 for 3x3 convs, g8 "
                    "otherwise) instead of planning to --w-bits")
    qz.add_argument("--aq-progress", default=None, metavar="DIR",
                    help="aq: finished layers and blocks, to resume a killed run (default OUT.progress)")
    _add_calib_args(qz)
    qz.set_defaults(groups=None)
    qz.add_argument("--out", required=True, help="output model directory")
    qz.set_defaults(fn=_cmd_quantize)

    ft = sub.add_parser("finetune", help="block-by-block fine-tuning of a quantized model (any method)",
                        description="Block reconstruction: each UNet block in turn is tuned with Adam so that its "
                        "outputs match the float block's on the calibration inputs the tuned model feeds it. Codes "
                        "stay fixed; weight scales, activation quantizers' scales (per timestep group, with "
                        "straight-through rounding), smoothing factors, biases and norms are tuned. A block keeps "
                        "its tuned values only if its error on held-out calibration pairs falls.")
    _add_refinement_args(ft)
    ft.add_argument("--steps", type=int, default=200, help="Adam steps per block")
    ft.add_argument("--lr", type=float, default=None,
                    help="learning rate, relative to each array's mean magnitude unless --absolute-lr (default "
                    "jaxquant.quant.aq_model.RECONSTRUCT_LR, 3e-3)")
    ft.add_argument("--absolute-lr", action="store_true", help="use --lr as an absolute step (as AQ's fine-tuning)")
    ft.add_argument("--batch", type=int, default=8, help="calibration pairs per step")
    ft.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs deciding whether a block keeps its "
                                                               "tuned values")
    ft.add_argument("--blocks", nargs="+", default=None,
                    help="only these blocks, in this order (default: all, in execution order); 'network' is the "
                    "whole network tuned end to end on its output error (every float array trains), e.g. after "
                    "the blocks: --blocks network on a block-tuned model")
    ft.add_argument("--unroll", type=int, default=1, metavar="K",
                    help="with --blocks network: the loss follows K consecutive DDIM steps of the calibration's "
                    "sampler from each calibration input (the quantized and the float model each from its own "
                    "state, gradients through all K), charging the model for the state errors it hands on "
                    "(default 1: one model call per pair)")
    ft.add_argument("--step-loss", action="store_true",
                    help="with --blocks network: the loss is the error of the DDIM state after --unroll steps, the "
                    "sampler's clip of x0 included, also for one step (implied by --unroll above 1; default for "
                    "one step: the error of the model's eps, which does not see the clip)")
    ft.add_argument("--balance-steps", action="store_true",
                    help="with --step-loss or --unroll: divide each sampler step's term by its value before the "
                    "stage, so that every step counts alike (unbalanced, the last step's error rules the loss)")
    ft.add_argument("--min-snr-gamma", type=float, default=None, metavar="G",
                    help="weight each calibration pair's error by min(SNR_t, G)/SNR_t (Min-SNR weighting), so the "
                    "nearly clean last steps, whose eps the sampler scales by ~0.01, stop ruling the loss "
                    "(default: unweighted)")
    ft.add_argument("--ema", type=float, default=None, metavar="D",
                    help="keep the exponential moving average of the Adam iterates with decay D (e.g. 0.995, a "
                    "window of about 1/(1-D) steps) instead of the last iterate, averaging out the last "
                    "minibatches' noise (default: the last iterate)")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--out", required=True, help="output model directory")
    ft.set_defaults(fn=_cmd_finetune)

    bc = sub.add_parser("bias-correct", help="add per-timestep-group bias corrections to a quantized model",
                        description="Empirical bias correction (Nagel et al. 2019) per timestep group: each dense "
                        "and conv layer's output is shifted so its mean over the calibration's inputs, per output "
                        "channel, equals the float model's, layers corrected in execution order.")
    _add_refinement_args(bc)
    bc.add_argument("--samples", type=int, default=64, help="calibration trajectories used at every step")
    bc.add_argument("--groups", type=int, default=None, help="timestep groups (default: the calibration's)")
    bc.add_argument("--chunk-rows", type=int, default=256, help="inputs per forward pass")
    bc.add_argument("--out", required=True, help="output model directory")
    bc.set_defaults(fn=_cmd_bias_correct)

    rdc = sub.add_parser("rd-curves", help="rate–distortion curves of every weight and activation site, and their plot",
                         description="Output distortion of the whole model when only one site (a layer's weights "
                         "or an activation) is quantized, for every site and bit width, per timestep group; "
                         "written to OUT/curves.json (rerun to resume) and plotted to OUT/curves.png. "
                         "`jaxquant quantize --method rd --curves OUT` reuses them.")
    rdc.add_argument("model", help="model directory or shipped name")
    rdc.add_argument("--out", required=True, help="curves directory (rerun to resume)")
    rdc.add_argument("--calib", default=None, help="calibration directory (default: calibrate now)")
    rdc.add_argument("--rules", default=None, help="YAML rules choosing the layers (their bits are ignored)")
    rdc.add_argument("--symmetric", action="store_true", help="symmetric weight quantizer (default asymmetric)")
    rdc.add_argument("--group-size", type=int, default=None, help="weights per scale (default: per output channel)")
    _add_gptq_args(rdc)
    rdc.add_argument("--act-method", choices=["mse", "percentile", "minmax"], default="mse")
    rdc.add_argument("--softmax-bits", type=int, default=16, help="bits of the attention probabilities")
    rdc.add_argument("--weights-only", action="store_true", help="no activation sites")
    _add_rd_args(rdc)
    _add_calib_args(rdc)
    rdc.set_defaults(groups=None, fn=_cmd_rd_curves)

    inf = sub.add_parser("info", help="per-layer storage of a model directory: bytes, bits per weight, size on disk")
    inf.add_argument("model", help="model directory or shipped name")
    inf.add_argument("--json", action="store_true", help="print the table and totals as JSON")
    inf.set_defaults(fn=_cmd_info)
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
