"""Calibration over timesteps: what each layer sees while the model samples."""

from jaxquant.calib.calibration import CalibConfig, Calibration, calibrate, load_calibration  # noqa: F401
