"""A gradient smoke test for CI: copy this file next to your tests and put your own model and data in.

``check_gradients`` trains the model for 50 optimizer steps on CPU under a
strict GradGuard (every condition raises; a layer vanishing for 15 steps in a
row counts) and raises ``GradientHealthError`` if gradients vanish, explode or
turn NaN/Inf. The error message is the report: what was found, in which layer,
at which step, the numbers, the usual causes of that kind of problem, and the
layers' gradient norms (first / last / min / max; up to 24 rows, flagged layers
always among them; every layer's in ``err.report.layers``).

Run: ``pytest examples/ci_smoke_test -q``

The second test is a model built to vanish (20 Linear+Sigmoid layers), marked
``xfail(strict=True)``: it keeps passing as long as the guard catches it. To
read the report the guard writes for it: ``pytest examples/ci_smoke_test -q --runxfail``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradguard import GradientHealthError
from lightning_gradguard.testing import check_gradients


class Classifier(pl.LightningModule):
    """Stand-in for your model: ``depth`` hidden layers of ``activation``."""

    def __init__(self, depth: int = 2, hidden: int = 64, activation: type[nn.Module] = nn.ReLU, lr: float = 0.05):
        super().__init__()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), activation()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@pytest.fixture
def loader() -> DataLoader:
    """A few batches of real data (here: sklearn's digits, shipped with scikit-learn)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return DataLoader(TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)), batch_size=32)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)  # the same initial weights on every CI run


def test_gradients_are_healthy(loader):
    check_gradients(Classifier(), loader)


@pytest.mark.xfail(raises=GradientHealthError, strict=True, reason="built to vanish: 20 sigmoid layers")
def test_deep_sigmoid_stack_is_caught(loader):
    check_gradients(Classifier(depth=20, hidden=32, activation=nn.Sigmoid, lr=0.1), loader)
