"""Checkpoint round-trips (weights_only=True), and two guards side by side."""

import logging

import torch

from helpers import DigitsMLP, digits_loader, trainer
from lightning_gradguard import GradEvent, GradGuard


def test_state_round_trips_through_a_real_checkpoint(tmp_path, caplog):
    guard = GradGuard()
    t = trainer(max_steps=15, callbacks=[guard])
    t.fit(DigitsMLP(), digits_loader())
    guard.events.append(GradEvent(3, "exploding", "net.0", 9.0, 2.0, ("clip",), "step 3: ...", "spike"))
    path = tmp_path / "ckpt.ckpt"
    t.save_checkpoint(path)

    ckpt = torch.load(path, weights_only=True)  # plain types only
    state = ckpt["callbacks"][guard.state_key]
    assert state["events"][0]["layer"] == "net.0"

    resumed = GradGuard()
    t2 = trainer(max_steps=30, callbacks=[resumed])
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        t2.fit(DigitsMLP(), digits_loader(), ckpt_path=path)
    assert "since the resume" not in caplog.text  # every layer trained again
    assert resumed._watches[0].missing_since_resume is None
    assert resumed.events[0] == guard.events[0]
    w_old, w_new = guard._watches[0], resumed._watches[0]
    assert w_new.counts["steps"] == 30 == w_old.counts["steps"] + 15
    assert w_new.detector.steps == 30


def test_a_resumed_run_has_the_events_and_alerts_of_an_uninterrupted_one(tmp_path):
    """alert_quiet_steps went on from nothing after a resume: a second spike within it alerted again."""
    from lightning.pytorch import seed_everything

    from helpers import FaultyMLP

    faults = {20: "nan_layer", 33: "nan_layer"}
    seed_everything(0)
    whole = GradGuard()
    trainer(max_steps=40, callbacks=[whole]).fit(FaultyMLP(faults), digits_loader(batch_size=512))
    seed_everything(0)
    first = GradGuard()
    t = trainer(max_steps=30, callbacks=[first])
    t.fit(FaultyMLP(faults), digits_loader(batch_size=512))  # one batch per epoch: resumes on the same data
    path = tmp_path / "at30.ckpt"
    t.save_checkpoint(path)
    resumed = GradGuard()
    trainer(max_steps=40, callbacks=[resumed]).fit(FaultyMLP(faults), digits_loader(batch_size=512), ckpt_path=path)
    expected = [(e.step, e.kind, e.actions) for e in whole.events]
    assert [(e.step, e.actions) for e in whole.events if e.step in faults] == [
        (20, ("skip", "alert")), (33, ("skip",))]  # within alert_quiet_steps (100) of the first: no second alert
    assert [(e.step, e.kind, e.actions) for e in resumed.events] == expected


def test_a_resume_with_other_layers_restarts_the_detector_but_the_counts_go_on(tmp_path, caplog):
    guard = GradGuard()
    t = trainer(max_steps=15, callbacks=[guard])
    t.fit(DigitsMLP(), digits_loader())
    path = tmp_path / "ckpt.ckpt"
    t.save_checkpoint(path)
    resumed = GradGuard(group_depth=1)  # every parameter in one layer `net`: another layout
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=30, callbacks=[resumed]).fit(DigitsMLP(), digits_loader(), ckpt_path=path)
    assert "the model's layers changed since the checkpoint" in caplog.text
    watch = resumed._watches[0]
    assert watch.plan.layers == ("net",) and watch.detector.steps == 15  # the detector started afresh
    assert watch.counts["steps"] == 30 == resumed.summary()["steps"]  # the run's count went on


def test_a_guard_reused_by_another_trainer_starts_a_new_run(tmp_path):
    """A cross-validation loop reusing its callbacks: each fold's Trainer starts at step 0. The guard kept the
    last fold's events, counts, loss trend and alert throttle (the same fault at step 12 alerted in fold 1 only)."""
    from helpers import FaultyMLP

    guard = GradGuard()
    for fold in range(2):
        trainer(max_steps=20, callbacks=[guard]).fit(FaultyMLP({12: "nan_layer"}), digits_loader())
        assert [(e.step, e.actions) for e in guard.events] == [(12, ("skip", "alert"))], fold
        assert guard.summary()["steps"] == 20 and guard._watches[0].detector.steps == 20
    # the same Trainer fitting again goes on (more steps of the same run)
    t = trainer(max_steps=10, callbacks=[guard])
    t.fit(DigitsMLP(), digits_loader())
    t.fit_loop.epoch_loop.max_steps = 25
    t.fit(DigitsMLP(), digits_loader())
    assert guard.summary()["steps"] == 25
    # and another Trainer resuming that run's checkpoint goes on from it (restored after the new run began)
    t.save_checkpoint(tmp_path / "at25.ckpt")
    trainer(max_steps=40, callbacks=[guard]).fit(DigitsMLP(), digits_loader(), ckpt_path=tmp_path / "at25.ckpt")
    assert guard.summary()["steps"] == 40 and guard._watches[0].detector.steps == 40


def test_validate_and_test_from_a_checkpoint_leave_the_guards_run_alone(tmp_path):
    # Lightning restores callbacks for every stage: validate/test(ckpt_path=...) replaced the live run's state
    from helpers import FaultyMLP

    class Evaluated(FaultyMLP):
        def validation_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        test_step = validation_step

    other = trainer(max_steps=8, callbacks=[GradGuard()])
    other.fit(Evaluated({5: "inf"}), digits_loader())
    early = tmp_path / "early.ckpt"
    other.save_checkpoint(early)  # another run's state: an event at step 5, 8 steps

    guard = GradGuard(on_nonfinite=("skip", "reduce_lr"), lr_factor=0.5)
    t = trainer(max_steps=24, callbacks=[guard], limit_val_batches=2, limit_test_batches=2)
    model = Evaluated({14: "inf"})
    t.fit(model, digits_loader())
    before = (list(guard.events), guard.summary())
    assert [e.step for e in guard.events] == [14] and before[1]["lr_scale"] == 0.5
    t.validate(model, digits_loader(), ckpt_path=early, verbose=False)
    t.test(model, digits_loader(), ckpt_path=early, verbose=False)
    assert (guard.events, guard.summary()) == before

    fresh = GradGuard()  # a new Trainer validating a checkpoint, then fitting from scratch: a new run
    t2 = trainer(max_steps=4, callbacks=[fresh], limit_val_batches=2)
    t2.validate(Evaluated({}), digits_loader(), ckpt_path=early, verbose=False)
    t2.fit(Evaluated({}), digits_loader())
    assert fresh.events == [] and fresh.summary()["steps"] == 4


def test_a_changed_growth_window_keeps_the_loss_levels():
    """The loss trend's ring has growth_window slots: another size was refused whole, levels included, and the
    run's initial loss level became the first loss after the resume."""
    from lightning_gradguard.detectors import LossTrend

    old = LossTrend(warmup=2, window=5, converged_ratio=0.01)
    for loss in [4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.2]:
        old.observe(loss)
    new = LossTrend(warmup=2, window=3, converged_ratio=0.01)
    new.load_state_dict(old.state_dict())
    assert (new.seen, new.first, new.fast) == (old.seen, old.first, old.fast)
    # the latest 3 levels, where a window of 3 expects them
    assert [new.ring[s % 3] for s in range(4, 7)] == [old.ring[s % 5] for s in range(4, 7)]
    bigger = LossTrend(warmup=2, window=8, converged_ratio=0.01)
    bigger.load_state_dict(old.state_dict())
    assert [bigger.ring[s % 8] for s in range(2, 7)] == [old.ring[s % 5] for s in range(2, 7)]
    assert [bigger.ring[s % 8] for s in (0, 1)] == [None, None] or all(v != v for v in (bigger.ring[0], bigger.ring[1]))


def test_load_state_dict_does_not_mutate_its_input_and_tolerates_old_keys():
    guard = GradGuard()
    state = {"events": [], "watches": {}}
    before = repr(state)
    guard.load_state_dict(state)
    assert repr(state) == before
    GradGuard().load_state_dict({})  # an old/empty checkpoint entry loads


def test_two_guards_coexist(tmp_path):
    a = GradGuard(prefix="grad/")
    b = GradGuard(prefix="strict/", on_exploding="raise", on_vanishing="raise", on_nonfinite="raise")
    assert a.state_key != b.state_key
    assert a.state_key == "GradGuard{'prefix': 'grad/'}"  # what checkpoints are keyed by: must never change
    assert a.state_key is a.state_key  # built once (Lightning reads it on every hook call)
    t = trainer(max_steps=6, callbacks=[a, b], enable_checkpointing=False)
    t.fit(DigitsMLP(), digits_loader())
    path = tmp_path / "two.ckpt"
    t.save_checkpoint(path)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert a.state_key in states and b.state_key in states
    for g in (a, b):
        assert g._watches[0].counts["steps"] == 6
