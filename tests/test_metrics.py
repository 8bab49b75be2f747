"""jaxquant.eval: metrics against direct reference computations, and the .npz batches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

scipy_linalg = pytest.importorskip("scipy.linalg")

from jaxquant.errors import DataError, JaxquantError  # noqa: E402
from jaxquant.eval import (  # noqa: E402
    FrechetDistanceError,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    load_images,
    load_reference,
    manifold_radii,
    precision_recall,
    save_reference,
    spatial_features_for_sfid,
    spatial_statistics,
)
from jaxquant.eval import metrics  # noqa: E402


# --------------------------------------------------------------------------------------
# Reference implementations, written out directly
# --------------------------------------------------------------------------------------


def ref_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, spelled out."""
    diff = mu1 - mu2
    covmean = scipy_linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy_linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def ref_stats(x):
    x = np.asarray(x, np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def ref_inception_score(logits, split_size):
    """guided-diffusion's loop: softmax, chunks range(0, N, split_size), exp(mean KL)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores), scores


def ref_sq_dists(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def ref_radii(x, k):
    # guided-diffusion: np.partition over the full row *including self*, take index k.
    return np.partition(ref_sq_dists(x, x), k, axis=1)[:, k]


def ref_precision_recall(real, fake, k):
    r_real, r_fake = ref_radii(real, k), ref_radii(fake, k)
    d = ref_sq_dists(real, fake)  # [N_real, N_fake]
    precision = np.mean(np.any(d <= r_real[:, None], axis=0))
    recall = np.mean(np.any(d <= r_fake[None, :], axis=1))
    return precision, recall


def _features(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


# --------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------


def test_frechet_distance_matches_reference():
    f1, f2 = _features(500, 64, 0), _features(500, 64, 1, shift=0.2)
    mu1, s1 = ref_stats(f1)
    mu2, s2 = ref_stats(f2)
    expected = ref_frechet(mu1, s1, mu2, s2)
    assert expected > 1.0  # a non-trivial distance
    got = frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_from_features(f1, f2) == pytest.approx(expected, rel=1e-6)
    # the eigendecomposition path agrees with the reference to 1e-6 relative
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-6)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_rank_deficient():
    # N=20 < d=64: singular covariances, sqrtm returns a complex result
    f1, f2 = _features(20, 64, 2), _features(20, 64, 3, shift=0.1)
    mu1, s1 = ref_stats(f1)
    mu2, s2 = ref_stats(f2)
    assert np.linalg.matrix_rank(s1) < 64
    expected = ref_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_eps_offset_retry(monkeypatch):
    """A non-finite sqrtm is retried with eps*I added to both covariances."""
    f1, f2 = _features(20, 64, 4), _features(20, 64, 5, shift=0.1)
    mu1, s1 = ref_stats(f1)
    mu2, s2 = ref_stats(f2)
    real_sqrtm = metrics._sqrtm
    calls = []

    def flaky_sqrtm(a):
        calls.append(a)
        if len(calls) == 1:
            return np.full_like(a, np.nan)
        return real_sqrtm(a)

    monkeypatch.setattr(metrics, "_sqrtm", flaky_sqrtm)
    eps = 1e-3
    with pytest.warns(RuntimeWarning, match="singular"):
        got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
    assert len(calls) == 2
    off = np.eye(64) * eps
    np.testing.assert_array_equal(calls[1], (s1 + off).dot(s2 + off))
    covmean = scipy_linalg.sqrtm((s1 + off).dot(s2 + off)).real
    d = mu1 - mu2
    expected = d.dot(d) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert got == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_still_not_finite_raises(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.full_like(a, np.inf))
    mu, s = ref_stats(_features(50, 8, 6))
    with pytest.warns(RuntimeWarning), pytest.raises(FrechetDistanceError, match="not finite"):
        frechet_distance(mu, s, mu, s)


def test_frechet_distance_imaginary_component(monkeypatch):
    mu1, s1 = ref_stats(_features(200, 8, 7))
    mu2, s2 = ref_stats(_features(200, 8, 8, shift=0.3))
    real_sqrtm = metrics._sqrtm
    # small imaginary diagonal: the real part is used
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: real_sqrtm(a) + 1e-5j * np.eye(len(a)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref_frechet(mu1, s1, mu2, s2), rel=1e-6)
    # large imaginary diagonal: a JaxquantError with a clear message
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: real_sqrtm(a) + 1e-2j * np.eye(len(a)))
    with pytest.raises(FrechetDistanceError, match="imaginary") as ei:
        frechet_distance(mu1, s1, mu2, s2)
    assert isinstance(ei.value, JaxquantError)


def test_frechet_distance_identical_is_zero():
    mu, s = ref_stats(_features(500, 64, 9))
    scale = np.trace(s)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6 * scale
    assert abs(frechet_distance(mu, s, mu, s, method="eigh")) < 1e-6 * scale
    # a pure mean shift gives exactly ||mu1 - mu2||^2
    shift = np.full(64, 0.5)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(shift.dot(shift), rel=1e-6)


def test_frechet_distance_bad_inputs():
    mu, s = ref_stats(_features(50, 8, 10))
    with pytest.raises(DataError, match="different lengths"):
        frechet_distance(mu, s, mu[:4], s[:4, :4])
    with pytest.raises(DataError, match="shape"):
        frechet_distance(mu, s, mu, s[:4, :4])
    with pytest.raises(DataError, match="NaN"):
        frechet_distance(mu, s * np.nan, mu, s)
    with pytest.raises(JaxquantError, match="method"):
        frechet_distance(mu, s, mu, s, method="svd")


def test_feature_statistics():
    x = _features(100, 12, 11).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-12)
    with pytest.raises(DataError, match="at least 2"):
        feature_statistics(x[:1])
    with pytest.raises(DataError, match="2-D"):
        feature_statistics(x[0])


def _pytorch_fid_frechet_distance():
    """pytorch-fid's ``calculate_frechet_distance``, read from its installed ``fid_score.py``.

    The module imports torchvision at the top, which the CPU-only test setup does not have
    (and whose wheels would pull another torch), so the function is taken from the file's
    syntax tree and run with the two names it uses (``np``, ``scipy.linalg``). CI installs
    ``pytorch-fid`` without its dependencies (``.ci/run``).
    """
    import ast
    import importlib.util
    from pathlib import Path

    import scipy.linalg

    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None or spec.origin is None:
        pytest.skip("pytorch-fid is not installed (.ci/run installs it)")
    source = (Path(spec.origin).parent / "fid_score.py").read_text()
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    namespace = {"np": np, "linalg": scipy.linalg}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "pytorch_fid/fid_score.py", "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def test_frechet_distance_against_pytorch_fid():
    calculate_frechet_distance = _pytorch_fid_frechet_distance()
    for seed, shift in ((12, 0.2), (14, 0.0), (16, 1.5)):
        mu1, s1 = ref_stats(_features(300, 32, seed))
        mu2, s2 = ref_stats(_features(300, 32, seed + 1, shift=shift))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            expected = calculate_frechet_distance(mu1, s1, mu2, s2)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------
# sFID features
# --------------------------------------------------------------------------------------


def test_spatial_features_flatten_order_matches_guided_diffusion():
    n, h, w, c = 3, 4, 5, 10
    x = np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c)
    out = spatial_features_for_sfid(x)
    assert out.shape == (n, h * w * 7)
    # guided-diffusion: TF NHWC activations, spatial[..., :7].reshape([N, -1]) -> (H, W, C)
    for i, hh, ww, cc in [(0, 0, 0, 0), (1, 2, 3, 6), (2, 3, 4, 5), (0, 1, 0, 2)]:
        assert out[i, (hh * w + ww) * 7 + cc] == x[i, hh, ww, cc]
    np.testing.assert_array_equal(out, x[..., :7].reshape(n, -1))
    # NCHW input (a PyTorch port) is flattened into the same order
    np.testing.assert_array_equal(spatial_features_for_sfid(x.transpose(0, 3, 1, 2), layout="NCHW"), out)
    mu, sigma = spatial_statistics(x)
    mu_ref, sigma_ref = ref_stats(x[..., :7].reshape(n, -1))
    np.testing.assert_allclose(mu, mu_ref)
    np.testing.assert_allclose(sigma, sigma_ref)
    with pytest.raises(DataError, match="channels"):
        spatial_features_for_sfid(x[..., :5])
    with pytest.raises(DataError, match="4-D"):
        spatial_features_for_sfid(x[0])


# --------------------------------------------------------------------------------------
# Inception score
# --------------------------------------------------------------------------------------


def test_inception_score_matches_guided_diffusion_loop():
    rng = np.random.default_rng(14)
    # N=12000 with split_size 5000 -> chunks of 5000, 5000, 2000 (the partial one counts)
    logits = rng.normal(size=(12000, 100)) * 3.0
    logits[:, :10] += rng.normal(size=(12000, 1)) * 2.0  # make chunks differ a bit
    exp_mean, exp_std, scores = ref_inception_score(logits, 5000)
    assert len(scores) == 3
    mean, std = inception_score(logits, split_size=5000)
    assert mean == pytest.approx(exp_mean, rel=1e-10)
    assert std == pytest.approx(exp_std, rel=1e-8)
    # the last, partial chunk is included with equal weight (dropping it changes the mean)
    assert mean != pytest.approx(float(np.mean(scores[:2])), rel=1e-9)
    # probabilities in give the same as logits in
    e = np.exp(logits - logits.max(1, keepdims=True))
    probs = e / e.sum(1, keepdims=True)
    mean_p, std_p = inception_score(probs, split_size=5000, from_logits=False)
    assert mean_p == pytest.approx(exp_mean, rel=1e-10)
    assert std_p == pytest.approx(exp_std, rel=1e-8)


def test_inception_score_extremes():
    # confident and uniformly spread over C classes -> IS = C; one class only -> IS = 1
    c = 10
    probs = np.eye(c)[np.arange(1000) % c]
    mean, std = inception_score(probs, split_size=1000, from_logits=False)
    assert mean == pytest.approx(c, rel=1e-12) and std == 0.0
    same = np.tile(np.eye(c)[3], (500, 1))
    assert inception_score(same, split_size=100, from_logits=False)[0] == pytest.approx(1.0)
    # extreme logits (probabilities underflow to 0) stay finite
    mean, _ = inception_score(np.eye(c)[np.arange(1000) % c] * 1e4, split_size=1000)
    assert mean == pytest.approx(c, rel=1e-9)


def test_inception_score_bad_inputs():
    with pytest.raises(DataError, match="probability"):
        inception_score(np.random.default_rng(0).normal(size=(10, 5)), from_logits=False)
    with pytest.raises(JaxquantError, match="split_size"):
        inception_score(np.zeros((10, 5)), split_size=0)
    with pytest.raises(DataError, match="num_classes"):
        inception_score(np.zeros(10))


# --------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------


def _int_features(n, d, seed, lo=-4, hi=5):
    # small integers: every squared distance is an exact integer in float16/32/64, so the
    # JAX blocks and the float64 reference agree bit for bit, ties included
    return np.random.default_rng(seed).integers(lo, hi, size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_manifold_radii_match_partition_including_self(k):
    x = _int_features(300, 16, 20, lo=-2, hi=3)
    expected = ref_radii(x, k)
    np.testing.assert_array_equal(manifold_radii(x, k=k, batch_size=64), expected)
    np.testing.assert_array_equal(manifold_radii(x, k=k, batch_size=1000), expected)
    # with duplicates in the set the self-inclusive k-th value is what is returned
    dup = np.concatenate([x[:50], x[:50]], axis=0)
    np.testing.assert_array_equal(manifold_radii(dup, k=1, batch_size=32), np.zeros(100))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_full_matrix_reference(k):
    real = _int_features(300, 16, 21)
    fake = _int_features(250, 16, 22) + np.float32(1.0)
    exp_p, exp_r = ref_precision_recall(real, fake, k)
    assert 0.0 < exp_p < 1.0 and 0.0 < exp_r < 1.0  # a non-trivial case
    for bs in (64, 128, 10000):
        p, r = precision_recall(real, fake, k=k, batch_size=bs)
        assert (p, r) == (exp_p, exp_r), bs
    # guided-diffusion's float16 distance blocks are exact on these small integers
    assert precision_recall(real, fake, k=k, batch_size=64, distance_dtype="float16") == (exp_p, exp_r)


def test_precision_recall_continuous_features():
    real = _features(300, 16, 23).astype(np.float32)
    fake = (_features(280, 16, 24) * 1.3 + 0.3).astype(np.float32)
    exp_p, exp_r = ref_precision_recall(real, fake, 3)
    p, r = precision_recall(real, fake, k=3, batch_size=100)
    # float32 vs float64 distances: at most a sample on a ball's boundary may flip
    assert abs(p - exp_p) <= 1 / 280 + 1e-12
    assert abs(r - exp_r) <= 1 / 300 + 1e-12
    assert p != pytest.approx(r)  # the two directions are really different quantities


def test_precision_recall_float16_falls_back_on_overflow():
    # squared norms ~1e6 overflow float16: every block falls back to float32
    real = _features(200, 16, 25).astype(np.float32) * 300
    fake = (_features(150, 16, 26) * 300 + 100).astype(np.float32)
    assert precision_recall(real, fake, batch_size=64, distance_dtype="float16") == precision_recall(
        real, fake, batch_size=64
    )


def test_precision_recall_obvious_cases():
    x = _features(120, 16, 27).astype(np.float32)
    assert precision_recall(x, x.copy(), k=3, batch_size=50) == (1.0, 1.0)
    assert precision_recall(x, x + 1000.0, k=3, batch_size=50) == (0.0, 0.0)
    # fakes all collapsed onto one real point: precision 1, recall low (mode collapse)
    collapsed = np.repeat(x[:1], 60, axis=0)
    p, r = precision_recall(x, collapsed, k=3, batch_size=50)
    assert p == 1.0 and r < 0.1


def test_precision_recall_bad_inputs():
    x = _features(10, 4, 28)
    with pytest.raises(DataError, match="dimensions"):
        precision_recall(x, x[:, :3])
    with pytest.raises(DataError, match="more than"):
        precision_recall(x, x, k=10)
    with pytest.raises(JaxquantError, match="distance_dtype"):
        precision_recall(x, x, distance_dtype="float64")


# --------------------------------------------------------------------------------------
# Reference batches (.npz)
# --------------------------------------------------------------------------------------


def _images(n=6, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _stats(d, seed):
    return ref_stats(_features(3 * d, d, seed))


def test_reference_round_trip(tmp_path):
    imgs = _images()
    mu, sigma = _stats(8, 30)
    mu_s, sigma_s = _stats(14, 31)
    path = save_reference(
        tmp_path / "ref.npz", imgs, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, feature_net="dinov2"
    )
    # raw layout: guided-diffusion's keys, plus feature_net as a 0-d unicode array
    with np.load(path, allow_pickle=False) as raw:
        assert sorted(raw.files) == ["arr_0", "feature_net", "mu", "mu_s", "sigma", "sigma_s"]
        assert raw["feature_net"].ndim == 0 and raw["feature_net"].dtype.kind == "U"
        assert raw["arr_0"].dtype == np.uint8 and raw["mu"].dtype == np.float64
    ref = load_reference(path, feature_net="dinov2")
    np.testing.assert_array_equal(ref["images"], imgs)
    for key, val in [("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)]:
        np.testing.assert_array_equal(ref[key], val)
    assert ref["feature_net"] == "dinov2"
    assert load_reference(path, with_images=False)["images"] is None
    np.testing.assert_array_equal(load_images(path), imgs)
    # no stray temporary file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]


def test_packed_reference_is_half_the_size_and_identical(tmp_path):
    mu, sigma = _stats(40, 35)
    mu_s, sigma_s = _stats(31, 36)
    kw = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, feature_net="dinov2")
    full = save_reference(tmp_path / "full.npz", **kw)
    packed = save_reference(tmp_path / "packed.npz", packed=True, **kw)
    with np.load(packed) as raw:
        assert sorted(raw.files) == ["feature_net", "mu", "mu_s", "sigma_s_triu", "sigma_triu"]
        assert raw["sigma_triu"].shape == (40 * 41 // 2,)
    assert packed.stat().st_size < 0.6 * full.stat().st_size
    a, b = load_reference(full), load_reference(packed)
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_array_equal(a[key], b[key])
    bad = sigma.copy()
    bad[0, 1] += 1.0
    with pytest.raises(DataError, match="not symmetric"):
        save_reference(tmp_path / "bad.npz", mu=mu, sigma=bad, packed=True)
    np.savez(tmp_path / "short.npz", mu=mu, sigma_triu=np.zeros(7), feature_net=np.array("dinov2"))
    with pytest.raises(DataError, match="packed upper triangle"):
        load_reference(tmp_path / "short.npz")


def test_reference_feature_net_mismatch_is_refused(tmp_path):
    mu, sigma = _stats(8, 32)
    path = save_reference(tmp_path / "ref.npz", mu=mu, sigma=sigma, feature_net="dinov2")
    with pytest.raises(DataError) as ei:
        load_reference(path, feature_net="inception")
    assert "'dinov2'" in str(ei.value) and "'inception'" in str(ei.value)
    assert load_reference(path)["images"] is None


def test_reference_guided_diffusion_layout(tmp_path):
    """The public VIRTUAL_imagenet256_labeled.npz layout: arr_0 + 4 stats, no feature_net."""
    imgs = _images(4, 16, 16)
    mu, sigma = _stats(8, 33)
    mu_s, sigma_s = _stats(12, 34)
    path = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(path, arr_0=imgs, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = load_reference(path, feature_net="inception")
    assert ref["feature_net"] == "inception"
    np.testing.assert_array_equal(ref["images"], imgs)
    np.testing.assert_array_equal(ref["sigma_s"], sigma_s)
    with pytest.raises(DataError, match="'inception'.*'clip'"):
        load_reference(path, feature_net="clip")
    # a sample batch: images only, any feature net accepted, no statistics
    sample = tmp_path / "samples.npz"
    np.savez(sample, arr_0=imgs)
    out = load_reference(sample, feature_net="clip")
    assert out["mu"] is None and out["feature_net"] is None
    np.testing.assert_array_equal(out["images"], imgs)


def test_load_images_errors(tmp_path):
    with pytest.raises(DataError, match="no such batch file"):
        load_images(tmp_path / "missing.npz")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match="not an .npz archive") as e:
        load_images(garbage)
    assert "allow_pickle" not in str(e.value)  # numpy's advice for pickles does not apply
    np.savez(garbage, arr_0=_images())
    garbage.write_bytes(garbage.read_bytes()[:60])  # a truncated zip
    with pytest.raises(DataError, match="not a readable .npz"):
        load_images(garbage)
    npy = tmp_path / "single.npy"
    np.save(npy, _images())
    with pytest.raises(DataError, match="not an .npz"):
        load_images(npy)

    def write(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        return p

    with pytest.raises(DataError, match=r"no 'arr_0'.*images_wrong_key"):
        load_images(write("k.npz", images_wrong_key=_images()))
    floats = _images().astype(np.float32) / 127.5 - 1.0
    with pytest.raises(DataError, match=r"float32.*127\.5\)\.clip\(0, 255\)\.astype\(np\.uint8\)"):
        load_images(write("f.npz", arr_0=floats))
    with pytest.raises(DataError, match="int64"):
        load_images(write("i.npz", arr_0=_images().astype(np.int64)))
    with pytest.raises(DataError, match="4-D"):
        load_images(write("r.npz", arr_0=_images()[0]))
    with pytest.raises(DataError, match="channels"):
        load_images(write("c.npz", arr_0=_images(c=4)))
    with pytest.raises(DataError, match="NCHW"):
        load_images(write("nchw.npz", arr_0=_images(h=3, w=8, c=8)))
    # grayscale is accepted as stored
    gray = _images(c=1)
    np.testing.assert_array_equal(load_images(write("g.npz", arr_0=gray)), gray)


def test_save_reference_errors(tmp_path):
    mu, sigma = _stats(8, 35)
    with pytest.raises(DataError, match="'mu' but not 'sigma'"):
        save_reference(tmp_path / "a.npz", mu=mu)
    with pytest.raises(DataError, match="shape"):
        save_reference(tmp_path / "b.npz", mu=mu, sigma=sigma[:4, :4])
    with pytest.raises(DataError, match="nothing to save"):
        save_reference(tmp_path / "c.npz")
    with pytest.raises(DataError, match="float32"):
        save_reference(tmp_path / "d.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    assert not any(tmp_path.iterdir())
    # a file with a half pair of statistics is rejected on load as well
    bad = tmp_path / "half.npz"
    np.savez(bad, arr_0=_images(), mu=mu)
    with pytest.raises(DataError, match="'mu' but not 'sigma'"):
        load_reference(bad)
