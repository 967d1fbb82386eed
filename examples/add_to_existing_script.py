"""An existing Lightning training script, protected by GradGuard: one import, one callback.

The script below is an ordinary one (a digits classifier with a train/validation
split). The only change for GradGuard is marked ``# <- GradGuard``: with no
arguments the guard skips steps with NaN/Inf gradients, clips exploding ones to
an adaptive threshold, warns about all three conditions (vanishing included)
and logs ``grad/...`` metrics through the Trainer's loggers. The lines after
``trainer.fit`` are optional: they show what the guard saw.

Run: ``python examples/add_to_existing_script.py [--max-epochs 2] [--root DIR]``
(CPU, offline, about 20 seconds).
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split

from lightning_gradguard import GradGuard  # <- GradGuard


class DigitsData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size

    def setup(self, stage: str) -> None:
        from sklearn.datasets import load_digits  # ships with scikit-learn: no download

        x, y = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
        self.train, self.val = random_split(data, [0.8, 0.2], generator=torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-epochs", type=int, default=2)
    parser.add_argument("--root", default=None, help="where lightning_logs/ goes (default: the current folder)")
    args = parser.parse_args()

    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        accelerator="cpu",
        default_root_dir=args.root,
        log_every_n_steps=10,
        enable_progress_bar=False,
        callbacks=[GradGuard()],  # <- GradGuard
    )
    trainer.fit(Classifier(), DigitsData())

    # optional: what the guard saw (it is also in the logged grad/... metrics)
    (guard,) = [c for c in trainer.callbacks if isinstance(c, GradGuard)]
    print(f"val_acc {trainer.callback_metrics['val_acc']:.3f}")
    print(f"GradGuard: {len(guard.events)} events, {guard.summary()}")
    print(f"gradient statistics logged under grad/ in {trainer.log_dir}")


if __name__ == "__main__":
    main()
