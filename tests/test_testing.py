"""``check_gradients``: a short strict fit that passes on a healthy model and fails with a readable report."""

from __future__ import annotations

import re

import numpy as np

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import DigitsMLP, FaultyMLP, digits_loader
from lightning_gradguard import GradientHealthError, GuardSink
from lightning_gradguard.testing import HINTS, STRICT, GradReport, check_gradients, hint


class DeepSigmoid(DigitsMLP):
    """20 Linear+Sigmoid layers: the first layers' gradients are ~1e-17, the last ~1e-1 (vanishing)."""

    def __init__(self, depth: int = 20, width: int = 32, lr: float = 0.1) -> None:
        pl.LightningModule.__init__(self)
        layers: list[nn.Module] = []
        w = 64
        for _ in range(depth):
            layers += [nn.Linear(w, width), nn.Sigmoid()]
            w = width
        layers.append(nn.Linear(w, 10))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_healthy_model_passes_and_reports_per_layer_norms():
    report = check_gradients(DigitsMLP(), digits_loader(), max_steps=30)
    assert isinstance(report, GradReport)
    assert report.healthy and report.events == ()
    assert report.steps == 30 and report.max_steps == 30
    assert list(report.layers) == ["global", "net.0", "net.2", "net.4"]
    for name, n in report.layers.items():
        assert 0 < n.min <= min(n.first, n.last) <= max(n.first, n.last) <= n.max, name
        assert n.nonfinite_steps == 0
    text = report.format()
    assert text.startswith("GradGuard: healthy gradients in DigitsMLP over 30 steps")
    assert "net.4" in text


def test_vanishing_stack_fails_with_what_where_when_numbers_and_causes():
    with pytest.raises(GradientHealthError) as info:
        check_gradients(DeepSigmoid(), digits_loader())
    err = info.value
    message = str(err)
    event = err.events[0]
    assert (event.kind, event.reason, event.layer) == ("vanishing", "relative", "net.0")
    # vanish_patience=15 in STRICT: the first layers are flagged on the 15th step (step 14)
    assert event.step == STRICT["vanish_patience"] - 1 == 14
    first = message.splitlines()[0]
    assert first == "GradGuard: unhealthy gradients in DeepSigmoid: vanishing at step 14 of a 50-step check"
    assert "vanishing (relative) at step 14, layer `net.0`: value " in message
    assert "below the median layer" in message and "threshold 10000x" in message  # the guard's own numbers
    assert "usual causes: Layers whose gradients are orders of magnitude smaller" in message
    assert "sigmoid/tanh" in message
    # the per-layer table: every layer, the flagged ones marked, over the 15 steps run
    assert "gradient L2 norm per layer over 15 steps" in message
    assert re.search(r"^  net\.0 +<  +\d", message, re.M)
    assert re.search(r"^  net\.40 +  +\d", message, re.M)
    assert err.report.steps == 15 and not err.report.healthy
    assert err.report.layers["net.0"].max < 1e-12 < err.report.layers["net.40"].min
    assert err.__cause__ is None and err.__suppress_context__  # no Lightning internals in the CI log


def test_nonfinite_and_exploding_fail_with_their_own_hints():
    with pytest.raises(GradientHealthError) as info:
        check_gradients(FaultyMLP({3: "nan_layer"}), digits_loader(), max_steps=15)
    message = str(info.value)
    assert "nonfinite (nan) at step 3, layer `net.2`: value nan, threshold inf" in message
    assert "log(0)" in message and "(1 non-finite step)" in message

    with pytest.raises(GradientHealthError) as info:
        check_gradients(FaultyMLP({15: "spike"}), digits_loader(), max_steps=20)
    event = info.value.events[0]
    assert (event.kind, event.reason, event.step) == ("exploding", "spike", 15)
    assert "outlier or corrupt batch" in str(info.value)


def test_overrides_report_without_failing():
    report = check_gradients(DeepSigmoid(), digits_loader(), max_steps=20, on_vanishing="log")
    assert not report.healthy
    assert [(e.kind, e.step, e.actions) for e in report.events] == [("vanishing", 14, ("log",))]
    assert report.overrides == {"on_vanishing": "log"}
    assert "(check_gradients: max_steps=20, on_vanishing='log')" in report.format()


def test_trainer_kwargs_and_extra_sinks_are_passed_on():
    from lightning_gradguard import GuardSink

    class Count(GuardSink):
        steps = 0

        def on_step(self, guard, trainer, **kwargs):
            Count.steps += 1

    seen = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            seen.append(trainer.accumulate_grad_batches)

    report = check_gradients(
        DigitsMLP(), digits_loader(), max_steps=15, sinks=[Count()],
        trainer_kwargs={"accumulate_grad_batches": 2, "callbacks": [Spy()]},
    )
    assert report.steps == 15 and Count.steps == 15 and seen == [2]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="`max_steps` must be an integer >= 1, got 0"):
        check_gradients(DigitsMLP(), digits_loader(), max_steps=0)
    with pytest.raises(ValueError, match="vanish_patience"):
        check_gradients(DigitsMLP(), digits_loader(), vanish_patience=0)
    with pytest.raises(TypeError, match="`model` must be a LightningModule"):
        check_gradients(nn.Linear(2, 2), digits_loader())
    with pytest.raises(ValueError, match=r"`max_steps`=10 is below `vanish_patience`=15: no layer could be found "
                                         r"vanishing.*Raise max_steps to at least 15 \(25 also catches.*vanish_patience=10"):
        check_gradients(DigitsMLP(), digits_loader(), max_steps=10)  # the check would pass a vanishing stack
    check_gradients(DigitsMLP(), digits_loader(), max_steps=10, vanish_patience=10)  # said so: checked
    with pytest.raises(ValueError, match=r"`trainer_kwargs` got max_steps=5: pass it as check_gradients"):
        check_gradients(DigitsMLP(), digits_loader(), trainer_kwargs={"max_steps": 5})
    with pytest.raises(ValueError, match=r"`trainer_kwargs` must be a dict of Trainer arguments, got 'precision=16'"):
        check_gradients(DigitsMLP(), digits_loader(), trainer_kwargs="precision=16")
    for seed in ("0", 1.5, True):
        with pytest.raises(ValueError, match=rf"`seed` must be an integer, or None to leave the seeds alone, got {seed!r}"):
            check_gradients(DigitsMLP(), digits_loader(), seed=seed)
    with pytest.raises(ValueError, match=r"`sinks` must be a list of GuardSink instances, got .*Wrap a single one"):
        check_gradients(DigitsMLP(), digits_loader(), sinks=GuardSink())


class ComplexParam(FaultyMLP):
    """A complex parameter beside the real ones; at step ``bad`` its gradient holds an Inf."""

    def __init__(self, bad: int | None = None) -> None:
        super().__init__({})
        self.w = nn.Parameter(torch.ones(4, dtype=torch.complex64))
        self.bad = bad

    def forward(self, x):
        # a scale of the logits (a constant added to all of them would leave cross-entropy, and w's gradient, at 0)
        return self.net(x) * (self.w * self.w.conj()).real.mean()

    def on_after_backward(self):
        if self.global_step == self.bad:
            self.w.grad[1] = complex("inf")


def test_a_complex_parameter_is_guarded_and_its_nan_fails_the_check():
    """Complex gradients failed the guard's norm kernel: every step an internal error, and the check
    passed a run whose complex weights had become NaN."""
    report = check_gradients(ComplexParam(), digits_loader(), max_steps=15)
    assert report.healthy and report.steps == 15 and "(root)" in report.layers
    model = ComplexParam(bad=5)
    with pytest.raises(GradientHealthError, match=r"step 5: non-finite gradients \(Inf\) in 1 layer: `\(root\)`"):
        check_gradients(model, digits_loader(), max_steps=15)


def test_a_run_the_guard_could_not_check_fails(monkeypatch):
    """Internal errors leave steps unchecked: the check fails rather than passing them."""
    from lightning_gradguard import GradGuard

    def broken(self, *args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(GradGuard, "_analyse", broken)
    failed = r"the guard failed on 15 step\(s\) of DigitsMLP .*ZeroDivisionError: planted"
    with pytest.raises(RuntimeError, match=failed):
        check_gradients(DigitsMLP(), digits_loader(), max_steps=15)


def test_a_guard_from_configure_callbacks_replacing_the_strict_one_fails_with_the_reason():
    from lightning_gradguard import GradGuard

    class OwnGuard(FaultyMLP):
        def configure_callbacks(self):
            return [GradGuard()]  # lenient: skips the Inf instead of raising

    replaced = r"OwnGuard.configure_callbacks\(\) returns a GradGuard, and Lightning replaced"
    with pytest.raises(RuntimeError, match=replaced):
        check_gradients(OwnGuard({3: "inf"}), digits_loader(), max_steps=15)


def test_a_fit_ended_before_max_steps_warns_and_before_vanish_patience_fails():
    with pytest.warns(UserWarning, match=r"took 20 optimizer steps of max_steps=50 \(the fit ended early"):
        report = check_gradients(DigitsMLP(), digits_loader(n=640), trainer_kwargs={"max_epochs": 1})
    assert report.steps == 20
    # 3 steps: no layer could have been found vanishing (this passed with a warning)
    with pytest.raises(RuntimeError, match=r"DigitsMLP took 3 optimizer steps, fewer than vanish_patience=15: no "
                                           r"layer could be found vanishing, so this run cannot pass\. The fit ended "
                                           r"early"):
        check_gradients(DigitsMLP(), digits_loader(n=96), trainer_kwargs={"max_epochs": 1})
    check_gradients(DigitsMLP(), digits_loader(n=96), trainer_kwargs={"max_epochs": 1}, on_vanishing="log")


def test_several_optimizers_share_max_steps_and_each_must_reach_vanish_patience():
    """Each ``opt.step()`` of manual optimization moves ``global_step``: with two optimizers, max_steps=25 gave each
    13 steps, and a vanishing stack behind one of them passed."""
    with pytest.raises(RuntimeError, match=r"TwoOptimizers took optimizer 0: 13, optimizer 1: 13 optimizer steps, "
                                           r"fewer than vanish_patience=15.*max_steps=25 counts the steps of all 2 "
                                           r"optimizers: raise it to 29 or more"):
        check_gradients(TwoOptimizers(), digits_loader(), max_steps=25)
    assert check_gradients(TwoOptimizers(), digits_loader(), max_steps=30).healthy

    class EncoderNeverSteps(TwoOptimizers):  # the encoder's gradients were never checked, and the check passed
        def training_step(self, batch, batch_idx):
            x, y = batch
            enc_opt, dec_opt = self.optimizers()
            dec_opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self.dec(self.enc(x)), y))
            dec_opt.step()

    with pytest.raises(RuntimeError, match=r"EncoderNeverSteps took optimizer 0: 0 optimizer steps, fewer than "
                                           r"vanish_patience=15.*Optimizer 0 never stepped: does training_step call "
                                           r"its `opt.step\(\)`\?"):
        check_gradients(EncoderNeverSteps(), digits_loader(), max_steps=30)


def test_no_step_taken_is_an_error_not_a_pass():
    empty = DataLoader(TensorDataset(torch.zeros(0, 64), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(RuntimeError, match="took no optimizer step"):
        check_gradients(DigitsMLP(), empty, max_steps=15)

    class NeverSteps(DigitsMLP):  # manual optimization that forgets opt.step(): global_step never moves
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(super().training_step(batch, batch_idx))

    with pytest.raises(RuntimeError, match="took no optimizer step"):  # stops after 10 x max_steps batches
        check_gradients(NeverSteps(), digits_loader(), max_steps=15)


def test_every_reason_has_a_hint():
    reasons = (
        "nan", "inf", "weights", "amp_overflow", "spike", "growth", "max_norm", "update_ratio", "dead", "relative",
        "drop", "no_grad", "loss",
    )
    for key in (*reasons, "nonfinite", "exploding", "vanishing"):
        assert len(HINTS[key]) > 40, key
    from lightning_gradguard import GradEvent

    assert hint(GradEvent(0, "exploding", None, 1.0, 1.0, (), "", reason="something_new")) == HINTS["exploding"]


class NaNLossAt(DigitsMLP):
    """The loss is NaN at step ``bad``: every gradient of that step is NaN."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.bad else loss


def test_the_strict_guard_sees_the_gradients_before_the_users_callbacks():
    """The strict guard came after trainer_kwargs' callbacks: one that cleaned the gradients first hid a NaN step."""

    class Sanitise(pl.Callback):  # a user's callback that repairs gradients in place
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)

    with pytest.raises(GradientHealthError, match=r"nonfinite \(nan\) at step 3"):
        check_gradients(NaNLossAt(3), digits_loader(), max_steps=15, trainer_kwargs={"callbacks": [Sanitise()]})


@pytest.mark.parametrize("callbacks", ["list", "single", "prefixed"])
def test_a_gradguard_of_the_users_in_trainer_kwargs_is_refused(callbacks):
    """A user's own GradGuard skipped the NaN step before the strict guard saw it (the check passed), or, with
    the same prefix, Lightning failed with 'more than one stateful callback'."""
    from lightning_gradguard import GradGuard

    class Spy(pl.Callback):
        started = False

        def on_train_start(self, trainer, pl_module):
            Spy.started = True

    given = {"list": [Spy(), GradGuard()], "single": GradGuard(), "prefixed": (GradGuard(prefix="prod/"),)}[callbacks]
    with pytest.raises(ValueError, match=r"trainer_kwargs\['callbacks'\] holds 1 GradGuard, but check_gradients runs "
                                         r"its own strict GradGuard .* pass the settings you want checked as keyword"):
        check_gradients(NaNLossAt(3), digits_loader(), max_steps=15, trainer_kwargs={"callbacks": given})
    assert not Spy.started  # refused before any training


class TwoOptimizers(pl.LightningModule):
    """An encoder and a decoder with an optimizer each (decoder second); at batch ``bad`` the gradient of
    ``dec.2`` alone holds an Inf."""

    def __init__(self, bad: int | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.enc = nn.Sequential(nn.Linear(64, 32), nn.Tanh())
        self.dec = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32),
                                 nn.Tanh(), nn.Linear(32, 10))
        self.bad = bad

    def training_step(self, batch, batch_idx):
        x, y = batch
        enc_opt, dec_opt = self.optimizers()
        enc_opt.zero_grad()
        dec_opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.dec(self.enc(x)), y))
        if batch_idx == self.bad:
            self.dec[2].weight.grad[0, 0] = float("inf")
        dec_opt.step()
        enc_opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.enc.parameters(), lr=0.01), torch.optim.SGD(self.dec.parameters(), lr=0.01)


def test_with_several_optimizers_the_flagged_layer_is_marked_and_kept_in_the_table():
    """The table's keys are `opt<i>/<layer>` with several optimizers, but the flagged set held bare names:
    no row was marked, and a cut table left the flagged layer out."""
    with pytest.raises(GradientHealthError) as info:
        check_gradients(TwoOptimizers(bad=3), digits_loader(), max_steps=15)
    err = info.value
    event = err.events[0]
    assert (event.kind, event.reason, event.layer, event.optimizer) == ("nonfinite", "inf", "dec.2", 1)
    assert list(err.report.layers) == ["opt0/global", "opt0/enc.0", "opt1/global", "opt1/dec.0", "opt1/dec.2",
                                       "opt1/dec.4", "opt1/dec.6"]
    marked = re.findall(r"^  (\S+) +<  ", str(err), re.M)
    assert marked == ["opt1/dec.2"]
    # cut to 4 rows: the first two, the last, every optimizer's global norm and the flagged layer stay
    table = err.report.format(max_rows=4).split("(< : named by an event):\n")[1]
    rows = re.findall(r"^  (opt\S+) ", table, re.M)
    assert rows == ["opt0/global", "opt0/enc.0", "opt1/global", "opt1/dec.2", "opt1/dec.6"]
    assert re.search(r"^  opt1/dec\.2 +<  ", table, re.M)
    assert table.count("  ... 1 more\n") == 2  # opt1/dec.0 and opt1/dec.4


class CutOff(DigitsMLP):
    """An encoder before the MLP, cut off from the loss as ``how`` says; a frozen side layer too."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.enc = nn.Linear(64, 64)
        self.side = nn.Linear(64, 64).requires_grad_(False)  # frozen on purpose: not reported

    def forward(self, x):
        if self.how == "unused":
            return self.net(x + 0 * self.side(x))
        if self.how == "no_grad":
            with torch.no_grad():
                h = torch.relu(self.enc(x))
            return self.net(h)
        h = torch.relu(self.enc(x))
        return self.net(h.detach() if self.how == "detach" else h)


@pytest.mark.parametrize("how", ["detach", "unused", "no_grad"])
def test_a_layer_cut_off_from_the_loss_fails_the_check(how):
    with pytest.raises(GradientHealthError) as info:
        check_gradients(CutOff(how), digits_loader())
    (event,) = info.value.events
    assert (event.kind, event.reason, event.layers, event.step) == ("vanishing", "no_grad", ("enc",), 14)
    assert "`enc` got no gradient for 15 steps in a row" in str(info.value)
    assert " ".join(HINTS["no_grad"].split()) in " ".join(str(info.value).split())  # the report wraps it
    check_gradients(CutOff("connected"), digits_loader())  # the frozen side layer alone: healthy


def test_the_guard_reports_a_cut_off_layer_once_per_absence_and_not_a_frozen_one():
    from helpers import trainer
    from lightning_gradguard import GradGuard

    class Reconnected(CutOff):
        def forward(self, x):  # the encoder cut off for steps 0-59 and 70-129, connected in between
            cut = self.global_step < 60 or self.global_step >= 70
            h = torch.relu(self.enc(x))
            return self.net(h.detach() if cut else h)

    guard = GradGuard()
    trainer(max_steps=130, callbacks=[guard]).fit(Reconnected("detach"), digits_loader())
    assert [(e.step, e.reason, e.layer, e.actions) for e in guard.events] == [
        (49, "no_grad", "enc", ("alert",)), (119, "no_grad", "enc", ())]  # within alert_quiet_steps: not alerted


def test_layers_joining_while_one_has_no_gradient_keep_the_count_going():
    from helpers import trainer
    from lightning_gradguard import GradGuard

    class Joining(CutOff):  # the frozen side layer has no gradient from step 0; a head joins at step 10
        def __init__(self):
            super().__init__("detach")
            self.extra = nn.Linear(10, 10)

        def forward(self, x):
            out = super().forward(x)
            return self.extra(out) if self.global_step >= 10 else out

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 10:
                self.trainer.optimizers[0].add_param_group({"params": list(self.extra.parameters())})

        def configure_optimizers(self):
            return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("extra")], lr=self.lr)

    guard = GradGuard()
    trainer(max_steps=60, callbacks=[guard]).fit(Joining(), digits_loader())
    assert guard.internal_errors == 0
    assert [(e.step, e.reason, e.layer) for e in guard.events] == [(49, "no_grad", "enc")]


def test_the_steps_without_a_gradient_are_counted_across_a_resume(tmp_path):
    from helpers import trainer
    from lightning_gradguard import GradGuard

    t = trainer(max_steps=30, callbacks=[GradGuard()])
    t.fit(CutOff("detach"), digits_loader())
    t.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GradGuard()
    trainer(max_steps=60, callbacks=[resumed]).fit(CutOff("detach"), digits_loader(), ckpt_path=tmp_path / "c.ckpt")
    assert [(e.step, e.reason) for e in resumed.events] == [(49, "no_grad")]


class LogOfNegative(DigitsMLP):
    """A second head whose output enters the loss through log() and turns negative from step ``at``: the loss is
    NaN while d log(b) = 1/b keeps the gradients finite."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.head_b = nn.Linear(64, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        b = nn.functional.softplus(self.head_b(x).squeeze(-1)) + 1.0
        if self.global_step >= self.at:
            b = b - b.detach().max() - 1.0
        return nn.functional.cross_entropy(self(x), y) + 0.01 * torch.log(b).mean()


def test_a_nan_loss_with_finite_gradients_fails_the_check():
    with pytest.raises(GradientHealthError) as info:
        check_gradients(LogOfNegative(at=7), digits_loader())
    (event,) = info.value.events
    assert (event.kind, event.reason, event.step, event.layer) == ("nonfinite", "loss", 8, None)
    assert "the loss training_step returned before this step was NaN" in str(info.value)


def test_a_nan_loss_is_reported_not_acted_on_and_nan_gradients_are_not_reported_twice():
    from helpers import trainer
    from lightning_gradguard import GradGuard

    from lightning_gradguard import GuardSink

    class Seen(GuardSink):
        def __init__(self):
            self.events = []

        def on_event(self, guard, trainer, event):
            self.events.append(event.step)

    sink = Seen()
    guard = GradGuard(sinks=[sink])  # on_nonfinite=("skip", "alert"): a loss event only alerts
    model = LogOfNegative(at=10)
    trainer(max_steps=14, callbacks=[guard]).fit(model, digits_loader())
    assert [(e.step, e.reason, e.actions) for e in guard.events] == [(11, "loss", ("alert",))] + [
        (s, "loss", ()) for s in (12, 13)]
    assert guard.internal_errors == 0 and sink.events == [11, 12, 13]  # not only on logged steps
    assert guard.summary()["skipped_fraction"] == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    guard = GradGuard(on_nonfinite=("skip", "raise"))
    with pytest.raises(GradientHealthError, match="step 11: the loss training_step returned before this step"):
        trainer(max_steps=14, callbacks=[guard]).fit(LogOfNegative(at=10), digits_loader())
    assert guard.internal_errors == 0
    class NaNAt5(DigitsMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 5 else loss

    guard = GradGuard()  # NaN gradients and a NaN loss at step 5, the loss read at 6: one event, the gradients'
    trainer(max_steps=10, callbacks=[guard]).fit(NaNAt5(), digits_loader())
    assert [(e.step, e.reason) for e in guard.events] == [(5, "nan")]


def test_a_nan_loss_after_a_fp16_overflow_or_in_a_gan_is_its_symptom_not_a_loss_event():
    from lightning.pytorch.plugins import MixedPrecision

    from helpers import TwoOptimizers, trainer
    from lightning_gradguard import GradGuard

    class Overflow(DigitsMLP):  # one batch whose fp16 activations overflow: a NaN loss, the scaler skips it
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x * 1e5 if self.global_step == 20 else x), y)

    guard = GradGuard()
    scaler = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer(max_steps=30, callbacks=[guard], plugins=[scaler]).fit(Overflow(), digits_loader())
    assert guard.summary()["amp_overflows"] >= 1 and guard.events == [] and guard.internal_errors == 0

    class NaNLossInB(TwoOptimizers):  # the second optimizer's loss and gradients NaN at batch 5, returned
        def training_step(self, batch, batch_idx):
            if self.batches != 5:
                return super().training_step(batch, batch_idx)
            x, y = batch
            opt_a, opt_b = self.optimizers()
            opt_a.zero_grad(), self.manual_backward(nn.functional.cross_entropy(self.net(x), y)), opt_a.step()
            loss_b = nn.functional.cross_entropy(self.b(self.net(x).detach()), y) * float("nan")
            opt_b.zero_grad(), self.manual_backward(loss_b), opt_b.step()
            self.batches += 1
            return loss_b

    guard = GradGuard()
    trainer(max_steps=20, callbacks=[guard]).fit(NaNLossInB(), digits_loader())
    assert [(e.optimizer, e.reason) for e in guard.events] == [(1, "nan")]  # no "loss" event two steps later


def test_a_nan_loss_read_for_a_checkpoint_is_reported_after_the_resume(tmp_path):
    from helpers import trainer
    from lightning_gradguard import GradGuard

    class Saves(LogOfNegative):
        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.global_step == 11:  # after the NaN loss of step 10 was handed to the guard
                self.trainer.save_checkpoint(tmp_path / "c.ckpt")

    straight = GradGuard()
    trainer(max_steps=11, callbacks=[straight]).fit(Saves(at=10), digits_loader())
    resumed = GradGuard()
    trainer(max_steps=13, callbacks=[resumed]).fit(LogOfNegative(at=0), digits_loader(),
                                                   ckpt_path=tmp_path / "c.ckpt")
    assert [(e.step, e.reason) for e in resumed.events][:1] == [(11, "loss")]


def test_a_cut_off_layer_among_more_than_112_is_found_with_numpy():
    from helpers import trainer
    from lightning_gradguard import GradGuard

    class Deep(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(10, 10) for _ in range(120))

        def forward(self, x):
            h = super().forward(x)
            for i, block in enumerate(self.blocks):
                if i != 57:  # block 57 is forgotten
                    h = h + 0.01 * block(h)
            return h

    guard = GradGuard(vanish_patience=10)
    trainer(max_steps=12, callbacks=[guard]).fit(Deep(), digits_loader())
    assert [(e.step, e.reason, e.layer) for e in guard.events] == [(9, "no_grad", "blocks.57")]
    assert isinstance(guard._watches[0].absent, np.ndarray) and guard.internal_errors == 0


def test_a_layer_unfrozen_while_still_cut_off_is_found_at_the_next_multiple_of_the_patience():
    from helpers import trainer
    from lightning_gradguard import GradGuard

    class Unfrozen(CutOff):  # the encoder frozen until step 60, then trainable but still detached
        def __init__(self):
            super().__init__("detach")
            self.enc.requires_grad_(False)

        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 60:
                self.enc.requires_grad_(True)

    guard = GradGuard()
    trainer(max_steps=160, callbacks=[guard]).fit(Unfrozen(), digits_loader())
    # frozen at step 49 (its streak reached 50): not reported; looked at again at 99: reported, once
    assert [(e.step, e.reason, e.layer, e.value) for e in guard.events] == [(99, "no_grad", "enc", 100.0)]
    guard = GradGuard()  # cut off all along: once, not again at every multiple of the patience
    trainer(max_steps=160, callbacks=[guard]).fit(CutOff("detach"), digits_loader())
    assert [(e.step, e.reason) for e in guard.events] == [(49, "no_grad")]
