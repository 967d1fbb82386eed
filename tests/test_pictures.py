"""Gradient-flow pictures: bounded history, what the figures show, PNG files from a real Trainer, histograms."""

from __future__ import annotations

import csv
import glob
import json
import os
import sys

import numpy as np
import pytest
import torch

from helpers import DigitsMLP, FaultyMLP, digits_loader, trainer
from lightning_gradguard import GradGuard
from lightning_gradguard.pictures import (
    FlowHistory,
    PicturesSink,
    figure_to_array,
    grad_histograms,
    heatmap_figure,
    norms_figure,
    picture_size,
)

pytest.importorskip("matplotlib")

NAN_RED = np.array([227, 26, 28])  # the colour of NaN/Inf cells (pictures._NONFINITE_RGB)


def red_pixels(image: np.ndarray) -> int:
    return int((np.abs(image[..., :3].astype(int) - NAN_RED).max(axis=-1) <= 3).sum())


# ---------------------------------------------------------------------- FlowHistory
def test_history_memory_is_bounded_and_every_step_still_counts():
    h = FlowHistory(["a", "b"], max_columns=8)
    shapes = h._log_sum.shape
    norms = lambda s: np.array([10.0 ** (s % 3), 1.0, 0.0])  # noqa: E731  global cycles 1, 10, 100
    for step in range(1000):
        h.add(step, norms(step))
    assert h._log_sum.shape == shapes  # nothing grew
    assert h.stride == 128 and h.columns == 8  # 1000 steps folded into 8 columns of 128
    assert h._finite[0, : h.columns].sum() == 1000  # every step is in some column
    first, last = h.column_steps()
    assert first.tolist() == [0, 128, 256, 384, 512, 640, 768, 896]
    assert last.tolist() == [127, 255, 383, 511, 639, 767, 895, 999]
    # the global row shows the geometric mean of 1, 10, 100 (log10 mean 1), layer "a" exactly 1, "b" zero
    mean = h.mean_log10()
    assert mean[0, :7] == pytest.approx(np.full(7, 1.0), abs=0.01)
    assert mean[1].tolist() == [0.0] * 8
    assert np.isnan(mean[2]).all() and h.zero_cells()[2].all()


def test_history_merging_keeps_nonfinite_marks_and_event_positions():
    h = FlowHistory(["a", "b"], max_columns=4)
    for step in range(100, 110):
        v = np.array([1.0, 1.0, 1.0])
        if step == 103:
            v[2] = np.nan
        h.add(step, v)
        if step == 103:
            h.add_event(step, "nonfinite", "b")
        if step == 108:
            h.add_event(step, "exploding", None)
    assert (h.stride, h.columns) == (4, 3)
    cells = h.nonfinite_cells()
    assert cells[2].tolist() == [True, False, False] and not cells[:2].any()
    marks = [(m.step, m.kind, m.row, m.position // h.stride) for m in h.events]
    assert marks == [(103, "nonfinite", 2, 0), (108, "exploding", 0, 2)]
    assert h.latest_step == 109 and h.latest.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("max_columns", [2, 5, 256])
def test_history_folding_in_batches_matches_folding_every_step(max_columns):
    """``add`` folds 64 steps at a time (or when read): the columns, counts and marks are those
    of folding each step as it comes, however the reads and merges fall."""
    rng = np.random.default_rng(0)
    batched, each = FlowHistory(["a", "b", "c"], max_columns), FlowHistory(["a", "b", "c"], max_columns)
    each._FOLD_EVERY = 1
    for step in range(700):
        norms = 10.0 ** rng.normal(0, 2, 4)
        if rng.random() < 0.05:
            norms[rng.integers(4)] = rng.choice([np.nan, np.inf, 0.0])
        given = norms.tolist() if step % 2 else norms  # the guard hands lists on its usual step
        batched.add(step, given)
        each.add(step, norms)
        given[:] = [-1.0] * 4  # the caller's vector may change afterwards: a copy was kept
        if rng.random() < 0.02:
            batched.add_event(step, "exploding", "b")
            each.add_event(step, "exploding", "b")
        if rng.random() < 0.03 or step == 699:  # reads at arbitrary points fold what is pending
            assert (batched.stride, batched.columns, batched.steps_seen) == (each.stride, each.columns, each.steps_seen)
            np.testing.assert_allclose(batched.mean_log10(), each.mean_log10(), rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(batched.nonfinite_cells(), each.nonfinite_cells())
            np.testing.assert_array_equal(batched.zero_cells(), each.zero_cells())
            np.testing.assert_array_equal(np.stack(batched.column_steps()), np.stack(each.column_steps()))
            assert batched.latest_step == each.latest_step == step
            np.testing.assert_array_equal(batched.latest, each.latest)
    assert list(batched.events) == list(each.events)
    assert each._finite.sum() + each._nonfinite.sum() + each._zero.sum() == 700 * 4


def test_history_rejects_a_wrong_vector_and_bad_arguments():
    h = FlowHistory(["a"])
    with pytest.raises(ValueError, match=r"expected 2 norms \(global \+ 1 layers\), got 3"):
        h.add(0, np.ones(3))
    with pytest.raises(ValueError, match=r"`max_columns` must be an integer >= 2, got 1"):
        FlowHistory(["a"], max_columns=1)


# ---------------------------------------------------------------------- figures
def history_with(nan_at: int | None = None, steps: int = 40) -> FlowHistory:
    rng = np.random.default_rng(0)
    h = FlowHistory([f"block.{i}.linear" for i in range(6)])
    for step in range(steps):
        v = 10.0 ** (rng.normal(size=7) * 0.2 - np.arange(7) * 0.5)
        if step == nan_at:
            v[3] = np.inf
            v[0] = np.nan
        h.add(step, v)
        if step == nan_at:
            h.add_event(step, "nonfinite", "block.2.linear")
    return h


def test_heatmap_has_the_requested_size_and_marks_nonfinite_cells_red():
    clean = figure_to_array(heatmap_figure(history_with(None), figsize=(8, 4), dpi=50))
    faulty = figure_to_array(heatmap_figure(history_with(nan_at=17), figsize=(8, 4), dpi=50))
    assert clean.shape == faulty.shape == (200, 400, 3)
    assert red_pixels(clean) == 0
    assert red_pixels(faulty) > 20  # two cells, one column wide each, plus the legend patch
    assert faulty.std() > 20  # not blank


def test_heatmap_of_an_empty_history_still_draws():
    assert figure_to_array(heatmap_figure(FlowHistory(["a"]), dpi=50)).shape == (150, 500, 3)


def test_heatmap_default_size_follows_the_row_count():
    h = history_with(None)
    assert picture_size(h.rows) == (10.0, 3.25)
    assert figure_to_array(heatmap_figure(h)).shape == (325, 1000, 3)


def test_norms_figure_shows_nonfinite_and_zero_layers():
    layers = ["a", "b", "c"]
    image = figure_to_array(norms_figure(layers, np.array([np.nan, 0.5, np.inf, 0.0]), step=3, dpi=50))
    assert image.shape == (150, 500, 3)
    assert red_pixels(image) > 100  # the two non-finite rows are full-width red bars
    clean = figure_to_array(norms_figure(layers, np.array([1.0, 0.5, 0.2, 1e-6]), dpi=50))
    assert red_pixels(clean) == 0 and clean.std() > 20
    figure_to_array(norms_figure(layers, np.zeros(4), dpi=50))  # nothing positive: still draws


# ---------------------------------------------------------------------- PicturesSink in a real Trainer
def test_pictures_sink_writes_pngs_and_the_summary_into_the_log_dir(tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from matplotlib.image import imread

    sink = PicturesSink(every_n_steps=20)
    guard = GradGuard(sinks=[sink])
    logger = CSVLogger(tmp_path)
    trainer(max_steps=30, logger=logger, log_every_n_steps=10, callbacks=[guard]).fit(
        FaultyMLP({7: "inf", 15: "nan_layer"}), digits_loader()
    )
    folder = os.path.join(logger.log_dir, "gradguard")
    flow, norms, summary = (os.path.join(folder, n) for n in ("grad_flow.png", "grad_norms.png", "summary.json"))
    # written at step 20 and again at the end
    assert sink.written == [flow, norms, flow, norms, summary]
    for path in (flow, norms):
        image = imread(path)
        assert image.shape[:2] == (300, 1000)  # picture_size(4 rows) at 100 dpi
        assert image[..., :3].std() > 0.1  # not blank
    assert red_pixels((imread(flow)[..., :3] * 255).round()) > 20  # the two NaN steps are marked
    facts = json.load(open(summary))
    assert facts["events/nonfinite"] == 2 and facts["steps"] == 30
    assert facts["skipped_fraction"] == pytest.approx(2 / 30)
    # the numeric summary also went through the CSV logger, after Lightning had finalized it
    (metrics,) = glob.glob(f"{tmp_path}/**/metrics.csv", recursive=True)
    rows = [r for r in csv.DictReader(open(metrics)) if r.get("grad/summary/steps")]
    assert len(rows) == 1 and float(rows[0]["grad/summary/events/nonfinite"]) == 2


def test_an_event_at_a_picture_step_is_marked_in_the_last_picture(tmp_path, monkeypatch):
    """The picture due at a step is drawn in that step's on_step, before the sinks hear of its events: when
    it was the run's last, its event went unmarked for good."""
    import lightning_gradguard.pictures as pictures

    drawn = []
    real = pictures.heatmap_figure

    def spy(history, **kwargs):
        drawn.append((history.steps_seen, [(m.step, m.kind) for m in history.events]))
        return real(history, **kwargs)

    monkeypatch.setattr(pictures, "heatmap_figure", spy)
    sink = PicturesSink(every_n_steps=10, dirpath=tmp_path)
    trainer(max_steps=10, callbacks=[GradGuard(sinks=[sink])]).fit(FaultyMLP({9: "nan_layer"}), digits_loader())
    assert drawn[-1] == (10, [(9, "nonfinite")])  # redrawn at the end of fit, with the mark


def test_pictures_sink_without_a_logger_uses_the_folder_given(tmp_path):
    sink = PicturesSink(tmp_path / "pics", every_n_steps=None, log_summary=False)
    trainer(max_steps=5, callbacks=[GradGuard(sinks=[sink])]).fit(FaultyMLP({}), digits_loader())
    assert sorted(os.listdir(tmp_path / "pics")) == ["grad_flow.png", "grad_norms.png", "summary.json"]


def test_pictures_sink_needs_matplotlib_and_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"`PicturesSink` draws with matplotlib"):
        PicturesSink()


class TwoOptimizers(DigitsMLP):
    """Manual optimization with two optimizers (body and head), like a GAN's alternating steps."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        body = [p for n, p in self.named_parameters() if not n.startswith("net.4")]
        return torch.optim.SGD(body, lr=0.01), torch.optim.SGD(self.net[4].parameters(), lr=0.01)


def test_pictures_per_optimizer(tmp_path):
    sink = PicturesSink(tmp_path, every_n_steps=None, log_summary=False)
    trainer(max_steps=8, callbacks=[GradGuard(sinks=[sink])]).fit(TwoOptimizers(), digits_loader())
    assert sorted(os.listdir(tmp_path)) == [
        "grad_flow.png", "grad_flow_opt1.png", "grad_norms.png", "grad_norms_opt1.png", "summary.json",
    ]
    assert sink.recorder.histories[0].layers == ("net.0", "net.2")
    assert sink.recorder.histories[1].layers == ("net.4",)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=-1), r"`every_n_steps` must be None or an integer >= 0, got -1"),
        (dict(max_columns=0), r"`max_columns` must be an integer >= 2, got 0"),
        (dict(dpi=5), r"`dpi` must be an integer in 10..600, got 5"),
        (dict(dirpath=5), r"`dirpath` must be a folder path or None \(the logger's folder\), got 5"),
        (dict(log_summary="no"), r"`log_summary` must be True or False, got 'no'"),  # was taken for True
    ],
)
def test_pictures_sink_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PicturesSink(**kwargs)


# ---------------------------------------------------------------------- histograms on the device
def test_grad_histograms_match_numpy_and_leave_nonfinite_values_out():
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.zeros(n)) for n in (100, 50, 10))
    a.grad, b.grad, c.grad = torch.randn(100), torch.randn(50) * 3, torch.randn(10)
    b.grad[0] = float("nan")
    b.grad[1] = float("inf")
    out = grad_histograms([a, b, c], [0, 0, 1], [0], bins=16)
    assert list(out) == [0]  # only the chosen layer
    counts, edges = out[0]
    values = torch.cat([a.grad, b.grad[2:]]).numpy()
    ref_counts, ref_edges = np.histogram(values, bins=16, range=(values.min(), values.max()))
    assert edges == pytest.approx(ref_edges, rel=1e-5)
    assert counts.sum() == 148
    assert np.abs(counts - ref_counts).sum() <= 2  # float32 bin edges may move a boundary value


def test_grad_histograms_edge_cases():
    p = torch.nn.Parameter(torch.zeros(3))
    assert grad_histograms([p], [0], [0]) == {}  # no gradient
    p.grad = torch.full((3,), 0.25)
    counts, edges = grad_histograms([p], [0], [0], bins=4)[0]  # one value: bins get some width around it
    assert counts.sum() == 3 and edges[0] < 0.25 < edges[-1]
    p.grad = torch.full((3,), float("nan"))
    assert grad_histograms([p], [0], [0]) == {}  # nothing finite
    with pytest.raises(ValueError, match=r"`bins` must be an integer in 1..512, got 513"):
        grad_histograms([p], [0], [0], bins=513)


def test_the_flow_history_goes_on_across_a_param_group_added_mid_run(tmp_path):
    # BackboneFinetuning adds the backbone at step 16: before, the picture restarted there and the
    # first epoch disappeared from it
    from test_finetuning import STEPS_PER_EPOCH, _fit

    sink = PicturesSink(tmp_path, every_n_steps=0)
    _fit("group", GradGuard(sinks=[sink]), max_epochs=2, faults={20: "nan"})
    history = sink.recorder.histories[0]
    assert history.layers == ("backbone.0", "backbone.2", "head")
    assert history.steps_seen == 2 * STEPS_PER_EPOCH and history.stride == 1
    zero, nonfinite = history.zero_cells(), history.nonfinite_cells()
    assert zero[1:3, :STEPS_PER_EPOCH].all() and not zero[:, STEPS_PER_EPOCH:].any()  # grey while frozen
    assert np.isfinite(history.mean_log10()[3]).all()  # the head: every step, before and after
    assert nonfinite[:, 20].tolist() == [True, True, False, False]  # global and backbone.0
    (mark,) = history.events
    assert (mark.step, mark.row) == (20, 1)  # the event's marker on backbone.0's row
