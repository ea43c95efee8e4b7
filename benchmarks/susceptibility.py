"""Susceptibilities against devinterp's, and what the probe costs beside a plain estimate (not a test).

On the attention model of ``examples/components.py`` (per-token next-token loss, the data model devinterp's
susceptibilities are written for), trained for ``--steps`` steps, the script runs ``estimate_llc`` at the final
weights with the example's components as ``param_groups``

1. without a probe and with one (``--probe-sequences`` held-out sequences, every target token a probe item), each
   ``--repeats`` times, and reports the median time of each, their ratio, and how many forward passes the probe took
   against one per draw per probe batch;
2. on the probe run's own draws, our χ per group and token against devinterp 2.0.1's ``compute_susceptibilities``
   (when devinterp is installed; it is not a dependency). devinterp scores each draw by its minibatch loss minus
   L(w*) (unpaired) and centres the second factor with the full model's run; ours is the plain covariance within each
   group's run (docs/components.md). The script computes ours on the unpaired increases too, so that the two differ
   only by the centring, checks that the difference is exactly that term, and reports how large it is: the relative
   difference ‖χ_devinterp − χ_ours‖ / ‖χ_ours‖ and their correlation per group. It also reports our default (paired
   increases) against the unpaired one on the same draws: correlation and the ratio of their standard errors.

    python -m benchmarks.susceptibility [--steps 600] [--chains 4] [--draws 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from examples.components import SequenceModel, component_groups, per_token_loss, sum_sequences
from lightning_devinterp import LLCResult, estimate_llc
from lightning_devinterp.sampling.susceptibility import PROBE_LOSS, susceptibility


def trained_model(steps: int) -> tuple[SequenceModel, DataLoader]:
    pl.seed_everything(0)
    model = SequenceModel()
    data = DataLoader(sum_sequences(), batch_size=64, shuffle=True)
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(model, data)
    return model, data


class CountedLoss:
    """``per_token_loss`` that counts its calls: under vmap, one call is one forward pass for all chains."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: SequenceModel, batch: Any) -> torch.Tensor:
        self.calls += 1
        return per_token_loss(model, batch)


def median_time(run: Callable[[], LLCResult], repeats: int) -> tuple[float, LLCResult]:
    run()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


def unpaired_increases(result: LLCResult) -> torch.Tensor:
    return result.loss_trace.double() - result.init_loss


def ours_unpaired(result: LLCResult) -> np.ndarray:
    return susceptibility(unpaired_increases(result), result.observations[PROBE_LOSS]).value.numpy()


def devinterp_susceptibilities(result: LLCResult) -> dict[str, np.ndarray]:
    """The susceptibilities of devinterp 2.0.1's ``compute_susceptibilities`` on this result's draws, by group."""
    import xarray as xr
    from devinterp.slt.susceptibilities import compute_susceptibilities

    def tree(run: LLCResult) -> xr.DataTree:
        probe = run.observations[PROBE_LOSS].double().numpy()
        samples, tokens = probe.shape[2:]
        losses = np.repeat(run.loss_trace.double().numpy()[:, :, None, None], tokens, axis=3)
        return xr.DataTree(
            xr.Dataset(
                {
                    "loss_train": (("chain", "draw", "batch_train", "token_pos"), losses),
                    "loss_probe": (("chain", "draw", "batch_probe", "token_pos"), probe),
                    "init_loss": ((), run.init_loss),
                    "input_ids_probe": (("batch", "position"), np.zeros((samples, tokens), dtype=np.int64)),
                }
            )
        )

    trees = {"full": tree(result), **{name: tree(group) for name, group in result.groups.items()}}
    output = compute_susceptibilities(trees, "train")["susceptibilities"].dataset
    shape = result.observations[PROBE_LOSS].shape[2:]
    return {str(name): output["sus"].sel(wr=name).values.reshape(shape) for name in result.groups}


def centring_term(result: LLCResult, group: LLCResult) -> np.ndarray:
    """E_C[φ] (E_C[L − ℓ] − E_full[L − ℓ]): what devinterp's centring adds to the plain covariance."""

    def mean_gap(run: LLCResult) -> np.ndarray:
        losses = run.loss_trace.double()[:, :, None, None]
        return (losses - run.observations[PROBE_LOSS].double()).mean(dim=(0, 1)).numpy()

    phi = float(unpaired_increases(group).mean())
    return phi * (mean_gap(group) - mean_gap(result))


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--probe-sequences", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"commit {commit}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")

    model, data = trained_model(args.steps)
    probe = sum_sequences(args.probe_sequences, seed=2)
    settings = dict(
        num_chains=args.chains, num_draws=args.draws, seed=0, param_groups=component_groups(model),
    )  # fmt: skip
    counted = CountedLoss()
    plain_time, plain = median_time(lambda: estimate_llc(model, data, **settings), args.repeats)
    probe_time, probed = median_time(
        lambda: estimate_llc(model, data, probe=probe, per_sample_loss_fn=counted, **settings), args.repeats
    )
    runs, batches = args.repeats + 1, -(-args.probe_sequences // 256)
    print(f"\n{len(plain.groups)} groups, {args.chains} chains x {args.draws} draws, probe {args.probe_sequences} x 16")
    print(f"plain estimate  {plain_time:6.2f} s   λ̂ {plain.llc_mean:.1f}")
    print(f"with the probe  {probe_time:6.2f} s   λ̂ {probed.llc_mean:.1f}   ratio {probe_time / plain_time:.2f}")
    print(
        f"probe forward passes per estimate: {counted.calls / runs:.0f} "
        f"(one per draw per probe batch: {args.draws * batches}; all chains and groups in each)"
    )

    paired = {name: group.susceptibility.numpy() for name, group in probed.groups.items()}
    unpaired = {name: ours_unpaired(group) for name, group in probed.groups.items()}
    print(f"\n{'group':>8} {'paired~unpaired r':>18} {'SE unpaired/paired':>19}", end="")
    try:
        theirs = devinterp_susceptibilities(probed)
    except ImportError as error:
        theirs = {}
        print(f"\n(devinterp comparison skipped: {error})")
    else:
        print(f" {'devinterp~ours r':>17} {'|diff|/|ours|':>14} {'diff = centring':>16}")
    for name, group in probed.groups.items():
        unpaired_se = susceptibility(unpaired_increases(group), group.observations[PROBE_LOSS]).stderr
        se_ratio = float((unpaired_se / group.susceptibility_std).median())
        line = f"{name:>8} {correlation(paired[name], unpaired[name]):>18.3f} {se_ratio:>19.2f}"
        if name in theirs:
            difference = theirs[name] - unpaired[name]
            exact = np.allclose(difference, centring_term(probed, group), rtol=1e-6, atol=1e-9)
            line += (
                f" {correlation(theirs[name], unpaired[name]):>17.3f}"
                f" {relative_difference(theirs[name], unpaired[name]):>14.3f} {'yes' if exact else 'NO':>16}"
            )
        print(line)


if __name__ == "__main__":
    main()
