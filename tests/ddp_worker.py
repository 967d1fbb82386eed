"""Standalone DDP run (2 CPU processes, gloo) used by tests/test_ddp.py.

Usage: python tests/ddp_worker.py OUT_DIR MODE   (MODE: skip | stop | deferred_stop: sync="deferred", fused Adam)
An Inf enters the input on rank 1 only, at step 5. Each rank writes what its
guard saw to OUT_DIR/rank<r>.json; the sink (rank 0 only) writes OUT_DIR/sink-rank<r>.txt.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from helpers import FaultyMLP, digits_loader  # noqa: E402
from lightning_gradguard import GradGuard, GuardSink  # noqa: E402


class RankOneFault(FaultyMLP):
    fused = False

    def training_step(self, batch, batch_idx):
        self.faults = {5: "inf"} if self.global_rank == 1 else {}
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True) if self.fused else super().configure_optimizers()


class FileSink(GuardSink):
    def __init__(self, out):
        self.out = out

    def on_event(self, guard, trainer, event):
        with open(os.path.join(self.out, f"sink-rank{trainer.global_rank}.txt"), "a") as f:
            f.write(event.message + "\n")


class Report(pl.Callback):
    def __init__(self, out, guard):
        self.out, self.guard = out, guard

    def on_train_end(self, trainer, pl_module):
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(
                {
                    "events": [e.to_dict() for e in self.guard.events],
                    "global_step": trainer.global_step,
                    "finite": bool(torch.isfinite(weights).all()),
                    "checksum": float(weights.double().sum()),
                },
                f,
            )


def main(out, mode):
    pl.seed_everything(0, verbose=False)
    guard = GradGuard(on_nonfinite=("skip", "stop") if mode.endswith("stop") else ("skip", "alert"), sinks=[FileSink(out)],
                      sync="deferred" if mode.startswith("deferred") else "step")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=12, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard, Report(out, guard)],
    )
    model = RankOneFault({}, lr=1e-2)
    model.fused = mode.startswith("deferred")
    trainer.fit(model, digits_loader(batch_size=16))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
