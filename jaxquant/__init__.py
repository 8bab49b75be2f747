"""jaxquant: compress diffusion models to 2-4 bits per weight in JAX/Flax."""

from jaxquant.errors import CheckpointError, ConfigError, DataError, JaxquantError
from jaxquant.api import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "JaxquantError", "ConfigError", "CheckpointError", "DataError", "__version__"]
