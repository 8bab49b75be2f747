"""Training the Fashion-MNIST feature classifier (``jaxquant train classifier``)."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxquant.eval.fmnist_net import FMNIST_NET_CONFIG, build
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir
from jaxquant.train.loop import TrainConfig, train
from jaxquant import xla


def augment(key: jax.Array, x: jax.Array) -> jax.Array:
    """Random horizontal flip and random translation by up to 2 pixels (background fill)."""
    kf, ks = jax.random.split(key)
    flip = jax.random.bernoulli(kf, 0.5, (x.shape[0], 1, 1, 1))
    x = jnp.where(flip, x[:, :, ::-1], x)
    pad = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    shifts = jax.random.randint(ks, (x.shape[0], 2), 0, 5)
    crop = jax.vmap(lambda im, s: jax.lax.dynamic_slice(im, (s[0], s[1], 0), x.shape[1:]))
    return crop(pad, shifts)


def accuracy(params: dict, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    """Top-1 accuracy of the classifier on float images in [-1, 1]."""
    net = build()
    fwd = xla.jit(lambda p, x: net.apply({"params": p}, x)[0].argmax(-1))
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((np.asarray(fwd(params, jnp.asarray(images[i:i + batch]))) == labels[i:i + batch]).sum())
    return correct / len(images)


def train_classifier(run_dir: str | Path, train_xy: tuple, test_xy: tuple, cfg: TrainConfig,
                     export_dir: str | Path | None = None, label_smoothing: float = 0.1) -> tuple[Path, float]:
    """Train on ``train_xy`` (images in [-1, 1], labels), report test accuracy, export EMA weights."""
    x_tr, y_tr = train_xy
    net = build()
    params = net.init(jax.random.key(cfg.seed), jnp.zeros((1, *x_tr.shape[1:])))["params"]

    def loss_fn(p, batch, key):
        ka, kd = jax.random.split(key)
        x = augment(ka, batch["x"])
        logits, _ = net.apply({"params": p}, x, train=True, rngs={"dropout": kd})
        onehot = optax.smooth_labels(jax.nn.one_hot(batch["y"], 10), label_smoothing)
        loss = optax.softmax_cross_entropy(logits, onehot).mean()
        return loss, {"train_acc": (logits.argmax(-1) == batch["y"]).mean()}

    export_dir = Path(export_dir or Path(run_dir) / "model")
    t0 = time.time()
    state = train(run_dir, params, loss_fn, lambda idx: {"x": jnp.asarray(x_tr[idx]), "y": jnp.asarray(y_tr[idx])},
                  len(x_tr), cfg, description="classifier")
    acc = accuracy(state.ema_params, *test_xy)
    meta = ModelDirMeta("fmnist-classifier", dict(FMNIST_NET_CONFIG), {}, extra={
        "training": {"steps": int(state.step), "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate,
                     "ema_decay": cfg.ema_decay, "session_wall_s": round(time.time() - t0, 1),
                     "data": "Fashion-MNIST train (60 000), padded to 32x32, flips + 2-px shifts"},
        "test_accuracy": acc})
    save_model_dir(export_dir, meta, state.ema_params)
    return export_dir, acc
