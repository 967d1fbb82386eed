"""Responses in a real Trainer: skip, clip, raise, stop, alert, reduce_lr, rollback."""

import logging

import pytest
import torch

from helpers import DigitsMLP, FaultyMLP, NormRecorder, digits_loader, trainer
from lightning_gradguard import GradGuard, GradientHealthError


def adam_steps(model):
    opt_state = model.trainer.optimizers[0].state
    return {int(s["step"]) for s in opt_state.values()}


@pytest.mark.parametrize("fault", ["inf", "nan_layer"])
def test_default_guard_skips_nonfinite_step_and_leaves_optimizer_state_alone(fault):
    guard = GradGuard()
    model = FaultyMLP({7: fault}, lr=1e-2)
    trainer(max_steps=15, callbacks=[guard]).fit(model, digits_loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (event,) = [e for e in guard.events if e.kind == "nonfinite"]
    assert event.step == 7 and event.actions == ("skip", "alert")
    if fault == "nan_layer":
        assert event.layer == "net.2" and event.layers == ("net.2",)
    else:
        assert event.layer == "net.0"  # the first layer in model order
    assert adam_steps(model) == {14}  # 15 optimizer calls, one of them skipped: Adam's count is untouched


def test_without_guard_the_same_fault_poisons_the_weights():
    model = FaultyMLP({7: "inf"}, lr=1e-2)
    trainer(max_steps=10).fit(model, digits_loader())
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_raise_names_kind_step_layer_and_numbers():
    guard = GradGuard(on_nonfinite="raise")
    model = FaultyMLP({5: "nan_layer"})
    with pytest.raises(GradientHealthError, match=r"step 5: non-finite gradients \(NaN\) in 1 layer: `net.2`; global norm nan -> raise") as info:
        trainer(max_steps=10, callbacks=[guard]).fit(model, digits_loader())
    assert info.value.events[0].kind == "nonfinite"
    assert isinstance(info.value, RuntimeError)


def test_stop_ends_fit_gracefully_with_the_reason_logged(caplog):
    ended = []

    class EndProbe(GradGuard):
        def on_train_end(self, trainer, pl_module):
            ended.append(trainer.global_step)

    guard = EndProbe(on_nonfinite=("skip", "stop"))
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=30, callbacks=[guard]).fit(FaultyMLP({6: "inf"}), digits_loader())
    assert ended == [7]  # stopped after the faulty (skipped) step; end-of-fit hooks ran
    assert "GradGuard stopped training: step 6: non-finite" in caplog.text


def test_clip_bounds_a_spike_and_logs_the_coefficient(caplog, tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    import csv, glob

    guard = GradGuard(log_every_n_steps=50)
    before, after = NormRecorder(), NormRecorder()  # around the guard: the gradients as they came, and clipped
    model = FaultyMLP({20: "spike"}, optimizer="sgd", lr=0.05)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=25, callbacks=[before, guard, after], logger=CSVLogger(tmp_path)).fit(model, digits_loader())
    (event,) = guard.events
    assert event.kind == "exploding" and event.step == 20 and event.reason == "spike"
    assert event.actions == ("clip", "alert") and event.value > 10 * event.threshold
    assert "step 20: grad norm of" in caplog.text
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    (row,) = [r for r in csv.DictReader(open(path)) if r.get("grad/clip_coef")]  # logged because of the event
    assert int(row["step"]) == 20
    coef = float(row["grad/clip_coef"])
    assert 0 < coef < 0.5
    assert float(row["grad/norm_clipped"]) == pytest.approx(after.total[20], rel=1e-4)
    # clip_coef is the smallest factor any layer's gradient was multiplied by
    factors = [after.layers[20][layer] / norm for layer, norm in before.layers[20].items()]
    assert min(factors) == pytest.approx(coef, rel=1e-4) and max(factors) <= 1 + 1e-6
    assert float(row["grad/clipped_steps"]) == 1


def test_log_only_records_without_touching_training():
    guard = GradGuard(on_nonfinite="log", on_exploding="log", on_vanishing="log")
    model = FaultyMLP({4: "inf"})
    trainer(max_steps=8, callbacks=[guard]).fit(model, digits_loader())
    assert guard.events[0].step == 4
    assert {e.actions for e in guard.events} == {("log",)}
    # nobody asked for protection: the NaN reached the weights, and every later step is NaN too
    assert [e.step for e in guard.events] == [4, 5, 6, 7]
    assert not all(torch.isfinite(p).all() for p in model.parameters())


def test_repeated_faults_alert_once_per_quiet_window(caplog):
    guard = GradGuard(alert_quiet_steps=100)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=12, callbacks=[guard]).fit(FaultyMLP({4: "inf", 5: "inf", 9: "inf"}), digits_loader())
    assert [e.step for e in guard.events] == [4, 5, 9]
    assert [e.actions for e in guard.events] == [("skip", "alert"), ("skip",), ("skip",)]
    assert caplog.text.count("GradGuard: step") == 1


def test_persistent_nonfinite_stops_after_max_consecutive_skips(caplog):
    guard = GradGuard(max_consecutive_skips=4)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t = trainer(max_steps=40, callbacks=[guard])
        t.fit(FaultyMLP({s: "inf" for s in range(6, 40)}), digits_loader())
    assert t.global_step == 10  # steps 6-9 skipped, then stopped
    # alerted although the layer alerted at step 6, within alert_quiet_steps: the run stopped
    assert [e.actions for e in guard.events] == [("skip", "alert")] + [("skip",)] * 2 + [("skip", "alert", "stop")]
    assert "4 steps skipped in a row: max_consecutive_skips" in caplog.text


def test_a_stopped_run_that_keeps_stepping_alerts_its_stop_once(caplog):
    # Trainer(min_steps) trains on after the stop: every later step stops again, and each once alerted
    guard = GradGuard(max_consecutive_skips=3)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t = trainer(max_steps=40, min_steps=30, callbacks=[guard])
        t.fit(FaultyMLP({s: "inf" for s in range(5, 40)}), digits_loader())
    stops = [e for e in guard.events if "stop" in e.actions]
    assert len(stops) > 10 and [e.step for e in guard.events if "alert" in e.actions] == [5, stops[0].step]
    assert caplog.text.count("GradGuard: step") == 2


class HugeGradient(FaultyMLP):
    """At step HUGE ``net.2``'s weight gradient is scaled by 1e22: entries ~1e20, finite, but their
    float32 squares overflow, so a plain float32 norm reads Inf."""

    HUGE = 12

    def on_after_backward(self):
        if self.global_step == self.HUGE:
            self.net[2].weight.grad.mul_(1e22)


def test_huge_finite_gradients_are_exploding_and_clipped_not_called_nonfinite():
    ref = NormRecorder()  # float64 norms, before the guard acts
    guard = GradGuard()
    model = HugeGradient({})
    trainer(max_steps=20, callbacks=[ref, guard]).fit(model, digits_loader())
    step = HugeGradient.HUGE
    assert [(e.step, e.kind, e.layer) for e in guard.events] == [(step, "exploding", "net.2")]
    (event,) = guard.events
    assert "clip" in event.actions and "non-finite" not in event.message
    assert event.value == pytest.approx(ref.layers[step]["net.2"], rel=1e-5)  # ~1e21, read in float64
    assert guard._watches[0].counts["clipped"] == 1 and guard._watches[0].counts["skipped"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_huge_finite_gradients_on_the_numpy_path_of_a_deep_model():
    # 122 layers: the detector and the host sums run in numpy (more than 112 series)
    import lightning.pytorch as pl
    from torch import nn

    class Deep(pl.LightningModule):
        def __init__(self):
            super().__init__()
            blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(120)]
            self.net = nn.Sequential(nn.Linear(64, 16), *blocks, nn.Linear(16, 10))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def on_after_backward(self):
            if self.global_step == 12:
                self.net[5][0].weight.grad.fill_(1e20)  # finite; the float32 sum of squares overflows

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    guard, model = GradGuard(), Deep()
    trainer(max_steps=16, callbacks=[guard]).fit(model, digits_loader())
    assert guard._watches[0].detector.vectorized
    # through 120 tanh blocks the gradient of net.5 underflows to exactly 0: its own series has no
    # running level, so the global norm's spike is the finding, and the message says where it is
    assert [(e.step, e.kind, e.layer) for e in guard.events] == [(12, "exploding", None)]
    assert guard.events[0].value == pytest.approx(1e20 * 16, rel=1e-6)  # 256 entries of 1e20
    assert guard.events[0].message.endswith("; 100% of it in `net.5.0` -> clip, alert")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_under_trainer_value_clipping_neither_crashes_nor_loses_the_clipping():
    # Lightning clips after the guard's hook; torch's clip_grad_value_ fails on a step without any
    # gradient (RuntimeError "Expected !nested_tensorlist[0].empty()"): the run crashed at step 5
    class Watched(FaultyMLP):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            self.largest = {}  # max |g| as the optimizer sees it (after Lightning's clipping)

            def record(optimizer, args, kwargs):  # post-hook: the closure (hooks, clipping) ran inside step
                grads = [p.grad for p in self.parameters() if p.grad is not None]
                self.largest[self.global_step] = max((g.abs().max().item() for g in grads), default=None)

            opt.register_step_post_hook(record)
            return opt

    guard = GradGuard()
    model = Watched({5: "nan_layer"})
    t = trainer(max_steps=10, callbacks=[guard], gradient_clip_val=0.01, gradient_clip_algorithm="value")
    t.fit(model, digits_loader())
    assert [(e.step, e.actions) for e in guard.events] == [(5, ("skip", "alert"))]
    assert model.largest[5] is None  # skipped: no gradient reached the update
    assert all(model.largest[s] == pytest.approx(0.01) for s in range(10) if s != 5)  # clipped, also after
    assert t.gradient_clip_val == 0.01
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("on_nonfinite", [("skip", "alert"), ("rollback", "alert")])
def test_weights_broken_by_the_optimizer_are_named_and_the_run_ends_at_once(on_nonfinite):
    # pure fp16 weights with Adam: eps=1e-8 is 0 in fp16, and the always-zero pixels of the digits give
    # zero gradients, so step 0's update is 0/0 = NaN from finite gradients. Every later gradient is
    # NaN; before, the guard skipped 25 steps saying "non-finite gradients" and then stopped
    guard = GradGuard(on_nonfinite=on_nonfinite)
    model = FaultyMLP({})
    t = trainer(max_steps=48, callbacks=[guard], precision="16-true")
    t.fit(model, digits_loader())
    first = guard.events[0]
    assert (first.step, first.kind, first.reason, first.layer) == (1, "nonfinite", "weights", "net.0")
    assert "the weights of `net.0`, `net.2`, `net.4` are non-finite already" in first.message
    last = guard.events[-1]
    assert "stop" in last.actions
    if on_nonfinite[0] == "skip":
        assert len(guard.events) == 1 and t.global_step == 2  # stopped at once, not after 25 skips
        assert "(the weights are non-finite: skipping cannot repair them)" in last.message
    else:  # damage at once: rolled back to the snapshot of step 0, which the same update breaks again
        assert first.actions[0] == "rollback"
        assert guard._watches[0].counts["rollbacks"] == 3 and "max_rollbacks" in last.message
        assert t.global_step < 10


@pytest.mark.parametrize("depth", [2, 120], ids=["python-floats", "numpy"])
@pytest.mark.parametrize("bound", ["max_norm", "max_grad_weight_ratio"])
def test_a_ceiling_at_the_first_step_clips_to_the_ceiling_not_to_zero(bound, depth):
    """At the first step no series has a running level, and its spike threshold was reported as 0
    (10 ** -inf): a ceiling (``max_norm``, the gradient/weight ratio) flagged there clipped the
    gradient to 0 (``clip_coef`` 0, the optimizer got nothing) instead of to the ceiling, while
    ``sync="deferred"`` clipped it right. Both detector paths (Python floats; numpy beyond 112 series)."""
    import lightning.pytorch as pl

    class WeightNorm(pl.Callback):
        def __init__(self):
            self.total = {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            weights = torch.cat([p.detach().flatten().double() for p in pl_module.parameters()])
            self.total[trainer.global_step] = torch.linalg.vector_norm(weights).item()

    before, after, weights = NormRecorder(), NormRecorder(), WeightNorm()  # around the guard
    kwargs = {"max_norm": 1e-3} if bound == "max_norm" else {"max_grad_weight_ratio": 1e-3}
    guard = GradGuard(**kwargs)
    model = DigitsMLP(hidden=16, depth=depth)
    trainer(max_steps=3, callbacks=[before, weights, guard, after]).fit(model, digits_loader())
    assert guard._watches[0].detector.vectorized == (depth > 100)
    reason = "max_norm" if bound == "max_norm" else "grad_weight_ratio"
    assert [(e.step, e.reason) for e in guard.events] == [(s, reason) for s in range(3)]
    for step in range(3):
        ceiling = 1e-3 if bound == "max_norm" else 1e-3 * weights.total[step]
        assert before.total[step] > ceiling
        assert after.total[step] == pytest.approx(ceiling, rel=1e-4)  # what the optimizer got


class SumFrom40(DigitsMLP):
    """The loss summed over the batch (x32) instead of averaged from step 40 on: gradients 32x, for good."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 32 if self.global_step >= 40 else loss


def test_a_clip_held_long_by_the_growth_anchors_is_reported_once(caplog):
    """After growth the clip limit is anchored to the level before it for as long as the norms stay
    above it. After a healthy change of phase (here the loss summed instead of averaged from step
    40: gradients 32x, for good; its loss does not fall enough to loosen the anchors) every later
    step is clipped and no event says so. A warning now says so, once per incident, after
    4 x ``growth_window`` steps, with what to do."""
    guard = GradGuard()
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=320, callbacks=[guard]).fit(SumFrom40(), digits_loader(n=None, shuffle=True))
    watch = guard._watches[0]
    assert watch.anchor is not None and watch.counts["clipped"] > 200  # clipped for good
    held = [r.getMessage() for r in caplog.records if "clipped by the anchors set at their level" in r.getMessage()]
    assert len(held) == 1, held
    assert f"before a growth since step {watch.anchor_since} (200 steps)" in held[0]
    assert "raise `growth_factor`, or leave 'clip' out of `on_exploding`" in held[0]
    assert watch.anchor_warned and guard.state_dict()["watches"][0]["anchor"][2:4] == [watch.anchor_since, True]


def test_a_layer_whose_spike_is_the_global_one_is_clipped_to_its_own_limit_too():
    """A scalar logit temperature (a layer of its own) whose gradient alone spikes 1e4x makes the global norm spike:
    the global factor brought the global norm down to its limit but left the temperature's gradient 8x its own
    limit, and its update flipped the logits' sign (loss 21 at the end of the run, against 0.13 without the fault).
    A layer the global factor leaves over its own limit is clipped down to it too."""
    from torch import nn

    class Temperature(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def forward(self, z):
            return z * self.weight

    class Model(DigitsMLP):
        def __init__(self):
            super().__init__(lr=0.05)
            self.temp = Temperature()

        def forward(self, x):
            return self.temp(self.net(x))

        def on_after_backward(self):
            if self.global_step == 60:
                self.temp.weight.grad *= 1e4

    guard, before, after = GradGuard(), NormRecorder(), NormRecorder()  # around the guard
    model = Model()
    trainer(max_steps=70, callbacks=[before, guard, after]).fit(model, digits_loader())
    (event,) = [e for e in guard.events if e.step == 60]
    assert event.reason == "spike" and event.layer == "temp" and "clip" in event.actions
    assert after.layers[60]["temp"] <= event.threshold * (1 + 1e-5)
    # the global factor first (the stronger clip contains a divergence), then the layer over its own limit
    coef = after.layers[60]["net.0"] / before.layers[60]["net.0"]
    assert coef < 0.9 and after.layers[60]["net.4"] / before.layers[60]["net.4"] == pytest.approx(coef, rel=1e-5)
    assert after.layers[60]["temp"] / before.layers[60]["temp"] < coef
    assert model.temp.weight.item() > 0  # the logits keep their sign
