"""W&B integration: real offline runs read back from their ``.wandb`` file, plus the sink's rules with a fake run.

The library never calls ``wandb.init`` / ``wandb.finish``; the tests do, to own
and flush the run they read back (see ``wandb_records.py``).
"""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

from helpers import DigitsMLP, FaultyMLP, digits_loader, trainer
from lightning_gradguard import GradEvent, GradGuard
from lightning_gradguard.integrations import wandb as gg_wandb
from lightning_gradguard.integrations.wandb import WandbSink, alert_level, alert_text, alert_title, wandb_run
from wandb_records import find_run_file, read_run

wandb = pytest.importorskip("wandb")

STEPS = 30
FAULTS = {7: "inf", 9: "inf", 12: "inf", 20: "spike"}  # one non-finite incident (three steps), one spike


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline, silent, everything under tmp_path; no run left behind."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """One real offline run shared by the tests below: faults at known steps, pictures and histograms on."""
    from lightning.pytorch.loggers import WandbLogger

    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("WANDB_DIR", str(root))
        sink = WandbSink(pictures_every_n_steps=15, histogram_layers=["net.0", "net.4"],
                         histogram_every_n_steps=10, histogram_bins=32)
        guard = GradGuard(sinks=[sink], alert_quiet_steps=0)  # every event alerts: the sink's window is under test
        torch.manual_seed(0)  # a module fixture runs before the autouse seed: the same model every run
        model = FaultyMLP(FAULTS, optimizer="sgd", lr=0.05)
        logger = WandbLogger(offline=True, save_dir=str(root))
        trainer(logger=logger, max_steps=STEPS, log_every_n_steps=5, callbacks=[guard]).fit(model, digits_loader())
        wandb.finish()  # the test owns the run: flush it before reading
    path = find_run_file(str(root))
    return guard, sink, read_run(path), os.path.dirname(path)


# ---------------------------------------------------------------------- real offline runs
def test_history_rows_carry_grad_keys_at_the_logged_steps(faulty_run):
    guard, _, run, _ = faulty_run
    steps = {row["trainer/global_step"] for row in run.rows_with("grad/norm_total")}
    logged = {s for s in range(STEPS) if (s + 1) % 5 == 0}
    assert steps == logged | {e.step for e in guard.events}  # every 5th step, and every step with an event
    (row,) = [r for r in run.rows_with("grad/norm_total") if r["trainer/global_step"] == 9]
    assert row["grad/norm/net.0"] == "NaN" or row["grad/norm/net.0"] != row["grad/norm/net.0"]  # NaN survives
    assert row["grad/events/nonfinite"] == 2 and row["grad/skipped_steps"] == 2


def test_one_alert_per_kind_and_layer_with_title_level_and_facts(faulty_run):
    guard, sink, run, _ = faulty_run
    assert [(e.step, e.kind, e.layer) for e in guard.events] == [
        (7, "nonfinite", "net.0"), (9, "nonfinite", "net.0"), (12, "nonfinite", "net.0"), (20, "exploding", "net.0"),
    ]
    nonfinite, exploding = run.alerts  # three NaN steps in one layer within the window: one alert
    assert nonfinite["title"] == "GradGuard: nonfinite gradients in net.0"
    assert nonfinite["level"] == "ERROR"
    for fact in ("step: 7", "layer: net.0", "kind: nonfinite", "value: nan", "threshold: inf", "actions: skip, alert"):
        assert fact in nonfinite["text"]
    assert nonfinite["text"].startswith(guard.events[0].message)
    assert nonfinite["wait_duration"] == 600_000  # the server-side window matches ours (ms)
    assert exploding["title"] == "GradGuard: exploding gradients in net.0"
    assert exploding["level"] == "WARN"
    assert "step: 20" in exploding["text"] and "actions: clip, alert" in exploding["text"]
    assert all(len(a["title"]) < 64 for a in run.alerts)
    assert (sink.alerts_sent, sink.alerts_suppressed) == (2, 2)


def test_heatmap_and_bar_chart_are_logged_as_images(faulty_run):
    _, _, run, run_dir = faulty_run
    rows = run.rows_with("grad/flow")
    assert [r["trainer/global_step"] for r in rows] == [14, 29]  # every 15 steps; the end adds nothing new
    for row in rows:
        for key in ("grad/flow", "grad/norms"):
            image = row[key]
            assert image["_type"] == "image-file" and image["format"] == "png"
            assert image["width"] == 1000 and image["height"] == 300
            assert os.path.getsize(os.path.join(run_dir, "files", image["path"])) > 5000
    assert "step" in rows[0]["grad/flow"]["caption"]


def test_gradient_histograms_for_chosen_layers(faulty_run):
    _, _, run, _ = faulty_run
    rows = run.rows_with("grad/hist/net.0")
    # every 10th step; step 9 was skipped (its NaN gradients were dropped), so that one waits for step 10
    assert [r["trainer/global_step"] for r in rows] == [10, 19, 29]
    for row in rows:
        assert "grad/hist/net.2" not in row
        for key in ("grad/hist/net.0", "grad/hist/net.4"):
            hist = row[key]
            assert hist["_type"] == "histogram"
            assert len(hist["values"]) == 32 and len(hist["bins"]) == 33
            assert sum(hist["values"]) > 0


def test_run_summary_has_the_counts(faulty_run):
    _, _, run, _ = faulty_run
    s = run.summary
    assert (s["grad/events/nonfinite"], s["grad/events/exploding"], s["grad/events/vanishing"]) == (3, 1, 0)
    assert s["grad/steps"] == STEPS
    assert s["grad/worst_layer"] == "net.0"
    assert s["grad/skipped_fraction"] == pytest.approx(3 / STEPS)
    assert s["grad/clipped_fraction"] == pytest.approx(1 / STEPS)
    assert s["grad/lr_scale"] == 1.0
    assert (s["grad/alerts_sent"], s["grad/alerts_suppressed"]) == (2, 2)


def test_an_active_wandb_run_is_used_without_a_wandb_logger(wandb_env):
    run = wandb.init(project="gradguard-test", dir=str(wandb_env), mode="offline")
    guard = GradGuard()  # the W&B sink is added automatically
    trainer(max_steps=10, callbacks=[guard]).fit(FaultyMLP({3: "nan_layer"}), digits_loader())
    assert [type(s).__name__ for s in guard._active_sinks] == ["WandbSink"]
    run.finish()
    records = read_run(find_run_file(str(wandb_env)))
    (alert,) = records.alerts
    assert alert["title"] == "GradGuard: nonfinite gradients in net.2" and "step: 3" in alert["text"]
    assert records.rows_with("grad/flow")  # the final picture, although no logger logs scalars
    assert records.summary["grad/events/nonfinite"] == 1


def test_no_wandb_run_means_no_wandb_sink(wandb_env):
    assert wandb.run is None
    guard = GradGuard()
    trainer(max_steps=3, callbacks=[guard]).fit(DigitsMLP(), digits_loader())
    assert guard._active_sinks == []
    with pytest.raises(ValueError, match=r"`wandb=True` but no W&B run was found"):
        trainer(max_steps=3, callbacks=[GradGuard(wandb=True)]).fit(DigitsMLP(), digits_loader())


# ---------------------------------------------------------------------- without wandb installed
def test_everything_works_when_wandb_cannot_be_imported(monkeypatch, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(ImportError):
        import wandb as _  # noqa: F401
    logger = CSVLogger(tmp_path)
    t = trainer(max_steps=12, logger=logger, log_every_n_steps=4)
    assert wandb_run(t) is None
    guard = GradGuard()
    t = trainer(max_steps=12, logger=logger, log_every_n_steps=4, callbacks=[guard])
    t.fit(FaultyMLP({5: "inf"}), digits_loader())
    assert [e.step for e in guard.events] == [5]
    assert guard._active_sinks == []
    with pytest.raises(ValueError, match=r"`wandb=True` but no W&B run was found"):
        trainer(max_steps=2, callbacks=[GradGuard(wandb=True)]).fit(DigitsMLP(), digits_loader())


# ---------------------------------------------------------------------- the sink's rules, with a fake run
class FakeRun:
    def __init__(self) -> None:
        self.alerts: list[dict] = []
        self.logged: list[dict] = []
        self.summary: dict = {}

    def alert(self, **kwargs) -> None:
        self.alerts.append(kwargs)

    def log(self, row: dict) -> None:
        self.logged.append(row)


class FakeGuard:
    prefix = "grad/"
    _watches: dict = {}


def event(step, kind="nonfinite", layer="net.0", actions=("skip", "alert"), optimizer=0, reason="nan"):
    return GradEvent(step, kind, layer, float("nan"), float("inf"), actions, f"step {step}: something", reason,
                     optimizer, (layer,) if layer else ())


@pytest.fixture
def fake(monkeypatch):
    run = FakeRun()
    monkeypatch.setattr(gg_wandb, "wandb_run", lambda trainer: run)
    return run


def make_sink(fake, clock, **kwargs) -> WandbSink:
    sink = WandbSink(pictures=False, **kwargs)
    sink.setup(FakeGuard(), None)
    sink._clock = lambda: clock[0]
    return sink


def test_rate_limit_per_kind_and_layer_with_a_window(fake):
    clock = [0.0]
    sink = make_sink(fake, clock, alert_window_s=60)
    for step, t, kind, layer in [
        (1, 0, "nonfinite", "net.0"),    # sent
        (2, 10, "nonfinite", "net.0"),   # same kind and layer within 60 s: held back
        (3, 20, "nonfinite", "net.2"),   # another layer: sent
        (4, 30, "exploding", "net.0"),   # another kind: sent
        (5, 50, "nonfinite", "net.0"),   # held back
        (6, 61, "nonfinite", "net.0"),   # window over: sent, saying 2 were held back
        (7, 62, "nonfinite", None),      # global: its own key
    ]:
        clock[0] = t
        sink.on_event(FakeGuard(), None, event(step, kind, layer, actions=("alert",)))
    assert [a["text"].split(":")[0] for a in fake.alerts] == ["step 1", "step 3", "step 4", "step 6", "step 7"]
    assert "(2 more alerts like this one were held back in the last 60 s)" in fake.alerts[3]["text"]
    assert fake.alerts[4]["title"] == "GradGuard: nonfinite gradients (global)"
    assert (sink.alerts_sent, sink.alerts_suppressed) == (5, 2)
    assert all(a["wait_duration"] == 60 for a in fake.alerts)


def test_without_a_window_every_alert_goes_out_up_to_max_alerts(fake):
    sink = make_sink(fake, [0.0], alert_window_s=0, max_alerts=3)
    for step in range(5):
        sink.on_event(FakeGuard(), None, event(step))
    assert [a["text"].split(":")[0] for a in fake.alerts] == ["step 0", "step 1", "step 2"]
    assert fake.alerts[0]["wait_duration"] == 0.001  # never 0: W&B would read it as its default minute
    assert sink.alerts_suppressed == 2


def test_only_events_with_the_alert_response_alert(fake):
    sink = make_sink(fake, [0.0])
    sink.on_event(FakeGuard(), None, event(1, actions=("log",)))
    sink.on_event(FakeGuard(), None, event(2, actions=("skip",)))
    assert fake.alerts == []


def test_level_title_and_text():
    assert alert_level(event(1, "nonfinite")) == "ERROR"
    assert alert_level(event(1, "exploding", actions=("clip", "alert"))) == "WARN"
    assert alert_level(event(1, "vanishing", actions=("alert",))) == "WARN"
    assert alert_level(event(1, "exploding", actions=("alert", "stop"))) == "ERROR"
    assert alert_level(event(1, "exploding", actions=("rollback", "alert"))) == "ERROR"
    long = event(3, "vanishing", "model.encoder.layers.23.attention.self.query_key_value.lora_A", optimizer=2)
    title = alert_title(long)
    assert title == "GradGuard: vanishing in m.e.l.23.a.s.q.lora_A~881b (opt 2)"  # a shorter head keeps the block
    # W&B drops an alert whose title it saw within wait_duration: layers that differ in a block number only
    # must not share a title (they did when the head of the name was cut off)
    names = [f"model.encoder.layers.{i}.self_attention.out_proj.lora_B" for i in (0, 1, 11)]
    titles = [alert_title(event(1, "vanishing", name, actions=("alert",))) for name in names]
    assert [t.rsplit("~", 1)[0] for t in titles] == [
        f"GradGuard: vanishing gradients in m.e.l.{i}.s.o.lora_B" for i in (0, 1, 11)]
    stopped = alert_title(event(1, actions=("skip", "alert", "stop")))
    assert stopped == "GradGuard stopped the run: nonfinite gradients in net.0"
    assert alert_title(event(1, actions=("rollback", "alert"))) == "GradGuard rolled back: nonfinite gradients in net.0"
    assert alert_title(event(1, layer=None, reason="loss")) == "GradGuard: nonfinite loss (global)"  # finite grads
    text = alert_text(long)
    assert "optimizer: 2" in text and "layer: model.encoder.layers.23" in text


def test_summary_goes_to_the_run_summary(fake):
    sink = make_sink(fake, [0.0])
    sink.on_fit_end(FakeGuard(), None, {"events/nonfinite": 2, "worst_layer": None, "lr_scale": 0.5})
    assert fake.summary == {"grad/events/nonfinite": 2, "grad/worst_layer": "none", "grad/lr_scale": 0.5,
                            "grad/alerts_sent": 0, "grad/alerts_suppressed": 0}


def test_without_matplotlib_pictures_switch_off_and_alerts_go_on(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    sink = WandbSink()
    sink.setup(FakeGuard(), None)
    assert sink.pictures is False
    sink.on_event(FakeGuard(), None, event(1))
    assert len(fake.alerts) == 1


def test_pictures_and_histograms_per_optimizer_in_a_real_trainer(fake):
    from test_pictures import TwoOptimizers

    sink = WandbSink(pictures_every_n_steps=4, histogram_layers=["net.*"], histogram_every_n_steps=4,
                     histogram_bins=8)
    trainer(max_steps=8, callbacks=[GradGuard(sinks=[sink])]).fit(TwoOptimizers(), digits_loader())
    keys = [sorted(k for k in row if k != "trainer/global_step") for row in fake.logged]
    # each optimizer steps 4 times (global_step counts both): pictures at its 4th step, histograms too
    assert keys == [
        ["grad/opt0/flow", "grad/opt0/norms"], ["grad/opt0/hist/net.0", "grad/opt0/hist/net.2"],
        ["grad/opt1/flow", "grad/opt1/norms"], ["grad/opt1/hist/net.4"],
    ]
    assert all(isinstance(v, wandb.Image) for k, v in fake.logged[0].items() if k.endswith(("flow", "norms")))
    assert fake.summary["grad/steps"] == 8


def test_histogram_patterns_that_match_no_layer_warn_once(fake, caplog):
    """``histogram_layers=["encoder.*"]`` (the README's example) on a model without an encoder drew nothing,
    silently. Checked once every optimizer has stepped: "net.4" is only the second optimizer's."""
    from test_pictures import TwoOptimizers

    sink = WandbSink(pictures=False, histogram_layers=["net.4", "encoder.*", "net.9"], histogram_every_n_steps=4)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=8, callbacks=[GradGuard(sinks=[sink])]).fit(TwoOptimizers(), digits_loader())
    warned = [r.getMessage() for r in caplog.records if "histogram_layers" in r.getMessage()]
    assert warned == ["GradGuard: WandbSink(histogram_layers=...): 'encoder.*', 'net.9' match no layer, so no "
                      "histogram is drawn for them. The layers are: net.0, net.2, net.4"]
    assert [sorted(k for k in row if k != "trainer/global_step") for row in fake.logged] == [["grad/opt1/hist/net.4"]]

    class FrozenFirst(DigitsMLP):  # net.0 left out of the optimizer for now (BackboneFinetuning adds it later)
        def configure_optimizers(self):
            self.net[0].requires_grad_(False)
            return torch.optim.SGD(self.net[1:].parameters(), lr=self.lr)

    caplog.clear()
    sink = WandbSink(pictures=False, histogram_layers=["net.0", "nope"], histogram_every_n_steps=4)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=4, callbacks=[GradGuard(sinks=[sink])]).fit(FrozenFirst(), digits_loader())
    warned = [r.getMessage() for r in caplog.records if "histogram_layers" in r.getMessage()]
    assert warned == ["GradGuard: WandbSink(histogram_layers=...): 'nope' matches no layer, so no histogram is drawn "
                      "for it. The layers are: net.2, net.4, net.0"]  # net.0: a layer of the model, not a typo


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alert_window_s=-1), r"`alert_window_s` must be a number of seconds >= 0, got -1"),
        (dict(max_alerts=1.5), r"`max_alerts` must be an integer >= 0, got 1.5"),
        (dict(pictures_every_n_steps=-5), r"`pictures_every_n_steps` must be None or an integer >= 0, got -5"),
        (dict(max_columns=1), r"`max_columns` must be an integer >= 2, got 1"),
        (dict(histogram_bins=513), r"`histogram_bins` must be an integer in 1..512"),
        (dict(histogram_every_n_steps=0), r"`histogram_every_n_steps` must be an integer >= 1, got 0"),
        (dict(histogram_layers="net.0"), r"wrap it in a list: \['net.0'\]"),
        (dict(histogram_layers=5), r"`histogram_layers` must be a list of layer names or patterns \(strings\), got 5"),
        (dict(histogram_layers=[5]), r"`histogram_layers` must be a list of .* got \[5\]"),
        (dict(pictures="no"), r"`pictures` must be True or False, got 'no'"),  # was taken for True
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WandbSink(**kwargs)


def test_numpy_integers_are_integers():
    import numpy as np

    # numpy integers (from a config computed with numpy) are integers, as GradGuard takes them
    sink = WandbSink(max_alerts=np.int64(5), histogram_bins=np.int32(8), histogram_every_n_steps=np.int64(3))
    assert (sink.max_alerts, sink.histogram_bins, sink.histogram_every_n_steps) == (5, 8, 3)
    assert type(sink.max_alerts) is int


def test_sync_deferred_logs_each_step_at_its_own_step_and_alerts(wandb_env):
    """sync='deferred' reads (and logs) each step one step late: W&B still gets every row at its own
    trainer/global_step, the same rows and alerts as one sync per step."""
    from lightning.pytorch.loggers import WandbLogger

    class Fused(FaultyMLP):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, fused=True)

    guard = GradGuard(sync="deferred", alert_quiet_steps=0)
    logger = WandbLogger(offline=True, save_dir=str(wandb_env))
    trainer(logger=logger, max_steps=STEPS, log_every_n_steps=5, callbacks=[guard]).fit(
        Fused(FAULTS, optimizer="sgd", lr=0.05), digits_loader())
    wandb.finish()
    run = read_run(find_run_file(str(wandb_env)))
    assert [(e.step, e.kind) for e in guard.events] == [(7, "nonfinite"), (9, "nonfinite"), (12, "nonfinite"),
                                                         (20, "exploding")]
    rows = {r["trainer/global_step"]: r for r in run.rows_with("grad/norm_total")}
    assert set(rows) == {s for s in range(STEPS) if (s + 1) % 5 == 0} | {7, 9, 12, 20}
    assert rows[12]["grad/events/nonfinite"] == 3 and rows[12]["grad/skipped_steps"] == 3
    assert rows[20]["grad/clip_coef"] < 1 and rows[20]["grad/clipped_steps"] == 1
    assert [a["title"] for a in run.alerts] == ["GradGuard: nonfinite gradients in net.0",
                                                "GradGuard: exploding gradients in net.0"]


def test_a_stopped_run_alerts_within_the_quiet_window_and_subclasses_are_recognised(wandb_env):
    """The stop of the run is the alert that matters most: the guard's quiet window and the sink's held it
    back (the layer had alerted at the first NaN), and its title would have been dropped by W&B's own
    per-title limit. A subclass of WandbSink is the W&B sink (not one more beside it), a subclass of
    WandbLogger is W&B's logger (the summary goes to the run summary, not into its history)."""
    from lightning.pytorch.loggers import WandbLogger

    class MySink(WandbSink):
        pass

    class MyLogger(WandbLogger):
        pass

    sink = MySink(pictures=False)
    guard = GradGuard(sinks=[sink], max_consecutive_skips=4)
    trainer(logger=MyLogger(offline=True, save_dir=str(wandb_env)), max_steps=STEPS, log_every_n_steps=5,
            callbacks=[guard]).fit(FaultyMLP({s: "inf" for s in range(6, STEPS)}), digits_loader())
    wandb.finish()
    run = read_run(find_run_file(str(wandb_env)))
    assert guard._active_sinks == [sink]
    assert [e.actions for e in guard.events][-1] == ("skip", "alert", "stop")
    assert [(a["title"], a["level"]) for a in run.alerts] == [
        ("GradGuard: nonfinite gradients in net.0", "ERROR"),
        ("GradGuard stopped the run: nonfinite gradients in net.0", "ERROR"),
    ]
    assert "step: 9" in run.alerts[1]["text"] and "max_consecutive_skips" in run.alerts[1]["text"]
    assert not run.rows_with("grad/summary/steps") and run.summary["grad/steps"] == 10


def test_a_stop_alert_goes_out_past_max_alerts(fake):
    sink = make_sink(fake, [0.0], max_alerts=1)
    sink.on_event(FakeGuard(), None, event(1))
    sink.on_event(FakeGuard(), None, event(2))  # held back: max_alerts
    sink.on_event(FakeGuard(), None, event(3, actions=("skip", "alert", "stop")))
    assert [a["title"] for a in fake.alerts] == ["GradGuard: nonfinite gradients in net.0",
                                                 "GradGuard stopped the run: nonfinite gradients in net.0"]


def test_the_summary_for_other_loggers_skips_a_wandb_logger_subclass(wandb_env):
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger

    from lightning_gradguard.pictures import log_summary_metrics

    class Recording(WandbLogger):
        def log_metrics(self, metrics, step=None):
            self.got = metrics

    class Other:
        def log_metrics(self, metrics, step=None):
            self.got = metrics

        def save(self):
            pass

    mine, other = Recording(offline=True, save_dir=str(wandb_env)), Other()
    log_summary_metrics(FakeGuard(), SimpleNamespace(loggers=[mine, other]), {"steps": 3}, step=2)
    assert not hasattr(mine, "got") and other.got == {"grad/summary/steps": 3.0}  # W&B: the run summary


def test_alert_titles_fit_w_and_b_and_never_collide():
    titles = {}
    for actions in (("alert",), ("rollback", "alert"), ("skip", "alert", "stop")):
        for optimizer in (0, 1, 12):
            for layer in (None, "net.0", "x" * 80, "y" * 80, *(f"model.encoder.layers.{i}.self_attn.out_proj"
                                                                 for i in (1, 11)),
                          *(f"base_model.model.encoder.layer.{i}.attention.self.query.lora_{ab}.default"
                            for i in (0, 12, 13) for ab in "AB")):
                title = alert_title(event(1, "exploding", layer, actions=actions, optimizer=optimizer))
                assert len(title) <= 63 and title not in titles, (title, titles.get(title))
                titles[title] = (actions, optimizer, layer)


def test_a_wandb_logger_prefix_applies_to_pictures_and_summary_too(wandb_env):
    from lightning.pytorch.loggers import WandbLogger

    guard = GradGuard()
    trainer(logger=WandbLogger(offline=True, save_dir=str(wandb_env), prefix="train"), max_steps=10,
            log_every_n_steps=5, callbacks=[guard]).fit(FaultyMLP({3: "nan_layer"}), digits_loader())
    wandb.finish()
    run = read_run(find_run_file(str(wandb_env)))
    assert run.rows_with("train-grad/norm_total") and run.rows_with("train-grad/flow")  # beside each other
    assert not run.rows_with("grad/flow") and not run.rows_with("grad/norm_total")
    assert run.summary["train-grad/events/nonfinite"] == 1 and "grad/events/nonfinite" not in run.summary


def test_a_disabled_wandb_run_costs_no_pictures(wandb_env, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger


    def no_drawing(*args, **kwargs):
        raise AssertionError("a picture was drawn for a disabled run")

    monkeypatch.setattr(gg_wandb, "heatmap_figure", no_drawing)
    guard = GradGuard()
    # CI jobs switch W&B off so (WANDB_MODE=disabled; given here, as the process's wandb settings are set up)
    trainer(logger=WandbLogger(save_dir=str(wandb_env), mode="disabled"), max_steps=10, callbacks=[guard]).fit(
        FaultyMLP({3: "nan_layer"}), digits_loader())
    (sink,) = guard._active_sinks
    assert isinstance(sink, WandbSink) and sink.run is None and sink.alerts_sent == 0
    assert guard.internal_errors == 0 and [e.step for e in guard.events] == [3]
