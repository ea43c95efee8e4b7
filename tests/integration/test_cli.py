"""LightningCLI can configure the callbacks from YAML, with every argument type-checked."""

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from lightning_devinterp import LLCMonitor, TransitionMonitor
from tests.helpers.trainers import Regressor, regression_loader


class CLIRegressor(Regressor):
    def train_dataloader(self):
        return regression_loader()


def test_callbacks_are_configured_from_a_yaml_config(tmp_path):
    config = {
        "trainer": {
            "max_steps": 4,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
            "callbacks": [
                {
                    "class_path": "lightning_devinterp.LLCMonitor",
                    "init_args": {
                        "every_n_steps": 2,
                        "num_chains": 2,
                        "num_draws": 10,
                        "num_burnin_steps": 2,
                        "epsilon": 5e-5,
                    },
                },
                {"class_path": "lightning_devinterp.TransitionMonitor", "init_args": {"monitor": "train_loss"}},
            ],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(CLIRegressor, args=["fit", "--config", str(path)], save_config_kwargs={"overwrite": True})
    monitor = next(c for c in cli.trainer.callbacks if isinstance(c, LLCMonitor))
    assert monitor.config.epsilon == 5e-5
    assert [r.step for r in monitor.history] == [0, 2, 4]
    assert any(isinstance(c, TransitionMonitor) for c in cli.trainer.callbacks)


def test_a_mistyped_argument_is_rejected_by_the_cli(tmp_path):
    config = {
        "trainer": {
            "callbacks": [{"class_path": "lightning_devinterp.LLCMonitor", "init_args": {"num_chains": "four"}}]
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        LightningCLI(CLIRegressor, args=["fit", "--config", str(path)], run=False)
