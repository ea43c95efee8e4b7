"""Drop-in PyTorch Lightning callbacks for developmental interpretability: live local learning coefficient estimates."""

import logging

from lightning_devinterp.callbacks.llc_monitor import LLCEstimateWarning, LLCMonitor
from lightning_devinterp.callbacks.transition_monitor import TransitionMonitor
from lightning_devinterp.detection.combined import detect_transitions
from lightning_devinterp.detection.level_shifts import LevelShiftDetector, TransitionDetector
from lightning_devinterp.detection.loss_drops import LossDropDetector
from lightning_devinterp.detection.transition import Transition, TransitionWarning
from lightning_devinterp.sampling.calibration import CalibrationChoice, CalibrationResult, calibrate
from lightning_devinterp.sampling.config import SamplingConfig
from lightning_devinterp.sampling.estimate import estimate_llc
from lightning_devinterp.sampling.result import LLCEstimationError, LLCResult
from lightning_devinterp.tracking.tracker import LLCRecord

__version__ = "0.3.0.dev0"

logging.getLogger("lightning_devinterp").addHandler(logging.NullHandler())

__all__ = [
    "CalibrationChoice",
    "CalibrationResult",
    "LLCEstimateWarning",
    "LLCEstimationError",
    "LLCMonitor",
    "LLCRecord",
    "LLCResult",
    "LevelShiftDetector",
    "LossDropDetector",
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
