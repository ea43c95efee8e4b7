"""Drop-in PyTorch Lightning callbacks for developmental interpretability: live local learning coefficient estimates."""

import logging

from lightning_devinterp.llc import LLCEstimationError, LLCResult, estimate_llc

__version__ = "0.1.0"

logging.getLogger("lightning_devinterp").addHandler(logging.NullHandler())

__all__ = ["LLCEstimationError", "LLCResult", "estimate_llc", "__version__"]
