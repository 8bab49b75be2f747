"""Converters from PyTorch checkpoints to jaxquant model directories.

``common`` holds the format-independent part (reading a torch state dict safely and
mapping it onto an expected Flax parameter tree); one module per source format
(``diffusers``, ...) knows where that format keeps its config and weights.
These modules need the ``torch`` extra (``pip install 'jaxquant[torch]'``).
"""

from checkpoints_convert.common import (
    expected_torch_shape,
    load_torch_state_dict,
    rename_state_dict,
    state_dict_to_params,
    torch_name_for,
    torch_to_flax,
)

__all__ = [
    "expected_torch_shape",
    "load_torch_state_dict",
    "rename_state_dict",
    "state_dict_to_params",
    "torch_name_for",
    "torch_to_flax",
]
