"""The run record: the guard's per-step norms, events and summary in a compact JSON Lines file.

:class:`RecordSink` writes it during training (``GradGuard(sinks=[RecordSink()])``)
into the Trainer's log folder, as ``gradguard.jsonl``; :func:`read_record` reads
it back (the ``gradguard`` command does, to print a report, draw the gradient
flow and gate a CI pipeline on the events).

One JSON object per line, told apart by ``"type"``:

- ``header`` (first line, written at the first optimizer step): ``format``
  (``"gradguard-record"``), ``version``, ``layers`` (per optimizer index, the
  layer names in the order of the norms), ``config`` (the guard's arguments),
  ``trainer`` facts, package versions, ``record`` (this sink's settings);
- ``layers``: the layer names of an optimizer first seen after the header, or
  its new layer names when they changed (a param group added mid-run, an
  optimizer replaced by one over fewer layers: the step lines after it follow
  the new names; :func:`read_record` maps every step onto the last names plus
  the removed ones, 0 for a layer a step lacked);
- ``step``: ``step`` (``trainer.global_step``), ``optimizer``, ``norms``: the
  global L2 gradient norm then one per layer, rounded to ``digits``
  significant digits (0 for a layer without gradients this step; ``"nan"`` /
  ``"inf"`` strings where non-finite, as JSON has no NaN);
- ``event``: :meth:`GradEvent.to_dict` (``value`` / ``threshold`` as above);
  the run's events before this fit (restored by a resume: the file is
  written afresh) come right after the header, with ``"earlier": true``;
- ``summary`` (last line): :meth:`GradGuard.summary` plus ``norms``, per
  optimizer the ``first`` / ``last`` / ``min`` / ``max`` of every series over
  *all* steps (recorded or not; min and max over finite values) and
  ``nonfinite`` (steps with NaN/Inf), in the optimizer's last layout
  (:meth:`RunRecord.layer_stats` maps them by name). A record without it did
  not finish, and the ``gradguard`` gate does not pass it.

Size: about ``digits + 6`` bytes per layer per recorded step; 500 layers every
step for 10,000 steps is ~50 MB, so pass ``every_n_steps`` on long runs (steps
with events are always recorded).

>>> import io, json
>>> line = _step_line(0, 12, np.array([0.123456, 1e-9, np.inf]), 4)
>>> line
'{"type":"step","step":12,"optimizer":0,"norms":[0.1235,1e-09,"inf"]}'
>>> _floats(json.loads(line)["norms"]).tolist()
[0.1235, 1e-09, inf]
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from lightning_gradguard.events import KINDS, GradEvent
from lightning_gradguard.sinks import GuardSink, series_columns

__all__ = ["FILENAME", "FORMAT", "VERSION", "NormSummary", "RecordError", "RecordSink", "RunRecord", "read_record"]

FORMAT = "gradguard-record"
VERSION = 1
FILENAME = "gradguard.jsonl"

log = logging.getLogger(__name__)
_STATS = ("first", "last", "min", "max", "nonfinite")
# the records this process is writing (normalised path -> its sink): a second sink that resolves to one of
# them writes a file of its own instead of interleaving its lines into the first one's (see RecordSink)
_OPEN: dict[str, weakref.ref] = {}


class RecordError(ValueError):
    """A record file that is missing, empty, not a record, or corrupt; the message is one line."""


# ---------------------------------------------------------------------- per-layer summary
@dataclass
class _Series:
    first: np.ndarray
    last: np.ndarray
    min: np.ndarray
    max: np.ndarray
    nonfinite: np.ndarray
    steps: int = 1


class NormSummary:
    """First / last / min / max of every series (global + layers) per optimizer, host-side numpy.

    Min and max are over finite values (``nan`` if a series was never finite);
    ``nonfinite`` counts the steps a series held NaN/Inf.

    >>> s = NormSummary()
    >>> for norms in ([1.0, 4.0], [np.nan, 2.0], [3.0, 8.0]):
    ...     s.update(0, np.array(norms))
    >>> s.as_dict()[0]["min"], s.as_dict()[0]["max"], s.as_dict()[0]["nonfinite"]
    ([1.0, 2.0], [3.0, 8.0], [1, 0])
    """

    def __init__(self) -> None:
        self.series: dict[int, _Series] = {}

    def update(self, optimizer: int, norms: np.ndarray) -> None:
        norms = np.asarray(norms, dtype=np.float64)
        finite = np.isfinite(norms)
        clean = np.where(finite, norms, np.nan)
        s = self.series.get(optimizer)
        if s is None or s.first.shape != norms.shape:
            self.series[optimizer] = _Series(
                norms.copy(), norms.copy(), clean.copy(), clean.copy(), (~finite).astype(np.int64)
            )
            return
        s.last = norms.copy()
        s.min = np.fmin(s.min, clean)
        s.max = np.fmax(s.max, clean)
        s.nonfinite += ~finite
        s.steps += 1

    def relayout(self, optimizer: int, old: Sequence[str], new: Sequence[str]) -> None:
        """The optimizer's layers changed from ``old`` to ``new`` (a param group added mid-run): keep
        each series by name; a new layer counts as 0 (no gradients) over the steps before.

        >>> s = NormSummary()
        >>> s.update(0, np.array([1.0, 4.0]))
        >>> s.relayout(0, ["head"], ["backbone", "head"])
        >>> s.as_dict()[0]["max"]
        [1.0, 0.0, 4.0]
        """
        s = self.series.get(optimizer)
        if s is None:
            return
        take = series_columns(old, new)
        pick = lambda a: np.array([a[i] if i is not None else 0 for i in take], dtype=a.dtype)  # noqa: E731
        self.series[optimizer] = _Series(pick(s.first), pick(s.last), pick(s.min), pick(s.max), pick(s.nonfinite),
                                         s.steps)

    def as_dict(self) -> dict[int, dict[str, Any]]:
        """Per optimizer: ``first``, ``last``, ``min``, ``max`` (lists of floats), ``nonfinite`` counts, ``steps``."""
        return {
            opt: {
                # numpy arrays on the host: no sync
                "first": s.first.tolist(), "last": s.last.tolist(),  # no sync
                "min": s.min.tolist(), "max": s.max.tolist(),  # no sync
                "nonfinite": s.nonfinite.tolist(), "steps": s.steps,  # numpy: no sync
            }
            for opt, s in self.series.items()
        }


# ---------------------------------------------------------------------- writing
class RecordSink(GuardSink):
    """Write the guard's norms, events and summary to a JSON Lines record (format in the module docstring).

    >>> from lightning_gradguard import GradGuard
    >>> guard = GradGuard(sinks=[RecordSink()])   # -> <trainer.log_dir>/gradguard.jsonl

    Args:
        path: a file, or a folder to write ``gradguard.jsonl`` into; ``None``
            (default): the Trainer's log folder (``trainer.log_dir``: the first
            logger's folder, else ``default_root_dir``).
        every_n_steps: record the norms of every n-th optimizer step; steps
            with events are always recorded. The summary covers all steps.
        digits: significant digits of the recorded norms.

    The file is line-buffered, so a run that crashes leaves a readable record
    up to its last step. Like every sink it runs on rank 0 only, and a failure
    here is reported once and switches the sink off (its file is closed, and the
    record, without its summary line, fails the ``gradguard`` gate); training
    goes on.

    Two sinks never share a file: one whose path is already being written by
    another RecordSink in this process (two guards with ``record=True``, say)
    writes ``<name>-<prefix>.jsonl`` beside it instead, ``<prefix>`` being its
    guard's ``prefix`` made file-safe (``"grad2/"`` -> ``gradguard-grad2.jsonl``;
    ``<name>-2.jsonl``, ``-3``, ... if that is taken too), and warns once naming
    both paths. ``gradguard <folder>`` reads ``gradguard.jsonl`` (the first
    guard's) and its report names the other records beside it: gate each one.

    Attributes:
        path: the file being (or last) written, once fitting started.
    """

    def __init__(self, path: str | os.PathLike | None = None, every_n_steps: int = 1, digits: int = 4) -> None:
        if path is not None and (not isinstance(path, (str, os.PathLike)) or os.fspath(path) == ""):
            raise ValueError(
                f"`path` must be a file or folder path, or None for the Trainer's log folder, got {path!r}."
            )
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an integer >= 1, got {every_n_steps!r}.")
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 17:
            raise ValueError(f"`digits` must be an integer from 1 to 17, got {digits!r}.")
        self.target = None if path is None else os.fspath(path)
        self.every_n_steps = every_n_steps
        self.digits = digits
        self.path: str | None = None
        self._file: IO[str] | None = None
        self._layers: dict[int, tuple[str, ...]] = {}
        self._pending: tuple[int, int, np.ndarray] | None = None  # (optimizer, step, norms) of a step not due
        self._norms = NormSummary()
        self._header: dict[str, Any] | None = None  # written at the first step, when the layers are known

    # -- GuardSink
    def setup(self, guard, trainer) -> None:
        self.close()
        wanted = self._resolve(trainer)
        self.path = _free_path(wanted, getattr(guard, "prefix", ""))
        if self.path != wanted:
            log.warning("GradGuard: %s is being written by another RecordSink in this process (another GradGuard's "
                        "record); this one writes %s", wanted, self.path)
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            # line-buffered: a crash leaves every complete line on disk
            self._file = open(self.path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in on_fit_end
        except OSError as err:  # the guard reports it (once) and trains on without a record: name the path
            raise OSError(f"cannot write the run record {self.path!r} (GradGuard(record=...) or RecordSink(path=...)):"
                          f" {err.strerror or err}") from err
        _OPEN[_key(self.path)] = weakref.ref(self)
        self._layers, self._pending, self._norms = {}, None, NormSummary()
        self._header = self._make_header(guard, trainer)

    def on_step(self, guard, trainer, *, optimizer, step, log_step, layers, norms, metrics) -> None:
        if self._file is None:
            return
        try:
            self._on_step(optimizer, step, layers, norms, guard)
        except BaseException:
            self.close()  # the guard switches this sink off: let go of the file (and its path)
            raise

    def _on_step(self, optimizer, step, layers, norms, guard) -> None:
        self._pending = None
        known = self._layers.get(optimizer)
        if known != tuple(layers):  # the first step, or the layers changed (a param group added mid-run)
            self._layers[optimizer] = tuple(layers)
            if self._header is not None:
                self._write_header()
                self._write_earlier(guard, step)
            else:
                self._write({"type": "layers", "optimizer": optimizer, "layers": list(layers)})
            if known is not None:
                self._norms.relayout(optimizer, known, layers)
        self._norms.update(optimizer, norms)
        if step % self.every_n_steps == 0:
            self._file.write(_step_line(optimizer, step, norms, self.digits) + "\n")
        else:
            self._pending = (optimizer, step, norms)  # written if this step turns out to have events

    def on_event(self, guard, trainer, event: GradEvent) -> None:
        if self._file is None:
            return
        try:
            self._on_event(event)
        except BaseException:
            self.close()
            raise

    def _on_event(self, event: GradEvent) -> None:
        if self._pending is not None and self._pending[:2] == (event.optimizer, event.step):
            self._file.write(_step_line(*self._pending, self.digits) + "\n")
            self._pending = None
        self._write({"type": "event", **event.to_dict()})

    def on_fit_end(self, guard, trainer, summary: dict) -> None:
        if self._file is None:
            return
        try:
            self._on_fit_end(summary, guard)
        finally:
            self._warn_if_gone()
            self.close()

    def _warn_if_gone(self) -> None:
        """The record's file deleted while the run wrote it (its folder removed, a cleanup job): the writes went
        on into the unlinked file without an error, and the record is lost. Said once, at the end."""
        try:
            gone = os.fstat(self._file.fileno()).st_nlink == 0
        except (OSError, ValueError):
            return
        if gone:
            log.warning("GradGuard: the run record %s was deleted while the run was writing it (its folder removed?); "
                        "the record is lost and `gradguard` cannot gate this run", self.path)

    def _on_fit_end(self, summary: dict, guard) -> None:
        if self._header is not None:  # no optimizer step ran
            self._write_header()
            self._write_earlier(guard, None)
        norms = {
            str(opt): {k: _round(v, self.digits) if k != "steps" else v for k, v in values.items()}
            for opt, values in self._norms.as_dict().items()
        }
        self._write({"type": "summary", **summary, "norms": norms, "time": time.time()})

    def close(self) -> None:
        if self._file is None:
            return
        file, self._file = self._file, None
        if self.path is not None and _OPEN.get(_key(self.path), lambda: None)() is self:
            del _OPEN[_key(self.path)]
        try:
            file.close()
        except OSError:  # a full disk: the buffered tail is lost, the complete lines before it are on disk
            pass

    # -- helpers
    def _resolve(self, trainer) -> str:
        target = self.target if self.target is not None else _log_dir(trainer)
        if os.path.isdir(target) or self.target is None or not os.path.splitext(target)[1]:
            return os.path.join(target, FILENAME)
        return target

    def _make_header(self, guard, trainer) -> dict[str, Any]:
        import lightning
        import torch

        from lightning_gradguard import __version__

        config = {
            "on_nonfinite": list(guard.on_nonfinite), "on_exploding": list(guard.on_exploding),
            "on_vanishing": list(guard.on_vanishing), **guard.config.to_dict(),
            "converged_loss_ratio": guard.converged_loss_ratio, "prefix": guard.prefix,
            "group_depth": guard.group_depth,
        }
        facts = {
            "max_steps": getattr(trainer, "max_steps", None),
            "accumulate_grad_batches": getattr(trainer, "accumulate_grad_batches", None),
            "precision": str(getattr(getattr(trainer, "precision_plugin", None), "precision", "")),
            "world_size": getattr(trainer, "world_size", 1),
            "module": type(getattr(trainer, "lightning_module", None)).__name__,
        }
        return {
            "type": "header", "format": FORMAT, "version": VERSION, "created": time.time(),
            "layers": {}, "config": config, "trainer": facts,
            "versions": {"lightning_gradguard": __version__, "torch": torch.__version__,
                         "lightning": lightning.__version__, "python": platform.python_version()},
            "record": {"every_n_steps": self.every_n_steps, "digits": self.digits},
        }

    def _write_earlier(self, guard, step: int | None) -> None:
        """The run's events before this fit's first step (``step``): restored from the checkpoint of a
        resume, or of an earlier fit of the same Trainer. This file replaces the earlier one, and a gate
        reading it must see the whole run's events (``"earlier": true`` tells them apart)."""
        for event in getattr(guard, "events", ()):
            if step is None or event.step < step:
                self._write({"type": "event", **event.to_dict(), "earlier": True})

    def _write_header(self) -> None:
        header, self._header = self._header, None
        header["layers"] = {str(opt): list(names) for opt, names in self._layers.items()}
        self._write(header)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(_plain(obj), separators=(",", ":"), allow_nan=False) + "\n")


def _key(path: str) -> str:
    return os.path.normcase(os.path.realpath(path))


def _free_path(path: str, prefix: str) -> str:
    """``path``, or if a RecordSink of this process is writing it, ``<name>-<prefix><ext>`` beside it
    (then ``<name>-2<ext>``, ``-3``, ...): two sinks appending to one file would interleave their lines.

    >>> _free_path("logs/gradguard.jsonl", "grad2/")
    'logs/gradguard.jsonl'
    """

    def busy(candidate: str) -> bool:
        sink = _OPEN.get(_key(candidate), lambda: None)()
        return sink is not None and sink._file is not None

    if not busy(path):
        return path
    base, ext = os.path.splitext(path)
    tag = re.sub(r"[^0-9A-Za-z._-]+", "-", str(prefix or "")).strip("-.")
    candidates = ([f"{base}-{tag}{ext}"] if tag else []) + [f"{base}-{i}{ext}" for i in range(2, 10_000)]
    return next(c for c in candidates if not busy(c))


def _log_dir(trainer) -> str:
    """``trainer.log_dir`` without its broadcast: sinks run on rank 0 only, and a collective there would hang."""
    loggers = getattr(trainer, "loggers", [])
    if loggers:
        logger = loggers[0]
        path = getattr(logger, "log_dir", None) if type(logger).__name__ in ("TensorBoardLogger", "CSVLogger") else None
        path = path or getattr(logger, "save_dir", None)
        if path:
            return os.fspath(path)
    return os.fspath(trainer.default_root_dir)


def _num(x: float, digits: int) -> str:
    if math.isfinite(x):
        return f"{x:.{digits}g}"
    return '"nan"' if math.isnan(x) else ('"inf"' if x > 0 else '"-inf"')


def _round(values: Any, digits: int) -> Any:
    if isinstance(values, list):
        return [_round(v, digits) for v in values]
    return float(f"{values:.{digits}g}") if isinstance(values, float) and math.isfinite(values) else values


def _step_line(optimizer: int, step: int, norms: Sequence[float], digits: int) -> str:
    values = ",".join(_num(float(x), digits) for x in norms)
    return f'{{"type":"step","step":{int(step)},"optimizer":{int(optimizer)},"norms":[{values}]}}'


def _plain(obj: Any) -> Any:
    """JSON-ready: non-finite floats become ``"nan"`` / ``"inf"`` / ``"-inf"``, tuples lists, numpy scalars Python."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()  # a numpy scalar: no sync
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _floats(values: Iterable[Any]) -> np.ndarray:
    return np.array([float(v) for v in values], dtype=np.float64)  # float("nan") / float("inf") read the strings


# ---------------------------------------------------------------------- reading
@dataclass
class RunRecord:
    """A record read back by :func:`read_record`.

    Attributes:
        path: the file read.
        header: the header line (``config``, ``trainer``, ``versions``, ...).
        layers: per optimizer index, the layer names (norms column ``i + 1``; column 0 is global).
        steps: per optimizer, the recorded step numbers (``int64[T]``).
        norms: per optimizer, the recorded norms (``float64[T, 1 + L]``).
        events: the events, in order. A run cut off between a step's norms and its event line still
            fails a gate: recorded NaN/Inf norms with no ``nonfinite`` event at their step give one, made
            from the norms, with no actions (not in a finished run, nor under a fp16 GradScaler, whose
            overflow steps hold Infs by design).
        summary: the summary line, or ``None`` when the run did not end (crashed, killed, still running).
        truncated: the last line was cut off mid-write (and ignored).
        summary_layers: per optimizer, the layer names the summary's ``norms`` follow: the last layout
            written before the summary line. It lacks the layers removed mid-run (an optimizer replaced by
            one over fewer layers) that ``layers`` keeps; :meth:`layer_stats` maps one onto the other.
    """

    path: str
    header: dict[str, Any]
    layers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    steps: dict[int, np.ndarray] = field(default_factory=dict)
    norms: dict[int, np.ndarray] = field(default_factory=dict)
    events: list[GradEvent] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    truncated: bool = False
    summary_layers: dict[int, tuple[str, ...]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def series_names(self, optimizer: int = 0) -> list[str]:
        """``["global", *layers]``: the names of the norms columns."""
        return ["global", *self.layers.get(optimizer, ())]

    def layer_stats(self, optimizer: int = 0) -> dict[str, np.ndarray]:
        """``first`` / ``last`` / ``min`` / ``max`` / ``nonfinite`` per series, aligned with :meth:`series_names`.

        The summary's (over all steps), mapped by name; a layer the summary lacks (removed mid-run: the
        summary follows the last layout) gets the recorded steps' statistics, which count it as 0 after
        its removal (the record's rule for a layer without gradients). Without a summary: the recorded
        steps'.

        >>> record = RunRecord("r.jsonl", {}, layers={0: ("head", "body")}, steps={0: np.array([0, 1])},
        ...                    norms={0: np.array([[2.0, 1.0, 3.0], [1.0, 1.0, 0.0]])},
        ...                    summary={"norms": {"0": {"first": [2.0, 1.0], "last": [1.0, 1.0], "min": [0.5, 0.5],
        ...                                             "max": [2.0, 1.0], "nonfinite": [0, 0]}}},
        ...                    summary_layers={0: ("head",)})
        >>> record.layer_stats(0)["min"].tolist()  # global and head: the summary's; body, removed: the recorded
        [0.5, 0.5, 0.0]
        """
        stats = ((self.summary or {}).get("norms") or {}).get(str(optimizer))
        if not stats:
            return self._recorded_stats(optimizer)
        summary = {k: _floats(stats[k]) for k in _STATS}
        names = self.series_names(optimizer)
        follows = ["global", *self.summary_layers.get(optimizer, self.layers.get(optimizer, ()))]
        if follows == names:
            return summary
        where = {name: i for i, name in enumerate(follows)}
        recorded = self._recorded_stats(optimizer)
        return {
            k: np.array([summary[k][where[name]] if name in where else recorded[k][i] for i, name in enumerate(names)])
            for k in _STATS
        }

    def _recorded_stats(self, optimizer: int) -> dict[str, np.ndarray]:
        """The statistics of the recorded steps (``nan``, 0 non-finite, when none was recorded)."""
        norms = self.norms.get(optimizer)
        if norms is None or not len(norms):
            width = 1 + len(self.layers.get(optimizer, ()))
            empty = np.full(width, np.nan)
            return {"first": empty, "last": empty, "min": empty, "max": empty, "nonfinite": np.zeros(width)}
        summary = NormSummary()
        for row in norms:
            summary.update(optimizer, row)
        stats = summary.as_dict()[optimizer]
        return {k: _floats(stats[k]) for k in _STATS}


def read_record(path: str | os.PathLike) -> RunRecord:
    """Read a record written by :class:`RecordSink`; ``path`` may be the file or a folder holding one.

    A folder is searched for ``gradguard.jsonl`` (the one in it, else the newest one below it; the
    ``gradguard-<prefix>.jsonl`` of a second guard beside it is read by naming it). Raises
    :class:`RecordError` (one-line message) for a missing, empty or corrupt file (a line of the wrong
    shape: a field of the wrong type, an event of an unknown kind, summary norms that do not match the
    layers). A last line cut off mid-write (a killed run) is ignored and ``truncated`` set.
    """
    path = _find(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"cannot read {path}: {err}") from None
    lines = text.split("\n")
    complete = text.endswith("\n")
    record: RunRecord | None = None
    rows: dict[int, list[tuple[int, np.ndarray, tuple[str, ...]]]] = {}  # step, norms, the layers they follow
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines) and not complete
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
        except ValueError:
            if last and record is not None:
                record.truncated = True
                break
            what = "not a gradguard record" if record is None else "corrupt line"
            raise RecordError(f"{path}:{number}: {what} (invalid JSON)") from None
        kind = obj.get("type")
        if record is None:
            record = _header(path, number, obj)
            continue
        try:
            if kind == "layers":
                record.layers[_int(obj, "optimizer")] = _names(obj.get("layers"))
            elif kind == "step":
                opt, step = _int(obj, "optimizer", 0), _int(obj, "step")
                if not isinstance(obj.get("norms"), list):
                    raise ValueError(f"`norms` is {obj.get('norms')!r:.40}, not a list")
                norms = _floats(obj["norms"])
                width = 1 + len(record.layers.get(opt, ()))
                if norms.shape != (width,):
                    raise ValueError(f"{len(norms)} norms for {width} series")
                rows.setdefault(opt, []).append((step, norms, record.layers.get(opt, ())))
            elif kind == "event":
                record.events.append(_event(obj))
            elif kind == "summary":
                _check_summary(obj, record.layers)
                record.summary, record.summary_layers = obj, dict(record.layers)
            # other types: written by a newer minor version; skipped
        except (KeyError, TypeError, ValueError) as err:
            if last:
                record.truncated = True
                break
            raise RecordError(f"{path}:{number}: corrupt {kind} line ({err})") from None
    if record is None:
        raise RecordError(f"{path}: empty file, not a gradguard record")
    for opt, items in rows.items():
        # the layers changed mid-run: every row in the last layout, plus layers only earlier rows had; the
        # rows share their layout's tuple, so the names are looked at once per distinct layout, not per row
        layouts = list({id(layout): layout for _, _, layout in items}.values())  # distinct, in order
        final = list(record.layers.get(opt, ()))
        known = set(final)
        for layout in layouts:
            for name in layout:
                if name not in known:
                    known.add(name)
                    final.append(name)
        record.layers[opt] = final = tuple(final)
        # per layout other than the final one: where each final column comes from (0 for a layer it lacked)
        moves = {}
        for layout in layouts:
            if layout != final:
                take = series_columns(layout, final)
                moves[id(layout)] = (np.array([i or 0 for i in take]), np.array([i is None for i in take]))
        record.steps[opt] = np.array([s for s, _, _ in items], dtype=np.int64)
        record.norms[opt] = np.stack([n if id(layout) not in moves else _moved(n, *moves[id(layout)])
                                      for _, n, layout in items])
    lost = _lost_events(record)
    if lost:
        record.events = sorted(record.events + lost, key=lambda e: e.step)
    return record


def _moved(norms: np.ndarray, index: np.ndarray, missing: np.ndarray) -> np.ndarray:
    row = norms[index]
    row[missing] = 0.0
    return row


def _header(path: str, number: int, obj: dict) -> RunRecord:
    """The record a header line opens, checked (RecordError, one line, when it is not one)."""
    if obj.get("type") != "header" or obj.get("format") != FORMAT:
        raise RecordError(f"{path}:{number}: not a gradguard record (no {FORMAT!r} header)")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(f"{path}:{number}: corrupt header line (`version` {version!r:.40} is not an integer)")
    if version > VERSION:
        raise RecordError(
            f"{path}: record version {version!r} is newer than this lightning_gradguard reads "
            f"({VERSION}); upgrade lightning_gradguard"
        )
    try:
        for key in ("layers", "config", "trainer", "versions", "record"):
            if key in obj and not isinstance(obj[key], dict):
                raise ValueError(f"`{key}` is {obj[key]!r:.40}, not an object")
        layers = {int(k): _names(v) for k, v in obj.get("layers", {}).items()}
    except ValueError as err:
        raise RecordError(f"{path}:{number}: corrupt header line ({err})") from None
    return RunRecord(path=path, header=obj, layers=layers)


def _int(obj: dict, key: str, default: int | None = None) -> int:
    if key not in obj and default is None:
        raise ValueError(f"no `{key}`")
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{key}` is {value!r:.40}, not an integer")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValueError(f"layer names must be a list of strings, got {value!r:.40}")
    return tuple(value)


def _number(obj: dict, key: str) -> float:
    if key not in obj:
        raise ValueError(f"no `{key}`")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"`{key}` is {value!r:.40}, not a number")
    return float(value)  # "nan" / "inf" / "-inf" as written; another string raises ValueError


def _event(obj: dict) -> GradEvent:
    """An event line, checked field by field: a gate must not pass an event it cannot read."""
    if obj.get("kind") not in KINDS:
        raise ValueError(f"unknown kind {obj.get('kind')!r:.40}; known: {', '.join(KINDS)}")
    _int(obj, "step")
    _int(obj, "optimizer", 0)
    for key, types in (("layer", (str, type(None))), ("message", str), ("reason", str)):
        if key in obj and not isinstance(obj[key], types):
            raise ValueError(f"`{key}` is {obj[key]!r:.40}, not a string")
    for key in ("actions", "layers"):
        if key in obj and (not isinstance(obj[key], list) or not all(isinstance(a, str) for a in obj[key])):
            raise ValueError(f"`{key}` is {obj[key]!r:.40}, not a list of strings")
    value, threshold = _number(obj, "value"), _number(obj, "threshold")
    event = GradEvent.from_dict(obj)
    return GradEvent(**{**event.to_dict(), "value": value, "threshold": threshold})


def _check_summary(obj: dict, layers: dict[int, tuple[str, ...]]) -> None:
    """A summary line's counts are counts, and its norms match the layers they follow (the last layout)."""
    for key in ("steps", *(f"events/{kind}" for kind in KINDS)):
        if key in obj and (isinstance(obj[key], bool) or not isinstance(obj[key], int) or obj[key] < 0):
            raise ValueError(f"`{key}` is {obj[key]!r:.40}, not a count")
    norms = obj.get("norms", {})
    if not isinstance(norms, dict):
        raise ValueError(f"`norms` is {norms!r:.40}, not an object")
    for opt, stats in norms.items():
        width = 1 + len(layers.get(int(opt), ()))
        if not isinstance(stats, dict):
            raise ValueError(f"`norms` of optimizer {opt} is {stats!r:.40}, not an object")
        for key in _STATS:
            values = stats.get(key)
            if not isinstance(values, list) or len(values) != width:
                held = f"{len(values)} values" if isinstance(values, list) else f"{values!r:.40}"
                raise ValueError(f"`norms` of optimizer {opt}: `{key}` holds {held} for {width} series")
            _floats(values)


def _lost_events(record: RunRecord) -> list[GradEvent]:
    """``nonfinite`` events for recorded steps whose norms hold NaN/Inf but that have no such event: the
    run was cut off (killed, crashed) after writing the step's norms and before its event line, and a
    CI gate must not pass a NaN because its line was lost. None for a finished run, nor under a fp16
    GradScaler (its overflow steps hold Infs by design and raise no event unless they persist)."""
    precision = str((record.header.get("trainer") or {}).get("precision", ""))
    if record.finished or precision in ("16", "16-mixed"):  # a GradScaler (not "16-true", not bf16)
        return []
    reported = {(e.optimizer, e.step) for e in record.events if e.kind == "nonfinite"}
    found = []
    for opt, norms in record.norms.items():
        names = record.series_names(opt)
        for i in np.flatnonzero(~np.isfinite(norms).all(axis=1)):
            step, row = int(record.steps[opt][i]), norms[i]
            if (opt, step) in reported:
                continue
            bad = [j for j in range(1, len(row)) if not np.isfinite(row[j])] or [0]
            layers = tuple(names[j] for j in bad if j)
            what = "NaN" if np.isnan(row[bad[0]]) else "Inf"
            more = f" and {len(layers) - 5} more" if len(layers) > 5 else ""
            found.append(GradEvent(
                step=step, kind="nonfinite", layer=layers[0] if layers else None, value=float(row[bad[0]]),
                threshold=math.inf, actions=(), reason=what.lower(), optimizer=opt, layers=layers,
                message=f"non-finite gradient norms ({what}) recorded in "
                        f"{', '.join(map(repr, layers[:5])) or 'global'}{more}; no event line: the run was cut "
                        "off before writing it",
            ))
    return sorted(found, key=lambda e: (e.step, e.optimizer))


def _find(path: str) -> str:
    if os.path.isdir(path):
        direct = os.path.join(path, FILENAME)
        if os.path.isfile(direct):
            return direct
        found = [os.path.join(root, FILENAME) for root, _, files in os.walk(path) if FILENAME in files]
        if not found:
            raise RecordError(f"no {FILENAME} found under {path}")
        return max(found, key=os.path.getmtime)
    if not os.path.exists(path):
        raise RecordError(f"no such file: {path}")
    return path
