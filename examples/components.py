"""Per-component λ̂: which part of a small transformer takes on structure while it learns, logged live.

A one-block causal transformer (token and position embeddings, 2-head attention with a fused qkv projection, an MLP,
an unembedding; 15k parameters) learns a sequence rule: after two random tokens, each token is the sum of the
previous two modulo 16 (10% of tokens are replaced by noise). Attention has to find the two previous positions and
the MLP has to add their tokens. Adam, learning rate 1e-3, batch 64, 4096 generated sequences of 16 tokens.

``LLCMonitor(param_groups=...)`` measures, at every estimate and in the same vectorized pass as the full model, the
restricted λ̂ of each component (its parameters sampled, the rest frozen at w*): ``embed`` (tokens and positions),
``attn`` (qkv and output projections), ``mlp``, ``unembed``, and each attention head (its rows of q, k, v and its
columns of the output projection, built by ``head_groups``). They go to TensorBoard as ``llc/<group>/mean`` and
``llc/<group>/std``, charted together under "LLC by component", and to ``trainer.callback_metrics``, so that a
``TransitionMonitor(monitor="llc/attn/mean")`` watches the attention's own series.

Where each component looks: with a probe of held-out sequences and a per-token loss, every estimate also gives each
component's susceptibility χ to every probe token, from the same draws. Tokens are labelled by role: ``rule`` (the
sum of the two before it), ``noise`` (a replaced token, which nothing can predict) and ``start`` (the first target,
with one token before it). The monitor logs ``susceptibility/<group>/<role>`` and a heatmap of components × roles;
the script also draws χ per component and role over training.

What to expect (1000 steps, an estimate every 100 steps with 4 chains of 100 draws per group; under two minutes on a
laptop CPU, almost all of it sampling):

- the loss falls without a plateau, so no loss-drop onset is reported;
- attention's λ̂ climbs and then levels off while both heads move their weight onto the previous token; the MLP's
  follows a similar path; the unembedding's rises first and falls back as attention and MLP take over; the
  embeddings' grows slowly;
- the ``TransitionMonitor`` on ``llc/attn/mean`` reports the end of attention's climb (evidence "λ̂ change");
- the step-0 estimate is unhealthy (w* is the random initialisation, not a minimum) and is marked so;
- while the heads turn to the previous tokens, attention's susceptibility to ``noise`` and ``start`` tokens (those
  the rule cannot predict) rises well above its susceptibility to ``rule`` tokens, which stays near zero; the full
  model's follows, and settles later.

Outputs: TensorBoard logs under ``--log-dir``, ``<log dir>/components.png`` and ``<log dir>/susceptibility.png``
(need matplotlib: the ``[examples]`` extra; ``docs/components.png`` and ``docs/susceptibility.png`` are these
pictures, docs/benchmarks.md the measured levels) and tables of estimates on stdout.

    python examples/components.py [--steps 1500] [--every 100] [--log-dir runs] [--smoke]
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_devinterp import LLCMonitor, TransitionMonitor, TransitionWarning
from lightning_devinterp.plotting import plot_runs, plot_susceptibility_history, read_runs
from lightning_devinterp.sampling.params import head_groups

VOCAB, LENGTH, WIDTH, HEADS = 16, 16, 32, 2


def sum_sequences(num_samples: int = 4096, noise: float = 0.1, seed: int = 0) -> TensorDataset:
    """Inputs and next-token targets: after two random tokens, token t is tokens t-1 + t-2 (mod VOCAB), or noise."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(VOCAB, (num_samples, LENGTH + 1), generator=generator)
    keep = torch.rand(num_samples, LENGTH + 1, generator=generator) >= noise
    for t in range(2, LENGTH + 1):
        tokens[:, t] = torch.where(keep[:, t], (tokens[:, t - 1] + tokens[:, t - 2]) % VOCAB, tokens[:, t])
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, WIDTH))


class SequenceModel(pl.LightningModule):
    """Embeddings, one pre-norm attention + MLP block, an unembedding; next-token cross-entropy at every position."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.position = nn.Parameter(0.02 * torch.randn(LENGTH, WIDTH))
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.unembed = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[-1]]
        x = x + self.attn(self.norm1(x))
        return self.unembed(x + self.mlp(self.norm2(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).reshape(-1, VOCAB), targets.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@torch.no_grad()
def attention_by_offset(model: SequenceModel, tokens: torch.Tensor, offsets: int = 3) -> torch.Tensor:
    """Mean attention weight of each head on the tokens 0, 1, ... ``offsets - 1`` positions back, over the queries
    that have two tokens before them: ``[heads, offsets]``.
    """
    batch, length = tokens.shape
    x = model.norm1(model.embed(tokens) + model.position[:length])
    q, k, _ = model.attn.qkv(x).reshape(batch, length, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2)) / (WIDTH // HEADS) ** 0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [batch, heads, query, key]
    return torch.stack(
        [weights.diagonal(-offset, dim1=-2, dim2=-1)[..., 2:].mean((0, -1)) for offset in range(offsets)], dim=1
    )


class AttentionRecord(pl.Callback):
    """Each head's attention on the tokens 1 and 2 positions back, at step 0 and every ``every`` steps (read only)."""

    def __init__(self, tokens: torch.Tensor, every: int) -> None:
        self.tokens, self.every = tokens, every
        self.by_step: dict[int, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.by_step[trainer.global_step] = attention_by_offset(pl_module, self.tokens)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        if trainer.global_step % self.every == 0:
            self.by_step[trainer.global_step] = attention_by_offset(pl_module, self.tokens)


def per_token_loss(model: SequenceModel, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every target token, ``[batch, tokens]``: the probe's loss, on the training loss's scale."""
    tokens, targets = batch
    return F.cross_entropy(model(tokens).transpose(1, 2), targets, reduction="none")


def token_roles(data: TensorDataset) -> list[list[str]]:
    """Each target token's role: ``start`` (the first), ``rule`` (the sum of the two before it) or ``noise``."""
    tokens, targets = data.tensors
    follows = torch.zeros_like(targets, dtype=torch.bool)
    follows[:, 1:] = targets[:, 1:] == (tokens[:, 1:] + tokens[:, :-1]) % VOCAB
    return [
        ["start" if position == 0 else "rule" if rule else "noise" for position, rule in enumerate(row)]
        for row in follows.tolist()
    ]


def component_groups(model: SequenceModel) -> dict:
    """The four components by name pattern, and each attention head by element masks."""
    return {
        "embed": ["embed", "position"],
        "attn": "attn",
        "mlp": "mlp",
        "unembed": "unembed",
        **{
            name.replace("attn.qkv.", ""): masks
            for name, masks in head_groups(model, "attn.qkv", HEADS, out="attn.out").items()
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100, help="estimate λ̂ every this many steps")
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--smoke", action="store_true", help="a few steps only, to check that everything runs")
    args = parser.parse_args()
    chains, draws = 4, 100
    if args.smoke:
        args.steps, args.every, chains, draws = 20, 10, 2, 10
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.simplefilter("always", TransitionWarning)

    pl.seed_everything(0)
    model = SequenceModel()
    probe = sum_sequences(32, seed=2)
    monitor = LLCMonitor(
        every_n_steps=args.every, num_chains=chains, num_draws=draws, param_groups=component_groups(model),
        probe=probe, per_sample_loss_fn=per_token_loss, probe_labels=token_roles(probe), probe_every=2,
    )  # fmt: skip
    watcher = TransitionMonitor(monitor="llc/attn/mean")
    attention = AttentionRecord(sum_sequences(256, seed=1).tensors[0], args.every)
    logger = TensorBoardLogger(args.log_dir, name="components")
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[monitor, watcher, attention],
        logger=logger,
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(model, DataLoader(sum_sequences(), batch_size=64, shuffle=True))

    groups = list(monitor.history[-1].result.groups)
    print("\nλ̂ of the full model and of each component; each head's attention on the tokens 1 and 2 positions back")
    print(
        f"{'step':>6} {'full':>7} "
        + " ".join(f"{name:>7}" for name in groups)
        + "".join(f" {f'head{h} t-1/t-2':>16}" for h in range(HEADS))
    )
    for estimate in monitor.history:
        parts = " ".join(f"{estimate.result.groups[name].llc_mean:>7.1f}" for name in groups)
        weights = attention.by_step.get(estimate.step)
        looks = "".join(f" {f'{w[1]:.2f}/{w[2]:.2f}':>16}" for w in weights.tolist()) if weights is not None else ""
        print(f"{estimate.step:>6} {estimate.llc_mean:>7.1f} {parts}{looks}{'' if estimate.healthy else '  unhealthy'}")
    roles = list(monitor.history[-1].result.susceptibility_summary()["all"])
    print("\nsusceptibility χ per component and token role (last estimate)")
    print(f"{'group':>8} " + " ".join(f"{role:>9}" for role in roles))
    for group, row in monitor.history[-1].result.susceptibility_summary().items():
        print(f"{group:>8} " + " ".join(f"{row[role]:>9.3g}" for role in roles))
    print(f"\n{len(monitor.transitions) + len(watcher.transitions)} transition(s) reported:")
    for transition in monitor.transitions + watcher.transitions:
        print("  " + transition.describe())
    try:
        print(f"\nplot: {plot_runs(read_runs(Path(logger.log_dir)), Path(logger.log_dir) / 'components.png')}")
        history = [(r.step, r.result.susceptibility_summary()) for r in monitor.history if r.step > 0]
        print(f"plot: {plot_susceptibility_history(history, Path(logger.log_dir) / 'susceptibility.png')}")
    except (ImportError, ValueError) as error:
        print(f"\nno plot: {error}")
    print(f"TensorBoard logs: {logger.log_dir}")


if __name__ == "__main__":
    main()
