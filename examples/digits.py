"""A realistic Lightning classifier on scikit-learn's bundled digits, with LLCMonitor beside the usual callbacks.

An MLP (64-128-64-10) learns the 8x8 handwritten digits (1797 images shipped inside scikit-learn, no download) with
Adam. LLCMonitor estimates λ̂ every 50 steps on the training set (cross-entropy, the mean negative log-likelihood, so
nβ needs no rescaling); EarlyStopping watches the validation loss and ModelCheckpoint keeps the checkpoint with the
best validation accuracy; TensorBoard gets all of it.

What to expect (early stopping after a few hundred steps, about half a minute on a laptop CPU): λ̂ negative and
marked unhealthy for the first estimates (w* is far from a minimum, so the chains keep descending), then rising and
settling. No transition is reported: the loss falls from initialisation without a plateau (an ordinary run, not a
staged one), and λ̂ settles without shifting between levels. A table of estimates is printed at the end.

    pip install -e ".[examples]"   # scikit-learn, for the bundled data
    python examples/digits.py [--epochs 40] [--log-dir runs] [--smoke]
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_devinterp import LLCMonitor


class DigitsData(pl.LightningDataModule):
    """load_digits scaled to [0, 1], split 80/20 with a fixed generator."""

    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        full = TensorDataset(torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(labels))
        self.train_set, self.val_set = random_split(full, [0.8, 0.2], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--smoke", action="store_true", help="two epochs only, to check that everything runs")
    args = parser.parse_args()
    epochs = 2 if args.smoke else args.epochs

    pl.seed_everything(0)
    monitor = LLCMonitor(every_n_steps=50, num_chains=4, num_draws=100, num_burnin_steps=50, epsilon=1e-4, gamma=100.0)
    logger = TensorBoardLogger(args.log_dir, name="digits")
    checkpoint = ModelCheckpoint(monitor="val_acc", mode="max")
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        accelerator="cpu",
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[monitor, EarlyStopping(monitor="val_loss", patience=5), checkpoint],
    )
    trainer.fit(DigitsClassifier(), datamodule=DigitsData())

    print(f"\n{'step':>6} {'llc':>9} {'± std':>7}  healthy")
    for record in monitor.history:
        print(f"{record.step:>6} {record.llc_mean:>9.3f} {record.llc_std:>7.3f}  {record.healthy}")
    for transition in monitor.transitions:
        print("  " + transition.describe())
    print(f"best val_acc {float(checkpoint.best_model_score):.3f} at {checkpoint.best_model_path}")
    print(f"TensorBoard logs: {logger.log_dir}")


if __name__ == "__main__":
    main()
