"""Model directories: the on-disk format every stage reads and writes."""

from jaxquant.io.model_dir import load_model_dir, resolve_model_path, save_model_dir, ModelDirMeta  # noqa: F401
