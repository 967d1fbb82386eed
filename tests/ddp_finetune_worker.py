"""Standalone DDP fine-tuning run (2 CPU processes, gloo) used by tests/test_ddp.py.

Usage: python tests/ddp_finetune_worker.py OUT_DIR
Lightning's ``BackboneFinetuning`` unfreezes the backbone at epoch 1 under DDP. Each rank
writes its own ``backbone.0`` gradient norm per step and what the guard logged to
OUT_DIR/rank<r>.json.
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import BackboneFinetuning  # noqa: E402

from helpers import digits_loader  # noqa: E402
from lightning_gradguard import GradGuard  # noqa: E402
from test_finetuning import UNFREEZE_EPOCH, Finetuned  # noqa: E402


class Grads(pl.Callback):
    def __init__(self):
        self.rows = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grad = pl_module.backbone[0].weight.grad
        self.rows[trainer.global_step] = None if grad is None else float(grad.norm())


class Messages(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main(out):
    pl.seed_everything(0, verbose=False)
    grads, guard, messages = Grads(), GradGuard(), Messages()
    logging.getLogger("lightning_gradguard").addHandler(messages)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[grads, guard, BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_EPOCH)],
    )
    trainer.fit(Finetuned("group"), digits_loader())
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"grads": grads.rows, "messages": messages.messages, "internal_errors": guard.internal_errors,
                   "events": [e.to_dict() for e in guard.events]}, f)


if __name__ == "__main__":
    main(sys.argv[1])
