"""Training the Fashion-MNIST feature classifier: augmentation, accuracy and the export, by value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.eval.fmnist_net import build, fmnist_feature_net
from jaxquant.io.model_dir import load_model_dir
from jaxquant.train.classifier import accuracy, augment, train_classifier
from jaxquant.train.loop import TrainConfig


def _candidates(im: np.ndarray) -> list[np.ndarray]:
    """Every flip × translation by -2..2 pixels of ``im`` [H, W, C], the background filled with -1."""
    h, w, _ = im.shape
    out = []
    for src in (im, im[:, ::-1]):
        pad = np.pad(src, ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        out += [pad[dy:dy + h, dx:dx + w] for dy in range(5) for dx in range(5)]
    return out


def test_augment_is_a_flip_and_a_shift_of_at_most_two_pixels():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (600, 8, 8, 1)).astype(np.float32)
    out = np.asarray(augment(jax.random.key(3), jnp.asarray(x)))
    seen = set()
    for im, a in zip(x, out):
        hits = [i for i, c in enumerate(_candidates(im)) if np.array_equal(c, a)]
        assert hits, "an augmented image is not a flip and shift of its source"
        seen.update(hits)
    assert len(seen) == 50  # every flip and shift occurs (600 images, 50 transforms)
    assert not np.array_equal(out, np.asarray(augment(jax.random.key(4), jnp.asarray(x))))


def test_accuracy_is_the_argmax_of_the_logits():
    net = build()
    x = np.random.default_rng(1).uniform(-1, 1, (50, 32, 32, 1)).astype(np.float32)
    params = net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    pred = np.asarray(net.apply({"params": params}, jnp.asarray(x))[0]).argmax(-1)
    labels = np.where(np.arange(50) % 3 == 0, pred, (pred + 1) % 10)  # 17 of 50 right
    assert accuracy(params, x, labels, batch=16) == pytest.approx(17 / 50)


def test_train_classifier_exports_a_feature_net_with_its_test_accuracy(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 10, 64)
    x = np.full((64, 32, 32, 1), -1.0, np.float32)
    for i, c in enumerate(y):  # a bright square whose position is the class
        x[i, 3 * c:3 * c + 4, 8:20] = 1.0
    cfg = TrainConfig(steps=4, batch_size=16, learning_rate=1e-3, warmup_steps=1, checkpoint_every=4, log_every=2,
                      seed=0)
    out, acc = train_classifier(tmp_path / "run", (x, y), (x[:32], y[:32]), cfg)
    meta, params = load_model_dir(out)
    assert meta.architecture == "fmnist-classifier" and meta.extra["training"]["steps"] == 4
    assert meta.extra["test_accuracy"] == acc == accuracy(params, x[:32], y[:32])
    # The export loads as the `fmnist` feature network: its logits are the classifier's.
    feats = fmnist_feature_net(str(out))
    logits = np.asarray(build().apply({"params": params}, jnp.asarray(x[:8]))[0])
    from jaxquant.eval.features import extract_features

    got = extract_features(feats, ((x[:8] + 1) * 127.5).round().astype(np.uint8), batch_size=8)["logits"]
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 2
