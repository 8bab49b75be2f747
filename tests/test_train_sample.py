"""Training resumes exactly; the exported model loads, samples and writes ADM files."""

import json

import jax
import numpy as np
import pytest

import jaxquant
from jaxquant import cli
from jaxquant.diffusion import ScheduleConfig
from jaxquant.errors import CheckpointError
from jaxquant.train.ddpm import train_ddpm
from jaxquant.train.loop import TrainConfig

TINY = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": None,
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
}


def _images(n=32):
    return np.random.default_rng(0).uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32)


def _cfg(steps):
    return TrainConfig(steps=steps, batch_size=8, learning_rate=1e-3, warmup_steps=2,
                       checkpoint_every=2, log_every=2, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    out = train_ddpm(run, _images(), TINY, _cfg(6), ScheduleConfig(num_train_timesteps=100))
    return run, out


def test_resumed_run_equals_uninterrupted_run(trained, tmp_path):
    _, full = trained
    run = tmp_path / "run"
    train_ddpm(run, _images(), TINY, _cfg(4), ScheduleConfig(num_train_timesteps=100))  # "killed" at step 4
    resumed = train_ddpm(run, _images(), TINY, _cfg(6), ScheduleConfig(num_train_timesteps=100))
    a, b = jaxquant.load(full).params, jaxquant.load(resumed).params
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6] and all(np.isfinite(r["loss"]) for r in log)


def test_exported_model_records_training_and_schedule(trained):
    _, out = trained
    m = jaxquant.load(out)
    assert m.meta.extra["training"]["steps"] == 6
    assert m.schedule.num_train_timesteps == 100
    y = m(np.zeros((2, 8, 8, 1)), [0, 99])
    assert y.shape == (2, 8, 8, 1) and np.all(np.isfinite(y))


def test_sample_cli_writes_adm_npz_and_png(trained, tmp_path):
    _, out = trained
    f = tmp_path / "s.npz"
    assert cli.main([  "sample", str(out), "--num", "5", "--steps", "4", "--batch-size", "4", "--seed", "7",
                     "--out", str(f)]) == 0
    arr = np.load(f)["arr_0"]
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8
    assert f.with_suffix(".png").is_file()
    # The library's sampler, called directly with the same settings, gives the same images.
    from jaxquant.diffusion.pipeline import generate

    np.testing.assert_array_equal(arr, generate(jaxquant.load(out), 5, steps=4, seed=7, batch_size=4, progress=False))
    # Same seed, same images; the batch index (not the batch contents) seeds each batch.
    g = tmp_path / "t.npz"
    cli.main(["sample", str(out), "--num", "4", "--steps", "4", "--batch-size", "4", "--seed", "7", "--out", str(g)])
    np.testing.assert_array_equal(np.load(g)["arr_0"], arr[:4])
    assert cli.main(["sample", str(out), "--num", "4", "--steps", "4", "--sampler", "ddpm", "--batch-size", "4",
                     "--out", str(g)]) == 0
    ddpm = np.load(g)["arr_0"]
    np.testing.assert_array_equal(ddpm, generate(jaxquant.load(out), 4, steps=4, sampler="ddpm", seed=0, batch_size=4,
                                                 progress=False))
    assert not np.array_equal(ddpm, arr[:4])


def test_load_errors_are_clear(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no model directory"):
        jaxquant.load(tmp_path / "nope")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="jaxquant convert --from diffusers"):
        jaxquant.load(tmp_path / "cfg")
    assert cli.main(["sample", str(tmp_path / "nope"), "--num", "1"]) == 2
    assert "no model directory" in capsys.readouterr().err


def test_params_of_another_architecture_are_refused(trained, tmp_path):
    _, out = trained
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model"]["block_out_channels"] = [8, 32]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape of"):
        jaxquant.load(bad)


def test_sampling_resumes_from_its_finished_batches(model_dir, tmp_path, monkeypatch):
    """A killed sampling run started again samples only the missing batches, and the images
    equal an uninterrupted run's; a resume directory of other settings is refused."""
    from jaxquant.diffusion import pipeline

    model = jaxquant.load(model_dir)
    whole = pipeline.generate(model, 7, steps=2, seed=3, batch_size=3, progress=False)
    store = tmp_path / "partial"
    first = pipeline.generate(model, 7, steps=2, seed=3, batch_size=3, progress=False, resume_dir=store)
    np.testing.assert_array_equal(first, whole)
    assert sorted(p.name for p in store.glob("batch-*.npy")) == [f"batch-0000{b}.npy" for b in range(3)]
    (store / "batch-00001.npy").unlink()  # as if killed while sampling batch 1
    calls = []
    real = pipeline.initial_noise
    monkeypatch.setattr(pipeline, "initial_noise", lambda key, shape: calls.append(shape) or real(key, shape))
    resumed = pipeline.generate(model, 7, steps=2, seed=3, batch_size=3, progress=False, resume_dir=store)
    np.testing.assert_array_equal(resumed, whole)
    assert len(calls) == 1  # only batch 1 was sampled again
    with pytest.raises(CheckpointError, match="other settings"):
        pipeline.generate(model, 7, steps=2, seed=4, batch_size=3, progress=False, resume_dir=store)
