"""Drop-in PyTorch Lightning callbacks for developmental interpretability: live local learning coefficient estimates."""

import logging

from lightning_devinterp.calibration import CalibrationChoice, CalibrationResult, calibrate
from lightning_devinterp.llc import LLCEstimationError, LLCResult, estimate_llc
from lightning_devinterp.monitor import LLCEstimateWarning, LLCMonitor, LLCRecord
from lightning_devinterp.transition_monitor import TransitionMonitor
from lightning_devinterp.transitions import Transition, TransitionDetector, TransitionWarning, detect_transitions

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
    "Transition",
    "TransitionDetector",
    "TransitionMonitor",
    "TransitionWarning",
    "__version__",
    "calibrate",
    "detect_transitions",
    "estimate_llc",
]
