"""LLCMonitor in real Trainer.fit runs: transparency, logging, resume, accumulation, precision, faults, arguments."""

import csv
import random
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, IterableDataset

from lightning_devinterp import LLCEstimateWarning, LLCMonitor, TransitionDetector
from lightning_devinterp.detection.loss_drops import LossDropDetector
from tests.helpers.models import gaussian_nll
from tests.helpers.trainers import QUICK, AtMinimum, Regressor, make_trainer, regression_loader


def train(tmp_path, callbacks, module=None, loader=None, **trainer_overrides):
    pl.seed_everything(0)
    module = module or Regressor()
    trainer = make_trainer(tmp_path, callbacks, **trainer_overrides)
    trainer.fit(module, loader if loader is not None else regression_loader())
    return module, trainer


def rng_fingerprint():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_training_is_bit_identical_with_and_without_the_monitor(tmp_path):
    plain, _ = train(tmp_path / "plain", [], max_steps=30)
    plain_rng = rng_fingerprint()
    monitor = LLCMonitor(every_n_steps=7, **QUICK)
    watched, _ = train(tmp_path / "watched", [monitor], max_steps=30)
    watched_rng = rng_fingerprint()
    assert [r.step for r in monitor.history] == [0, 7, 14, 21, 28, 30]
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(plain_rng[0], watched_rng[0])
    assert np.array_equal(plain_rng[1], watched_rng[1])
    assert plain_rng[2] == watched_rng[2]
    assert watched.training and all(p.requires_grad for p in watched.parameters())


def test_between_sparse_estimates_the_loss_at_w_star_is_read_and_training_stays_bit_identical(tmp_path):
    """Estimates 100 steps apart leave L(w*) too coarse to date a fall: it is read (a forward pass) every 25 steps in
    between, or further apart where that would cost more than a small share of training, and logged at its step."""
    plain, _ = train(tmp_path / "plain", [], max_steps=60)
    logger = TensorBoardLogger(str(tmp_path), name="run")
    monitor = LLCMonitor(every_n_steps=100, **QUICK)
    watched, _ = train(tmp_path / "watched", [monitor], logger=logger, max_steps=60)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r.step for r in monitor.history] == [0, 60]
    read = [event.step for event in tensorboard_scalars(logger.log_dir).Scalars("llc/init_loss")]
    assert read[:2] == [0, 25] and read[-1] == 60  # the estimates at 0 and 60, the first reading at 25
    assert all(later - earlier >= 25 for earlier, later in zip(read[1:-2], read[2:-1]))  # 25 apart, or more if costly
    blind = LLCMonitor(every_n_steps=100, loss_detector=False, **QUICK)
    quiet_logger = TensorBoardLogger(str(tmp_path), name="without")
    train(tmp_path / "without", [blind], logger=quiet_logger, max_steps=60)
    assert [event.step for event in tensorboard_scalars(quiet_logger.log_dir).Scalars("llc/init_loss")] == [0, 60]


def tensorboard_scalars(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_gets_every_estimate_at_its_step_and_the_layout(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="run")
    monitor = LLCMonitor(every_n_steps=3, **QUICK)
    train(tmp_path, [monitor], logger=logger, max_steps=10, log_every_n_steps=50)
    events = tensorboard_scalars(logger.log_dir)
    tags = events.Tags()
    for key in (
        "llc/mean",
        "llc/std",
        "llc/stderr",
        "llc/lower",
        "llc/upper",
        "llc/init_loss",
        "llc/nbeta",
        "llc/acceptance",
        "llc/healthy",
        "llc/seconds",
    ):
        assert key in tags["scalars"], key
    steps = [event.step for event in events.Scalars("llc/mean")]
    assert steps == [0, 3, 6, 9, 10]
    values = [event.value for event in events.Scalars("llc/mean")]
    assert values == pytest.approx([r.llc_mean for r in monitor.history], rel=1e-6)
    for end, index in (("lower", 0), ("upper", 1)):  # the band is the estimate's 90% interval
        logged = [event.value for event in events.Scalars(f"llc/{end}")]
        assert logged == pytest.approx([r.result.llc_interval[index] for r in monitor.history], rel=1e-5)
    assert all(r.result.llc_interval[0] < r.llc_mean < r.result.llc_interval[1] for r in monitor.history)
    assert "custom_scalars__config__" in tags["tensors"]
    assert "devinterp/config/text_summary" in tags["tensors"]
    assert events.Scalars("llc/nbeta")[0].value == pytest.approx(256 / np.log(256), rel=1e-6)


def test_warm_started_chains_count_the_steps_they_have_relaxed_for(tmp_path):
    """Each estimate starts its chains where the previous one left them, so the steps since w* add up and the bound
    on how far the draws may still read low loosens. A step too small for the chains to relax by the end of training
    is said once, at the end."""
    monitor = LLCMonitor(every_n_steps=3, epsilon=1e-3, **QUICK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path / "relaxed", [monitor], module=AtMinimum(), max_steps=10)
    assert [r.result.steps_before_draws for r in monitor.history] == [3, 16, 29, 42, 55]
    shares = [r.result.relaxed_share for r in monitor.history]
    assert shares == sorted(shares) and shares[0] < 0.6 and 0.9 < shares[-1] < 1
    assert not [w for w in caught if "may read up to" in str(w.message)]
    slow = LLCMonitor(every_n_steps=3, epsilon=1e-5, **QUICK)
    with pytest.warns(LLCEstimateWarning, match=r"had run 55 SGLD steps .* may read up to \d+% low") as caught:
        train(tmp_path / "slow", [slow], module=AtMinimum(), max_steps=10)
    assert len([w for w in caught if "may read up to" in str(w.message)]) == 1
    assert slow.history[-1].result.llc_interval[1] > 2 * slow.history[-1].llc_mean > 0


def test_csv_logger_gets_every_estimate_and_callback_metrics_only_healthy_ones(tmp_path):
    logger = CSVLogger(str(tmp_path), name="csv")
    monitor = LLCMonitor(every_n_steps=5, num_chains=4, num_draws=40, num_burnin_steps=20, epsilon=1e-3)
    _, trainer = train(tmp_path, [monitor], module=AtMinimum(), logger=logger, max_steps=10)
    with open(f"{logger.log_dir}/metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("llc/mean")]
    assert [int(row["step"]) for row in rows] == [0, 5, 10]
    assert all(record.healthy for record in monitor.history), [r.result.warnings for r in monitor.history]
    assert float(trainer.callback_metrics["llc/mean"]) == pytest.approx(monitor.history[-1].llc_mean)
    assert float(trainer.callback_metrics["llc/step"]) == 10
    assert trainer.progress_bar_metrics["llc"] == pytest.approx(monitor.history[-1].llc_mean, abs=1e-3)


def test_unhealthy_estimates_stay_out_of_callback_metrics_and_the_progress_bar(tmp_path):
    """At a random initialisation w* is no minimum: λ̂ is logged (marked unhealthy) but is not offered as a value."""
    monitor = LLCMonitor(every_n_steps=5, **QUICK)
    _, trainer = train(tmp_path, [monitor], max_steps=10)
    assert monitor.history and not any(record.healthy for record in monitor.history)
    assert "llc/mean" not in trainer.callback_metrics
    assert "llc" not in trainer.progress_bar_metrics


def test_model_checkpoint_can_monitor_the_llc(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="llc/mean", every_n_train_steps=5, mode="max")
    monitor = LLCMonitor(every_n_steps=5, num_chains=4, num_draws=40, num_burnin_steps=20, epsilon=1e-3)
    train(tmp_path, [monitor, checkpoint], module=AtMinimum(), enable_checkpointing=True, max_steps=10)
    assert checkpoint.best_model_score is not None
    assert checkpoint.best_model_path


def test_gradient_accumulation_estimates_each_optimizer_step_once(tmp_path):
    monitor = LLCMonitor(every_n_steps=2, **QUICK)
    train(tmp_path, [monitor], accumulate_grad_batches=2, max_steps=6)
    assert [r.step for r in monitor.history] == [0, 2, 4, 6]


def test_log_spaced_schedule_is_dense_early(tmp_path):
    monitor = LLCMonitor(log_spaced=5, **QUICK)
    train(tmp_path, [monitor], max_steps=100)
    assert [r.step for r in monitor.history] == [0, 1, 3, 10, 32, 100]


def test_resume_continues_history_without_reestimating(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=10, save_top_k=-1)
    first = LLCMonitor(every_n_steps=4, **QUICK)
    train(tmp_path, [first, checkpoint], enable_checkpointing=True, max_steps=10)
    saved = torch.load(tmp_path / "ckpt" / "epoch=1-step=10.ckpt", weights_only=False)
    resumed = LLCMonitor(every_n_steps=4, **QUICK)
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [resumed], max_steps=20)
    trainer.fit(Regressor(), regression_loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=1-step=10.ckpt"))
    assert first.state_key in saved["callbacks"]
    # The step-10 checkpoint was written before the first run's end-of-training estimate, so it holds 0, 4, 8.
    assert [r.step for r in first.history] == [0, 4, 8, 10]
    assert [r.step for r in resumed.history] == [0, 4, 8, 12, 16, 20]
    assert [r.llc_mean for r in resumed.history[:3]] == [r.llc_mean for r in first.history[:3]]
    roundtrip = LLCMonitor(every_n_steps=4, **QUICK)
    roundtrip.load_state_dict(resumed.state_dict())
    assert [(r.step, r.llc_mean, r.seconds) for r in roundtrip.history] == [
        (r.step, r.llc_mean, r.seconds) for r in resumed.history
    ]
    assert torch.equal(roundtrip.history[-1].result.loss_trace, resumed.history[-1].result.loss_trace)
    assert roundtrip.detector.state_dict() == resumed.detector.state_dict()
    assert roundtrip.state_dict()["last_step"] == 20


def test_bf16_mixed_precision(tmp_path):
    monitor = LLCMonitor(every_n_steps=5, **QUICK)
    train(tmp_path, [monitor], precision="bf16-mixed", max_steps=10)
    assert len(monitor.history) == 3
    assert all(np.isfinite(r.llc_mean) for r in monitor.history)


class Unlogged(Regressor):
    """torch 2.13's dynamo cannot trace Lightning 2.6's self.log, with or without our callback."""

    def training_step(self, batch, batch_idx):
        return gaussian_nll(self.net, batch)


def test_compiled_module_samples_the_perturbed_parameters(tmp_path):
    """With Trainer.fit(torch.compile(module)) the chains must see their own weights, not the compiled originals."""
    monitor = LLCMonitor(every_n_steps=5, **QUICK)
    pl.seed_everything(0)
    module = Unlogged()
    make_trainer(tmp_path, [monitor], max_steps=10).fit(torch.compile(module, backend="eager"), regression_loader())
    traces = [r.result.loss_trace for r in monitor.history]
    assert all(trace.std() > 0 for trace in traces)
    assert module._compiler_ctx is not None


def test_a_failing_estimate_warns_and_training_continues(tmp_path):
    def broken(module, batch):
        raise RuntimeError("bug in loss_fn")

    monitor = LLCMonitor(every_n_steps=5, loss_fn=broken, **QUICK)
    with pytest.warns(LLCEstimateWarning, match="bug in loss_fn"):
        _, trainer = train(tmp_path, [monitor], max_steps=10)
    assert trainer.global_step == 10 and monitor.history == []


def test_on_error_raise_reraises(tmp_path):
    def broken(module, batch):
        raise RuntimeError("bug in loss_fn")

    with pytest.raises(RuntimeError, match="bug in loss_fn"):
        train(tmp_path, [LLCMonitor(every_n_steps=5, loss_fn=broken, on_error="raise", **QUICK)], max_steps=10)


def test_unhealthy_estimates_are_marked_and_warned_once(tmp_path):
    monitor = LLCMonitor(every_n_steps=2, epsilon=1e-2, **QUICK)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tmp_path, [monitor], max_steps=8)
    unhealthy = [r for r in monitor.history if not r.healthy]
    assert unhealthy, "early training with a large epsilon should give unhealthy estimates"
    assert len([w for w in caught if "marked unhealthy" in str(w.message)]) == 1


class Stream(IterableDataset):
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        yield from self.loader.dataset


def test_iterable_training_data_uses_a_buffer_of_recent_batches(tmp_path):
    stream = DataLoader(Stream(regression_loader()), batch_size=32)
    monitor = LLCMonitor(every_n_steps=4, nbeta=50.0, buffer_size=3, **QUICK)
    train(tmp_path, [monitor], loader=stream, max_steps=8)
    assert [r.step for r in monitor.history] == [0, 4, 8]
    assert monitor.history[0].result.num_samples == 32
    assert monitor.history[-1].result.num_samples == 3 * 32
    assert monitor.history[-1].result.nbeta == 50.0


class FixedDataSeen(LossDropDetector):
    """A loss-drop detector that remembers the fixed-data losses it was given."""

    def reset(self):
        super().reset()
        self.fixed_seen = []

    def update_fixed_data(self, step, value):
        self.fixed_seen.append((step, value))
        return super().update_fixed_data(step, value)


def test_each_estimates_loss_at_w_star_feeds_the_loss_detector_unless_the_data_is_a_buffer(tmp_path):
    """L(w*) is a noiseless loss series only when the monitor's data is the same at every estimate: map-style data
    is, a buffer of the latest batches of a stream is not."""
    fixed = FixedDataSeen()
    monitor = LLCMonitor(every_n_steps=4, loss_detector=fixed, **QUICK)
    train(tmp_path, [monitor], max_steps=8)
    assert fixed.fixed_seen == [(r.step, r.result.init_loss) for r in monitor.history] and len(fixed.fixed_seen) == 3
    buffered = FixedDataSeen()
    stream = DataLoader(Stream(regression_loader()), batch_size=32)
    train(
        tmp_path,
        [LLCMonitor(every_n_steps=4, nbeta=50.0, buffer_size=3, loss_detector=buffered, **QUICK)],
        loader=stream,
        max_steps=8,
    )
    assert buffered.fixed_seen == []


def test_iterable_training_data_without_nbeta_is_a_clear_error(tmp_path):
    stream = DataLoader(Stream(regression_loader()), batch_size=32)
    with pytest.raises(MisconfigurationException, match="nbeta"):
        train(tmp_path, [LLCMonitor(every_n_steps=4, **QUICK)], loader=stream, max_steps=8)


def test_user_dataloader_is_used_for_n_and_batches(tmp_path):
    monitor = LLCMonitor(every_n_steps=5, dataloader=regression_loader(n=100, batch_size=10), **QUICK)
    train(tmp_path, [monitor], max_steps=5)
    assert monitor.history[0].result.num_samples == 100


def test_fast_dev_run_takes_no_estimates(tmp_path):
    monitor = LLCMonitor(every_n_steps=1, **QUICK)
    train(tmp_path, [monitor], fast_dev_run=2, max_steps=-1)
    assert monitor.history == []


def test_manual_optimization_needs_a_loss_fn(tmp_path):
    class Manual(Regressor):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(MisconfigurationException, match="manual optimization"):
        train(tmp_path, [LLCMonitor(**QUICK)], module=Manual())


def test_more_processes_than_chains_is_rejected_in_setup(tmp_path):
    class FakeTrainer:
        world_size = 4
        strategy = None

    with pytest.raises(MisconfigurationException, match="num_chains"):
        LLCMonitor(num_chains=2).setup(FakeTrainer(), Regressor(), "fit")


def test_sharded_strategies_are_rejected(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    class FakeTrainer:
        world_size = 1
        strategy = FSDPStrategy()

    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        LLCMonitor().setup(FakeTrainer(), Regressor(), "fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 5, "max_overhead": 0.1}, ValueError, "choose one schedule"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"log_spaced": -1}, ValueError, "log_spaced"),
        ({"max_overhead": 1.5}, ValueError, "max_overhead"),
        ({"num_chains": 0}, ValueError, "num_chains"),
        ({"epsilon": 0.0}, ValueError, "epsilon"),
        ({"gamma": -1.0}, ValueError, "gamma"),
        ({"sampler": "nuts"}, ValueError, "sampler"),
        ({"on_error": "ignore"}, ValueError, "on_error"),
        ({"buffer_size": 0}, ValueError, "buffer_size"),
        ({"seed": 1.5}, ValueError, "seed"),
        ({"loss_fn": 3}, TypeError, "loss_fn"),
        ({"dataloader": [1, 2]}, TypeError, "dataloader"),
        ({"detector": "yes"}, TypeError, "detector"),
        ({"on_transition": 1}, TypeError, "on_transition"),
    ],
)
def test_bad_arguments_fail_in_init(kwargs, error, match):
    with pytest.raises(error, match=match):
        LLCMonitor(**kwargs)


@settings(max_examples=30, deadline=None)
@given(every=st.integers(min_value=1, max_value=10_000), chains=st.integers(min_value=1, max_value=64))
def test_valid_arguments_are_accepted_and_keyed_distinctly(every, chains):
    monitor = LLCMonitor(every_n_steps=every, num_chains=chains)
    assert monitor.config.num_chains == chains
    assert monitor.state_key != LLCMonitor(every_n_steps=every + 1).state_key


def test_default_monitor_uses_a_ten_percent_budget_and_a_detector():
    monitor = LLCMonitor()
    assert monitor.schedule.max_overhead == 0.1
    assert isinstance(monitor.detector, TransitionDetector)
    assert LLCMonitor(detector=False).detector is None
