"""Run by test_distributed.py: a 2-process CPU DDP fit with LLCMonitor; each rank writes what it holds."""

import json
import os
import sys

import lightning.pytorch as pl
import torch

from lightning_devinterp import LLCMonitor, TransitionMonitor
from tests.helpers.trainers import Regressor, regression_loader

if __name__ == "__main__":
    out_dir = sys.argv[1]
    pl.seed_everything(0)
    monitor = LLCMonitor(every_n_steps=15, num_chains=3, num_draws=10, num_burnin_steps=3)
    sparse = LLCMonitor(every_n_steps=100, num_chains=2, num_draws=5, num_burnin_steps=2, seed=1)
    watcher = TransitionMonitor(monitor="train_loss")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
        callbacks=[monitor, sparse, watcher],
    )
    trainer.fit(Regressor(), regression_loader())
    record = {
        "rank": trainer.global_rank,
        "steps": [r.step for r in monitor.history],
        "llc": [r.llc_mean for r in monitor.history],
        "per_chain": [r.result.llc_per_chain.tolist() for r in monitor.history],
        "callback_metric": float(trainer.callback_metrics["llc/mean"])
        if "llc/mean" in trainer.callback_metrics
        else None,
        "loss_detector": watcher.detector.state_dict(),
        "sparse_steps": [r.step for r in sparse.history],
        "sparse_fixed_loss": sparse.loss_detector.state_dict()["fixed"] if sparse.loss_detector else None,
    }
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(record, handle)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # an orderly end for gloo's threads, rather than at interpreter exit
