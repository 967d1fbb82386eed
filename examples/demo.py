"""Demo: a real training that hits gradient problems, and what GradGuard saw and did.

An MLP learns handwritten digits (``sklearn.datasets.load_digits``, shipped with
scikit-learn). Twice the data goes bad: at step 80 one batch is corrupted
(inputs x 1,000: a gradient spike), at step 160 one batch carries an Inf (NaN
gradients). The same run is trained without and with ``GradGuard()``.

Run: ``bash scripts/demo.sh`` (sets up .venv once), or ``python examples/demo.py``;
``--sync deferred`` guards with ``GradGuard(sync="deferred")`` (no host sync; the
optimizer is then the fused Adam that mode hands its skip and clip to).
"""

from __future__ import annotations

import argparse
import csv
import glob
import logging
import math
import statistics
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_gradguard import GradGuard

SPIKE_STEP, NAN_STEP = 80, 160


class Digits(Dataset):
    """load_digits, with faults planted at known batch indices (shuffle off: step == batch index)."""

    def __init__(self, batch_size: int, faults: bool) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        self.x = torch.tensor(x / 16.0, dtype=torch.float32)
        self.y = torch.tensor(y)
        self.batch_size, self.faults = batch_size, faults

    def __len__(self) -> int:
        return len(self.x) // self.batch_size * self.batch_size

    def __getitem__(self, i):
        return self.x[i], self.y[i]

    def corrupt(self, step: int, x: torch.Tensor) -> torch.Tensor:
        if not self.faults:
            return x
        if step == SPIKE_STEP:
            return x * 1000.0
        if step == NAN_STEP:
            x = x.clone()
            x[0, 0] = math.inf
        return x


class Classifier(pl.LightningModule):
    def __init__(self, data: Digits, fused: bool = False) -> None:
        super().__init__()
        self.data, self.fused = data, fused
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = self.data.corrupt(self.global_step, x)
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3, fused=True if self.fused else None)


def train(guard: GradGuard | None, steps: int, log_dir: str, faults: bool = True, fused: bool = False):
    pl.seed_everything(0, verbose=False)
    data = Digits(batch_size=32, faults=faults)
    model = Classifier(data, fused)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=CSVLogger(log_dir, name="demo"), log_every_n_steps=10,
        callbacks=[guard] if guard else [], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=False))
    with torch.no_grad():
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        x, y = data.x, data.y
        acc = (model.net(x).argmax(1) == y).float().mean().item() if finite else float("nan")
    return finite, acc, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sync", choices=("step", "deferred"), default="step",
                        help='GradGuard(sync=...): "deferred" makes no host sync (and trains with a fused Adam)')
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    out = tempfile.mkdtemp(prefix="gradguard-demo-")

    print(f"Training an MLP on load_digits for {args.steps} steps; a corrupted batch at step {SPIKE_STEP}, "
          f"an Inf input at step {NAN_STEP}.\n")
    fused = args.sync == "deferred"
    finite, acc, _ = train(None, args.steps, out, faults=False, fused=fused)
    print(f"  fault-free run          : weights finite={finite}, train accuracy {acc:.1%}")
    finite, acc, _ = train(None, args.steps, out, fused=fused)
    print(f"  faults, no guard        : weights finite={finite}, train accuracy {acc:.1%}")
    guard = GradGuard(sync=args.sync)
    print("  faults, with the guard; its live alerts (Python logging warnings; W&B alerts where a run is attached):")
    finite, acc, trainer = train(guard, args.steps, out, fused=fused)
    label = "GradGuard()" if args.sync == "step" else 'GradGuard(sync="deferred")'
    print(f"  faults, {label:16s}: weights finite={finite}, train accuracy {acc:.1%}\n")

    (path,) = glob.glob(f"{trainer.logger.log_dir}/metrics.csv")
    rows = [r for r in csv.DictReader(open(path)) if r.get("grad/norm_total")]
    at = {int(r["step"]): r for r in rows}  # the guard logs every step with an event
    print(f"What the guard saw and did ({len(guard.events)} events, in guard.events):")
    for e in guard.events:
        print(f"  [{e.kind:9s}] {e.message}")
        if "clip" in e.actions and e.step in at:
            print(f"              clipped: global norm {float(at[e.step]['grad/norm_total']):.3g} -> "
                  f"{float(at[e.step]['grad/norm_clipped']):.3g} (grad/norm_clipped); the update went ahead")
        if "skip" in e.actions:
            print("              skipped: gradients dropped, weights and optimizer state untouched")
    norms = [float(r["grad/norm_total"]) for r in rows if math.isfinite(float(r["grad/norm_total"]))]
    layers = sorted({k.split("/", 2)[2] for r in rows for k, v in r.items() if k.startswith("grad/norm/") and v})
    print(f"\nLogged statistics ({len(rows)} logged steps, {path}):")
    print(f"  grad/norm_total: median {statistics.median(norms):.3g}, min {min(norms):.3g}, max {max(norms):.3g}")
    last = rows[-1]
    for layer in layers:
        print(f"  grad/norm/{layer:6s} last {float(last[f'grad/norm/{layer}']):.3g}"
              f"   update_ratio {float(last.get(f'grad/update_ratio/{layer}') or 'nan'):.2e}")
    print(f"  steps clipped: {int(float(last['grad/clipped_steps']))}, steps skipped: {int(float(last['grad/skipped_steps']))}")


if __name__ == "__main__":
    main()
