"""LLCMonitor() with no arguments on three ordinary CPU runs nobody tuned it for (not a test; figures for the README).

For each run of ``ordinary_runs.py`` (an MLP and a small CNN on scikit-learn's digits, a 2-block attention model on
a synthetic sequence task), trains once without the monitor and once with ``LLCMonitor()``, same seed, and prints:
the number of estimates, the share healthy after the first 10% of training, the wall-time overhead against the
run without the monitor, the monitor's own measured share, the step size it chose, and the final λ̂ beside a long
reference estimate (8 chains x 5000 draws after 1000 burn-in steps, at a quarter of the chosen step size).

    python -m benchmarks.default_monitor [--runs mlp cnn attention] [--scale 1] [--no-reference]

``--scale 5`` makes each run five times longer (the "runs of a minute or more" figure).
"""

from __future__ import annotations

import argparse
import time
import warnings

import lightning.pytorch as pl
import torch

from benchmarks.ordinary_runs import RUNS, Run
from lightning_devinterp import LLCMonitor, estimate_llc


def fit(run: Run, steps: int, monitor: LLCMonitor | None) -> tuple[pl.LightningModule, float]:
    pl.seed_everything(0, verbose=False)
    module = run.make_module()
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
    trainer.fit(module, run.loader())
    return module, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every run's length")
    parser.add_argument("--no-reference", action="store_true", help="skip the long reference estimates")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = f"{'run':<32} {'steps':>6} {'plain s':>8} {'with s':>7} {'overhead':>9} {'own':>6} {'estimates':>9} {'healthy>10%':>11} {'epsilon':>9} {'final λ̂':>9} {'reference':>15}"
    print(header)
    for key in args.runs:
        run = RUNS[key]
        steps = int(run.steps * args.scale)
        fit(run, 50, LLCMonitor())  # warm-up: imports and first-call costs, outside the timed runs
        _, plain = fit(run, steps, None)
        monitor = LLCMonitor()
        module, watched = fit(run, steps, monitor)
        late = [r for r in monitor.history if r.step >= 0.1 * steps]
        healthy = sum(r.healthy for r in late) / max(len(late), 1)
        final = monitor.history[-1] if monitor.history else None
        reference = "skipped"
        if final is not None and not args.no_reference:
            long = estimate_llc(
                module,
                run.make_data(),
                batch_size=run.batch_size,
                num_chains=8,
                num_draws=5000,
                num_burnin_steps=1000,
                epsilon=final.result.epsilon / 4,
                gamma=final.result.gamma,
                seed=1,
            )
            reference = f"{long.llc_mean:.3g} ({final.llc_mean / long.llc_mean - 1:+.0%})"
        print(
            f"{run.name:<32} {steps:>6} {plain:>8.1f} {watched:>7.1f} {watched / plain - 1:>+9.1%} "
            f"{monitor.schedule.own_seconds / watched:>6.1%} {len(monitor.history):>9} {healthy:>11.0%} "
            f"{(final.result.epsilon if final else float('nan')):>9.2e} {(final.llc_mean if final else float('nan')):>9.3g} {reference:>15}",
            flush=True,
        )


if __name__ == "__main__":
    main()
