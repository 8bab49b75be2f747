"""Search for quantization plans: rate–distortion curves and Lagrangian bit allocation.

Modules: :mod:`~jaxquant.search.rd` (curves, allocation, plans, quantized models),
:mod:`~jaxquant.search.distortion` (normalised MSE, SSIM), :mod:`~jaxquant.search.plots`.
"""

from jaxquant.search.distortion import DISTORTIONS, SSIMConfig, dssim, ssim  # noqa: F401
from jaxquant.search.rd import (  # noqa: F401
    CurveConfig, RDCurves, RDPlan, RDProblem, allocate, allocate_plan, compute_curves, load_curves,
    quantize_model_rd, quantize_rd,
)
