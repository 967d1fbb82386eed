"""Standalone FSDP2 run (2 CPU processes, gloo) used by tests/test_fsdp2.py.

Usage: python tests/fsdp2_worker.py OUT_DIR [rollback]

Lightning's ``ModelParallelStrategy`` with ``fully_shard`` on every Linear: the
parameters and gradients are DTensors, each rank holding half of each one,
except the last layer's, replicated (HSDP over a mesh of 2 x 1): whole on both.
An Inf enters the input on rank 1 only at step 5, and inputs x 1e3 on both
ranks at step 15. Every rank measures the *full* gradients and weights itself
(``full_tensor()``, a collective) before the guard runs and after it, and
writes them with what its guard saw to OUT_DIR/rank<r>.json; the guard's
per-step norms come from a sink (rank 0 only), its metrics from a CSVLogger.

``rollback``: instead, an Inf on rank 1 at steps 12 and 13 (damage) under
``on_nonfinite="rollback"``, snapshots every 5 healthy steps, 2 steps old at least.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from helpers import FaultyMLP, digits_loader  # noqa: E402
from lightning_gradguard import GradGuard, GuardSink  # noqa: E402


class ShardedFaults(FaultyMLP):
    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        # the last layer replicated on both ranks (HSDP with shards of one rank): each rank holds
        # all of it, which an all-reduce sum would count twice
        replicated = init_device_mesh("cpu", (2, 1), mesh_dim_names=("replicate", "shard"))
        for i, module in enumerate(self.net):
            if isinstance(module, torch.nn.Linear):
                fully_shard(module, mesh=replicated if i == len(self.net) - 1 else mesh)
        fully_shard(self, mesh=mesh)

    rollback = False

    def training_step(self, batch, batch_idx):
        if self.rollback:
            self.faults = {12: "inf", 13: "inf"} if self.global_rank == 1 else {}
        else:
            self.faults = {15: "spike", **({5: "inf"} if self.global_rank == 1 else {})}
        return super().training_step(batch, batch_idx)


def full_layers(pl_module, what):
    """Per layer, from the full tensors (a collective: every rank calls it): L2 norm, max |x|."""
    sq, mx = {}, {}
    with torch.no_grad():
        for name, p in pl_module.named_parameters():
            t = p.grad if what == "grad" else p
            if t is None:
                continue
            full = t.full_tensor().double()
            layer = name.rsplit(".", 1)[0]
            sq[layer] = sq.get(layer, 0.0) + float(full.square().sum())
            mx[layer] = max(mx.get(layer, 0.0), float(full.abs().max()))
    return {k: v**0.5 for k, v in sq.items()}, mx, sum(sq.values()) ** 0.5


class Measure(pl.Callback):
    """Full gradient norms before the guard (``when="before"``) or after it (clipped, or skipped: None)."""

    def __init__(self, when):
        self.when, self.rows = when, {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.when == "after" and all(p.grad is None for p in pl_module.parameters()):
            self.rows[trainer.global_step] = None  # skipped by the guard
            return
        grad, grad_max, total = full_layers(pl_module, "grad")
        weight, _, _ = full_layers(pl_module, "weight")
        self.rows[trainer.global_step] = {"total": total, "grad": grad, "max_abs": grad_max, "weight": weight}


class Norms(GuardSink):
    def __init__(self):
        self.steps = {}

    def on_step(self, guard, trainer, *, optimizer, step, log_step, layers, norms, metrics):
        self.steps[step] = dict(zip(["total", *layers], [float(x) for x in norms]))


class Report(pl.Callback):
    def __init__(self, out, guard, before, after, sink):
        self.out, self.guard, self.before, self.after, self.sink = out, guard, before, after, sink

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            finite = all(bool(torch.isfinite(p.full_tensor()).all()) for p in pl_module.parameters())
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({
                "events": [e.to_dict() for e in self.guard.events],
                "internal_errors": self.guard.internal_errors,
                "rollbacks": self.guard._watches[0].counts["rollbacks"],
                "global_step": trainer.global_step,
                "finite": finite,
                "before": self.before.rows,
                "after": self.after.rows,
                "guard_norms": self.sink.steps,
            }, f)


def main(out, mode="faults"):
    pl.seed_everything(0, verbose=False)
    sink = Norms()
    if mode == "rollback":
        ShardedFaults.rollback = True
        guard = GradGuard(on_nonfinite=("rollback", "alert"), rollback_every=5, rollback_margin=2, sinks=[sink],
                          log_every_n_steps=1, detail_every_n_steps=5)
    else:
        guard = GradGuard(on_nonfinite=("skip", "alert"), on_exploding=("clip", "alert"), sinks=[sink],
                          log_every_n_steps=1, detail_every_n_steps=5)
    before, after = Measure("before"), Measure("after")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=20, enable_checkpointing=False, enable_progress_bar=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo"),
        logger=CSVLogger(out, name="csv", version=0), log_every_n_steps=1, enable_model_summary=False,
        callbacks=[before, guard, after, Report(out, guard, before, after, sink)],
    )
    trainer.fit(ShardedFaults({}, lr=1e-2), digits_loader(batch_size=16))


if __name__ == "__main__":
    main(*sys.argv[1:3])
