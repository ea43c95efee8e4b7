"""A toy model of superposition learns its features in stages; LLCMonitor follows λ̂ and reports the transitions.

The model (Elhage et al. 2022; Chen et al. 2023) squeezes 6 sparse features into 2 hidden dimensions and decodes
them again: f(x) = ReLU(WᵀWx + b), with W a 2x6 matrix. Each input feature is present with probability 0.05 and
then uniform in [0, 1]; the loss is ½‖f(x) − x‖² (1024 samples generated on the fly, batch 128). Plain SGD (learning
rate 0.3) from a tiny initialisation (scale 0.01) moves through the model's critical points one at a time: the loss
sits on a plateau, then drops while columns of W grow out of the origin or rearrange themselves in the plane.

What to expect (3000 steps, an estimate every 50 steps with 64 chains of 800 draws; about three minutes on two CPU cores):

- λ̂ is negative at the start: w* is a saddle, where SGLD keeps descending, and the estimates are marked unhealthy;
- the first transition: W leaves the origin and 4 of its columns form a square (4 features, 90 degrees apart); the
  loss on the training set falls by about two thirds and λ̂ climbs to a new level. The monitor reports its onset
  when the loss on its data at w* (``llc/init_loss``) falls below its plateau, and its end, with λ̂ now;
- a plateau, then the second transition: the square becomes a pentagon (one more feature represented), a slower
  fall of the loss (about 6% per 100 steps, so the example lowers the loss rule's threshold, ``drop``, from its
  default 10% per 100 steps to 6%) while λ̂ climbs further. The monitor reports its onset and its end, with λ̂
  before and after;
- the script then lists the estimates, the transitions and the columns of W at the start, at the end of each
  transition and at the end of training, and draws λ̂ ± std beside the training-set loss (log scale), onsets dashed
  and ends dotted, from the TensorBoard logs (needs matplotlib: the ``[examples]`` extra). ``docs/tms.png`` is this
  picture; docs/benchmarks.md gives the measured steps and levels.

Outputs: TensorBoard logs under ``--log-dir`` (``tensorboard --logdir runs``), ``<log dir>/tms.png``, a table of
estimates on stdout.

    python examples/tms.py [--steps 3000] [--every 50] [--log-dir runs] [--smoke]
"""

from __future__ import annotations

import argparse
import logging
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_devinterp import LLCMonitor, LossDropDetector, TransitionWarning
from lightning_devinterp.plotting import plot_runs, read_runs

NUM_FEATURES = 6
HIDDEN = 2


def sparse_features(num_samples: int = 1024, density: float = 0.05, seed: int = 0) -> TensorDataset:
    """Each feature is present with probability ``density`` and then uniform in [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(num_samples, NUM_FEATURES, generator=generator)
    present = torch.rand(num_samples, NUM_FEATURES, generator=generator) < density
    return TensorDataset(values * present)


class ToyModelOfSuperposition(pl.LightningModule):
    """f(x) = ReLU(WᵀWx + b): 6 features through a 2-dimensional bottleneck and back."""

    def __init__(self, init_scale: float = 0.01, lr: float = 0.3) -> None:
        super().__init__()
        self.W = nn.Parameter(init_scale * torch.randn(HIDDEN, NUM_FEATURES))
        self.b = nn.Parameter(torch.zeros(NUM_FEATURES))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        loss = 0.5 * ((self(x) - x) ** 2).sum(-1).mean()
        self.log("batch_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def describe_columns(W: torch.Tensor) -> str:
    """The columns of W that carry a feature (norm > 0.5), as norm@angle in degrees: the model's 'k-gon'."""
    columns = [
        f"{float(column.norm()):.2f}@{math.degrees(math.atan2(float(column[1]), float(column[0]))) % 360:.0f}"
        for column in W.T
        if float(column.norm()) > 0.5
    ]
    return " ".join([f"{len(columns)} columns in use", *columns])


class TrainingRecord(pl.Callback):
    """Logs the loss on the whole training set as ``train_loss`` every ``every`` steps (the minibatch loss hides the
    second drop) and remembers it and W, to print beside the estimates.
    """

    def __init__(self, data: TensorDataset, every: int) -> None:
        self.inputs = data.tensors[0]
        self.every = every
        self.losses: dict[int, float] = {}
        self.weights: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step % self.every == 0:
            self._remember(trainer.global_step, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        self._remember(trainer.global_step, pl_module)

    def _remember(self, step: int, pl_module: pl.LightningModule) -> None:
        with torch.no_grad():
            self.losses[step] = float(0.5 * ((pl_module(self.inputs) - self.inputs) ** 2).sum(-1).mean())
        self.weights[step] = pl_module.W.detach().clone()
        for logger in pl_module.loggers:
            logger.log_metrics({"train_loss": self.losses[step]}, step=step)


def train(
    steps: int, every: int, chains: int, draws: int, log_dir: str
) -> tuple[LLCMonitor, TrainingRecord, TensorBoardLogger]:
    """Train the toy model with the settings the module docstring describes; return the monitor, the record and the logger."""
    pl.seed_everything(0)
    data = sparse_features()
    # epsilon: the step the example was calibrated at (gamma = 1); every estimate uses it, so the curve is comparable.
    # drop: the second stage falls about 6% per 100 steps, slower than the default threshold of 10%.
    monitor = LLCMonitor(
        every_n_steps=every,
        num_chains=chains,
        num_draws=draws,
        num_burnin_steps=100,
        epsilon=0.01,
        gamma=1.0,
        loss_detector=LossDropDetector(drop=0.06, plateau=0.03),
    )
    record = TrainingRecord(data, math.gcd(10, every))
    logger = TensorBoardLogger(log_dir, name="tms")
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor, record],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(ToyModelOfSuperposition(), DataLoader(data, batch_size=128, shuffle=True))
    return monitor, record, logger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=50, help="estimate λ̂ every this many steps")
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check that everything runs")
    args = parser.parse_args()
    chains, draws = 64, 800
    if args.smoke:
        args.steps, args.every, chains, draws = 100, 25, 2, 20
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("always", TransitionWarning)
    monitor, record, logger = train(args.steps, args.every, chains, draws, args.log_dir)

    print(f"\n{'step':>6} {'full loss':>10} {'llc':>8} {'± std':>7}")
    for estimate in monitor.history:
        loss = record.losses.get(estimate.step, float("nan"))
        print(
            f"{estimate.step:>6} {loss:>10.4f} {estimate.llc_mean:>8.2f} {estimate.llc_std:>7.2f}{'' if estimate.healthy else '  unhealthy'}"
        )
    print(f"\n{len(monitor.transitions)} transition(s) reported:")
    for transition in monitor.transitions:
        print("  " + transition.describe())
    print("\nW at the start, at the end of each transition and at the end of training:")
    for wanted in sorted({0, max(record.weights)} | {t.step for t in monitor.transitions if not t.is_onset}):
        step = max(at for at in record.weights if at <= wanted)  # W is recorded every few steps
        print(f"  step {step:>5}: loss {record.losses[step]:.4f}, {describe_columns(record.weights[step])}")
    try:
        print(f"\nplot: {plot_runs(read_runs(Path(logger.log_dir)), Path(logger.log_dir) / 'tms.png')}")
    except (ImportError, ValueError) as error:
        print(f"\nno plot: {error}")
    print(f"TensorBoard logs: {logger.log_dir}")


if __name__ == "__main__":
    main()
