"""Record benchmark runs: a real Trainer.fit with LLCMonitor estimating λ̂ on a dense grid (every 25 steps), the
minibatch loss at every step, and the full-training-set loss every 10 steps (the ground truth's source), with each
stage's own part of it where the family knows them (the linear networks' teacher modes).

Any schedule of estimates (the default's 100-step baseline, with or without densification around transitions)
can then be replayed from the grid, since the monitor's estimate at a step depends only on the step, not on the
schedule. Runs are cached as JSON under ``recorded/`` (ignored by git).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.transitions.families import Spec
from lightning_devinterp import LLCMonitor

GRID = 25
"""Steps between recorded λ̂ estimates."""

FULL_LOSS_EVERY = 10
"""Steps between evaluations of the loss on the whole training set."""

RECORDED = Path(__file__).resolve().parent / "recorded"


class Recorder(pl.Callback):
    def __init__(self, data: Any, stage_losses: Callable[[nn.Module], list[float]] | None = None) -> None:
        self.data, self.stage_losses = data, stage_losses
        self.minibatch: list[tuple[int, float]] = []
        self.full: list[tuple[int, float]] = []
        self.stages: list[tuple[int, list[float]]] = []

    def _full_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.full.append((trainer.global_step, float(pl_module.loss(pl_module.net, self.data.tensors))))
            if self.stage_losses is not None:
                self.stages.append((trainer.global_step, self.stage_losses(pl_module.net)))

    def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._full_loss(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.minibatch.append((trainer.global_step, float(outputs["loss"])))
        if trainer.global_step % FULL_LOSS_EVERY == 0:
            self._full_loss(trainer, pl_module)


def train_recorded(spec: Spec, monitor: LLCMonitor) -> Recorder:
    """Train ``spec`` (seeded) with ``monitor`` and a :class:`Recorder`, quietly on the CPU; the recorder."""
    pl.seed_everything(spec.seed, verbose=False)
    trainee, data = spec.build()
    recorder = Recorder(data, spec.stage_losses)
    trainer = pl.Trainer(
        max_steps=spec.steps,
        callbacks=[monitor, recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(trainee, DataLoader(data, batch_size=spec.batch_size, shuffle=True))
    return recorder


def record(spec: Spec, directory: Path = RECORDED) -> dict[str, Any]:
    """Train ``spec`` once with the monitor and the recorder; the series as a JSON-able dict (cached in ``directory``)."""
    path = directory / f"{spec.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    monitor = LLCMonitor(
        every_n_steps=GRID, num_chains=4, num_burnin_steps=10, num_draws=40, detector=False, seed=spec.seed
    )
    recorder = train_recorded(spec, monitor)
    series = {
        "family": spec.family,
        "name": spec.name,
        "seed": spec.seed,
        "steps": spec.steps,
        "minibatch_loss": recorder.minibatch,
        "full_loss": recorder.full,
        "every_n_steps": spec.every_n_steps,
        **({"stage_losses": recorder.stages} if spec.stage_losses is not None else {}),
        "llc": [
            {
                "step": r.step,
                "mean": r.llc_mean,
                "std": r.llc_std,
                "chains": r.result.num_chains_used,
                "healthy": r.healthy,
                "epsilon_changed": r.epsilon_changed,
            }
            for r in monitor.history
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(series))
    return series
