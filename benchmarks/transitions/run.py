"""The transitions benchmark, in one command: record the runs (once; cached), replay the monitor's detection,
and print recall, false reports, latency and impossible values per family, separately for the tuning seeds and the
held-out sets (see ``families.split``). See families.py for the runs, ground_truth.py for what counts as a
transition, score.py for the metrics.

    python -m benchmarks.transitions.run [--seeds 48] [--families dln tms parity linear ...] [--jobs 2]
    python -m benchmarks.transitions.run --seeds 60 --families dln stairs tms-stairs    # + the staircase split
    python -m benchmarks.transitions.run --seeds 72 --families stairs tms-stairs        # + the readings split
    python -m benchmarks.transitions.run --seeds 84                                     # + the spikes split
    python -m benchmarks.transitions.run --seeds 96 --families digits                   # (24 seeds of the digits control)
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

from benchmarks.transitions.families import BUILDERS, CONTROLS, FAMILIES, specs, split
from benchmarks.transitions.score import Score, agreement, score_run
from lightning_devinterp.tracking.schedule import FIXED_LOSS_EVERY


def _record(spec_args: tuple[str, int]) -> dict:
    import torch

    from benchmarks.transitions.families import BUILDERS as builders
    from benchmarks.transitions.record import record

    torch.set_num_threads(1)
    family, seed = spec_args
    return record(builders[family](seed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=48, help="seeds per family: 0 .. seeds-1 (see families.split)")
    parser.add_argument("--families", nargs="+", default=[*FAMILIES, *CONTROLS], choices=list(BUILDERS))
    parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--baseline", type=int, default=100, help="steps between the baseline estimates")
    parser.add_argument("--no-densify", action="store_true", help="no extra estimates around transitions")
    parser.add_argument(
        "--no-fixed-loss", action="store_true", help="without L(w*), the loss on the monitor's fixed data"
    )
    parser.add_argument(
        "--fixed-loss-every",
        type=int,
        default=FIXED_LOSS_EVERY,
        help="steps between the readings of L(w*) between estimates (the monitor spaces them by their cost; 0: none)",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="score post-hoc analysis instead (analyze over checkpoints every --baseline steps: λ̂ and L(w*), no training loss), "
        "with the share of the monitor's onsets it also finds",
    )
    args = parser.parse_args()
    runs = [(spec.family, spec.seed) for spec in specs(args.families, range(args.seeds))]
    with ProcessPoolExecutor(args.jobs) as pool:
        recorded = list(pool.map(_record, runs))
    agree = "  agree" if args.offline else ""
    print(
        f"{'family':<10} {'split':<9} {'runs':>4} {'episodes':>8} {'recall':>7} {'false/run':>9} {'latency':>8} "
        f"{'end lat.':>8} {'impossible':>10}{agree}"
    )
    for family in args.families:
        for part in ("tuning", "held-out", "fresh", "latest", "staircase", "readings", "spikes"):
            chosen = [series for series in recorded if series["family"] == family and split(series["seed"]) == part]
            if not chosen:
                continue
            total = Score()
            for series in chosen:
                total.add(
                    score_run(
                        series,
                        post_hoc=args.offline,
                        baseline=args.baseline,
                        densify=not args.no_densify,
                        fixed_loss=not args.no_fixed_loss,
                        fixed_loss_every=args.fixed_loss_every or None,
                    )
                )
            if args.offline:
                matched, online = (sum(pair) for pair in zip(*(agreement(series, args.baseline) for series in chosen)))
                agree = f"  {matched}/{online}"
            print(f"{family:<10} {part:<9} {total.row()}{agree}")


if __name__ == "__main__":
    main()
