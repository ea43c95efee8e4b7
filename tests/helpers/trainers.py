"""A small LightningModule and Trainer set-up shared by the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.models import gaussian_nll

QUICK = dict(num_chains=2, num_draws=10, num_burnin_steps=3)


class Regressor(pl.LightningModule):
    """An MLP with dropout, trained by SGD with momentum: every source of training randomness at once."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = gaussian_nll(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def regression_loader(n: int = 256, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=generator)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2]], dim=1) + 0.1 * torch.randn(n, 2, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


def make_trainer(tmp_path, callbacks=(), **overrides) -> pl.Trainer:
    settings = dict(
        max_steps=20,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    settings.update(overrides)
    return pl.Trainer(callbacks=list(callbacks), **settings)


class AtMinimum(pl.LightningModule):
    """Linear regression that starts at the least-squares solution of its ``data`` (``regression_loader``'s by
    default) and barely moves (learning rate 1e-7): estimates there are taken at a minimum, so they come out healthy.
    ``curvatures`` are the eigenvalues of the loss's Hessian there, for the exact SGLD expectation."""

    def __init__(self, data: TensorDataset | None = None) -> None:
        super().__init__()
        self.data = data if data is not None else regression_loader().dataset
        x, y = self.data.tensors
        self.linear = nn.Linear(x.shape[1], y.shape[1])
        design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        solution = torch.linalg.lstsq(design, y).solution
        with torch.no_grad():
            self.linear.weight.copy_(solution[:-1].T)
            self.linear.bias.copy_(solution[-1])
        self.curvatures = torch.linalg.eigvalsh(design.T @ design / len(x)).tolist() * y.shape[1]

    def training_step(self, batch, batch_idx):
        loss = gaussian_nll(self.linear, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-7)


def broken_loader() -> DataLoader:
    """A user's data function with a bug in it."""
    raise RuntimeError("the data folder is missing")


def wrong_shape_loader() -> DataLoader:
    """Data with 3 features for a model that takes 5."""
    return DataLoader(TensorDataset(torch.randn(64, 3), torch.randn(64, 2)), batch_size=16)


def broken_loss(model, batch):
    """A user's loss function with a bug in it."""
    raise KeyError("labels")


def per_sample_nll(module, batch):
    """``Regressor``'s loss per sample: the probe loss for susceptibilities."""
    x, y = batch
    return 0.5 * ((module.net(x) - y) ** 2).sum(-1)


def probe_set():
    """Twelve fresh samples of ``regression_loader``'s rule (no noise), labelled by :data:`PROBE_LABELS`."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12, 5, generator=generator)
    return TensorDataset(x, torch.stack([x[:, 0] - x[:, 1], x[:, 2]], dim=1))


PROBE_LABELS = ["near"] * 6 + ["far"] * 6


def labelled_probe() -> dict:
    """The probe arguments of ``LLCMonitor`` and ``estimate_llc``: :func:`probe_set`, its per-sample loss, and labels."""
    return dict(probe=probe_set(), per_sample_loss_fn=per_sample_nll, probe_labels=PROBE_LABELS)
