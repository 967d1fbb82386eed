"""Gradient-flow pictures: a layers x steps heatmap, a bar chart of the latest norms, gradient histograms.

The guard hands every sink each step's norms on the host (global first, then
one per layer) at no extra cost. :class:`FlowHistory` keeps them in bounded
memory; :func:`heatmap_figure` and :func:`norms_figure` draw them;
:class:`PicturesSink` writes the pictures as PNG files into the run's log
folder (for CSV / TensorBoard users), and the W&B sink logs the same pictures
as ``wandb.Image``. :func:`grad_histograms` computes per-layer gradient
histograms on the device with ``torch.histc``, for the coarse cadence at which
they are worth their cost.

matplotlib is imported only when a picture is drawn, and only through its
object-oriented API with an explicit Agg canvas: the package works without
matplotlib, and drawing never touches ``pyplot`` or the user's backend.

Accumulating costs no device work (the norms are already host numbers)::

    >>> import numpy as np
    >>> history = FlowHistory(["net.0", "net.2"], max_columns=4)
    >>> for step in range(10):
    ...     history.add(step, np.array([1.0, 0.1, 10.0]))
    >>> history.stride, history.columns    # 10 steps folded into 4 columns of up to 4 steps
    (4, 3)
    >>> history.mean_log10()[:, 0].tolist()   # global, net.0, net.2
    [0.0, -1.0, 1.0]
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lightning_gradguard.sinks import GuardSink, series_columns

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "FlowHistory",
    "FlowRecorder",
    "PicturesSink",
    "figure_to_array",
    "grad_histograms",
    "heatmap_figure",
    "log_summary_metrics",
    "norms_figure",
    "picture_size",
]

MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's limit
_GLOBAL_LABEL = "global norm"
# colours chosen to stand apart from the viridis scale of the cells
_NONFINITE_RGB = (0.89, 0.10, 0.11)  # red: a NaN/Inf in the cell
_ZERO_RGB = (0.72, 0.72, 0.72)  # grey: only zero norms (dead layer, or no gradient)
_EMPTY_RGB = (1.0, 1.0, 1.0)  # white: no data
_EVENT_STYLE = {  # kind -> (marker, face colour)
    "nonfinite": ("X", "white"),
    "exploding": ("^", "#ff7f00"),
    "vanishing": ("v", "#00e5ff"),
}


# ---------------------------------------------------------------------- data
@dataclass(frozen=True)
class _Mark:
    position: int  # index of the optimizer step (0, 1, ...) the event belongs to
    step: int
    kind: str
    row: int  # 0: global, i: layer i - 1


class FlowHistory:
    """Per-layer gradient norms of one optimizer over the whole run, in bounded memory.

    Each column of the picture aggregates ``stride`` consecutive optimizer
    steps: the mean of ``log10(norm)`` over its finite, non-zero norms (the
    geometric mean), and how many of its norms were non-finite or zero. When
    all ``max_columns`` are used, neighbouring columns merge pairwise and the
    stride doubles, so memory stays at ``4 x (layers + 1) x max_columns``
    numbers however long the run, and every step still counts.

    :meth:`add` only keeps a copy of the step's norms; they are folded into the
    columns ``_FOLD_EVERY`` steps at a time, or when anything is read. One call
    per step right after the backward pass runs on cold caches (~70 us for the
    eight numpy calls of a fold), a batch of 64 runs warm and at once.

    Args:
        layers: layer names, in the order of the norms (the global norm comes first
            in each ``norms`` vector and is not named here).
        max_columns: columns kept (at least 2).
        max_events: events kept for marking (the most recent ones).
    """

    _FOLD_EVERY = 64  # steps kept unfolded at most: a bounded (64 x rows) buffer

    def __init__(self, layers: Sequence[str], max_columns: int = 256, max_events: int = 2000) -> None:
        if not isinstance(max_columns, int) or max_columns < 2:
            raise ValueError(f"`max_columns` must be an integer >= 2, got {max_columns!r}.")
        self.layers = tuple(layers)
        self.max_columns = max_columns
        rows = len(self.layers) + 1
        self.steps_seen = 0  # steps added, folded or not
        self._stride = 1  # optimizer steps per column
        self._folded = 0  # steps folded into the columns
        self._pending: list[tuple[int, np.ndarray | list[float]]] = []  # (step, norms) added since the last fold
        self._log_sum = np.zeros((rows, max_columns), np.float64)
        self._finite = np.zeros((rows, max_columns), np.int32)  # finite, non-zero norms per cell
        self._nonfinite = np.zeros((rows, max_columns), np.int32)
        self._zero = np.zeros((rows, max_columns), np.int32)
        self._first_step = np.zeros(max_columns, np.int64)  # trainer.global_step of each column's first step
        self._last_step = np.zeros(max_columns, np.int64)
        self._latest: np.ndarray | None = None
        self._latest_step: int | None = None
        self.events: deque[_Mark] = deque(maxlen=max_events)

    @property
    def rows(self) -> int:
        return len(self.layers) + 1

    @property
    def stride(self) -> int:
        """Optimizer steps per column."""
        self._fold()
        return self._stride

    @property
    def columns(self) -> int:
        """Columns in use."""
        self._fold()
        return 0 if self._folded == 0 else (self._folded - 1) // self._stride + 1

    @property
    def latest(self) -> np.ndarray | None:
        """The last norms vector added (a copy, float64)."""
        self._fold()
        return self._latest

    @property
    def latest_step(self) -> int | None:
        self._fold()
        return self._latest_step

    def add(self, step: int, norms: np.ndarray | list[float]) -> None:
        """Add one optimizer step's norms (global first, then layers); a copy is kept."""
        # a list is kept as a list (no numpy call until the fold)
        norms = list(norms) if type(norms) is list else np.array(norms, dtype=np.float64).reshape(-1)
        if len(norms) != self.rows:
            raise ValueError(f"expected {self.rows} norms (global + {len(self.layers)} layers), got {len(norms)}")
        self._pending.append((int(step), norms))
        self.steps_seen += 1
        if len(self._pending) >= self._FOLD_EVERY:
            self._fold()

    def relayout(self, layers: Sequence[str]) -> None:
        """The optimizer's layers changed to ``layers`` (a param group added mid-run): every row goes
        on by name; a new layer's row counts its past cells as zero norms (no gradients: grey).

        >>> h = FlowHistory(["head"])
        >>> h.add(0, [1.0, 1.0])
        >>> h.relayout(["backbone", "head"])
        >>> h.add(1, [2.0, 1.0, 1.0])
        >>> h.zero_cells()[:, 0].tolist(), h.layers
        ([False, True, False], ('backbone', 'head'))
        """
        self._fold()
        take = series_columns(self.layers, layers)
        old = np.array([i if i is not None else 0 for i in take])
        new = np.array([i is None for i in take])
        used = self.columns
        for name in ("_log_sum", "_finite", "_nonfinite", "_zero"):
            values = getattr(self, name)[old]
            values[new] = 0
            setattr(self, name, values)
        self._zero[new, :used] = 1  # no gradients there before
        if self._latest is not None:
            self._latest = np.where(new, 0.0, self._latest[old])
        row = {i: j for j, i in enumerate(take) if i is not None}
        self.events = deque((replace(m, row=row.get(m.row, 0)) for m in self.events), maxlen=self.events.maxlen)
        self.layers = tuple(layers)

    def add_event(self, step: int, kind: str, layer: str | None) -> None:
        """Remember an event for marking; it belongs to the step added last."""
        row = 0 if layer is None or layer not in self.layers else self.layers.index(layer) + 1
        self.events.append(_Mark(max(self.steps_seen - 1, 0), int(step), kind, row))

    def _fold(self) -> None:
        """Fold the pending steps into the columns: a few numpy calls per column they touch."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        steps = [step for step, _ in pending]
        block = np.array([norms for _, norms in pending], dtype=np.float64)  # steps x rows
        with np.errstate(all="ignore"):  # NaN/Inf/0 are counted below, not logged
            logs = np.log10(block)
        usual = bool(np.isfinite(logs).all())  # every norm finite and positive
        if not usual:
            finite = np.isfinite(block)
            positive = finite & (block > 0)
            logs = np.where(positive, logs, 0.0)
            nonfinite, zero = ~finite, finite & (block <= 0)
        k = 0
        while k < len(steps):
            col = self._folded // self._stride
            if col >= self.max_columns:
                self._merge_pairs()
                continue
            offset = self._folded % self._stride
            take = min(len(steps) - k, self._stride - offset)  # the steps that still belong in this column
            if offset == 0:  # a new column starts
                self._first_step[col] = steps[k]
            self._last_step[col] = steps[k + take - 1]
            rows = slice(k, k + take)
            self._log_sum[:, col] += logs[rows].sum(axis=0)
            if usual:
                self._finite[:, col] += take
            else:
                self._finite[:, col] += positive[rows].sum(axis=0)
                self._nonfinite[:, col] += nonfinite[rows].sum(axis=0)
                self._zero[:, col] += zero[rows].sum(axis=0)
            self._folded += take
            k += take
        self._latest, self._latest_step = block[-1].copy(), steps[-1]

    def _merge_pairs(self) -> None:
        """Halve the columns in use: column j becomes old columns 2j and 2j + 1; the stride doubles."""
        used = 0 if self._folded == 0 else (self._folded - 1) // self._stride + 1
        half = (used + 1) // 2
        for arr in (self._log_sum, self._finite, self._nonfinite, self._zero):
            merged = arr[:, 0:used:2].copy()
            merged[:, : used // 2] += arr[:, 1:used:2]
            arr[:] = 0
            arr[:, :half] = merged
        first, last = self._first_step[:used].copy(), self._last_step[:used].copy()
        self._first_step[:] = 0
        self._last_step[:] = 0
        self._first_step[:half] = first[0::2]
        self._last_step[:half] = last[0::2]
        self._last_step[: used // 2] = last[1::2]  # a merged column ends where its second half ended
        self._stride *= 2

    # views for drawing (copies of the used columns)
    def mean_log10(self) -> np.ndarray:
        """``rows x columns``: mean log10 norm per cell, NaN where the cell has no finite non-zero norm."""
        c = self.columns
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self._log_sum[:, :c] / self._finite[:, :c]
        return np.where(self._finite[:, :c] > 0, out, np.nan)

    def nonfinite_cells(self) -> np.ndarray:
        return self._nonfinite[:, : self.columns] > 0

    def zero_cells(self) -> np.ndarray:
        """Cells whose norms were all exactly zero (a dead layer, or parameters without gradients)."""
        c = self.columns
        return (self._zero[:, :c] > 0) & (self._finite[:, :c] == 0) & (self._nonfinite[:, :c] == 0)

    def column_steps(self) -> tuple[np.ndarray, np.ndarray]:
        """First and last ``trainer.global_step`` of each used column."""
        c = self.columns
        return self._first_step[:c].copy(), self._last_step[:c].copy()


class FlowRecorder:
    """What a picture-drawing sink keeps: one :class:`FlowHistory` per optimizer, and when to publish.

    Args:
        every_n_steps: a picture is due every this many optimizer steps (of each
            optimizer); ``None`` or ``0``: only at the end.
        max_columns: see :class:`FlowHistory`.
        name: the argument name ``every_n_steps`` has for the user, in error messages.
    """

    def __init__(self, every_n_steps: int | None = 500, max_columns: int = 256, *, name: str = "every_n_steps") -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0
        ):
            raise ValueError(f"`{name}` must be None or an integer >= 0, got {every_n_steps!r}.")
        if isinstance(max_columns, bool) or not isinstance(max_columns, int) or max_columns < 2:
            raise ValueError(f"`max_columns` must be an integer >= 2, got {max_columns!r}.")
        self.every_n_steps = every_n_steps or 0
        self.max_columns = max_columns
        self.histories: dict[int, FlowHistory] = {}
        self.log_steps: dict[int, int] = {}  # last Lightning logging step seen, per optimizer
        self._published_at: dict[int, int] = {}  # steps_seen when last published

    def reset(self) -> None:
        self.histories.clear()
        self.log_steps.clear()
        self._published_at.clear()

    def add(self, optimizer: int, step: int, log_step: int, layers: Sequence[str], norms: np.ndarray | list[float]) -> bool:
        """Record a step; return whether a picture of this optimizer is due now."""
        history = self.histories.get(optimizer)
        if history is None:
            history = self.histories[optimizer] = FlowHistory(layers, self.max_columns)
        elif history.layers != tuple(layers):  # a param group added mid-run: the history goes on
            history.relayout(layers)
        history.add(step, norms)
        self.log_steps[optimizer] = log_step
        return bool(self.every_n_steps) and history.steps_seen % self.every_n_steps == 0

    def add_event(self, event: Any) -> None:
        optimizer = getattr(event, "optimizer", 0)
        history = self.histories.get(optimizer)
        if history is not None:
            history.add_event(event.step, event.kind, event.layer)
            # sinks hear of a step's events after its on_step: a picture drawn at this step lacks the mark,
            # and if it is the run's last, nothing would redraw it (see unpublished)
            if self._published_at.get(optimizer) == history.steps_seen:
                self._published_at[optimizer] = history.steps_seen - 1

    def unpublished(self) -> list[int]:
        """Optimizers with steps added since their last picture."""
        return [i for i, h in self.histories.items() if h.steps_seen > self._published_at.get(i, 0)]

    def published(self, optimizer: int) -> None:
        self._published_at[optimizer] = self.histories[optimizer].steps_seen


# ---------------------------------------------------------------------- drawing
def picture_size(rows: int, width: float = 10.0) -> tuple[float, float]:
    """Figure size in inches for ``rows`` rows (global + layers): ``width`` x ``1.5 + 0.25 * rows``, within 3..16.

    >>> picture_size(4), picture_size(1000)
    ((10.0, 3.0), (10.0, 16.0))
    """
    return float(width), float(min(max(1.5 + 0.25 * rows, 3.0), 16.0))


def _short(name: str, width: int = 36) -> str:
    """Layer names shortened from the left, where the common prefix usually is."""
    return name if len(name) <= width else "..." + name[-(width - 3) :].lstrip(".")


def _new_figure(figsize: tuple[float, float], dpi: int) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)  # an explicit Agg canvas: no pyplot, the user's backend is left alone
    return fig


def _row_ticks(ax: Any, labels: list[str], max_labels: int = 48) -> None:
    every = max(1, math.ceil(len(labels) / max_labels))
    idx = list(range(0, len(labels), every))
    ax.set_yticks(idx)
    ax.set_yticklabels([_short(labels[i]) for i in idx], fontsize=7)


def heatmap_figure(
    history: FlowHistory,
    *,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
) -> Figure:
    """Gradient flow: rows are the global norm then each layer, columns are steps, colour is log10 of the norm.

    Cells with a NaN/Inf are red, cells with only zero norms grey, columns
    without data white. Events are marked at their step and layer (``X``
    non-finite, ``^`` exploding, ``v`` vanishing). Several steps per column
    show their geometric mean.

    Args:
        history: the data.
        title: figure title (default: steps covered).
        figsize: inches; default :func:`picture_size` of the row count.
        dpi: dots per inch; the PNG is ``figsize x dpi`` pixels.
    """
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    fig = _new_figure(figsize or picture_size(history.rows), dpi)
    ax = fig.add_subplot()
    values = history.mean_log10()
    nonfinite = history.nonfinite_cells()
    zero = history.zero_cells()
    first, last = history.column_steps()
    finite_values = values[np.isfinite(values)]
    if finite_values.size:
        lo, hi = float(finite_values.min()), float(finite_values.max())
    else:
        lo, hi = -1.0, 1.0
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    norm = Normalize(vmin=lo, vmax=hi)
    cmap = matplotlib.colormaps["viridis"]

    # one RGB image: the colour scale where there are values, flat colours for the special cells
    rgb = cmap(norm(np.nan_to_num(values, nan=lo)))[..., :3]
    rgb[~np.isfinite(values)] = _EMPTY_RGB
    rgb[zero] = _ZERO_RGB
    rgb[nonfinite] = _NONFINITE_RGB
    if rgb.shape[1]:
        ax.imshow(rgb, aspect="auto", interpolation="nearest", origin="upper")
    else:
        ax.text(0.5, 0.5, "no steps recorded", transform=ax.transAxes, ha="center", va="center", fontsize=9)
    if history.rows > 1:  # separate the global row from the layers
        ax.axhline(0.5, color="white", linewidth=1.5)

    labels = [_GLOBAL_LABEL, *history.layers]
    _row_ticks(ax, labels)
    cols = values.shape[1]
    # x ticks at round column numbers, labelled with the global step each column starts at
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: str(int(first[int(x)])) if 0 <= x < cols else ""))
    ax.tick_params(axis="x", labelsize=7)
    per = f" ({history.stride} steps per column)" if history.stride > 1 else ""
    ax.set_xlabel(f"step{per}", fontsize=8)
    ax.set_xlim(-0.5, max(cols, 1) - 0.5)
    ax.set_ylim(history.rows - 0.5, -0.5)

    handles = []
    for kind, (marker, colour) in _EVENT_STYLE.items():
        marks = [m for m in history.events if m.kind == kind]
        if not marks:
            continue
        xs = [m.position // history.stride for m in marks]
        ys = [m.row for m in marks]
        ax.scatter(xs, ys, marker=marker, s=60, c=colour, edgecolors="black", linewidths=0.8, zorder=3)
        handles.append(Line2D([], [], marker=marker, linestyle="", markerfacecolor=colour,
                              markeredgecolor="black", label=f"{kind} event"))
    if nonfinite.any():
        handles.append(Patch(color=_NONFINITE_RGB, label="NaN/Inf"))
    if zero.any():
        handles.append(Patch(color=_ZERO_RGB, label="zero"))
    if handles:
        fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=len(handles), frameon=False)

    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="log10 grad norm", pad=0.01)
    if title is None:
        span = f"steps {int(first[0])}-{int(last[-1])}" if cols else "no steps yet"
        title = f"Gradient flow, {span}"
    ax.set_title(title, fontsize=9)
    return fig


def _rows_to_show(norms: np.ndarray, max_rows: int) -> np.ndarray:
    """Indices of the layers (1-based, model order) a bar chart shows: all, or the non-finite, smallest and largest.

    >>> _rows_to_show(np.array([9.0, 1.0, np.nan, 3.0, 0.5, 2.0]), 3).tolist()
    [2, 3, 4]
    """
    layers = np.arange(1, norms.shape[0])
    if layers.size <= max_rows:
        return layers
    values = norms[1:]
    bad = layers[~np.isfinite(values)][:max_rows]
    room = max_rows - bad.size
    good = layers[np.isfinite(values)]
    by_norm = good[np.argsort(norms[good], kind="stable")]
    small, large = (room + 1) // 2, room // 2
    keep = np.concatenate([bad, by_norm[:small], by_norm[by_norm.size - large:] if large else by_norm[:0]])
    return np.unique(keep)


def norms_figure(
    layers: Sequence[str],
    norms: np.ndarray,
    *,
    step: int | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    max_rows: int = 60,
) -> Figure:
    """Bar chart of one step's norms (log scale): the global norm, then each layer.

    NaN/Inf norms get a full-width red bar labelled ``nan`` / ``inf``; zero norms a ``0`` label.
    With more than ``max_rows`` layers, only the non-finite ones and the
    smallest and largest norms are shown (in model order; the title says so).

    Args:
        layers: layer names.
        norms: global norm then one per layer.
        step: the step shown (for the title).
        title: figure title.
        figsize: inches; default :func:`picture_size` of the row count.
        dpi: dots per inch.
        max_rows: most layers drawn.
    """
    norms = np.asarray(norms, dtype=np.float64).reshape(-1)
    shown = _rows_to_show(norms, max_rows)
    labels = [_GLOBAL_LABEL, *(layers[i - 1] for i in shown)]
    subset = "" if shown.size == len(layers) else f" ({shown.size} of {len(layers)} layers: non-finite, smallest, largest)"
    norms = norms[np.concatenate([[0], shown])]
    fig = _new_figure(figsize or picture_size(len(labels)), dpi)
    ax = fig.add_subplot()
    finite = np.isfinite(norms)
    positive = finite & (norms > 0)
    if positive.any():
        lo = 10 ** (math.floor(math.log10(norms[positive].min())) - 1)
        hi = 10 ** (math.ceil(math.log10(norms[positive].max())) + 0.5)
    else:
        lo, hi = 1e-8, 1.0
    y = np.arange(len(labels))
    colours = ["#444444"] + ["#3b75af"] * (len(labels) - 1)  # the global bar darker
    widths = np.where(positive, norms, lo) - lo
    ax.barh(y[positive], widths[positive], left=lo, color=[colours[i] for i in y[positive]], height=0.7)
    bad = ~finite
    ax.barh(y[bad], np.full(int(bad.sum()), hi - lo), left=lo, color=_NONFINITE_RGB, height=0.7)
    for i in y[~positive]:
        ax.text(lo * 1.2, i, "0" if finite[i] else str(norms[i]), va="center", fontsize=7,
                color="black" if finite[i] else "white")
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    _row_ticks(ax, labels, max_labels=len(labels))  # at most max_rows + 1: label every bar
    ax.set_xlabel("grad L2 norm (log scale)", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", which="major", alpha=0.3)
    at = f" at step {step}" if step is not None else ""
    ax.set_title(title or f"Gradient norms{at}{subset}", fontsize=9)
    return fig


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an ``H x W x 3`` uint8 array (for ``wandb.Image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------------- histograms (device)
def grad_histograms(
    params: Sequence[torch.nn.Parameter],
    layer_of_param: Sequence[int],
    layers: Sequence[int],
    bins: int = 64,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Histogram of the gradient values of each chosen layer, computed on the device with ``torch.histc``.

    Non-finite values are left out (they are reported elsewhere); parameters
    without gradients are ignored; layers with no gradients at all are absent
    from the result. Costs two host syncs for all layers together (one for the
    value ranges, one for the counts) and temporary memory about the size of
    the largest chosen parameter: meant for a coarse cadence.

    Args:
        params: the optimizer's parameters (``LayerPlan.params``).
        layer_of_param: layer index of each parameter (``LayerPlan.layer_of_param``).
        layers: indices of the layers to histogram.
        bins: number of bins, 1..512.

    Returns:
        ``{layer index: (counts, bin_edges)}``, ready for ``wandb.Histogram(np_histogram=...)``.

    >>> p = torch.nn.Parameter(torch.zeros(4)); p.grad = torch.tensor([0.0, 1.0, 1.0, float("nan")])
    >>> counts, edges = grad_histograms([p], [0], [0], bins=2)[0]
    >>> counts.tolist(), edges.tolist()
    ([1.0, 2.0], [0.0, 0.5, 1.0])
    """
    if not isinstance(bins, int) or not 1 <= bins <= MAX_HISTOGRAM_BINS:
        raise ValueError(f"`bins` must be an integer in 1..{MAX_HISTOGRAM_BINS}, got {bins!r}.")
    chosen = set(layers)
    groups: dict[int, list[torch.Tensor]] = {}
    for p, layer in zip(params, layer_of_param):
        if layer in chosen and p.grad is not None and p.grad.numel():
            g = p.grad
            groups.setdefault(layer, []).append(g.coalesce().values() if g.is_sparse else g)
    if not groups:
        return {}
    order = sorted(groups)
    # value range of each layer over its finite entries, kept on the device
    ranges = []
    for layer in order:
        los, his = [], []
        for g in groups[layer]:
            finite = torch.isfinite(g)
            los.append(torch.where(finite, g, torch.inf).amin().float())
            his.append(torch.where(finite, g, -torch.inf).amax().float())
        ranges.append(torch.stack([torch.stack(los).amin(), torch.stack(his).amax()]))
    # sync 1 of 2 (coarse cadence only): histc takes its range as host numbers
    bounds = torch.stack(ranges).cpu().numpy().astype(np.float64)  # sync 1 of 2, histogram cadence only
    counts_dev, edges = [], {}
    for layer, (lo, hi) in zip(order, bounds):
        if not (np.isfinite(lo) and np.isfinite(hi)):  # nothing finite in this layer
            continue
        if hi <= lo:  # a single value: give the bins some width around it
            pad = max(abs(lo) * 1e-3, 1e-12)
            lo, hi = lo - pad, hi + pad
        counts = None
        for g in groups[layer]:
            # histc leaves NaN/Inf out: they compare false against [lo, hi]
            h = torch.histc(g.detach().float(), bins=bins, min=float(lo), max=float(hi))
            counts = h if counts is None else counts + h
        counts_dev.append(counts)
        edges[layer] = np.linspace(lo, hi, bins + 1)
    if not counts_dev:
        return {}
    # sync 2 of 2: every layer's counts in one copy
    host = torch.stack(counts_dev).cpu().numpy()  # sync 2 of 2, histogram cadence only
    return {layer: (host[k], edges[layer]) for k, layer in enumerate(edges)}


# ---------------------------------------------------------------------- the sink
def _log_dir(trainer: Any) -> str:
    """The run's log folder, as ``trainer.log_dir`` finds it, without its collective broadcast.

    ``trainer.log_dir`` broadcasts from rank 0 and must be called on every rank; sinks run on rank 0 only.
    """
    loggers = list(getattr(trainer, "loggers", None) or [])
    for logger in loggers[:1]:
        for attr in ("log_dir", "save_dir"):
            path = getattr(logger, attr, None)
            if isinstance(path, (str, os.PathLike)) and str(path):
                return str(path)
    return str(getattr(trainer, "default_root_dir", None) or os.getcwd())


class PicturesSink(GuardSink):
    """Gradient-flow heatmap and latest-norms bar chart as PNG files, plus the end-of-run summary.

    For users of CSV / TensorBoard loggers (the W&B sink logs the same
    pictures to W&B). Files, rewritten at every ``every_n_steps`` and at the
    end of fit: ``grad_flow.png`` (:func:`heatmap_figure`) and
    ``grad_norms.png`` (:func:`norms_figure`), with ``_opt<i>`` before the
    extension for optimizers other than the first, and ``summary.json``
    (:meth:`GradGuard.summary`, written at the end). Add it with
    ``GradGuard(sinks=[PicturesSink()])``. Needs matplotlib.

    Args:
        dirpath: folder for the files; default ``<log dir>/gradguard``, where
            the log dir is the first logger's ``log_dir`` (or ``save_dir``), else the
            Trainer's ``default_root_dir``.
        every_n_steps: also rewrite the pictures every this many optimizer
            steps; ``None`` or ``0``: only at the end of fit.
        max_columns: steps (columns) kept per picture; longer runs fold
            neighbouring steps together (see :class:`FlowHistory`).
        dpi: resolution; each picture is :func:`picture_size` inches x ``dpi``.
        log_summary: at the end of fit, also log the numeric part of the
            summary through every non-W&B logger as ``<prefix>summary/<key>``
            metrics (the W&B sink writes the W&B run summary instead).
    """

    norms_as_list = True  # they go into a FlowHistory, which takes lists

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        every_n_steps: int | None = 500,
        max_columns: int = 256,
        dpi: int = 100,
        log_summary: bool = True,
    ) -> None:
        if isinstance(dpi, bool) or not isinstance(dpi, int) or not 10 <= dpi <= 600:
            raise ValueError(f"`dpi` must be an integer in 10..600, got {dpi!r}.")
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise ValueError(f"`dirpath` must be a folder path or None (the logger's folder), got {dirpath!r}.")
        if not isinstance(log_summary, bool):
            raise ValueError(f"`log_summary` must be True or False, got {log_summary!r}.")
        try:
            import matplotlib  # noqa: F401  (checked here, drawn later)
        except ImportError as err:
            raise ModuleNotFoundError(
                "`PicturesSink` draws with matplotlib, which is not installed: "
                "pip install matplotlib (or 'lightning-gradguard[wandb]')."
            ) from err
        self.recorder = FlowRecorder(every_n_steps, max_columns)
        self.dirpath = None if dirpath is None else os.fspath(dirpath)
        self.dpi = dpi
        self.log_summary = bool(log_summary)
        self.written: list[str] = []  # every file written, for the user and the tests

    def setup(self, guard, trainer) -> None:
        self.recorder.reset()
        self.written = []

    def folder(self, trainer: Any) -> str:
        """Where the files go (created on first write)."""
        return self.dirpath or os.path.join(_log_dir(trainer), "gradguard")

    def on_step(self, guard, trainer, *, optimizer, step, log_step, layers, norms, metrics) -> None:
        if self.recorder.add(optimizer, step, log_step, layers, norms):
            self._write(trainer, optimizer)

    def on_event(self, guard, trainer, event) -> None:
        self.recorder.add_event(event)

    def on_fit_end(self, guard, trainer, summary: dict) -> None:
        for optimizer in self.recorder.unpublished():
            self._write(trainer, optimizer)
        folder = self.folder(trainer)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "summary.json")
        with open(path, "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
        self.written.append(path)
        if self.log_summary:
            log_summary_metrics(guard, trainer, summary, step=max(self.recorder.log_steps.values(), default=0))

    def _write(self, trainer, optimizer: int) -> None:
        history = self.recorder.histories[optimizer]
        folder = self.folder(trainer)
        os.makedirs(folder, exist_ok=True)
        suffix = f"_opt{optimizer}" if optimizer else ""
        for name, fig in (
            ("grad_flow", heatmap_figure(history, dpi=self.dpi)),
            ("grad_norms", norms_figure(history.layers, history.latest, step=history.latest_step, dpi=self.dpi)),
        ):
            path = os.path.join(folder, f"{name}{suffix}.png")
            fig.savefig(path, dpi=self.dpi)
            self.written.append(path)
        self.recorder.published(optimizer)


def is_wandb_logger(logger: Any) -> bool:
    """A Lightning ``WandbLogger`` (either package's, a subclass too), recognised without importing wandb."""
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def log_summary_metrics(guard: Any, trainer: Any, summary: dict, step: int) -> dict[str, float]:
    """Log the numeric entries of ``summary`` as ``<prefix>summary/<key>`` through every non-W&B logger.

    Called at the end of fit, after Lightning has finalized its loggers, so each
    logger is saved again afterwards. Returns what was logged.
    """
    metrics = {
        f"{guard.prefix}summary/{key}": float(value)
        for key, value in summary.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for logger in getattr(trainer, "loggers", []):
        if is_wandb_logger(logger):
            continue  # the W&B sink writes the run summary
        logger.log_metrics(metrics, step=step)
        logger.save()
    return metrics
