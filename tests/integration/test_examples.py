"""Every example starts and finishes in its smoke mode, and writes what its docstring promises."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py") if p.name != "__init__.py"))
def test_example_runs_in_smoke_mode(script, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--smoke", "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "step" in completed.stdout
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file written"


def test_cli_example_adds_the_callbacks_from_yaml(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "cli" / "main.py"),
            "fit",
            "--config",
            str(EXAMPLES / "cli" / "config.yaml"),
            "--trainer.max_steps=60",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore::DeprecationWarning"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "LLCMonitor: estimating every 50 steps" in completed.stderr + completed.stdout
    assert list(tmp_path.rglob("events.out.tfevents.*"))
