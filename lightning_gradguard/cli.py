"""``gradguard``: read a run record, print a report, draw the gradient flow, gate a CI pipeline.

::

    gradguard lightning_logs/version_0/gradguard.jsonl            # report; exit 1 if any event
    gradguard lightning_logs/ --png flow.png --html report.html   # newest record below a folder
    gradguard run.jsonl --fail-on nonfinite,exploding             # vanishing reported, not failing

Exit status:

- ``0`` healthy: a finished record, with optimizer steps, and no event of the
  ``--fail-on`` kinds;
- ``1`` events of the ``--fail-on`` kinds found, or counted by the summary line
  but missing from the record (a resumed run's record lacks the events before
  the resume; they are in the earlier record);
- ``2`` the gate cannot vouch for the run (one line on stderr, after the report
  when there is one): the record is missing or corrupt; it did not finish (no
  summary line: the run crashed, was killed or is still running, or its record
  was switched off, by a full disk say), unless ``--allow-unfinished``; it
  finished with no optimizer step; a picture could not be written; or a bad
  argument. Events of the ``--fail-on`` kinds win: an unfinished record with
  one exits 1.

``gradguard rec | head -1`` ends quietly with the same status. Colour only when
stdout is a terminal and ``NO_COLOR`` is unset. Records are written by
:class:`~lightning_gradguard.record.RecordSink`; run it as ``gradguard`` or
``python -m lightning_gradguard.cli``.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from collections.abc import Sequence
from typing import IO

import numpy as np

from lightning_gradguard.events import KINDS
from lightning_gradguard.record import FILENAME, RecordError, RunRecord, read_record

__all__ = ["EXIT_ERROR", "EXIT_EVENTS", "EXIT_OK", "format_report", "main", "render_html", "render_png"]

EXIT_OK, EXIT_EVENTS, EXIT_ERROR = 0, 1, 2

_ANSI = {"red": "31", "yellow": "33", "green": "32", "bold": "1", "dim": "2", "cyan": "36"}
_STATS = ("first", "last", "min", "max")
_KIND_ANSI = {"nonfinite": "red", "exploding": "yellow", "vanishing": "cyan"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return the exit status (see the module docstring)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, message already printed)
        return stop.code if isinstance(stop.code, int) else EXIT_ERROR
    try:
        fail_on = _kinds(args.fail_on)
    except ValueError as err:
        parser.print_usage(sys.stderr)
        return _error(str(err))
    # exit 1 means "events found": no failure of the command itself may end in a traceback (exit 1)
    try:
        record = read_record(args.record)
    except RecordError as err:
        return _error(str(err))
    except Exception as err:  # noqa: BLE001 - see above
        return _error(f"cannot read {args.record}: {_one_line(err)}")
    say = _Say()
    try:
        status, verdict = _verdict(record, fail_on, args.allow_unfinished)
        say(format_report(record, fail_on=fail_on, color=_use_color(sys.stdout), max_rows=args.max_rows,
                          allow_unfinished=args.allow_unfinished))
        if args.png or args.html:
            try:
                png = render_png(record)
                if args.png:
                    _write(args.png, png)
                    say(f"gradient-flow picture: {args.png}")
                if args.html:
                    page = render_html(record, png, fail_on=fail_on, allow_unfinished=args.allow_unfinished)
                    _write(args.html, page.encode("utf-8"))
                    say(f"HTML report: {args.html}")
            except (OSError, ImportError) as err:
                return _error(f"cannot write the picture: {err}")
    except Exception as err:  # noqa: BLE001 - see above
        return _error(f"cannot report on {record.path}: {_one_line(err)}")
    if status == EXIT_ERROR:
        _error(verdict)
    return status


def _error(message: str) -> int:
    print(f"gradguard: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


class _Say:
    """Print to stdout; once the reader has gone (``gradguard rec | head -1``), print nothing more, quietly:
    the exit status stays the gate's (the usual idiom: the rest, and the flush at exit, go to devnull)."""

    def __init__(self) -> None:
        self.gone = False

    def __call__(self, text: str) -> None:
        if self.gone:
            return
        try:
            print(text, file=sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:
            self.gone = True
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            except (OSError, ValueError, AttributeError):  # not a real file (a test's StringIO)
                pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradguard",
        description="Report on a GradGuard run record (gradguard.jsonl, written by RecordSink) and gate CI on it.",
        epilog="exit status: 0 healthy; 1 events of the --fail-on kinds found (or counted by the summary but "
               "missing from the record: a resumed run); 2 the gate cannot vouch for the run: a missing or corrupt "
               "record, an unfinished one (no summary line; see --allow-unfinished), one with no optimizer step. "
               "Events win: an unfinished record with an event exits 1.",
    )
    parser.add_argument("record", help="the record file, or a folder to search for the newest gradguard.jsonl")
    parser.add_argument("--png", metavar="PATH", help="write the gradient-flow picture (PNG)")
    parser.add_argument("--html", metavar="PATH", help="write a self-contained HTML report (picture inlined)")
    parser.add_argument(
        "--fail-on", metavar="KINDS", default="all",
        help=f"comma-separated kinds that make the exit status 1: {','.join(KINDS)}, 'all' (default) or 'none'",
    )
    parser.add_argument("--max-rows", metavar="N", type=_positive_int, default=30,
                        help="layers shown in the table (default 30)")
    parser.add_argument("--allow-unfinished", action="store_true",
                        help="a record without its summary line (a live run's) exits by its events only, not 2")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)  # argparse reports a ValueError as "invalid _positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _kinds(text: str) -> tuple[str, ...]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return KINDS
    if names == ["none"]:
        return ()
    if not names:  # an empty shell variable, say: a gate that can never fail must be asked for by name
        raise ValueError(f"--fail-on: got {text!r}, no kind; use a comma-separated list of {', '.join(KINDS)}, "
                         "or 'all' / 'none' (alone)")
    bad = [n for n in names if n not in KINDS]
    if bad:
        alone = " ('all' and 'none' stand alone)" if bad[0] in ("all", "none") else ""
        raise ValueError(f"--fail-on: unknown kind {bad[0]!r}{alone}; use a comma-separated list of "
                         f"{', '.join(KINDS)}, or 'all' / 'none'")
    return tuple(k for k in KINDS if k in names)


def _failing(record: RunRecord, fail_on: Sequence[str]) -> list:
    return [e for e in record.events if e.kind in fail_on]


def _unrecorded(record: RunRecord, fail_on: Sequence[str]) -> list[tuple[str, int, int]]:
    """``(kind, counted, held)`` where the summary counts more events of a ``fail_on`` kind than the record
    holds: the file was rewritten by a resumed run (or by another fit of the same guard)."""
    summary = record.summary or {}
    held = {k: sum(e.kind == k for e in record.events) for k in fail_on}
    return [(k, summary[f"events/{k}"], held[k]) for k in fail_on
            if isinstance(summary.get(f"events/{k}"), int) and summary[f"events/{k}"] > held[k]]


def _steps(record: RunRecord) -> int:
    """Optimizer steps: the summary's count (all steps), else the recorded ones."""
    steps = (record.summary or {}).get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool):
        return steps
    return sum(len(s) for s in record.steps.values())


def _verdict(record: RunRecord, fail_on: Sequence[str], allow_unfinished: bool = False) -> tuple[int, str]:
    """The exit status and the verdict line; the command, the terminal report and the HTML page share it."""
    failing, unrecorded = _failing(record, fail_on), _unrecorded(record, fail_on)
    if failing or unrecorded:  # events win over an unfinished record
        parts = []
        if failing:
            kinds = sorted({e.kind for e in failing}, key=KINDS.index)
            parts.append(f"{len(failing)} event{'s' if len(failing) > 1 else ''} ({', '.join(kinds)}); "
                         f"first at step {failing[0].step}")
        if unrecorded:
            parts.append(", ".join(f"the summary counts {n} {kind} event{'s' if n > 1 else ''}, the record holds {m}"
                                   for kind, n, m in unrecorded)
                         + ": the events before a resume are in the earlier record")
        return EXIT_EVENTS, "FAIL: " + "; ".join(parts)
    if record.finished and _steps(record) == 0:
        return EXIT_ERROR, ("no optimizer step was recorded: the run finished without the guard checking a "
                            "gradient (an empty dataloader, max_steps=0, manual optimization without opt.step()?)")
    if not record.finished and not allow_unfinished:
        ends = [int(s[-1]) for s in record.steps.values() if len(s)]
        after = f"the steps after step {max(ends)}" if ends else "any step (none was recorded)"
        return EXIT_ERROR, ("the record did not finish (no summary line: the run crashed, was killed or is still "
                            "running, or its record was switched off, by a full disk say): the gate cannot vouch "
                            f"for {after}; --allow-unfinished gates a live run on its events so far")
    other = f" ({len(record.events)} events of other kinds)" if record.events else ""
    return EXIT_OK, f"OK: no {'/'.join(fail_on) or 'failing'} events{other}"


def _beside(path: str) -> list[str]:
    """The other records in the folder of ``gradguard.jsonl`` / ``gradguard-<prefix>.jsonl``: those of other
    guards of the same run (see RecordSink)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(FILENAME)

    def ours(n: str) -> bool:
        return n == FILENAME or (n.startswith(stem + "-") and n.endswith(ext))

    if not ours(name):
        return []
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    return sorted(n for n in names if n != name and ours(n))


def _use_color(stream: IO[str]) -> bool:
    # https://no-color.org: any NO_COLOR turns colour off; so does a pipe, a file or a dumb terminal
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _g(x: float) -> str:
    x = float(x)
    return f"{x:.3g}" if np.isfinite(x) else str(x)


# ---------------------------------------------------------------------- terminal
def format_report(record: RunRecord, fail_on: Sequence[str] = KINDS, color: bool = False, max_rows: int = 30,
                  allow_unfinished: bool = False) -> str:
    """The terminal report: the run, its events (with usual causes), per-layer norms, the verdict (``FAIL``:
    exit 1, ``ERROR``: exit 2, ``OK``; see the module docstring)."""
    from lightning_gradguard.testing import hint

    def c(text: str, style: str) -> str:
        return f"\033[{_ANSI[style]}m{text}\033[0m" if color else text

    lines = [c(f"gradguard record: {record.path}", "bold")]
    header = record.header
    steps = _steps(record)
    n_layers = sum(len(v) for v in record.layers.values())
    module = (header.get("trainer") or {}).get("module") or "?"
    every = (header.get("record") or {}).get("every_n_steps", 1)
    lines.append(
        f"  {module}: {steps} steps, {len(record.layers) or 1} optimizer{'s' if len(record.layers) > 1 else ''}, "
        f"{n_layers} layers, norms recorded every {every} step{'s' if every != 1 else ''}"
    )
    if not record.finished:
        lines.append(c("  the run did not finish (no summary line: crashed, killed or still running)", "yellow"))
    if record.truncated:
        lines.append(c("  the last line was cut off mid-write and ignored", "yellow"))
    others = _beside(record.path)
    if others:
        lines.append(c(f"  other records beside it (another GradGuard's; gate each one): {', '.join(others)}",
                       "yellow"))
    counts = {k: sum(e.kind == k for e in record.events) for k in KINDS}
    lines.append("  events: " + ", ".join(f"{counts[k]} {k}" for k in KINDS))
    lines.append("")

    if record.events:
        lines.append(c(f"events ({len(record.events)}):", "bold"))
        width = max(len(e.layer or "global") for e in record.events)
        lines.append(
            f"  {'step':>6}  {'kind':<9}  {'reason':<12}  {'layer':<{width}}  {'value':>9}  {'threshold':>9}  actions"
        )
        for e in record.events[:50]:
            kind = c(f"{e.kind:<9}", _KIND_ANSI.get(e.kind, "bold"))
            lines.append(
                f"  {e.step:>6}  {kind}  {e.reason:<12}  {(e.layer or 'global'):<{width}}  {_g(e.value):>9}  "
                f"{_g(e.threshold):>9}  {','.join(e.actions) or '-'}"
            )
            lines.append(c(f"          {e.message}", "dim"))
        if len(record.events) > 50:
            lines.append(f"  ... {len(record.events) - 50} more")
        lines.append("")
        seen: list[str] = []
        for e in record.events:
            key = e.reason or e.kind
            if key not in seen:
                seen.append(key)
                lines.append(f"usual causes of {e.kind} ({key}): {hint(e)}")
        lines.append("")

    flagged = {name for e in record.events for name in (e.layers or ((e.layer,) if e.layer else ()))}
    for opt in sorted(record.layers) or [0]:
        title = "gradient L2 norm per layer (first / last / min / max; < : named by an event)"
        lines.append(c(title + (f", optimizer {opt}:" if len(record.layers) > 1 else ":"), "bold"))
        stats = record.layer_stats(opt)
        names = record.series_names(opt)
        keep = _rows(names, flagged, max_rows)
        width = max([len(names[i]) for i in keep] + [5])
        lines.append(f"  {'layer':<{width}}    {'first':>9} {'last':>9} {'min':>9} {'max':>9}")
        previous = -1
        for i in keep:
            if i != previous + 1:
                lines.append(f"  ... {i - previous - 1} more")
            previous = i
            name = names[i]
            mark = "<" if name in flagged else " "
            bad = int(stats["nonfinite"][i])
            tail = c(f"  ({bad} non-finite step{'s' if bad > 1 else ''})", "red") if bad else ""
            row = f"  {name:<{width}} {mark}  " + " ".join(f"{_g(stats[k][i]):>9}" for k in _STATS)
            lines.append((c(row, "yellow") if mark == "<" else row) + tail)
        if previous < len(names) - 1:
            lines.append(f"  ... {len(names) - 1 - previous} more")
        lines.append("")

    status, verdict = _verdict(record, fail_on, allow_unfinished)
    if status == EXIT_ERROR:
        verdict = "ERROR: " + verdict
    lines.append(c(verdict, "green" if status == EXIT_OK else "red"))
    return "\n".join(lines)


def _rows(names: Sequence[str], flagged: set[str], max_rows: int) -> list[int]:
    """Row indices to show: all, or the first/last layers plus every flagged one (global always)."""
    n = len(names)
    if n <= max(max_rows, 1):
        return list(range(n))
    head, tail = max(max_rows // 2, 1), max(max_rows // 4, 1)
    keep = set(range(head)) | set(range(n - tail, n)) | {i for i, name in enumerate(names) if name in flagged} | {0}
    return sorted(keep)


# ---------------------------------------------------------------------- pictures
def render_png(record: RunRecord, dpi: int = 100) -> bytes:
    """The gradient-flow picture of the record as PNG bytes.

    The heatmap of :func:`lightning_gradguard.pictures.heatmap_figure`, the
    same picture the guard draws during training: rows are the global norm
    then each layer in model order, columns the recorded steps, colour log10
    of the norm (red: NaN/Inf, grey: exactly zero), events marked at their
    step and layer. One panel per optimizer, stacked. Needs matplotlib
    (imported here only; no pyplot, no backend change).
    """
    from lightning_gradguard.pictures import figure_to_array, heatmap_figure

    opts = sorted(o for o in record.layers if len(record.steps.get(o, ()))) or sorted(record.layers)[:1] or [0]
    module = (record.header.get("trainer") or {}).get("module") or "run"
    figures = []
    for opt in opts:
        history = _history(record, opt)
        n = sum(e.optimizer == opt for e in record.events)
        span = f"steps {int(record.steps[opt][0])}-{int(record.steps[opt][-1])}" if history.steps_seen else "no steps"
        kinds = sorted({e.kind for e in record.events if e.optimizer == opt}, key=KINDS.index)
        found = f"{n} event{'s' if n != 1 else ''}" + (f" ({', '.join(kinds)})" if kinds else "")
        which = f", optimizer {opt}" if len(opts) > 1 else ""
        figures.append(heatmap_figure(history, title=f"{module}: gradient flow{which}, {span}, {found}", dpi=dpi))
    buf = io.BytesIO()
    if len(figures) == 1:
        figures[0].savefig(buf, format="png", dpi=dpi)
    else:  # several optimizers: stack the panels
        from matplotlib.image import imsave

        arrays = [figure_to_array(f) for f in figures]
        width = max(a.shape[1] for a in arrays)
        padded = [np.pad(a, ((0, 0), (0, width - a.shape[1]), (0, 0)), constant_values=255) for a in arrays]
        imsave(buf, np.concatenate(padded), format="png")
    return buf.getvalue()


def _history(record: RunRecord, opt: int):
    """Replay one optimizer's recorded steps and events into a :class:`~lightning_gradguard.pictures.FlowHistory`."""
    from lightning_gradguard.pictures import FlowHistory

    steps = record.steps.get(opt, np.zeros(0, dtype=np.int64))
    norms = record.norms.get(opt, np.zeros((0, 1 + len(record.layers.get(opt, ())))))
    # one column per recorded step, folded pairwise beyond 512 columns
    history = FlowHistory(record.layers.get(opt, ()), max_columns=max(2, min(len(steps), 512)))
    pending = sorted((e for e in record.events if e.optimizer == opt), key=lambda e: e.step)
    k = 0
    for step, row in zip(steps, norms):
        history.add(int(step), row)
        while k < len(pending) and pending[k].step <= step:
            e = pending[k]
            for layer in e.layers or (e.layer,):  # mark every layer the event names
                history.add_event(e.step, e.kind, layer)
            k += 1
    return history


def render_html(record: RunRecord, png: bytes, fail_on: Sequence[str] = KINDS, allow_unfinished: bool = False) -> str:
    """A self-contained HTML page: verdict, the picture (inlined base64 PNG), events, per-layer table, config."""
    from lightning_gradguard.testing import hint

    e_ = html.escape
    status, verdict = _verdict(record, fail_on, allow_unfinished)
    if status == EXIT_ERROR:
        verdict = "ERROR: " + verdict
    rows = "".join(
        f"<tr class='{e_(e.kind)}'><td>{e.step}</td><td>{e_(e.kind)}</td><td>{e_(e.reason)}</td>"
        f"<td><code>{e_(e.layer or 'global')}</code></td><td>{_g(e.value)}</td><td>{_g(e.threshold)}</td>"
        f"<td>{e_(', '.join(e.actions))}</td><td>{e_(e.message)}</td></tr>"
        for e in record.events
    )
    causes = []
    for e in record.events:
        item = f"<li><b>{e_(e.kind)} ({e_(e.reason or e.kind)})</b>: {e_(hint(e))}</li>"
        if item not in causes:
            causes.append(item)
    tables = []
    for opt in sorted(record.layers) or [0]:
        stats = record.layer_stats(opt)
        body = "".join(
            f"<tr><td><code>{e_(name)}</code></td>" + "".join(f"<td>{_g(stats[k][i])}</td>" for k in _STATS)
            + f"<td>{int(stats['nonfinite'][i])}</td></tr>"
            for i, name in enumerate(record.series_names(opt))
        )
        tables.append(
            f"<h3>optimizer {opt}</h3><table><tr><th>layer</th><th>first</th><th>last</th><th>min</th><th>max</th>"
            f"<th>non-finite steps</th></tr>{body}</table>"
        )
    image = base64.b64encode(png).decode("ascii")
    config = "".join(
        f"<tr><td><code>{e_(str(k))}</code></td><td>{e_(json.dumps(v))}</td></tr>"
        for k, v in record.header.get("config", {}).items()
    )
    steps = _steps(record)
    module = (record.header.get("trainer") or {}).get("module", "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GradGuard report: {e_(module)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; vertical-align: top; }}
.verdict {{ font-weight: bold; padding: .4em .8em; display: inline-block; color: white;
           background: {'#c62828' if status != EXIT_OK else '#2e7d32'}; }}
tr.nonfinite td:nth-child(2) {{ color: #d62728; }} tr.exploding td:nth-child(2) {{ color: #e65100; }}
tr.vanishing td:nth-child(2) {{ color: #1f77b4; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>GradGuard report: {e_(module)}</h1>
<p><code>{e_(record.path)}</code>: {e_(str(steps))} steps{'' if record.finished else ' (run did not finish)'}</p>
<p class="verdict">{e_(verdict)}</p>
<h2>Gradient flow</h2>
<img alt="gradient flow heatmap" src="data:image/png;base64,{image}">
<h2>Events ({len(record.events)})</h2>
{'<table><tr><th>step</th><th>kind</th><th>reason</th><th>layer</th><th>value</th><th>threshold</th><th>actions</th>'
 '<th>message</th></tr>' + rows + '</table><h3>Usual causes</h3><ul>' + ''.join(causes) + '</ul>'
 if record.events else '<p>none</p>'}
<h2>Gradient L2 norm per layer</h2>
{''.join(tables)}
<h2>Configuration</h2>
<table>{config}</table>
</body></html>
"""


if __name__ == "__main__":
    sys.exit(main())
