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
  its new layer names when they changed (a param group added mid-run: the
  step lines after it follow the new names; :func:`read_record` maps the
  earlier ones onto them, 0 for a layer they lacked);
- ``step``: ``step`` (``trainer.global_step``), ``optimizer``, ``norms``: the
  global L2 gradient norm then one per layer, rounded to ``digits``
  significant digits (0 for a layer without gradients this step; ``"nan"`` /
  ``"inf"`` strings where non-finite, as JSON has no NaN);
- ``event``: :meth:`GradEvent.to_dict` (``value`` / ``threshold`` as above);
- ``summary`` (last line): :meth:`GradGuard.summary` plus ``norms``, per
  optimizer the ``first`` / ``last`` / ``min`` / ``max`` of every series over
  *all* steps (recorded or not; min and max over finite values) and
  ``nonfinite`` (steps with NaN/Inf).

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
import math
import os
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from lightning_gradguard.events import GradEvent
from lightning_gradguard.sinks import GuardSink, series_columns

__all__ = ["FILENAME", "FORMAT", "VERSION", "NormSummary", "RecordError", "RecordSink", "RunRecord", "read_record"]

FORMAT = "gradguard-record"
VERSION = 1
FILENAME = "gradguard.jsonl"


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
                "first": s.first.tolist(), "last": s.last.tolist(), "min": s.min.tolist(), "max": s.max.tolist(),  # no sync
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
    here is reported once and switches the sink off; training goes on.

    Attributes:
        path: the file being (or last) written, once fitting started.
    """

    def __init__(self, path: str | os.PathLike | None = None, every_n_steps: int = 1, digits: int = 4) -> None:
        if path is not None and not isinstance(path, (str, os.PathLike)):
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
        self.path = self._resolve(trainer)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # line-buffered: a crash leaves every complete line on disk
        self._file = open(self.path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in on_fit_end
        self._layers, self._pending, self._norms = {}, None, NormSummary()
        self._header = self._make_header(guard, trainer)

    def on_step(self, guard, trainer, *, optimizer, step, log_step, layers, norms, metrics) -> None:
        if self._file is None:
            return
        self._pending = None
        known = self._layers.get(optimizer)
        if known != tuple(layers):  # the first step, or the layers changed (a param group added mid-run)
            self._layers[optimizer] = tuple(layers)
            if self._header is not None:
                self._write_header()
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
        if self._pending is not None and self._pending[:2] == (event.optimizer, event.step):
            self._file.write(_step_line(*self._pending, self.digits) + "\n")
            self._pending = None
        self._write({"type": "event", **event.to_dict()})

    def on_fit_end(self, guard, trainer, summary: dict) -> None:
        if self._file is None:
            return
        if self._header is not None:  # no optimizer step ran
            self._write_header()
        norms = {
            str(opt): {k: _round(v, self.digits) if k != "steps" else v for k, v in values.items()}
            for opt, values in self._norms.as_dict().items()
        }
        self._write({"type": "summary", **summary, "norms": norms, "time": time.time()})
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

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

    def _write_header(self) -> None:
        header, self._header = self._header, None
        header["layers"] = {str(opt): list(names) for opt, names in self._layers.items()}
        self._write(header)

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(_plain(obj), separators=(",", ":"), allow_nan=False) + "\n")


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
    """

    path: str
    header: dict[str, Any]
    layers: dict[int, tuple[str, ...]] = field(default_factory=dict)
    steps: dict[int, np.ndarray] = field(default_factory=dict)
    norms: dict[int, np.ndarray] = field(default_factory=dict)
    events: list[GradEvent] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    truncated: bool = False

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def series_names(self, optimizer: int = 0) -> list[str]:
        """``["global", *layers]``: the names of the norms columns."""
        return ["global", *self.layers.get(optimizer, ())]

    def layer_stats(self, optimizer: int = 0) -> dict[str, np.ndarray]:
        """``first`` / ``last`` / ``min`` / ``max`` / ``nonfinite`` per series (the summary's, else the recorded steps')."""
        stats = ((self.summary or {}).get("norms") or {}).get(str(optimizer))
        if stats:
            return {k: _floats(stats[k]) for k in ("first", "last", "min", "max", "nonfinite")}
        norms = self.norms.get(optimizer)
        if norms is None or not len(norms):
            width = 1 + len(self.layers.get(optimizer, ()))
            empty = np.full(width, np.nan)
            return {"first": empty, "last": empty, "min": empty, "max": empty, "nonfinite": np.zeros(width)}
        summary = NormSummary()
        for row in norms:
            summary.update(optimizer, row)
        stats = summary.as_dict()[optimizer]
        return {k: _floats(stats[k]) for k in ("first", "last", "min", "max", "nonfinite")}


def read_record(path: str | os.PathLike) -> RunRecord:
    """Read a record written by :class:`RecordSink`; ``path`` may be the file or a folder holding one.

    A folder is searched for ``gradguard.jsonl`` (the newest one below it).
    Raises :class:`RecordError` (one-line message) for a missing, empty or
    corrupt file. A last line cut off mid-write (a killed run) is ignored and
    ``truncated`` set.
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
            if kind != "header" or obj.get("format") != FORMAT:
                raise RecordError(f"{path}:{number}: not a gradguard record (no {FORMAT!r} header)")
            if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
                raise RecordError(
                    f"{path}: record version {obj.get('version')!r} is newer than this lightning_gradguard reads "
                    f"({VERSION}); upgrade lightning_gradguard"
                )
            record = RunRecord(path=path, header=obj)
            record.layers = {int(k): tuple(v) for k, v in (obj.get("layers") or {}).items()}
            continue
        try:
            if kind == "layers":
                record.layers[int(obj["optimizer"])] = tuple(obj["layers"])
            elif kind == "step":
                opt = int(obj.get("optimizer", 0))
                norms = _floats(obj["norms"])
                width = 1 + len(record.layers.get(opt, ()))
                if norms.shape != (width,):
                    raise ValueError(f"{len(norms)} norms for {width} series")
                rows.setdefault(opt, []).append((int(obj["step"]), norms, record.layers.get(opt, ())))
            elif kind == "event":
                event = GradEvent.from_dict(obj)
                record.events.append(
                    GradEvent(**{**event.to_dict(), "value": float(event.value), "threshold": float(event.threshold)})
                )
            elif kind == "summary":
                record.summary = obj
            # other types: written by a newer minor version; skipped
        except (KeyError, TypeError, ValueError) as err:
            if last:
                record.truncated = True
                break
            raise RecordError(f"{path}:{number}: corrupt {kind} line ({err})") from None
    if record is None:
        raise RecordError(f"{path}: empty file, not a gradguard record")
    for opt, items in rows.items():
        # the layers changed mid-run: every row in the last layout, plus layers only earlier rows had
        final = list(record.layers.get(opt, ()))
        final += dict.fromkeys(name for _, _, layout in items for name in layout if name not in set(final))
        record.layers[opt] = tuple(final)
        record.steps[opt] = np.array([s for s, _, _ in items], dtype=np.int64)
        record.norms[opt] = np.stack([
            n if layout == record.layers[opt]
            else np.array([n[i] if i is not None else 0.0 for i in series_columns(layout, final)])
            for _, n, layout in items
        ])
    lost = _lost_events(record)
    if lost:
        record.events = sorted(record.events + lost, key=lambda e: e.step)
    return record


def _lost_events(record: RunRecord) -> list[GradEvent]:
    """``nonfinite`` events for recorded steps whose norms hold NaN/Inf but that have no such event: the
    run was cut off (killed, crashed) after writing the step's norms and before its event line, and a
    CI gate must not pass a NaN because its line was lost. None for a finished run, nor under a fp16
    GradScaler (its overflow steps hold Infs by design and raise no event unless they persist)."""
    precision = str(record.header.get("trainer", {}).get("precision", ""))
    if record.finished or precision.startswith("16"):
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
