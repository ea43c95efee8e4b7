"""TransitionEvidence: the loss and λ̂ combined into one stream of reports, online and after the fact."""

import math

import numpy as np
import pytest
import torch

from lightning_devinterp import SamplingConfig, TransitionDetector, detect_transitions
from lightning_devinterp.detection.combined import TransitionEvidence
from lightning_devinterp.detection.loss_drops import FIXED_DATA_METRIC, LossDropDetector
from lightning_devinterp.tracking.tracker import LLCTracker
from tests.helpers.results import an_estimate
from tests.helpers.series import loss_curve, slow_fall


def monitor_reports(seed, llc_at, healthy_at=lambda step: True):
    """The combined evidence's reports on a slow fall that stops at step 1800, with λ̂ (``llc_at(step)``) and L(w*)
    every 100 steps, fed in the monitor's order."""
    steps, minibatch, exact = slow_fall(np.random.default_rng(seed), steps=3000)
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports = []
    for step, value in zip(steps, minibatch):
        reports.append(evidence.observe_loss(step, value))
        if step % 100 == 0 and step > 0:
            reports.append(
                evidence.observe_llc(
                    step, llc_at(step), 0.05, healthy=healthy_at(step), fixed_loss=exact(min(step, 1800))
                )
            )
    return [report for report in reports if report is not None]


def test_the_monitor_reports_a_fixed_data_onset_once_with_llc_before_and_after_at_its_end():
    onset, end = monitor_reports(8, lambda step: (5.0 if step < 1100 else 9.0) + 0.05 * math.sin(step))
    assert onset.metric == FIXED_DATA_METRIC and onset.evidence == "loss drop"
    assert not end.is_onset and end.evidence == "both" and end.before == pytest.approx(5.0, abs=0.1)


def test_a_drop_with_no_healthy_llc_before_it_ends_with_llc_now():
    """On a saddle λ̂ is negative and unhealthy until the drop: the end has no λ̂ before to compare, so it says
    where λ̂ is now."""
    onset, end = monitor_reports(9, lambda step: 9.0 if step >= 1300 else -2.0, healthy_at=lambda step: step >= 1300)
    assert end.metric == FIXED_DATA_METRIC and "λ̂ now 9, with no healthy estimate before the onset" in end.reason


def test_offline_detection_with_the_losses_makes_the_monitors_reports():
    """detect_transitions given the training loss and L(w*) runs the monitor's evidence in the monitor's order, so
    post-hoc analysis of a run and the alerts during it agree report for report."""
    rng = np.random.default_rng(10)
    steps, minibatch, exact = slow_fall(rng, steps=3000)
    estimates = list(range(100, 3000, 100))
    llc = [(5.0 if step < 1100 else 9.0) + 0.05 * math.sin(step) for step in estimates]
    fixed = [exact(min(step, 1800)) for step in estimates]
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector(metric="llc/mean"))
    online = []
    for step, value in zip(steps, minibatch):
        online.append(evidence.observe_loss(step, value))
        if step in estimates:
            index = estimates.index(step)
            online.append(evidence.observe_llc(step, llc[index], 0.05, fixed_loss=fixed[index]))
    online = [report for report in online if report is not None]
    offline = detect_transitions(
        estimates,
        llc,
        [0.05] * len(llc),
        metric="llc/mean",
        fixed_losses=fixed,
        training_losses=list(zip(steps, minibatch)),
    )
    assert len(online) == 2 and offline == online
    assert (
        detect_transitions(estimates, llc, [0.05] * len(llc), metric="llc/mean", fixed_losses=fixed)[0].metric
        == FIXED_DATA_METRIC
    )
    with pytest.raises(ValueError, match="fixed_losses"):
        detect_transitions(estimates, llc, fixed_losses=fixed[:-1])


def test_a_drop_across_which_llc_changed_ends_with_both_kinds_of_evidence():
    rng = np.random.default_rng(4)
    steps, losses = loss_curve(rng, drops=(600,), noise=0.2)
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports, dense = [], []
    for step, loss in zip(steps, losses):
        found = evidence.observe_loss(step, loss)
        dense.append(evidence.wants_dense_estimates)
        if step % 50 == 0 and step > 0:
            llc = (5.0 if step < 650 else 9.0) + 0.05 * math.sin(step)
            found = found or evidence.observe_llc(step, llc, 0.05, healthy=not 650 <= step < 750)
        if found is not None:
            reports.append(found)
    onset, end = reports
    assert onset.is_onset and onset.evidence == "loss drop" and onset.metric == "train_loss"
    assert not end.is_onset and end.evidence == "both" and end.metric == "llc/mean"
    assert end.before == pytest.approx(5.0, abs=0.1) and end.after == pytest.approx(9.0, abs=0.1)
    assert "unhealthy" in end.reason
    assert any(dense[600:800]) and not any(dense[:500])


def test_a_llc_shift_without_a_loss_drop_is_reported_on_its_own():
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports = []
    for step in range(1, 3001):
        evidence.observe_loss(step, 1.0)
        if step % 100 == 0:
            found = evidence.observe_llc(step, (5.0 if step < 1500 else 8.0) + 0.05 * math.cos(step), 0.05)
            if found is not None:
                reports.append(found)
    assert [(r.evidence, r.direction) for r in reports] == [("λ̂ change", "up")]


def test_llc_seen_while_the_loss_settles_is_not_a_level_to_compare_with():
    """While a model converges from initialisation w* is still moving and λ̂ (here 30) is not yet what it settles to
    (20, once the loss is flat): that is no transition."""
    rng = np.random.default_rng(0)
    evidence = TransitionEvidence(LossDropDetector(), TransitionDetector())
    reports = []
    for step in range(1, 2001):
        evidence.observe_loss(step, (1 + 10 * math.exp(-step / 100)) * math.exp(rng.normal(0, 0.05)))
        if step % 25 == 0:
            found = evidence.observe_llc(step, (30.0 if step < 550 else 20.0) + 0.3 * math.cos(step), 0.3)
            if found is not None:
                reports.append(found)
    assert reports == []


def _estimate(llc, groups, chi):
    """An LLCResult with λ̂ ``llc``, groups of the given λ̂ and susceptibilities per label (two probe samples each)."""

    def result(value, susceptibility, parts=None):
        return an_estimate(
            value, chains=2, llc_std=0.01, epsilon=1e-4, llc_stderr=0.01, susceptibility=torch.tensor(susceptibility),
            probe_labels=["rule", "rule", "noise", "noise"], groups=parts or {},
        )  # fmt: skip

    return result(llc, chi["all"], {name: result(value, chi[name]) for name, value in groups.items()})


def test_an_end_report_says_where_to_look():
    """Across a loss drop, attention's λ̂ grew most and the MLP's χ on rule tokens moved most: the end report says
    so, the onset report does not."""
    tracker = LLCTracker(
        SamplingConfig(), seed=0, evidence=TransitionEvidence(LossDropDetector(), TransitionDetector())
    )
    before = _estimate(5.0, {"attn": 1.0, "mlp": 2.0, "embed": 1.0},
                       {"all": [0.1, 0.1, 0.2, 0.2], "attn": [0.0] * 4, "mlp": [0.1, 0.1, 0.0, 0.0], "embed": [0.0] * 4})  # fmt: skip
    after = _estimate(9.0, {"attn": 4.0, "mlp": 2.5, "embed": 0.9},
                      {"all": [0.1, 0.1, 0.2, 0.2], "attn": [0.0] * 4, "mlp": [0.9, 0.9, 0.0, 0.0], "embed": [0.0] * 4})  # fmt: skip
    rng = np.random.default_rng(4)
    steps, losses = loss_curve(rng, drops=(600,), noise=0.2)
    for step, loss in zip(steps, losses):
        tracker.observe_loss(step, loss)
        if step % 50 == 0 and step > 0:
            tracker.detect(tracker.record(step, before if step < 700 else after, 0.1), fixed_data=False)
    onset, end = tracker.transitions
    assert onset.where_to_look == ""
    assert end.where_to_look.startswith("λ̂ of attn +3, mlp +0.5")
    assert "χ of rule in mlp +0.8" in end.where_to_look
    assert "where to look: λ̂ of attn" in end.describe()
