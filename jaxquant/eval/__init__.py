"""Sample-quality evaluation with guided-diffusion evaluator semantics.

Metrics on features (:mod:`jaxquant.eval.metrics`): FID / sFID
(:func:`frechet_distance`), Inception score, improved precision / recall; and the
``.npz`` reference-batch format (:mod:`jaxquant.eval.refbatch`).
"""

from jaxquant.eval.metrics import (
    FrechetDistanceError,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_score,
    manifold_radii,
    precision_recall,
    spatial_features_for_sfid,
    spatial_statistics,
)
from jaxquant.eval.refbatch import load_images, load_reference, save_reference, validate_images

__all__ = [
    "FrechetDistanceError",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_score",
    "load_images",
    "load_reference",
    "manifold_radii",
    "precision_recall",
    "save_reference",
    "spatial_features_for_sfid",
    "spatial_statistics",
    "validate_images",
]
