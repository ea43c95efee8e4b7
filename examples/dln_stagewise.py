"""A deep linear network learns a teacher's singular modes one at a time, with LLCMonitor watching.

An 8-8-8 bias-free linear network starts from a tiny initialisation (scale 1e-5) and is trained by plain SGD on a
rank-3 teacher with singular values 4, 2 and 1 (2000 samples, label noise 0.1). Gradient descent from near the origin
is saddle-to-saddle: the loss sits on a plateau, then drops as the next mode is learned.

What to expect (5000 steps, estimates every 100 steps, about 20 s on a laptop CPU):

- three loss plateaus, each ending in a drop as the next mode is learnt;
- λ̂ strongly negative (and marked unhealthy) on the plateaus: SGLD started at a saddle keeps descending, the
  signature of a model that is about to move; it turns positive once the last mode is learnt;
- each drop reported when the loss starts to fall after its plateau (seen on the loss over the training set at an
  estimate, ``llc/init_loss``, or on the minibatch loss, whichever shows it first), and its end once the fall has
  calmed, with the loss before and after;
- at the end, a longer estimate at reference settings (gamma = 1) printed beside Aoyagi's value for a rank-3 8-8-8
  network. It lands a little below: the network is close to, not at, the teacher.

Outputs: TensorBoard logs under ``--log-dir`` (``tensorboard --logdir runs``: ``llc/*``, ``train_loss`` and the
"devinterp" custom-scalars layout), and a table of estimates on stdout.

    python examples/dln_stagewise.py [--steps 5000] [--every 100] [--log-dir runs] [--smoke]
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_devinterp import LLCMonitor, TransitionWarning, estimate_llc
from lightning_devinterp.theory import aoyagi_lambda

WIDTHS = [8, 8, 8]
SINGULAR_VALUES = [4.0, 2.0, 1.0]


def teacher_data(num_samples: int = 2000, noise: float = 0.1, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(WIDTHS[-1], WIDTHS[-1], generator=generator))[0]
    right = torch.linalg.qr(torch.randn(WIDTHS[0], WIDTHS[0], generator=generator))[0]
    rank = len(SINGULAR_VALUES)
    teacher = left[:, :rank] @ torch.diag(torch.tensor(SINGULAR_VALUES)) @ right[:, :rank].T
    x = torch.randn(num_samples, WIDTHS[0], generator=generator)
    return TensorDataset(x, x @ teacher.T + noise * torch.randn(num_samples, WIDTHS[-1], generator=generator))


def gaussian_nll(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """½‖y − f(x)‖² summed over outputs, averaged over samples: the unit-variance Gaussian NLL up to a constant."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


class DeepLinearNetwork(pl.LightningModule):
    def __init__(self, init_scale: float = 1e-5, lr: float = 2.5e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])))
        with torch.no_grad():
            for layer in self.net:
                layer.weight.normal_(0.0, init_scale)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = gaussian_nll(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class LossAtEstimates(pl.Callback):
    """Remembers the training loss of every step, to print beside the estimates."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        self.losses[trainer.global_step] = float(outputs["loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=100, help="estimate λ̂ every this many steps")
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check that everything runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.every = 30, 10
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("always", TransitionWarning)

    pl.seed_everything(0)
    data = teacher_data()
    monitor = LLCMonitor(
        every_n_steps=args.every, num_chains=4, num_draws=100, num_burnin_steps=50, epsilon=1e-4, gamma=300.0
    )
    losses = LossAtEstimates()
    logger = TensorBoardLogger(args.log_dir, name="dln_stagewise")
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor, losses],
        logger=logger,
        log_every_n_steps=20,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    model = DeepLinearNetwork()
    trainer.fit(model, DataLoader(data, batch_size=100, shuffle=True))

    print(f"\n{'step':>6} {'train loss':>11} {'llc':>10} {'± std':>8}")
    for record in monitor.history:
        loss = losses.losses.get(record.step, float("nan"))
        print(
            f"{record.step:>6} {loss:>11.4f} {record.llc_mean:>10.2f} {record.llc_std:>8.2f}{'' if record.healthy else '  unhealthy'}"
        )
    print(f"\n{len(monitor.transitions)} transition(s) reported:")
    for transition in monitor.transitions:
        print("  " + transition.describe())
    if not args.smoke:
        reference = estimate_llc(
            model.net,
            data,
            gaussian_nll,
            batch_size=500,
            epsilon=3e-5,
            gamma=1.0,
            num_chains=4,
            num_draws=2000,
            num_burnin_steps=1000,
            seed=0,
        )
        print(
            f"\nfinal network, reference settings: llc = {reference.llc_mean:.2f} ± {reference.llc_std:.2f}; "
            f"Aoyagi for a rank-3 {'-'.join(map(str, WIDTHS))} network: {aoyagi_lambda(WIDTHS, 3):.2f}"
        )
    print(f"TensorBoard logs: {logger.log_dir}")


if __name__ == "__main__":
    main()
