"""Tiny real models and data for the tests (sklearn's digits ship with scikit-learn: no download)."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@functools.lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def digits_loader(batch_size: int = 32, n: int | None = 512, shuffle: bool = False) -> DataLoader:
    x, y = digits()
    if n is not None:
        x, y = x[:n], y[:n]
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class DigitsMLP(pl.LightningModule):
    """A small classifier on load_digits; subclasses inject faults at known steps."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        layers.append(nn.Linear(width, 10))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def trainer(**kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=20,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class NormRecorder(pl.Callback):
    """Independent reference: global and per-module norms with torch.linalg, per step."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.layers: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        step = trainer.global_step
        self.total[step] = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads])).item()
        per = {}
        for name, module in pl_module.named_modules():
            own = [p.grad.flatten().double() for p in module.parameters(recurse=False) if p.grad is not None]
            if own:
                per[name] = torch.linalg.vector_norm(torch.cat(own)).item()
        self.layers[step] = per


class FaultyMLP(DigitsMLP):
    """DigitsMLP with faults at known global steps.

    ``faults`` maps a step to ``"inf"`` (an Inf in one input), ``"spike"``
    (inputs x 1e3), ``"nan_layer"`` (a NaN planted in ``net.2``'s weight gradient).
    """

    def __init__(self, faults: dict[int, str], optimizer: str = "adam", **kwargs) -> None:
        super().__init__(**kwargs)
        self.faults = dict(faults)
        self.optimizer_name = optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        fault = self.faults.get(self.global_step)
        if fault == "inf":
            x = x.clone()
            x[0, 3] = float("inf")
        elif fault == "spike":
            x = x * 1e3
        loss = nn.functional.cross_entropy(self(x), y)
        return loss

    def on_after_backward(self):
        if self.faults.get(self.global_step) == "nan_layer":
            self.net[2].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return super().configure_optimizers()


class TwoOptimizers(DigitsMLP):
    """GAN-style manual optimization: two parts, two optimizers (Adam on ``net``, Adam on ``b``, a probe trained
    on ``net``'s detached outputs); NaN planted in ``b``'s gradient at the batches in ``nan_at`` (one or several).
    ``seen``: ``net.0.weight`` before each batch."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.automatic_optimization = False
        self.b = nn.Linear(10, 10)
        self.nan_at = {nan_at} if isinstance(nan_at, int) else set(nan_at or ())
        self.batches = 0
        self.seen: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen[self.batches] = self.net[0].weight.detach().clone()
        opt_a, opt_b = self.optimizers()
        loss_a = nn.functional.cross_entropy(self.net(x), y)
        opt_a.zero_grad()
        self.manual_backward(loss_a)
        opt_a.step()
        loss_b = nn.functional.cross_entropy(self.b(self.net(x).detach()), y)
        opt_b.zero_grad()
        self.manual_backward(loss_b)
        if self.batches in self.nan_at:
            self.b.weight.grad[0, 0] = float("nan")
        opt_b.step()
        self.batches += 1
        return loss_a

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), 1e-2), torch.optim.Adam(self.b.parameters(), 1e-2)
