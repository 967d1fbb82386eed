"""The run record (``RecordSink`` / ``read_record``) and the ``gradguard`` command that gates CI on it."""

from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger

from helpers import DigitsMLP, FaultyMLP, NormRecorder, digits_loader, trainer
from lightning_gradguard import GradGuard, GradientHealthError
from lightning_gradguard.cli import main
from lightning_gradguard.record import FILENAME, RecordError, RecordSink, read_record
from test_testing import DeepSigmoid

FAULTS = {6: "nan_layer", 14: "spike", 17: "inf"}


def _run(tmp, model, steps=20, **guard_kwargs):
    sink = RecordSink(**guard_kwargs.pop("record", {}))
    guard = GradGuard(sinks=[sink], **guard_kwargs)
    ref = NormRecorder()
    t = trainer(max_steps=steps, callbacks=[ref, guard], logger=CSVLogger(str(tmp)))
    try:
        t.fit(model, digits_loader())
    except GradientHealthError:
        pass
    return guard, sink, ref


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Three real runs, shared: healthy, faulty (NaN, spike, Inf), and a vanishing stack that raised."""
    out = {}
    for name, model, kwargs in (
        ("healthy", DigitsMLP, {}),
        ("faulty", lambda: FaultyMLP(FAULTS), {}),
        ("vanishing", DeepSigmoid, dict(on_vanishing="raise", vanish_patience=15)),
    ):
        # seeded before the model is built: a module fixture runs before the autouse seed, and with a random
        # init the inputs x 1e3 at step 14 could saturate the softmax and make no spike (1 run in 8)
        torch.manual_seed(0)
        out[name] = _run(tmp_path_factory.mktemp(name), model(), **kwargs)
    return out


# ---------------------------------------------------------------------- the record
def test_record_lands_in_the_log_folder_and_round_trips(records):
    guard, sink, ref = records["faulty"]
    assert sink.path.endswith(os.path.join("lightning_logs", "version_0", FILENAME))
    with open(sink.path) as f:
        lines = [json.loads(line) for line in f]
    types = [line["type"] for line in lines]
    assert types[0] == "header" and types[-1] == "summary"
    assert types.count("step") == 20 and types.count("event") == len(guard.events) == 3
    header = lines[0]
    assert header["format"] == "gradguard-record" and header["version"] == 1
    assert header["layers"] == {"0": ["net.0", "net.2", "net.4"]}
    assert header["config"]["on_nonfinite"] == ["skip", "alert"] and header["config"]["vanish_patience"] == 50
    assert header["trainer"]["module"] == "FaultyMLP"

    record = read_record(sink.path)
    assert record.finished and not record.truncated
    assert record.layers == {0: ("net.0", "net.2", "net.4")}
    assert record.steps[0].tolist() == list(range(20))
    assert [repr(e) for e in record.events] == [repr(e) for e in guard.events]  # repr: nan == nan
    assert record.summary["events/nonfinite"] == 2 and record.summary["steps"] == 20
    # norms: 4 significant digits of what an independent torch.linalg reference measured
    norms = record.norms[0]
    for step in range(20):
        expect = [ref.total[step]] + [ref.layers[step][name] for name in record.layers[0]]
        np.testing.assert_allclose(norms[step], expect, rtol=6e-4)
    assert math.isnan(norms[6, 0]) and math.isnan(norms[6, 2])  # the NaN planted in net.2 at step 6, kept as NaN
    stats = record.layer_stats(0)
    assert stats["nonfinite"].tolist() == [2, 1, 1, 0]
    assert stats["max"][0] == pytest.approx(np.nanmax(norms[:, 0]), rel=1e-3)


def test_raised_run_still_ends_its_record(records):
    guard, sink, _ = records["vanishing"]
    record = read_record(sink.path)
    assert record.finished  # the summary was written from on_exception
    assert [(e.kind, e.step, e.actions) for e in record.events] == [("vanishing", 14, ("raise",))]
    assert record.norms[0].shape == (15, 22)


def test_every_n_steps_keeps_event_steps_and_a_full_summary(tmp_path):
    guard, sink, _ = _run(tmp_path, FaultyMLP(FAULTS), record={"every_n_steps": 5, "digits": 3})
    record = read_record(sink.path)
    assert record.steps[0].tolist() == [0, 5, 6, 10, 14, 15, 17]  # multiples of 5 and the event steps
    assert record.summary["norms"]["0"]["steps"] == 20
    with open(sink.path) as f:
        step_line = next(line for line in f if '"type":"step"' in line)
    values = json.loads(step_line)["norms"]
    assert values and all(v == float(f"{v:.3g}") for v in values)  # rounded to digits=3


def test_explicit_paths_and_no_logger(tmp_path):
    file_sink = RecordSink(tmp_path / "records" / "run.jsonl")
    dir_sink = RecordSink(tmp_path / "elsewhere")
    trainer(max_steps=3, callbacks=[GradGuard(sinks=[file_sink, dir_sink])]).fit(DigitsMLP(), digits_loader())
    assert file_sink.path == str(tmp_path / "records" / "run.jsonl")
    assert dir_sink.path == str(tmp_path / "elsewhere" / FILENAME)
    plain = RecordSink()
    trainer(max_steps=3, default_root_dir=tmp_path / "root", callbacks=[GradGuard(sinks=[plain])]).fit(
        DigitsMLP(), digits_loader()
    )
    assert plain.path == str(tmp_path / "root" / FILENAME)  # no logger: default_root_dir
    for path in (file_sink.path, dir_sink.path, plain.path):
        assert len(read_record(path).steps[0]) == 3


def test_a_failing_record_never_breaks_training(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    sink = RecordSink(blocker / "sub" / "run.jsonl")  # its folder cannot be created
    guard = GradGuard(sinks=[sink])
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=5, callbacks=[guard]).fit(DigitsMLP(), digits_loader())
    assert guard._watches[0].counts["steps"] == 5
    assert "RecordSink.setup failed" in caplog.text and "training goes on" in caplog.text
    # which file, and how it was asked for (a bare FileNotFoundError named neither)
    assert f"cannot write the run record '{blocker / 'sub' / 'run.jsonl'}' (GradGuard(record=...) or " in caplog.text


def test_two_optimizers_each_get_their_layers(tmp_path):
    class TwoOpt(LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.a, self.b = torch.nn.Linear(64, 16), torch.nn.Linear(16, 10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            opt_a, opt_b = self.optimizers()
            loss = torch.nn.functional.cross_entropy(self.b(torch.tanh(self.a(x))), y)
            opt_a.zero_grad(), opt_b.zero_grad()
            self.manual_backward(loss)
            opt_a.step(), opt_b.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)

    sink = RecordSink(tmp_path)
    trainer(max_steps=8, callbacks=[GradGuard(sinks=[sink])]).fit(TwoOpt(), digits_loader())
    record = read_record(tmp_path)
    assert record.layers == {0: ("a",), 1: ("b",)}
    assert record.norms[0].shape == (4, 2) and record.norms[1].shape == (4, 2)
    assert set(record.summary["norms"]) == {"0", "1"}
    assert main([str(tmp_path), "--png", str(tmp_path / "two.png")]) == 0


def test_a_param_group_added_mid_run_keeps_the_record_readable(tmp_path):
    # the layers grow at the unfreeze (BackboneFinetuning): before, the step lines after it had more
    # norms than the header's layers and the record read as corrupt
    from test_finetuning import STEPS_PER_EPOCH, _fit

    ref = NormRecorder()
    sink = RecordSink(tmp_path)
    _fit("group", GradGuard(sinks=[sink]), max_epochs=2, faults={20: "nan"}, callbacks=[ref])
    record = read_record(tmp_path)
    assert record.layers == {0: ("backbone.0", "backbone.2", "head")}
    norms = record.norms[0]
    assert norms.shape == (2 * STEPS_PER_EPOCH, 4)
    assert (norms[:STEPS_PER_EPOCH, 1:3] == 0).all()  # frozen: no gradients, 0 by the record's rule
    for row, step in zip(norms, record.steps[0]):
        if step != 20:
            expected = [ref.total[step]] + [ref.layers[step].get(k, 0.0) for k in record.layers[0]]
            np.testing.assert_allclose(row, expected, rtol=1e-3)
    stats = record.layer_stats(0)  # the summary's, relaid at the change
    expected = max(ref.layers[s].get("backbone.0", 0) for s in ref.layers if s != 20)
    assert stats["max"][1] == pytest.approx(expected, rel=1e-3)
    assert stats["first"][1] == 0 and stats["nonfinite"].tolist() == [1, 1, 0, 0]
    assert main([str(tmp_path)]) == 1  # read, reported, and failed on the NaN event


class HeadOnlyLater(DigitsMLP):
    """Epoch 1 replaces the optimizer by one over fewer layers (net.0 frozen): the layers shrink mid-run."""

    def configure_optimizers(self):
        if self.trainer.current_epoch >= 1:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)
        return super().configure_optimizers()

    def on_train_epoch_start(self):
        if self.current_epoch == 1:
            self.net[0].requires_grad_(False)
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_layers_removed_mid_run_report_by_name(tmp_path, capsys):
    # the summary follows the last layout (net.2, net.4), the read record keeps net.0 too: the report
    # crashed with an IndexError (a traceback, exit 1: "events found")
    ref = NormRecorder()
    trainer(max_steps=-1, max_epochs=2, default_root_dir=tmp_path,
            callbacks=[ref, GradGuard(record=True)]).fit(HeadOnlyLater(), digits_loader(n=96))
    record = read_record(tmp_path)
    assert record.layers == {0: ("net.2", "net.4", "net.0")} and record.summary_layers == {0: ("net.2", "net.4")}
    stats = record.layer_stats(0)
    assert all(len(v) == 4 for v in stats.values())
    for column, name in ((1, "net.2"), (2, "net.4")):  # the summary's, over every step, found by name
        assert stats["max"][column] == pytest.approx(max(ref.layers[s][name] for s in range(6)), rel=1e-3)
        assert stats["last"][column] == pytest.approx(ref.layers[5][name], rel=1e-3)
    # net.0, removed: the recorded steps', 0 after its removal (the record's rule for no gradients)
    assert stats["first"][3] == pytest.approx(ref.layers[0]["net.0"], rel=1e-3)
    assert stats["max"][3] == pytest.approx(max(ref.layers[s]["net.0"] for s in range(3)), rel=1e-3)
    assert (stats["last"][3], stats["min"][3], stats["nonfinite"][3]) == (0, 0, 0)
    assert main([str(tmp_path), "--png", str(tmp_path / "f.png"), "--html", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "  net.0   " in out and out.count("\n  net.") == 3 and "OK: no" in out


def test_read_record_maps_every_layout_onto_the_final_layers(tmp_path):
    # layouts (a, b) -> (b, c) -> (c): the final layers are the last layout, then the names only earlier rows
    # had, in the order first seen; every row is mapped by name, 0 for a layer it lacked
    path = _lines(
        tmp_path / "r.jsonl", {**HEADER, "layers": {"0": ["a", "b"]}},
        {"type": "step", "step": 0, "optimizer": 0, "norms": [5, 3, 4]},
        {"type": "layers", "optimizer": 0, "layers": ["b", "c"]},
        {"type": "step", "step": 1, "optimizer": 0, "norms": [13, 5, 12]},
        {"type": "layers", "optimizer": 0, "layers": ["c"]},
        {"type": "step", "step": 2, "optimizer": 0, "norms": [2, 2]},
        {"type": "step", "step": 3, "optimizer": 0, "norms": [1, 1]},
    )
    record = read_record(path)
    assert record.layers == {0: ("c", "a", "b")}
    assert record.norms[0].tolist() == [[5, 0, 3, 4], [13, 12, 0, 5], [2, 2, 0, 0], [1, 1, 0, 0]]


# ---------------------------------------------------------------------- reading bad files
def _lines(path, *objs, raw=""):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs) + raw)
    return path


HEADER = {"type": "header", "format": "gradguard-record", "version": 1, "layers": {"0": ["a"]}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty file, not a gradguard record"),
        ("hello\n", ":1: not a gradguard record (invalid JSON)"),
        ('{"type": "step"}\n', "not a gradguard record (no 'gradguard-record' header)"),
        (json.dumps({**HEADER, "version": 99}) + "\n", "newer than this lightning_gradguard reads"),
        (json.dumps(HEADER) + "\n{oops\n" + json.dumps({"type": "summary"}) + "\n", ":2: corrupt line (invalid JSON)"),
        (json.dumps(HEADER) + '\n{"type":"step","step":0,"norms":[1]}\n{"type":"summary"}\n', ":2: corrupt step line"),
    ],
)
def test_corrupt_records_raise_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        read_record(path)
    assert "\n" not in str(info.value)


def test_a_killed_run_reads_up_to_its_last_complete_line(tmp_path):
    path = _lines(tmp_path / "r.jsonl", HEADER, {"type": "step", "step": 0, "optimizer": 0, "norms": [1, 0.5]},
                  raw='{"type":"step","step":1,"optimizer":0,"norms":[1,')
    record = read_record(path)
    assert record.truncated and not record.finished
    assert record.steps[0].tolist() == [0]
    assert record.layer_stats(0)["last"].tolist() == [1.0, 0.5]


def test_a_nan_whose_event_line_was_cut_off_still_fails_the_gate(records, tmp_path, capsys):
    # the faulty run, killed right after writing step 6's norms (NaN in net.2), before its event line
    with open(records["faulty"][1].path) as f:
        lines = f.readlines()
    cut = next(i for i, line in enumerate(lines) if line.startswith('{"type":"step","step":6,'))
    killed = tmp_path / "killed.jsonl"
    killed.write_text("".join(lines[: cut + 1]))
    record = read_record(killed)
    assert not record.finished and not record.truncated  # the kill fell between two lines
    [lost] = record.events
    assert (lost.step, lost.kind, lost.reason, lost.layer, lost.actions) == (6, "nonfinite", "nan", "net.2", ())
    assert "the run was cut off before writing it" in lost.message
    assert main([str(killed), "--fail-on", "nonfinite"]) == 1
    assert "FAIL: 1 event (nonfinite); first at step 6" in capsys.readouterr().out
    # ... and cut mid-way through the event line: the same
    killed.write_text("".join(lines[: cut + 1]) + lines[cut + 1][:40])
    assert read_record(killed).truncated and [e.step for e in read_record(killed).events] == [6]
    assert main([str(killed)]) == 1
    # with its event line, the event is the run's own, not a made-up one
    killed.write_text("".join(lines[: cut + 2]))
    assert [e.actions for e in read_record(killed).events] == [("skip", "alert")]


def test_recorded_infs_without_an_event_are_left_alone_in_finished_and_fp16_runs(tmp_path):
    inf_step = {"type": "step", "step": 0, "optimizer": 0, "norms": ["inf", "inf"]}
    path = _lines(tmp_path / "fp16.jsonl", {**HEADER, "trainer": {"precision": "16-mixed"}}, inf_step)
    assert read_record(path).events == []  # a GradScaler overflow: the scaler skips it, no event
    path = _lines(tmp_path / "16-true.jsonl", {**HEADER, "trainer": {"precision": "16-true"}}, inf_step)
    assert [e.reason for e in read_record(path).events] == ["inf"]  # no GradScaler there
    path = _lines(tmp_path / "done.jsonl", HEADER, inf_step, {"type": "summary"})
    assert read_record(path).events == []  # a finished run wrote every event it had


def test_missing_paths(tmp_path):
    with pytest.raises(RecordError, match="no such file"):
        read_record(tmp_path / "nope.jsonl")
    with pytest.raises(RecordError, match=f"no {FILENAME} found under"):
        read_record(tmp_path)


def test_sink_arguments_are_validated():
    with pytest.raises(ValueError, match="`every_n_steps` must be an integer >= 1, got 0"):
        RecordSink(every_n_steps=0)
    with pytest.raises(ValueError, match="`digits` must be an integer from 1 to 17"):
        RecordSink(digits=0)
    with pytest.raises(ValueError, match="`path` must be a file or folder path"):
        RecordSink(path=3)
    with pytest.raises(ValueError, match="`path` must be a file or folder path, or None for the Trainer's log folder, "
                                         "got ''"):
        RecordSink(path="")  # as GradGuard(record="") is refused


# ---------------------------------------------------------------------- the command
def test_cli_fails_on_a_faulty_run_and_prints_the_events(records, capsys):
    _, sink, _ = records["faulty"]
    assert main([sink.path]) == 1
    out = capsys.readouterr().out
    assert "events: 2 nonfinite, 1 exploding, 0 vanishing" in out
    assert "       6  nonfinite  nan           net.2" in out
    assert "step 14: grad norm of `net.0`" in out
    assert "usual causes of nonfinite (nan):" in out and "usual causes of exploding (spike):" in out
    assert "  net.2  <" in out and "(1 non-finite step)" in out
    assert out.rstrip().endswith("FAIL: 3 events (nonfinite, exploding); first at step 6")
    assert "\033[" not in out  # not a terminal: no colour


def test_cli_passes_a_healthy_run_and_filters_kinds(records, capsys):
    _, healthy, _ = records["healthy"]
    log_root = os.path.dirname(os.path.dirname(os.path.dirname(healthy.path)))
    assert main([log_root]) == 0  # a folder: the newest record below it
    assert capsys.readouterr().out.rstrip().endswith("OK: no nonfinite/exploding/vanishing events")
    _, vanishing, _ = records["vanishing"]
    assert main([vanishing.path, "--fail-on", "nonfinite,exploding"]) == 0
    assert "OK: no nonfinite/exploding events (1 events of other kinds)" in capsys.readouterr().out
    assert main([vanishing.path, "--fail-on", "vanishing"]) == 1
    assert main([vanishing.path, "--fail-on", "none"]) == 0


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == f"gradguard: error: no such file: {tmp_path / 'missing.jsonl'}\n"
    bad = tmp_path / "corrupt.jsonl"
    bad.write_text("not json at all\n")
    assert main([str(bad)]) == 2
    assert capsys.readouterr().err == f"gradguard: error: {bad}:1: not a gradguard record (invalid JSON)\n"
    good = _lines(tmp_path / "ok.jsonl", HEADER)
    assert main([str(good), "--fail-on", "exploding,boiling"]) == 2
    assert "gradguard: error: --fail-on: unknown kind 'boiling'" in capsys.readouterr().err
    # an empty list (an unset shell variable) meant 'none': a CI gate that could never fail
    for empty in ("", ","):
        assert main([str(good), "--fail-on", empty]) == 2
        assert f"gradguard: error: --fail-on: got {empty!r}, no kind" in capsys.readouterr().err
    assert main([str(good), "--fail-on", "all,nonfinite"]) == 2
    assert "unknown kind 'all' ('all' and 'none' stand alone)" in capsys.readouterr().err
    assert main([str(good), "--max-rows", "0"]) == 2
    assert "--max-rows: must be at least 1, got 0" in capsys.readouterr().err


def test_cli_colour_only_on_a_terminal_without_no_color(records, monkeypatch):
    _, sink, _ = records["faulty"]

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    for no_color, expect in ((None, True), ("1", False)):
        if no_color:
            monkeypatch.setenv("NO_COLOR", no_color)
        tty = Tty()
        monkeypatch.setattr(sys, "stdout", tty)
        assert main([sink.path]) == 1
        assert ("\033[31mFAIL" in tty.getvalue()) is expect


def test_cli_writes_png_and_self_contained_html(records, tmp_path, capsys):
    _, sink, _ = records["vanishing"]
    png, page = tmp_path / "out" / "flow.png", tmp_path / "out" / "report.html"
    assert main([sink.path, "--png", str(png), "--html", str(page)]) == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = page.read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64,iVBOR" in html
    assert "FAIL: 1 event (vanishing); first at step 14" in html and "<code>net.0</code>" in html
    assert "src=\"http" not in html and "<link" not in html  # nothing external
    out = capsys.readouterr().out
    assert f"gradient-flow picture: {png}" in out and f"HTML report: {page}" in out


def test_python_dash_m_runs_the_command(records):
    _, sink, _ = records["faulty"]
    done = subprocess.run([sys.executable, "-m", "lightning_gradguard.cli", sink.path, "--fail-on", "nonfinite"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "FAIL: 2 events (nonfinite); first at step 6" in done.stdout


def _without(path, dest, *drop):
    """The real record at ``path`` without the lines starting with any of ``drop``."""
    with open(path) as f:
        dest.write_text("".join(line for line in f if not line.startswith(drop)))
    return dest


def test_cli_an_unfinished_record_cannot_pass_the_gate(records, tmp_path, capsys):
    # the summary line is missing: the run was killed, crashed, or its record was switched off
    killed = _without(records["healthy"][1].path, tmp_path / "killed.jsonl", '{"type":"summary"')
    assert main([str(killed)]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("gradguard: error: the record did not finish (no summary line: the run crashed, was "
                            "killed or is still running, or its record was switched off, by a full disk say): the "
                            "gate cannot vouch for the steps after step 19; --allow-unfinished gates a live run on "
                            "its events so far\n")
    assert captured.out.rstrip().endswith("gates a live run on its events so far")  # after the report
    assert "\nERROR: the record did not finish" in captured.out and "OK:" not in captured.out
    assert main([str(killed), "--allow-unfinished"]) == 0  # a live run's record: by its events
    assert "OK: no nonfinite/exploding/vanishing events" in capsys.readouterr().out
    # events win: an unfinished record with an event of a --fail-on kind exits 1, as before
    faulty = _without(records["faulty"][1].path, tmp_path / "faulty.jsonl", '{"type":"summary"')
    assert main([str(faulty)]) == 1 and capsys.readouterr().err == ""
    assert main([str(faulty), "--fail-on", "vanishing"]) == 2


class _FullDisk(RecordSink):
    def _on_step(self, optimizer, step, layers, norms, guard):
        if step == 5:
            raise OSError(28, "No space left on device")
        super()._on_step(optimizer, step, layers, norms, guard)


def test_cli_a_record_switched_off_mid_run_fails_the_gate(tmp_path, capsys):
    sink = _FullDisk(tmp_path)
    guard = GradGuard(sinks=[sink])
    trainer(max_steps=8, callbacks=[guard]).fit(DigitsMLP(), digits_loader())
    assert guard.summary()["steps"] == 8 and sink._file is None  # switched off, its file let go
    assert not read_record(tmp_path).finished
    assert main([str(tmp_path)]) == 2
    assert "the gate cannot vouch for the steps after step 4" in capsys.readouterr().err


def test_cli_a_run_without_optimizer_steps_fails_the_gate(tmp_path, capsys):
    class NeverSteps(DigitsMLP):  # manual optimization that forgets opt.step(): nothing was checked
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            self.manual_backward(super().training_step(batch, batch_idx) * float("nan"))

    never, skipped = tmp_path / "never", tmp_path / "skipped"
    trainer(max_steps=-1, max_epochs=1, limit_train_batches=3, default_root_dir=never,
            callbacks=[GradGuard(record=True)]).fit(NeverSteps(), digits_loader())
    # no training loop at all: Lightning runs no on_train_end, and the record was an empty file
    trainer(max_steps=5, limit_train_batches=0, default_root_dir=skipped,
            callbacks=[GradGuard(record=True)]).fit(DigitsMLP(), digits_loader())
    for folder in (never, skipped):
        record = read_record(folder)
        assert record.finished and record.summary["steps"] == 0
        for extra in ([], ["--allow-unfinished"], ["--fail-on", "none"]):
            assert main([str(folder), *extra]) == 2
            captured = capsys.readouterr()
            assert captured.err.startswith("gradguard: error: no optimizer step was recorded: the run finished "
                                           "without")
            assert captured.err.count("\n") == 1 and "\nERROR: no optimizer step was recorded" in captured.out


def test_cli_events_counted_by_the_summary_but_missing_from_the_record_fail(records, tmp_path, capsys):
    # a resumed run rewrote the file: its summary counts the events restored from the checkpoint, the
    # record lacks their lines; the gate must not pass it
    path = records["faulty"][1].path
    resumed = _without(path, tmp_path / "resumed.jsonl", '{"type":"event"')
    assert main([str(resumed), "--fail-on", "nonfinite"]) == 1
    assert capsys.readouterr().out.rstrip().endswith(
        "FAIL: the summary counts 2 nonfinite events, the record holds 0: the events before a resume are in the "
        "earlier record")
    assert main([str(resumed), "--fail-on", "vanishing"]) == 0  # not a --fail-on kind: reported, not failing
    # one of the two NaN event lines lost: both the event found and the count are said
    with open(path) as f:
        lines = f.readlines()
    first_nan = next(i for i, line in enumerate(lines) if line.startswith('{"type":"event"') and "nonfinite" in line)
    (tmp_path / "half.jsonl").write_text("".join(lines[:first_nan] + lines[first_nan + 1:]))
    assert main([str(tmp_path / "half.jsonl")]) == 1
    assert capsys.readouterr().out.rstrip().endswith(
        "FAIL: 2 events (nonfinite, exploding); first at step 14; the summary counts 2 nonfinite events, the "
        "record holds 1: the events before a resume are in the earlier record")
    assert main([path]) == 1 and "the summary counts" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("trainer null", lambda ls: [{**ls[0], "trainer": None}, *ls[1:]],
         ":1: corrupt header line (`trainer` is None"),
        ("record null", lambda ls: [{**ls[0], "record": None}, *ls[1:]], ":1: corrupt header line (`record` is None"),
        ("layers a list", lambda ls: [{**ls[0], "layers": [["net.0"]]}, *ls[1:]], ":1: corrupt header line (`layers`"),
        ("names null", lambda ls: [{**ls[0], "layers": {"0": None}}, *ls[1:]], "layer names must be a list"),
        ("steps null", lambda ls: [*ls[:-1], {**ls[-1], "steps": None}], "corrupt summary line (`steps` is None"),
        ("summary norms short", lambda ls: [*ls[:-1], {**ls[-1], "norms": {"0": {**ls[-1]["norms"]["0"], "min": [1]}}}],
         "`norms` of optimizer 0: `min` holds 1 values for 4 series"),
        ("unknown kind", lambda ls: [{**x, "kind": "NONFINITE"} if x["type"] == "event" else x for x in ls],
         "corrupt event line (unknown kind 'NONFINITE'"),
        ("step a string", lambda ls: [{**x, "step": "6"} if x["type"] == "event" else x for x in ls],
         "corrupt event line (`step` is '6', not an integer)"),
        ("layer a number", lambda ls: [{**x, "layer": 5} if x["type"] == "event" else x for x in ls],
         "corrupt event line (`layer` is 5, not a string)"),
        ("actions a string", lambda ls: [{**x, "actions": "skip"} if x["type"] == "event" else x for x in ls],
         "corrupt event line (`actions` is 'skip', not a list of strings)"),
    ],
)
def test_cli_records_of_the_wrong_shape_exit_2_with_one_line(records, tmp_path, capsys, name, change, message):
    # these crashed the command with a traceback and exit 1, which a CI gate reads as "events found"
    with open(records["faulty"][1].path) as f:
        lines = [json.loads(line) for line in f]
    bad = _lines(tmp_path / "bad.jsonl", *change(lines))
    assert main([str(bad), "--png", str(tmp_path / "f.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"gradguard: error: {bad}") and message in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_cli_an_unexpected_failure_is_one_line_and_exit_2(records, monkeypatch, capsys):
    import lightning_gradguard.cli as cli

    path = records["healthy"][1].path
    monkeypatch.setattr(cli, "render_png", lambda record: 1 / 0)
    assert main([path, "--png", "never.png"]) == 2
    err = capsys.readouterr().err
    assert err == f"gradguard: error: cannot report on {path}: ZeroDivisionError: division by zero\n"
    monkeypatch.setattr(cli, "read_record", lambda path: {}["x"])
    assert main([path]) == 2
    assert capsys.readouterr().err == f"gradguard: error: cannot read {path}: KeyError: 'x'\n"


def test_cli_into_a_closed_pipe_keeps_its_status_without_a_traceback(records):
    # `gradguard rec | head -1`: the reader goes away before the report is written
    done = subprocess.Popen([sys.executable, "-m", "lightning_gradguard.cli", records["faulty"][1].path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()
    err = done.stderr.read().decode()
    assert done.wait(timeout=120) == 1, err  # the gate's status: events found
    assert err == ""


def test_two_guards_recording_in_one_folder_write_two_records(tmp_path, caplog, capsys):
    # both resolve to <log folder>/gradguard.jsonl: their lines interleaved into one corrupt record
    first, second = GradGuard(record=True, on_nonfinite="log"), GradGuard(prefix="grad2/", record=True)
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[first, second]).fit(
            FaultyMLP({2: "nan_layer"}), digits_loader())
    assert first.sinks[0].path == str(tmp_path / FILENAME)
    assert second.sinks[0].path == str(tmp_path / "gradguard-grad2.jsonl")
    [warning] = [r.getMessage() for r in caplog.records if "another RecordSink" in r.getMessage()]
    assert str(tmp_path / FILENAME) in warning and str(tmp_path / "gradguard-grad2.jsonl") in warning
    for guard in (first, second):
        record = read_record(guard.sinks[0].path)
        assert record.finished and record.header["config"]["prefix"] == guard.prefix
        assert record.steps[0].tolist() == list(range(6))
        assert [(e.step, e.kind, e.actions) for e in record.events] == [
            (e.step, e.kind, e.actions) for e in guard.events]
    assert [e.actions for e in read_record(first.sinks[0].path).events] == [("log",)]
    assert [e.actions for e in read_record(second.sinks[0].path).events] == [("skip", "alert")]
    assert main([str(tmp_path)]) == 1  # the folder: the first guard's record, naming the other one
    out = capsys.readouterr().out
    assert "other records beside it (another GradGuard's; gate each one): gradguard-grad2.jsonl" in out
    # both closed at the end: the next run's single guard writes gradguard.jsonl again
    again = GradGuard(prefix="grad2/", record=True)
    trainer(max_steps=2, default_root_dir=tmp_path, callbacks=[again]).fit(DigitsMLP(), digits_loader())
    assert again.sinks[0].path == str(tmp_path / FILENAME)


def test_a_resumed_run_writes_the_events_before_the_resume_into_its_record(tmp_path, capsys):
    # the record is written afresh by each fit; it once lost the first part's events and the gate passed
    path = tmp_path / "run.jsonl"
    guard = GradGuard(sinks=[RecordSink(path)])
    t = trainer(max_steps=10, callbacks=[guard])
    t.fit(FaultyMLP({5: "nan_layer"}), digits_loader())
    t.save_checkpoint(tmp_path / "c.ckpt")
    resumed = GradGuard(sinks=[RecordSink(path)])
    trainer(max_steps=20, callbacks=[resumed]).fit(FaultyMLP({}), digits_loader(), ckpt_path=tmp_path / "c.ckpt")
    record = read_record(path)
    assert [(e.step, e.kind, e.layer) for e in record.events] == [(5, "nonfinite", "net.2")]
    assert record.steps[0].tolist() == list(range(10, 20)) and record.summary["events/nonfinite"] == 1
    with open(path) as f:
        lines = [json.loads(line) for line in f]
    assert [line["type"] for line in lines[:3]] == ["header", "event", "step"] and lines[1]["earlier"] is True
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 1 event (nonfinite); first at step 5" in out and "the summary counts" not in out


def test_a_record_deleted_mid_run_is_reported(tmp_path, caplog):
    """The record's folder removed while the run writes it: the open file goes on taking the writes, unlinked,
    and the record was lost without a word (the gate later says only "no such file")."""
    import shutil

    from lightning.pytorch import Callback

    folder = tmp_path / "rec"

    class Remove(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 5:
                shutil.rmtree(folder)

    guard = GradGuard(record=str(folder))
    with caplog.at_level(logging.WARNING, logger="lightning_gradguard"):
        trainer(max_steps=10, callbacks=[guard, Remove()]).fit(DigitsMLP(), digits_loader())
    assert guard.internal_errors == 0 and not folder.exists()
    assert f"the run record {folder / FILENAME} was deleted while the run was writing it" in caplog.text
