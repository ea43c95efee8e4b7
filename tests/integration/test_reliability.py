"""Faults and bad inputs users hit end in a clear answer: never a stall, a traceback or a silent wrong number."""

import itertools
import logging
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_devinterp import LLCEstimateWarning, LLCMonitor, estimate_llc
from tests.helpers.models import gaussian_nll
from tests.helpers.trainers import QUICK, AtMinimum, Regressor, make_trainer, regression_loader

FAST = dict(num_chains=2, num_draws=10, num_burnin_steps=10)


def data(n=64):
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 5, generator=generator), torch.randn(n, 2, generator=generator))


class Endless(IterableDataset):
    """A stream that never ends."""

    def __iter__(self):
        generator = torch.Generator().manual_seed(0)
        for _ in itertools.count():
            yield torch.randn(5, generator=generator), torch.randn(2, generator=generator)


# ---- 1. endless iterable data --------------------------------------------------------------------------------------


def test_endless_iterable_data_is_read_up_to_a_cap_and_needs_nbeta(caplog):
    loader = DataLoader(Endless(), batch_size=32)
    with caplog.at_level(logging.WARNING, logger="lightning_devinterp"):
        with pytest.raises(ValueError, match="pass nbeta"):
            estimate_llc(nn.Linear(5, 2), loader, gaussian_nll, max_samples=1000, **FAST)
    assert any("did not end within max_samples=1000" in r.getMessage() for r in caplog.records)
    result = estimate_llc(nn.Linear(5, 2), loader, gaussian_nll, max_samples=1000, nbeta=100.0, seed=0, **FAST)
    assert result.num_samples == 1000 and math.isfinite(result.llc_mean)


def test_the_monitor_on_an_endless_dataloader_asks_for_nbeta(tmp_path):
    monitor = LLCMonitor(every_n_steps=5, dataloader=DataLoader(Endless(), batch_size=32), max_samples=500, **QUICK)
    with pytest.raises(MisconfigurationException, match="pass nbeta"):
        make_trainer(tmp_path, [monitor], max_steps=5).fit(Regressor(), regression_loader())


# ---- 2. the user's hooks --------------------------------------------------------------------------------------------


def test_hooks_are_not_called_during_sampling_and_chains_still_vectorize():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    cache, pre, backward = [], [], []
    model[0].register_forward_hook(lambda module, inputs, output: cache.append(output))
    model[2].register_forward_pre_hook(lambda module, inputs: pre.append(1))
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: backward.append(1))
    result = estimate_llc(model, data(), gaussian_nll, batch_size=16, seed=0, **FAST)
    assert result.vectorized and not cache and not pre and not backward
    model(torch.randn(3, 5)).sum().backward()
    assert len(cache) == 1 and len(pre) == 1 and len(backward) == 1  # and they are all still registered


def test_spectral_norm_keeps_its_hook_while_sampling():
    """Old-style spectral norm recomputes the weight in a forward pre-hook: part of the model, so it stays."""
    torch.manual_seed(0)
    model = nn.utils.spectral_norm(nn.Linear(5, 2))
    result = estimate_llc(model, data(), gaussian_nll, batch_size=16, seed=0, **FAST)
    assert math.isfinite(result.llc_mean)


# ---- 3. NaN in the data or the weights ------------------------------------------------------------------------------


def test_nan_in_the_data_is_an_error_that_names_the_data():
    x, y = data().tensors
    x[7, 2] = float("nan")
    with pytest.raises(ValueError, match="check the dataset for NaN"):
        estimate_llc(nn.Linear(5, 2), TensorDataset(x, y), gaussian_nll, batch_size=16, **FAST)


def test_nan_in_the_weights_is_an_error_that_names_them():
    model = nn.Linear(5, 2)
    with torch.no_grad():
        model.bias[0] = float("nan")
    with pytest.raises(ValueError, match="weights hold NaN/Inf \\(bias\\)"):
        estimate_llc(model, data(), gaussian_nll, batch_size=16, **FAST)


class Diverging(Regressor):
    """Training blows up: a learning rate of 1e3 makes the weights NaN within a few steps."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e3)


def test_a_run_that_diverges_is_warned_about_once_per_kind_of_failure(tmp_path):
    """Ten estimates fail once training has blown up; each kind of failure is warned about once."""
    monitor = LLCMonitor(every_n_steps=2, **QUICK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_steps=20).fit(Diverging(), regression_loader())
    failures = [
        str(w.message) for w in caught if issubclass(w.category, LLCEstimateWarning) and "failed" in str(w.message)
    ]
    assert 1 <= len(failures) <= 2 and len(set(failures)) == len(failures)
    assert any("weights hold NaN/Inf" in failure for failure in failures)
    assert len(monitor.history) < 5


# ---- 4. one monitor, two fits --------------------------------------------------------------------------------------


def test_a_second_fit_starts_a_fresh_history_and_keeps_the_first(tmp_path):
    monitor = LLCMonitor(every_n_steps=5, **QUICK)
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=10).fit(Regressor(), regression_loader())
    first = [r.step for r in monitor.history]
    make_trainer(tmp_path, [monitor], max_steps=10).fit(Regressor(), regression_loader())
    assert first == [0, 5, 10]
    assert [r.step for r in monitor.history] == [0, 5, 10]
    assert [[r.step for r in fit.history] for fit in monitor.previous_fits] == [first]


# ---- 5. stale values ----------------------------------------------------------------------------------------------


def test_failed_estimates_leave_no_llc_in_the_progress_bar(tmp_path):
    def fails_after_first(module, batch):
        if monitor.history:
            raise RuntimeError("broken")
        return gaussian_nll(module.linear, batch)

    monitor = LLCMonitor(
        every_n_steps=5, loss_fn=fails_after_first, num_chains=4, num_draws=20, num_burnin_steps=20, epsilon=1e-3
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, [monitor], max_steps=10)
        trainer.fit(AtMinimum(), regression_loader())
    assert [r.step for r in monitor.history] == [0]
    assert float(trainer.callback_metrics["llc/step"]) == 0  # says which step the value in callback_metrics is from
    assert "llc" not in trainer.progress_bar_metrics


# ---- 7. messages that name the real cause --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda m, b: gaussian_nll(m, b).detach(),
        lambda m, b: torch.tensor(float(gaussian_nll(m, b).detach())),
    ],
)
def test_a_loss_that_ignores_the_parameters_is_named_as_such(loss_fn, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_devinterp"):
        with pytest.raises(ValueError, match="does not depend on the sampled parameters"):
            estimate_llc(nn.Linear(5, 2), data(), loss_fn, batch_size=16, **FAST)
    assert not any("vmap cannot batch" in r.getMessage() for r in caplog.records)


class DictWithoutLoss(Regressor):
    def training_step(self, batch, batch_idx):
        return {"objective": gaussian_nll(self.net, batch)}


def test_a_training_step_dict_without_loss_is_named():
    with pytest.raises(TypeError, match="dict without a 'loss' entry \\(keys: objective\\)"):
        estimate_llc(DictWithoutLoss(), data(), batch_size=16, **FAST)


def test_a_bad_seed_is_named():
    with pytest.raises(ValueError, match="seed must be an integer"):
        estimate_llc(nn.Linear(5, 2), data(), gaussian_nll, batch_size=16, seed="abc", **FAST)


def test_an_iterable_loader_without_batch_size_is_told_why():
    with pytest.raises(ValueError, match="its dataset yields ready-made batches"):
        estimate_llc(nn.Linear(5, 2), DataLoader(Endless(), batch_size=None), gaussian_nll, nbeta=10.0, **FAST)


# ---- 9. schedules and resume ------------------------------------------------------------------------------------------


class TwoOptimizers(Regressor):
    """Manual optimization with two optimizers: global_step advances by 2 per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        first, second = self.optimizers()
        loss = gaussian_nll(self.net, batch)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.01), torch.optim.SGD(self.net[3].parameters(), lr=0.01)]


def test_every_n_steps_holds_when_global_step_advances_by_two(tmp_path):
    monitor = LLCMonitor(every_n_steps=5, loss_fn=lambda module, batch: gaussian_nll(module.net, batch), **QUICK)
    make_trainer(tmp_path, [monitor], max_steps=30).fit(TwoOptimizers(), regression_loader())
    assert [r.step for r in monitor.history] == [0, 6, 10, 16, 20, 26, 30]


def test_resuming_with_a_changed_schedule_keeps_the_history_and_the_unhealthy_warning_is_not_repeated(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    first = LLCMonitor(every_n_steps=4, epsilon=1e-2, **QUICK)
    pl.seed_everything(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, [first, checkpoint], enable_checkpointing=True, max_steps=10).fit(
            Regressor(), regression_loader()
        )
    assert any(not r.healthy for r in first.history)
    resumed = LLCMonitor(every_n_steps=5, epsilon=1e-2, **QUICK)
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [resumed], max_steps=20).fit(
            Regressor(), regression_loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=10.ckpt")
        )
    assert [r.step for r in resumed.history][:3] == [0, 4, 8]
    assert [r.step for r in resumed.history][3:] == [11, 15, 20]  # 11: the first step past 10, missed at the save
    assert not [w for w in caught if "marked unhealthy" in str(w.message)]
