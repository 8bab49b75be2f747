"""Quality, size and speed of quantized models: the results tables of BENCHMARKS.md.

For each configuration of one model: quantize it with the same code path as
``jaxquant quantize`` (the CLI's method table), sample ``--num`` images with DDIM, and
evaluate them against the Fashion-MNIST test set (FID / sFID / IS / precision / recall
under the chosen feature network). Also recorded per configuration: the model's
storage (bytes, bits per weight) and the sampling throughput of the jitted per-batch
function (images/s after compilation), so quantized and float models are timed the same
way in the same run.

Configurations are short names:

    fp                      the float model
    uniform-w4a8            jaxquant quantize --method uniform --w-bits 4 --a-bits 8
    uniform-w4af            float activations (--a-bits none)
    uniform-w4a8-g4         ... with 4 timestep groups (one calibration per group count)
    aq-w2a8                 --method aq --w-bits 2 --a-bits 8
    aq-w2a8-ft100           ... with 100 steps of block fine-tuning (--finetune-steps 100)
    aq-w2a8-ft100-cu10      ... and PV-style code updates every 10 steps (--code-update-every 10)
    aq-w2a8-ft100-count     ... planned with every weight alike (--aq-weighting count; the default,
                            by measured layer sensitivity, may be named with -sens)
    aq-w2a8-ft100-rmin1     ... no layer below 1 code bit per weight (--aq-min-code-bits 1, the CLI's
                            default; 0p5: 0.5). Without -rminR: no floor (--aq-min-code-bits 0)
    aq-w2a8-ft100-sens-rmin1p5-plm  ... planned with --aq-planning measured (groups of 1-2
                            weights too, the proxy fitted on real layers, offsets measured per layer)
    aq-w2a8-ft100-rec300-net600-fa  the model named without -fa, sampled with its activation
                            quantizers removed (its tuned parameters kept): what its weights cost alone;
                            the bytes reported are the stored model's
    ...-net600-fasc3        ... sampled without the activation quantizers of one set of sites only
                            (ACT_SITE_SETS: sc3, the two shortcut inputs of up_blocks.3)
    aq-w4a8-a16sc3-ft100    ... quantized with one set of activation sites at 16 bits instead of A
                            (--a-bits-at 'PATTERN=16', the set from ACT_SITE_SETS; the tuning stages
                            see them, the bytes are the same). No longer A8 everywhere
    aq-w2a8-ft100-it15      ... at most 15 rounds of codebook updates and code search per layer
                            (--aq-rounds 15; default 5)
    rd-w6a6-g10-ssim        --method rd ... --groups 10 --distortion mse+ssim
    rd-w6a6-g10-wmin5       ... no weight layer below 5 bits (--rd-min-w-bits 5)
    rd-w4a4-g10-la2         ... distortion of x̂₀ two float DDIM steps after the perturbed one
                            (--rd-lookahead 2; curves kept apart, in rd-curves-g10-la2)
    rd-w4a4-g10-feat        ... distortion of the fmnist features of x̂₀ (--rd-features fmnist,
                            lookahead 0 unless -laK; curves in rd-curves-g10-feat)
    rd-w4a4-g1-traj         ... distortion of the final sample of whole trajectories with the site
                            quantized at every step of its group (--rd-trajectory; rd-curves-g1-traj)
    uniform-w8a8-sm50       the model smoothed first (jaxquant smooth --alpha 0.50, SmoothQuant's
                            s_j = max|x_j|^a / max|W_j|^(1-a), from the float model's calib-g1),
                            then calibrated anew (calib-gG-sm50) and quantized as named; any method;
                            -sm50fr: only the layers whose input is at full resolution
                            (--layers full-resolution; smoothed-sm50fr, calib-gG-sm50fr)
    rd-w6a6-g10-smauto      ... strengths per layer (jaxquant smooth --alpha auto) scored at the
                            configuration's W, A and groups (uniform weights at W for aq and rd):
                            smoothed-smauto-w6a6-g10, calib-g10-smauto-w6a6-g10; -smautom: scored by
                            the model's output error with one layer at a time (--criterion model,
                            40 inputs)
    uniform-w6a6-gptq       weight codes by sequential rounding with error feedback on the
                            calibration's XᵀX (--gptq; rd: curves kept apart, rd-curves-gG-...-gptq)
    rd-w6a6-g10-sm50-rec300 the model named without -recN, then block reconstruction with its
                            activation quantizers in place (jaxquant finetune --steps N on the
                            configuration's calibration); any method
    aq-w2a8-ft100-sens-rmin1-rec300-net500
                            ... then the whole network tuned end to end on its output error
                            (jaxquant finetune --blocks network --steps N --lr NETWORK_LR)
    ...-net600-un3s600      ... then 600 more steps of the network stage with a loss that follows 3
                            DDIM steps from each calibration input (jaxquant finetune --blocks
                            network --unroll 3 --steps 600 --lr UNROLL_LR on the -net600 model)
    ...-net600-nc256        ... the network stage on its own calibration of 256 trajectories (no XᵀX,
                            calib-gG-n256; the other stages keep the --calib-samples one)
    ...-net600-nq256        ... on 256 trajectories of the model entering the network stage (its own
                            sampling states, on-policy; no XᵀX, in NAME-WITHOUT-NET-calib-n256); the
                            targets are still the float model's outputs at those inputs
    ...-net600-nq256-ms5    ... the network stage's pairs weighted by min(SNR_t, 5)/SNR_t (jaxquant
                            finetune --min-snr-gamma 5; 2p5: 2.5), so the nearly clean last steps do
                            not rule its loss
    ...-net600-nq256-sd1    ... the network stage run with --seed 1 (its minibatch order and held-out
                            pairs): a second build of the same configuration, for the spread
    ...-nq256-slb-lr1e3     ... the network stage at learning rate 1e-3 instead of its default
                            (NETWORK_LR, or UNROLL_LR with -slK; jaxquant finetune --lr 1e-3)
    ...-net600-nq256-ema995 ... the network stage keeps the moving average of its Adam iterates with
                            decay 0.995 (jaxquant finetune --ema 0.995) instead of the last iterate
    uniform-w8a8-mm         activation ranges from the calibration's full range, no clipping
                            (--act-method minmax; default: MSE-optimal clipping)
    rd-w8a8-g2-ac16         ... activation candidates up to 16 bits (4..8, 10, 12, 14, 16; --rd-max-a-bits
                            16; curves kept apart, in rd-curves-g2-ac16): room above the average
    rd-w4a4-g2-am2-ac16     ... and below 4 bits too (2, 3, ...; --rd-min-a-bits 2; rd-curves-g2-am2-ac16):
                            room below an average of 4
    rd-w4a4-g10-cond        ... weight curves measured with the activations quantized as planned,
                            each point the increase over their distortion (--rd-conditional-weights;
                            in rd-curves-g10/given-acts-<digest>); -condctx: each point the error
                            against the output with those activations (--rd-conditional-weights context)

Every finished configuration is stored in the JSON result (``--out``) and skipped on a
rerun; samples, calibrations and quantized models are kept under ``--work``, so a killed
run resumes where it stopped.

    python -m benchmarks.quality_table --model ddpm-fmnist --configs fp uniform-w8a8 uniform-w4a8 --num 10000
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine

_SPEC = re.compile(r"(?P<method>uniform|aq|rd)-w(?P<w>\d+)a(?P<a>\d+|f)(?P<rest>(-[a-z0-9+]+)*)")


#: The relative learning rate of the -netN end-to-end stage (BENCHMARKS, "End-to-end tuning").
NETWORK_LR = 1e-3

#: The relative learning rate of the -unKsN stage: at NETWORK_LR the unrolled loss's minibatch
#: values spiked and 250 steps did not lower its held-out error; at 3e-4 and 1e-4 600 steps
#: lowered it alike (ddpm-fmnist AQ W4A8, BENCHMARKS, "An unrolled loss").
UNROLL_LR = 3e-4

#: Named sets of activation quantizers (a regular expression on the quantizer's dotted
#: path, ``None``: all of them): those a ``-faSET`` configuration samples without, and
#: those a ``-aBSET`` configuration quantizes at B bits.
ACT_SITE_SETS: dict[str, str | None] = {
    "": None,
    # The two shortcut inputs of the full-resolution up block, where the best AQ W4A8
    # model's activation drift is made (BENCHMARKS, "Where the best W4 model's drift sits").
    "sc3": r"^up_blocks\.3\.resnets\.\d+\.conv_shortcut\.input_quant$",
}


def parse_config(name: str) -> dict:
    """``{"method", "w_bits", "a_bits", "groups", "distortion"}`` of a configuration name."""
    if name == "fp":
        return {"method": "fp"}
    m = _SPEC.fullmatch(name)
    if m is None:
        raise SystemExit(f"bad configuration {name!r}: expected fp or METHOD-wWaA[-gG][-ssim][-wminB][-amN][-acN][-laK][-traj][-feat][-cond|-condctx][-ftN][-cuN][-itN][-sens|-count][-rminR][-plm][-smNN|-smNNfr|-smauto|-smautom][-mm][-gptq][-recN][-netN][-sl|-slb[K]][-unKsN][-ncK|-nqK][-msG][-sdK][-lrNeM][-fa|-faSET][-aBSET] "
                         "(e.g. uniform-w4a8-g4, aq-w2a8-ft100)")
    cfg = {"method": m["method"], "w_bits": int(m["w"]), "a_bits": None if m["a"] == "f" else int(m["a"]),
           "groups": 1, "distortion": "mse", "finetune_steps": 0}
    for part in filter(None, m["rest"].split("-")):
        if re.fullmatch(r"g\d+", part):
            cfg["groups"] = int(part[1:])
        elif re.fullmatch(r"ft\d+", part) and m["method"] == "aq":
            cfg["finetune_steps"] = int(part[2:])
        elif re.fullmatch(r"cu\d+", part) and m["method"] == "aq":
            cfg["code_update_every"] = int(part[2:])
        elif re.fullmatch(r"it\d+", part) and m["method"] == "aq":
            cfg["aq_rounds"] = int(part[2:])
        elif re.fullmatch(r"rmin\d+(p\d+)?", part) and m["method"] == "aq":
            cfg["min_code_bits"] = float(part[4:].replace("p", "."))
        elif part == "plm" and m["method"] == "aq":
            cfg["planning"] = "measured"
        elif re.fullmatch(r"fa[a-z0-9]*", part) and m["method"] != "fp":
            if part[2:] not in ACT_SITE_SETS:
                raise SystemExit(f"bad configuration {name!r}: -{part}: known sets of float activation "
                                 f"sites are {sorted('fa' + k for k in ACT_SITE_SETS)}")
            cfg["float_acts"] = ACT_SITE_SETS[part[2:]] or True
        elif (wide := re.fullmatch(r"a(\d+)([a-z][a-z0-9]*)", part)) and m["method"] in ("uniform", "aq"):
            bits, key = wide.groups()
            if not ACT_SITE_SETS.get(key):
                raise SystemExit(f"bad configuration {name!r}: -{part}: known sets of activation sites are "
                                 f"{sorted(k for k, v in ACT_SITE_SETS.items() if v)}")
            if cfg["a_bits"] is None:
                raise SystemExit(f"bad configuration {name!r}: -{part} needs quantized activations")
            cfg["a_bits_at"] = (ACT_SITE_SETS[key], int(bits))
        elif re.fullmatch(r"wmin\d+", part) and m["method"] == "rd":
            cfg["min_weight_bits"] = int(part[4:])
        elif re.fullmatch(r"ac\d+", part) and m["method"] == "rd":
            cfg["max_act_bits"] = int(part[2:])
        elif re.fullmatch(r"am\d+", part) and m["method"] == "rd":
            cfg["min_act_bits"] = int(part[2:])
        elif re.fullmatch(r"la\d+", part) and m["method"] == "rd":
            cfg["lookahead"] = int(part[2:])
        elif part == "feat" and m["method"] == "rd":
            cfg["features"] = "fmnist"
        elif part == "traj" and m["method"] == "rd":
            cfg["trajectory"] = True
        elif part in ("cond", "condctx") and m["method"] == "rd":
            cfg["conditional_weights"] = "float" if part == "cond" else "context"
        elif part in ("sens", "count") and m["method"] == "aq":
            cfg["weighting"] = "sensitivity" if part == "sens" else "count"
        elif part == "mm":
            cfg["act_method"] = "minmax"
        elif part == "gptq" and m["method"] in ("uniform", "rd"):
            cfg["gptq"] = True
        elif re.fullmatch(r"rec\d+", part):
            cfg["reconstruct_steps"] = int(part[3:])
        elif re.fullmatch(r"net\d+", part):
            cfg["network_steps"] = int(part[3:])
        elif re.fullmatch(r"un[1-9]\d*s\d+", part):
            k, n = part[2:].split("s")
            cfg["unroll"], cfg["unroll_steps"] = int(k), int(n)
        elif (sl := re.fullmatch(r"sl(b?)(\d*)", part)):
            cfg["network_step_loss"] = int(sl[2] or 1)
            if sl[1]:
                cfg["network_balance_steps"] = True
        elif re.fullmatch(r"sd\d+", part):
            cfg["network_seed"] = int(part[2:])
        elif re.fullmatch(r"lr[1-9]e\d+", part):
            cfg["network_lr"] = float(part[2:].replace("e", "e-"))
        elif re.fullmatch(r"ema\d+", part):
            cfg["network_ema"] = float("0." + part[3:])
        elif re.fullmatch(r"ms\d+(p\d+)?", part):
            cfg["network_min_snr"] = float(part[2:].replace("p", "."))
        elif re.fullmatch(r"n[cq]\d+", part):
            cfg["network_calib_samples"] = int(part[2:])
            cfg["network_calib_on_policy"] = part[1] == "q"
        elif re.fullmatch(r"sm\d\d(fr)?", part):
            cfg["smooth"] = int(part[2:4]) / 100
            if part.endswith("fr"):
                cfg["smooth_layers"] = "full-resolution"
        elif part in ("smauto", "smautom"):
            cfg["smooth"] = "auto"
            cfg["smooth_criterion"] = "layer" if part == "smauto" else "model"
        elif part in ("ssim", "mse+ssim"):
            cfg["distortion"] = "mse+ssim"
        else:
            raise SystemExit(f"bad configuration {name!r}: unknown part {part!r}")
    if "unroll" in cfg and not cfg.get("network_steps"):
        raise SystemExit(f"bad configuration {name!r}: -unKsN continues the network stage; it needs -netN")
    if "network_step_loss" in cfg and not cfg.get("network_steps"):
        raise SystemExit(f"bad configuration {name!r}: -slK sets the network stage's loss; it needs -netN")
    if "network_step_loss" in cfg and ("unroll" in cfg or "network_min_snr" in cfg):
        raise SystemExit(f"bad configuration {name!r}: -slK is not combined with -unKsN or -msG")
    if "network_seed" in cfg and not cfg.get("network_steps"):
        raise SystemExit(f"bad configuration {name!r}: -sdK seeds the network stage; it needs -netN")
    if "network_lr" in cfg and not cfg.get("network_steps"):
        raise SystemExit(f"bad configuration {name!r}: -lrNeM sets the network stage's learning rate; it needs -netN")
    if "network_ema" in cfg and not cfg.get("network_steps"):
        raise SystemExit(f"bad configuration {name!r}: -emaD averages the network stage's iterates; it needs -netN")
    if "network_min_snr" in cfg and not cfg.get("network_steps"):
        raise SystemExit(f"bad configuration {name!r}: -msG weights the network stage's loss; it needs -netN")
    return cfg


def smooth_suffix(cfg: dict) -> str:
    """``-smNN`` for a configuration of a smoothed model (its calibrations and curves are its
    own); ``-smauto-wWaA-gG`` for per-layer strengths, which depend on the target."""
    sm = cfg.get("smooth")
    if sm is None:
        return ""
    if sm == "auto":
        m = "m" if cfg.get("smooth_criterion") == "model" else ""
        return f"-smauto{m}-w{cfg['w_bits']}a{cfg['a_bits']}-g{cfg['groups']}"
    return f"-sm{round(100 * sm):02d}" + ("fr" if cfg.get("smooth_layers") == "full-resolution" else "")


def smooth_args(model: str, cfg: dict, float_calib: Path, out: Path) -> list[str]:
    """The ``jaxquant smooth`` command line of a configuration of a smoothed model."""
    argv = ["smooth", model, "--calib", str(float_calib), "--alpha", str(cfg["smooth"]), "--out", str(out)]
    if cfg.get("smooth_layers"):
        argv += ["--layers", cfg["smooth_layers"]]
    if cfg["smooth"] == "auto":
        if cfg["a_bits"] is None:
            raise SystemExit("-smauto needs quantized activations (the error the strengths trade)")
        # AQ and RD targets are scored with the uniform weight quantizer at the average bits
        argv += ["--w-bits", str(cfg["w_bits"]), "--a-bits", str(cfg["a_bits"]), "--groups", str(cfg["groups"])]
        if cfg.get("smooth_criterion") == "model":
            argv += ["--criterion", "model", "--num-inputs", "40"]
        if cfg.get("act_method"):
            argv += ["--act-method", cfg["act_method"]]
    return argv


def quantize_args(model: str, cfg: dict, calib_dir: Path, out: Path) -> list[str]:
    """The ``jaxquant quantize`` command line of a parsed configuration."""
    argv = ["quantize", model, "--method", cfg["method"], "--w-bits", str(cfg["w_bits"]),
            "--a-bits", "none" if cfg["a_bits"] is None else str(cfg["a_bits"]), "--calib", str(calib_dir),
            "--out", str(out)]
    if cfg["method"] == "rd":
        # curves depend on neither the budget nor the distortion kind: one set per group count
        # (and lookahead, trajectory and features, which change what is measured)
        la, feat, traj = cfg.get("lookahead"), cfg.get("features"), cfg.get("trajectory")
        curves = (f"rd-curves-g{cfg['groups']}" + ("" if la is None else f"-la{la}") + ("-traj" if traj else "")
                  + ("-feat" if feat else "") + smooth_suffix(cfg) + ("-mm" if cfg.get("act_method") == "minmax" else "")
                  + ("-gptq" if cfg.get("gptq") else "") + (f"-am{cfg['min_act_bits']}" if cfg.get("min_act_bits") else "")
                  + (f"-ac{cfg['max_act_bits']}" if cfg.get("max_act_bits") else ""))
        argv += ["--distortion", cfg["distortion"], "--curves", str(out.parent / curves)]
        if cfg.get("max_act_bits"):
            argv += ["--rd-max-a-bits", str(cfg["max_act_bits"])]
        if cfg.get("min_act_bits"):
            argv += ["--rd-min-a-bits", str(cfg["min_act_bits"])]
        if la is not None:
            argv += ["--rd-lookahead", str(la)]
        if feat:
            argv += ["--rd-features", feat]
        if traj:
            argv += ["--rd-trajectory"]
        if cfg.get("conditional_weights"):
            argv += ["--rd-conditional-weights", cfg["conditional_weights"]]
        if cfg.get("min_weight_bits"):
            argv += ["--rd-min-w-bits", str(cfg["min_weight_bits"])]
    if cfg.get("act_method"):
        argv += ["--act-method", cfg["act_method"]]
    if cfg.get("a_bits_at"):
        argv += ["--a-bits-at", "{}={}".format(*cfg["a_bits_at"])]
    if cfg.get("gptq"):
        argv += ["--gptq"]
    if cfg.get("finetune_steps"):
        argv += ["--finetune-steps", str(cfg["finetune_steps"])]
    if cfg.get("code_update_every"):
        argv += ["--code-update-every", str(cfg["code_update_every"])]
    if cfg.get("weighting"):
        argv += ["--aq-weighting", cfg["weighting"]]
    if cfg["method"] == "aq":
        # without -rminR: no floor, as the rows measured before the floor (and its default of 1) existed
        argv += ["--aq-min-code-bits", str(cfg.get("min_code_bits", 0.0))]
        if cfg.get("aq_rounds"):
            argv += ["--aq-rounds", str(cfg["aq_rounds"])]
        if cfg.get("planning"):
            argv += ["--aq-planning", cfg["planning"]]
    return argv


#: The name parts of the network stage (and its continuation), which stage_names strips.
_NETWORK_PARTS = r"(net|nc|nq|sd|ema)\d+|lr[1-9]e\d+|un\d+s\d+|ms\d+(p\d+)?|slb?\d*(?=-|$)"


def stage_names(name: str) -> tuple[str, str]:
    """The model directories a configuration builds on: ``(quantized, reconstructed)``, its
    name without the tuning stages' parts, and without the network stage's."""
    return re.sub(rf"-(rec\d+|{_NETWORK_PARTS})", "", name), re.sub(rf"-({_NETWORK_PARTS})", "", name)


def network_name(name: str) -> str:
    """The model directory the ``-unKsN`` stage continues from: the name without it."""
    return re.sub(r"-un\d+s\d+", "", name)


def network_calib_dir(cfg: dict, work: Path, tuned_from: str) -> Path:
    """The calibration of a ``-ncK`` / ``-nqK`` network stage: K trajectories of the float
    (or smoothed) source, shared by all configurations, or of the model ``tuned_from``
    entering the network stage, its own."""
    k = cfg["network_calib_samples"]
    if cfg["network_calib_on_policy"]:
        return work / f"{tuned_from}-calib-n{k}"
    return work / f"calib-g{cfg['groups']}{smooth_suffix(cfg)}-n{k}"


def network_lr(cfg: dict) -> float:
    """The network stage's learning rate: ``-lrNeM``'s, else UNROLL_LR for the DDIM-state
    loss (``-slK``) and NETWORK_LR for the output loss."""
    return cfg.get("network_lr", UNROLL_LR if cfg.get("network_step_loss") else NETWORK_LR)


def network_args(qdir: Path, calib_dir: Path, steps: int, out: Path, unroll: int = 1,
                 lr: float = NETWORK_LR, min_snr_gamma: float | None = None, seed: int = 0,
                 ema: float | None = None, step_loss: bool = False, balance_steps: bool = False) -> list[str]:
    """The ``jaxquant finetune --blocks network`` command line of a ``-netN`` configuration, or
    of its ``-unKsN`` continuation (``unroll`` K, ``lr`` UNROLL_LR; ``-un1sN``: the one-step
    loss at that rate, the control); ``-msG``: pairs weighted by Min-SNR with ``G``; ``-sdK``:
    ``seed`` K (minibatch order and held-out pairs; 0 is the CLI's default); ``-emaD``: the
    moving average of the iterates with decay ``0.D`` (``ema``); ``-slK``: the loss on the
    DDIM state after ``K`` steps, x0's clip included (``step_loss``, ``unroll`` K), at
    UNROLL_LR: at NETWORK_LR the one-step state loss's minibatch values spiked as the
    unrolled loss's did (ddpm-fmnist AQ W4A8, 2026-12-07); ``-slbK``: with each sampler
    step's term divided by its value before the stage (``balance_steps``)."""
    return (["finetune", str(qdir), "--calib", str(calib_dir), "--blocks", "network", "--steps", str(steps),
             "--lr", str(lr), "--out", str(out)] + (["--unroll", str(unroll)] if unroll != 1 else [])
            + (["--step-loss"] if step_loss else []) + (["--balance-steps"] if balance_steps else [])
            + (["--min-snr-gamma", f"{min_snr_gamma:g}"] if min_snr_gamma is not None else [])
            + (["--seed", str(seed)] if seed else []) + (["--ema", f"{ema:g}"] if ema is not None else []))


def sample_labels(model, num: int) -> np.ndarray | None:
    """Class-balanced labels for class-conditional models (``None`` otherwise)."""
    from jaxquant.diffusion.pipeline import num_classes

    n = num_classes(model)
    if n is None:
        return None
    return np.arange(num) % n


def batch_sampler(model, steps: int, batch: int, cfg_scale: float, seed: int = 1):
    """A compiled, warmed-up ``fn()`` sampling one DDIM batch (class-balanced labels for
    conditional models) and blocking until it is done: the unit of every timing here."""
    import jax

    from jaxquant.diffusion.pipeline import sampling_fn
    from jaxquant.diffusion.samplers import initial_noise

    run = sampling_fn(model, steps=steps, cfg_scale=cfg_scale)
    key = jax.random.key(seed)
    x = initial_noise(key, (batch, *model.sample_shape))
    labels = sample_labels(model, batch)
    y = None if labels is None else jax.numpy.asarray(labels, jax.numpy.int32)

    def fn():
        return run(model.params, x, key, y).block_until_ready()

    fn()  # compile
    return fn


def throughput(model, steps: int, batch: int, cfg_scale: float, repeats: int = 2) -> float:
    """Images/s of the jitted per-batch sampling function (compiled first, then timed)."""
    sample = batch_sampler(model, steps, batch, cfg_scale)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample()
        times.append(time.perf_counter() - t0)
    return batch / min(times)


def run_config(name: str, args: argparse.Namespace, work: Path) -> dict:
    """Quantize (unless fp), sample, evaluate and time one configuration."""
    import jaxquant
    from jaxquant.cli import main as cli
    from jaxquant.diffusion.pipeline import generate
    from jaxquant.eval.evaluate import evaluate
    from jaxquant.images import save_samples_npz
    from jaxquant.quant.accounting import storage_report

    cfg = parse_config(name)
    # -fa / -faSET: the model named without it, sampled without (some of) its activation quantizers
    samples_name, name = name, re.sub(r"-fa[a-z0-9]*$", "", name)
    t0 = time.time()
    stages: list[str] = []  # the stages this run executed (none: the model dir was reused as it is)
    if cfg["method"] == "fp":
        qdir = args.model
    else:
        def calibrated(model: str, groups: int, out: Path, num: int | None = None, xtx: bool = True) -> Path:
            meta = out / "calibration.json"
            num = args.calib_samples if num is None else num
            if not (meta.is_file() and json.loads(meta.read_text()).get("complete")):
                argv = ["calibrate", model, "--groups", str(groups), "--num-samples", str(num),
                        "--steps", str(args.steps), "--batch-size", str(min(32, num)),
                        "--cfg-scale", str(args.cfg_scale), "--out", str(out)] + ([] if xtx else ["--no-xtx"])
                if cli(argv) != 0:
                    raise SystemExit(f"calibration for {name} failed")
                stages.append("calibrate")
            return out

        source = args.model
        if cfg.get("smooth") is not None:
            source = str(work / f"smoothed{smooth_suffix(cfg)}")
            if not (Path(source) / "config.json").is_file():
                float_calib = calibrated(args.model, 1, work / "calib-g1")
                if cli(smooth_args(args.model, cfg, float_calib, Path(source))) != 0:
                    raise SystemExit(f"smoothing for {name} failed")
                stages.append("smooth")
        calib = calibrated(source, cfg["groups"], work / f"calib-g{cfg['groups']}{smooth_suffix(cfg)}")
        qdir = work / name
        base, rec_name = stage_names(name)
        quantized = work / base
        if not (quantized / "config.json").is_file():
            if cli(quantize_args(source, parse_config(base), calib, quantized)) != 0:
                raise SystemExit(f"quantization {base} failed")
            stages.append("quantize")
        reconstructed = work / rec_name
        if cfg.get("reconstruct_steps") and not (reconstructed / "config.json").is_file():
            if cli(["finetune", str(quantized), "--calib", str(calib), "--steps", str(cfg["reconstruct_steps"]),
                    "--out", str(reconstructed)]) != 0:
                raise SystemExit(f"block reconstruction {name} failed")
            stages.append("reconstruct")
        networked = work / network_name(name)
        if cfg.get("network_steps") and not (qdir / "config.json").is_file():
            tuned_from = reconstructed if cfg.get("reconstruct_steps") else quantized
            net_calib, k = calib, cfg.get("network_calib_samples")
            if k:
                of = str(tuned_from) if cfg["network_calib_on_policy"] else source
                net_calib = calibrated(of, cfg["groups"], network_calib_dir(cfg, work, tuned_from.name), k,
                                       xtx=False)
            if not (networked / "config.json").is_file():
                k_step = cfg.get("network_step_loss")
                if cli(network_args(tuned_from, net_calib, cfg["network_steps"], networked,
                                    unroll=k_step or 1, lr=network_lr(cfg),
                                    min_snr_gamma=cfg.get("network_min_snr"), seed=cfg.get("network_seed", 0),
                                    ema=cfg.get("network_ema"), step_loss=bool(k_step),
                                    balance_steps=cfg.get("network_balance_steps", False))) != 0:
                    raise SystemExit(f"end-to-end tuning {name} failed")
                stages.append("network")
            if "unroll" in cfg:
                if cli(network_args(networked, net_calib, cfg["unroll_steps"], qdir, cfg["unroll"], UNROLL_LR)) != 0:
                    raise SystemExit(f"unrolled end-to-end tuning {name} failed")
                stages.append("unrolled")
    t_quant = time.time() - t0
    if getattr(args, "build_only", False):
        print(f"{name}: built {qdir} ({', '.join(stages) or 'nothing new'}; {t_quant:.0f} s)")
        return None
    model = jaxquant.load(str(qdir))
    rep = storage_report(model.params)
    if cfg.get("float_acts"):
        from benchmarks.sample_drift import _without_act_quant

        pattern = None if cfg["float_acts"] is True else cfg["float_acts"]
        model = jaxquant.Model(model.meta, _without_act_quant(model.params, pattern), model.path)
    npz = work / f"{samples_name}-samples.npz"
    if not npz.is_file():
        labels = sample_labels(model, args.num)
        partial = work / f"{samples_name}-samples.partial"  # finished batches: a killed run resumes there
        imgs = generate(model, args.num, steps=args.steps, seed=args.seed, batch_size=args.batch,
                        labels=labels, cfg_scale=args.cfg_scale, resume_dir=partial)
        save_samples_npz(imgs, npz, labels)
        shutil.rmtree(partial)
    metrics = {f: evaluate(str(npz), args.ref, f, progress=False) for f in args.features}
    ips = throughput(model, args.steps, args.batch, args.cfg_scale)
    return {"config": cfg, "model_dir": str(qdir), "total_bytes": rep.total_bytes,
            "bits_per_weight": rep.bits_per_weight, "bits_per_quantized_weight": rep.bits_per_quantized_weight,
            "denoiser_bits_per_weight": denoiser_bits_per_weight(rep),
            "images_per_s": ips, "quantize_s": round(t_quant, 1) if stages else None, "quantize_stages": stages,
            "metrics": metrics}


def denoiser_bits_per_weight(rep) -> float:
    """Stored bits per parameter of the denoiser alone: a latent-diffusion model's float
    first stage and conditioning model (``rules.NOT_DENOISER``) left out."""
    from jaxquant.quant.rules import NOT_DENOISER

    layers = [layer for layer in rep.layers if not re.fullmatch(NOT_DENOISER, layer.name)]
    return sum(layer.bits for layer in layers) / max(sum(layer.num_weights for layer in layers), 1)


def format_table(result: dict) -> str:
    """Markdown rows: config, bits, size, FID/sFID/IS per feature net, img/s (ratio to fp)."""
    rows = result["configs"]
    fp_ips = rows.get("fp", {}).get("images_per_s")
    feats = result["features"]
    head = "| config | bits/w (quantized) | bytes | " + " | ".join(
        f"FID / sFID / IS ({f})" for f in feats) + " | img/s | vs fp |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in rows.items():
        cells = []
        for f in feats:
            m = r["metrics"][f]
            cells.append(f"{m['fid']:.2f} / {m['sfid']:.2f} / {m['inception_score']:.2f}")
        q = f"{r['bits_per_quantized_weight']:.2f}" if r["config"]["method"] != "fp" else "32 (float)"
        ratio = f"{r['images_per_s'] / fp_ips:.2f}×" if fp_ips else ""
        lines.append(f"| {name} | {q} | {r['total_bytes']:,} | " + " | ".join(cells)
                     + f" | {r['images_per_s']:.1f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ddpm-fmnist")
    ap.add_argument("--configs", nargs="+", default=["fp", "uniform-w8a8", "uniform-w6a6", "uniform-w4a8",
                                                     "uniform-w4a4", "uniform-w4a8-g4"])
    ap.add_argument("--num", type=int, default=10000, help="samples per configuration")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale (class-conditional models)")
    ap.add_argument("--calib-samples", type=int, default=64, help="calibration trajectories")
    ap.add_argument("--ref", default="fashion-mnist-test")
    ap.add_argument("--features", nargs="+", default=["fmnist"])
    ap.add_argument("--work", default=None, help="samples, calibrations, quantized models (default runs/quality/MODEL)")
    ap.add_argument("--out", default=None, help="JSON result (default benchmarks/results/quality_MODEL.json)")
    ap.add_argument("--build-only", action="store_true",
                    help="build the configurations' model directories (calibrations, quantization, tuning "
                         "stages) and stop: nothing is sampled, evaluated or recorded")
    args = ap.parse_args()
    for c in args.configs:
        parse_config(c)
    tag = Path(args.model).name
    work = Path(args.work or f"runs/quality/{tag}")
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or Path(__file__).resolve().parent / "results" / f"quality_{tag}.json")
    result = json.loads(out.read_text()) if out.is_file() else {}
    settings = {"model": args.model, "num": args.num, "steps": args.steps, "seed": args.seed, "batch": args.batch,
                "cfg_scale": args.cfg_scale, "ref": args.ref, "features": args.features,
                "calib_samples": args.calib_samples}
    if result and {k: result.get(k) for k in settings} != settings:
        raise SystemExit(f"{out} holds results of other settings; use another --out")
    result = {**settings, "configs": result.get("configs", {}), **{k: result[k] for k in ("date", "machine")
                                                                     if k in result}}
    result.setdefault("date", time.strftime("%Y-%m-%d"))
    result.setdefault("machine", machine())
    print(machine())  # this run's machine; result["machine"] is the file's first
    from jaxquant import xla

    for name in args.configs:
        if name in result["configs"]:
            print(f"{name}: done before, skipped")
            continue
        print(f"== {name}")
        xla.release_compiled_if_crowded()  # each configuration compiles its own sampler, quantizer, ...
        if args.build_only:
            run_config(name, args, work)
            continue
        # each row names its own day and machine: its timings (quantize_s, images_per_s) are
        # only comparable with rows of the same machine
        row = {**run_config(name, args, work), "date": time.strftime("%Y-%m-%d"), "machine": machine()}
        # merge into the file as it is now: rows finished or edited by others meanwhile stay
        if out.is_file():
            result["configs"] = json.loads(out.read_text()).get("configs", {})
        result["configs"][name] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(format_table(result))
    if not args.build_only:
        print(format_table(result))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
