"""The Flax UNet2DModel: configs accepted and refused, sizes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.errors import ConfigError
from jaxquant.models.unet2d import UNet2DConfig, UNet2DModel

CIFAR10 = dict(
    _class_name="UNet2DModel", _diffusers_version="0.0.4", sample_size=32, in_channels=3, out_channels=3,
    block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn="silu",
    attention_head_dim=None, center_input_sample=False, mid_block_scale_factor=1, norm_num_groups=32,
    time_embedding_type="positional")


def _num_params(cfg):
    m = UNet2DModel(UNet2DConfig.from_dict(cfg))
    s = cfg["sample_size"]
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, s, s, cfg["in_channels"])),
                                           jnp.zeros((1,), jnp.int32)))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))


def test_cifar10_config_has_the_published_parameter_count():
    # google/ddpm-cifar10-32 has 35.7 M parameters.
    assert _num_params(CIFAR10) == 35_746_307


def test_256px_config_is_accepted():
    cfg = dict(CIFAR10, sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
               down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
    c = UNet2DConfig.from_dict(cfg)
    assert c.sample_size == 256 and len(c.down_block_types) == 6


@pytest.mark.parametrize("key,value,field", [
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D", "DownBlock2D", "DownBlock2D"], "down_block_types[1]"),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "up_block_types[2]"),
    ("time_embedding_type", "fourier", "time_embedding_type"),
    ("resnet_time_scale_shift", "spatial", "resnet_time_scale_shift"),
    ("frobnicate", 3, "frobnicate"),
])
def test_unsupported_options_are_refused_by_name(key, value, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        UNet2DConfig.from_dict({**CIFAR10, key: value})


def test_mismatched_block_lists_are_refused():
    with pytest.raises(ConfigError, match="same length"):
        UNet2DConfig.from_dict({**CIFAR10, "block_out_channels": [128, 256, 256]})


def test_layer_names_follow_diffusers():
    m = UNet2DModel(UNet2DConfig.from_dict(CIFAR10))
    shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)))
    names = set(shapes["params"])
    assert {"conv_in", "time_embedding.linear_1", "down_blocks.1.attentions.0", "mid_block.attentions.0",
            "up_blocks.2.attentions.2", "down_blocks.0.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
            "conv_norm_out", "conv_out"} <= names
    assert set(shapes["params"]["down_blocks.1.attentions.0"]) == {"group_norm", "to_q", "to_k", "to_v", "to_out.0"}


def test_bfloat16_compute_is_close_to_float32():
    cfg = dict(CIFAR10, block_out_channels=[32, 32], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
               up_block_types=["AttnUpBlock2D", "UpBlock2D"], norm_num_groups=8, sample_size=16)
    c = UNet2DConfig.from_dict(cfg)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    t = jnp.array([3, 700], jnp.int32)
    params = UNet2DModel(c).init(jax.random.key(0), x, t)["params"]
    y32 = UNet2DModel(c).apply({"params": params}, x, t)
    y16 = UNet2DModel(c, dtype=jnp.bfloat16).apply({"params": params}, x, t)
    assert y16.dtype == jnp.float32 and y16.shape == (2, 16, 16, 3)
    rel = float(jnp.max(jnp.abs(y16 - y32)) / jnp.max(jnp.abs(y32)))
    assert rel < 0.05


def test_class_labels_required_exactly_when_conditional():
    cfg = dict(CIFAR10, block_out_channels=[32, 32], down_block_types=["DownBlock2D", "DownBlock2D"],
               up_block_types=["UpBlock2D", "UpBlock2D"], norm_num_groups=8, sample_size=8, num_class_embeds=4)
    c = UNet2DConfig.from_dict(cfg)
    x = jnp.zeros((2, 8, 8, 3))
    t = jnp.zeros((2,), jnp.int32)
    params = UNet2DModel(c).init(jax.random.key(0), x, t, jnp.zeros((2,), jnp.int32))["params"]
    assert params["class_embedding"]["embedding"].shape == (4, 128)
    with pytest.raises(ConfigError, match="class-conditional"):
        UNet2DModel(c).apply({"params": params}, x, t)
