"""Regression: the scenario suite's small cases, scored exactly as benchmarks/detection.py scores them."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from detection import _make_guard, evaluate  # noqa: E402
from scenarios import run_scenario, select  # noqa: E402

SMALL = select(small=True)


@pytest.mark.parametrize("scenario", SMALL, ids=[s.name for s in SMALL])
def test_small_scenario_detected_in_time_without_false_alarms(scenario):
    (row,) = evaluate([run_scenario(scenario, callbacks=[_make_guard()])])
    assert row["false_alarms"] == 0, row["false_alarm_steps"]
    if scenario.expected is None:
        return
    assert row["detected"], row
    limit = {"nonfinite": 0, "exploding": 6, "vanishing": 100}[scenario.expected]
    assert row["latency"] <= limit, row
    if scenario.expected_layer is not None:
        assert row["layer_ok"], row
    if row["first_nonfinite_loss_step"] is not None:
        # a divergence is named before its loss turns NaN/Inf
        assert row["event_step"] < row["first_nonfinite_loss_step"] or scenario.expected == "nonfinite"


def test_the_rescue_benchmark_runs_sync_deferred_on_the_scenarios_optimizer_fused():
    """rescue.py's guard_deferred variant: module_attrs reach the scenario's module, whose optimizer is then
    fused (what sync='deferred' hands its skip to: it refuses an unfused one)."""
    from rescue import BY_KEY, run_one

    variant = BY_KEY["guard_deferred"]
    assert variant.module_attrs == {"fused": True}
    result = run_scenario("inf_input", callbacks=variant.callbacks(), module_attrs=variant.module_attrs, max_steps=30)
    assert result.module.trainer.optimizers[0].defaults["fused"] is True
    assert result.weights_finite
    row = run_one("inf_input", variant, seed=0)
    assert row["weights_finite"] and row["actions"].get("skip") == 1
