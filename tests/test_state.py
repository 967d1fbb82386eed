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
