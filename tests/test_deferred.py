"""``GradGuard(sync="deferred")``: the skip and the clip decided on the device, the host one step behind."""

import csv
import glob

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from helpers import FaultyMLP, NormRecorder, digits_loader, trainer
from lightning_gradguard import GradGuard, GradientHealthError, GuardSink


class FusedMLP(FaultyMLP):
    """FaultyMLP on a fused optimizer (the kind that reads a skip/scale verdict inside its kernel)."""

    def on_after_backward(self):
        super().on_after_backward()
        if self.faults.get(self.global_step) == "layer_spike":  # one small layer alone: the global norm barely moves
            self.net[2].bias.grad *= 40.0

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr, fused=True)  # no momentum: a step is lr * g


class WeightSteps(Callback):
    """The size of each optimizer step's change of the weights, measured around the whole step."""

    def __init__(self) -> None:
        self.before: list[torch.Tensor] = []
        self.step_norm: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        change = [p.detach() - b for p, b in zip(pl_module.parameters(), self.before)]
        self.step_norm[trainer.global_step - 1] = torch.linalg.vector_norm(torch.cat([c.flatten() for c in change])).item()


def rows(tmp_path) -> dict[int, dict]:
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    out: dict[int, dict] = {}
    for row in csv.DictReader(open(path)):
        out.setdefault(int(row["step"]), {}).update({k: v for k, v in row.items() if v != ""})
    return out


def adam_steps(model):
    return {int(s["step"]) for s in model.trainer.optimizers[0].state.values()}


@pytest.mark.parametrize("fault", ["inf", "nan_layer"])
def test_a_nonfinite_step_is_skipped_on_the_device_and_reported_at_its_own_step(fault):
    guard = GradGuard(sync="deferred")
    model = FusedMLP({7: fault}, lr=1e-2)
    trainer(max_steps=15, callbacks=[guard]).fit(model, digits_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert event.step == 7 and event.actions == ("skip", "alert")
    assert adam_steps(model) == {14}  # the fused kernel left the step count alone too
    assert guard.summary()["steps"] == 15  # the last step's statistics were read at the end of training
    assert not hasattr(model.trainer.optimizers[0], "found_inf")  # nothing left on the user's optimizer


def test_the_same_norms_events_and_thresholds_as_one_sync_per_step(tmp_path):
    logged, losses_seen = {}, {}
    for sync in ("step", "deferred"):
        guard = GradGuard(sync=sync, log_every_n_steps=1)
        torch.manual_seed(0)
        model = FusedMLP({7: "inf", 20: "spike"}, optimizer="sgd", lr=0.05)
        trainer(max_steps=25, callbacks=[guard], logger=CSVLogger(tmp_path / sync), log_every_n_steps=1).fit(
            model, digits_loader())
        logged[sync] = (rows(tmp_path / sync), [(e.step, e.kind, e.reason, e.layer, e.actions) for e in guard.events])
        losses_seen[sync] = guard._loss.seen
    (step_rows, step_events), (deferred_rows, deferred_events) = logged["step"], logged["deferred"]
    assert losses_seen["deferred"] == losses_seen["step"] == 24  # the loss trend (growth and vanishing gates) too
    assert deferred_events == step_events and [e[:2] for e in step_events] == [(7, "nonfinite"), (20, "exploding")]
    assert sorted(deferred_rows) == sorted(step_rows) == list(range(25))  # every step logged at its own step
    for step in range(21):  # the same training up to the spike (clipped alike, but not necessarily by as much)
        assert float(deferred_rows[step]["grad/norm_total"]) == pytest.approx(float(step_rows[step]["grad/norm_total"]),
                                                                                 rel=1e-6, nan_ok=True)
    # the global norm over its limit (the step's own spike threshold on both paths): scaled down to it by one
    # factor on the device; one sync per step applies the same factor, then clips a layer it left over its own
    # limit further: down to that limit at most
    step_coef, deferred_coef = float(step_rows[20]["grad/clip_coef"]), float(deferred_rows[20]["grad/clip_coef"])
    assert step_coef < 0.2 and deferred_coef < 0.2
    limit = float(deferred_rows[20]["grad/norm_clipped"])
    assert limit == pytest.approx(float(deferred_rows[20]["grad/norm_total"]) * deferred_coef, rel=1e-5)
    assert float(step_rows[20]["grad/norm_clipped"]) <= limit * (1 + 1e-5)
    assert float(deferred_rows[7]["grad/skipped_steps"]) == 1 and float(deferred_rows[20]["grad/clipped_steps"]) == 1


def test_a_layer_over_its_limit_scales_the_whole_step_down_to_it(tmp_path):
    coefs, events, clipped, after = {}, {}, {}, {}
    for sync in ("step", "deferred"):
        guard, after[sync] = GradGuard(sync=sync, log_every_n_steps=1), NormRecorder()
        torch.manual_seed(0)
        model = FusedMLP({20: "layer_spike"}, optimizer="sgd", lr=0.05)
        trainer(max_steps=22, callbacks=[guard, after[sync]], logger=CSVLogger(tmp_path / sync),
                log_every_n_steps=1).fit(model, digits_loader())
        row = rows(tmp_path / sync)[20]
        coefs[sync], clipped[sync] = float(row["grad/clip_coef"]), float(row["grad/norm_clipped"])
        events[sync] = [(e.step, e.reason, e.layer) for e in guard.events]
    assert events["deferred"] == events["step"] == [(20, "spike", "net.2")]  # the global norm is not flagged
    # one sync per step clips `net.2` alone; the device scales every gradient by the same factor
    assert coefs["deferred"] == pytest.approx(coefs["step"], rel=1e-5) and coefs["step"] < 0.9
    # grad/norm_clipped is the global norm after the clip: with `net.2` alone scaled, not the norm x its factor
    norm = after["deferred"].total[20]  # the device clips inside the optimizer: the gradients are as they were
    assert clipped["deferred"] == pytest.approx(norm * coefs["deferred"], rel=1e-5)
    assert clipped["step"] == pytest.approx(after["step"].total[20], rel=1e-5)
    assert clipped["step"] > clipped["deferred"] * 1.01


def test_the_clip_is_applied_inside_the_optimizer_at_the_spike_step(tmp_path):
    guard, steps = GradGuard(sync="deferred", log_every_n_steps=1), WeightSteps()
    model = FusedMLP({20: "spike"}, optimizer="sgd", lr=0.05)
    trainer(max_steps=25, callbacks=[guard, steps], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        model, digits_loader())
    row = rows(tmp_path)[20]
    coef, norm = float(row["grad/clip_coef"]), float(row["grad/norm_total"])
    assert coef < 0.5
    # plain SGD: the weights moved by lr x the clipped gradient, not by lr x the spike
    assert steps.step_norm[20] == pytest.approx(0.05 * norm * coef, rel=1e-3)
    assert steps.step_norm[20] < 0.05 * norm / 2


def test_a_lightning_clip_after_the_guard_sees_the_clipped_gradients(tmp_path):
    """With Trainer(gradient_clip_val) the guard multiplies the gradients itself (Lightning measures them next)."""
    guard, after = GradGuard(sync="deferred", log_every_n_steps=1), NormRecorder()
    model = FusedMLP({20: "spike"}, optimizer="sgd", lr=0.05)
    trainer(max_steps=22, callbacks=[guard, after], logger=CSVLogger(tmp_path), log_every_n_steps=1,
            gradient_clip_val=1e6).fit(model, digits_loader())
    row = rows(tmp_path)[20]
    assert float(row["grad/clip_coef"]) < 0.5
    assert after.total[20] == pytest.approx(float(row["grad/norm_total"]) * float(row["grad/clip_coef"]), rel=1e-4)


def test_a_plain_optimizer_is_refused_when_a_skip_is_asked_for_and_clipped_by_a_multiply_otherwise(tmp_path):
    with pytest.raises(ValueError, match=r"optimizer 0 is Adam without it\. Create it with fused=True"):
        trainer(max_steps=3, callbacks=[GradGuard(sync="deferred")]).fit(FaultyMLP({}), digits_loader())
    guard, after = GradGuard(sync="deferred", on_nonfinite="log", log_every_n_steps=1), NormRecorder()
    trainer(max_steps=22, callbacks=[guard, after], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        FaultyMLP({20: "spike"}), digits_loader())
    row = rows(tmp_path)[20]
    assert float(row["grad/clip_coef"]) < 0.5
    assert after.total[20] == pytest.approx(float(row["grad/norm_total"]) * float(row["grad/clip_coef"]), rel=1e-4)


def test_a_stop_without_skip_is_refused_where_the_optimizers_could_skip():
    """``on_nonfinite=("stop", "alert")`` with ``sync="deferred"``: the stop comes a step late, after the NaN update
    (and the next) reached the weights. Taken at construction, for optimizers that cannot skip on the device; with
    fused ones, which can, refused at the start of the fit."""
    guard = GradGuard(sync="deferred", on_nonfinite=("stop", "alert"))
    with pytest.raises(ValueError, match=r"`on_nonfinite=\('stop', 'alert'\)` with sync='deferred': the stop comes a "
                                         r"step late.*on_nonfinite=\('skip', 'stop', 'alert'\)"):
        trainer(max_steps=3, callbacks=[guard]).fit(FusedMLP({}), digits_loader())
    guard = GradGuard(sync="deferred", on_nonfinite=("stop", "alert"), on_exploding="log")  # Adam, not fused
    trainer(max_steps=3, callbacks=[guard]).fit(FaultyMLP({}), digits_loader())
    assert guard._watches[0].counts["steps"] == 3


def test_bad_settings_are_refused_at_construction():
    with pytest.raises(ValueError, match=r"`sync` must be one of 'step', 'deferred', got 'async'"):
        GradGuard(sync="async")
    with pytest.raises(ValueError, match=r"`sync='deferred'` cannot be combined with the 'rollback' response"):
        GradGuard(sync="deferred", on_nonfinite=("skip", "rollback"))


def test_a_second_deferred_guard_that_only_logs_does_not_cancel_the_first_ones_skip():
    # both hand a verdict to the same fused optimizer; the second's "no skip" once removed the first's skip
    guards = [GradGuard(sync="deferred"),
              GradGuard(sync="deferred", prefix="watch/", on_nonfinite="log", on_exploding="log")]
    model = FusedMLP({7: "nan_layer", 11: "spike"}, lr=1e-2)
    trainer(max_steps=15, callbacks=guards).fit(model, digits_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert adam_steps(model) == {14}  # step 7 skipped by the device (Adam step count 14 of 15)
    assert [(e.step, e.actions) for e in guards[0].events] == [(7, ("skip", "alert")), (11, ("clip", "alert"))]
    assert [(e.step, e.actions) for e in guards[1].events] == [(7, ("log",)), (11, ("log",))]


def test_two_verdicts_for_one_step_combine():
    from lightning_gradguard.actions import DeviceVerdict

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0, fused=True)
    first, second = DeviceVerdict(opt), DeviceVerdict(opt)
    p.grad = torch.full((2,), 8.0)
    first.set(found_inf=torch.tensor(0.0), grad_scale=torch.tensor(2.0))
    second.set(found_inf=torch.tensor(0.0), grad_scale=torch.tensor(8.0))  # the tighter clip wins
    opt.step()
    assert p.tolist() == [0.0, 0.0] and not hasattr(opt, "grad_scale")
    first.set(found_inf=torch.tensor(1.0))
    second.set(found_inf=None, grad_scale=None)  # says nothing: the first's skip stands
    opt.step()
    assert p.tolist() == [0.0, 0.0]
    first.set(found_inf=torch.tensor(1.0))
    second.remove()  # takes only its own hand-over away
    assert opt.found_inf.item() == 1.0
    first.remove()
    assert not hasattr(opt, "found_inf")


def test_a_stop_read_while_a_checkpoint_is_saved_takes_effect_where_it_would_without_one(tmp_path):
    ends = []
    for every in (None, 1):
        guard = GradGuard(sync="deferred", on_nonfinite=("skip", "stop"))
        saving = [ModelCheckpoint(dirpath=tmp_path / str(every), every_n_train_steps=every, save_top_k=-1)
                  ] if every else []
        t = trainer(max_steps=15, callbacks=[guard, *saving], enable_checkpointing=bool(every))
        t.fit(FusedMLP({5: "nan_layer"}), digits_loader())
        assert [(e.step, e.actions) for e in guard.events] == [(5, ("skip", "stop"))]
        ends.append(t.global_step)
    assert ends == [7, 7]  # read in step 6's hook: stops after step 6, saved every step or not


def test_raise_comes_one_step_late_and_the_nan_never_reaches_the_weights():
    guard = GradGuard(sync="deferred", on_nonfinite=("skip", "raise"))
    model = FusedMLP({5: "nan_layer"})
    with pytest.raises(GradientHealthError, match=r"step 5: non-finite gradients \(NaN\) in 1 layer: `net.2`"):
        trainer(max_steps=10, callbacks=[guard]).fit(model, digits_loader())
    assert model.trainer.global_step == 6  # raised in step 6's hook, before its update
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_fault_at_the_last_step_is_read_at_the_end_of_training():
    guard = GradGuard(sync="deferred", on_nonfinite=("skip", "raise"))
    model = FusedMLP({9: "inf"})
    with pytest.raises(GradientHealthError, match=r"step 9: non-finite"):
        trainer(max_steps=10, callbacks=[guard]).fit(model, digits_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_fault_read_while_the_last_checkpoint_is_saved_still_raises(tmp_path):
    guard = GradGuard(sync="deferred", on_nonfinite=("skip", "raise"))
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=10)  # after the last step: reads step 9
    with pytest.raises(GradientHealthError, match=r"step 9: non-finite"):
        trainer(max_steps=10, callbacks=[guard, checkpoints], enable_checkpointing=True).fit(
            FusedMLP({9: "inf"}), digits_loader())
    assert glob.glob(f"{tmp_path}/*step=10.ckpt")  # the checkpoint was written, with the event in it


def test_a_checkpoint_holds_the_step_in_flight_and_a_resume_goes_on_from_it(tmp_path):
    def run(sync, folder, ckpt_path=None):
        guard = GradGuard(sync=sync)
        torch.manual_seed(0)
        model = FusedMLP({3: "inf", 9: "nan_layer"}, lr=1e-2)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=6, save_top_k=-1)
        trainer(max_steps=14, callbacks=[guard, checkpoints], enable_checkpointing=True).fit(
            model, digits_loader(), ckpt_path=ckpt_path)
        return guard, model

    def saved(folder):
        (path,) = glob.glob(f"{tmp_path}/{folder}/*step=6.ckpt")
        return path, next(v for k, v in torch.load(path, weights_only=False)["callbacks"].items() if "GradGuard" in k)

    run("step", "step")
    run("deferred", "deferred")
    (_, one_sync), (path, deferred) = saved("step"), saved("deferred")
    # the step in flight was read before saving: the checkpoint holds what one sync per step holds
    assert deferred["watches"][0]["counts"] == one_sync["watches"][0]["counts"]
    assert deferred["watches"][0]["counts"]["steps"] == 6 and deferred["event_counts"]["nonfinite"] == 1
    for name, value in one_sync["watches"][0]["detector"].items():
        assert deferred["watches"][0]["detector"][name] == pytest.approx(value, rel=1e-6, nan_ok=True), name
    resumed, model = run("deferred", "resumed", ckpt_path=path)
    assert [(e.step, e.kind) for e in resumed.events] == [(3, "nonfinite"), (9, "nonfinite")]
    assert resumed.summary()["steps"] == 14 and resumed._watches[0].counts["skipped"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_device_half_of_a_step_reads_nothing_back_to_the_host(monkeypatch, tmp_path):
    """Every way a tensor's value reaches Python is watched while the guard reads and decides on the
    device: none may happen (on a GPU each would be a sync). The same watch sees the one copy per step
    of sync="step"."""
    calls: list[str] = []
    armed = [0]  # depth of watched calls (one may call another)
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, __name=name, __original=original, **kwargs):
            if armed[0]:
                calls.append(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)

    def watched(method):
        original = getattr(GradGuard, method)

        def run(self, *args, **kwargs):
            armed[0] += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                armed[0] -= 1

        monkeypatch.setattr(GradGuard, method, run)

    for method in ("_read_on_device", "_decide_on_device"):
        watched(method)
    guard = GradGuard(sync="deferred", log_every_n_steps=1, on_exploding=("skip", "alert"))
    trainer(max_steps=30, callbacks=[guard], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        FusedMLP({7: "inf", 20: "spike"}, optimizer="sgd", lr=0.05), digits_loader())
    assert [(e.step, e.actions) for e in guard.events] == [(7, ("skip", "alert")), (20, ("skip", "alert"))]
    assert calls == []
    watched("_read_and_copy")  # sync="step": the one copy per step
    guard = GradGuard(log_every_n_steps=1)
    trainer(max_steps=5, callbacks=[guard]).fit(FusedMLP({}), digits_loader())
    assert len([c for c in calls if c in ("cpu", "tolist")]) == 5  # one copy per step: .cpu() or .tolist()


class TwoFusedOptimizers(FusedMLP):
    """Manual optimization, two fused optimizers (a GAN's alternating steps); NaN planted in part b's gradients."""

    def __init__(self, nan_at: int | None = None):
        super().__init__({})
        self.automatic_optimization = False
        self.b = torch.nn.Linear(10, 10)
        self.nan_at, self.batches = nan_at, 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        opt_a.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self.net(x), y))
        opt_a.step()
        opt_b.zero_grad()
        self.manual_backward(torch.nn.functional.cross_entropy(self.b(self.net(x).detach()), y))
        if self.batches == self.nan_at:
            self.b.weight.grad[0, 0] = float("nan")
        opt_b.step()
        self.batches += 1

    def configure_optimizers(self):
        return (torch.optim.Adam(self.net.parameters(), 1e-2, fused=True),
                torch.optim.Adam(self.b.parameters(), 1e-2, fused=True))


def test_two_optimizers_each_have_their_own_step_in_flight():
    guard = GradGuard(sync="deferred")
    model = TwoFusedOptimizers(nan_at=5)
    trainer(max_steps=20, callbacks=[guard]).fit(model, digits_loader())
    assert [w.counts["steps"] for w in guard._watches.values()] == [10, 10]  # both read to the end
    (event,) = guard.events
    assert (event.optimizer, event.layer, event.actions) == (1, "b", ("skip", "alert"))
    assert event.step == 11  # global_step counts both optimizers' steps: batch 5's second one
    assert all(torch.isfinite(p).all() for p in model.parameters())


class TotalSink(GuardSink):
    def __init__(self):
        self.total: dict[int, float] = {}

    def on_step(self, guard, trainer, *, step, norms, **kwargs):
        self.total[step] = float(norms[0])


@pytest.mark.parametrize("precision", ["bf16-mixed", "accumulate"])
def test_the_statistics_are_those_of_the_gradients_the_optimizer_gets(precision):
    kwargs = {"accumulate_grad_batches": 3} if precision == "accumulate" else {"precision": precision}
    sink, seen = TotalSink(), NormRecorder()
    guard = GradGuard(sync="deferred", sinks=[sink])
    trainer(max_steps=6, callbacks=[seen, guard], **kwargs).fit(FusedMLP({}), digits_loader())
    assert sorted(sink.total) == sorted(seen.total) == list(range(6))
    for step, norm in sink.total.items():
        assert norm == pytest.approx(seen.total[step], rel=1e-5)


def test_refused_with_a_fp16_grad_scaler():
    from lightning.pytorch.plugins import MixedPrecision

    scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match=r"`sync='deferred'` does not work with a fp16 GradScaler"):
        trainer(max_steps=2, callbacks=[GradGuard(sync="deferred")], plugins=[scaler]).fit(FusedMLP({}), digits_loader())


class MomentumSGD(FusedMLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, fused=True)


def test_a_momentum_sgd_skips_its_very_first_update_without_garbage_in_its_buffers():
    """torch's fused SGD creates its momentum buffers uninitialised and fills them in the first update: that
    step's skip is taken on the host (one sync), not left to found_inf."""
    guard = GradGuard(sync="deferred")
    model = MomentumSGD({0: "nan_layer"})
    trainer(max_steps=4, callbacks=[guard]).fit(model, digits_loader())
    assert [(e.step, e.actions) for e in guard.events] == [(0, ("skip", "alert"))]
    assert all(torch.isfinite(p).all() and p.abs().max() < 10 for p in model.parameters())


def test_the_first_steps_are_clipped_before_anything_was_read_back():
    guard = GradGuard(sync="deferred", max_norm=0.05)  # a limit known before the first step
    trainer(max_steps=3, callbacks=[guard]).fit(FusedMLP({}, optimizer="sgd", lr=0.05), digits_loader())
    assert [(e.step, e.reason, "clip" in e.actions) for e in guard.events] == [
        (0, "max_norm", True), (1, "max_norm", True), (2, "max_norm", True)]
    assert guard._watches[0].counts["clipped"] == 3


@pytest.fixture
def float64_default():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_the_verdict_is_float32_under_a_float64_default_dtype_and_a_huge_max_norm(float64_default, tmp_path):
    """The fused kernels take float32 ``found_inf`` / ``grad_scale`` only: a limit tensor built in torch's
    default dtype (float64 here, a float32 model) failed the optimizer step itself, a crash; and a finite
    limit beyond float32's range (``max_norm=1e39``, the limit of the first steps) failed the guard's step."""
    guard, steps = GradGuard(sync="deferred", max_norm=1e39, log_every_n_steps=1), WeightSteps()
    model = FusedMLP({20: "spike"}, optimizer="sgd", lr=0.05).float()
    trainer(max_steps=22, callbacks=[guard, steps], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        model, digits_loader())
    assert guard.internal_errors == 0
    (event,) = guard.events
    assert (event.step, event.reason, event.actions) == (20, "spike", ("clip", "alert"))
    row = rows(tmp_path)[20]
    coef, norm = float(row["grad/clip_coef"]), float(row["grad/norm_total"])
    assert coef < 0.5  # the clip acted in the kernel: plain SGD moved the weights by lr x the clipped norm
    assert steps.step_norm[20] == pytest.approx(0.05 * norm * coef, rel=1e-3)


def test_a_resumed_run_clips_its_first_step_with_the_restored_thresholds(tmp_path):
    class Times100(FusedMLP):
        def on_after_backward(self):
            if self.faults.get(self.global_step) == "x100":
                for p in self.parameters():
                    p.grad *= 100

    torch.manual_seed(0)
    trainer(max_steps=12, callbacks=[GradGuard(sync="deferred"), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=12)],
            enable_checkpointing=True).fit(Times100({}, optimizer="sgd", lr=0.05), digits_loader())
    (path,) = glob.glob(f"{tmp_path}/*.ckpt")
    torch.manual_seed(0)
    guard, steps = GradGuard(sync="deferred"), WeightSteps()
    trainer(max_steps=14, callbacks=[guard, steps]).fit(Times100({12: "x100"}, optimizer="sgd", lr=0.05),
                                                      digits_loader(), ckpt_path=path)
    assert [(e.step, e.reason, e.actions) for e in guard.events] == [(12, "spike", ("clip", "alert"))]
    assert steps.step_norm[12] < 10 * steps.step_norm[13]  # clipped to its spike threshold, not 100x a step


def test_the_step_in_flight_is_read_before_a_param_group_joins():
    class Unfreezing(FusedMLP):
        def configure_optimizers(self):
            return torch.optim.Adam(self.net[2:].parameters(), lr=self.lr, fused=True)

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 6:  # as BackboneFinetuning does
                self.trainer.optimizers[0].add_param_group({"params": list(self.net[:2].parameters())})

    guard = GradGuard(sync="deferred")
    trainer(max_steps=10, callbacks=[guard]).fit(Unfreezing({5: "nan_layer"}), digits_loader())
    assert [(e.step, e.kind, e.actions) for e in guard.events] == [(5, "nonfinite", ("skip", "alert"))]
    assert guard.summary()["steps"] == 10 and guard._watches[0].counts["skipped"] == 1 and guard._loss.seen == 9


def test_a_step_that_fails_to_be_read_leaves_the_next_one_guarded(monkeypatch):
    original = GradGuard._findings

    def flaky(self, watch, host, step, **kwargs):
        if step == 19:
            raise RuntimeError("boom")
        return original(self, watch, host, step, **kwargs)

    monkeypatch.setattr(GradGuard, "_findings", flaky)
    guard, steps = GradGuard(sync="deferred"), WeightSteps()
    trainer(max_steps=23, callbacks=[guard, steps]).fit(FusedMLP({20: "spike"}, optimizer="sgd", lr=0.05),
                                                      digits_loader())
    assert guard.internal_errors == 1
    assert [(e.step, e.reason, e.actions) for e in guard.events] == [(20, "spike", ("clip", "alert"))]
    assert steps.step_norm[20] < 5 * steps.step_norm[19]


def test_the_logged_lr_is_the_one_of_its_own_step(tmp_path):
    class Decaying(FusedMLP):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.05, fused=True)
            decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    guard = GradGuard(sync="deferred", on_exploding=("clip", "reduce_lr"), lr_factor=0.5, log_every_n_steps=1)
    trainer(max_steps=16, callbacks=[guard], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        Decaying({12: "spike"}), digits_loader())
    assert [(e.step, e.actions) for e in guard.events] == [(12, ("clip", "reduce_lr"))]
    for step, row in rows(tmp_path).items():
        scale = 0.5 if step > 12 else 1.0  # reduced in step 13's hook, one step late
        assert float(row["grad/lr"]) == pytest.approx(0.05 / (1 + step) * scale), step
        assert float(row["grad/lr_scale"]) == scale, step


def test_a_raise_held_when_a_run_crashed_is_not_raised_in_the_next_fit(tmp_path):
    class Crashing(FusedMLP):
        def training_step(self, batch, batch_idx):
            if self.global_step == 5:
                raise ValueError("a data error")
            return super().training_step(batch, batch_idx)

    guard = GradGuard(sync="deferred", on_nonfinite=("skip", "raise"))
    with pytest.raises(ValueError, match="a data error"):  # the checkpoint at step 5 read step 4's NaN first
        trainer(max_steps=10, callbacks=[guard, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5)],
                enable_checkpointing=True).fit(Crashing({4: "inf"}), digits_loader())
    assert [(e.step, e.kind) for e in guard.events] == [(4, "nonfinite")]
    trainer(max_steps=10, callbacks=[guard]).fit(FusedMLP({}), digits_loader())  # a healthy run: no stale raise
    assert guard.events == [] and guard.summary()["steps"] == 10  # another Trainer: a new run


def test_a_landed_step_is_written_to_the_loggers_inside_the_next_hook(tmp_path, monkeypatch):
    """Not in Lightning's logger call at the end of the step (on a GPU: after its sync, the device idle)."""
    inside = [False]
    original = GradGuard.on_before_optimizer_step

    def hook(self, *args):
        inside[0] = True
        try:
            return original(self, *args)
        finally:
            inside[0] = False

    monkeypatch.setattr(GradGuard, "on_before_optimizer_step", hook)
    written: list[tuple[int, bool]] = []

    class Spy(CSVLogger):
        def log_metrics(self, metrics, step=None):
            if "grad/norm_total" in metrics:
                written.append((step, inside[0]))
            return super().log_metrics(metrics, step)

    trainer(max_steps=8, callbacks=[GradGuard(sync="deferred", log_every_n_steps=1)], logger=Spy(tmp_path),
            log_every_n_steps=1).fit(FusedMLP({}), digits_loader())
    assert written == [(step, step < 7) for step in range(8)]  # the last one at the end of training


def test_gradients_whose_float32_squares_overflow_are_skipped_as_non_finite():
    """sync='step' re-reads such a step in float64 and clips it (test_responses); here the gradients are gone
    by the time the host reads the step, and the device took the Inf sum for one: skipped, said so."""

    class Huge(FusedMLP):
        def on_after_backward(self):
            if self.global_step == 12:
                self.net[2].weight.grad.mul_(1e22)  # entries ~1e20: finite, their float32 squares are not

    guard = GradGuard(sync="deferred")
    model = Huge({})
    trainer(max_steps=16, callbacks=[guard]).fit(model, digits_loader())
    assert [(e.step, e.kind, e.reason, e.actions) for e in guard.events] == [(12, "nonfinite", "inf", ("skip", "alert"))]
    assert all(torch.isfinite(p).all() for p in model.parameters())


class Growing(FusedMLP):
    """The loss, and so every gradient, grows x1.2 per step from step 30 (to x200): sustained growth."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * min(1.2 ** max(self.global_step - 30, 0), 200.0)


def test_exploding_skip_does_not_drop_every_step_of_a_growth():
    """The growth anchors are clip limits: with "skip" they would hold the norm above them forever."""
    counts = {}
    for sync in ("step", "deferred"):
        guard = GradGuard(sync=sync, on_exploding=("skip", "alert"))
        torch.manual_seed(0)
        trainer(max_steps=200, callbacks=[guard]).fit(Growing({}, lr=1e-3), digits_loader(n=None))
        counts[sync] = guard._watches[0].counts["skipped"]
    assert counts["step"] < 20 and counts["deferred"] <= counts["step"] + 5  # not the 160 of the growth's steps


def test_a_run_of_device_skips_the_host_flagged_nothing_in_still_stops(monkeypatch):
    """max_consecutive_skips without an event at those steps: the limits were the device's, not the host's."""
    original = GradGuard._limits

    def tight(self, watch):  # limits far below every norm: the device skips, the detector flags nothing
        limits = original(self, watch)
        return None if limits is None else np.full_like(limits, 1e-9)

    monkeypatch.setattr(GradGuard, "_limits", tight)
    guard = GradGuard(sync="deferred", on_exploding=("skip", "alert"), max_consecutive_skips=3)
    t = trainer(max_steps=30, callbacks=[guard])
    t.fit(FusedMLP({}), digits_loader())
    # the third skip, read in step 3's hook, stops the run after step 3 (skipped too, read at the end)
    assert t.global_step == 4 and guard._watches[0].counts["skipped"] == 4 and guard.events == []


def test_a_layer_unfrozen_mid_run_is_not_clipped_against_the_old_global_limit(tmp_path):
    class Unfreezing(FusedMLP):
        def on_train_start(self):
            self.net[0].requires_grad_(False)

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 20:
                self.net[0].requires_grad_(True)

        def on_after_backward(self):
            if self.global_step >= 20:
                self.net[0].weight.grad *= 30  # a layer with large gradients joins: the global norm jumps

    guard = GradGuard(sync="deferred", log_every_n_steps=1)
    trainer(max_steps=22, callbacks=[guard], logger=CSVLogger(tmp_path), log_every_n_steps=1).fit(
        Unfreezing({}), digits_loader())
    row = rows(tmp_path)[20]
    assert float(row["grad/norm_total"]) > 10 * float(rows(tmp_path)[19]["grad/norm_total"])
    assert float(row["grad/clip_coef"]) == 1.0 and guard.events == []  # as with sync="step": a newcomer


def test_a_nan_applied_without_skip_is_not_blamed_on_an_earlier_update():
    """Without "skip" the NaN step is applied; when the host reads it, the weights hold NaN from that very
    update: reported as the non-finite gradients it was, not as weights broken before."""
    guard = GradGuard(sync="deferred", on_nonfinite="log")
    trainer(max_steps=8, callbacks=[guard]).fit(FusedMLP({5: "nan_layer"}), digits_loader())
    assert (guard.events[0].step, guard.events[0].reason) == (5, "nan")


def test_a_crash_still_reports_the_step_in_flight():
    class Crashing(FusedMLP):
        def training_step(self, batch, batch_idx):
            if self.global_step == 10:
                raise ValueError("a data error")
            return super().training_step(batch, batch_idx)

    guard = GradGuard(sync="deferred")
    with pytest.raises(ValueError, match="a data error"):
        trainer(max_steps=20, callbacks=[guard]).fit(Crashing({9: "nan_layer"}), digits_loader())
    assert [(e.step, e.reason, e.actions) for e in guard.events] == [(9, "nan", ("skip", "alert"))]
    assert guard.summary()["steps"] == 10
