"""The lightning-devinterp command: plot and analyze on small generated runs, and one-line errors for bad input."""

import csv
import struct
import sys

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_devinterp import LLCMonitor
from lightning_devinterp.analysis import analyze
from lightning_devinterp.cli import main
from lightning_devinterp.plotting import plot_runs
from tests.helpers.trainers import QUICK, Regressor, labelled_probe, make_trainer, regression_loader

ANALYZE = [
    "--module",
    "tests.helpers.trainers:Regressor",
    "--data",
    "tests.helpers.trainers:regression_loader",
    "--num-draws",
    "20",
    "--num-burnin-steps",
    "10",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 15-step run with LLCMonitor, TensorBoard logs and a checkpoint every 5 steps."""
    root = tmp_path_factory.mktemp("run")
    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=5, save_top_k=-1)
    trainer = make_trainer(
        root,
        [LLCMonitor(every_n_steps=5, **QUICK), checkpoints],
        logger=TensorBoardLogger(str(root / "logs"), name="r"),
        enable_checkpointing=True,
        max_steps=15,
        log_every_n_steps=1,
    )
    trainer.fit(Regressor(), regression_loader())
    return root


def test_plot_draws_a_png_from_tensorboard_logs(trained_run, capsys):
    output = trained_run / "plot.png"
    assert main(["plot", str(trained_run / "logs"), "-o", str(output), "--log-x"]) == 0
    assert output.read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in capsys.readouterr().out


def test_plot_errors_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert (
        capsys.readouterr().err.strip() == f"lightning-devinterp plot: error: no such directory: {tmp_path / 'missing'}"
    )
    assert main(["plot", str(tmp_path)]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_plot_without_matplotlib_says_how_to_get_it(trained_run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["plot", str(trained_run / "logs"), "-o", str(trained_run / "no.png")]) == 1
    assert "pip install 'lightning-devinterp[plot]'" in capsys.readouterr().err


def test_analyze_estimates_each_checkpoint_in_step_order_and_resumes(trained_run, tmp_path, capsys):
    table = tmp_path / "llc.csv"
    assert main(["analyze", str(trained_run / "ckpt"), *ANALYZE, "-o", str(table)]) == 0
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["step"]) for row in rows] == [5, 10, 15]
    assert all(float(row["acceptance"]) > 0 for row in rows)
    assert all(float(row["epsilon"]) > 0 for row in rows)  # the adapted step of each estimate
    assert table.with_suffix(".png").exists() and (tmp_path / "llc_transitions.csv").exists()
    capsys.readouterr()
    assert main(["analyze", str(trained_run / "ckpt"), *ANALYZE, "-o", str(table)]) == 0
    assert "skipping 3 checkpoint(s)" in capsys.readouterr().out
    with table.open() as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_analyze_reports_a_broken_checkpoint_in_one_line(trained_run, tmp_path, capsys):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "epoch=0-step=3.ckpt").write_bytes(b"not a checkpoint")
    assert main(["analyze", str(broken), *ANALYZE, "--no-plot", "-o", str(tmp_path / "x.csv")]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert error.startswith("lightning-devinterp analyze: error: cannot load")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--module", "nowhere:Thing", "--data", "tests.helpers.trainers:regression_loader"],
            "cannot import nowhere:Thing",
        ),
        (
            ["--module", "tests.helpers.trainers", "--data", "tests.helpers.trainers:regression_loader"],
            "package.module:name",
        ),
        (
            ["--module", "tests.helpers.trainers:make_trainer", "--data", "tests.helpers.trainers:regression_loader"],
            "load_from_checkpoint",
        ),
    ],
)
def test_analyze_rejects_bad_imports(trained_run, arguments, message, capsys):
    assert main(["analyze", str(trained_run / "ckpt"), *arguments]) == 1
    assert message in capsys.readouterr().err


def test_help_explains_each_verb(capsys):
    for verb in ("plot", "analyze"):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert "TensorBoard event files" in output and "rerun skips finished checkpoints" in output


def last_error_line(capsys):
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "checkpoints:" not in line]
    return lines[-1], len(lines)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--data", "tests.helpers.trainers:broken_loader"],
            "--data tests.helpers.trainers:broken_loader raised RuntimeError: the data folder is missing",
        ),
        (
            ["--data", "tests.helpers.trainers:regression_loader", "--loss", "tests.helpers.trainers:broken_loss"],
            "--loss tests.helpers.trainers:broken_loss raised KeyError",
        ),
        (
            ["--data", "tests.helpers.trainers:wrong_shape_loader"],
            "tests.helpers.trainers:Regressor.training_step raised RuntimeError",
        ),
    ],
)
def test_a_bug_in_the_users_own_function_is_reported_as_theirs(trained_run, tmp_path, arguments, message, capsys):
    code = main(
        [
            "analyze",
            str(trained_run / "ckpt"),
            "--module",
            "tests.helpers.trainers:Regressor",
            *arguments,
            "--no-plot",
            "-o",
            str(tmp_path / "x.csv"),
        ]
    )
    line, count = last_error_line(capsys)
    assert code == 1 and count == 1 and message in line


def test_output_places_that_cannot_be_written_are_one_line_errors(trained_run, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["plot", str(trained_run / "logs"), "-o", str(blocker / "plot.png")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert main(["analyze", str(trained_run / "ckpt"), *ANALYZE, "--no-plot", "-o", str(blocker / "llc.csv")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_an_unrelated_or_damaged_csv_is_named(trained_run, tmp_path, capsys):
    unrelated = tmp_path / "other.csv"
    unrelated.write_text("name,value\nx,1\n")
    assert main(["analyze", str(trained_run / "ckpt"), *ANALYZE, "--no-plot", "-o", str(unrelated)]) == 1
    assert "columns differ" in capsys.readouterr().err
    from lightning_devinterp.analysis import RESULT_COLUMNS

    damaged = tmp_path / "damaged.csv"
    damaged.write_text(",".join(RESULT_COLUMNS) + "\nfive," + ",".join(["0"] * (len(RESULT_COLUMNS) - 1)) + "\n")
    assert main(["analyze", str(trained_run / "ckpt"), *ANALYZE, "--no-plot", "-o", str(damaged)]) == 1
    assert "step is not an integer" in capsys.readouterr().err


def test_a_bad_option_value_is_one_line_naming_the_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["analyze", "x", "--module", "a:b", "--data", "c:d", "--epsilon", "abc"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and "--epsilon" in error[0]


def test_a_module_that_cannot_be_imported_says_how_to_make_it_importable(trained_run, capsys):
    assert (
        main(
            [
                "analyze",
                str(trained_run / "ckpt"),
                "--module",
                "my_project.model:Net",
                "--data",
                "tests.helpers.trainers:regression_loader",
            ]
        )
        == 1
    )
    assert "PYTHONPATH" in capsys.readouterr().err


def test_help_describes_ckpt_dir_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    output = " ".join(capsys.readouterr().out.split())
    assert "a folder of Lightning checkpoints" in output and "(default: adaptive)" in output and "--device" in output


def test_analyze_writes_one_column_pair_per_group(trained_run, tmp_path):
    table = tmp_path / "groups.csv"
    assert (
        main(
            [
                "analyze",
                str(trained_run / "ckpt"),
                *ANALYZE,
                "--no-plot",
                "-o",
                str(table),
                "--param-groups",
                "first=net.0",
                "last=net.3.weight,net.3.bias",
            ]
        )
        == 0
    )
    with table.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and all(
        float(row["first_llc_mean"]) == float(row["first_llc_mean"]) and row["last_llc_std"] for row in rows
    )


def test_a_run_with_groups_gets_a_second_panel(tmp_path):
    """Each group's λ̂ is drawn in a panel of its own under the run's: the picture is twice as tall."""
    series = {"llc/mean": [(0, 1.0), (10, 2.0)], "llc/std": [(0, 0.1), (10, 0.1)], "train_loss": [(0, 1.0), (10, 0.5)]}
    plain = plot_runs({"run": series}, tmp_path / "plain.png")
    grouped = plot_runs(
        {"run": {**series, "llc/attn/mean": [(0, 0.5), (10, 1.5)], "llc/mlp/mean": [(0, 0.2), (10, 0.4)]}},
        tmp_path / "grouped.png",
    )

    def height(path):
        return struct.unpack(">I", path.read_bytes()[20:24])[0]

    assert height(grouped) == 2 * height(plain)


def staged_loader():
    """The stage-wise example's teacher data, for ``analyze --data``."""
    from examples.dln_stagewise import teacher_data

    return DataLoader(teacher_data(), batch_size=100)


@pytest.mark.slow
def test_analyze_reports_a_loss_drop_between_checkpoints_from_their_loss_at_w_star(tmp_path, capsys, monkeypatch):
    """A deep linear network's first mode is learnt around step 1100: from checkpoints every 100 steps, analyze sees
    the drop in L(w*) (the loss over the data at each checkpoint), as the monitor would, and writes the report."""
    from examples.dln_stagewise import DeepLinearNetwork

    pl.seed_everything(0)
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=100, save_top_k=-1)
    trainer = make_trainer(tmp_path, [checkpoints], enable_checkpointing=True, max_steps=1600)
    trainer.fit(DeepLinearNetwork(), staged_loader())
    table = tmp_path / "llc.csv"
    arguments = [
        "--module",
        "examples.dln_stagewise:DeepLinearNetwork",
        "--data",
        "tests.integration.test_cli_tool:staged_loader",
        "--num-draws",
        "20",
        "--num-burnin-steps",
        "10",
    ]
    assert main(["analyze", str(tmp_path / "ckpt"), *arguments, "-o", str(table), "--no-plot"]) == 0
    with (tmp_path / "llc_transitions.csv").open() as handle:
        reports = list(csv.DictReader(handle))
    onset = reports[0]
    assert onset["metric"] == "llc/init_loss" and onset["evidence"] == "loss drop" and 900 <= int(onset["step"]) <= 1300
    assert (
        "onset" in onset["reason"] and f"possible phase transition at step {onset['step']}" in capsys.readouterr().out
    )


def test_analyze_writes_susceptibilities_per_group_and_label(trained_run, tmp_path):
    rows, _ = analyze(
        trained_run / "ckpt", Regressor.load_from_checkpoint, regression_loader, tmp_path / "chi.csv",
        estimate_kwargs=dict(num_chains=2, num_draws=20, num_burnin_steps=10, seed=0, param_groups={"first": "net.0.*"},
                             **labelled_probe()),
        progress=False,
    )  # fmt: skip
    assert len(rows) == 3
    for column in ("susceptibility_all_near", "susceptibility_all_far", "susceptibility_first_near"):
        assert all(float(row[column]) == float(row[column]) for row in rows), column
