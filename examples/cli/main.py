"""LightningCLI entry point: the callbacks come from the YAML config, the model code knows nothing about them.

    pip install -e ".[examples]"   # jsonargparse for LightningCLI, scikit-learn for the data
    python examples/cli/main.py fit --config examples/cli/config.yaml

Reuses the digits example's model and data. Edit ``config.yaml`` (or pass ``--trainer.callbacks+=...``) to change
the LLCMonitor schedule or add monitors; ``python examples/cli/main.py fit --help`` lists every argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from digits import DigitsClassifier, DigitsData


def main() -> None:
    LightningCLI(DigitsClassifier, DigitsData, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
