"""A real Trainer with a CSVLogger: logged grad/ metrics equal independent references."""

import csv
import glob
import math

import pytest
import torch
from torch import nn
from lightning.pytorch.loggers import CSVLogger

from helpers import DigitsMLP, FaultyMLP, NormRecorder, digits_loader, trainer
from lightning_gradguard import GradGuard


def fit_and_read(tmp_path, guard, max_steps=12, **trainer_kwargs):
    rec = NormRecorder()
    t = trainer(max_steps=max_steps, logger=CSVLogger(tmp_path), callbacks=[rec, guard], **trainer_kwargs)
    t.fit(DigitsMLP(), digits_loader())
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = [r for r in csv.DictReader(open(path)) if r.get("grad/norm_total")]
    return rec, rows


def test_norm_total_and_layers_match_reference_every_step(tmp_path):
    rec, rows = fit_and_read(tmp_path, GradGuard(log_every_n_steps=1, log_layers="all", detail_every_n_steps=1))
    assert [int(r["step"]) for r in rows] == list(range(12))
    for r in rows:
        step = int(r["step"])
        assert float(r["grad/norm_total"]) == pytest.approx(rec.total[step], rel=1e-5)
        for layer, ref in rec.layers[step].items():
            assert float(r[f"grad/norm/{layer}"]) == pytest.approx(ref, rel=1e-5)
        assert float(r["grad/max_abs_total"]) > 0
        assert float(r["grad/events/nonfinite"]) == 0


def test_follows_trainer_log_every_n_steps(tmp_path):
    rec, rows = fit_and_read(tmp_path, GradGuard(log_layers="none"), log_every_n_steps=4)
    assert [int(r["step"]) for r in rows] == [3, 7, 11]
    assert not any(k.startswith("grad/norm/") for k in rows[0])
    for r in rows:
        assert float(r["grad/norm_total"]) == pytest.approx(rec.total[int(r["step"])], rel=1e-5)


def test_trainer_log_every_n_steps_0_logs_only_event_steps_and_detection_goes_on(tmp_path, caplog):
    # Lightning's 0 means "no logging"; it once made the guard fail on every step (modulo by zero), unprotected
    guard = GradGuard()
    t = trainer(max_steps=20, logger=CSVLogger(tmp_path), callbacks=[guard], log_every_n_steps=0)
    t.fit(FaultyMLP({5: "inf", 12: "spike"}), digits_loader())
    assert guard.internal_errors == 0 and guard.summary()["steps"] == 20
    assert [(e.step, e.kind, e.actions) for e in guard.events] == [
        (5, "nonfinite", ("skip", "alert")), (12, "exploding", ("clip", "alert"))]
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    assert [int(r["step"]) for r in csv.DictReader(open(path)) if r.get("grad/norm_total")] == [5, 12]


def test_topk_limits_per_layer_keys(tmp_path):
    guard = GradGuard(log_every_n_steps=1, log_layers="topk", top_k=1)
    t = trainer(max_steps=3, logger=CSVLogger(tmp_path), callbacks=[guard])
    t.fit(DigitsMLP(depth=6), digits_loader())
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    for r in csv.DictReader(open(path)):
        if r.get("grad/norm_total"):
            logged = [k for k, v in r.items() if k.startswith("grad/norm/") and v]
            assert len(logged) == 2  # the largest and the smallest layer norm of that step


def test_param_norms_and_update_ratio_logged(tmp_path):
    rec, rows = fit_and_read(tmp_path, GradGuard(log_every_n_steps=1, log_layers="all", detail_every_n_steps=1), max_steps=3)
    r = rows[0]
    model_lr = 1e-2
    ratio = float(r["grad/update_ratio/net.0"])
    assert ratio == pytest.approx(model_lr * float(r["grad/norm/net.0"]) / float(r["grad/param_norm/net.0"]), rel=1e-4)


def test_costly_details_follow_their_own_cadence(tmp_path):
    rec, rows = fit_and_read(tmp_path, GradGuard(log_every_n_steps=2, detail_every_n_steps=4), max_steps=12)
    assert [int(r["step"]) for r in rows] == [1, 3, 5, 7, 9, 11]
    with_details = [int(r["step"]) for r in rows if r.get("grad/max_abs_total")]
    assert with_details == [3, 7, 11]
    assert all(r.get("grad/param_norm/net.0") for r in rows if int(r["step"]) in with_details)
    # defaults: details every 50 steps however often the Trainer logs
    rec, rows = fit_and_read(tmp_path / "d", GradGuard(log_every_n_steps=1), max_steps=60)
    assert [int(r["step"]) for r in rows if r.get("grad/max_abs_total")] == [49]


def test_details_whose_cadence_is_not_a_multiple_of_the_logging_one_are_logged_at_the_next_logged_step(
        tmp_path, monkeypatch):
    """``Trainer(log_every_n_steps=30)`` with the default details (every 50 steps) read max |g| and
    the weight norms at steps 49, 99, 149, but logged them only at 149 (the only step that was both):
    two extra passes over the gradients thrown away, and the keys at a third of their cadence. The
    details are now read at the first logged step at or after each multiple of their cadence, and
    never at a step that is not logged."""
    from lightning_gradguard import callback

    reads, read_tensors = [], callback.read_tensors

    def spy(plan, *, max_abs=False, **kwargs):
        if max_abs:
            reads.append(guard._trainer().fit_loop.epoch_loop._batches_that_stepped)
        return read_tensors(plan, max_abs=max_abs, **kwargs)

    monkeypatch.setattr(callback, "read_tensors", spy)
    guard = GradGuard(max_grad_weight_ratio=None)
    rec, rows = fit_and_read(tmp_path, guard, max_steps=150, log_every_n_steps=30)
    assert [int(r["step"]) for r in rows] == [29, 59, 89, 119, 149]
    assert [int(r["step"]) for r in rows if r.get("grad/max_abs_total")] == [59, 119, 149] == reads
    assert [int(r["step"]) for r in rows if r.get("grad/param_norm/net.0")] == [59, 119, 149]
    # details more often than logging: every logged step
    reads.clear()
    guard = GradGuard(log_every_n_steps=5, detail_every_n_steps=3, max_grad_weight_ratio=None)
    rec, rows = fit_and_read(tmp_path / "b", guard, max_steps=20)
    assert [int(r["step"]) for r in rows if r.get("grad/max_abs_total")] == [4, 9, 14, 19] == reads


def test_no_logger_means_no_logging_but_detection_runs(tmp_path):
    guard = GradGuard()
    trainer(max_steps=5, callbacks=[guard]).fit(DigitsMLP(), digits_loader())
    assert guard.events == []
    assert next(iter(guard._watches.values())).counts["steps"] == 5
    assert math.isfinite(next(iter(guard._watches.values())).detector.level[0].item())


def test_metrics_are_written_with_lightnings_own_and_still_when_the_guard_raises(tmp_path):
    """The guard's metrics ride along in Lightning's own logger call of the step (one call per step,
    not two: a W&B call costs ~0.7 ms); a step that raises is still logged (CI needs it); the
    logger gets its own method back after fit."""
    from helpers import FaultyMLP
    from lightning_gradguard import GradientHealthError

    class Spy(CSVLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls: list[tuple[int, bool, bool]] = []  # (step, holds grad/ keys, holds Lightning's)

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, any(k.startswith("grad/") for k in metrics), "train_loss" in metrics))
            super().log_metrics(metrics, step)

    class LogsLoss(FaultyMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    logger = Spy(tmp_path)
    guard = GradGuard(on_nonfinite="raise", log_every_n_steps=1)
    with pytest.raises(GradientHealthError):
        trainer(max_steps=10, logger=logger, log_every_n_steps=1, callbacks=[guard]).fit(
            LogsLoss({6: "inf"}), digits_loader())
    # one call per step with both; the raising step 6 (Lightning never writes it) before the loggers finalize
    assert logger.calls[:6] == [(step, True, True) for step in range(6)]
    assert logger.calls[6:] == [(6, True, False)]
    assert "log_metrics" not in vars(logger)
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = {int(r["step"]): r for r in csv.DictReader(open(path)) if r.get("grad/norm_total")}
    assert sorted(rows) == list(range(7))
    assert math.isinf(float(rows[6]["grad/norm_total"])) or math.isnan(float(rows[6]["grad/norm_total"]))


class KeySpy(CSVLogger):
    """Records each call: (step, the key prefixes it holds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, set[str]]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, {k.split("/")[0] for k in metrics if k != "epoch"}))
        super().log_metrics(metrics, step)


def test_two_guards_two_loggers_and_other_cadences_every_metric_arrives_once(tmp_path):
    """Lightning writes every 4 steps, one guard every step, another every 2: at Lightning's steps
    both guards ride along in its one call per logger; the other steps are written apart; every
    logger gets every step once; both loggers get their own method back."""
    from helpers import FaultyMLP

    class LogsLoss(FaultyMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train_loss", loss)
            return loss

    loggers = [KeySpy(tmp_path / "a"), KeySpy(tmp_path / "b")]
    guards = [GradGuard(log_every_n_steps=1, log_layers="none"), GradGuard(prefix="g2/", log_every_n_steps=2, log_layers="none")]
    trainer(max_steps=12, logger=loggers, log_every_n_steps=4, callbacks=guards).fit(LogsLoss({}), digits_loader())
    for logger in loggers:
        assert [(step, keys) for step, keys in logger.calls if "train_loss" in keys] == [
            (step, {"train_loss", "grad", "g2"}) for step in (3, 7, 11)]
        apart = [(step, keys) for step, keys in logger.calls if "train_loss" not in keys]
        assert sorted(apart) == sorted([(s, {"grad"}) for s in range(12) if s % 4 != 3] + [(s, {"g2"}) for s in (1, 5, 9)])
        assert "log_metrics" not in vars(logger)
        (path,) = glob.glob(f"{logger.log_dir}/metrics.csv")
        rows = list(csv.DictReader(open(path)))
        assert sorted(int(r["step"]) for r in rows if r["grad/norm_total"]) == list(range(12))
        assert sorted(int(r["step"]) for r in rows if r["g2/norm_total"]) == [1, 3, 5, 7, 9, 11]


@pytest.mark.parametrize("lightning_every, warnings", [(1, 2), (4, 1)])
def test_a_logger_failing_on_the_guards_keys_still_gets_lightnings_own(tmp_path, caplog, lightning_every, warnings):
    """A shared call that fails (here: because of the guard's keys) is retried with Lightning's
    metrics alone: training and Lightning's logging go on, the guard stops writing there. Where
    the guard's own call failed first (Lightning logs every 4 steps), no shared call is tried."""
    import logging

    class FailsOnGrad(CSVLogger):
        def log_metrics(self, metrics, step=None):
            if any(k.startswith("grad/") for k in metrics):
                raise OSError("No space left on device")
            super().log_metrics(metrics, step)

    logger = FailsOnGrad(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t = trainer(max_steps=8, logger=logger, log_every_n_steps=lightning_every,
                    callbacks=[GradGuard(log_every_n_steps=1)])
        t.fit(DigitsMLP(), digits_loader())  # logs train_loss
    assert t.global_step == 8
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = list(csv.DictReader(open(path)))
    assert [int(r["step"]) for r in rows if r.get("train_loss")] == list(range(lightning_every - 1, 8, lightning_every))
    # every 1: the shared call fails, then the guard's own; every 4: the guard's own only
    assert caplog.text.count("No space left on device") == warnings
    assert "log_metrics" not in vars(logger)


def test_update_ratio_with_a_tensor_learning_rate(tmp_path):
    """An LR held as a tensor (as capturable optimizers and some schedulers keep it) is read without a
    sync of its own: on the host if it lives there, else with the step's one copy."""

    class TensorLR(DigitsMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=torch.tensor(0.02), momentum=0.9)

    guard = GradGuard(log_every_n_steps=1, log_layers="all", detail_every_n_steps=1)
    t = trainer(max_steps=2, logger=CSVLogger(tmp_path), callbacks=[guard])
    t.fit(TensorLR(), digits_loader())
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    r = next(r for r in csv.DictReader(open(path)) if r.get("grad/update_ratio/net.0"))
    expected = 0.02 * float(r["grad/norm/net.0"]) / float(r["grad/param_norm/net.0"])
    assert float(r["grad/update_ratio/net.0"]) == pytest.approx(expected, rel=1e-4)


def test_one_optimizer_stepping_twice_per_batch_logs_both_steps(tmp_path):
    """Manual optimization, a critic-style loop (two optimizer steps per batch, one logging step):
    neither step's metrics overwrite the other's, and the losses the guard keeps are copies."""

    class TwiceAndInPlace(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            for _ in range(2):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(self(x), y)
                self.manual_backward(loss)
                opt.step()
            self.last_loss = loss
            return loss

    class Spy(CSVLogger):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.grad_steps: list[int] = []

        def log_metrics(self, metrics, step=None):
            if "grad/norm_total" in metrics:
                self.grad_steps.append(step)
            super().log_metrics(metrics, step)

    logger = Spy(tmp_path)
    guard = GradGuard(log_every_n_steps=1)
    model = TwiceAndInPlace()
    trainer(max_steps=6, logger=logger, callbacks=[guard]).fit(model, digits_loader())
    assert guard._watches[0].counts["steps"] == 6
    assert len(logger.grad_steps) == 6  # 3 batches, 2 optimizer steps each, none lost
    # the last batch's loss waits for a next step: a copy, not the user's own tensor (which may change in place)
    (pending,) = guard._pending_losses
    assert pending.data_ptr() != model.last_loss.data_ptr() and pending.item() == model.last_loss.item()


def test_norm_total_is_monitorable_by_early_stopping_and_model_checkpoint(tmp_path):
    """``grad/norm_total`` is in ``trainer.callback_metrics`` at every logged step, where
    ``ModelCheckpoint`` (per train steps) and ``EarlyStopping`` (per epoch) read it."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    seen = []

    class Reader(NormRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["grad/norm_total"]))

    rec = Reader()
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="grad/norm_total", mode="min", every_n_train_steps=3, save_top_k=1)
    stop = EarlyStopping(monitor="grad/norm_total", mode="min", patience=100, check_on_train_epoch_end=True)
    t = trainer(max_epochs=2, max_steps=-1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                callbacks=[rec, GradGuard(), ckpt, stop], enable_checkpointing=True)
    t.fit(DigitsMLP(), digits_loader())  # 16 steps per epoch
    assert len(seen) == t.global_step == 32
    assert seen == pytest.approx([rec.total[step] for step in range(32)], rel=1e-5)
    assert float(ckpt.best_model_score) == pytest.approx(min(seen[2::3]), rel=1e-5)
    assert float(stop.best_score) == pytest.approx(min(seen[15], seen[31]), rel=1e-5)


def test_skipped_steps_are_logged_under_rollback(tmp_path):
    """"rollback" skips a lone bad step, but ``grad/skipped_steps`` was only logged with "skip"."""
    guard = GradGuard(on_nonfinite=("rollback", "alert"), log_every_n_steps=1)
    t = trainer(max_steps=8, logger=CSVLogger(tmp_path), callbacks=[guard])
    t.fit(FaultyMLP({4: "inf"}), digits_loader())
    (path,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = {int(r["step"]): r for r in csv.DictReader(open(path)) if r.get("grad/norm_total")}
    assert [e.actions for e in guard.events] == [("skip", "alert")]
    assert [float(rows[s]["grad/skipped_steps"]) for s in (3, 4, 7)] == [0, 1, 1]


def test_a_logger_listed_twice_gets_the_guards_metrics_once(tmp_path):
    """``Trainer(logger=[csv, csv])``: Lightning writes its own metrics twice, the guard queued its metrics once
    per listing: a third row per step, the guard's keys in two of them."""
    logger = KeySpy(tmp_path)  # DigitsMLP logs train_loss
    trainer(max_steps=6, logger=[logger, logger], log_every_n_steps=1,
            callbacks=[GradGuard(log_layers="none")]).fit(DigitsMLP(), digits_loader())
    for step in range(6):
        calls = [keys for s, keys in logger.calls if s == step]
        assert sorted(map(sorted, calls)) == [["grad", "train_loss"], ["train_loss"]]  # as Lightning's own: twice
    assert "log_metrics" not in vars(logger)
