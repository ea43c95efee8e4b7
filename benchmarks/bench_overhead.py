"""Wall-time overhead of LLCMonitor on a small training run (not a test; ratios within one run).

Trains the same Lightning MLP regressor (20-64-64-1, 4000 samples, batch 64) three times on one thread: without
the monitor, with the monitor's default schedule (a 10% wall-time budget), and with ``every_n_steps`` for
comparison, then prints each run's wall time, its overhead over the plain run, and the share of wall time the
monitor itself measured. The budget mode should hold its budget within a few points.

    python -m benchmarks.bench_overhead [--steps 3000] [--max-overhead 0.1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.ordinary_runs import Regressor
from lightning_devinterp import LLCMonitor


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 20, generator=generator)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(4000, 1, generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


def timed_fit(steps: int, monitor: LLCMonitor | None) -> float:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[monitor] if monitor else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    started = time.perf_counter()
    net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    trainer.fit(Regressor(net, lr=1e-2, optimizer=torch.optim.SGD), loader())
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-overhead", type=float, default=0.1)
    parser.add_argument("--every", type=int, default=250)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    timed_fit(50, LLCMonitor(every_n_steps=25))  # warm-up: imports, vmap set-up
    plain = timed_fit(args.steps, None)
    print(f"{args.steps} steps, one thread")
    print(f"  without monitor                        {plain:7.2f} s")
    for label, monitor in (
        (f"default (max_overhead={LLCMonitor().schedule.max_overhead})", LLCMonitor()),
        (f"max_overhead={args.max_overhead}", LLCMonitor(max_overhead=args.max_overhead)),
        (f"every_n_steps={args.every}", LLCMonitor(every_n_steps=args.every)),
    ):
        seconds = timed_fit(args.steps, monitor)
        own_share = monitor.schedule.own_seconds / seconds
        print(
            f"  {label:<38} {seconds:7.2f} s  overhead {seconds / plain - 1:+6.1%}  monitor's share {own_share:5.1%}  "
            f"estimates {len(monitor.history)}"
        )


if __name__ == "__main__":
    main()
