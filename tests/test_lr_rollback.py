"""reduce_lr survives every scheduler; rollback undoes a catastrophe; both survive resume."""

import math

import pytest
import torch
from torch import nn

from helpers import DigitsMLP, FaultyMLP, TwoOptimizers, digits_loader, trainer
from lightning_gradguard import GradGuard

SPIKE = 12


class Scheduled(DigitsMLP):
    """SGD + a per-step scheduler; inputs x1e3 at step SPIKE (an exploding event)."""

    def __init__(self, kind: str, spike_at=SPIKE):
        super().__init__(lr=0.05)
        self.kind, self.spike_at = kind, spike_at
        self.applied: dict[int, float] = {}  # lr seen inside optimizer.step (after the guard's scaling)
        self.scheduled: dict[int, float] = {}  # lr the scheduler set (what param_group holds outside step)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.spike_at:
            x = x * 1e3
        return nn.functional.cross_entropy(self(x), y)

    def on_train_batch_start(self, batch, batch_idx):
        self.scheduled[self.global_step] = self.trainer.optimizers[0].param_groups[0]["lr"]

    def on_before_optimizer_step(self, optimizer):
        # runs after the callbacks' hook (the guard's): the gradient about to be applied
        w = self.net[0].weight
        self._before = (w.detach().clone(), w.grad.detach().clone())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # plain SGD: w_new = w - lr * g, so the LR actually applied is measured from the update
        w_old, g = self._before
        delta = w_old - self.net[0].weight.detach()
        self.applied[self.global_step - 1] = ((delta * g).sum() / (g * g).sum()).item()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = {
            "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.1 * s)),
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100, cycle_momentum=False),
            "cyclic": lambda: torch.optim.lr_scheduler.CyclicLR(opt, 0.01, 0.1, step_size_up=5, cycle_momentum=False),
            "restarts": lambda: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=7),
            "steplr": lambda: torch.optim.lr_scheduler.StepLR(opt, 10, 0.5),  # recursive: lr = lr * 0.5
        }[self.kind]()
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("kind", ["lambda", "onecycle", "cyclic", "restarts"])
def test_reduce_lr_scales_the_schedule_and_keeps_its_shape(kind):
    guard = GradGuard(on_exploding=("clip", "reduce_lr"), lr_factor=0.5, lr_cooldown=100)
    model = Scheduled(kind)
    trainer(max_steps=30, callbacks=[guard]).fit(model, digits_loader())
    (event,) = guard.events
    assert event.step == SPIKE and event.actions == ("clip", "reduce_lr")
    for step, applied in model.applied.items():
        expected = model.scheduled[step] * (0.5 if step >= SPIKE else 1.0)
        assert applied == pytest.approx(expected, rel=1e-4), step
    # the scheduler's own value (param_group outside step) follows the unscaled schedule
    twin = Scheduled(kind, spike_at=-1)
    trainer(max_steps=30).fit(twin, digits_loader())
    assert model.scheduled == pytest.approx(twin.scheduled)
    assert guard._watches[0].lr_scale.value == 0.5


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_the_logged_lr_and_update_ratios_are_those_the_step_applied(sync, tmp_path):
    """Inside optimizer.step (where the guard runs) the param groups hold the scaled LR already:
    logged LR and update ratios count the guard's scale once."""
    import csv
    import glob

    from lightning.pytorch.loggers import CSVLogger

    class Fused(Scheduled):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, fused=True)  # constant LR 0.05

    guard = GradGuard(on_exploding=("clip", "reduce_lr"), lr_factor=0.5, log_every_n_steps=1,
                      detail_every_n_steps=1, sync=sync)
    model = Fused("lambda")
    trainer(max_steps=SPIKE + 6, callbacks=[guard], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        model, digits_loader())
    rows: dict[int, dict] = {}
    for row in csv.DictReader(open(glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)[0])):
        rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v})
    late = 1 if sync == "deferred" else 0  # the reduction acts in the next step's hook
    for step in (SPIKE - 1, SPIKE + 2 + late):
        row, lr = rows[step], 0.05 * (0.5 if step > SPIKE + late else 1.0)
        assert row["grad/lr"] == pytest.approx(lr) and model.applied[step] == pytest.approx(lr, rel=1e-4)
        ratio = lr * row["grad/norm/net.0"] / row["grad/param_norm/net.0"]
        assert row["grad/update_ratio/net.0"] == pytest.approx(ratio, rel=1e-5)


def test_two_guards_reducing_the_lr_multiply_and_give_the_schedule_back():
    # the README lets two guards coexist (prefixes differ); each hooks its own scale on the optimizer, and
    # the second's post-hook once gave back the LR as scaled by the first: the LR halved every step
    guards = [GradGuard(on_exploding=("reduce_lr", "log"), lr_factor=0.5, lr_cooldown=100) for _ in range(2)]
    guards[1].prefix = "second/"
    model = Scheduled("lambda")
    trainer(max_steps=24, callbacks=guards).fit(model, digits_loader())
    assert [g._watches[0].lr_scale.value for g in guards] == [0.5, 0.5]  # neither clips: both see the spike
    for step, applied in model.applied.items():
        expected = model.scheduled[step] * (0.25 if step >= SPIKE else 1.0)
        assert applied == pytest.approx(expected, rel=1e-4), step
    twin = Scheduled("lambda", spike_at=-1)
    trainer(max_steps=24).fit(twin, digits_loader())
    assert model.scheduled == pytest.approx(twin.scheduled)  # the schedule itself untouched


def test_stacked_lr_scales_removed_inside_the_step_leave_the_unscaled_lr():
    from lightning_gradguard.actions import LRScale

    p = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([p], lr=1.0)
    first, second = LRScale(opt), LRScale(opt)
    first.value, second.value = 0.5, 0.25
    seen = []
    p.grad = torch.ones(1)
    opt.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    opt.step()
    assert seen == [0.125] and opt.param_groups[0]["lr"] == 1.0
    second.value = 0.5  # inside a step: applies to it at once, on top of the first's factor
    first._pre(opt, (), {}), second._pre(opt, (), {})
    second.value = 1.0
    assert opt.param_groups[0]["lr"] == 0.5
    second.remove(), first.remove()  # an exception inside step(): no post-hook; the unscaled LR comes back
    assert opt.param_groups[0]["lr"] == 1.0


def test_lr_scale_survives_resume_and_recovers(tmp_path):
    guard = GradGuard(on_exploding="reduce_lr", lr_recover_after=10, lr_factor=0.5)
    t = trainer(max_steps=16, callbacks=[guard])
    t.fit(Scheduled("lambda"), digits_loader())
    assert guard._watches[0].lr_scale.value == 0.5
    t.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GradGuard(on_exploding="reduce_lr", lr_recover_after=10, lr_factor=0.5)
    model = Scheduled("lambda", spike_at=-1)
    trainer(max_steps=40, callbacks=[resumed]).fit(model, digits_loader(), ckpt_path=tmp_path / "c.ckpt")
    # 10 healthy steps after the event at 12 (cooldown counted from it) it recovers to 1.0
    applied = model.applied
    assert applied[17] == pytest.approx(model.scheduled[17] * 0.5, rel=1e-4)
    assert applied[30] == pytest.approx(model.scheduled[30], rel=1e-4)
    assert resumed._watches[0].lr_scale.value == 1.0


def test_a_checkpoint_saved_inside_the_step_holds_the_schedules_lr_and_a_resume_scales_it_once(tmp_path):
    # Lightning runs the training closure inside optimizer.step, where the groups hold lr x scale: a checkpoint
    # saved there (a SLURM requeue signal, the user's own hook) once stored that as the schedule's LR
    class SavesInsideStep(Scheduled):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            if self.global_step == 16:
                self.trainer.save_checkpoint(tmp_path / "inside.ckpt")

    guard = GradGuard(on_exploding="reduce_lr", lr_factor=0.5)
    model = SavesInsideStep("lambda")
    trainer(max_steps=18, callbacks=[guard]).fit(model, digits_loader())
    saved = torch.load(tmp_path / "inside.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(model.scheduled[16])
    assert model.applied[16] == pytest.approx(model.scheduled[16] * 0.5, rel=1e-4)  # the live step kept its scale
    resumed = Scheduled("lambda", spike_at=-1)
    trainer(max_steps=22, callbacks=[GradGuard(on_exploding="reduce_lr", lr_factor=0.5)]).fit(
        resumed, digits_loader(), ckpt_path=tmp_path / "inside.ckpt")
    twin = Scheduled("lambda", spike_at=-1)
    trainer(max_steps=22).fit(twin, digits_loader())
    for step in (18, 21):
        assert resumed.applied[step] == pytest.approx(twin.scheduled[step] * 0.5, rel=1e-4), step


def test_a_checkpoint_saved_inside_the_first_step_after_a_resume_holds_the_schedules_lr(tmp_path):
    # the first step after a resume has no watch yet when its training closure runs (the guard's hook comes
    # after it): the checkpoint must still get the schedule's LR
    guard = GradGuard(on_exploding="reduce_lr", lr_factor=0.5)
    t = trainer(max_steps=16, callbacks=[guard])
    t.fit(Scheduled("lambda"), digits_loader())
    t.save_checkpoint(tmp_path / "c.ckpt")

    class SavesAtOnce(Scheduled):
        def training_step(self, batch, batch_idx):
            if self.global_step == 16:
                self.trainer.save_checkpoint(tmp_path / "first.ckpt")
            return super().training_step(batch, batch_idx)

    model = SavesAtOnce("lambda", spike_at=-1)
    trainer(max_steps=18, callbacks=[GradGuard(on_exploding="reduce_lr", lr_factor=0.5)]).fit(
        model, digits_loader(), ckpt_path=tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "first.ckpt", weights_only=False)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(model.scheduled[16])
    assert model.applied[16] == pytest.approx(model.scheduled[16] * 0.5, rel=1e-4)


def test_a_resume_with_no_step_left_still_summarises_the_run(tmp_path):
    guard = GradGuard(on_exploding="reduce_lr", lr_factor=0.5)
    t = trainer(max_steps=16, callbacks=[guard])
    t.fit(Scheduled("lambda"), digits_loader())
    t.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GradGuard(on_exploding="reduce_lr", lr_factor=0.5)
    trainer(max_steps=16, callbacks=[resumed]).fit(Scheduled("lambda"), digits_loader(), ckpt_path=tmp_path / "c.ckpt")
    assert resumed.summary() == guard.summary()
    assert resumed.summary()["steps"] == 16 and resumed.summary()["lr_scale"] == 0.5


def test_reduce_lr_acts_on_the_optimizer_of_a_second_fit():
    # a second fit() builds a new optimizer; the guard's LR scale stayed on the first one, so its
    # reduce_lr was logged but never applied
    class Plain(Scheduled):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    guard = GradGuard(on_exploding=("clip", "reduce_lr"), lr_factor=0.5, lr_cooldown=100)
    model = Plain("lambda", spike_at=30)
    t = trainer(max_steps=20, callbacks=[guard])
    t.fit(model, digits_loader())
    first = t.optimizers[0]
    t.fit_loop.epoch_loop.max_steps = 40
    t.fit(model, digits_loader())
    assert t.optimizers[0] is not first
    assert [(e.step, e.actions) for e in guard.events] == [(30, ("clip", "reduce_lr"))]
    applied = model.applied  # measured from the weights' update
    assert applied[29] == pytest.approx(0.05, rel=1e-4)
    assert applied[30] == pytest.approx(0.025, rel=1e-4) and applied[39] == pytest.approx(0.025, rel=1e-4)
    for opt in (first, t.optimizers[0]):  # both left as they were: no hook of the guard's
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


class LRJump(DigitsMLP):
    """The LR jumps x300 at step JUMP for good (a schedule bug): the update of that step wrecks the weights."""

    JUMP = 60

    def __init__(self, jump: bool = True):
        super().__init__(lr=0.02, hidden=64)
        self.jump = jump
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        factor = 300.0 if self.jump else 1.0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor if s >= self.JUMP else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def final_loss(model):
    tail = [l for l in model.losses[-20:] if math.isfinite(l)]
    return sum(tail) / len(tail) if len(tail) == 20 else math.inf


def test_rollback_with_reduce_lr_rescues_a_persistent_lr_jump():
    twin = LRJump(jump=False)
    trainer(max_steps=200).fit(twin, digits_loader(shuffle=True))
    broken = LRJump()
    trainer(max_steps=200, callbacks=[GradGuard()]).fit(broken, digits_loader(shuffle=True))
    rescued = LRJump()
    guard = GradGuard(on_exploding=("rollback", "reduce_lr", "alert"), lr_factor=0.1, rollback_every=20)
    trainer(max_steps=200, callbacks=[guard]).fit(rescued, digits_loader(shuffle=True))

    assert final_loss(broken) > 3 * final_loss(twin)  # clipping alone cannot undo the wrecking update
    assert final_loss(rescued) < 1.5 * final_loss(twin)
    first, second = guard.events[:2]
    # the first bad step is only skipped (nothing applied yet); the second in a row means damage
    assert first.kind == "exploding" and first.step in (LRJump.JUMP + 1, LRJump.JUMP + 2)
    assert first.actions == ("skip", "alert")
    assert second.step == first.step + 1 and second.actions[:2] == ("rollback", "reduce_lr")
    # the rollback brought the effective LR back to what the snapshot trained with: 1/300 of the jump
    assert guard._watches[0].lr_scale.value == pytest.approx(1 / 300)
    assert all(torch.isfinite(p).all() for p in rescued.parameters())


def test_rollback_gives_up_and_stops_when_retrying_does_not_help():
    model = LRJump()
    # no LR reduction: every retry diverges again; after max_rollbacks it stops instead of looping
    guard = GradGuard(on_exploding=("rollback", "alert"), rollback_every=20, max_rollbacks=2)
    t = trainer(max_steps=400, callbacks=[guard])
    t.fit(model, digits_loader(shuffle=True))
    assert guard._watches[0].counts["rollbacks"] == 2
    assert t.global_step < 400
    # the step that found the rollbacks exhausted did not apply its exploding gradient either
    last = guard.events[-1]
    assert last.actions[0] == "skip" and "stop" in last.actions
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rollback_with_nothing_to_restore_still_keeps_the_nan_out(tmp_path):
    # steps 0 and 1 NaN: the second means damage, but no snapshot exists yet (step 0 was not
    # healthy). Before, the rollback silently did nothing and the NaN reached the weights
    guard = GradGuard(on_nonfinite=("rollback", "alert"))
    model = FaultyMLP({0: "nan_layer", 1: "nan_layer"})
    t = trainer(max_steps=20, callbacks=[guard])
    t.fit(model, digits_loader())
    assert [(e.step, e.actions) for e in guard.events] == [(0, ("skip", "alert")), (1, ("skip",))]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    watch = guard._watches[0]
    assert watch.counts["rollbacks"] == 0 and watch.counts["skipped"] == 2
    assert watch.snapshots.steps[0] == 2  # the first healthy step takes one, not step 50

    # after a resume the snapshots (host memory) are gone: the same holds, then one is taken at once
    t.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GradGuard(on_nonfinite=("rollback", "alert"))
    model = FaultyMLP({20: "nan_layer", 21: "nan_layer", 33: "nan_layer", 34: "nan_layer"})
    trainer(max_steps=40, callbacks=[resumed]).fit(model, digits_loader(), ckpt_path=tmp_path / "c.ckpt")
    new = [(e.step, e.actions) for e in resumed.events[2:]]
    # no alert at 20: the one at step 0 (kept in the checkpoint) is within alert_quiet_steps (100); the
    # rollback at 34 alerts all the same (the run was rewound)
    assert new == [(20, ("skip",)), (21, ("skip",)), (33, ("skip",)), (34, ("rollback", "alert"))]
    # the snapshot of the first healthy step after the resume (22) is the one restored at 34
    assert resumed._watches[0].counts["rollbacks"] == 1 and resumed._watches[0].snapshots.steps[0] == 22
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_bad_step_just_before_a_snapshot_step_delays_the_snapshot_by_the_margin_not_a_period():
    """A NaN at step 45 kept the snapshot of step 50 from being taken (it would come less than
    `rollback_margin` healthy steps after a bad one), and the next was only taken at step 100: 54
    steps without a fresh snapshot. It is now taken at the first step with the margin (56: healthy
    since 46), and the period goes on from the multiples of `rollback_every` (100)."""
    guard = GradGuard(on_nonfinite=("rollback", "alert"), rollback_keep=5)
    trainer(max_steps=101, callbacks=[guard]).fit(FaultyMLP({45: "nan_layer"}), digits_loader(shuffle=True))
    assert [(e.step, e.actions) for e in guard.events] == [(45, ("skip", "alert"))]
    assert guard._watches[0].snapshots.steps == [0, 56, 100]


def test_the_same_trainer_fitting_again_keeps_the_lr_scale():
    """A second ``fit`` of the same Trainer goes on with the guard's events, counts and cooldown, but
    its LR scale was back to 1: the LR reduced at step 12 was the full schedule again in fit 2."""
    guard = GradGuard(on_exploding=("clip", "reduce_lr"), lr_factor=0.5, lr_cooldown=100)
    model = Scheduled("lambda")
    t = trainer(max_steps=20, callbacks=[guard])
    t.fit(model, digits_loader())
    t.fit_loop.epoch_loop.max_steps = 40
    t.fit(model, digits_loader())
    assert [e.step for e in guard.events] == [SPIKE] and guard._watches[0].lr_scale.value == 0.5
    for step in (25, 39):  # fit 2
        assert model.applied[step] == pytest.approx(0.5 * model.scheduled[step], rel=1e-4)


def test_raise_leaves_the_schedules_lr_in_the_optimizer():
    """``"raise"`` ends the step inside ``optimizer.step``, where the guard's LR scale is applied to
    the groups: their ``lr`` stayed scaled, so the checkpoint the README recommends saving then held
    the scaled LR as the schedule's, and the guard's scale (0.5) in its own state too: resumed, the
    run trained at 0.25 x the schedule."""
    from lightning_gradguard import GradientHealthError

    class NaNAt20(Scheduled):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 20 else loss

    guard = GradGuard(on_exploding=("clip", "reduce_lr"), on_nonfinite="raise", lr_factor=0.5, lr_cooldown=100)
    model = NaNAt20("steplr")
    t = trainer(max_steps=30, callbacks=[guard])
    with pytest.raises(GradientHealthError):
        t.fit(model, digits_loader())
    assert guard._watches[0].lr_scale.value == 0.5
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(model.scheduled[20])  # 0.05 * 0.5 ** 2


def test_rollback_keeps_the_schedule_of_a_recursive_scheduler():
    """A rollback loaded the snapshot's optimizer state *with its param groups*, so the groups' ``lr``
    went back to the snapshot's: a recursive schedule (``StepLR``: lr = lr * gamma) then went on from
    it, 2x its own values for the rest of the run (without ``"reduce_lr"``, nothing put it back). The
    groups now keep the schedule's hyperparameters; weights and momenta are restored."""

    class NaNTwice(Scheduled):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step in (30, 31) else loss

        def on_before_optimizer_step(self, optimizer):
            if self.net[0].weight.grad is not None:  # None: skipped, or rolled back
                super().on_before_optimizer_step(optimizer)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step - 1 not in (30, 31):
                super().on_train_batch_end(outputs, batch, batch_idx)

    guard = GradGuard(on_nonfinite=("rollback", "alert"), rollback_every=10, rollback_margin=5)
    model = NaNTwice("steplr", spike_at=-1)
    trainer(max_steps=50, callbacks=[guard]).fit(model, digits_loader())
    assert [(e.step, e.actions[0]) for e in guard.events] == [(30, "skip"), (31, "rollback")]
    for step in range(32, 50):
        assert model.scheduled[step] == pytest.approx(0.05 * 0.5 ** (step // 10))
        assert model.applied[step] == pytest.approx(model.scheduled[step], rel=1e-4)


def test_rollback_undoes_an_lr_jump_when_the_first_param_group_does_not_train():
    """The LR jump a rollback undoes was read from param group 0 alone: a first group held at lr 0
    (a backbone frozen through its LR) gave no ratio, and the scale only fell by ``lr_factor`` (0.1),
    leaving the effective LR 30x what the snapshot trained with."""

    class FrozenFirstGroup(LRJump):
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(10))

        def forward(self, x):
            return self.net(x) + self.offset

        def configure_optimizers(self):
            groups = [{"params": [self.offset], "lr": 0.0}, {"params": list(self.net.parameters())}]
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 300.0 if s >= self.JUMP else 1.0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    guard = GradGuard(on_exploding=("rollback", "reduce_lr", "alert"), lr_factor=0.1, rollback_every=20)
    trainer(max_steps=100, callbacks=[guard]).fit(FrozenFirstGroup(), digits_loader(shuffle=True))
    assert [e.actions[0] for e in guard.events[:2]] == ["skip", "rollback"]
    assert guard._watches[0].lr_scale.value == pytest.approx(1 / 300)


def test_with_two_optimizers_a_rollback_restores_its_own_parameters_only(monkeypatch):
    """The second optimizer's rollback restored the snapshot of the whole module: the first optimizer's
    weights went back too (while its Adam state did not), and its snapshots held the whole model. It
    stepped at odd global steps only, so it never took a periodic snapshot either: its rollback went
    back to step 1, undoing the whole run of both networks."""
    from lightning_gradguard.actions import Snapshots

    restored, restore = [], Snapshots.restore
    monkeypatch.setattr(Snapshots, "restore", lambda *a, **k: restored.append(restore(*a, **k)) or restored[-1])
    guard = GradGuard(on_nonfinite=("rollback", "alert"), rollback_every=10, rollback_margin=2)
    model = TwoOptimizers(nan_at=(40, 41))
    trainer(max_steps=120, callbacks=[guard]).fit(model, digits_loader(n=None))
    events = [(e.optimizer, e.step, e.actions[0]) for e in guard.events]
    # batches 40, 41: opt1 steps at odd global steps (later, b restored meets features that moved on: a spike)
    assert events[:2] == [(1, 81, "skip"), (1, 83, "rollback")]
    watch = guard._watches[1]
    assert watch.counts["rollbacks"] == 1 and 60 <= restored[0] <= 81 - 2  # a periodic snapshot of its own
    # net (optimizer 0's) went on: its weights before batch 42 are those batch 41 left, not a snapshot's
    after = model.net[0].weight.detach()
    assert not torch.equal(model.seen[41], model.seen[42]) and not torch.equal(model.seen[42], after)
    for step in (s for s in model.seen if s <= 41):
        assert not torch.equal(model.seen[42], model.seen[step])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_group_that_was_at_lr_0_in_the_snapshot_says_nothing_about_an_lr_jump():
    """A backbone group at lr 0 when the snapshot was taken (warming up from 0, or not yet unfrozen by its
    schedule) and at 0.01 now gave a ratio of 0: the rollback then drove the LR scale of every group to
    ``lr_min_scale``, the head's included, whose LR never changed. Such a group is left out of the ratio."""
    import weakref

    from lightning_gradguard.actions import LRScale, Snapshots
    from lightning_gradguard.callback import _Watch
    from lightning_gradguard.detectors import TrendDetector

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD([{"params": net[0].parameters(), "lr": 0.0}, {"params": net[1].parameters(), "lr": 0.1}])
    guard = GradGuard(on_exploding=("rollback", "reduce_lr"))
    watch = _Watch(0, None, TrendDetector(guard.config, 1), weakref.ref(opt), 2, torch.device("cpu"))
    watch.snapshots, watch.lr_scale = Snapshots(2), LRScale(opt)
    watch.snapshots.take(0, net, opt)
    opt.param_groups[0]["lr"] = 0.01  # the schedule raised the backbone's; the head's is unchanged
    assert guard._rollback(None, net, opt, watch, 100, []) and watch.rollback_lr_ratio == 1.0
    assert guard._reduce_lr(watch, 100, rolled_back=True) and watch.lr_scale.value == guard.lr_factor


class Diverging(DigitsMLP):
    """Plain SGD; from step 21 the loss is multiplied by 1.3 per step (a growth); the global gradient norm
    the optimizer applies (after the guard's clip) is kept per step."""

    def __init__(self):
        super().__init__(lr=0.05)
        self.applied: dict[int, float] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1.3 ** max(self.global_step - 20, 0)

    def on_before_optimizer_step(self, optimizer):  # after the callbacks' hook: the guard's clip is done
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.applied[self.global_step] = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_the_same_trainer_fitting_again_mid_growth_keeps_clipping_at_the_anchor():
    # the second fit builds a new optimizer over the same parameters: the anchors (and latches, snapshots)
    # were dropped, the clip limit loosened ~2x mid-divergence and the growth was reported again
    kw = dict(growth_window=10, on_exploding=("clip", "log"), spike_zscore=50, spike_min_ratio=1e3)
    torch.manual_seed(0)
    straight, model = GradGuard(**kw), Diverging()
    trainer(max_steps=44, callbacks=[straight]).fit(model, digits_loader(n=32))  # one batch: every epoch alike
    torch.manual_seed(0)
    refit, twin = GradGuard(**kw), Diverging()
    t = trainer(max_steps=36, callbacks=[refit])
    t.fit(twin, digits_loader(n=32))
    t.fit_loop.epoch_loop.max_steps = 44
    t.fit(twin, digits_loader(n=32))
    assert [(e.step, e.reason) for e in refit.events] == [(e.step, e.reason) for e in straight.events]
    assert any(e.reason == "growth" and e.step < 36 for e in straight.events)
    assert [twin.applied[s] for s in range(30, 44)] == pytest.approx([model.applied[s] for s in range(30, 44)])


def test_the_same_trainer_fitting_again_keeps_the_rollback_snapshots():
    # the first healthy step of fit 2 (12) takes a snapshot, too young (margin 5) to restore at 14: the rollback
    # needs fit 1's (5 or 10)
    guard = GradGuard(on_nonfinite=("rollback", "alert"), rollback_every=5, rollback_margin=5)
    t = trainer(max_steps=12, callbacks=[guard])
    model = FaultyMLP({13: "nan_layer", 14: "nan_layer"})
    t.fit(model, digits_loader())
    kept = list(guard._watches[0].snapshots.steps)
    t.fit_loop.epoch_loop.max_steps = 20
    t.fit(model, digits_loader())  # a new Adam over the same parameters: the snapshots still load into it
    assert kept and guard._watches[0].counts["rollbacks"] == 1
    assert [(e.step, e.actions) for e in guard.events] == [(13, ("skip", "alert")), (14, ("rollback", "alert"))]
    assert all(torch.isfinite(p).all() for p in model.parameters())
