"""What the optimizer holds changes mid-run. Fine-tuning: layers unfrozen mid-run (a new param
group, or requires_grad switched on in place) are guarded from the step they train, keep or restart
their trend state as they should, and neither the global norm's jump nor the absent (frozen) layers
raise alarms or get logged as 0. A replaced optimizer is watched with state that fits it."""

import csv
import logging
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from helpers import FaultyMLP, NormRecorder, digits_loader, trainer
from lightning_gradguard import GradGuard
from lightning_gradguard.detectors import Code, DetectorConfig, Row, TrendDetector

STEPS_PER_EPOCH = 16  # 512 digits, batch 32
UNFREEZE_EPOCH = 1


class Finetuned(pl.LightningModule):
    """A backbone frozen for the first epoch, then trained.

    ``how="group"``: the optimizer holds the head only; Lightning's ``BackboneFinetuning`` adds the
    backbone as a new param group (its documented recipe). ``how="inplace"``: the optimizer holds
    every parameter from the start and ``requires_grad`` is switched on at the unfreeze epoch.
    ``faults`` maps a global step to ``"nan"`` (a NaN planted in ``backbone.0``'s weight gradient).
    """

    def __init__(self, how: str, faults: dict[int, str] | None = None, input_scale: float = 1.0) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 32), nn.Tanh())
        self.head = nn.Linear(32, 10)
        self.how, self.faults, self.input_scale = how, dict(faults or {}), input_scale
        if how == "inplace":
            self.backbone.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.backbone(x * self.input_scale)), y)

    def on_train_epoch_start(self):
        if self.how == "inplace" and self.current_epoch == UNFREEZE_EPOCH:
            self.backbone.requires_grad_(True)

    def on_after_backward(self):
        if self.faults.get(self.global_step) == "nan":
            self.backbone[0].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        params = self.parameters() if self.how == "inplace" else (p for p in self.parameters() if p.requires_grad)
        return torch.optim.Adam(params, lr=1e-3)


def _fit(how, guard, max_epochs=3, faults=None, input_scale=1.0, **kwargs):
    model = Finetuned(how, faults, input_scale)
    callbacks = kwargs.pop("callbacks", []) + [guard]
    if how == "group":
        callbacks.append(BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_EPOCH))
    t = trainer(max_steps=-1, max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    t.fit(model, digits_loader())
    return t, model


@pytest.mark.parametrize("how", ["group", "inplace"])
def test_a_nan_in_an_unfrozen_layer_is_caught_and_never_reaches_the_weights(how):
    fault = STEPS_PER_EPOCH * UNFREEZE_EPOCH + 5
    guard = GradGuard()
    t, model = _fit(how, guard, faults={fault: "nan"})
    (event,) = guard.events
    assert (event.step, event.kind, event.layer, event.actions) == (fault, "nonfinite", "backbone.0", ("skip", "alert"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert guard.internal_errors == 0
    if how == "group":
        assert len(t.optimizers[0].param_groups) == 2  # the recipe really added a group


@pytest.mark.parametrize("how", ["group", "inplace"])
def test_unfrozen_layers_are_measured_and_frozen_ones_not_logged(tmp_path, how):
    ref = NormRecorder()
    guard = GradGuard(log_layers="all", log_every_n_steps=1)
    _fit(how, guard, max_epochs=2, callbacks=[ref], logger=CSVLogger(tmp_path, name="", version=""))
    rows = {}
    with open(tmp_path / "metrics.csv") as f:
        for row in csv.DictReader(f):
            rows[int(row["step"])] = row
    unfreeze = STEPS_PER_EPOCH * UNFREEZE_EPOCH
    for step in range(2 * STEPS_PER_EPOCH):
        row = rows[step]
        for layer in ("backbone.0", "backbone.2", "head"):
            logged = row.get(f"grad/norm/{layer}", "")
            if step < unfreeze and layer != "head":
                assert logged == "", (step, layer)  # frozen: no gradient, no norm (not a norm of 0)
            else:
                assert math.isclose(float(logged), ref.layers[step][layer], rel_tol=1e-4), (step, layer)
        assert math.isclose(float(row["grad/norm_total"]), ref.total[step], rel_tol=1e-4)


@pytest.mark.parametrize("how", ["group", "inplace"])
def test_the_global_norm_jump_at_the_unfreeze_is_no_alarm(how):
    # inputs x40: the backbone's gradients dominate once it trains, and the global norm jumps
    # ~4.5x; before the global series restarted on a newly seen layer, the in-place unfreeze
    # raised false "exploding" alarms at 4 of the first 5 fine-tuning steps and clipped them
    guard = GradGuard()
    ref = NormRecorder()
    _fit(how, guard, max_epochs=4, input_scale=40.0, callbacks=[ref])
    unfreeze = STEPS_PER_EPOCH * UNFREEZE_EPOCH
    before = np.median([ref.total[s] for s in range(unfreeze - 5, unfreeze)])
    after = np.median([ref.total[s] for s in range(unfreeze, unfreeze + 5)])
    assert after > 4 * before  # the jump is there
    assert guard.events == []
    assert guard._watches[0].counts["clipped"] == 0


def test_a_new_param_group_keeps_the_old_layers_trend_and_drops_stale_snapshots(caplog):
    guard = GradGuard(on_exploding=("rollback", "alert"), rollback_every=5, rollback_margin=2)
    with caplog.at_level(logging.INFO, logger="lightning_gradguard"):
        t, _ = _fit("group", guard, max_epochs=2)
    watch = guard._watches[0]
    unfreeze = STEPS_PER_EPOCH * UNFREEZE_EPOCH
    assert watch.plan.layers == ("backbone.0", "backbone.2", "head")
    count = watch.detector.count.tolist()
    # global: restarted at the unfreeze; backbone: observed since; head: every step
    assert count == [STEPS_PER_EPOCH, STEPS_PER_EPOCH, STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert all(s >= unfreeze for s in watch.snapshots.steps)  # none of before the new group
    assert "optimizer 0 (Adam) holds 6 parameter tensors in 3 layers (was 2 in 1)" in caplog.text
    assert guard.internal_errors == 0


def test_rollback_after_a_new_param_group_restores_a_snapshot_of_the_new_layout():
    unfreeze = STEPS_PER_EPOCH * UNFREEZE_EPOCH
    faults = {unfreeze + 2: "nan", unfreeze + 3: "nan"}  # a second bad step in a row: damage
    guard = GradGuard(on_nonfinite=("rollback", "alert"), rollback_every=5, rollback_margin=2, rollback_keep=10)
    t, model = _fit("group", guard, max_epochs=2, faults=faults)
    assert [e.step for e in guard.events] == sorted(faults)
    watch = guard._watches[0]
    # restored: the snapshot of the first healthy step after the new group; one of before it
    # (one param group) cannot be loaded into the optimizer of two
    assert watch.counts["rollbacks"] == 1 and watch.snapshots.steps[0] == unfreeze
    assert guard.internal_errors == 0
    assert len(t.optimizers[0].param_groups) == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_after_the_unfreeze_restores_every_layer(tmp_path, caplog):
    guard = GradGuard()
    t, _ = _fit("group", guard, max_epochs=2)
    path = tmp_path / "after-unfreeze.ckpt"
    t.save_checkpoint(path)
    resumed = GradGuard()
    model = Finetuned("group")
    t2 = trainer(max_steps=-1, max_epochs=3,
                 callbacks=[resumed, BackboneFinetuning(unfreeze_backbone_at_epoch=UNFREEZE_EPOCH)])
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t2.fit(model, digits_loader(), ckpt_path=path)
    assert "layers changed" not in caplog.text
    # the guard says what happened: the backbone trained before the checkpoint, not since
    assert caplog.text.count("trained before the checkpoint") == 1
    assert ("2 layers trained before the checkpoint have had no gradient in the 10 steps since the resume: "
            "`backbone.0`, `backbone.2`. Frozen again by the resume?") in caplog.text
    old, new = guard._watches[0].detector, resumed._watches[0].detector
    assert old.count.tolist() == [16, 16, 16, 32]
    # global and head went on from the checkpoint. Lightning 2.6's BaseFinetuning, resumed past its
    # unfreeze epoch, restores the param groups but not requires_grad: the backbone stays frozen,
    # has no gradients, and its series keep their restored counts (they would not restart)
    count = new.count.tolist()
    assert count[0] == count[3] - 16 == 32
    assert count[1:3] in ([16, 16], [32, 32])


def test_detector_remap_and_admit_alike_in_both_modes():
    config = DetectorConfig(warmup_steps=3)
    rng = np.random.default_rng(0)
    for vectorized in (False, True):
        det = TrendDetector(config, 3, vectorized=vectorized)
        for _ in range(6):  # series 2 absent (frozen)
            det.update([1.0 + rng.random(), 1.0, 0.0], [True, True, False], [False] * 3)
        level_1 = det.level.tolist()[1]
        # series 2 shows up with a global norm 20x its level: the global series restarts
        report = np.asarray(det.update([20.0, 1.5, 20.0], [True] * 3, [False] * 3))
        assert report[Row.CODE, 0] == 0, vectorized  # no spike of the global norm
        assert det.count.tolist() == [1, 7, 1]
        assert det.level.tolist()[1] != level_1  # series 1 went on
        # remap: a new layer between the two, the global series afresh
        new = det.remap([None, 1, None, 2])
        assert new.count.tolist() == [0, 7, 0, 1] and new.steps == det.steps == 7
        for name in ("level", "scale", "fast", "peak"):
            assert getattr(new, name)[[1, 3]].tolist() == getattr(det, name)[[1, 2]].tolist()
        assert np.array_equal(new.ring[:, [1, 3]], det.ring[:, [1, 2]], equal_nan=True)


class SwapsOptimizer(FaultyMLP):
    """Adam in epoch 0, then SGD: ``trainer.strategy.setup_optimizers`` at the start of epoch 1."""

    def __init__(self, faults):
        super().__init__(faults)
        self.lrs: dict[int, tuple[str, float]] = {}  # inside optimizer.step: after the LR scale's pre-hook

    def configure_optimizers(self):
        if self.trainer.current_epoch >= 1:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
        self.lrs[self.global_step] = (type(optimizer).__name__, optimizer.param_groups[0]["lr"])


def test_a_replaced_optimizer_gets_no_stale_snapshot_and_its_own_lr_scale():
    swap = STEPS_PER_EPOCH
    guard = GradGuard(on_nonfinite=("rollback", "alert"), on_exploding=("clip", "reduce_lr", "alert"))
    model = SwapsOptimizer({swap + 8: "nan_layer", swap + 9: "nan_layer", swap + 12: "spike"})
    t = trainer(max_steps=40, callbacks=[guard])
    # before: the rollback at step 25 loaded the Adam snapshot of step 0 into the SGD, whose next
    # step failed with KeyError('momentum'), and reduce_lr scaled the Adam nobody used any more
    t.fit(model, digits_loader())
    assert type(t.optimizers[0]).__name__ == "SGD" and t.global_step == 40
    assert [(e.step, e.actions) for e in guard.events] == [
        (24, ("skip", "alert")), (25, ("skip",)),  # no snapshot of the SGD old enough yet: skipped
        (28, ("clip", "reduce_lr", "alert")),
    ]
    assert model.lrs[27] == ("SGD", 0.05) and model.lrs[28] == model.lrs[39] == ("SGD", 0.025)
    watch = guard._watches[0]
    assert watch.snapshots.steps[0] == swap  # taken at the first healthy step of the SGD
    assert watch.detector.count[0] > 30  # the same parameters: the global trend went on
    assert guard.internal_errors == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_layer_with_zero_gradients_is_no_newcomer_when_it_explodes():
    """A layer whose gradient was there but exactly 0 (dead, or underflowed through a deep stack)
    was covered by the global norm all along: when it blows up, the global series must not restart
    as for a frozen layer's first gradient (which swallowed a 1.6e21 spike in a 122-layer model)."""
    config = DetectorConfig(warmup_steps=3)
    rng = np.random.default_rng(0)
    for vectorized in (False, True):
        det = TrendDetector(config, 3, vectorized=vectorized)
        for _ in range(6):  # series 2 present with a zero norm
            det.update([1.0 + rng.random(), 1.0 + rng.random(), 0.0], [True] * 3, [False] * 3)
        before = det.state_dict()
        report = np.asarray(det.update([1e21, 1.5, 1e21], [True] * 3, [False] * 3))
        assert int(report[Row.CODE, 0]) & Code.SPIKE, vectorized  # the global norm's spike is seen
        assert det.count.tolist()[0] == 7  # the global series went on (a restart would leave 1)
        assert det.seen.tolist() == [1.0, 1.0, 1.0]
        # the state survives a checkpoint; one from before "seen" was kept takes it from the counts
        # (best effort: a layer that had only zero norms counts as never seen again)
        fresh = TrendDetector(config, 3, vectorized=vectorized)
        fresh.load_state_dict(det.state_dict())
        assert fresh.seen.tolist() == [1.0, 1.0, 1.0] and not fresh._unseen
        old = {k: v for k, v in before.items() if k != "seen"}
        fresh = TrendDetector(config, 3, vectorized=vectorized)
        fresh.load_state_dict(old)
        assert fresh.seen.tolist() == [1.0, 1.0, 0.0] and fresh._unseen
