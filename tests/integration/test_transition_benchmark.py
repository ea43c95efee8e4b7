"""A fast subset of the transitions benchmark (benchmarks/transitions): real recorded runs, scored by replay.

The full benchmark (seeds 0-47 of every family, tuning and held-out sets) is a script, not a test; this checks that the
pipeline works end to end and that the monitor's detection keeps its recall, its latency and its silence on staged
runs and controls (superposition's slow drop is reported within 150 steps of its start only with L(w*)), and that a
staircase under an explicit schedule, and a superposition staircase, get an onset and an end per stage; and that
the live monitor does as well as the replay says on a superposition staircase watched with sparse estimates.
"""

import math

import pytest

from benchmarks.transitions.families import BUILDERS, CONTROLS
from benchmarks.transitions.ground_truth import episodes, stages
from benchmarks.transitions.record import record, train_recorded
from benchmarks.transitions.score import RECALL_AFTER, RECALL_BEFORE, ground_truth, score_run
from lightning_devinterp import LLCMonitor


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "seed"),
    [("dln", 1), ("tms", 0), ("parity", 1), ("stairs", 6), ("tms-stairs", 4), ("finetune", 1), ("digits", 1)],
)
def test_a_recorded_run_is_scored_against_its_loss_curve(family, seed, tmp_path):
    series = record(BUILDERS[family](seed), directory=tmp_path)
    assert len(series["minibatch_loss"]) == series["steps"] and series["llc"]
    score = score_run(series)
    if family in CONTROLS:
        assert score.reports == 0
    else:
        assert ground_truth(series), "the staged run should have a ground-truth drop"
        assert score.found == score.episodes and score.false == 0
        assert max(score.latencies) <= 150
    if family == "stairs":
        assert series["every_n_steps"] and score.episodes == len(score.end_latencies) == 4
        assert max(score.end_latencies) <= 150
    if family == "tms-stairs":
        assert score.episodes == len(score.end_latencies) == 2
    assert score.impossible == 0


@pytest.mark.slow
def test_a_superposition_staircase_under_sparse_estimates_gets_each_stage_its_own_onset_and_end():
    """Estimates 200 steps apart, no densification, and a minibatch loss too noisy to show either fall: L(w*), read
    every few dozen steps in between, dates both stages of this staircase (450-800 and 910-1130 by its features'
    losses); from the estimates alone the monitor reported one onset at 600 and one end at 1400. The readings' spacing
    follows their cost against the training step's, so it depends on the machine: replayed 25 to 125 steps apart,
    the stages stay two and the second ends by 1400, 270 steps after it."""
    spec = BUILDERS["tms-stairs"](1)
    monitor = LLCMonitor(every_n_steps=200, seed=spec.seed, num_burnin_steps=10, num_draws=20)  # λ̂ plays no part
    recorder = train_recorded(spec, monitor)
    truth = [stage for stage in stages(recorder.stages, recorder.full) if not stage.optional]
    onsets = [report.step for report in monitor.transitions if report.is_onset]
    ends = [report.step for report in monitor.transitions if not report.is_onset]
    assert len(truth) == len(onsets) == len(ends) == 2
    assert ends[0] < onsets[1]
    for stage, onset, end in zip(truth, onsets, ends):
        assert stage.start - RECALL_BEFORE <= onset <= stage.end + RECALL_AFTER
        assert onset < end <= stage.end + 300


def sigmoid(step: int, at: int) -> float:
    """From 1 to 0 around step ``at``, over about 100 steps."""
    return 1 / (1 + math.exp((step - at) / 20))


def test_a_part_of_the_loss_that_barely_moves_is_no_stage():
    """Two parts fall 700 steps apart, each a stage; a third (a feature the model never learns) creeps down over the
    whole run, so its 10%-90% stretch spans both falls and, counted, would merge them into one stage."""

    parts = [
        (step, [sigmoid(step, 500), 0.5 * sigmoid(step, 1200), 0.01 * (1 - step / 2000)]) for step in range(0, 2000, 10)
    ]
    full_loss = [(step, sum(values) + 0.01) for step, values in parts]
    found = stages(parts, full_loss)
    assert [(stage.start, stage.end) for stage in found] == [(480, 600), (1180, 1300)]


def test_a_fall_that_no_part_explains_alone_stays_an_episode():
    """Two parts each fall by 8% of the loss at once, after a plateau: neither is a stage by itself, but the loss
    fell 17% in about 100 steps, which is an episode of the full-set loss rule."""
    parts = [
        (step, [0.5 - 0.08 * (1 - sigmoid(step, 800)), 0.5 - 0.08 * (1 - sigmoid(step, 800))])
        for step in range(0, 1600, 10)
    ]
    full_loss = [(step, sum(values)) for step, values in parts]
    assert [(episode.start, episode.end) for episode in stages(parts, full_loss)] == [
        (episode.start, episode.end) for episode in episodes(full_loss)
    ]
    assert len(episodes(full_loss)) == 1


def test_a_stage_too_soon_after_the_previous_or_before_any_plateau_is_optional():
    """Four parts fall around steps 150, 700, 860 and 1400 (each stage about 120 steps from 10% to 90% learnt). The
    first falls before any plateau could have been seen, and the third starts 40 steps after the second ends: a
    report of either is welcome, and its absence is no miss. The second and the fourth are stages of their own."""
    parts = [
        (step, [sigmoid(step, 150), sigmoid(step, 700), sigmoid(step, 860), sigmoid(step, 1400)])
        for step in range(0, 1900, 10)
    ]
    full_loss = [(step, sum(values) + 0.05) for step, values in parts]
    found = [(stage.start, stage.end, stage.optional) for stage in stages(parts, full_loss)]
    assert found == [(130, 250, True), (680, 800, False), (840, 960, True), (1380, 1500, False)]
