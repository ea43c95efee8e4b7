"""TransitionMonitor in real fits: alerts, checkpoints, TensorBoard entries, sparse and missing metrics."""

import logging
import math
import os
import sys
import warnings

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_devinterp import LLCMonitor, TransitionDetector, TransitionMonitor, TransitionWarning
from lightning_devinterp.callbacks import reporting
from lightning_devinterp.detection.loss_drops import LossDropDetector
from lightning_devinterp.metric_names import FIGURE
from tests.helpers.trainers import QUICK, Regressor, make_trainer, regression_loader


class JumpingSignal(Regressor):
    """Logs a synthetic metric that drops from 3 to 1 at step 40, beside a normal training loss."""

    def training_step(self, batch, batch_idx):
        step = self.global_step
        self.log("signal", (3.0 if step < 40 else 1.0) + 0.02 * math.sin(step))
        return super().training_step(batch, batch_idx)


def test_transition_monitor_alerts_everywhere_it_should(tmp_path):
    seen = []
    logger = TensorBoardLogger(str(tmp_path), name="tm")
    detector = LossDropDetector(metric="signal", window=5, lag=10, plateau_steps=10)
    monitor = TransitionMonitor(
        monitor="signal",
        detector=detector,
        on_transition=lambda trainer, module, t: seen.append((trainer.global_step, t)),
        save_checkpoint=True,
    )
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [monitor], logger=logger, max_steps=80, log_every_n_steps=1)
    with pytest.warns(TransitionWarning, match="signal .* onset"):
        trainer.fit(JumpingSignal(), regression_loader())
    onset, end = monitor.transitions
    assert onset.is_onset and 41 <= onset.step <= 46 and not end.is_onset
    assert seen == [(t.step, t) for t in monitor.transitions]
    for t in monitor.transitions:
        assert os.path.exists(tmp_path / "tm" / "version_0" / "checkpoints" / f"transition-signal-step={t.step}.ckpt")
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("transitions/onset")] == [onset.step]
    assert [e.step for e in events.Scalars("transitions/end")] == [end.step]
    assert "transitions/signal/text_summary" in events.Tags()["tensors"]
    restored = TransitionMonitor(monitor="signal")
    restored.load_state_dict(monitor.state_dict())
    assert restored.transitions == monitor.transitions


class EveryTenSteps(Regressor):
    """Logs a metric every ten steps only: Lightning keeps the last value in ``callback_metrics`` in between."""

    def training_step(self, batch, batch_idx):
        if self.global_step % 10 == 0:
            self.log("sparse", 2.0 + 0.01 * self.global_step)
        return super().training_step(batch, batch_idx)


def test_a_metric_logged_every_few_steps_is_fed_once_per_value(tmp_path):
    monitor = TransitionMonitor(monitor="sparse", detector=TransitionDetector(metric="sparse"))
    pl.seed_everything(0)
    make_trainer(tmp_path, [monitor], max_steps=60).fit(EveryTenSteps(), regression_loader())
    fed = monitor.detector.state_dict()["regime"]
    assert [step for step, _, _ in fed] == [1, 11, 21, 31, 41, 51]  # read after the optimizer step it was logged in
    assert [value for _, value, _ in fed] == pytest.approx([2.0, 2.1, 2.2, 2.3, 2.4, 2.5])


def test_a_metric_that_is_never_logged_is_named_once(tmp_path):
    monitor = TransitionMonitor(monitor="trian_loss")
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], max_epochs=2, max_steps=-1).fit(Regressor(), regression_loader())
    messages = [str(w.message) for w in caught if "never logged" in str(w.message)]
    assert len(messages) == 1 and "train_loss" in messages[0]


def test_a_llc_series_is_not_called_missing_before_any_healthy_estimate(tmp_path):
    """λ̂ reaches callback_metrics only with a healthy estimate, here after the first epochs (8 steps each): no
    warning for the right name, one for a misspelled group once λ̂ metrics have appeared."""
    right, wrong = TransitionMonitor(monitor="llc/mean"), TransitionMonitor(monitor="llc/atn/mean")
    llc = LLCMonitor(every_n_steps=20, num_chains=2, num_draws=20, num_burnin_steps=20)
    pl.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [llc, right, wrong], max_epochs=6, max_steps=-1).fit(Regressor(), regression_loader())
    assert any(record.healthy and record.step > 0 for record in llc.history)
    missing = [str(w.message) for w in caught if "never logged" in str(w.message)]
    assert len(missing) == 1 and "llc/atn/mean" in missing[0]


def chart_titles(events):
    config = events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0]
    return [chart.title for category in layout_pb2.Layout.FromString(config).category for chart in category.chart]


@pytest.mark.parametrize("param_groups", [None, {"first": "net.0"}])
def test_tensorboard_shows_each_report_in_a_figure_and_only_charts_with_content(tmp_path, param_groups):
    """The λ̂ figure goes to the Images tab at each report (here the watched signal's onset and end) and at the end;
    the custom-scalars layout holds the groups chart only for a run with groups, and no transitions chart (two points
    there are an empty chart)."""
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    llc = LLCMonitor(every_n_steps=10, param_groups=param_groups, **QUICK)
    watcher = TransitionMonitor(
        monitor="signal", detector=LossDropDetector(metric="signal", window=5, lag=10, plateau_steps=10)
    )
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [llc, watcher], logger=logger, max_steps=80, log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TransitionWarning)
        trainer.fit(JumpingSignal(), regression_loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert len(watcher.transitions) == 2
    assert [image.step for image in events.Images(FIGURE)] == [t.step for t in watcher.transitions] + [80]
    assert all(image.width > 400 and image.height > 200 for image in events.Images(FIGURE))
    titles = chart_titles(events)
    assert ("LLC by component (param_groups)" in titles) == (param_groups is not None)
    assert not any("ransition" in title for title in titles)


def test_without_matplotlib_the_monitor_says_once_that_it_draws_no_figure(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(reporting, "_said_once", set())
    for _ in range(2):
        logger = TensorBoardLogger(str(tmp_path), name="bare")
        llc = LLCMonitor(every_n_steps=10, **QUICK)
        pl.seed_everything(0)
        with caplog.at_level(logging.INFO):
            make_trainer(tmp_path, [llc], logger=logger, max_steps=20).fit(Regressor(), regression_loader())
        events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
        events.Reload()
        assert events.Tags()["images"] == [] and len(llc.history) == 3
    notes = [record.message for record in caplog.records if "no λ̂ figure" in record.message]
    assert len(notes) == 1 and "pip install 'lightning-devinterp[plot]'" in notes[0]
