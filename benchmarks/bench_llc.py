"""Speed of estimate_llc against plain training and devinterp, as ratios within one run (not a test).

Work: a 20-64-64-1 ReLU MLP, 1000 samples, batch 64, 4 chains x 200 SGLD steps (no burn-in, so 800 chain steps),
on one CPU thread. Compared with 800 plain SGD steps on batches of 64 (forward, backward, step), the sequential
fallback of the same estimate, devinterp's ``llc()`` on the same work when devinterp is installed, and the cost
of ``calibrate`` over its default epsilon grid (with 50 burn-in steps, so that chains can level off).
Every timed call is run once beforehand, so first-call costs (vmap tracing set-up, allocator) are reported
separately and not mixed into the steady-state figures.

    python benchmarks/bench_llc.py [--device cuda] [--chains 4 8 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from lightning_devinterp import calibrate, estimate_llc

NUM_SAMPLES, BATCH_SIZE, NUM_STEPS = 1000, 64, 200


def make_problem(device: torch.device) -> tuple[nn.Module, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 20, generator=generator)
    y = torch.sin(x[:, :1]) + 0.1 * torch.randn(NUM_SAMPLES, 1, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    return model, TensorDataset(x.to(device), y.to(device))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """(first call, best of ``repeats`` later calls), in seconds."""
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[0], min(times[1:])


def train_steps(model: nn.Module, data: TensorDataset, num_steps: int) -> None:
    x, y = data.tensors
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    generator = torch.Generator(device=x.device).manual_seed(0)
    for _ in range(num_steps):
        index = torch.randint(NUM_SAMPLES, (BATCH_SIZE,), generator=generator, device=x.device)
        loss = mse(model, (x[index], y[index]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def devinterp_llc(model: nn.Module, data: TensorDataset, num_chains: int) -> Callable[[], object] | None:
    """devinterp 2.0.1's ``llc()`` on the same work, or None when devinterp is not installed."""
    try:
        from datasets import Dataset as HFDataset
        from devinterp.slt.llc import llc
    except ImportError:
        return None
    x, y = (t.cpu() for t in data.tensors)
    rows = HFDataset.from_dict({"input_ids": torch.cat([x, y], dim=1).tolist()}).with_format("torch")

    def per_sample_loss(network: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """devinterp wants a "per-token" loss of shape (batch, columns - 1); each sample's loss fills its row."""
        inputs, targets = input_ids[:, :20].float(), input_ids[:, 20:].float()
        loss = 0.5 * ((network(inputs) - targets) ** 2).sum(-1, keepdim=True)
        return loss.expand(-1, input_ids.shape[1] - 1)

    def run() -> object:
        return llc(
            model, rows, {}, lr=1e-4, n_beta=NUM_SAMPLES / 6.9, loss_fn=per_sample_loss, num_chains=num_chains,
            num_draws=NUM_STEPS, batch_size=BATCH_SIZE, localization=100.0, device=str(next(model.parameters()).device),
        )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chains", type=int, nargs="+", default=[4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, data = make_problem(device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    for num_chains in args.chains:
        common = dict(batch_size=BATCH_SIZE, num_chains=num_chains, num_draws=NUM_STEPS, num_burnin_steps=0, seed=0)
        first_vmap, vmap_time = best_time(lambda: estimate_llc(model, data, mse, vectorize=True, **common), args.repeats, device)
        _, sequential_time = best_time(lambda: estimate_llc(model, data, mse, vectorize=False, **common), args.repeats, device)
        _, train_time = best_time(lambda: train_steps(make_problem(device)[0], data, num_chains * NUM_STEPS), args.repeats, device)
        print(f"\n{num_chains} chains x {NUM_STEPS} steps ({num_chains * NUM_STEPS} chain steps)")
        print(f"  estimate_llc (vmap)        {vmap_time * 1e3:8.1f} ms   (first call {first_vmap * 1e3:.0f} ms)")
        print(f"  estimate_llc (sequential)  {sequential_time * 1e3:8.1f} ms")
        print(f"  {num_chains * NUM_STEPS} SGD training steps    {train_time * 1e3:8.1f} ms")
        print(f"  vmap / training            {vmap_time / train_time:8.2f} x   (target <= 1.0)")
        print(f"  sequential / vmap          {sequential_time / vmap_time:8.2f} x")
        reference = devinterp_llc(model, data, num_chains)
        if reference is not None:
            _, devinterp_time = best_time(reference, 1, device)
            print(f"  devinterp llc()            {devinterp_time * 1e3:8.1f} ms")
            print(f"  devinterp / vmap           {devinterp_time / vmap_time:8.2f} x   (target >= 5)")
        started = time.perf_counter()
        calibration = calibrate(model, data, mse, **{k: v for k, v in common.items() if k != "num_burnin_steps"}, num_burnin_steps=50)
        seconds = time.perf_counter() - started
        tried = sum(row["ran"] for row in calibration.table)
        print(f"  calibrate (default grid)   {seconds * 1e3:8.1f} ms   ({tried} estimates; {calibration.message[:60]}...)")


if __name__ == "__main__":
    main()
