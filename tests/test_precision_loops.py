"""Precision, accumulation and manual optimization with two optimizers, in a real Trainer."""

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from helpers import DigitsMLP, FaultyMLP, NormRecorder, TwoOptimizers, digits_loader, trainer
from lightning_gradguard import GradGuard, GuardSink


def scaler_plugin(init_scale: float = 2.0**16):
    return MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=init_scale))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed-scaler"])
def test_statistics_are_of_unscaled_gradients(precision):
    kwargs = {"plugins": [scaler_plugin()]} if precision == "16-mixed-scaler" else {"precision": precision}
    seen = NormSink()
    guard, rec = GradGuard(sinks=[seen]), NormRecorder()
    trainer(max_steps=6, callbacks=[rec, guard], **kwargs).fit(FaultyMLP({}), digits_loader())
    assert sorted(seen.total) == sorted(rec.total) == list(range(6))
    for step, norm in seen.total.items():
        assert norm == pytest.approx(rec.total[step], rel=1e-5)  # what the optimizer will apply
        assert 1e-3 < norm < 1e2  # unscaled: about 1, not 65536x that
    assert guard.events == []


@pytest.mark.parametrize("setup", ["64-true", "float64-head", "64-true-stacked"])
def test_float64_gradients_are_measured_and_guarded(setup):
    """Float64 gradients (``precision="64-true"``, or a float64 head beside a float32 body) failed the guard's
    norm kernel ("should be convertible without narrowing") on every step: no statistics, no detection,
    no clipping, only the fail-safe's NaN skip. ``-stacked``: 80 same-shaped tensors, read in stacked blocks,
    with max |g| and weight norms every step."""
    depth = 40 if setup.endswith("stacked") else 2
    model = FaultyMLP({5: "inf", 12: "spike"}, depth=depth)
    if setup == "float64-head":
        model.net[-1].double()
        model.forward = lambda x, net=model.net: net[-1](net[:-1](x).double())
    seen, rec = NormSink(), NormRecorder()
    guard = GradGuard(sinks=[seen], detail_every_n_steps=1 if setup.endswith("stacked") else None)
    trainer(max_steps=14, callbacks=[rec, guard], precision="64-true" if setup.startswith("64") else "32-true").fit(
        model, digits_loader())
    assert guard.internal_errors == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(e.step, e.kind) for e in guard.events][:2] == [(5, "nonfinite"), (12, "exploding")]
    for step, norm in seen.total.items():
        assert norm == pytest.approx(rec.total[step], rel=1e-5, nan_ok=True)
    assert len(seen.total) == 14


def test_lbfgs_every_closure_evaluation_is_guarded():
    """LBFGS evaluates its closure several times per ``step()``; Lightning runs ``on_before_optimizer_step``
    in each, so the guard sees (and counts) every evaluation. An Inf at a step is still skipped."""

    class LBFGSMLP(FaultyMLP):
        def configure_optimizers(self):
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)

    seen = NormSink()
    guard = GradGuard(sinks=[seen])
    model = LBFGSMLP({5: "inf"})
    trainer(max_steps=8, callbacks=[guard]).fit(model, digits_loader())
    assert guard.internal_errors == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(e.step, e.kind, "skip" in e.actions) for e in guard.events] == [(5, "nonfinite", True)]
    assert guard._watches[0].counts["steps"] > 8  # evaluations, not optimizer steps


class NormSink(GuardSink):
    def __init__(self):
        self.total = {}

    def on_step(self, guard, trainer, *, step, norms, **kwargs):
        self.total[step] = float(norms[0])


def test_scaler_overflows_are_counted_not_alarmed():
    guard = GradGuard(on_nonfinite=("skip", "raise"))
    model = FaultyMLP({})
    # an absurd initial scale: the first steps overflow and the scaler halves its scale each time
    trainer(max_steps=30, callbacks=[guard], plugins=[scaler_plugin(2.0**30)]).fit(model, digits_loader())
    assert guard._watches[0].counts["amp_overflows"] > 0
    assert guard.events == []  # no "raise": overflow steps are the scaler's business
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_overflow_is_reported():
    guard = GradGuard(on_nonfinite="log", amp_overflow_patience=5)
    trainer(max_steps=12, callbacks=[guard], plugins=[scaler_plugin(2.0**120)]).fit(FaultyMLP({}), digits_loader())
    (event,) = guard.events
    assert event.kind == "nonfinite" and event.reason == "amp_overflow" and event.step == 4
    assert "5 fp16 overflow steps in a row" in event.message


def test_gradient_accumulation_one_measurement_per_optimizer_step():
    guard, rec = GradGuard(), NormRecorder()
    trainer(max_steps=5, accumulate_grad_batches=4, callbacks=[rec, guard]).fit(DigitsMLP(), digits_loader())
    watch = guard._watches[0]
    assert watch.counts["steps"] == 5 == len(rec.total)
    assert 10 ** watch.detector.fast[0].item() > 0


def test_manual_optimization_two_optimizers_separate_state_and_events(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    import csv, glob

    guard = GradGuard(log_every_n_steps=1)
    model = TwoOptimizers(nan_at=5)
    trainer(max_steps=20, callbacks=[guard], logger=CSVLogger(tmp_path)).fit(model, digits_loader())
    assert set(guard._watches) == {0, 1}
    assert guard._watches[0].plan.layers == ("net.0", "net.2", "net.4")
    assert guard._watches[1].plan.layers == ("b",)
    (event,) = guard.events
    assert event.optimizer == 1 and event.layer == "b" and "(optimizer 1)" in event.message
    assert event.actions == ("skip", "alert")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = list(csv.DictReader(open(path)))
    assert {"grad/opt0/norm_total", "grad/opt1/norm_total"} <= set(rows[0].keys())
    # optimizer 0's first step was logged before optimizer 1 had been seen: under `grad/norm_total`, its
    # chart split in two. Every step of it is under its own key
    assert "grad/norm_total" not in rows[0]
    logged = {name: [int(r["step"]) for r in rows if r[f"grad/{name}/norm_total"]] for name in ("opt0", "opt1")}
    assert logged["opt0"] == logged["opt1"] == list(range(10))  # 20 optimizer steps, 10 batches


def test_scaler_overflow_steps_log_no_nonfinite_norms(tmp_path):
    """A fp16 GradScaler's overflow steps are the scaler's business (counted in ``grad/amp_overflows``, never
    alarmed), but their NaN/Inf norms went to the loggers and to ``trainer.callback_metrics``: an
    ``EarlyStopping(monitor="grad/norm_total")`` ended a healthy run at the first epoch ending on an overflow."""
    import csv
    import glob
    import math

    from lightning.pytorch.callbacks import EarlyStopping
    from lightning.pytorch.loggers import CSVLogger

    guard = GradGuard()
    stopper = EarlyStopping(monitor="grad/norm_total", mode="min", patience=100, check_on_train_epoch_end=True)
    fit = trainer(max_steps=20, callbacks=[guard, stopper], plugins=[scaler_plugin()], logger=CSVLogger(tmp_path),
                  log_every_n_steps=1)
    # 3 steps per epoch; inputs x 1e3 at step 5 overflow fp16 at a scale of 2**16, at the second epoch's end
    fit.fit(FaultyMLP({5: "spike"}), digits_loader(n=96))
    assert guard._watches[0].counts["amp_overflows"] == 1 and guard.events == []
    assert fit.global_step == 20  # not stopped by a NaN norm
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 20 and all(row["grad/amp_overflows"] for row in rows)  # overflow steps still logged
    assert all(math.isfinite(float(v)) for row in rows for key, v in row.items() if key.startswith("grad/") and v)
    assert not rows[5]["grad/norm_total"] and float(rows[6]["grad/norm_total"]) > 0
