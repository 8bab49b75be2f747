"""Shared training machinery: state, EMA, resumable orbax checkpoints, the step loop.

Every trainer (DDPM, VQ autoencoder, LDM, classifier) supplies a loss function
``loss_fn(params, batch, key) -> (loss, aux_metrics)`` and a batch iterator; this module
does the rest. A run directory holds ``checkpoints/`` (orbax, keeps the last few) and
``train_log.jsonl``; calling :func:`train` again on the same directory resumes from the
newest checkpoint, bit-for-bit (the data order and RNG are functions of the step).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jaxquant import xla
import optax
from clu import metrics as clu_metrics
from tqdm.auto import tqdm


@flax.struct.dataclass
class TrainState:
    """What a trainer carries between steps and saves: the step, the parameters, their EMA and the optimiser state."""

    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings shared by the trainers."""

    steps: int = 10_000
    batch_size: int = 64
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    keep_checkpoints: int = 2


# Built with `create` rather than a class body: with postponed annotations the field
# types would be strings, which clu cannot read.
_Metrics = clu_metrics.Collection.create(loss=clu_metrics.Average.from_output("loss"))


def _global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up then constant rate, and global-norm clipping."""
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)),
         optax.constant_schedule(cfg.learning_rate)], [max(cfg.warmup_steps, 1)])
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adamw(sched, weight_decay=cfg.weight_decay))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """EMA with the usual warm-up ``min(decay, (1 + step) / (10 + step))``.

    ``step`` is the number of optimiser steps taken before this update (0 at the first),
    so this is CompVis' ``LitEma`` warm-up one update earlier: its first update uses
    ``num_updates = 1`` (tested against it in ``tests/test_train_objectives.py``).
    """
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)


def epoch_batches(n: int, batch_size: int, seed: int, start_step: int) -> Iterator[np.ndarray]:
    """Index batches for steps ``start_step, start_step+1, …``; each epoch a fresh permutation.

    The permutation of epoch ``e`` is drawn from ``(seed, e)``, so resuming at any step
    reproduces the same data order as an uninterrupted run.
    """
    per_epoch = n // batch_size
    step = start_step
    while True:
        epoch, i = divmod(step, per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        yield perm[i * batch_size:(i + 1) * batch_size]
        step += 1


def train(
    run_dir: str | Path,
    init_params: Any,
    loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]],
    get_batch: Callable[[np.ndarray], Any],
    num_examples: int,
    cfg: TrainConfig,
    *,
    description: str = "train",
    on_checkpoint: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Run (or resume) training; returns the final state.

    Args:
      run_dir: directory for checkpoints and the log; reused to resume.
      init_params: parameters to start from when no checkpoint exists.
      loss_fn: ``(params, batch, key) -> (scalar loss, dict of scalar metrics)``.
      get_batch: maps an index array to a batch (numpy, moved to device per step).
      num_examples: dataset size (for the epoch permutation).
      cfg: optimisation settings.
      on_checkpoint: called with the state after each checkpoint (e.g. to export EMA).
    """
    import orbax.checkpoint as ocp

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tx = make_optimizer(cfg)
    state = TrainState(step=jnp.asarray(0, jnp.int32), params=init_params,
                       ema_params=init_params, opt_state=tx.init(init_params))
    mngr = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True))
    latest = mngr.latest_step()
    if latest is not None:
        state = mngr.restore(latest, args=ocp.args.StandardRestore(state))
        print(f"{description}: resumed from step {latest} in {run_dir / 'checkpoints'}")
    start = int(state.step)

    @xla.jit
    def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, state.step, cfg.ema_decay)
        new = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        return new, {"loss": loss, "grad_norm": _global_norm(grads), **aux}

    log_path = run_dir / "train_log.jsonl"
    batches = epoch_batches(num_examples, cfg.batch_size, cfg.seed, start)
    metrics = _Metrics.empty()
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=start, desc=description, dynamic_ncols=True)
    for step in range(start, cfg.steps):
        state, out = train_step(state, get_batch(next(batches)))
        metrics = metrics.merge(_Metrics.single_from_model_output(loss=out["loss"]))
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            vals = {k: float(v) for k, v in metrics.compute().items()}
            vals.update({k: float(v) for k, v in out.items() if k != "loss"})
            bar.set_postfix(loss=f"{vals['loss']:.4f}")
            with log_path.open("a") as f:
                f.write(json.dumps({"step": done, "wall_s": round(time.time() - t0, 1), **vals}) + "\n")
            metrics = _Metrics.empty()
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            mngr.save(done, args=ocp.args.StandardSave(state))
            mngr.wait_until_finished()
            if on_checkpoint is not None:
                on_checkpoint(state)
    bar.close()
    mngr.wait_until_finished()
    return state
