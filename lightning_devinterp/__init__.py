"""Drop-in PyTorch Lightning callbacks for developmental interpretability: live local learning coefficient estimates."""

import logging

from lightning_devinterp.callbacks.llc_monitor import LLCEstimateWarning, LLCMonitor
from lightning_devinterp.callbacks.tracker import LLCRecord
from lightning_devinterp.callbacks.transition_monitor import TransitionMonitor
from lightning_devinterp.detection.combined import detect_transitions
from lightning_devinterp.detection.detector import Transition, TransitionDetector, TransitionWarning
from lightning_devinterp.sampling.calibration import CalibrationChoice, CalibrationResult, calibrate
from lightning_devinterp.sampling.config import SamplingConfig
from lightning_devinterp.sampling.estimate import estimate_llc
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult

__version__ = "0.1.0"

logging.getLogger("lightning_devinterp").addHandler(logging.NullHandler())

__all__ = [
    "CalibrationChoice",
    "CalibrationResult",
    "LLCEstimateWarning",
    "LLCEstimationError",
    "LLCMonitor",
    "LLCRecord",
    "LLCResult",
    "SamplingConfig",
    "Transition",
    "TransitionDetector",
    "TransitionMonitor",
    "TransitionWarning",
    "__version__",
    "calibrate",
    "detect_transitions",
    "estimate_llc",
]
