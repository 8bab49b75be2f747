"""jaxquant.eval.evaluate and `jaxquant eval`, with a tiny random-weight feature network.

The network ("tiny-test": 16-d pool, 2x2x8 spatial -> 28-d sFID vectors, 5 classes)
is registered in a copy of the feature-net registry for each test; the built-in
Fashion-MNIST references are replaced by a small synthetic set through the loader, so
nothing here needs the real data except the last test (skipped without it).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("scipy.linalg")

from jaxquant import cli  # noqa: E402
from jaxquant.data.fmnist import DEFAULT_DIR  # noqa: E402
from jaxquant.errors import DataError  # noqa: E402
from jaxquant.eval import evaluate as ev  # noqa: E402
from jaxquant.eval import features  # noqa: E402
from jaxquant.eval.features import extract_features, make_feature_net, register_feature_net  # noqa: E402
from jaxquant.eval.metrics import (  # noqa: E402
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
    spatial_statistics,
)
from jaxquant.eval.refbatch import load_reference, save_reference  # noqa: E402

NET = "tiny-test"
BS = 32


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # float [N, 32, 32, 3] in [0, 255]
        x = x / 127.5 - 1.0
        h = jnp.tanh(nn.Conv(8, (4, 4), strides=(8, 8), padding="VALID")(x))  # 4x4x8
        spatial = nn.Conv(8, (2, 2), strides=(2, 2), padding="VALID")(h)  # 2x2x8
        pool = jnp.tanh(nn.Dense(16)(h.reshape(h.shape[0], -1)))
        return {"pool": pool, "spatial": spatial, "logits": nn.Dense(5)(pool)}


def _make_net(seed: int = 0, name: str = NET):
    m = TinyNet()
    variables = m.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
    return make_feature_net(name, m, variables, input_size=32, spatial_layer="tiny (2x2x8)")


_NETS: dict = {}


def _net(seed: int = 0, name: str = NET):
    if (seed, name) not in _NETS:
        _NETS[seed, name] = _make_net(seed, name)
    return _NETS[seed, name]


def _images(n: int, seed: int) -> np.ndarray:
    """Structured uint8 [n, 32, 32, 1] images (blobs of varying size and brightness)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    r = rng.uniform(4, 12, (n, 1, 1))
    c = rng.uniform(10, 22, (n, 2, 1, 1))
    blob = ((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) < r**2
    img = blob * rng.uniform(80, 255, (n, 1, 1)) + rng.uniform(0, 40, (n, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8)[..., None]


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path):
    """A private registry with the tiny net, a private cache, no shipped statistics."""
    monkeypatch.setattr(features, "_REGISTRY", dict(features._REGISTRY))
    register_feature_net(NET, lambda: _net(), overwrite=True)
    monkeypatch.setenv(ev.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(ev, "SHIPPED_REFS_DIR", tmp_path / "shipped")


@pytest.fixture
def fake_fmnist(monkeypatch):
    """Replace the Fashion-MNIST loader by 96 synthetic images; counts the calls."""
    calls = {"n": 0}
    data = _images(96, seed=123)

    def fake_load(split, data_dir=None, *, pad_to=32, as_uint8=False):
        calls["n"] += 1
        assert as_uint8
        return data.copy(), np.zeros(len(data), np.int32)

    monkeypatch.setattr(ev, "load_fashion_mnist", fake_load)
    calls["data"] = data
    return calls


def _direct(samples, ref_images, net):
    """The metrics called directly on extract_features output."""
    fs, fr = extract_features(net, samples, BS), extract_features(net, ref_images, BS)
    return {
        "fid": frechet_distance(*feature_statistics(fs["pool"]), *feature_statistics(fr["pool"])),
        "sfid": frechet_distance(*spatial_statistics(fs["spatial"]), *spatial_statistics(fr["spatial"])),
        "inception_score": inception_score(fs["logits"], split_size=5000)[0],
        "inception_score_std": inception_score(fs["logits"], split_size=5000)[1],
        "pr": precision_recall(fr["pool"], fs["pool"], k=3),
    }


def _check_equal(res, d):
    assert res["fid"] == d["fid"] and res["sfid"] == d["sfid"]
    assert res["inception_score"] == d["inception_score"]
    assert res["inception_score_std"] == d["inception_score_std"]
    assert (res["precision"], res["recall"]) == d["pr"]


# --------------------------------------------------------------------------------------
# Metrics equal direct calls
# --------------------------------------------------------------------------------------


def test_evaluate_equals_direct_metric_calls(tmp_path):
    samples, ref_images = _images(70, 1), _images(90, 2)  # 70, 90: partial last batches
    net = _net()
    d = _direct(samples, ref_images, net)
    assert 0 < d["pr"][0] < 1 or 0 < d["pr"][1] < 1  # a non-trivial case

    sp, rp = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(sp, arr_0=samples)
    np.savez(rp, arr_0=ref_images)  # images only: statistics computed from arr_0
    res = ev.evaluate(sp, rp, NET, batch_size=BS, progress=False)
    _check_equal(res, d)
    assert res["feature_net"] == NET and res["num_samples"] == 70 and res["num_reference"] == 90
    json.dumps(res)  # serialisable

    # The same with stored statistics (+ arr_0 for P/R), with a compute_reference dict,
    # and with a file carrying the pool features.
    ref = ev.compute_reference(ref_images, NET, BS)
    save_reference(tmp_path / "stats.npz", ref_images, mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"],
                   sigma_s=ref["sigma_s"], feature_net=NET)
    ev.write_reference(tmp_path / "pool.npz", ref)
    for r in (tmp_path / "stats.npz", ref, tmp_path / "pool.npz"):
        _check_equal(ev.evaluate(samples, r, net, batch_size=BS, progress=False), d)

    # num_samples takes the first N.
    res = ev.evaluate(sp, ref, NET, batch_size=BS, num_samples=40, progress=False)
    _check_equal(res, _direct(samples[:40], ref_images, net))
    with pytest.raises(DataError, match="holds only 70"):
        ev.evaluate(sp, ref, NET, batch_size=BS, num_samples=71, progress=False)


def test_samples_equal_reference():
    x = _images(64, 5)
    res = ev.evaluate(x, ev.compute_reference(x, NET, BS), NET, batch_size=BS, progress=False)
    assert abs(res["fid"]) < 1e-6 and abs(res["sfid"]) < 1e-6
    assert res["precision"] == 1.0 and res["recall"] == 1.0


# --------------------------------------------------------------------------------------
# Built-in references: cache and shipped statistics
# --------------------------------------------------------------------------------------


def test_builtin_reference_cached_once_and_reused(fake_fmnist, tmp_path):
    samples = _images(50, 7)
    r1 = ev.evaluate(samples, "fashion-mnist-test", NET, batch_size=BS, progress=False)
    assert fake_fmnist["n"] == 1
    cache = tmp_path / "cache" / "refs" / f"fashion-mnist-test-{NET}.npz"
    assert cache.is_file() and "computed" in r1["reference_source"]
    stored = load_reference(cache, feature_net=NET)
    assert stored["feature_net"] == NET and stored["images"] is None
    with np.load(cache) as z:
        assert z["pool"].shape == (96, 16) and int(z["num_images"]) == 96

    r2 = ev.evaluate(samples, "fashion-mnist-test", NET, batch_size=BS, progress=False)
    assert fake_fmnist["n"] == 1  # nothing recomputed
    assert "cached" in r2["reference_source"]
    for k in ("fid", "sfid", "inception_score", "precision", "recall", "num_reference"):
        assert r1[k] == r2[k], k
    _check_equal(r2, _direct(samples, fake_fmnist["data"], _net()))

    # Other weights under the same name: the cache is stale and recomputed.
    register_feature_net(NET, lambda: _net(seed=1), overwrite=True)
    with pytest.warns(RuntimeWarning, match="other weights"):
        ev.evaluate(samples, "fashion-mnist-test", NET, batch_size=BS, progress=False)
    assert fake_fmnist["n"] == 2


def test_shipped_statistics_without_data(fake_fmnist, tmp_path, monkeypatch):
    samples = _images(50, 8)
    shipped = ev.build_shipped_reference("fashion-mnist-test", NET, tmp_path / "shipped", batch_size=BS,
                                         progress=False)
    assert shipped.name == f"fashion-mnist-test-{NET}.npz"
    with np.load(shipped) as z:
        assert "pool" not in z.files and "arr_0" not in z.files and z["sigma_triu"].dtype == np.float64
    full = ev.evaluate(samples, "fashion-mnist-test", NET, batch_size=BS, progress=False)
    assert "shipped" in full["reference_source"]
    # The shipped statistics (upper triangle of sigma, float64) give the metrics of the images.
    direct = _direct(samples, fake_fmnist["data"], _net())
    assert full["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert full["sfid"] == pytest.approx(direct["sfid"], rel=1e-6)
    assert (full["precision"], full["recall"]) == direct["pr"]

    def missing(*a, **k):
        raise DataError("Fashion-MNIST file not found. Install the data with `apt-get install -y dataset-fashion-mnist`")

    monkeypatch.setattr(ev, "load_fashion_mnist", missing)
    monkeypatch.setenv(ev.CACHE_ENV, str(tmp_path / "empty-cache"))
    res = ev.evaluate(samples, "fashion-mnist-test", NET, batch_size=BS, progress=False)
    assert res["fid"] == full["fid"] and res["sfid"] == full["sfid"] and res["num_reference"] == 96
    assert res["precision"] is None and res["recall"] is None
    assert "apt-get install" in res["precision_recall_unavailable"]
    report = ev.format_report(res)
    assert "n/a" in report and "apt-get install" in report


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------


def test_reference_from_another_feature_net_refused(tmp_path):
    x = _images(40, 3)
    ref = ev.compute_reference(x, NET, BS)
    for other, kw in (("fmnist", {"feature_net": "fmnist"}), ("inception", {})):  # no key = inception
        p = tmp_path / f"{other}.npz"
        save_reference(p, x, mu=ref["mu"], sigma=ref["sigma"], mu_s=ref["mu_s"], sigma_s=ref["sigma_s"], **kw)
        with pytest.raises(DataError, match=f"computed with feature network '{other}'.*uses '{NET}'"):
            ev.evaluate(x, p, NET, batch_size=BS, progress=False)
    with pytest.raises(DataError, match="feature network 'tiny-test'"):
        ev.evaluate(x, ref, _net(name="other-net"), batch_size=BS, progress=False)


def test_float_images_refused_with_hint(tmp_path):
    x = _images(40, 4)
    f = x.astype(np.float32) / 127.5 - 1.0
    with pytest.raises(DataError, match=re.escape("((x + 1) * 127.5)")):
        ev.evaluate(f, ev.compute_reference(x, NET, BS), NET, progress=False)
    np.savez(tmp_path / "f.npz", arr_0=f)
    with pytest.raises(DataError, match=re.escape("((x + 1) * 127.5)")):
        ev.evaluate(tmp_path / "f.npz", tmp_path / "f.npz", NET, progress=False)
    with pytest.raises(DataError, match="neither an existing .npz file nor a built-in"):
        ev.evaluate(x, "fashion-mnist-tset", NET, progress=False)


# --------------------------------------------------------------------------------------
# Labels and the CLI
# --------------------------------------------------------------------------------------

_BARE = re.compile(r"\b(s?FID|IS|Precision|Recall)\b(?! \[)")


def _fake_result(net: str) -> dict:
    return {"feature_net": net, "num_samples": 10, "num_reference": 20, "fid": 1.0, "sfid": 2.0,
            "inception_score": 3.0, "inception_score_std": 0.0, "inception_score_splits": 1,
            "precision": 0.5, "recall": None, "precision_recall_unavailable": "no images"}


@pytest.mark.parametrize("net", ["fmnist", "efficientnet-lite0", NET])
def test_non_inception_metrics_never_bare(net):
    report = ev.format_report(_fake_result(net))
    assert f"FID [{net} features]" in report and f"sFID [{net} features]" in report
    assert f"IS [{net} classifier]" in report
    assert not _BARE.search(report), report
    assert all(_BARE.search(v) is None for v in ev.metric_labels(net).values())


def test_inception_gets_bare_names():
    report = ev.format_report(_fake_result("inception"))
    assert re.search(r"^FID\s+1\.0000$", report, re.M) and re.search(r"^IS\s+3\.0000$", report, re.M)
    assert "[" not in "".join(ev.metric_labels("inception").values())


def test_cli_writes_json_and_prints_labels(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=_images(40, 9))
    np.savez(tmp_path / "r.npz", arr_0=_images(60, 10))
    out = tmp_path / "out" / "m.json"
    rc = cli.main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--features", NET,
                   "--batch-size", str(BS), "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"FID [{NET} features]" in printed and f"IS [{NET} classifier]" in printed
    assert not _BARE.search(printed)
    data = json.loads(out.read_text())
    assert data["feature_net"] == NET and data["num_samples"] == 40 and data["num_reference"] == 60
    assert data["labels"]["fid"] == f"FID [{NET} features]"
    assert f"{data['fid']:.4f}" in printed

    # Errors: one line, exit 2, no traceback.
    save_reference(tmp_path / "inc.npz", mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(2), sigma_s=np.eye(2))
    rc = cli.main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "inc.npz"), "--features", NET,
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "jaxquant eval: error:" in err and "'inception'" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------
# The real Fashion-MNIST files
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(DEFAULT_DIR).is_dir(), reason=f"Fashion-MNIST not installed in {DEFAULT_DIR}")
def test_real_fashion_mnist_subset(monkeypatch, tmp_path):
    real = ev.load_fashion_mnist

    def first_300(split, data_dir=None, *, pad_to=32, as_uint8=False):
        x, y = real(split, data_dir, pad_to=pad_to, as_uint8=as_uint8)
        return x[:300], y[:300]

    monkeypatch.setattr(ev, "load_fashion_mnist", first_300)
    samples = real("train", as_uint8=True)[0][:200]
    res = ev.evaluate(samples, "fashion-mnist-test", NET, batch_size=100, progress=False)
    assert res["num_reference"] == 300 and res["num_samples"] == 200
    # The metrics of the first 300 test images, recomputed directly (other batch sizes:
    # equal up to float32 summation order).
    direct = _direct(samples, real("test", as_uint8=True)[0][:300], _net())
    for k in ("fid", "sfid", "inception_score"):
        assert res[k] == pytest.approx(direct[k], rel=1e-5), k
    assert (res["precision"], res["recall"]) == pytest.approx(direct["pr"], abs=1 / 150)
    assert 0 < res["precision"] <= 1 and 0 < res["recall"] <= 1
    assert load_reference(tmp_path / "cache" / "refs" / f"fashion-mnist-test-{NET}.npz")["feature_net"] == NET


def test_sample_tones_against_a_reference(tmp_path):
    """``benchmarks.sample_tones``: the dark share, the mean change on the reference's dark
    and bright pixels and the rms change, on images built to give known values; sample sets
    of another shape or dtype are refused."""
    from benchmarks.sample_tones import load_uint8, tones

    ref = np.zeros((2, 4, 4, 1), np.uint8)
    ref[:, :2] = 100                                   # half bright, half black
    x = ref.copy()
    x[:, 2:] = 3                                       # black lifted by 3 levels: still dark (≤ 5)
    x[:, :2] = 96                                      # bright dimmed by 4
    r = tones(x, ref, dark=5, bright=50)
    assert r["dark"] == 0.5 and r["lift_on_dark"] == 3.0 and r["change_on_bright"] == -4.0
    np.testing.assert_allclose(r["rms_change"], np.sqrt((9 + 16) / 2))
    np.savez(tmp_path / "s.npz", x)
    np.testing.assert_array_equal(load_uint8(tmp_path / "s.npz"), x)
    np.savez(tmp_path / "f.npz", x.astype(np.float32))
    with pytest.raises(SystemExit, match="uint8"):
        load_uint8(tmp_path / "f.npz")
    with pytest.raises(SystemExit, match="shape"):
        tones(x[:1], ref)
