"""GradGuard configured from YAML with LightningCLI, and the ``gradguard`` command as the CI gate.

``config.yaml`` adds the guard under ``trainer.callbacks`` with a
``RecordSink``, which writes ``gradguard.jsonl`` into the run's log folder.
``gradguard`` then reads that record, prints what happened and exits 1 if
the run had gradient events, so a pipeline can stop there::

    python main.py fit --config config.yaml
    gradguard lightning_logs/ --html gradguard.html     # exit 0: healthy

    # the same run with a model built to vanish: the guard alerts, the gate fails
    python main.py fit --config config.yaml --model.depth 20 --model.activation sigmoid
    gradguard lightning_logs/                           # exit 1: vanishing

Any guard argument can be changed on the command line, e.g.
``--trainer.callbacks.init_args.on_vanishing=raise``. (``gradguard`` is
``python -m lightning_gradguard.cli``.) CPU, offline, ~20 seconds per run.
"""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits  # ships with scikit-learn: no download

        x, y = load_digits(return_X_y=True)
        self.data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True)


class Classifier(pl.LightningModule):
    """``depth`` hidden layers of ``activation``; ``depth=20, activation="sigmoid"`` makes gradients vanish."""

    def __init__(
        self,
        depth: int = 2,
        hidden: int = 64,
        activation: Literal["relu", "tanh", "sigmoid"] = "relu",
        lr: float = 0.05,
    ) -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
        layers: list[nn.Module] = []
        width = 64
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), act()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main(args: list[str] | None = None) -> LightningCLI:
    return LightningCLI(Classifier, DigitsData, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
