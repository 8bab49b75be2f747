import os
import tempfile

# Many tests build the same small networks; a persistent compilation cache shared by
# the run lets later tests reuse earlier compiles instead of recompiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxquant-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


# The small random UNet and its 2-group calibration (with XᵀX) that the quantization
# tests share; a test module may define its own ``model_dir`` / ``calib`` instead.
# (Imported here, after the cache settings above, which jax reads when imported.)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import jaxquant  # noqa: E402
from jaxquant.calib import CalibConfig, calibrate  # noqa: E402
from jaxquant.diffusion import ScheduleConfig  # noqa: E402
from jaxquant.io.model_dir import ModelDirMeta, save_model_dir  # noqa: E402
from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel  # noqa: E402

TINY = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "attention_head_dim": None,
    "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0,
}


def _jitter(params):
    """Non-trivial norms and biases, so activations have structure."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [v + 0.1 * jax.random.normal(k, v.shape) for v, k in zip(leaves, keys)])


def build_tiny(d, perturb=_jitter, **overrides):
    """Save a random tiny UNet (``TINY`` with ``overrides``; parameters from key 0, then
    ``perturb``) as a model directory ``d`` with a 100-step schedule; returns ``d``."""
    cfg = UNet2DConfig.from_dict({**TINY, **overrides})
    params = UNet2DModel(cfg).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
    save_model_dir(d, ModelDirMeta("unet2d", cfg.to_dict(), ScheduleConfig(num_train_timesteps=100).to_dict()),
                   perturb(params))
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def calib(model_dir):
    m = jaxquant.load(model_dir)
    return calibrate(m, CalibConfig(num_samples=8, steps=4, groups=2, batch_size=4, reservoir=512), progress=False)
