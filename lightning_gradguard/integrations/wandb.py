"""Weights & Biases: alerts that name the problem, gradient-flow pictures, run summary.

:class:`WandbSink` is added by ``GradGuard`` automatically when the Trainer has
a ``WandbLogger`` (or a ``wandb.run`` is active) and ``wandb`` imports. It uses
the run the user owns; it never calls ``wandb.init`` or ``wandb.finish``.
Without ``wandb`` installed nothing here runs (``wandb_run`` returns ``None``),
and nothing imports ``wandb`` or matplotlib before it is needed.

Scalars do not go through here: the guard logs them through the Trainer's
loggers like any other metric.
"""

from __future__ import annotations

import fnmatch
import logging
import numbers
import time
import zlib
from collections.abc import Sequence
from typing import Any

from lightning_gradguard.pictures import (
    MAX_HISTOGRAM_BINS,
    FlowRecorder,
    figure_to_array,
    grad_histograms,
    heatmap_figure,
    is_wandb_logger,
    norms_figure,
)
from lightning_gradguard.sinks import GuardSink
from lightning_gradguard.stats import layer_name

__all__ = ["WandbSink", "alert_text", "alert_title", "wandb_run"]

log = logging.getLogger("lightning_gradguard")

_TITLE_MAX = 63  # W&B: "must be less than 64 characters long"
# alert level: non-finite gradients, and any event that ended or rewound the run, are errors
_ERROR_KINDS = frozenset({"nonfinite"})
_ERROR_ACTIONS = frozenset({"stop", "raise", "rollback"})


def wandb_run(trainer: Any) -> Any | None:
    """The W&B run of the Trainer's ``WandbLogger``, else the active ``wandb.run``, else ``None``.

    Rank 0 only: on other ranks the logger's experiment is a no-op and ``None`` is returned.
    ``None`` too when ``wandb`` does not import.
    """
    if not getattr(trainer, "is_global_zero", True):
        return None
    try:
        import wandb
    except ImportError:
        return None
    logger = _wandb_logger(trainer)
    return logger.experiment if logger is not None else wandb.run


def _wandb_logger(trainer: Any) -> Any | None:
    """The Trainer's first ``WandbLogger`` (a subclass too), or ``None``."""
    return next((lg for lg in getattr(trainer, "loggers", None) or [] if is_wandb_logger(lg)), None)


# ---------------------------------------------------------------------- alert wording
def alert_level(event: Any) -> str:
    """``"ERROR"`` for non-finite gradients or when the run was stopped, raised or rolled back; else ``"WARN"``."""
    if event.kind in _ERROR_KINDS or _ERROR_ACTIONS & set(event.actions):
        return "ERROR"
    return "WARN"


def alert_title(event: Any) -> str:
    """Short, stable per (kind, layer, optimizer): W&B also rate-limits alerts by title on its side.

    >>> from lightning_gradguard import GradEvent
    >>> alert_title(GradEvent(7, "nonfinite", "net.0", float("nan"), float("inf"), ("skip",), "..."))
    'GradGuard: nonfinite gradients in net.0'
    >>> alert_title(GradEvent(7, "vanishing", "encoder.layers.11.self_attention.out_proj.lora_B",
    ...                       1e-9, 1e-5, ("alert",), "..."))
    'GradGuard: vanishing gradients in e.l.11.s.out_proj.lora_B~3245'
    >>> alert_title(GradEvent(9, "nonfinite", "net.0", float("nan"), float("inf"), ("skip", "alert", "stop"), "..."))
    'GradGuard stopped the run: nonfinite gradients in net.0'
    >>> alert_title(GradEvent(9, "exploding", "model.encoder.layers.11.self_attn.out_proj", 9.0, 1.0,
    ...                       ("rollback", "alert"), "...", optimizer=1))
    'GradGuard rolled back: exploding in 11.s.out_proj~07cf (opt 1)'

    A run stopped, raised or rolled back gets a title of its own (the server's per-title limit would
    drop it after the layer's first alert). Where the layer's name would not keep its block numbers,
    the head is shortened first (``stopped``, no ``gradients``).
    """
    n = getattr(event, "optimizer", 0)
    outcome = _outcome(event)
    what = "loss" if getattr(event, "reason", "") == "loss" else "gradients"  # a NaN loss, finite gradients
    forms = ((f"GradGuard{outcome}: {event.kind} {what}", f" (optimizer {n})" if n else ""),
             (f"GradGuard{outcome.replace(' the run', '')}: {event.kind}", f" (opt {n})" if n else ""))
    for head, opt in forms:
        if event.layer is None:
            title = f"{head} (global){opt}"
            if len(title) <= _TITLE_MAX or opt == forms[-1][1]:
                return title[:_TITLE_MAX]
            continue
        name = _shorten(event.layer, _TITLE_MAX - len(head) - len(" in ") - len(opt))
        # words cut to their first letter, none lost, the last one whole
        bare = name.rsplit("~", 1)[0] if name != event.layer else name
        last = event.layer.rsplit(".", 1)[-1]
        kept = bare.count(".") == event.layer.count(".") and bare.rsplit(".", 1)[-1] == last
        if kept or head == forms[-1][0]:
            return f"{head} in {name}{opt}"[:_TITLE_MAX]
    raise AssertionError("unreachable")


def _outcome(event: Any) -> str:
    """What the guard did to the run, in the title: the server would drop an alert whose title it
    saw within ``wait_duration`` (the first alert of that layer), and this one must get through."""
    actions = set(event.actions)
    if "raise" in actions or "stop" in actions:
        return " stopped the run"
    if "rollback" in actions:
        return " rolled back"
    return ""


def _shorten(name: str, room: int) -> str:
    """``name`` in ``room`` characters, its distinguishing parts kept: the words before the last one are
    cut to their first letter, left to right (block numbers stay), then the leading ones dropped, then the
    head cut off; a shortened name ends in ``~`` and 4 hex digits of the whole name's CRC, so two names
    never share a shortened form (``lora_A`` and ``lora_B`` both start with ``l``).

    >>> _shorten("encoder.layers.11.self_attention.out_proj.lora_B", 29)
    'e.l.11.s.out_proj.lora_B~3245'
    >>> _shorten("encoder.layers.11.self_attention.out_proj.lora_B", 16)
    '11.s.o.lora~3245'
    """
    if len(name) <= room:
        return name
    tag = f"~{zlib.crc32(name.encode()) & 0xFFFF:04x}"
    room -= len(tag)
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if not parts[i].isdigit():
            parts[i] = parts[i][:1]
        if len(".".join(parts)) <= room:
            return ".".join(parts) + tag
    # then the leading letters go, block numbers kept as long as possible
    while len(parts) > 1 and len(".".join(parts)) > room and not parts[0].isdigit():
        parts.pop(0)
    short = ".".join(parts)
    if len(short) > room:
        short = short[:room] if room > 0 else ""
    return short + tag


def _num(x: float) -> str:
    return f"{x:.4g}"


def alert_text(event: Any, suppressed: int = 0, window_s: float = 0.0) -> str:
    """The event's message, then one line per fact (kind, step, layer, value, threshold, actions).

    >>> from lightning_gradguard import GradEvent
    >>> e = GradEvent(7, "nonfinite", "net.0", float("nan"), float("inf"), ("skip", "alert"),
    ...               "step 7: non-finite gradients (NaN) in 1 layer: `net.0`; global norm nan -> skip, alert", "nan")
    >>> print(alert_text(e, suppressed=2, window_s=600))
    step 7: non-finite gradients (NaN) in 1 layer: `net.0`; global norm nan -> skip, alert
    <BLANKLINE>
    kind: nonfinite (nan)
    step: 7
    layer: net.0
    value: nan
    threshold: inf
    actions: skip, alert
    (2 more alerts like this one were held back in the last 600 s)
    """
    reason = f" ({event.reason})" if getattr(event, "reason", "") else ""
    lines = [
        event.message,
        "",
        f"kind: {event.kind}{reason}",
        f"step: {event.step}",
        f"layer: {event.layer if event.layer is not None else 'global'}",
    ]
    others = [name for name in getattr(event, "layers", ()) if name != event.layer]
    if others:
        lines.append(f"also: {', '.join(others[:10])}{' ...' if len(others) > 10 else ''}")
    lines += [
        f"value: {_num(event.value)}",
        f"threshold: {_num(event.threshold)}",
        f"actions: {', '.join(event.actions) or 'none'}",
    ]
    if getattr(event, "optimizer", 0):
        lines.append(f"optimizer: {event.optimizer}")
    if suppressed:
        lines.append(f"({suppressed} more alert{'s' if suppressed > 1 else ''} like this one were held back "
                     f"in the last {window_s:g} s)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- the sink
class WandbSink(GuardSink):
    """Alerts, gradient-flow pictures, optional gradient histograms and the run summary, on the Trainer's W&B run.

    Added automatically by ``GradGuard`` (with these defaults) when a
    ``WandbLogger`` is attached or a ``wandb.run`` is active; pass your own
    instance in ``GradGuard(sinks=[WandbSink(...)])`` to change them. Rank 0 only.

    Alerts: every event whose responses include ``"alert"`` calls
    ``run.alert`` with a title under 64 characters naming kind and layer
    (:func:`alert_title`), a text with the event's message and one line per
    fact (:func:`alert_text`), level ``ERROR`` for non-finite gradients and for
    events that stopped, raised or rolled back, else ``WARN``.

    Logged to W&B (at the Trainer's ``trainer/global_step``):

    - ``<prefix>flow``: heatmap of log10 gradient norms, layers x steps, NaN/Inf
      cells red, events marked (:func:`~lightning_gradguard.pictures.heatmap_figure`);
      every ``pictures_every_n_steps`` and at the end of fit.
    - ``<prefix>norms``: bar chart of the latest per-layer norms, same cadence.
    - ``<prefix>hist/<layer>``: ``wandb.Histogram`` of the layer's gradient values,
      for ``histogram_layers``, every ``histogram_every_n_steps``.

    With several optimizers the keys get ``opt<i>/`` after the prefix, as the
    guard's metrics do. At the end of fit, :meth:`GradGuard.summary` goes to
    ``run.summary`` as ``<prefix><key>`` (``<prefix>events/<kind>``,
    ``<prefix>worst_layer``, ``<prefix>clipped_fraction``,
    ``<prefix>skipped_fraction``, ``<prefix>lr_scale``, ...), with
    ``<prefix>alerts_sent`` and ``<prefix>alerts_suppressed`` (the alerts this
    sink held back: its window and ``max_alerts``; an event the guard's own
    ``alert_quiet_steps`` left without ``"alert"`` never reaches it, and counts
    only in ``<prefix>events/<kind>``).

    Args:
        alert_window_s: an alert for the same (kind, layer, optimizer) is sent at
            most once per this many seconds; the next one says how many were
            held back (the W&B client does no rate limiting itself; the W&B
            server is also told this window, per title).
        max_alerts: at most this many alerts per run; later events are still
            logged, counted and drawn.
        pictures: log the heatmap and the bar chart (needs matplotlib; without
            it pictures are switched off with one log message, alerts go on).
        pictures_every_n_steps: picture cadence in optimizer steps; ``None`` or
            ``0``: only at the end of fit.
        max_columns: steps kept per heatmap; longer runs fold neighbouring steps
            together (see :class:`~lightning_gradguard.pictures.FlowHistory`).
        histogram_layers: layer names (``fnmatch`` patterns such as ``"encoder.*"``
            allowed) whose gradient histograms are logged; ``None``: none. A pattern
            that matches no layer of the model warns once (at the first step).
        histogram_every_n_steps: histogram cadence in optimizer steps.
        histogram_bins: bins per histogram (1..512).
    """

    norms_as_list = True  # they go into a FlowHistory, which takes lists

    def __init__(
        self,
        alert_window_s: float = 600.0,
        max_alerts: int = 20,
        *,
        pictures: bool = True,
        pictures_every_n_steps: int | None = 500,
        max_columns: int = 256,
        histogram_layers: Sequence[str] | None = None,
        histogram_every_n_steps: int = 1000,
        histogram_bins: int = 64,
    ) -> None:
        if isinstance(alert_window_s, bool) or not isinstance(alert_window_s, numbers.Real) or not alert_window_s >= 0:
            raise ValueError(f"`alert_window_s` must be a number of seconds >= 0, got {alert_window_s!r}.")
        if isinstance(max_alerts, bool) or not isinstance(max_alerts, numbers.Integral) or max_alerts < 0:
            raise ValueError(f"`max_alerts` must be an integer >= 0, got {max_alerts!r}.")
        if isinstance(histogram_layers, str):
            raise ValueError(
                f"`histogram_layers` must be a sequence of layer names or patterns, got the string "
                f"{histogram_layers!r}; wrap it in a list: [{histogram_layers!r}]."
            )
        if histogram_layers is not None and (
            not isinstance(histogram_layers, (list, tuple, set, frozenset))
            or not all(isinstance(n, str) for n in histogram_layers)
        ):
            raise ValueError(f"`histogram_layers` must be a list of layer names or patterns (strings), "
                             f"got {histogram_layers!r}.")
        if not isinstance(pictures, bool):
            raise ValueError(f"`pictures` must be True or False, got {pictures!r}.")
        if isinstance(histogram_every_n_steps, bool) or not isinstance(histogram_every_n_steps, numbers.Integral) \
                or histogram_every_n_steps < 1:
            raise ValueError(f"`histogram_every_n_steps` must be an integer >= 1, got {histogram_every_n_steps!r}.")
        if isinstance(histogram_bins, bool) or not isinstance(histogram_bins, numbers.Integral) \
                or not 1 <= histogram_bins <= MAX_HISTOGRAM_BINS:
            raise ValueError(
                f"`histogram_bins` must be an integer in 1..{MAX_HISTOGRAM_BINS} (wandb.Histogram's limit), "
                f"got {histogram_bins!r}."
            )
        self.alert_window_s = float(alert_window_s)
        self.max_alerts = int(max_alerts)
        self.pictures = bool(pictures)
        self.recorder = FlowRecorder(pictures_every_n_steps, max_columns, name="pictures_every_n_steps")
        self.histogram_layers = tuple(histogram_layers or ())
        self.histogram_every_n_steps = int(histogram_every_n_steps)
        self.histogram_bins = int(histogram_bins)
        self.run: Any = None
        self.alerts_sent = 0
        self.alerts_suppressed = 0
        self._stop_sent = False
        self._prefix = ""  # the WandbLogger's own key prefix, joined (see setup)
        self._last_alert: dict[tuple, float] = {}  # (kind, layer, optimizer) -> time of the last alert sent
        self._held_back: dict[tuple, int] = {}  # ... -> alerts suppressed since then
        self._hist_due: dict[int, bool] = {}
        self._hist_checked = False  # histogram_layers' patterns matched against the layers (see _check_patterns)
        self._steps: dict[int, int] = {}
        self._clock = time.monotonic  # tests replace it

    # ------------------------------------------------------------------ GuardSink
    def setup(self, guard, trainer) -> None:
        self.run = wandb_run(trainer)
        if getattr(self.run, "disabled", False):  # WANDB_MODE=disabled (a NoopRun): nothing to draw pictures for
            self.run = None
        # WandbLogger(prefix="train") puts "train-" before the keys it logs, the guard's scalars included: the
        # pictures, histograms and summary this sink writes itself get it too, so they sit beside them
        wandb_logger = _wandb_logger(trainer)
        prefix = getattr(wandb_logger, "_prefix", "") or ""
        self._prefix = f"{prefix}{getattr(wandb_logger, 'LOGGER_JOIN_CHAR', '-')}" if prefix else ""
        self.recorder.reset()
        self.alerts_sent = self.alerts_suppressed = 0
        self._stop_sent = False
        self._last_alert.clear()
        self._held_back.clear()
        self._hist_due.clear()
        self._hist_checked = False
        self._steps.clear()
        if self.run is None:
            log.warning("GradGuard: WandbSink found no W&B run (no WandbLogger, no active wandb.run, or wandb "
                        "missing); it will send nothing")
        elif self.pictures:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                log.info("GradGuard: matplotlib is not installed; W&B gradient pictures are off "
                         "(pip install 'lightning-gradguard[wandb]')")
                self.pictures = False

    def on_step(self, guard, trainer, *, optimizer, step, log_step, layers, norms, metrics) -> None:
        if self.run is None:
            return
        n = self._steps[optimizer] = self._steps.get(optimizer, 0) + 1
        if self.pictures and self.recorder.add(optimizer, step, log_step, layers, norms):
            self._log_pictures(guard, optimizer, log_step)
        if self.histogram_layers:
            if not self._hist_checked and len(self._steps) >= len(getattr(trainer, "optimizers", ())):
                self._check_patterns(guard, trainer)
            if n % self.histogram_every_n_steps == 0:
                self._hist_due[optimizer] = True
            if self._hist_due.get(optimizer):
                self._log_histograms(guard, optimizer, log_step)

    def on_event(self, guard, trainer, event) -> None:
        if self.run is None:
            return
        if self.pictures:
            self.recorder.add_event(event)
        if "alert" in event.actions:
            self._alert(event)

    def on_fit_end(self, guard, trainer, summary: dict) -> None:
        if self.run is None:
            return
        if self.pictures:
            for optimizer in self.recorder.unpublished():
                self._log_pictures(guard, optimizer, self.recorder.log_steps[optimizer])
        for key, value in summary.items():
            self.run.summary[f"{self._prefix}{guard.prefix}{key}"] = value if value is not None else "none"
        self.run.summary[f"{self._prefix}{guard.prefix}alerts_sent"] = self.alerts_sent
        self.run.summary[f"{self._prefix}{guard.prefix}alerts_suppressed"] = self.alerts_suppressed

    # ------------------------------------------------------------------ alerts
    def _alert(self, event) -> None:
        key = (event.kind, event.layer, getattr(event, "optimizer", 0), _outcome(event))
        now = self._clock()
        last = self._last_alert.get(key)
        # the run stopped or raised: told past max_alerts, once (a run stopped and still stepping, min_steps,
        # stops again every step: those go by the window); a rollback has its own window
        final = _outcome(event) == " stopped the run" and not self._stop_sent
        if not final and ((last is not None and now - last < self.alert_window_s)
                          or self.alerts_sent >= self.max_alerts):
            self.alerts_suppressed += 1
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return
        held = self._held_back.pop(key, 0)
        self._last_alert[key] = now
        self.alerts_sent += 1
        self._stop_sent = self._stop_sent or final
        self.run.alert(
            title=alert_title(event),
            text=alert_text(event, held, self.alert_window_s),
            level=alert_level(event),
            # the server's own per-title limit, kept in step with ours (0 would mean W&B's default minute)
            wait_duration=max(self.alert_window_s, 0.001),
        )

    # ------------------------------------------------------------------ pictures, histograms
    def _key(self, guard, optimizer: int, name: str) -> str:
        watch = getattr(guard, "_watches", {}).get(optimizer)
        if watch is not None and hasattr(guard, "_key"):
            return self._prefix + guard._key(watch, name)  # the same opt<i>/ convention as the guard's metrics
        return f"{self._prefix}{guard.prefix}{f'opt{optimizer}/' if optimizer else ''}{name}"

    def _log_pictures(self, guard, optimizer: int, log_step: int) -> None:
        import wandb

        try:
            history = self.recorder.histories[optimizer]
            flow = figure_to_array(heatmap_figure(history))
            bars = figure_to_array(norms_figure(history.layers, history.latest, step=history.latest_step))
        except Exception as err:  # noqa: BLE001 - a drawing problem must not switch the alerts off
            log.warning("GradGuard: drawing the gradient pictures failed (%r); W&B pictures are off", err)
            self.pictures = False
            return
        self.recorder.published(optimizer)
        first, latest = history.column_steps()[0][0], history.latest_step
        self.run.log({
            self._key(guard, optimizer, "flow"): wandb.Image(flow, caption=f"gradient flow, steps {first}-{latest}"),
            self._key(guard, optimizer, "norms"): wandb.Image(bars, caption=f"gradient norms at step {latest}"),
            "trainer/global_step": log_step,
        })

    def _check_patterns(self, guard, trainer) -> None:
        """Once every optimizer has stepped: a ``histogram_layers`` pattern that matches no layer of the model (a
        typo, another model's names) would draw nothing, without a word. Every layer of the model counts, the
        ones no optimizer holds yet too (a backbone ``BackboneFinetuning`` adds as a param group later)."""
        self._hist_checked = True
        layers = [name for watch in getattr(guard, "_watches", {}).values() for name in watch.plan.layers]
        module = getattr(trainer, "lightning_module", None)
        if module is not None:
            depth = getattr(guard, "group_depth", None)
            layers += [n for n in dict.fromkeys(layer_name(p, depth) for p, _ in module.named_parameters())
                       if n not in layers]
        unmatched = [p for p in self.histogram_layers if not any(fnmatch.fnmatchcase(n, p) for n in layers)]
        if unmatched:
            shown = ", ".join(layers[:8]) + (f", ... ({len(layers)} in all)" if len(layers) > 8 else "")
            log.warning("GradGuard: WandbSink(histogram_layers=...): %s match%s no layer, so no histogram is drawn "
                        "for %s. The layers are: %s", ", ".join(repr(p) for p in unmatched),
                        "es" if len(unmatched) == 1 else "", "it" if len(unmatched) == 1 else "them", shown)

    def _log_histograms(self, guard, optimizer: int, log_step: int) -> None:
        watch = getattr(guard, "_watches", {}).get(optimizer)
        if watch is None:
            return
        plan = watch.plan
        chosen = [i for i, name in enumerate(plan.layers)
                  if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.histogram_layers)]
        if not chosen:
            self._hist_due[optimizer] = False
            return
        if not any(p.grad is not None for p in plan.params):
            return  # a skipped step left no gradients: try again at the next step
        self._hist_due[optimizer] = False
        hists = grad_histograms(plan.params, plan.layer_of_param, chosen, bins=self.histogram_bins)
        if not hists:
            return
        import wandb

        row: dict[str, Any] = {
            self._key(guard, optimizer, f"hist/{plan.layers[i]}"): wandb.Histogram(np_histogram=(counts, edges))
            for i, (counts, edges) in hists.items()
        }
        row["trainer/global_step"] = log_step
        self.run.log(row)
