"""Datasets read from local files (nothing is downloaded)."""

from jaxquant.data.fmnist import FMNIST_CLASSES, load_fashion_mnist  # noqa: F401
