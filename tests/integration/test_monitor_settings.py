"""LLCMonitor with per-component λ̂ (param_groups) and with a calibrated step size (epsilon="auto"), in real fits."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from lightning_devinterp import LLCMonitor, TransitionDetector, TransitionMonitor
from lightning_devinterp.sampling import calibration as calibration_module
from tests.helpers.models import deep_linear_network, gaussian_nll, teacher_data
from tests.helpers.trainers import AtMinimum, make_trainer, regression_loader


def test_the_monitor_logs_each_group(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="groups")
    monitor = LLCMonitor(
        every_n_steps=5,
        num_chains=4,
        num_draws=30,
        num_burnin_steps=20,
        epsilon=1e-3,
        param_groups={"weight": "linear.weight", "bias": "linear.bias"},
    )
    watcher = TransitionMonitor(monitor="llc/weight/mean")  # listed first: it reads each estimate a step late
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [watcher, monitor], logger=logger, max_steps=10)
    trainer.fit(AtMinimum(), regression_loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    events.Reload()
    for tag in ("llc/weight/mean", "llc/weight/std", "llc/bias/mean", "llc/bias/std"):
        assert [e.step for e in events.Scalars(tag)] == [0, 5, 10], tag
    for group in ("weight", "bias"):  # each group's 90% interval, as the full model's
        for end, index in (("lower", 0), ("upper", 1)):
            logged = [e.value for e in events.Scalars(f"llc/{group}/{end}")]
            assert logged == pytest.approx([r.result.groups[group].llc_interval[index] for r in monitor.history])
    last = monitor.history[-1].result
    assert last.groups["bias"].llc_mean < last.groups["weight"].llc_mean  # 2 bias entries against 10 weights
    assert float(trainer.callback_metrics["llc/weight/mean"]) == pytest.approx(last.groups["weight"].llc_mean)
    assert isinstance(watcher.detector, TransitionDetector)  # the default for a λ̂ series
    fed = watcher.detector.state_dict()["regime"]
    healthy = [record for record in monitor.history if record.healthy]
    assert [(step, value) for step, value, _ in fed] == [
        (r.step, pytest.approx(r.result.groups["weight"].llc_mean)) for r in healthy
    ]


class LeastSquares(pl.LightningModule):
    """Linear regression that starts at its least-squares solution and barely moves (lr 1e-6)."""

    def __init__(self, data):
        super().__init__()
        self.linear = nn.Linear(3, 2, bias=False)
        x, y = data.tensors
        with torch.no_grad():
            self.linear.weight.copy_(torch.linalg.lstsq(x, y).solution.T)

    def training_step(self, batch, batch_idx):
        return gaussian_nll(self.linear, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-6)


def test_monitor_calibrates_once_and_keeps_epsilon(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(1)
    data = teacher_data(deep_linear_network([3, 2]), 2000, generator, noise=0.5)
    calls = []
    original = calibration_module.calibrate_on_source
    monkeypatch.setattr(
        "lightning_devinterp.tracking.tracker.calibrate_on_source", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    monitor = LLCMonitor(every_n_steps=5, epsilon="auto", gamma=1.0, num_draws=100, num_burnin_steps=100)
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=10).fit(
        LeastSquares(data), DataLoader(data, batch_size=100, shuffle=True)
    )
    assert len(calls) == 1
    chosen = monitor.calibration.best.epsilon
    assert [r.result.epsilon for r in monitor.history] == [chosen] * 3
    restored = LLCMonitor(every_n_steps=5, epsilon="auto")
    restored.load_state_dict(monitor.state_dict())
    assert restored.epsilon == chosen
    assert LLCMonitor(epsilon="auto").epsilon is None
