"""The guard never kills training by its own failure, never loses state, and survives any input."""

import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger

from helpers import DigitsMLP, FaultyMLP, digits_loader, trainer
from lightning_gradguard import GradEvent, GradGuard, GradientHealthError, GuardSink, LayerPlan, grad_stats
from lightning_gradguard.detectors import DetectorConfig, LossTrend, Row, TrendDetector


def test_internal_error_is_reported_once_and_training_goes_on(monkeypatch, caplog):
    import lightning_gradguard.callback as cb

    def broken(*args, **kwargs):
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(cb, "read_tensors", broken)
    guard = GradGuard()
    model = DigitsMLP()
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t = trainer(max_steps=10, callbacks=[guard])
        t.fit(model, digits_loader())
    assert t.global_step == 10
    assert guard.internal_errors == 10
    assert caplog.text.count("GradGuard: internal error") == 1


@pytest.mark.parametrize("on_nonfinite", [("skip", "alert"), ("rollback", "alert"), ("log",)])
def test_an_internal_error_still_keeps_a_nan_out_where_protection_was_asked_for(monkeypatch, on_nonfinite):
    import lightning_gradguard.callback as cb

    def broken(*args, **kwargs):
        raise RuntimeError("statistics exploded")

    monkeypatch.setattr(cb, "read_tensors", broken)  # every step fails inside the guard
    guard = GradGuard(on_nonfinite=on_nonfinite)
    model = FaultyMLP({5: "nan_layer"})
    trainer(max_steps=10, callbacks=[guard]).fit(model, digits_loader())
    assert guard.internal_errors == 10 and guard.events == []
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    assert finite == (on_nonfinite != ("log",))  # "log" asked for no protection: the NaN goes through


class BrokenSink(GuardSink):
    def __init__(self):
        self.calls = 0

    def on_step(self, guard, trainer, **kwargs):
        self.calls += 1
        raise OSError("W&B unreachable")


class BrokenLogger(CSVLogger):
    def log_metrics(self, metrics, step=None):
        if any(k.startswith("grad/") for k in metrics):
            raise OSError("No space left on device")
        super().log_metrics(metrics, step)


def test_failing_sink_and_logger_degrade_alone(tmp_path, caplog):
    sink = BrokenSink()
    guard = GradGuard(sinks=[sink], log_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t = trainer(max_steps=8, callbacks=[guard], logger=BrokenLogger(tmp_path))
        t.fit(FaultyMLP({5: "inf"}), digits_loader())
    assert t.global_step == 8 and sink.calls == 1
    assert "BrokenSink.on_step failed" in caplog.text and "No space left on device" in caplog.text
    assert caplog.text.count("No space left") == 1
    # detection and protection kept working
    assert [e.step for e in guard.events] == [5] and guard.events[0].actions == ("skip", "alert")


def test_after_raise_the_trainer_can_still_save_a_checkpoint(tmp_path):
    guard = GradGuard(on_nonfinite="raise")
    t = trainer(max_steps=20, callbacks=[guard])
    with pytest.raises(GradientHealthError):
        t.fit(FaultyMLP({6: "inf"}), digits_loader())
    t.save_checkpoint(tmp_path / "after.ckpt")  # what the README documents
    state = torch.load(tmp_path / "after.ckpt", weights_only=True)
    assert state["global_step"] == 6
    assert state["callbacks"][guard.state_key]["events"][0]["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())  # the bad update never happened


def events_of(guard):
    return [(e.step, e.kind, e.layer, e.reason, f"{e.value:.4g}", e.actions) for e in guard.events]


def model(faults):
    torch.manual_seed(0)  # same initial weights for both runs
    return FaultyMLP(faults, optimizer="sgd", lr=0.05)


def test_resume_gives_the_same_state_as_an_uninterrupted_run(tmp_path):
    # 16 batches per epoch; the interruption is at the epoch boundary, where Lightning resumes exactly
    faults = {13: "spike", 20: "inf", 27: "spike"}
    kwargs = dict(on_exploding=("clip", "reduce_lr", "log"), lr_cooldown=0)
    straight = GradGuard(**kwargs)
    trainer(max_steps=-1, max_epochs=2, callbacks=[straight]).fit(model(faults), digits_loader())

    first = GradGuard(**kwargs)
    t = trainer(max_steps=-1, max_epochs=1, callbacks=[first])
    t.fit(model(faults), digits_loader())
    t.save_checkpoint(tmp_path / "half.ckpt")
    resumed = GradGuard(**kwargs)
    trainer(max_steps=-1, max_epochs=2, callbacks=[resumed]).fit(model(faults), digits_loader(), ckpt_path=tmp_path / "half.ckpt")

    assert [e.step for e in straight.events] == [13, 20, 27]
    assert events_of(resumed) == events_of(straight)
    a, b = straight._watches[0], resumed._watches[0]
    assert a.lr_scale.value == b.lr_scale.value == 0.25
    assert a.counts == b.counts
    for name in ("level", "scale", "fast", "peak", "streak", "count", "ring"):
        assert np.allclose(getattr(a.detector, name), getattr(b.detector, name), equal_nan=True, rtol=1e-5), name
    assert straight._loss.fast == pytest.approx(resumed._loss.fast, rel=1e-6)
    assert straight._loss.seen == resumed._loss.seen


values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, 1e-38, 3e38, -3e38, 65504.0, math.nan, math.inf]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    grads=st.lists(st.lists(values, min_size=1, max_size=6), min_size=0, max_size=5),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    steps=st.integers(1, 4),
)
def test_statistics_and_detectors_never_raise_and_stay_finite(grads, dtype, steps):
    params = [torch.nn.Parameter(torch.zeros(len(g), dtype=dtype)) for g in grads]
    named = [(f"l{i}.weight", p) for i, p in enumerate(params)] + [("free.weight", torch.nn.Parameter(torch.zeros(2)))]
    plan = LayerPlan.from_named_parameters(named)
    det = TrendDetector(DetectorConfig(warmup_steps=2), plan.num_layers + 1)
    trend = LossTrend(2, 5, 0.01)
    for step in range(steps):
        for p, g in zip(params, grads):
            p.grad = torch.tensor(g, dtype=torch.float32).to(dtype) * (step + 1)
        stats = grad_stats(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
        if stats is None:
            assert not grads
            return
        norm = torch.cat([stats.total.reshape(1), stats.norm])
        present = torch.cat([torch.ones(1, dtype=torch.bool), stats.present])
        nonfinite = torch.cat([stats.nonfinite.any().reshape(1), stats.nonfinite])
        rep = det.update(norm, present, nonfinite, converged=trend.converged(), worsening=trend.worsening(),
                         weight_norm=torch.cat([stats.param_norm.square().sum().sqrt().reshape(1), stats.param_norm]))
        trend.observe(stats.total.item())
        assert rep.shape[1] == plan.num_layers + 1
        assert not np.isnan(rep[Row.CODE]).any()
        # running statistics never become NaN/Inf, whatever came in
        assert np.isfinite(det.level).all() and np.isfinite(det.scale).all()
        assert np.isfinite(det.count).all() and np.isfinite(det.streak).all()
        assert not np.isinf(det.fast).any() and not np.isinf(det.peak[np.isfinite(det.peak)]).any()
        if trend.fast is not None:
            assert not math.isinf(trend.fast)


def test_a_failed_step_feeds_each_loss_to_the_trend_exactly_once(monkeypatch):
    import lightning_gradguard.callback as cb

    real, calls = cb.layer_series, {"n": 0}

    def fails_once(*args, **kwargs):  # after the step's copy was read: its losses were observed
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("host maths failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(cb, "layer_series", fails_once)
    guard = GradGuard()
    trainer(max_steps=6, callbacks=[guard]).fit(DigitsMLP(), digits_loader())
    assert guard.internal_errors == 1
    # the losses of steps 0..4 were read with steps 1..5; step 5's waits for a next step
    assert guard._loss.seen == 5 and len(guard._pending_losses) == 1


def test_empty_parameters_are_not_dead_layers():
    """A parameter with no elements (a rank-0 adapter, an empty prompt) that takes part in forward
    gets a gradient whose norm is always 0: it was a "dead" layer, reported as vanishing at step 49
    (and the run ended under ``on_vanishing="raise"``). Empty parameters are left out of the plan."""
    from torch import nn

    class WithEmpty(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.prompt = nn.Parameter(torch.zeros(0, 64))
            self.adapter = nn.Linear(64, 0, bias=False)

        def forward(self, x):
            return self.net(x + self.prompt.sum() + self.adapter(x).sum())

    guard = GradGuard(on_vanishing="raise")
    model = WithEmpty()
    trainer(max_steps=60, callbacks=[guard]).fit(model, digits_loader())
    assert model.prompt.grad is not None and model.adapter.weight.grad is not None  # they do get gradients
    assert guard.events == [] and guard.internal_errors == 0
    assert guard._watches[0].plan.layers == ("net.0", "net.2", "net.4")


def test_findings_whose_response_fails_inside_the_guard_are_still_recorded(monkeypatch):
    """A spike found, then the clip failing inside the guard (an internal error): the event was lost with the
    response, so the run's record, counts and loggers said nothing had happened. It is recorded, with no
    action, and says so; the NaN fail-safe and the internal-error report are as before."""
    def broken(*args, **kwargs):
        raise RuntimeError("clip exploded")

    class Events(GuardSink):
        def __init__(self):
            self.seen = []

        def on_event(self, guard, trainer, event):
            self.seen.append(event)

    monkeypatch.setattr(GradGuard, "_clip", broken)
    sink = Events()
    guard = GradGuard(sinks=[sink])
    model = FaultyMLP({12: "spike"})
    t = trainer(max_steps=20, callbacks=[guard])
    t.fit(model, digits_loader())
    assert sink.seen == [e for e in guard.events]
    assert t.global_step == 20 and guard.internal_errors >= 1
    (event,) = [e for e in guard.events if e.step == 12]
    assert event.kind == "exploding" and event.actions == ()
    assert event.message.endswith("-> no response: the guard failed (see the log)")
    assert guard.summary()["events/exploding"] >= 1
