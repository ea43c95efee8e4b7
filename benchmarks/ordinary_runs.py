"""Three ordinary CPU training runs, as a new user would write them: an MLP and a small CNN on scikit-learn's bundled
digits, and a 2-block attention model on a synthetic sequence task. Shared by the benchmarks that ask how the
monitor behaves with no arguments on runs nobody tuned it for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def digits(seed: int = 0) -> TensorDataset:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(labels))


class Classifier(pl.LightningModule):
    """Cross-entropy on whatever network it wraps; Adam."""

    def __init__(self, net: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Regressor(pl.LightningModule):
    """½ Σ (y − f)² over outputs, averaged over samples (a Gaussian NLL with unit noise variance); Adam by default."""

    def __init__(
        self, net: nn.Module, lr: float = 1e-3, optimizer: type[torch.optim.Optimizer] = torch.optim.Adam
    ) -> None:
        super().__init__()
        self.net, self.lr, self.optimizer = net, lr, optimizer

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = 0.5 * ((self.net(x) - y) ** 2).sum(-1).mean()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(self.parameters(), lr=self.lr)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, 1, 8, 8)))


class AttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            self.qkv(self.norm1(x)).reshape(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        )
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """A causal 2-block transformer with learned positions, predicting the next token at every position."""

    def __init__(self, vocab: int = 16, length: int = 16, width: int = 32, heads: int = 2, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.ModuleList(AttentionBlock(width, heads) for _ in range(blocks))
        self.unembed = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)


def sequences(num_samples: int = 4096, vocab: int = 16, length: int = 16, seed: int = 0) -> TensorDataset:
    """Token t+1 is the sum of tokens t and t-1 (mod vocab) after two random starting tokens: a task attention learns."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(num_samples, length + 1, dtype=torch.long)
    tokens[:, :2] = torch.randint(vocab, (num_samples, 2), generator=generator)
    noise = torch.rand(num_samples, length + 1, generator=generator) < 0.1
    random_tokens = torch.randint(vocab, (num_samples, length + 1), generator=generator)
    for t in range(2, length + 1):
        tokens[:, t] = torch.where(noise[:, t], random_tokens[:, t], (tokens[:, t - 1] + tokens[:, t - 2]) % vocab)
    return TensorDataset(tokens[:, :-1], tokens[:, 1:])


@dataclass(frozen=True)
class Run:
    name: str
    make_module: Callable[[], pl.LightningModule]
    make_data: Callable[[], TensorDataset]
    steps: int
    batch_size: int = 64

    def loader(self) -> DataLoader:
        return DataLoader(self.make_data(), batch_size=self.batch_size, shuffle=True)


RUNS = {
    "mlp": Run("MLP on digits", lambda: Classifier(mlp()), digits, steps=6000),
    "cnn": Run("CNN on digits", lambda: Classifier(SmallCNN()), digits, steps=4000),
    "attention": Run(
        "2-block attention on sequences", lambda: Classifier(TinyTransformer(), lr=3e-3), sequences, steps=1500
    ),
}
