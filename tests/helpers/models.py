"""Small models with known learning coefficients, and their data, for the ground-truth tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset


def gaussian_nll(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """½‖y − f(x)‖² summed over outputs, averaged over samples: the unit-variance Gaussian NLL up to a constant."""
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(dim=-1).mean()


def deep_linear_network(widths: list[int]) -> nn.Sequential:
    """Bias-free linear layers ``widths[0] -> ... -> widths[-1]``."""
    return nn.Sequential(*(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:])))


def set_to_rank(network: nn.Sequential, rank: int, generator: torch.Generator) -> None:
    """Put the network at a point whose product matrix has rank ``rank``: each layer Q_l [D 0; 0 0] Q_{l-1}ᵀ."""
    layers = list(network)
    widths = [layers[0].in_features] + [layer.out_features for layer in layers]
    bases = [torch.linalg.qr(torch.randn(h, h, generator=generator))[0] for h in widths]
    with torch.no_grad():
        for index, layer in enumerate(layers):
            core = torch.zeros(widths[index + 1], widths[index])
            core[range(rank), range(rank)] = 0.5 + torch.rand(rank, generator=generator)
            layer.weight.copy_(bases[index + 1] @ core @ bases[index].T)


def teacher_data(teacher: nn.Module, num_samples: int, generator: torch.Generator, noise: float = 1.0) -> TensorDataset:
    """x ~ N(0, I), y = teacher(x) + noise * N(0, I)."""
    in_features = next(teacher.parameters()).shape[1]
    x = torch.randn(num_samples, in_features, generator=generator)
    with torch.no_grad():
        y = teacher(x)
    return TensorDataset(x, y + noise * torch.randn(y.shape, generator=generator))


class Potential(nn.Module):
    """A bare parameter vector ``w``, for losses written directly as functions of it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))
