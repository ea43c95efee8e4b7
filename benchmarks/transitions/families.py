"""The runs of the transitions benchmark, generated from seeds: each seed picks its own settings.

Families with staged learning (each loss drop after a plateau is a transition):
- ``dln``: deep linear networks from small initialisation learn a teacher's singular modes one at a time (depth
  2-4, widths 6-10, teacher ranks 2-4, init scales and learning rates drawn per seed; some learn their first mode
  within the first 10% of training);
- ``tms``: toy models of superposition, 5-8 sparse features through 2 hidden dimensions (densities, learning
  rates drawn per seed), which pass through k-gon configurations;
- ``parity``: an MLP learning a 3-sparse parity of 30 bits (Barak et al. 2022): a long plateau at the loss of
  chance, then a sudden drop once the relevant coordinates are found. Chosen as the third family because its
  staged behaviour is well documented, it fits a CPU in seconds, and its drop is gentler than the other two.
- ``stairs``: a staircase: two-layer linear networks from a very small initialisation learn a rank-3 or rank-4
  teacher mode by mode, each stage slower than the one before, with the pause before each next stage drawn from
  80 to 400 steps in gradient flow (the teacher's singular values are solved for it; measured between 10% and 90%
  learnt, the pauses of the recorded runs range from 20 to 650 steps, median 285); half the seeds are watched under
  an explicit schedule (``every_n_steps`` from 50 to 200), the others under the default.
- ``tms-stairs``: a staircase of toy models of superposition: 5-8 sparse features through 3 or 4 hidden
  dimensions, with importances and initial column norms solved so that the most important features would be learnt
  one at a time, each starting a pause drawn from 80 to 400 steps after the previous one is learnt (from the logistic
  growth of a lone feature's column), at rates drawn so that fast and slow stages mix; the remaining features are
  too unimportant to be learnt alone, and some runs represent them in superposition later. Interactions between
  features shift the stages, so the recorded pauses differ from the drawn ones. As for ``stairs``, half the seeds
  are watched under an explicit schedule.

The linear families and ``tms-stairs`` record each stage's part of the loss (a teacher mode's, a feature's), and
their ground truth takes each stage from it (:func:`~benchmarks.transitions.ground_truth.stages`): a pause shorter
than the ground-truth rule's 100-step plateau would otherwise merge two stages into one episode.

Controls, where every report is a false alarm:
- ``linear``: linear regression from its default initialisation (a regular model: the loss decays smoothly);
- ``finetune``: a converged deep linear network fine-tuned with a small learning rate;
- ``digits``: an ordinary MLP classifier on scikit-learn's digits with Adam;
- ``noisy``: linear regression at its least-squares solution with heavy label noise and batch 8 (a minibatch
  loss that only jitters).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

FAMILIES = ("dln", "tms", "parity", "stairs", "tms-stairs")
CONTROLS = ("linear", "finetune", "digits", "noisy")


def gaussian_nll(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((prediction - target) ** 2).sum(-1).mean()


class Trainee(pl.LightningModule):
    """A network, its loss on a batch, and plain SGD or Adam."""

    def __init__(
        self, net: nn.Module, loss: Callable[[nn.Module, tuple], torch.Tensor], lr: float, adam: bool = False
    ) -> None:
        super().__init__()
        self.net, self.loss, self.lr, self.adam = net, loss, lr, adam

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = self.loss(self.net, batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return (torch.optim.Adam if self.adam else torch.optim.SGD)(self.parameters(), lr=self.lr)


@dataclass(frozen=True)
class Spec:
    """One benchmark run: its family, a name that states its settings, its seed and how to build it."""

    family: str
    name: str
    seed: int
    steps: int
    batch_size: int
    build: Callable[[], tuple[Trainee, TensorDataset]]
    every_n_steps: int | None = None
    """An explicit schedule for the monitor (no denser estimates around transitions); None: the default's."""
    stage_losses: Callable[[nn.Module], list[float]] | None = None
    """Each stage's own part of the full-set loss (its ground truth), where the family knows them."""

    @property
    def key(self) -> str:
        return f"{self.family}-seed{self.seed}"


def _regression_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return gaussian_nll(net(x), y)


def _classification_loss(net: nn.Module, batch: tuple) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(net(x), y)


def _dln(seed: int) -> Spec:
    rng = random.Random(seed)
    depth, width, rank = rng.choice([2, 3, 4]), rng.choice([6, 8, 10]), rng.choice([2, 3, 4])
    init = rng.choice({2: [1e-2, 1e-3, 1e-4], 3: [0.03, 0.06], 4: [0.12, 0.2]}[depth])
    lr = rng.choice([2e-3, 3e-3, 5e-3])
    singular = [4.0 / 2**k for k in range(rank)]
    steps = 4000
    generator = torch.Generator().manual_seed(seed)
    left, teacher = _teacher(generator, width, singular)
    after_teacher = generator.get_state()  # the data are drawn next, from the same stream

    def build() -> tuple[Trainee, TensorDataset]:
        generator = torch.Generator().set_state(after_teacher)
        x = torch.randn(2000, width, generator=generator)
        data = TensorDataset(x, x @ teacher.T + 0.1 * torch.randn(2000, width, generator=generator))
        torch.manual_seed(seed)
        net = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(depth)))
        with torch.no_grad():
            for layer in net:
                layer.weight.normal_(0.0, init)
        return Trainee(net, _regression_loss, lr), data

    name = f"depth {depth}, width {width}, rank {rank}, init {init:g}, lr {lr:g}"
    return Spec("dln", name, seed, steps, 100, build, stage_losses=_mode_losses(left, teacher, rank))


def _teacher(generator: torch.Generator, width: int, singular: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A random teacher map with these singular values, and its left singular vectors (as columns)."""
    left = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    rank = len(singular)
    return left, left[:, :rank] @ torch.diag(torch.tensor(singular)) @ right[:, :rank].T


def _mode_losses(left: torch.Tensor, teacher: torch.Tensor, rank: int) -> Callable[[nn.Module], list[float]]:
    """½|u_k^T (teacher - network)|² for each teacher mode k: its part of the loss on whitened inputs (a linear
    network's stages are its modes).
    """

    def stage_losses(net: nn.Module) -> list[float]:
        product = functools.reduce(lambda total, layer: layer.weight @ total, net, torch.eye(teacher.shape[1]))
        residual = teacher - product
        return [float(0.5 * (left[:, k] @ residual).pow(2).sum()) for k in range(rank)]

    return stage_losses


STAIR_PLATEAUS = (80, 400)
"""The range the plateaus between a staircase's stages are drawn from (steps)."""


def _mode_times(singular: float, start: float, lr: float) -> tuple[float, float]:
    """When a two-layer linear network's mode of strength ``singular``, from ``start``, is 10% and 90% learnt (full
    batch gradient flow on whitened inputs: u(t) = s / (1 + (s/u0 - 1) exp(-2 lr s t))).
    """
    half = math.log(singular / start - 1) / (2 * lr * singular)
    spread = math.log(9) / (2 * lr * singular)
    return half - spread, half + spread


def _staircase_singular_values(rng: random.Random, first: float, rank: int, start: float, lr: float) -> list[float]:
    """Singular values from ``first`` down, each solved (by bisection) so that its mode starts a plateau drawn from
    :data:`STAIR_PLATEAUS` after the previous mode has finished.
    """
    singular = [first]
    for _ in range(rank - 1):
        plateau = rng.uniform(*STAIR_PLATEAUS)
        previous_end = _mode_times(singular[-1], start, lr)[1]
        low, high = 1e-3, singular[-1]
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if _mode_times(middle, start, lr)[0] - previous_end > plateau else (low, middle)
        singular.append((low + high) / 2)
    return singular


def _schedule(rng: random.Random, seed: int) -> tuple[int | None, str]:
    """How a staircase run is watched: every 50-200 steps (drawn from ``rng``) for half the seeds, else the default
    schedule (None, without a draw); and its description for the run's name.
    """
    every = rng.choice([50, 100, 150, 200]) if seed % 4 >= 2 else None
    return every, f"every {every} steps" if every else "default schedule"


def _stairs(seed: int) -> Spec:
    rng = random.Random(seed)
    width, rank = rng.choice([6, 8]), rng.choice([3, 4])
    lr, init = rng.choice([0.004, 0.006]), rng.choice([1e-4, 3e-4, 1e-3])
    singular = _staircase_singular_values(rng, rng.uniform(2.5, 4.0), rank, init**2 * math.sqrt(width), lr)
    every, schedule = _schedule(rng, seed)
    steps = int(_mode_times(singular[-1], init**2 * math.sqrt(width), lr)[1] * 1.15) + 300
    left, teacher = _teacher(torch.Generator().manual_seed(seed), width, singular)

    def build() -> tuple[Trainee, TensorDataset]:
        generator = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2000, width, generator=generator)
        data = TensorDataset(x, x @ teacher.T + 0.1 * torch.randn(2000, width, generator=generator))
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(width, width, bias=False), nn.Linear(width, width, bias=False))
        with torch.no_grad():
            for layer in net:
                layer.weight.normal_(0.0, init)
        return Trainee(net, _regression_loss, lr), data

    name = f"width {width}, singular values {', '.join(f'{v:.2f}' for v in singular)}, init {init:g}, lr {lr:g}, {schedule}"
    return Spec(
        "stairs", name, seed, steps, 100, build, every_n_steps=every, stage_losses=_mode_losses(left, teacher, rank)
    )


class ToyModel(nn.Module):
    """f(x) = ReLU(WᵀWx + b); W is 2 x features at scale 0.01, or ``hidden`` x features with these column norms."""

    def __init__(
        self, features: int, generator: torch.Generator, hidden: int = 2, column_norms: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        weight = torch.randn(hidden, features, generator=generator)
        if column_norms is None:
            weight = 0.01 * weight
        else:
            weight = weight / weight.norm(dim=0) * column_norms
        self.W = nn.Parameter(weight)
        self.b = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)


def _tms(seed: int) -> Spec:
    rng = random.Random(seed)
    features, density, lr = rng.choice([5, 6, 7, 8]), rng.choice([0.03, 0.05, 0.08]), rng.choice([0.2, 0.3, 0.5])

    def build() -> tuple[Trainee, TensorDataset]:
        generator = torch.Generator().manual_seed(seed)
        values = torch.rand(1024, features, generator=generator)
        x = values * (torch.rand(1024, features, generator=generator) < density)
        return Trainee(
            ToyModel(features, generator), lambda net, batch: gaussian_nll(net(batch[0]), batch[0]), lr
        ), TensorDataset(x)

    return Spec("tms", f"{features} features, density {density:g}, lr {lr:g}", seed, 3000, 128, build)


def _feature_times(rate: float, start: float, share: float) -> float:
    """When a toy model of superposition's feature, alone, is ``share`` learnt: with small weights the squared norm a
    of its column grows logistically, a(t) = 1 / (1 + (1/a0 - 1) exp(-rate t)) from ``start`` = a0, at
    rate = 4 lr importance E[x²] (plain SGD on ½ importance (a x - x)²), and 1 - a is the residual amplitude.
    """
    return math.log((1 / start - 1) / (1 / share - 1)) / rate


def _tms_stairs(seed: int) -> Spec:
    rng = random.Random(seed)
    hidden, unlearnt = rng.choice([3, 4]), rng.choice([2, 3, 4])
    density, lr = rng.choice([0.05, 0.1]), rng.choice([0.1, 0.2])
    rates = [rng.uniform(0.02, 0.04)]
    for _ in range(hidden - 1):
        rates.append(rates[-1] * rng.uniform(0.4, 1.5))
    starts = [rng.choice([1e-4, 1e-5])]
    end = _feature_times(rates[0], starts[0], 0.9)
    for rate in rates[1:]:
        begin = end + rng.uniform(*STAIR_PLATEAUS)
        starts.append(1 / (9 * math.exp(rate * begin) + 1))
        end = _feature_times(rate, starts[-1], 0.9)
    every, schedule = _schedule(rng, seed)
    per_rate = 1 / (4 * lr * density / 3)
    importance = torch.tensor([rate * per_rate for rate in rates] + [0.3 * min(rates) * per_rate] * unlearnt)
    norms = torch.tensor(starts + [starts[0]] * unlearnt).sqrt()
    features = hidden + unlearnt
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(4096, features, generator=generator) * (torch.rand(4096, features, generator=generator) < density)
    weight = importance.sqrt()

    def build() -> tuple[Trainee, TensorDataset]:
        model = ToyModel(features, torch.Generator().manual_seed(seed + 1), hidden, norms)
        return Trainee(model, lambda net, batch: gaussian_nll(weight * net(batch[0]), weight * batch[0]), lr), (
            TensorDataset(x)
        )

    def stage_losses(net: nn.Module) -> list[float]:
        return (0.5 * importance * (net(x) - x).pow(2).mean(0)).tolist()

    name = (
        f"{features} features into {hidden}, rates {', '.join(f'{r:.3f}' for r in rates)}, "
        f"density {density:g}, lr {lr:g}, {schedule}"
    )
    return Spec(
        "tms-stairs", name, seed, int(end * 1.3) + 300, 128, build, every_n_steps=every, stage_losses=stage_losses
    )


def _parity(seed: int) -> Spec:
    rng = random.Random(seed)
    bits, lr = rng.choice([28, 30, 32]), rng.choice([0.05, 0.08])

    def build() -> tuple[Trainee, TensorDataset]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 2, (4000, bits), generator=generator).float() * 2 - 1
        y = (x[:, :3].prod(1) > 0).long()
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(bits, 128), nn.ReLU(), nn.Linear(128, 2))
        return Trainee(net, _classification_loss, lr), TensorDataset(x, y)

    return Spec("parity", f"{bits} bits, lr {lr:g}", seed, 5000, 64, build)


def _linear(seed: int) -> Spec:
    def build() -> tuple[Trainee, TensorDataset]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2000, 10, generator=generator)
        data = TensorDataset(
            x, x @ torch.randn(10, 3, generator=generator) + 0.5 * torch.randn(2000, 3, generator=generator)
        )
        torch.manual_seed(seed)
        return Trainee(nn.Linear(10, 3), _regression_loss, 0.01), data

    return Spec("linear", "linear regression from init, SGD 0.01", seed, 2000, 32, build)


def _finetune(seed: int) -> Spec:
    def build() -> tuple[Trainee, TensorDataset]:
        trainee, data = _dln(seed).build()
        x, y = data.tensors
        optimizer = torch.optim.SGD(trainee.net.parameters(), lr=0.01)
        for layer in trainee.net:
            nn.init.orthogonal_(layer.weight, gain=0.5)
        for _ in range(3000):
            optimizer.zero_grad()
            gaussian_nll(trainee.net(x), y).backward()
            optimizer.step()
        trainee.lr = 1e-4
        return trainee, data

    return Spec("finetune", "converged deep linear network, SGD 1e-4", seed, 2000, 100, build)


def _digits(seed: int) -> Spec:
    def build() -> tuple[Trainee, TensorDataset]:
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        return Trainee(net, _classification_loss, 1e-3, adam=True), TensorDataset(
            torch.tensor(images, dtype=torch.float32) / 16, torch.tensor(labels)
        )

    return Spec("digits", "MLP on digits, Adam 1e-3", seed, 3000, 64, build)


def _noisy(seed: int) -> Spec:
    def build() -> tuple[Trainee, TensorDataset]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(2000, 5, generator=generator)
        y = x @ torch.randn(5, 2, generator=generator) + 3.0 * torch.randn(2000, 2, generator=generator)
        torch.manual_seed(seed)
        linear = nn.Linear(5, 2)
        design = torch.cat([x, torch.ones(2000, 1)], dim=1)
        solution = torch.linalg.lstsq(design, y).solution
        with torch.no_grad():
            linear.weight.copy_(solution[:-1].T)
            linear.bias.copy_(solution[-1])
        return Trainee(linear, _regression_loss, 1e-3), TensorDataset(x, y)

    return Spec("noisy", "least-squares fit, label noise 3, batch 8", seed, 2000, 8, build)


BUILDERS: dict[str, Callable[[int], Spec]] = {
    "dln": _dln,
    "tms": _tms,
    "parity": _parity,
    "stairs": _stairs,
    "tms-stairs": _tms_stairs,
    "linear": _linear,
    "finetune": _finetune,
    "digits": _digits,
    "noisy": _noisy,
}


def specs(families: list[str], seeds: range) -> list[Spec]:
    return [BUILDERS[family](seed) for family in families for seed in seeds]


FRESH_SEEDS = range(12, 24)
"""Seeds first recorded after the first round of defaults was fixed, and scored only in aggregate, once before and
once after the second round: a held-out set nobody looked into run by run."""


LATEST_SEEDS = range(36, 48)
"""Seeds recorded before the third round of defaults (the fixed-data loss) and scored only in aggregate, after it."""


STAIRCASE_SEEDS = range(48, 60)
"""Seeds of the staged families recorded after the staircase round of defaults (the dip that closes a stage, the
pause relative to the ended fall) was fixed, and scored only in aggregate, after it."""


READINGS_SEEDS = range(60, 72)
"""Seeds of the staircase families recorded after the monitor began reading L(w*) between estimates, and scored
only in aggregate, after it."""


SPIKES_SEEDS = range(72, 96)
"""Seeds recorded after the loss rule stopped taking a loss's recovery from a spike for a fall (the digits control
for all 24; the other families for the first 12), and scored only in aggregate, after it."""


def split(seed: int) -> str:
    """Which part of the benchmark a seed belongs to. Defaults are tuned on the even seeds below 12 and on seeds 24
    to 35 (recorded for a second round of tuning); the odd seeds below 12, the :data:`FRESH_SEEDS`, the
    :data:`LATEST_SEEDS`, the :data:`STAIRCASE_SEEDS`, the :data:`READINGS_SEEDS` and the :data:`SPIKES_SEEDS` are
    held out.
    """
    if seed in FRESH_SEEDS:
        return "fresh"
    if seed in LATEST_SEEDS:
        return "latest"
    if seed in STAIRCASE_SEEDS:
        return "staircase"
    if seed in READINGS_SEEDS:
        return "readings"
    if seed in SPIKES_SEEDS:
        return "spikes"
    if seed >= FRESH_SEEDS.stop:
        return "tuning"
    return "held-out" if seed % 2 else "tuning"
