"""Susceptibilities from LLCMonitor in a real Trainer.fit: scalars per group and label, a heatmap in TensorBoard,
training left as it was."""

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_devinterp import LLCMonitor
from tests.helpers.trainers import (
    QUICK,
    Regressor,
    labelled_probe,
    make_trainer,
    per_sample_nll,
    probe_set,
    regression_loader,
)

GROUPS = {"first": "net.0.*", "last": "net.3.*"}


def test_the_monitor_logs_susceptibilities_per_group_and_label_and_draws_them(tmp_path):
    pl.seed_everything(0)
    plain = Regressor()
    make_trainer(tmp_path / "plain", max_steps=12).fit(plain, regression_loader())
    pl.seed_everything(0)
    module = Regressor()
    logger = TensorBoardLogger(str(tmp_path), name="run")
    monitor = LLCMonitor(
        every_n_steps=6, param_groups=GROUPS, **labelled_probe(), **QUICK
    )  # fmt: skip
    make_trainer(tmp_path, [monitor], logger=logger, max_steps=12).fit(module, regression_loader())
    for a, b in zip(plain.state_dict().values(), module.state_dict().values()):
        assert torch.equal(a, b)
    result = monitor.history[-1].result
    assert result.susceptibility.shape == (12,)
    assert set(result.groups) == set(GROUPS)
    assert set(result.susceptibility_summary()) == {"all", "first", "last"}
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for group in ("all", "first", "last"):
        for label in ("near", "far"):
            logged = events.Scalars(f"susceptibility/{group}/{label}")
            assert [e.step for e in logged] == [r.step for r in monitor.history]
            assert logged[-1].value == float(result.susceptibility_summary()[group][label])
    heatmaps = events.Images("devinterp/susceptibility")
    assert [image.step for image in heatmaps] == [r.step for r in monitor.history]
    assert heatmaps[-1].encoded_image_string.startswith(b"\x89PNG")


def test_without_labels_the_monitor_logs_the_mean_over_the_probe(tmp_path):
    monitor = LLCMonitor(every_n_steps=10, probe=probe_set(), per_sample_loss_fn=per_sample_nll, **QUICK)
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=10).fit(Regressor(), regression_loader())
    summary = monitor.history[-1].result.susceptibility_summary()
    assert list(summary) == ["all"] and list(summary["all"]) == ["mean"]
