"""Speed and memory of estimate_llc against plain training and devinterp, as ratios within one run (not a test).

Models (``--model``): ``small`` (a 20-64-64-1 ReLU MLP, 1000 samples, batch 64: the CPU figures of the README),
``mlp`` (784-512-512-10, batch 256, 0.67M parameters), ``cnn`` (3 conv + 2 linear layers on 32x32x3, batch 128,
2.2M parameters) and ``gpt`` (4 layers, width 256, 4 heads, causal ``scaled_dot_product_attention``, batch 64 x 64
tokens, 3.4M parameters). For each chain count, ``--draws`` draws without burn-in at a fixed step:

- vmap and sequential: ``estimate_llc`` with ``vectorize=True`` / ``False`` (best of ``--repeats`` after a first
  call, whose cost is reported separately);
- training: the same number of chain steps as plain training steps (forward, backward, SGD) on one chain's batch;
- devinterp: ``devinterp.slt.llc.llc`` on the same work, when devinterp is installed;
- compiled: ``compile=True`` (first call separately);
- grouped: the same estimate with two ``param_groups`` (three times the chains, in one pass), against the plain one;
- peak memory beyond the model and data (CUDA: the allocator's peak; CPU: the peak of live allocations, from the
  profiler), as a multiple of chains x parameters x 4 bytes (the target: 4, activations on top).

    python benchmarks/bench_llc.py [--model small|mlp|cnn|gpt] [--device cuda] [--chains 8 32] [--draws 100]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import TensorDataset

from lightning_devinterp import estimate_llc

MODELS = ("small", "mlp", "cnn", "gpt")


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        )
        x = x + self.out(
            F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, length, width)
        )
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 512, length: int = 64, width: int = 256, heads: int = 4, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.unembed = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def problem(name: str, device: torch.device) -> tuple[nn.Module, TensorDataset, Callable, int, dict[str, str]]:
    """The model, its data (on ``device``), its loss, the batch size and two parameter groups."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "small":
        x = torch.randn(1000, 20, generator=generator)
        data = TensorDataset(x, torch.sin(x[:, :1]) + 0.1 * torch.randn(1000, 1, generator=generator))
        model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        loss, batch, groups = _regression, 64, {"first": "0", "rest": ["2", "4"]}
    elif name == "mlp":
        data = TensorDataset(
            torch.randn(8192, 784, generator=generator), torch.randint(10, (8192,), generator=generator)
        )
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        loss, batch, groups = _classification, 256, {"first": "0", "rest": ["2", "4"]}
    elif name == "cnn":
        data = TensorDataset(
            torch.randn(4096, 3, 32, 32, generator=generator), torch.randint(10, (4096,), generator=generator)
        )
        model = nn.Sequential(
            nn.Conv2d(3, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(128 * 16, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )
        loss, batch, groups = _classification, 128, {"convolutions": ["0", "3", "6"], "head": ["10", "12"]}
    else:
        tokens = torch.randint(512, (2048, 65), generator=generator)
        data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
        model = GPT()
        loss, batch, groups = (
            _classification,
            64,
            {"attention": ["blocks.*.qkv", "blocks.*.out"], "mlp": "blocks.*.mlp"},
        )
    return model.to(device), TensorDataset(*(t.to(device) for t in data.tensors)), loss, batch, groups


def _regression(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(-1).mean()


def _classification(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
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


def train_steps(model: nn.Module, data: TensorDataset, loss: Callable, batch: int, steps: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    generator = torch.Generator(device=data.tensors[0].device).manual_seed(0)
    for _ in range(steps):
        index = torch.randint(len(data), (batch,), generator=generator, device=data.tensors[0].device)
        value = loss(model, tuple(t[index] for t in data.tensors))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()


def devinterp_llc(
    model: nn.Module, data: TensorDataset, batch: int, chains: int, draws: int
) -> Callable[[], object] | None:
    """Devinterp 2.0.1's ``llc()`` on the same work, or None when it is not installed. devinterp reads a HuggingFace
    dataset of ``input_ids`` rows and wants a per-token loss of shape (batch, columns - 1): each sample's inputs and
    targets are flattened into one float row, and each sample's loss fills its row.
    """
    try:
        from datasets import Dataset as HFDataset
        from devinterp.slt.llc import llc
    except ImportError:
        return None
    x, y = (t.cpu() for t in data.tensors)
    width = x[0].numel()
    rows = HFDataset.from_dict(
        {"input_ids": torch.cat([x.reshape(len(x), -1).float(), y.reshape(len(y), -1).float()], dim=1).tolist()}
    )

    def per_sample_loss(network: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        inputs = input_ids[:, :width].reshape(-1, *x.shape[1:]).to(x.dtype)
        targets = input_ids[:, width:].reshape(-1, *y.shape[1:]).to(y.dtype)
        output = network(inputs)
        if targets.is_floating_point():
            loss = 0.5 * ((output - targets) ** 2).sum(-1)
        else:
            loss = (
                F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1), reduction="none")
                .reshape(len(targets), -1)
                .mean(-1)
            )
        return loss[:, None].expand(-1, input_ids.shape[1] - 1)

    def run() -> object:
        return llc(
            model,
            rows.with_format("torch"),
            {},
            lr=1e-6,
            n_beta=len(x) / 6.9,
            loss_fn=per_sample_loss,
            num_chains=chains,
            num_draws=draws,
            batch_size=batch,
            localization=100.0,
            device=str(next(model.parameters()).device),
        )

    return run


def peak_memory(run: Callable[[], object], device: torch.device) -> float:
    """Peak memory that ``run`` allocates beyond what was live before it, in bytes: the CUDA allocator's peak, or on
    CPU the peak of live bytes replayed from the profiler's allocation events (resident memory would count what the
    allocator keeps cached).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        run()
    live = peak = 0
    for _, nbytes in sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    ):
        live += nbytes
        peak = max(peak, live)
    return float(peak)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=MODELS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chains", type=int, nargs="+", default=[4])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step (its first call compiles)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, data, loss, batch, groups = problem(args.model, device)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"model={args.model} ({parameters / 1e6:.2f}M parameters, batch {batch}) device={device} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    for chains in args.chains:
        estimate = functools.partial(
            estimate_llc, model, data, loss, batch_size=batch, num_chains=chains, num_draws=args.draws,
            num_burnin_steps=0, epsilon=1e-6, seed=0,
        )  # fmt: skip
        first, vmapped = timed(functools.partial(estimate, vectorize=True), args.repeats, device)
        _, looped = timed(functools.partial(estimate, vectorize=False), args.repeats, device)
        training_run = functools.partial(train_steps, model, data, loss, batch, chains * args.draws)
        _, training = timed(training_run, args.repeats, device)
        _, grouped = timed(functools.partial(estimate, vectorize=True, param_groups=groups), args.repeats, device)
        print(f"\n{chains} chains x {args.draws} draws ({chains * args.draws} chain steps)")
        print(f"  vmap                       {vmapped:8.3f} s   (first call {first:.3f} s)")
        print(f"  sequential                 {looped:8.3f} s   vmap is {looped / vmapped:.2f}x faster")
        print(
            f"  as many training steps     {training:8.3f} s   vmap step costs {vmapped / training:.2f}x a training step"
        )
        print(
            f"  two param_groups (3x the chains, one pass) {grouped:8.3f} s = {grouped / vmapped:.2f}x the plain estimate"
        )
        if not args.no_compile:
            compile_first, compiled = timed(
                functools.partial(estimate, vectorize=True, compile=True), args.repeats, device
            )
            print(
                f"  compiled                   {compiled:8.3f} s   (first call, compiling: {compile_first:.1f} s) = {compiled / vmapped:.2f}x vmap"
            )
        reference = devinterp_llc(model, data, batch, chains, args.draws)
        if reference is not None:
            _, devinterp = timed(reference, 1, device)
            print(f"  devinterp llc()            {devinterp:8.3f} s   vmap is {devinterp / vmapped:.1f}x faster")
        memory = peak_memory(functools.partial(estimate, vectorize=True), device)
        print(
            f"  peak memory (vmap)         {memory / 2**20:8.1f} MiB = {memory / (chains * parameters * 4):.1f} x chains x parameters x 4 B, activations included"
        )


if __name__ == "__main__":
    main()
