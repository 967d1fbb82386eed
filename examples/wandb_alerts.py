"""W&B alerts that name the step, the layer and the number: GradGuard next to a WandbLogger.

Nothing to wire up: when the Trainer has a ``WandbLogger`` (or a ``wandb.run``
is active), ``GradGuard()`` adds its W&B sink by itself. Each incident becomes
one ``run.alert`` (rate-limited per kind and layer), which W&B forwards to
Slack or e-mail as set in your W&B settings; the gradient-flow picture and
the ``grad/...`` metrics land in the same run, and the guard's summary in
``run.summary``.

This example trains a digits classifier that meets an Inf in one batch (step
40: NaN gradients, the step is skipped) and a corrupted batch (step 80: a
gradient spike, clipped). It runs offline: everything, the alerts included,
is written to the run folder; ``wandb sync <folder>`` uploads it.

Run: ``python examples/wandb_alerts.py [--save-dir DIR]`` (CPU, offline, about 30 seconds).
"""

from __future__ import annotations

import argparse
import math
import os

os.environ.setdefault("WANDB_MODE", "offline")  # this example never touches the network
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import wandb  # noqa: E402
from lightning.pytorch.loggers import WandbLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lightning_gradguard import GradGuard  # noqa: E402

INF_STEP, SPIKE_STEP = 40, 80


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == INF_STEP:  # a bad record in the data
            x = x.clone()
            x[0, 5] = math.inf
        elif self.global_step == SPIKE_STEP:  # a batch in the wrong units
            x = x * 1000.0
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits() -> DataLoader:
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    return DataLoader(data, batch_size=32, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs", "wandb")  # git-ignored
    parser.add_argument("--save-dir", default=default, help="where the offline W&B run is written")
    parser.add_argument("--steps", type=int, default=120)
    args = parser.parse_args()
    os.makedirs(args.save_dir, exist_ok=True)

    pl.seed_everything(0)
    logger = WandbLogger(project="gradguard-example", save_dir=args.save_dir, offline=True)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=logger,
        log_every_n_steps=10,
        enable_progress_bar=False,
        callbacks=[GradGuard()],  # the W&B sink is added automatically: a WandbLogger is attached
    )
    trainer.fit(Classifier(), digits())

    (guard,) = [c for c in trainer.callbacks if isinstance(c, GradGuard)]
    run = logger.experiment
    print(f"GradGuard: {len(guard.events)} events, {run.summary['grad/alerts_sent']} W&B alerts sent")
    for event in guard.events:
        print(f"  alert: {event.message}" if "alert" in event.actions else f"  logged: {event.message}")
    folder = os.path.dirname(run.dir)  # the offline run folder (run.dir is its files/ subfolder)
    wandb.finish()  # this script created the run through its WandbLogger, so it ends it
    print(f"offline W&B run: {folder}\nupload it (alerts, metrics, pictures) with: wandb sync {folder}")


if __name__ == "__main__":
    main()
