"""``GradGuard``: the Lightning callback. A thin adapter over stats, detectors and actions.

Data flows one way, once per optimizer step, in ``on_before_optimizer_step``
(after accumulation, the DDP all-reduce and AMP unscaling, before the Trainer's
own clipping)::

    gradients -> layer_sums (device: one foreach norm pass, one index_add)
              -> ONE host sync (a few floats per layer, plus the last step's loss)
              -> TrendDetector, LossTrend (host, float64) -> events
              -> actions (clip / skip / reduce_lr / rollback / stop / raise)
              -> sinks (Lightning loggers, Python logging)

Only the gradient read stays on the device: everything after it is decided on
a few floats per layer, and the host needs those anyway (events, responses and
logging are host work), so they are copied once and the decisions are made
there. On the device each of the detector's ~100 tiny operations would cost a
kernel launch (on a CPU device, the dispatcher's overhead) for no gain.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_gradguard.actions import DeviceVerdict, LRScale, Snapshots, clip_, skip_
from lightning_gradguard.config import check_choice, check_number, check_responses, check_stop, unused_settings
from lightning_gradguard.detectors import REPORT_ROWS, Code, DetectorConfig, LossTrend, Row, TrendDetector
from lightning_gradguard.events import KINDS, GradEvent, GradientHealthError, Response
from lightning_gradguard.sinks import GuardSink
from lightning_gradguard.stats import (
    _PYTHON_MAX_TENSORS,
    LayerPlan,
    LayerSums,
    PackedRead,
    _tensor_norms,
    _to_device,
    layer_series,
    layer_series_lists,
    layer_sums,
    local_shards,
    read_tensors,
)
from lightning_gradguard.writes import SharedWrite

__all__ = ["GradGuard"]

log = logging.getLogger("lightning_gradguard")

Responses = Response | Sequence[Response]


_COUNTS = ("steps", "clipped", "skipped", "amp_overflows", "lr_reductions", "rollbacks")


@dataclass
class _Watch:
    """Everything the guard keeps for one optimizer."""

    index: int
    plan: LayerPlan
    detector: TrendDetector
    optimizer: weakref.ref  # the optimizer object watched (a replaced one is re-watched)
    param_groups: int  # its number of param groups when the plan was made (add_param_group adds one)
    device: torch.device  # where the gradients live
    lr_scale: LRScale | None = None
    snapshots: Snapshots | None = None
    shape: tuple = ()  # the optimizer's class and param group sizes: whose state the snapshots hold
    # host-side latches: last step each (code bit, series) fired, for one event per incident
    last_fired: dict[int, np.ndarray] = field(default_factory=dict)
    overflow_streak: int = 0
    rollbacks_in_a_row: int = 0
    bad_streak: int = 0  # consecutive steps flagged exploding / non-finite
    skip_streak: int = 0  # consecutive steps skipped
    rollback_lr_ratio: float | None = None  # effective LR of the restored snapshot / effective LR before
    anchor: np.ndarray | None = None  # per-series clip limit pinned during a growth incident (inf: none)
    anchor_until: np.ndarray | None = None
    anchor_since: int | None = 0  # step the current anchors were set (long-hold warning; None: since a resume)
    anchor_first: np.ndarray | None = None  # each anchor as set (the floor it is tightened back to)
    anchor_warned: bool = False
    last_lr_change: int = -(10**9)
    healthy_since: int = 0
    group_index: Tensor | None = None  # param group of each plan parameter (for update ratios, sharded)
    host_group_index: np.ndarray | None = None  # the same, on the host
    keys: dict = field(default_factory=dict)  # logged key of each metric name (see GradGuard._key)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    present: Any = None  # the last step's "has gradients" by series (a shared list or array: read only)
    absent: list[int] | None = None  # steps in a row each series had no gradient (None: all had one)
    cut_reported: set[int] = field(default_factory=set)  # series reported by the no_grad rule in this run of steps
    # after a resume: the layers (series) with gradients at the checkpoint's last step not seen since,
    # and the steps watched for them (see GradGuard._check_resumed)
    missing_since_resume: set[int] | None = None
    steps_since_resume: int = 0
    # sync="deferred": the device half of the last step, its host copy on the way (see GradGuard._deferred_step);
    # the clip limit by series the host last derived, for the device's next decision; the optimizer's verdict
    in_flight: _InFlight | None = None
    limits: np.ndarray | None = None
    verdict: DeviceVerdict | None = None

    def series_name(self, i: int) -> str | None:
        return None if i == 0 else self.plan.layers[i - 1]


@dataclass
class _InFlight:
    """One step of ``sync="deferred"``: launched on the device, read by the host one step later."""

    info: _StepInfo
    read: PackedRead
    host: Tensor  # the packed read + the device's decision, copied to (pinned) host memory without waiting
    ready: Any  # a CUDA event recorded after the copy (None off CUDA: the copy is done)
    layout: tuple[int, int, int]  # (losses, loss scale (0/1), tensor LRs) at the end of the read's extras
    lrs: tuple[list, float]  # each param group's LR at the step, and the LR scale missing from it then
    lr_scale: float | None  # the guard's LR scale at the step


@dataclass(frozen=True)
class _StepInfo:
    step: int  # trainer.global_step
    log_step: int  # the step Lightning logs its own metrics at
    is_log_step: bool
    detail_step: bool  # max |g| read
    param_step: bool  # weight norms read
    slack: float = 0.0  # log10 headroom of the spike thresholds: a batch smaller than usual (see _step_slack)


class GradGuard(Callback):
    r"""Watch gradient health every optimizer step; detect, respond, log.

    Add it to any Trainer: ``Trainer(callbacks=[GradGuard()])``. With no
    arguments it skips steps with NaN/Inf gradients (so they never reach the
    weights), clips exploding gradients to an adaptive threshold, and warns
    about all three conditions.

    Args:
        on_nonfinite: response(s) to NaN/Inf gradients: a name or a sequence of
            names from ``"log"``, ``"alert"``, ``"skip"``, ``"reduce_lr"``,
            ``"rollback"``, ``"stop"``, ``"raise"`` (under ``sync="step"``,
            ``"stop"`` only together with ``"skip"`` or ``"rollback"``: the stop
            comes after the step).
        on_exploding: response(s) to a spike, sustained growth or a ceiling:
            any of the above or ``"clip"``.
        on_vanishing: response(s) to vanishing/dead layers: ``"log"``,
            ``"alert"``, ``"stop"``, ``"raise"``.
        log_every_n_steps: cadence of metric logging; ``None`` follows
            ``Trainer(log_every_n_steps=...)``. Steps with events are always logged.
        log_layers: per-layer metrics: ``"all"`` layers, ``"topk"`` (the
            ``top_k`` largest and ``top_k`` smallest norms at each logged step),
            or ``"none"``.
        top_k: see ``log_layers``.
        group_depth: a layer is the module owning the parameters
            (``encoder.layers.0.linear1``); with ``group_depth=3`` layers are
            grouped by their first three name components (``encoder.layers.0``),
            for models with thousands of tensors.
        detail_every_n_steps: cadence of the statistics that cost an extra
            pass over gradients or weights: max ``|g|``, weight norms and
            update-to-weight ratios. ``None`` (default): every 50 steps, or
            every logged step if logging is rarer; ``0`` never. They are only
            logged, so they are read at the first logged step at or after each
            multiple of this cadence. (Weight norms and update ratios are also
            measured, and then logged at logged steps, during the first
            ``warmup_steps`` steps for ``max_grad_weight_ratio`` and every step
            with ``max_update_ratio``.)
        warmup_steps: steps before the running level is trusted for spikes
            (before it, a spike is a norm ``warmup_spike_ratio`` x the largest seen).
        spike_zscore: a spike is this many robust deviations above the running
            level (log10 space)...
        spike_min_ratio: ...and at least this many times the level.
        warmup_spike_ratio: see ``warmup_steps``.
        growth_window: sustained growth is judged over this many steps...
        growth_factor: ...and is reported when the running level grew this many
            times within it.
        growth_min_steps: growth is judged from this many steps on (over the
            steps seen so far while fewer than ``growth_window``).
        max_norm: optional absolute ceiling on the global norm (exploding, and
            the clip threshold never exceeds it).
        max_update_ratio: optional ceiling on any layer's update-to-weight
            ratio ``lr * |g| / |w|`` (computes weight norms every step).
        max_grad_weight_ratio: exploding when the global gradient norm is this
            many times the global weight norm (healthy: ~0.01-2). Needs no
            history, so it covers the first steps (bad init); checked every
            step during the warm-up and whenever weight norms are computed.
            ``None`` disables it.
        vanish_factor: a layer this many times below the median layer's norm...
        vanish_drop: ...or this many times below its own peak...
        vanish_floor: ...or at or below this absolute norm (``0``: only all-zero,
            dead, gradients)...
        vanish_patience: ...for this many steps in a row is vanishing, unless
            the loss has converged (see ``converged_loss_ratio``).
        converged_loss_ratio: the loss counts as converged, and small gradients
            as expected, once its running level is below this fraction of its
            initial level. Read from ``training_step``'s returned loss.
        amp_overflow_patience: under a fp16 GradScaler, overflow steps are
            normal (the scaler skips them); only this many in a row is reported.
        max_consecutive_skips: after this many skipped steps in a row the
            weights are evidently broken and skipping cannot help: the guard
            stops the run (gracefully, reason logged). ``None``: skip forever.
        alert_quiet_steps: an alert for the same (kind, reason, layer) is
            repeated at most once per this many steps; events in between are
            still recorded and logged.
        lr_factor: ``"reduce_lr"`` multiplies the learning rate by this...
        lr_cooldown: ...at most once per this many steps (except right after a
            rollback: retrying at the same LR would fail the same way)...
        lr_min_scale: ...down to this fraction of the schedule's value.
        lr_recover_after: if set, after this many healthy steps the scale is
            divided by ``lr_factor`` again (gradually, back up to 1).
        rollback_every: ``"rollback"`` takes a snapshot every this many steps, each at the
            first step at or after a multiple of it that is ``rollback_margin`` healthy steps
            past the last bad one (and at the first healthy step that has none: the start, a
            resume, a new param group)...
        rollback_keep: ...keeps this many (host memory: ``rollback_keep`` x
            (weights + optimizer state))...
        rollback_margin: ...restores the newest one at least this many steps
            older than the event (the damage often precedes the symptom)...
            A lone bad step is only skipped (its gradient never reached the
            weights: nothing to undo); a second one in a row, sustained growth
            or a gradient/weight-ratio alarm means damage and rolls back. With
            ``"reduce_lr"``, a rollback also brings the effective LR back to at
            most what the restored snapshot trained with (undoing an LR jump).
            Where nothing is old enough to restore, the step is skipped instead...
        max_rollbacks: ...and stops training after this many rollbacks in a
            row that did not help (the step that finds them exhausted is skipped).
        prefix: prefix of every logged key.
        sinks: extra :class:`~lightning_gradguard.sinks.GuardSink` objects that
            receive every step's norms, the logged metrics, events and the end
            of fit (rank 0 only).
        wandb: W&B alerts, pictures and run summary: ``None`` (default) adds
            them when a ``WandbLogger`` is attached or a ``wandb.run`` is
            active and ``wandb`` imports; ``False`` never; ``True`` requires it.
        record: write the run record (``gradguard.jsonl``: per-step norms,
            events, summary) that the ``gradguard`` command reads: ``True``
            into the Trainer's log folder, or a file/folder path; ``None`` off.
        sync: when the host reads the step's statistics. ``"step"`` (default):
            once per step, before the optimizer step (one host sync: the GPU's
            queue drains there). ``"deferred"``: no host sync; the host waits at
            most for the copy of the step before, long complete by then. The
            skip and the clip are decided on the device, against the limits the
            host derived from the steps before, and handed to the optimizer's
            own kernel (``found_inf``, ``grad_scale``); the host reads each
            step's statistics one step later. Detection,
            events and logging are those of ``"step"`` (events keep their step),
            the other responses come one step late. Needs a fused optimizer
            (``torch.optim.AdamW(..., fused=True)``; also ``Adam``, ``SGD``,
            ``Adagrad``) to skip NaN/Inf steps, and is refused with a fp16
            GradScaler, under sharded strategies and with ``"rollback"``.

    Logged keys (through ``trainer.loggers``, at the step Lightning logs its own
    metrics; with several optimizers every key gets ``opt<i>/`` after the prefix):

    - ``grad/norm_total``: global L2 norm of the gradients the optimizer is
      about to apply (before any clipping), every logged step.
    - ``grad/norm/<layer>``: per-layer L2 norm (subject to ``log_layers``).
    - ``grad/max_abs/<layer>``, ``grad/max_abs_total``: largest ``|g|``, at
      ``detail_every_n_steps``.
    - ``grad/param_norm/<layer>``, ``grad/update_ratio/<layer>``: weight norm
      and ``lr * |g| / |w|``, at ``detail_every_n_steps``.
    - ``grad/nonfinite_layers``: layers holding NaN/Inf this step.
    - ``grad/events/<kind>``: events so far, per kind.
    - ``grad/clip_coef``, ``grad/norm_clipped``: coefficient applied this step
      (the smallest factor any gradient was multiplied by) and the global norm
      after clipping (``"clip"`` configured).
    - ``grad/clipped_steps``, ``grad/skipped_steps``: steps so far.
    - ``grad/lr_scale``, ``grad/lr``: the guard's LR multiplier and the
      effective LR of the first param group (``"reduce_lr"`` configured).
    - ``grad/rollbacks``: rollbacks so far (``"rollback"`` configured).
    - ``grad/amp_overflows``: fp16 GradScaler overflow steps so far.

    On W&B (``WandbSink``, added automatically with a ``WandbLogger``) also the
    images ``grad/flow`` (layers x steps heatmap) and ``grad/norms`` (latest
    per-layer norms), optional ``grad/hist/<layer>`` histograms, alerts, and
    the run summary.

    Attributes:
        events: list of :class:`~lightning_gradguard.GradEvent`, oldest first.
    """

    def __init__(
        self,
        on_nonfinite: Responses = ("skip", "alert"),
        on_exploding: Responses = ("clip", "alert"),
        on_vanishing: Responses = "alert",
        *,
        log_every_n_steps: int | None = None,
        log_layers: Literal["all", "topk", "none"] = "topk",
        top_k: int = 5,
        group_depth: int | None = None,
        detail_every_n_steps: int | None = None,
        warmup_steps: int = 10,
        spike_zscore: float = 6.0,
        spike_min_ratio: float = 4.0,
        warmup_spike_ratio: float = 100.0,
        growth_window: int = 50,
        growth_factor: float = 10.0,
        growth_min_steps: int = 5,
        max_norm: float | None = None,
        max_update_ratio: float | None = None,
        max_grad_weight_ratio: float | None = 20.0,
        vanish_factor: float = 1e4,
        vanish_drop: float = 1e3,
        vanish_floor: float = 0.0,
        vanish_patience: int = 50,
        converged_loss_ratio: float = 0.01,
        amp_overflow_patience: int = 20,
        max_consecutive_skips: int | None = 25,
        alert_quiet_steps: int = 100,
        lr_factor: float = 0.5,
        lr_cooldown: int = 50,
        lr_min_scale: float = 1e-3,
        lr_recover_after: int | None = None,
        rollback_every: int = 50,
        rollback_keep: int = 2,
        rollback_margin: int = 10,
        max_rollbacks: int = 3,
        prefix: str = "grad/",
        sinks: Sequence[GuardSink] | None = None,
        wandb: bool | None = None,
        record: bool | str | None = None,
        sync: Literal["step", "deferred"] = "step",
    ) -> None:
        super().__init__()
        self.on_nonfinite = check_responses("on_nonfinite", "nonfinite", on_nonfinite)
        self.on_exploding = check_responses("on_exploding", "exploding", on_exploding)
        self.on_vanishing = check_responses("on_vanishing", "vanishing", on_vanishing)
        self.sync = check_choice("sync", sync, ("step", "deferred"))
        if sync == "step":
            check_stop("on_nonfinite", on_nonfinite, self.on_nonfinite)
        if sync == "deferred" and "rollback" in self.on_nonfinite + self.on_exploding:
            raise ValueError(
                "`sync='deferred'` cannot be combined with the 'rollback' response: the host learns of a bad step "
                "one step late, after the next update. Use sync='step' with 'rollback', or 'skip' / 'reduce_lr' "
                "with sync='deferred'."
            )
        self.log_every_n_steps = check_number("log_every_n_steps", log_every_n_steps, low=1, integer=True, optional=True)
        self.log_layers = check_choice("log_layers", log_layers, ("all", "topk", "none"))
        self.top_k = check_number("top_k", top_k, low=1, integer=True)
        self.group_depth = check_number("group_depth", group_depth, low=1, integer=True, optional=True)
        self.detail_every_n_steps = check_number(
            "detail_every_n_steps", detail_every_n_steps, low=0, integer=True, optional=True
        )
        positive = dict(low=0, low_open=True)
        above_one = dict(low=1, low_open=True)
        self.config = DetectorConfig(
            warmup_steps=check_number("warmup_steps", warmup_steps, low=1, integer=True),
            spike_zscore=check_number("spike_zscore", spike_zscore, **positive),
            spike_min_ratio=check_number("spike_min_ratio", spike_min_ratio, **above_one),
            warmup_spike_ratio=check_number("warmup_spike_ratio", warmup_spike_ratio, **above_one),
            # the bound: the ring of past levels is growth_window x (layers + 1) floats
            growth_window=check_number("growth_window", growth_window, low=2, high=10_000, integer=True),
            growth_factor=check_number("growth_factor", growth_factor, **above_one),
            growth_min_steps=check_number(
                "growth_min_steps", growth_min_steps, low=1, high=growth_window, integer=True,
                hint="It cannot exceed `growth_window`.",
            ),
            max_norm=check_number("max_norm", max_norm, optional=True, **positive),
            max_update_ratio=check_number("max_update_ratio", max_update_ratio, optional=True, **positive),
            max_grad_weight_ratio=check_number(
                "max_grad_weight_ratio", max_grad_weight_ratio, optional=True, **positive
            ),
            vanish_factor=check_number("vanish_factor", vanish_factor, **above_one),
            vanish_drop=check_number("vanish_drop", vanish_drop, **above_one),
            vanish_floor=check_number("vanish_floor", vanish_floor, low=0),
            vanish_patience=check_number("vanish_patience", vanish_patience, low=1, integer=True),
        )
        self.converged_loss_ratio = check_number("converged_loss_ratio", converged_loss_ratio, high=1, **positive)
        self.amp_overflow_patience = check_number("amp_overflow_patience", amp_overflow_patience, low=1, integer=True)
        self.max_consecutive_skips = check_number(
            "max_consecutive_skips", max_consecutive_skips, low=1, integer=True, optional=True
        )
        self.alert_quiet_steps = check_number("alert_quiet_steps", alert_quiet_steps, low=0, integer=True)
        self.lr_factor = check_number("lr_factor", lr_factor, low=0, low_open=True, high=1)
        if self.lr_factor == 1:
            raise ValueError("`lr_factor` must be below 1 to reduce the learning rate, got 1.")
        self.lr_cooldown = check_number("lr_cooldown", lr_cooldown, low=0, integer=True)
        self.lr_min_scale = check_number("lr_min_scale", lr_min_scale, high=1, **positive)
        if self.lr_min_scale == 1:
            raise ValueError("`lr_min_scale` must be below 1, got 1: 'reduce_lr' could not reduce the learning rate.")
        self.lr_recover_after = check_number("lr_recover_after", lr_recover_after, low=1, integer=True, optional=True)
        self.rollback_every = check_number("rollback_every", rollback_every, low=1, integer=True)
        # each snapshot is a host copy of the weights and the optimizer state
        self.rollback_keep = check_number("rollback_keep", rollback_keep, low=1, high=100, integer=True)
        self.rollback_margin = check_number("rollback_margin", rollback_margin, low=0, integer=True)
        self.max_rollbacks = check_number("max_rollbacks", max_rollbacks, low=1, integer=True)
        if "rollback" in self.on_nonfinite + self.on_exploding:
            # in steady training, a rollback finds the kept snapshots (one per rollback_every, the last
            # rollback_keep; none taken at a bad step) 1 + every x (keep - 1) (one at its first flagged step:
            # growth) to every x keep + 1 steps old (one at the second bad step in a row, the first took none)
            low = 1 + self.rollback_every * (self.rollback_keep - 1)
            high = self.rollback_every * self.rollback_keep + 1
            if low < self.rollback_margin:
                reach = (f"never `rollback_margin={self.rollback_margin}` old: rollbacks find none and skip instead"
                         if high < self.rollback_margin else
                         f"so a rollback up to {self.rollback_margin - low} steps after a new snapshot finds none "
                         f"`rollback_margin={self.rollback_margin}` old and skips instead")
                warnings.warn(
                    f"GradGuard: with rollback_every={self.rollback_every} and rollback_keep={self.rollback_keep}, "
                    f"the oldest kept snapshot is {low} to {high} steps old at a rollback in steady training, "
                    f"{reach} (only the start's snapshot, and ones kept through a pause after bad steps, are "
                    f"older). rollback_every x (rollback_keep - 1) >= rollback_margin - 1 keeps one always in reach.",
                    UserWarning, stacklevel=2)
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"`prefix` must be a non-empty string such as 'grad/', got {prefix!r}.")
        if prefix[-1].isalnum():
            warnings.warn(f"GradGuard: `prefix={prefix!r}` runs into the key names ('{prefix}norm_total'). End it with "
                          f"'/' ({prefix + '/'!r}: a section of its own in W&B and TensorBoard) or '_'.", UserWarning,
                          stacklevel=2)
        self.prefix = prefix
        self._state_key: tuple[str | None, str] = (None, "")  # (prefix, key), see state_key
        if sinks is not None and not isinstance(sinks, (list, tuple)):
            raise ValueError(f"`sinks` must be a list of GuardSink instances, got {sinks!r}. Wrap a single one: "
                             "sinks=[sink].")
        sinks = list(sinks or [])
        for sink in sinks:
            if not isinstance(sink, GuardSink):
                raise ValueError(f"`sinks` must hold GuardSink instances, got {sink!r}. Subclass lightning_gradguard.GuardSink.")
        if record is not None and record is not False:
            if not (record is True or isinstance(record, (str, os.PathLike))) or record == "":
                raise ValueError(f"`record` must be True (the log folder), a file or folder path, or None, "
                                 f"got {record!r}.")
            from lightning_gradguard.record import RecordSink

            if any(isinstance(sink, RecordSink) for sink in sinks):
                raise ValueError("`record` and a RecordSink in `sinks` would write the same run record twice; "
                                 "pass one of them (a RecordSink in `sinks` takes the options).")
            sinks.append(RecordSink(None if record is True else record))
        self.sinks: list[GuardSink] = sinks
        if wandb is not None and not isinstance(wandb, (bool, np.bool_)):  # not `in (None, True, False)`: 1 == True
            raise ValueError(f"`wandb` must be None (automatic), True or False, got {wandb!r}.")
        self.wandb = None if wandb is None else bool(wandb)
        defaults = {name: p.default for name, p in inspect.signature(GradGuard.__init__).parameters.items()}
        settings = {name: getattr(self, name) for name in ("lr_factor", "lr_cooldown", "lr_min_scale",
                    "lr_recover_after", "rollback_every", "rollback_keep", "rollback_margin", "max_rollbacks",
                    "max_consecutive_skips", "top_k")}
        responses = {"on_nonfinite": self.on_nonfinite, "on_exploding": self.on_exploding,
                     "on_vanishing": self.on_vanishing}
        for message in unused_settings(settings, defaults, responses, self.log_layers):
            warnings.warn(f"GradGuard: {message}", UserWarning, stacklevel=2)
        self._active_sinks: list[GuardSink] = []
        self._sinks_open = False  # set up for a fit, on_fit_end not called yet
        self._new_run()
        self._shared: dict[int, SharedWrite | None] = {}  # id(logger) -> its stand-in (see writes.py)
        self._callback_metrics: dict | None = None  # the Trainer's live dict, see on_train_start
        self._scaler: Any = None
        self._reduce = None  # cross-rank reduction of partial sums, for sharded strategies
        self._trainer: weakref.ref | None = None  # for the statistics still in flight at checkpoint time
        self._n_optimizers = 0  # the trainer's, at train start
        self._world_size = 1  # the trainer's, at setup
        self._skip_load = False  # see on_load_checkpoint
        self._module: weakref.ref | None = None
        self._late_error: GradientHealthError | None = None  # a "raise" found at checkpoint time, raised next hook
        self._late_stop = False  # a "stop" found at checkpoint time, set in the next hook

    def _new_run(self) -> None:
        """The state of one run (one Trainer's fits): made at construction, and again when the guard is
        fitted by another Trainer (a cross-validation loop reusing its callbacks)."""
        self.internal_errors = 0  # the guard's own failures (reported once each, never raised)
        self._reported_errors: set[tuple] = set()
        self._failed_loggers: set[int] = set()
        self.events: list[GradEvent] = []
        self._watches: dict[int, _Watch] = {}
        self._opt_index: dict[int, int] = {}  # id(optimizer) -> index in trainer.optimizers
        self._pending_state: dict[int, dict] = {}  # loaded before the optimizers exist
        self._lr_scales: dict[int, LRScale] = {}
        self._held_clip_val: float | None = None  # Trainer(gradient_clip_val) held back for a skipped step
        self._ddp_frozen: list[tuple[str, Tensor]] | None = None  # frozen when DDP wrapped the model (see on_train_start)
        self._event_counts = {"nonfinite": 0, "exploding": 0, "vanishing": 0}
        self._samples, self._samples_read = 0, False  # samples in the batches of the optimizer step in progress
        self._epoch_end = False  # one of them is the epoch's last (the only one that may be partial)
        self._slack = 0.0  # of the optimizer step in progress, once read
        self._usual_samples, self._small_steps = 0, 0  # see _step_slack
        self._last_alert: dict[tuple, int] = {}  # (optimizer, kind, reason, layer) -> step of its last alert
        # running loss level (the growth and vanishing gates), on the host; the losses of the steps
        # since the last optimizer step wait on the device and ride along with its one sync
        self._loss = LossTrend(self.config.warmup_steps, self.config.growth_window, self.converged_loss_ratio)
        self._pending_losses: list[Tensor] = []
        self._bad_losses: list[float] = []  # non-finite losses read since the last analysed step (see _loss_events)
        self._batches = 0  # training batches started (the losses' clock, see _loss_events)
        self._nonfinite_batch = -1  # the batch of the last step whose gradients held NaN/Inf
        self._read_batch = 0  # the batch of the last analysed step
        self._unwritten: list[tuple[int, dict[str, float]]] = []  # (log step, metrics) for the loggers

    # ------------------------------------------------------------------ Lightning hooks
    @property
    @override
    def state_key(self) -> str:
        # Lightning reads this on every hook call of every step (for its profiler's label): built once
        if self._state_key[0] != self.prefix:
            self._state_key = (self.prefix, self._generate_state_key(prefix=self.prefix))
        return self._state_key[1]

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._trainer is not None and self._trainer() is not trainer:
            # another Trainer (its global_step starts again at 0): a new run, not more of the last one. A
            # checkpoint it resumes from is loaded after this hook. The same Trainer fitting again goes on
            self._new_run()
        plugin = trainer.precision_plugin
        self._world_size = int(getattr(trainer, "world_size", 1) or 1)
        self._scaler = getattr(plugin, "scaler", None)
        self._late_error, self._late_stop = None, False  # of an earlier fit
        self._reduce = self._all_reduce(trainer)
        if stage != "fit":
            return
        if self.sync == "deferred" and (self._scaler is not None or self._reduce is not None):
            why = "a fp16 GradScaler (precision='16-mixed')" if self._scaler is not None else "a sharded strategy"
            raise ValueError(
                f"`sync='deferred'` does not work with {why}: it hands its own verdict to the optimizer's kernel, "
                f"which the GradScaler owns, and sharded ranks must agree on the host. Use sync='step' "
                f"(one host sync per step), or bf16-mixed / 32-true precision on a single device or DDP."
            )
        active = list(self.sinks)
        if self.wandb is not False:
            from lightning_gradguard.integrations.wandb import WandbSink, wandb_run  # imports no wandb itself

        if self.wandb is not False and not any(isinstance(s, WandbSink) for s in active):  # a subclass too
            if wandb_run(trainer) is not None:
                active.append(WandbSink())
            elif self.wandb and trainer.is_global_zero:
                raise ValueError(
                    "`wandb=True` but no W&B run was found: attach a `WandbLogger` to the Trainer "
                    "(or start `wandb.init()` before fit), or pass `wandb=None`."
                )
        self._active_sinks = active if trainer.is_global_zero else []
        self._sink_call("setup", trainer)
        self._sinks_open = True  # until their on_fit_end (see _end_sinks)
        self._shared = {id(logger): SharedWrite.attach(logger, self) for logger in trainer.loggers}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the dict behind `trainer.callback_metrics`, kept for the whole fit: reading the property
        # recomputes Lightning's own metrics (~35 us per logged step on the benchmark CPU)
        self._callback_metrics = trainer.callback_metrics
        # torch's DDP all-reduces only the parameters that required gradients when it wrapped the model:
        # one unfrozen later trains apart on every rank (see _check_ddp_unfrozen)
        ddp = isinstance(getattr(trainer.strategy, "model", None), torch.nn.parallel.DistributedDataParallel)
        self._ddp_frozen = [(n, p) for n, p in pl_module.named_parameters() if not p.requires_grad] or None if ddp else None
        # LR hooks go in before the first step: Lightning runs the training closure (and so this
        # guard's first look at an optimizer) inside optimizer.step, after its pre-hooks ran
        if "reduce_lr" in self.on_nonfinite + self.on_exploding:
            for index, optimizer in enumerate(trainer.optimizers):
                if index not in self._lr_scales:
                    scale = self._lr_scales[index] = LRScale(optimizer)
                    watch = self._watches.get(index)  # the same Trainer fitting again goes on with its scale
                    kept = watch.lr_scale.value if watch is not None and watch.lr_scale is not None else 1.0
                    scale.value = float(self._pending_state.get(index, {}).get("lr_scale", kept))
                    if watch is not None and watch.lr_scale is not None and watch.optimizer() is optimizer:
                        watch.lr_scale = scale  # the same optimizer object again: its old scale was unhooked
        if self.sync == "deferred" and self._skips_on_device:
            for index, optimizer in enumerate(trainer.optimizers):
                if not DeviceVerdict.supported(optimizer):
                    raise ValueError(
                        f"`sync='deferred'` skips a step on the device, through the optimizer's own kernel, which "
                        f"only torch's fused optimizers have: optimizer {index} is {type(optimizer).__name__} "
                        f"without it. Create it with fused=True (torch.optim.Adam, AdamW, SGD, Adagrad), or use "
                        f"sync='step', or drop 'skip' from on_nonfinite / on_exploding (NaN then reaches the weights)."
                    )
        elif (self.sync == "deferred" and "stop" in self.on_nonfinite and "skip" not in self.on_nonfinite
              and trainer.optimizers and all(DeviceVerdict.supported(o) for o in trainer.optimizers)):
            # taken at construction for optimizers that cannot skip on the device; these can
            raise ValueError(
                f"`on_nonfinite={self.on_nonfinite!r}` with sync='deferred': the stop comes a step late, after that "
                f"step's NaN/Inf update (and the next) reached the weights and a last checkpoint. The optimizers "
                f"are fused, so the device can skip the step: on_nonfinite={('skip', *self.on_nonfinite)!r}."
            )
        self._trainer = weakref.ref(trainer)
        self._module = weakref.ref(pl_module)
        # the optimizers' count decides the logged keys (opt<i>/) from the first step on: the first watch
        # is made before the second optimizer's first step
        self._n_optimizers = len(trainer.optimizers)

    @property
    def _skips_on_device(self) -> bool:
        """``sync="deferred"`` must be able to skip a step without the host: NaN/Inf or exploding "skip"."""
        return "skip" in self.on_nonfinite + self.on_exploding

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # a fit whose training loop never ran (limit_train_batches=0, max_steps=0): no
            self._end_sinks(trainer)  # on_train_end, but the record still gets its header and summary
        self._release_value_clipping(trainer)
        self._release_verdicts()
        self._release_lr_scales()
        self._callback_metrics = None
        self._detach_loggers(trainer)

    def _release_lr_scales(self) -> None:
        """Unhook the LR scales, leaving the user's optimizers as they were (the schedule's LRs in the groups,
        also when left from inside ``step()``); the scale values stay with the watches and in checkpoints."""
        for scale in self._lr_scales.values():
            scale.remove()
        self._lr_scales = {}

    def _release_verdicts(self) -> None:
        """``sync="deferred"``: forget the steps in flight, leave the user's optimizers as they were."""
        for watch in self._watches.values():
            watch.in_flight = None
            if watch.verdict is not None:
                watch.verdict.remove()
                watch.verdict = None

    def _detach_loggers(self, trainer: Trainer) -> None:
        self._write_metrics(trainer)
        for shared in self._shared.values():
            if shared is not None:
                shared.detach(self)  # leave the user's loggers as they were
        self._shared = {}

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._land_all(trainer, pl_module)  # sync="deferred": the last step's statistics (a late "raise" raises here)
        # on_train_end, not on_fit_end: Lightning finalizes the loggers in between
        self._write_metrics(trainer)
        self._end_sinks(trainer)

    def _end_sinks(self, trainer: Trainer) -> None:
        """The sinks' ``on_fit_end``, once per fit."""
        if self._sinks_open:
            self._sinks_open = False
            self._sink_call("on_fit_end", trainer, self.summary())

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a "raise" response (or any crash) still flushes metrics, summaries, pictures and records
        self._release_value_clipping(trainer)
        try:
            self._land_all(trainer, pl_module, quiet=True)  # sync="deferred": the step in flight is reported too
        except Exception:  # noqa: BLE001 - the user's exception is the one that matters here
            pass
        self._release_verdicts()
        self._release_lr_scales()  # Lightning's teardown hook does not run after an exception
        self._late_error = None
        self._detach_loggers(trainer)
        self._end_sinks(trainer)
        self._active_sinks = []

    def _sink_call(self, method: str, trainer: Trainer, *args, **kwargs) -> None:
        """Call ``method`` on every sink; a sink that fails is reported once and switched off."""
        for sink in list(self._active_sinks):
            self._call_sink(sink, method, trainer, *args, **kwargs)

    def _call_sink(self, sink: GuardSink, method: str, trainer: Trainer, *args, **kwargs) -> None:
        try:
            getattr(sink, method)(self, trainer, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - the guard's own failures never stop training
            self._active_sinks.remove(sink)
            log.warning("GradGuard: %s.%s failed (%r); that sink is switched off, training goes on",
                        type(sink).__name__, method, err)

    def _sink_step(self, trainer: Trainer, watch: _Watch, step: int, log_step: int, norms: np.ndarray | list,
                   metrics: dict | None) -> None:
        """``on_step`` of every sink: ``norms`` as a list to those that take one (see GuardSink.norms_as_list)."""
        array = norms if isinstance(norms, np.ndarray) else None
        for sink in list(self._active_sinks):
            if array is None and not sink.norms_as_list:
                array = np.array(norms, dtype=np.float64)
            self._call_sink(sink, "on_step", trainer, optimizer=watch.index, step=step, log_step=log_step,
                            layers=watch.plan.layers, norms=norms if sink.norms_as_list else array, metrics=metrics)

    def summary(self) -> dict[str, Any]:
        """Counts and facts about the run so far, for run summaries and reports.

        Keys: ``events/<kind>`` counts, ``steps``, ``clipped_fraction``,
        ``skipped_fraction``, ``rollbacks``, ``amp_overflows``, ``lr_scale``
        (of the first optimizer), ``worst_layer`` (the layer named by most
        events, or ``None``).
        """
        # a resumed run's optimizers not stepped yet: their state as loaded
        loaded = [w.get("counts", {}) for i, w in self._pending_state.items() if i not in self._watches]
        counts = {k: sum(w.counts[k] for w in self._watches.values()) + sum(int(c.get(k, 0)) for c in loaded)
                  for k in _COUNTS}
        steps = max(counts.get("steps", 0), 1)
        named = [e.layer for e in self.events if e.layer is not None]
        first = self._watches.get(0)
        lr_scale = (first.lr_scale.value if first.lr_scale is not None else 1.0) if first is not None else float(
            self._pending_state.get(0, {}).get("lr_scale", 1.0))
        return {
            **{f"events/{kind}": self._event_counts.get(kind, 0) for kind in KINDS},
            "steps": counts.get("steps", 0),
            "clipped_fraction": counts.get("clipped", 0) / steps,
            "skipped_fraction": counts.get("skipped", 0) / steps,
            "rollbacks": counts.get("rollbacks", 0),
            "amp_overflows": counts.get("amp_overflows", 0),
            "lr_scale": lr_scale,
            # ties go to the layer named first (deterministic, unlike set order)
            "worst_layer": max(dict.fromkeys(named), key=named.count) if named else None,
        }

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batches += 1
        if self._samples_read:  # the step they were read for is done (accumulation: they add up until then)
            self._samples, self._samples_read, self._epoch_end = 0, False, False
        self._samples += _batch_size(batch)
        # set by Lightning when it fetched the batch (None where unknown: taken as maybe)
        last = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None),
                       "is_last_batch", None)
        self._epoch_end = self._epoch_end or last is not False
        for shared in self._shared.values():
            if shared is not None and shared.queues.get(id(self)):  # Lightning wrote nothing at that step
                self._write_metrics(trainer)
                break

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._release_value_clipping(trainer)
        self._hand_over(trainer)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        # kept on the device (no sync here); read with the next step's statistics. Lightning hands
        # callbacks a copy under automatic optimization; a manual training_step returns the user's
        # own tensor, which may be changed in place (or reused by CUDA graphs) before then: copy it
        if loss.requires_grad:  # a manual training_step's own tensor
            loss = loss.detach()
        if loss.dim():
            loss = loss.reshape(())
        if loss.dtype != torch.float32 or not pl_module.automatic_optimization:
            loss = loss.to(torch.float32, copy=True)
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            # Lightning hands over the loss divided by the accumulation count (what backward saw): the trend
            # needs the loss itself, or a GradientAccumulationScheduler's change of the count is a jump of it
            loss = loss * trainer.accumulate_grad_batches  # one tiny op per batch, under accumulation only
        self._pending_losses.append(loss)
        if len(self._pending_losses) > 1024:  # batches without any optimizer step (a loop that never steps)
            del self._pending_losses[:512]

    def _flush_losses(self, values: Any = None) -> None:
        """Feed the pending losses to the loss trend: ``values`` read with the step's sync, or
        (``None``, at checkpoint time only) read here."""
        if values is None:
            values = torch.stack(self._pending_losses).cpu().tolist() if self._pending_losses else []  # sync: checkpoint time only
            self._pending_losses = []
        # (given ``values``, the pending losses are those of later steps: sync="deferred" reads a step late)
        for v in values:
            self._loss.observe(v)
            if not math.isfinite(v):
                self._bad_losses.append(v)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        try:
            self._guard_step(trainer, pl_module, optimizer)
        except GradientHealthError:
            raise  # the deliberate "raise" response
        except Exception as err:  # noqa: BLE001 - the guard's own failure must never stop training
            self._report_internal_error(trainer, err)
            self._fail_safe(trainer, optimizer)

    def _report_internal_error(self, trainer: Trainer, err: Exception) -> None:
        self.internal_errors += 1
        key = (type(err).__name__, str(err)[:200])
        if key not in self._reported_errors:
            self._reported_errors.add(key)
            log.warning("GradGuard: internal error at step %d, this step is not monitored; training goes on: %r",
                        trainer.global_step, err, exc_info=True)

    def _fail_safe(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        """After an internal error: where NaN/Inf protection was asked for (``"skip"`` or ``"rollback"``
        for ``nonfinite``), a step the guard could not analyse is still kept out of the weights if
        its gradients are not finite. One plain check, on error steps only (one sync).
        Not under sharded strategies: there each rank holds other gradients, the ranks would have
        to agree, and one collective entered by one rank alone would hang the others. Not under a
        fp16 GradScaler either: it skips such steps itself."""
        if not {"skip", "rollback"} & set(self.on_nonfinite) or self._reduce is not None or self._scaler is not None:
            return
        try:
            with torch.no_grad():
                grads = local_shards([p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
                flags = [torch.isfinite(g.coalesce()._values() if g.is_sparse else g).all() for g in grads]
                finite = not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())  # sync: error steps only
            if not finite:
                self._skip(trainer, optimizer)
                if trainer.is_global_zero:
                    log.warning("GradGuard: step %d has non-finite gradients; skipped despite the internal error",
                                trainer.global_step)
        except Exception:  # noqa: BLE001 - as above: never stop training
            pass

    def _guard_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        watch = self._watch(trainer, pl_module, optimizer)
        if self.sync == "deferred":
            self._deferred_step(trainer, pl_module, optimizer, watch)
            return
        self._one_sync_step(trainer, pl_module, optimizer, watch)

    def _one_sync_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer,
                       watch: _Watch) -> None:
        """Read the step with one host sync, then analyse it and respond."""
        info = self._step_info(trainer, watch)
        series = self._read(watch, optimizer, info.detail_step, info.param_step)
        if series is not None:
            self._analyse(trainer, pl_module, optimizer, watch, info, series)

    def _step_info(self, trainer: Trainer, watch: _Watch) -> _StepInfo:
        log_step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step Lightning logs its own metrics at
        every = self.log_every_n_steps or trainer.log_every_n_steps
        logging_on = bool(trainer.loggers) and every > 0  # Trainer(log_every_n_steps=0): no logging, steps with
        is_log_step = logging_on and (log_step + 1) % every == 0  # events aside; detection goes on
        detail_every = max(every, 50) if self.detail_every_n_steps is None else self.detail_every_n_steps
        # the details are only logged: read them at the first logged step at or after each multiple of
        # detail_every (one not a multiple of `every` would otherwise read them at steps never logged)
        detail_step = is_log_step and detail_every > 0 and (
            (log_step + 1) // detail_every != (log_step + 1 - every) // detail_every)
        # weight norms: for logging at the detail cadence, and every step where a check needs them
        param_step = detail_step or self.config.max_update_ratio is not None or (
            self.config.max_grad_weight_ratio is not None and watch.counts["steps"] < self.config.warmup_steps
        )
        return _StepInfo(trainer.global_step, log_step, is_log_step, detail_step, param_step, self._step_slack())

    def _step_slack(self) -> float:
        """The spike thresholds' headroom (log10) for this optimizer step: ``0.5 * log10(usual / samples)``
        where its batches hold fewer samples than usual (an epoch's partial last batch, ``drop_last=False``):
        the noise of a mean gradient grows as 1/sqrt(batch), and a 5-sample last batch of a 32-sample run
        measured up to 4.6x the level (the spike floor is 4x), full batches at most 2x. The usual size is
        the largest seen, or a smaller one that persisted for 50 steps (the batch size was changed). Only
        at an epoch's last batch: batches whose first dimension varies by design (time-major sequences of
        varying length, batches sized by tokens) keep their thresholds."""
        if self._samples_read:  # read already for this batch (sync="deferred" reads twice; two optimizers)
            return self._slack
        samples, self._samples_read, self._slack = self._samples, True, 0.0
        if samples <= 0 or self._world_size > 1:
            # no batch size found (a custom batch object); or several ranks: their gradients are averaged, and
            # each one's own batch size would let ranks that must agree judge the step by other thresholds
            return 0.0
        if samples >= self._usual_samples:
            self._usual_samples, self._small_steps = samples, 0
        else:
            self._small_steps += 1
            if self._small_steps >= 50:
                self._usual_samples, self._small_steps = samples, 0
            elif self._epoch_end:
                self._slack = 0.5 * math.log10(self._usual_samples / samples)
        return self._slack

    def _growth_gate(self) -> bool:
        """Growth counts only while the loss rises (norms also grow in healthy phases). Without a loss to read
        (manual optimization whose ``training_step`` returns nothing), or with several optimizers, whose players
        pull against each other (a GAN: whatever ``training_step`` returns rises in healthy training, and the
        generator's gradients grow as the discriminator learns), nothing says a growth is a divergence: the gate
        stays shut (it was open: a GAN's generator got 2-4 growth events early on and was clipped 10-80x for the
        rest of the run, its anchors never loosened). Spikes, NaN/Inf and the ceilings are still caught."""
        return self._n_optimizers <= 1 and bool(self._loss.worsening())

    def _analyse(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer,
                 watch: _Watch, info: _StepInfo, series: dict, applied: tuple[float, bool] | None = None,
                 flight: _InFlight | None = None) -> None:
        """The host half of a step: detection, events, responses, logging, sinks. ``applied``: under
        ``sync="deferred"``, the clip coefficient and skip the device already applied to that step
        (``flight``: the step as launched)."""
        step = info.step
        watch.present = series["present"]
        if self._ddp_frozen is not None:
            self._check_ddp_unfrozen(trainer)
        if watch.missing_since_resume is not None:
            self._check_resumed(trainer, watch)
        report = watch.detector.update(
            series["norm"], series["present"], series["nonfinite"],
            converged=self._loss.converged(),
            update_ratio=series.get("update_ratio"),
            worsening=self._growth_gate(),
            weight_norm=series.get("weight"),
            lists=True,
            slack=info.slack,
        )
        extra = [series[name][None] for name in ("max_abs", "weight") if name in series]
        cut_off = self._cut_off(watch, series["present"], step)
        if watch.detector.flags & Code.NONFINITE:  # (a GradScaler's overflow too: no event, but the loss's cause)
            self._nonfinite_batch = self._batches
        reports = self._loss_events(trainer, watch, step) if self._bad_losses else []
        self._read_batch = self._batches
        if isinstance(report, list) and not (extra or watch.detector.flags or watch.anchor is not None
                                             or info.is_log_step or cut_off or reports):
            # the usual healthy step of a small model: findings, responses and sinks need only the
            # norms; the report stays Python lists (no numpy call)
            host = None
        else:
            report = np.asarray(report, dtype=np.float64)
            host = np.concatenate([report, *extra]) if extra else report
        watch.counts["steps"] += 1

        events = self._findings(watch, host, step, weights_before=applied is None or applied[1]) + cut_off
        try:
            clip_coef, norm_clipped = self._respond(trainer, pl_module, optimizer, watch, host, events, step, applied)
        except Exception:
            self._unanswered(trainer, events + reports)
            raise  # reported as the guard's internal error, and the fail-safe still keeps NaN/Inf out
        events += reports  # reports only: kept out of the responses (and of the healthy-step bookkeeping)
        if self.sync == "deferred":  # a step read on the device or (a fallback) with one sync
            watch.limits = self._limits(watch)  # for the device's decision on the next step
        metrics = None
        if info.is_log_step or events:
            metrics = self._log(trainer, watch, host, series["present"], info.detail_step,
                                info.param_step and bool(trainer.loggers), clip_coef, norm_clipped, info.log_step,
                                flight)
        if self._active_sinks:
            self._sink_step(trainer, watch, step, info.log_step,
                            host[Row.NORM] if host is not None else report[Row.NORM], metrics)
            for event in events:
                self._sink_call("on_event", trainer, event)
        for event in events:
            if "raise" in event.actions:
                raise GradientHealthError(event.message, tuple(events))

    # ------------------------------------------------------------------ sync="deferred"
    def _deferred_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer,
                       watch: _Watch) -> None:
        """``sync="deferred"``: the host half of this optimizer's previous step (its statistics copied long
        since), then this step's device half: read, decide, hand the verdict to the optimizer, copy."""
        if self._late_error is not None:  # a "raise" found while a checkpoint was being saved
            error, self._late_error = self._late_error, None
            raise error
        if self._late_stop:  # a "stop" found while a checkpoint was being saved
            trainer.should_stop, self._late_stop = True, False
        if watch.in_flight is not None:
            try:
                self._land(trainer, pl_module, optimizer, watch)
            except GradientHealthError:
                raise  # the deliberate "raise" response, one step late
            except Exception as err:  # noqa: BLE001 - that step goes unread; this one is still guarded
                self._report_internal_error(trainer, err)
            if self._unwritten:
                # that step's metrics cannot ride along in Lightning's logger call of this step (another
                # step): written now, while the device runs this step, rather than in Lightning's call at
                # the end of the step, which on a GPU comes after its sync (a W&B call: ~0.3-0.7 ms)
                self._write_metrics(trainer)
        why = self._device_cannot_skip(optimizer)
        if why:
            # one host sync for this step (an optimizer replaced mid-run by one that is not fused is also
            # checked at the start; a momentum SGD before its first update)
            if ("sync", id(optimizer), why) not in self._reported_errors:
                self._reported_errors.add(("sync", id(optimizer), why))
                log.info("GradGuard: optimizer %d (%s) %s: sync='deferred' reads that step with one host sync",
                         watch.index, type(optimizer).__name__, why)
            self._one_sync_step(trainer, pl_module, optimizer, watch)
            return
        if watch.verdict is None or watch.verdict.optimizer is not optimizer:
            if watch.verdict is not None:
                watch.verdict.remove()
            watch.verdict = DeviceVerdict(optimizer) if DeviceVerdict.supported(optimizer) else None
        if watch.limits is None:  # the first step, or after a resume: the thresholds the detector holds
            watch.limits = self._limits(watch)
        info = self._step_info(trainer, watch)
        losses, self._pending_losses = self._pending_losses, []
        try:
            launched = self._read_on_device(watch, optimizer, info.detail_step, info.param_step, losses, None)
            if launched is not None:
                decision = self._decide_on_device(trainer, watch, optimizer, launched[0])
        except BaseException:
            self._pending_losses = losses + self._pending_losses
            raise
        if launched is None:
            self._pending_losses = losses
            return
        read, layout = launched
        packed = torch.cat([read.packed, decision])
        ready = None
        if packed.device.type == "cuda":
            stream = torch.cuda.current_stream(packed.device)
            packed = packed.to("cpu", non_blocking=True)  # into pinned host memory: queued, not waited for
            ready = torch.cuda.Event()
            ready.record(stream)
        # the LRs as at this step, for the update ratios and the logged LR (the schedule moves on meanwhile)
        lrs = ([g["lr"] for g in optimizer.param_groups], watch.lr_scale.pending if watch.lr_scale else 1.0)
        watch.in_flight = _InFlight(info, read, packed, ready, layout, lrs,
                                    watch.lr_scale.value if watch.lr_scale else None)

    def _device_cannot_skip(self, optimizer: torch.optim.Optimizer) -> str | None:
        """Why this step's skip cannot be left to the device (``None``: it can, or none is asked for)."""
        if not self._skips_on_device:
            return None
        if not DeviceVerdict.supported(optimizer):
            return "is not fused: it cannot skip a step on the device"
        if isinstance(optimizer, torch.optim.SGD) and any(
            g.get("momentum", 0) and any(p.grad is not None and "momentum_buffer" not in optimizer.state.get(p, {})
                                         for p in g["params"])
            for g in optimizer.param_groups
        ):
            # torch's fused SGD creates its momentum buffers uninitialised (torch.empty_like) and fills them
            # in the first update: skipped by found_inf, they would keep that garbage
            return "has momentum buffers to create in this update"
        return None

    def _decide_on_device(self, trainer: Trainer, watch: _Watch, optimizer: torch.optim.Optimizer,
                          read: PackedRead) -> Tensor:
        """This step's clip and skip, decided by device tensors and applied: through the fused optimizer's
        own kernel (``found_inf``, ``grad_scale``), else by one foreach multiply. The limits are the host's
        from the steps before (``watch.limits``), and ``max_grad_weight_ratio`` x this step's weight norm
        where it was read. As with ``sync="step"``, a global norm over its limit scales the step down to
        it; a layer over its own limit (the global norm not) scales the whole step down to that layer's
        limit, where ``sync="step"`` scales the layer alone (one factor: the fused kernel takes one).
        Returns ``[coefficient, skipped]`` (float32, on the device) for the host to record when it reads
        the step. No host sync: every limit is a host float passed as a kernel argument, or a host array
        copied from pinned memory without waiting."""
        n = len(read.positions)
        squares = read.packed[:n].square()
        total = squares.sum().sqrt()
        device = total.device
        limits = watch.limits
        slack = self._step_slack()
        if limits is not None and slack > 0:  # a batch smaller than usual: the thresholds it is judged by
            limits = self._limits(watch, slack)
        present = watch.plan.host_present(read.positions) if limits is not None else None
        if limits is not None and (watch.detector.admits(present) or watch.detector.returns(present)):
            # a layer's first gradient (an unfreeze, an expert's first token): the global series restarts
            # at this step, as with sync="step", and has no limit yet but max_norm. A layer back after a step
            # without one (an auxiliary head): the global norm's jump is no spike of it, as with sync="step"
            # (a layer over its own limit still scales the step)
            limits = limits.copy()
            limits[0] = math.inf if self.config.max_norm is None else self.config.max_norm
        clipping = "clip" in self.on_exploding
        coef = None
        if limits is not None:
            limit = float(limits[0])  # a host float: a kernel argument
            # float32 whatever torch's default dtype (the fused kernels take no other), so at most its max
            limit_t = torch.full((), min(limit, _F32_MAX), dtype=torch.float32, device=device) if math.isfinite(
                limit) else None
            if self.config.max_grad_weight_ratio is not None and "weight" in read.names:
                # no history needed (the first steps, a bad init): the weights' own scale, read with this step
                k = read.names.index("weight")
                bound = read.packed[k * n : (k + 1) * n].square().sum().sqrt() * self.config.max_grad_weight_ratio
                limit_t = bound if limit_t is None else torch.minimum(limit_t, bound)
            coef = torch.ones_like(total) if limit_t is None else torch.clamp(limit_t / total, max=1.0)
            layer = limits[1:]
            if np.isfinite(layer).any():
                index = watch.plan.index(None if n == len(watch.plan.params) else read.positions, device)
                layer_norm = squares.new_zeros(watch.plan.num_layers).index_add_(0, index, squares).sqrt()
                layer_limit = _to_device(torch.from_numpy(layer.astype(np.float32)), device)
                worst_layer = torch.clamp((layer_limit / layer_norm).amin(), max=1.0)
                coef = torch.where(coef < 1.0, coef, worst_layer)  # the global limit first, as sync="step"
            coef = coef.nan_to_num(nan=1.0)  # NaN gradients: the skip's business, not the clip's
        skip = ~torch.isfinite(total) if "skip" in self.on_nonfinite else torch.zeros((), dtype=torch.bool,
                                                                                          device=device)
        if coef is not None and "skip" in self.on_exploding:
            skip = skip | (coef < 1.0)
        if not clipping or coef is None:
            coef = torch.ones_like(total)
        verdict = watch.verdict
        if verdict is not None:
            # Lightning's own clipping (gradient_clip_val, under 32-true: Lightning refuses it with a fused
            # optimizer under AMP) runs after this hook on the gradients as they are: scale them first, so
            # that it measures what the optimizer will apply
            in_kernel = clipping and not trainer.gradient_clip_val
            verdict.set(found_inf=skip.float() if self._skips_on_device else None,
                        grad_scale=coef.clamp(min=1e-30).reciprocal() if in_kernel else None)
            if clipping and not in_kernel:
                clip_(watch.plan.params, coef)
        elif clipping:
            clip_(watch.plan.params, coef)
        return torch.stack([coef, skip.float()])

    def _land(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer,
              watch: _Watch) -> None:
        """The host half of the step in flight: its statistics, read one step late (see :meth:`_deferred_step`)."""
        flight, watch.in_flight = watch.in_flight, None
        if flight.ready is not None:
            # recorded a step ago: complete, unless the host runs more than a step ahead of the device; then
            # this wait is what bounds it, and the device still has this step's work queued (torch does not
            # count an event's synchronize as a sync in set_sync_debug_mode)
            flight.ready.synchronize()
        # host memory already (the pinned copy, or a CPU device): no sync. Another accelerator's (MPS) is
        # copied here: a sync, but a step late, when the device has long finished that step
        copy = flight.host.cpu()
        if self._as_lists(watch, flight.read):
            values, host = copy.tolist(), None  # host memory: no sync
            values, decision = values[:-2], values[-2:]
        else:
            values, host = None, copy.numpy()
            host, decision = host[:-2], host[-2:].tolist()  # numpy: no sync
        # the gradients of that step are gone: a float32 overflow of a sum of squares stays Inf (the device
        # took it for one and skipped the step)
        series = self._host_series(watch, optimizer, flight.read, flight.layout, values, host, [], flight.lrs,
                                   refine=False)
        self._analyse(trainer, pl_module, optimizer, watch, flight.info, series,
                      applied=(float(decision[0]), decision[1] > 0), flight=flight)

    def _land_all(self, trainer: Trainer, pl_module: LightningModule, quiet: bool = False) -> None:
        """Read every step still in flight (the end of training, a checkpoint). ``quiet``: a "raise" is
        kept for the next step's hook (or the end of training) instead of raised here."""
        if not quiet and self._late_error is not None:  # found at a checkpoint after the last step
            error, self._late_error = self._late_error, None
            raise error
        for watch in list(self._watches.values()):
            optimizer = watch.optimizer()
            if watch.in_flight is None:
                continue
            if optimizer is None:
                watch.in_flight = None
                continue
            try:
                self._land(trainer, pl_module, optimizer, watch)
            except GradientHealthError as error:
                if not quiet:
                    raise
                self._late_error = error
            except Exception as err:  # noqa: BLE001 - the guard's own failure must never stop training
                self._report_internal_error(trainer, err)

    def _read(self, watch: _Watch, optimizer: torch.optim.Optimizer, detail_step: bool, param_step: bool) -> dict | None:
        """Measure the step's gradients and copy them to the host: THE host sync of this step.

        The device does the gradient read and packs it, with the losses since the last step
        (and the loss scale, tensor LRs) into one vector: one device->host copy. Per-layer
        sums, ratios, detection, events, actions and logging all run on that host copy."""
        losses, self._pending_losses = self._pending_losses, []
        try:
            return self._read_and_copy(watch, optimizer, detail_step, param_step, losses)
        except BaseException:
            self._pending_losses = losses + self._pending_losses  # unless already read (then emptied): next step
            raise

    def _read_and_copy(self, watch, optimizer, detail_step: bool, param_step: bool, losses: list[Tensor]) -> dict | None:
        scale = self._unscaled_factor(optimizer)
        if self._reduce is not None:  # sharded gradients: per-layer partial sums, all-reduced on the device
            sums = layer_sums(watch.plan, max_abs=detail_step, param_norms=param_step,
                              lrs=self._lrs(watch, optimizer) if param_step else None, grad_scale=scale,
                              all_reduce=self._reduce)
            if sums is None:
                self._pending_losses = losses
                return None
            rows = [sums.grad_sq] + [
                r for r in (sums.present, sums.max_abs, sums.weight_sq, sums.update_sq) if isinstance(r, Tensor)
            ]
            if losses:
                rows.append(torch.stack([x.to(sums.grad_sq.device) for x in losses]))
            flat = torch.cat(rows).cpu().numpy()  # sync: the only one per step
            self._flush_losses(flat[len(flat) - len(losses) :].tolist() if losses else [])  # numpy: no sync
            losses.clear()  # read: an error after this point must not feed them twice
            return _host_series(watch.plan, sums, flat)

        launched = self._read_on_device(watch, optimizer, detail_step, param_step, losses, scale)
        if launched is None:
            self._pending_losses = losses
            return None
        read, layout = launched
        if self._as_lists(watch, read):
            values, host = read.packed.tolist(), None  # sync: the only one per step (one copy, to floats)
        else:
            values, host = None, read.packed.cpu().numpy()  # sync: the only one per step
        return self._host_series(watch, optimizer, read, layout, values, host, losses)

    def _read_on_device(self, watch: _Watch, optimizer: torch.optim.Optimizer, detail_step: bool, param_step: bool,
                        losses: list[Tensor], scale: Tensor | None) -> tuple[PackedRead, tuple[int, int, int]] | None:
        """The step's read, packed with the losses, the loss scale and tensor LRs into one device vector;
        with the layout of those extras (how many of each). ``None``: no gradient."""
        # LRs held as device tensors (capturable optimizers) ride along in the copy; see _host_lrs
        lr_tensors = [g["lr"] for g in optimizer.param_groups if _on_device(g["lr"])] if param_step else []
        extra = [x if x.device == watch.device else x.to(watch.device) for x in losses]  # .to(): ~13 us cold
        if scale is not None:
            extra.append(scale.to(watch.device, torch.float32).reshape(()))
        extra += [lr.to(watch.device, torch.float32).reshape(()) for lr in lr_tensors]
        read = read_tensors(watch.plan, max_abs=detail_step, param_norms=param_step, extra=extra)
        return None if read is None else (read, (len(losses), int(scale is not None), len(lr_tensors)))

    @staticmethod
    def _as_lists(watch: _Watch, read: PackedRead) -> bool:
        """The usual step of a small model: Python lists from the copy on, no numpy call (see layer_series_lists)."""
        return len(read.names) == 1 and not watch.detector.vectorized and len(read.positions) <= _PYTHON_MAX_TENSORS

    def _host_series(self, watch: _Watch, optimizer: torch.optim.Optimizer, read: PackedRead,
                     layout: tuple[int, int, int], values: list[float] | None, host: np.ndarray | None,
                     losses: list[Tensor], lrs: tuple[list, float] | None = None, refine: bool = True) -> dict:
        """The step's series from the host copy of its read (``values`` as floats, or ``host`` as numpy);
        feeds the losses it carried to the loss trend. ``lrs``: each param group's LR at the step and the
        LR scale missing from them (default: now). ``refine``: the gradients are still there to re-read
        a float32 overflow."""
        lists = values is not None
        n = len(read.positions)
        # NaN/Inf reach the sum; so does a float32 sum of squares that overflowed (entries ~1e19+).
        # Not under a GradScaler: its overflow steps hold real Infs, and it skips them itself
        if refine and self._scaler is None and not math.isfinite(sum(values[:n]) if lists else float(host[:n].sum())):  # host floats: no sync
            refined = _overflowed_norms(watch.plan, read.positions, values[:n] if lists else host[:n].tolist())  # numpy: no sync
            if lists:
                values[:n] = refined
            else:
                host[:n] = refined
        n_losses, n_scale, n_lrs = layout
        n_extra = n_losses + n_scale + n_lrs
        if not n_extra:
            tail = []
        else:
            tail = values[len(values) - n_extra :] if lists else host[len(host) - n_extra :].tolist()  # numpy: no sync
        self._flush_losses(tail[:n_losses])
        losses.clear()  # read: an error after this point must not feed them twice
        grad_scale = tail[n_losses] if n_scale else None
        if lists:
            grad = values[:n]
            if grad_scale is not None:
                grad = [g / grad_scale for g in grad]
            return layer_series_lists(watch.plan, read.positions, grad)
        param_lrs = None
        if "weight" in read.names:
            param_lrs = self._host_lrs(watch, optimizer, tail[len(tail) - n_lrs :], *(lrs or ()))
        return layer_series(watch.plan, read, host, lrs=param_lrs, grad_scale=grad_scale)

    def _host_lrs(self, watch: _Watch, optimizer: torch.optim.Optimizer, tensor_lrs: list[float],
                  group_lrs: list | None = None, factor: float | None = None) -> np.ndarray:
        """Each plan parameter's effective LR (host floats; tensor LRs read with the step's copy).
        ``group_lrs``: each param group's ``lr`` as it was at the step, and ``factor`` the LR scale
        still missing from them then (default: both now)."""
        if watch.host_group_index is None:
            group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
            watch.host_group_index = np.asarray([group_of.get(id(p), 0) for p in watch.plan.params], dtype=np.int64)
        values = iter(tensor_lrs)
        # a float, or a CPU tensor (reading it is no device sync), or a device tensor read with the step's copy
        if group_lrs is None:
            group_lrs = [g["lr"] for g in optimizer.param_groups]
        per_group = np.asarray([next(values) if _on_device(lr) else float(lr) for lr in group_lrs], dtype=np.float64)
        if factor is None:
            factor = watch.lr_scale.pending if watch.lr_scale else 1.0
        return per_group[watch.host_group_index] * factor

    # ------------------------------------------------------------------ per-optimizer state
    def _watch(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> _Watch:
        index = self._opt_index.get(id(optimizer))
        if index is None:
            index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), len(self._opt_index))
            self._opt_index[id(optimizer)] = index
        watch = self._watches.get(index)
        if watch is None:
            plan, count, device = self._plan(trainer, pl_module, optimizer)
            watch = _Watch(index, plan, TrendDetector(self.config, plan.num_layers + 1), weakref.ref(optimizer),
                           count, device, shape=_shape(optimizer))
            if "reduce_lr" in self.on_nonfinite + self.on_exploding:
                watch.lr_scale = self._lr_scales.get(index) or LRScale(optimizer)
                self._lr_scales[index] = watch.lr_scale
            if "rollback" in self.on_nonfinite + self.on_exploding:
                watch.snapshots = Snapshots(self.rollback_keep)
            self._restore_watch(watch)
            self._watches[index] = watch
        elif watch.optimizer() is not optimizer or len(optimizer.param_groups) != watch.param_groups:
            self._rewatch(trainer, pl_module, optimizer, watch)  # replaced, or add_param_group mid-run
        return watch

    def _plan(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer):
        """The layer plan of every parameter ``optimizer`` holds, its number of param groups and where
        its gradients live. Frozen parameters (``requires_grad=False``) are in it: they have no gradient
        and so count as absent until unfrozen, when they are watched like any other. Empty parameters (a
        rank-0 adapter, an empty prompt) are not: their gradient's norm is always 0, a "dead" layer. (Under
        a strategy that shards plain tensors (FSDP1) a rank's view can be empty while the parameter is not,
        and every rank must plan the same layers: there they stay, and so do DTensors.)"""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        plan = LayerPlan.from_named_parameters(pl_module.named_parameters(), depth=self.group_depth, only=params)
        if self._reduce is None and not plan.dtensor and any(p.numel() == 0 for p in params):
            planned = [p for p in params if p.numel() > 0]
            plan = LayerPlan.from_named_parameters(pl_module.named_parameters(), depth=self.group_depth, only=planned)
        if plan.dtensor and self._reduce is None:  # sharded by a strategy not known by name (FSDP2 by hand)
            self._reduce = self._all_reduce(trainer, sharded=True)
        return plan, len(optimizer.param_groups), params[0].device if params else torch.device("cpu")

    def _rewatch(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer,
                 watch: _Watch) -> None:
        """The optimizer's parameters changed (``add_param_group``, as Lightning's ``BackboneFinetuning``
        does), or the optimizer itself was replaced (``trainer.strategy.setup_optimizers`` mid-run):
        watch the new set. A layer with the same parameters as before keeps its detector state; a new
        or changed layer starts afresh, and so does the global series unless it covers the same
        parameters (a norm that jumps because a backbone joined is not an explosion). Per-series
        latches and clip anchors restart, unless the parameters and layers are the same (a second
        ``fit()`` of the same Trainer builds a new optimizer over them: a growth being clipped goes on
        being clipped at its anchor); rollback snapshots are dropped (they hold the optimizer's state of
        before, which cannot be loaded into it any more: an Adam state loaded into a new SGD crashed its
        step), unless the new optimizer is of the same class with the same param groups. A replaced
        optimizer gets an LR scale on its own hooks: the one ``on_train_start`` put on it (a second
        ``fit()`` of the same Trainer keeps the value), or afresh (1) when it was replaced mid-run."""
        if watch.in_flight is not None:  # sync="deferred": read the step in flight against the plan it was read with
            self._land(trainer, pl_module, watch.optimizer() or optimizer, watch)
        old = watch.plan
        watch.plan, watch.param_groups, watch.device = self._plan(trainer, pl_module, optimizer)
        before, now = _members(old), _members(watch.plan)
        index = {name: i for i, name in enumerate(old.layers)}
        same = set(map(id, old.params)) == set(map(id, watch.plan.params))
        watch.detector = watch.detector.remap(
            [0 if same else None]
            + [1 + index[name] if before.get(name) == now[name] else None for name in watch.plan.layers])
        if watch.optimizer() is not optimizer:
            watch.optimizer = weakref.ref(optimizer)
            if watch.lr_scale is not None:
                # a second fit() made a new optimizer, on whose hooks on_train_start put a scale already
                scale = self._lr_scales.get(watch.index)
                if scale is None or scale.optimizer is not optimizer:
                    scale = self._lr_scales[watch.index] = LRScale(optimizer)
                if watch.lr_scale is not scale:
                    watch.lr_scale.remove()
                watch.lr_scale = scale
        kept = same and tuple(old.layers) == tuple(watch.plan.layers)  # the same series, index for index
        if watch.absent is not None:  # steps without a gradient go on counting, layer by layer
            watch.absent = [int(watch.absent[0])] + [int(watch.absent[1 + index[name]]) if name in index else 0
                                                     for name in watch.plan.layers]
            new_of = {name: i + 1 for i, name in enumerate(watch.plan.layers)}
            watch.cut_reported = {new_of[old.layers[i - 1]] for i in watch.cut_reported
                                  if 0 < i <= len(old.layers) and old.layers[i - 1] in new_of}
        if not kept:
            watch.last_fired, watch.anchor, watch.anchor_until, watch.anchor_first = {}, None, None, None
        watch.limits = None  # sync="deferred": limits of the old layers
        watch.group_index = watch.host_group_index = None
        watch.keys = {}
        shape, watch.shape = watch.shape, _shape(optimizer)
        if watch.snapshots is not None and not (kept and shape == watch.shape):
            watch.snapshots = Snapshots(self.rollback_keep)
        log.info("GradGuard: optimizer %d (%s) holds %d parameter tensors in %d layers (was %d in %d); watching them",
                 watch.index, type(optimizer).__name__, len(watch.plan.params), watch.plan.num_layers,
                 len(old.params), old.num_layers)

    def _lrs(self, watch: _Watch, optimizer: torch.optim.Optimizer) -> Tensor:
        """Each plan parameter's effective LR, as a device vector: O(param groups) work, no copy."""
        if watch.group_index is None:
            group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
            ids = [group_of.get(id(p), 0) for p in watch.plan.params]
            watch.group_index = torch.tensor(ids, device=watch.device)  # once per optimizer
        scale = watch.lr_scale.pending if watch.lr_scale else 1.0  # inside step() the groups hold it already
        device = watch.device
        # torch.full launches a fill kernel with the value as an argument (no host->device copy);
        # a tensor lr (capturable optimizers) stays on the device
        per_group = torch.stack([
            g["lr"].to(device, torch.float32).reshape(()) * scale if isinstance(g["lr"], Tensor)
            else torch.full((), float(g["lr"]) * scale, dtype=torch.float32, device=device)
            for g in optimizer.param_groups
        ])
        return per_group[watch.group_index]

    @staticmethod
    def _all_reduce(trainer: Trainer, sharded: bool = False):
        """For strategies whose ranks hold gradient *shards* (FSDP, DeepSpeed, model parallel; or
        ``sharded``: the parameters are DTensors): combine the per-layer partial sums across ranks,
        so every rank computes the same numbers and so takes the same decisions (a rank acting
        alone would hang the others). Under DDP the gradients are already identical on every rank
        after the all-reduce."""
        if trainer.world_size <= 1 or not (sharded or _is_sharded(trainer.strategy)):
            return None
        import torch.distributed as dist

        def all_reduce(t: Tensor, op: str) -> Tensor:
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
            return t

        return all_reduce

    def _unscaled_factor(self, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """The loss scale still inside the gradients, for optimizers that unscale in their own step."""
        scaler = self._scaler
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return None
        return getattr(scaler, "_scale", None)

    # ------------------------------------------------------------------ detection -> events (host)
    def _fired(self, watch: _Watch, bit: int, flags: np.ndarray, step: int, quiet: int) -> np.ndarray:
        """Series that newly fired ``bit``: flagged now and not within the last ``quiet`` steps."""
        last = watch.last_fired.setdefault(bit, np.full(flags.shape, -(10**9), dtype=np.int64))
        new = flags & (step - last > quiet)
        last[flags] = step
        return new

    def _findings(self, watch: _Watch, host: np.ndarray, step: int, weights_before: bool = True) -> list[GradEvent]:
        """The step's events. ``weights_before``: the weights are still those the step's gradients were
        computed with (not so under ``sync="deferred"`` once a non-finite step was applied: its own
        update broke them, and the weights say nothing about an earlier one)."""
        if not watch.detector.flags:  # the usual step: nothing flagged anywhere (a host int, no numpy)
            watch.overflow_streak = 0
            return []
        code = host[Row.CODE].astype(np.int64)
        c = self.config
        events: list[GradEvent] = []
        norm = host[Row.NORM]
        order = np.arange(1, len(code))

        nonfinite = (code & Code.NONFINITE) > 0
        if nonfinite.any():
            layers = [i for i in order if nonfinite[i]] or [0]
            if self._scaler is not None:
                # fp16 loss scaling: the GradScaler skips this step and lowers its scale; expected
                watch.counts["amp_overflows"] += 1
                watch.overflow_streak += 1
                if watch.overflow_streak == self.amp_overflow_patience:
                    events.append(self._event(
                        watch, step, "nonfinite", "amp_overflow", layers, float(watch.overflow_streak),
                        float(self.amp_overflow_patience),
                        f"{watch.overflow_streak} fp16 overflow steps in a row (GradScaler scale collapsing); "
                        f"first non-finite layer {_q(watch.series_name(layers[0]))}",
                    ))
            else:
                first = layers[0]
                what = "NaN" if np.isnan(norm[first]) else "Inf"
                names = ", ".join(_q(watch.series_name(i)) for i in layers[:5])
                more = f" and {len(layers) - 5} more" if len(layers) > 5 else ""
                text = (f"non-finite gradients ({what}) in {len(layers)} layer{'s' if len(layers) > 1 else ''}: "
                        f"{names}{more}; global norm {_f(norm[0])}")
                broken = self._broken_weights(watch, layers) if weights_before else []
                if broken:  # the gradients are the symptom: an earlier update broke the weights
                    text += (f"; the weights of {', '.join(_q(watch.series_name(i)) for i in broken[:5])} are "
                             f"non-finite already: an update before this step broke them (did the optimizer turn "
                             f"finite gradients into NaN/Inf weights?)")
                events.append(self._event(
                    watch, step, "nonfinite", "weights" if broken else what.lower(), broken or layers,
                    float(norm[first]), math.inf, text,
                ))
        else:
            watch.overflow_streak = 0

        for bit, reason in (
            (Code.CEILING, "max_norm"),
            (Code.GRAD_WEIGHT, "grad_weight_ratio"),
            (Code.SPIKE, "spike"),
            (Code.UPDATE_RATIO, "update_ratio"),
        ):
            flags = (code & bit) > 0
            if flags.any():
                events.append(self._exploding(watch, host, step, reason, _worst_first(flags, host, reason)))
        grew = self._fired(watch, Code.GROWTH, (code & Code.GROWTH) > 0, step, c.growth_window)
        if grew.any():
            events.append(self._exploding(watch, host, step, "growth", _worst_first(grew, host, "growth")))

        vanish = (code & Code.VANISH) > 0
        new = self._fired(watch, Code.VANISH, vanish, step, c.vanish_patience)
        if new.any():
            events.append(self._vanishing(watch, host, step, new, vanish))
        return events

    def _exploding(self, watch: _Watch, host: np.ndarray, step: int, reason: str, series: list[int]) -> GradEvent:
        c = self.config
        i = series[0]
        norm, level, scale = host[Row.NORM, i], host[Row.LEVEL, i], host[Row.SCALE, i]
        where = _where(watch, i)
        if reason == "spike":
            value, threshold = float(norm), float(host[Row.SPIKE_AT, i])
            if np.isfinite(level) and host[Row.SCALE, i] > 0 and watch.detector.steps > c.warmup_steps:
                sigmas = (math.log10(max(norm, 1e-30)) - level) / max(scale, c.min_scale)
                text = (f"{where} {_f(norm)} is {sigmas:.0f} sigma above its running level {_f(10**level)} "
                        f"(threshold {c.spike_zscore:g} sigma and {c.spike_min_ratio:g}x, i.e. {_f(threshold)})")
            else:
                text = (f"{where} {_f(norm)} jumped above {_f(threshold)}, {c.warmup_spike_ratio:g}x the largest "
                        f"norm seen in the first steps")
        elif reason == "growth":
            base = host[Row.GROWTH_BASE, i]
            value, threshold = float(10 ** (host[Row.FAST, i] - base)), c.growth_factor
            text = (f"{where} grew {value:.3g}x within {c.growth_window} steps (running level {_f(10**base)} -> "
                    f"{_f(10**host[Row.FAST, i])}; threshold {c.growth_factor:g}x)")
        elif reason == "max_norm":
            value, threshold = float(norm), float(c.max_norm)
            text = f"{where} {_f(norm)} exceeds max_norm {_f(threshold)}"
        elif reason == "grad_weight_ratio":
            value, threshold = float(host[Row.GRAD_WEIGHT, 0]), float(c.max_grad_weight_ratio)
            text = (f"global grad norm {_f(norm)} is {value:.3g}x the weight norm {_f(norm / value)} "
                    f"(threshold {threshold:g}x): exploding activations (init, learning rate)")
        else:
            value, threshold = float(host[Row.UPDATE_RATIO, i]), float(c.max_update_ratio)
            text = f"update-to-weight ratio of {_q(watch.series_name(i))} {_f(value)} exceeds max_update_ratio {_f(threshold)}"
        others = len([j for j in series[1:] if j != 0])
        if others:
            text += f"; {others} more layer{'s' if others > 1 else ''}{' and the global norm' if 0 in series[1:] else ''} also flagged"
        elif 0 in series[1:]:
            text += "; the global norm too"
        elif i == 0 and host.shape[1] > 2:  # no layer flagged by its own series: say where the norm is
            squares = np.nan_to_num(host[Row.NORM, 1:], nan=0.0, posinf=0.0) ** 2
            if squares.sum() > 0:
                j = int(np.argmax(squares))
                text += f"; {100 * squares[j] / squares.sum():.0f}% of it in {_q(watch.series_name(j + 1))}"
        return self._event(watch, step, "exploding", reason, series, value, threshold, text)

    def _loss_events(self, trainer: Trainer, watch: _Watch, step: int) -> list[GradEvent]:
        """A non-finite loss returned by ``training_step`` with finite gradients: the loss is broken, not the
        gradients (``log`` of a negative number, 0/0, a NaN target), and the run trains on something else than
        what it reports. The losses are read with the next step's statistics: those of batches since a step
        whose gradients held NaN/Inf (a GradScaler overflow too) are its symptom, reported already (or the
        scaler's business). A report only, answered here, not by the responses: ``log``, ``alert``, ``stop``,
        ``raise`` (these two on a single rank only: each rank has its own loss, and a stop must be agreed);
        the update it belongs to is done, and this step's own gradients are fine."""
        bad, self._bad_losses = self._bad_losses, []
        if self._nonfinite_batch >= self._read_batch:
            return []
        what = "NaN" if any(math.isnan(v) for v in bad) else "Inf"
        text = (f"the loss training_step returned before this step was {what} ({len(bad)} "
                f"batch{'es' if len(bad) > 1 else ''}) while the gradients are finite: the loss is broken, not the "
                "gradients")
        event = self._event(watch, step, "nonfinite", "loss", [0], bad[0], math.inf, text)
        acts = [a for a in self.on_nonfinite if a == "log" or (a in ("stop", "raise") and self._world_size == 1)]
        if "alert" in self.on_nonfinite and self._alert_due(event, step):
            acts.insert(1 if "log" in acts else 0, "alert")
        event = GradEvent(**{**event.to_dict(), "actions": tuple(acts),
                             "message": event.message + (f" -> {', '.join(acts)}" if acts else "")})
        self.events.append(event)
        self._event_counts["nonfinite"] += 1
        if "alert" in acts and trainer.is_global_zero:
            log.warning("GradGuard: %s", event.message)
        if "stop" in acts and not trainer.should_stop:
            trainer.should_stop = True  # a single rank: nothing to agree on
            log.warning("GradGuard stopped training: %s", event.message)
        return [event]

    def _cut_off(self, watch: _Watch, present, step: int) -> list[GradEvent]:
        """A layer of the optimizer that requires grad and got no gradient for ``vanish_patience`` steps in a
        row is cut off from the loss (unused in forward, behind ``.detach()`` or ``torch.no_grad()``): it never
        trains, and its norm, absent rather than 0, is no "dead" one. Once per such run of steps; frozen layers
        (``requires_grad=False``) aside, looked at again every ``vanish_patience`` steps (one unfrozen while
        still cut off is found then). The usual step (every layer had a gradient) costs one ``all()``."""
        patience = self.config.vanish_patience
        if isinstance(present, np.ndarray):  # past 112 series: numpy, not Python loops over every layer
            if present.all():
                watch.absent, watch.cut_reported = None, set()
                return []
            before = np.asarray(watch.absent, dtype=np.int64) if watch.absent is not None and len(
                watch.absent) == len(present) else np.zeros(len(present), dtype=np.int64)
            watch.absent = absent = np.where(present, 0, before + 1)
            hit = (np.flatnonzero((absent[1:] > 0) & (absent[1:] % patience == 0)) + 1).tolist()  # numpy: no sync
        else:
            if all(present):
                watch.absent, watch.cut_reported = None, set()
                return []
            before = watch.absent if watch.absent is not None and len(watch.absent) == len(present) \
                else [0] * len(present)
            watch.absent = absent = [0 if here else n + 1 for here, n in zip(present, before)]
            hit = [i for i in range(1, len(absent)) if absent[i] and absent[i] % patience == 0]
        if watch.cut_reported:  # a layer with a gradient again starts a new run of steps
            watch.cut_reported = {i for i in watch.cut_reported if i < len(absent) and absent[i]}
        hit = [i for i in hit if i not in watch.cut_reported]
        if not hit:
            return []
        wants = [False] * len(absent)
        for p, layer in zip(watch.plan.params, watch.plan.layer_of_param):  # only on the step one is found
            wants[layer + 1] = wants[layer + 1] or (p.requires_grad and p.numel() > 0)
        hit = [i for i in hit if wants[i]]
        if not hit:
            return []
        watch.cut_reported |= set(hit)
        names = ", ".join(_q(watch.series_name(i)) for i in hit[:5])
        several = len(hit) > 1
        text = (f"{names}{f' and {len(hit) - 5} more' if len(hit) > 5 else ''} got no gradient for "
                f"{int(absent[hit[0]])} "
                f"steps in a row, although {'they require' if several else 'it requires'} grad and "
                f"{'are' if several else 'is'} in the optimizer: cut off from the loss (unused in forward, behind "
                ".detach() or torch.no_grad(), an expert the router sends no tokens to?), not trained")
        return [self._event(watch, step, "vanishing", "no_grad", hit, float(absent[hit[0]]), float(patience), text)]

    def _vanishing(self, watch: _Watch, host: np.ndarray, step: int, new: np.ndarray, flagged: np.ndarray) -> GradEvent:
        c = self.config
        code = host[Row.CODE].astype(np.int64)
        series = _worst_first(new, host, "vanishing")
        i = series[0]
        fast = float(10 ** host[Row.FAST, i])
        ref = float(10 ** host[Row.VANISH_REF, i])
        where = _where(watch, i)
        if code[i] & Code.DEAD and c.vanish_floor == 0:
            reason, value, threshold = "dead", float(host[Row.NORM, i]), 0.0
            text = f"{where} is exactly zero (dead)"
        elif code[i] & Code.DEAD:
            reason, value, threshold = "dead", float(host[Row.NORM, i]), c.vanish_floor
            text = f"{where} {_f(value)} is at or below vanish_floor {_f(threshold)}"
        elif code[i] & Code.REL:
            reason, value, threshold = "relative", fast, ref / c.vanish_factor
            text = (f"{where} {_f(fast)} is {ref / max(fast, 1e-30):.2g}x below the median layer {_f(ref)} "
                    f"(threshold {c.vanish_factor:g}x)")
        else:
            reason, value, threshold = "drop", fast, ref / c.vanish_drop
            text = f"{where} {_f(fast)} fell {ref / max(fast, 1e-30):.2g}x below its peak {_f(ref)} (threshold {c.vanish_drop:g}x)"
        text += f" for {int(host[Row.STREAK, i])} steps while the loss has not converged"
        total = int(flagged.sum())
        if total > 1:
            names = ", ".join(_q(watch.series_name(j)) for j in np.flatnonzero(flagged)[:5])
            text += f"; {total} layers vanishing: {names}{' ...' if total > 5 else ''}"
        return self._event(watch, step, "vanishing", reason, series, value, threshold, text)

    def _check_ddp_unfrozen(self, trainer: Trainer) -> None:
        """Under DDP: a parameter frozen when DDP wrapped the model that now has a gradient was unfrozen
        (Lightning's ``BackboneFinetuning``, ``requires_grad_(True)``). torch's DDP does not all-reduce it:
        each rank trains it on its own batches and the replicas drift apart, silently. Said once, as a
        warning; the guard's own numbers for those layers are then per rank. One ``p.grad`` look-up
        (under 1 us) per frozen tensor per step, until the first unfreeze."""
        unfrozen = [name for name, p in self._ddp_frozen if p.grad is not None]
        if not unfrozen:
            return
        self._ddp_frozen = None
        if trainer.is_global_zero:
            layers = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in unfrozen))
            log.warning(
                "GradGuard: under DDP, %d parameter tensor%s frozen when DDP wrapped the model now get%s "
                "gradients (%s%s), but DDP does not all-reduce them: every rank trains them on its own batches "
                "and the replicas drift apart. Freeze by leaving them out of the optimizer instead of "
                "requires_grad=False, or wrap the model again after unfreezing.",
                len(unfrozen), "s" if len(unfrozen) > 1 else "", "" if len(unfrozen) > 1 else "s",
                ", ".join(f"`{name}`" for name in layers[:5]), " ..." if len(layers) > 5 else "",
            )

    def _check_resumed(self, trainer: Trainer, watch: _Watch) -> None:
        """The first steps after a resume: a layer that had gradients at the checkpoint and has none
        for ``_RESUME_CHECK_STEPS`` steps was most likely frozen again by the resume, as Lightning's
        ``BaseFinetuning`` does when resumed past its unfreeze epoch (it restores the param groups, not
        ``requires_grad``). Said once, as a warning: the guard cannot tell a deliberate freeze."""
        present = watch.present
        watch.missing_since_resume = {i for i in watch.missing_since_resume if not present[i]}
        watch.steps_since_resume += 1
        if watch.missing_since_resume and watch.steps_since_resume >= _RESUME_CHECK_STEPS:
            missing = sorted(watch.missing_since_resume)
            if trainer.is_global_zero:
                names = ", ".join(_q(watch.series_name(i)) for i in missing[:5])
                log.warning(
                    "GradGuard: %d layer%s trained before the checkpoint %s had no gradient in the %d steps since "
                    "the resume: %s%s. Frozen again by the resume? (Lightning's BaseFinetuning, resumed after its "
                    "unfreeze epoch, restores the param groups but not requires_grad.)",
                    len(missing), "s" if len(missing) > 1 else "", "have" if len(missing) > 1 else "has",
                    watch.steps_since_resume, names, " ..." if len(missing) > 5 else "",
                )
            watch.missing_since_resume = None
        elif not watch.missing_since_resume:
            watch.missing_since_resume = None

    def _broken_weights(self, watch: _Watch, series: list[int]) -> list[int]:
        """Of the layers ``series`` (series indices, their gradients non-finite), those whose weights
        hold NaN/Inf. One more read and sync, on such steps only. Not under sharded strategies: each
        rank sees only its shards, and ranks deciding differently would hang."""
        if self._reduce is not None:
            return []
        plan, wanted = watch.plan, set(series)
        positions = [i for i, layer in enumerate(plan.layer_of_param) if layer + 1 in wanted]
        if not positions:  # only the global series flagged
            return []
        weights = [plan.params[i] for i in positions]
        with torch.no_grad():
            largest = _tensor_norms(local_shards(weights) if plan.dtensor else weights, math.inf, watch.device)
        bad = {plan.layer_of_param[i] + 1 for i, v in zip(positions, largest.tolist()) if not math.isfinite(v)}  # sync: such steps only
        return [i for i in series if i in bad]

    def _event(self, watch, step, kind, reason, series, value, threshold, text) -> GradEvent:
        layers = tuple(name for name in (watch.series_name(i) for i in series) if name is not None)
        opt = f" (optimizer {watch.index})" if len(self._watches) > 1 or watch.index else ""
        return GradEvent(
            step=step, kind=kind, layer=layers[0] if layers else None, value=value, threshold=threshold,
            actions=(), message=f"step {step}{opt}: {text}", reason=reason, optimizer=watch.index, layers=layers,
        )

    # ------------------------------------------------------------------ events -> actions
    def _respond(self, trainer, pl_module, optimizer, watch: _Watch, host, events: list[GradEvent], step: int,
                 applied: tuple[float, bool] | None = None) -> tuple[float, float | None]:
        """Apply the configured responses; fill each event's ``actions``; return the clip coefficient applied
        and the global norm after clipping where it is not the norm times that coefficient (see _clip).
        ``applied`` (``sync="deferred"``): the clip coefficient and skip the device already applied to
        the step; the other responses act now, on the step in progress."""
        flags = watch.detector.flags  # every series' code bits or-ed together
        exploding_now = bool(flags & Code.EXPLODING)
        bad_now = exploding_now or (bool(flags & Code.NONFINITE) and self._scaler is None)
        bad_before, watch.bad_streak = watch.bad_streak, (watch.bad_streak + 1 if bad_now else 0)
        anchored = False
        if watch.anchor is not None or flags & Code.GROWTH:
            anchored = self._update_anchor(watch, host[Row.CODE].astype(np.int64), host, step)
            if anchored and "clip" in self.on_exploding:
                self._warn_long_anchor(trainer, watch, step)
        clip_coef, skipped, norm_clipped = 1.0, False, None
        clipping = "clip" in self.on_exploding and (exploding_now or anchored)
        if applied is not None:
            clip_coef, skipped = applied
            clipping = clip_coef < 1.0
        if not events and not clipping and not skipped:
            watch.skip_streak = 0
            self._healthy_step(pl_module, optimizer, watch, step)
            return clip_coef, norm_clipped
        configured = {"nonfinite": self.on_nonfinite, "exploding": self.on_exploding, "vanishing": self.on_vanishing}
        wanted = {name for e in events for name in configured[e.kind]}
        if clipping:
            wanted.add("clip")  # every flagged (or anchored) step is clipped, not only the first of an incident
        taken: dict[str, bool] = {}

        if applied is not None:  # done on the device already: recorded, as it happened
            watch.skip_streak = watch.skip_streak + 1 if skipped else 0
            if skipped:
                watch.counts["skipped"] += 1
            elif clip_coef < 1.0:
                watch.counts["clipped"] += 1
            taken["skip"], taken["clip"] = skipped, not skipped and clip_coef < 1.0
        elif "rollback" in wanted and watch.snapshots is not None:
            damage = bad_before > 0 or any(e.reason in _DAMAGE for e in events)
            if damage:
                taken["rollback"] = self._rollback(trainer, pl_module, optimizer, watch, step, events)
                # no snapshot old enough (the first steps, after a resume or a new param group) or
                # rollbacks exhausted: nothing to restore, but this step's gradients are still bad
                taken["skip"] = not taken["rollback"]
                if not taken["rollback"] and watch.rollbacks_in_a_row >= self.max_rollbacks:  # retrying does not help
                    taken["stop"] = f"{watch.rollbacks_in_a_row} rollbacks in a row did not help: max_rollbacks"
            else:
                # a lone bad step: its gradient has not reached the weights, so there is nothing to undo;
                # dropping it is enough. A second bad step in a row means damage: then roll back
                # (and only then reduce the LR: a lone corrupted batch says nothing about the LR).
                taken["skip"] = taken["lone"] = True
        if applied is None and ("skip" in wanted or taken.get("rollback") or taken.get("skip")):
            self._skip(trainer, optimizer)
            watch.counts["skipped"] += 1
            watch.skip_streak += 1
            taken["skip"] = True
        elif applied is None:
            watch.skip_streak = 0
            if "clip" in wanted:
                clip_coef, norm_clipped = self._clip(optimizer, watch, host)
                taken["clip"] = clip_coef < 1.0
        if "reduce_lr" in wanted and watch.lr_scale is not None and events and not taken.get("lone"):
            taken["reduce_lr"] = self._reduce_lr(watch, step, rolled_back=bool(taken.get("rollback")))
        if events:
            watch.healthy_since = step + 1
        if "stop" in taken or self.max_consecutive_skips is None:
            pass  # the first reason found is given (rollbacks exhausted)
        elif watch.skip_streak >= self.max_consecutive_skips:
            # skipping cannot repair weights that are already broken: end the run instead of idling
            taken["stop"] = f"{watch.skip_streak} steps skipped in a row: max_consecutive_skips"
        elif taken.get("skip") and not taken.get("rollback") and any(e.reason == "weights" for e in events):
            taken["stop"] = "the weights are non-finite: skipping cannot repair them"  # no need to wait for the streak

        final = []
        for e in events:
            acts = [a for a in configured[e.kind] if a in ("log", "stop", "raise") or taken.get(a)]
            if e.reason == "amp_overflow":
                acts = [a for a in acts if a not in ("skip", "clip")]
            if taken.get("skip") and not taken.get("rollback") and "skip" not in acts and (
                "rollback" in configured[e.kind] or (applied is not None and e.kind != "vanishing")
            ):  # under "rollback": a lone bad step, or nothing to restore (see above); or skipped by the device
                acts.insert(0, "skip")
            # the run stops, raises or rolls back, or its weights broke: alerted although its layer alerted within
            # the quiet window, once per quiet window of its own (a run stopped and still stepping, min_steps,
            # stops again at every step)
            escalated = bool(_ESCALATIONS & set(acts)) or bool(taken.get("stop")) or e.reason == "weights"
            if "alert" in configured[e.kind] and (self._alert_due(e, step) or (escalated and self._alert_due(
                    e, step, key=(e.optimizer, "escalated", "stop" if taken.get("stop") else e.reason)))):
                acts.insert(min(len(acts), acts.index("log") + 1 if "log" in acts else len(acts)), "alert")
            if taken.get("stop") and "stop" not in acts:
                acts.append("stop")
            suffix = f" -> {', '.join(acts)}" if acts else ""
            if taken.get("stop") and "stop" not in configured[e.kind]:
                suffix += f" ({taken['stop']})"
            final.append(GradEvent(**{**e.to_dict(), "actions": tuple(acts), "message": e.message + suffix}))
        events[:] = final
        for e in events:
            self.events.append(e)
            self._event_counts[e.kind] += 1
            if "alert" in e.actions and trainer.is_global_zero:
                log.warning("GradGuard: %s", e.message)
        stopping = next((e for e in events if "stop" in e.actions), None)
        if stopping is None and taken.get("stop") and not trainer.should_stop:
            # sync="deferred": the device skipped a run of steps the host flagged nothing in (against the
            # limits it knew): max_consecutive_skips holds all the same
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)
            log.warning("GradGuard stopped training: step %d: %s", step, taken["stop"])
        if stopping is not None and not trainer.should_stop:
            # gradients (or their reduced statistics) are identical on every rank here, so every
            # rank takes this same decision; agree anyway, as EarlyStopping does
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(True, all=False)
            log.warning("GradGuard stopped training: %s", stopping.message)
        return clip_coef, norm_clipped

    def _unanswered(self, trainer: Trainer, events: list[GradEvent]) -> None:
        """The step's findings when responding to them failed inside the guard: they are recorded all the
        same (events, counts, the sinks; the loggers' counts at the next logged step), with no action, and
        say so."""
        recorded = {id(e) for e in self.events[-len(events):]} if events else set()
        for e in events:
            if id(e) not in recorded:
                event = GradEvent(**{**e.to_dict(), "actions": (),
                                     "message": f"{e.message} -> no response: the guard failed (see the log)"})
                self.events.append(event)
                self._event_counts[e.kind] += 1
                self._sink_call("on_event", trainer, event)

    def _skip(self, trainer: Trainer, optimizer: torch.optim.Optimizer) -> None:
        """Drop the step (every gradient ``None``). Lightning clips after this hook, and torch's
        ``clip_grad_value_`` fails on a step without any gradient (``clip_grad_norm_`` returns 0):
        ``Trainer(gradient_clip_algorithm="value")`` is held back for this step and given back in
        ``on_train_batch_end`` (a ``configure_gradient_clipping`` of the user's own that clips by
        value is not reached by this)."""
        skip_(optimizer)
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm == "value" and self._held_clip_val is None:
            self._held_clip_val, trainer.gradient_clip_val = trainer.gradient_clip_val, None

    def _release_value_clipping(self, trainer: Trainer) -> None:
        if self._held_clip_val is not None:
            trainer.gradient_clip_val, self._held_clip_val = self._held_clip_val, None

    def _update_anchor(self, watch: _Watch, code: np.ndarray, host: np.ndarray, step: int) -> bool:
        """Clip anchors: during sustained growth the running level follows the divergence up, and a
        limit relative to it loosens as things get worse. When growth is detected, each growing series
        is pinned to its level before the growth, until it has been unflagged, and under its anchor,
        for ``growth_window`` steps. Returns whether any anchor is active (such steps are clipped even when unflagged)."""
        growing = (code & Code.GROWTH) > 0
        if growing.any():
            if watch.anchor is None:
                watch.anchor = np.full(code.shape, np.inf)
                watch.anchor_until = np.full(code.shape, -1, dtype=np.int64)
                watch.anchor_since, watch.anchor_warned = step, False
            watch.anchor = np.where(growing, np.minimum(watch.anchor, 10.0 ** host[Row.GROWTH_BASE]), watch.anchor)
            watch.anchor_first = watch.anchor.copy() if watch.anchor_first is None else np.where(
                growing, np.minimum(watch.anchor_first, watch.anchor), watch.anchor_first)
        if watch.anchor is None:
            return False
        # The level before the growth is right for a divergence, which the clip then holds down, and wrong
        # after a healthy change of phase (more classes, a harder target, a loss summed instead of
        # averaged), whose norms stay above it for good. Only the loss tells them apart: while it falls,
        # the anchors loosen (x2 per half window) towards the norms, and are released once those stay
        # under them; while it rises, they tighten back, to no lower than they were set.
        rate, exploding = 2.0 ** (2.0 / self.config.growth_window), (code & Code.EXPLODING) > 0
        if self._loss.improving():
            watch.anchor = np.where(exploding, watch.anchor, watch.anchor * rate)
        elif self._loss.worsening() and watch.anchor_first is not None:
            watch.anchor = np.maximum(watch.anchor / rate, watch.anchor_first)
        # held while flagged or while the anchor is still doing work (the norm is above it)
        flagged = (exploding | (host[Row.NORM] > watch.anchor)) & np.isfinite(watch.anchor)
        watch.anchor_until = np.where(flagged, step + self.config.growth_window, watch.anchor_until)
        watch.anchor = np.where(step > watch.anchor_until, np.inf, watch.anchor)
        watch.anchor_first = np.where(np.isfinite(watch.anchor), watch.anchor_first, np.inf)  # a series let go
        if not np.isfinite(watch.anchor).any():
            watch.anchor = watch.anchor_until = watch.anchor_first = None
            return False
        return True

    def _warn_long_anchor(self, trainer: Trainer, watch: _Watch, step: int) -> None:
        """Once per incident: the growth anchors have held the clip limit for ``4 x growth_window`` steps. The
        norms stay above them (the loss has not fallen enough to loosen them), and no event says so. In a
        divergence held down by the clip that is the clip working; after a healthy change of phase (more
        classes, another data mix, another loss) it is a healthy run clipped for good, which only the user
        can tell apart."""
        if watch.anchor_since is None:  # restored from a checkpoint that did not say: count from the resume
            watch.anchor_since = step
        held = step - watch.anchor_since
        if watch.anchor_warned or held < 4 * self.config.growth_window:
            return
        watch.anchor_warned = True
        if trainer.is_global_zero:
            log.warning(
                "GradGuard: step %d%s: the gradients have been clipped by the anchors set at their level before "
                "a growth since step %d (%d steps), and their norm stays above them. If the loss has come down and "
                "the run is healthy (a new phase: more classes, another data mix or loss), the clip is holding it "
                "back: raise `growth_factor`, or leave 'clip' out of `on_exploding`.", step,
                f" (optimizer {watch.index})" if watch.index else "", watch.anchor_since, held)

    def _alert_due(self, event: GradEvent, step: int, key: tuple | None = None) -> bool:
        """One alert per (optimizer, kind, reason, layer) (or ``key``) per ``alert_quiet_steps``; later ones are
        only logged."""
        key = key or (event.optimizer, event.kind, event.reason, event.layer)
        last = self._last_alert.get(key)
        if last is not None and step - last < self.alert_quiet_steps:
            return False
        self._last_alert[key] = step
        return True

    def _capped(self, watch: _Watch, limit: np.ndarray, anchors: bool = True) -> np.ndarray:
        """Spike thresholds by series (index 0 global) under ``max_norm`` (global) and, with ``anchors``,
        the growth anchors: the clip limits of both sync modes."""
        if self.config.max_norm is not None:
            limit[0] = min(limit[0], self.config.max_norm)
        if anchors and watch.anchor is not None:
            limit = np.minimum(limit, watch.anchor)
        return limit

    def _limits(self, watch: _Watch, slack: float = 0.0) -> np.ndarray | None:
        """``sync="deferred"``: the clip limit of each series for the device's decision on the next step,
        from the detector's state (the spike thresholds that step will be judged by), ``max_norm`` and the
        growth anchors (for ``"clip"``); ``inf`` where none is known yet. (The ``max_grad_weight_ratio``
        bound is applied on the device, with the step's own weight norm.) ``None`` where exploding is not
        clipped or skipped."""
        if "clip" not in self.on_exploding and "skip" not in self.on_exploding:
            return None
        # anchors are clip limits only, as with sync="step": for "skip" one would drop every step of a growth
        # (a skipped step leaves the weights, and so the norm above the anchor, as they were)
        limit = self._capped(watch, watch.detector.next_spike_at(slack), anchors="clip" in self.on_exploding)
        return np.where(np.isnan(limit), np.inf, limit)

    def _clip(self, optimizer, watch: _Watch, host: np.ndarray) -> tuple[float, float | None]:
        """Clip to the adaptive threshold: globally if the global norm is over it, then each layer still over its
        own (a small layer whose spike is the global one: the global factor left a logit scale 8x its limit, and
        its update flipped the logits' sign); else the flagged layers alone. Global first, although the layer
        clip alone may have brought the global norm under its limit: the stronger clip is what contains a
        divergence (layers first ended the rescue benchmark's LR-too-high run at 4e3 x the twin, not 8x).
        Returns the smallest factor any gradient was multiplied by (1.0: none) and, where layers were
        clipped, the global norm after the clip (else ``None``: the norm times that factor)."""
        norm, limit = host[Row.NORM], self._capped(watch, host[Row.SPIKE_AT].copy())
        ratio = host[Row.GRAD_WEIGHT, 0]
        if self.config.max_grad_weight_ratio is not None and np.isfinite(ratio) and ratio > 0:
            # no history yet (first steps): bound the gradient by the weights' own scale
            limit[0] = min(limit[0], self.config.max_grad_weight_ratio * norm[0] / ratio)
        over = np.isfinite(norm) & (norm > limit)
        coef = 1.0
        if over[0]:
            coef = float(limit[0] / norm[0])
            # the coefficient is a host float we already hold: no further sync
            clip_(watch.plan.params, torch.tensor(coef))
            over[1:] &= norm[1:] * coef > limit[1:]  # the layers the global factor left over their own limits
            if not over[1:].any():
                watch.counts["clipped"] += 1
                return coef, None
        layers = np.flatnonzero(over[1:])
        if not len(layers):
            return 1.0, None
        factor = np.full(len(norm) - 1, coef)
        factor[layers] = limit[1:][layers] / norm[1:][layers]
        for j in layers:
            params = [p for p, l in zip(watch.plan.params, watch.plan.layer_of_param) if l == j]
            clip_(params, torch.tensor(float(factor[j] / coef)))
        watch.counts["clipped"] += 1
        # host floats we already hold (no sync); the layers partition the gradients
        return float(factor[layers].min()), float(np.sqrt(np.sum(np.square(norm[1:] * factor))))

    def _reduce_lr(self, watch: _Watch, step: int, rolled_back: bool = False) -> bool:
        """Multiply the LR scale by ``lr_factor`` (cooldown, floor). Right after a rollback there is
        no cooldown (the previous reduction evidently did not help), and the effective LR also
        returns at most to what it was when the restored snapshot was taken: a schedule that
        raised the LR since then (an LR jump) is undone."""
        scale = watch.lr_scale
        if (not rolled_back and step - watch.last_lr_change < self.lr_cooldown) or scale.value <= self.lr_min_scale:
            return False
        target = scale.value * self.lr_factor
        if rolled_back and watch.rollback_lr_ratio is not None:
            target = min(target, scale.value * watch.rollback_lr_ratio)
        scale.value = max(target, self.lr_min_scale)
        watch.last_lr_change = step
        watch.counts["lr_reductions"] += 1
        return True

    def _rollback(self, trainer, pl_module, optimizer, watch: _Watch, step: int, events) -> bool:
        """Restore the newest snapshot old enough; ``False`` when there is none, or after ``max_rollbacks``
        in a row (the caller then skips the step, and stops in the latter case)."""
        if watch.rollbacks_in_a_row >= self.max_rollbacks:
            return False
        # inside optimizer.step the param groups hold the effective (scaled) LR, as they did when the snapshot was taken
        lrs_now = [float(group["lr"]) for group in optimizer.param_groups]
        restored = watch.snapshots.restore(step - self.rollback_margin, pl_module, optimizer)
        if restored is None:
            return False
        # the groups keep the schedule's LR; the snapshot's effective LR over today's, for "reduce_lr" to undo
        # an LR jump: the smallest ratio over the groups that trained then and train now (lr 0 says nothing)
        ratios = [then / now for then, now in zip(watch.snapshots.restored_lrs, lrs_now) if then > 0 and now > 0]
        watch.rollback_lr_ratio = min(ratios) if ratios else None
        watch.rollbacks_in_a_row += 1
        watch.counts["rollbacks"] += 1
        return True

    def _healthy_step(self, pl_module, optimizer, watch: _Watch, step: int) -> None:
        snaps = watch.snapshots
        # the first healthy step with none (the start, a resume, a new param group) takes one at once; then
        # one per multiple of rollback_every, at the first step at or after it that is rollback_margin healthy
        # steps past the last bad one (a bad step just before a multiple does not cost a whole period)
        if snaps is not None and (not len(snaps) or (
            step // self.rollback_every > snaps.steps[-1] // self.rollback_every
            and step - watch.healthy_since >= self.rollback_margin
        )):
            snaps.take(step, pl_module, optimizer, own_only=self._optimizer_count() > 1)
            watch.rollbacks_in_a_row = 0
        scale = watch.lr_scale
        if (
            scale is not None and self.lr_recover_after is not None and scale.value < 1.0
            and step - max(watch.healthy_since, watch.last_lr_change) >= self.lr_recover_after
        ):
            scale.value = min(1.0, scale.value / self.lr_factor)
            watch.last_lr_change = step

    # ------------------------------------------------------------------ logging
    def _key(self, watch: _Watch, name: str) -> str:
        """The logged key of ``name`` (``grad/norm_total``, ``grad/opt1/norm_total``); cached per watch."""
        keys, count = watch.keys, self._optimizer_count()
        if keys.get(None) != count:  # a second optimizer appeared: every key changes
            keys.clear()
            keys[None] = count
        key = keys.get(name)
        if key is None:
            opt = f"opt{watch.index}/" if count > 1 or watch.index else ""
            key = keys[name] = f"{self.prefix}{opt}{name}"
        return key

    def _optimizer_count(self) -> int:
        """The optimizers the trainer holds (at train start), or the guard has seen, whichever is more."""
        return max(self._n_optimizers, len(self._watches))

    def _layer_keys(self, watch: _Watch, kind: str) -> list[str | None]:
        """``<prefix><opt>kind/<layer>`` for every series index (None for the global series 0); cached."""
        keys = watch.keys.get(("layers", kind)) if watch.keys.get(None) == self._optimizer_count() else None
        if keys is None:
            keys = [None] + [self._key(watch, f"{kind}/{layer}") for layer in watch.plan.layers]
            watch.keys[("layers", kind)] = keys
        return keys

    def _log(self, trainer, watch: _Watch, host, present, detail_step, param_step, clip_coef, norm_clipped,
             log_step, flight: _InFlight | None = None) -> dict[str, float]:
        k = lambda name: self._key(watch, name)  # noqa: E731
        norm = host[Row.NORM].tolist()  # numpy, on the host already: no sync
        nonfinite = 0.0
        if watch.detector.flags & Code.NONFINITE:
            nonfinite = float(((host[Row.CODE, 1:].astype(np.int64) & Code.NONFINITE) > 0).sum())
        # a fp16 GradScaler's overflow: the scaler skips the step (nothing is applied) and lowers its scale. Its
        # NaN/Inf norms are the scale's, not the model's (counted in amp_overflows): kept out of the charts and
        # of the monitors (EarlyStopping ends a run on a non-finite value)
        overflow = self._scaler is not None and bool(nonfinite or not math.isfinite(norm[0]))
        metrics: dict[str, float] = {k("norm_total"): norm[0], k("nonfinite_layers"): nonfinite}
        for kind, n in self._event_counts.items():
            metrics[k(f"events/{kind}")] = float(n)
        if "clip" in self.on_exploding:
            metrics[k("clip_coef")] = clip_coef
            metrics[k("norm_clipped")] = norm[0] * clip_coef if norm_clipped is None else norm_clipped
            metrics[k("clipped_steps")] = float(watch.counts["clipped"])
        if {"skip", "rollback"} & {*self.on_nonfinite, *self.on_exploding}:  # rollback skips a lone bad step
            metrics[k("skipped_steps")] = float(watch.counts["skipped"])
        if watch.lr_scale is not None:
            if flight is None:  # now, inside the step
                scale, lr, missing = (watch.lr_scale.value, trainer.optimizers[watch.index].param_groups[0]["lr"],
                                      watch.lr_scale.pending)  # inside step() the group holds the scale already
            else:  # sync="deferred": as they were at that step
                scale, lr, missing = flight.lr_scale, flight.lrs[0][0], flight.lrs[1]
            metrics[k("lr_scale")] = scale
            if not _on_device(lr):  # a device tensor LR would cost a sync to read here
                metrics[k("lr")] = float(lr) * missing
        if watch.snapshots is not None:
            metrics[k("rollbacks")] = float(watch.counts["rollbacks"])
        if self._scaler is not None:
            metrics[k("amp_overflows")] = float(watch.counts["amp_overflows"])
        layers = self._logged_layers(host, present)
        keys = self._layer_keys(watch, "norm")
        for i in layers:
            metrics[keys[i]] = norm[i]
        extra = REPORT_ROWS
        if detail_step:
            max_abs, keys = host[extra].tolist(), self._layer_keys(watch, "max_abs")
            extra += 1
            metrics[k("max_abs_total")] = max_abs[0]
            for i in layers:
                metrics[keys[i]] = max_abs[i]
        if param_step:
            param_norm, ratio = host[extra].tolist(), host[Row.UPDATE_RATIO].tolist()
            keys, ratio_keys = self._layer_keys(watch, "param_norm"), self._layer_keys(watch, "update_ratio")
            for i in layers:
                metrics[keys[i]] = param_norm[i]
                if math.isfinite(ratio[i]):
                    metrics[ratio_keys[i]] = ratio[i]
        if overflow:
            metrics = {key: value for key, value in metrics.items() if math.isfinite(value)}
        # handed over in on_train_batch_end, to ride along in Lightning's own logger call of the step
        # (see writes.py): a W&B call costs ~0.7 ms on the cold caches of a training step
        if self._unwritten and self._unwritten[-1][0] == log_step and not self._unwritten[-1][1].keys() & metrics.keys():
            self._unwritten[-1][1].update(metrics)  # several optimizers: one call per step
        else:
            self._unwritten.append((log_step, dict(metrics)))
        if not overflow:  # (an overflow step leaves the monitors the last step's norm)
            live = self._callback_metrics if self._callback_metrics is not None else trainer.callback_metrics
            # for EarlyStopping / ModelCheckpoint monitors; scalar_tensor: 14 us cold where torch.tensor takes 35
            live[k("norm_total")] = torch.scalar_tensor(norm[0])
        return metrics

    def _hand_over(self, trainer: Trainer) -> None:
        """The batch's metrics: queued for Lightning's own logger call of the step, which comes right
        after this batch's ``on_train_batch_end`` hooks (see writes.py); written now where it cannot be."""
        if not self._unwritten:
            return
        unwritten, self._unwritten = self._unwritten, []
        for logger in _distinct(trainer.loggers):  # a logger listed twice gets the guard's metrics once
            shared = self._shared.get(id(logger))
            if id(logger) in self._failed_loggers:
                continue  # the guard gave up writing there
            if shared is not None and not shared.broken and id(self) in shared.queues:
                shared.queues[id(self)] += unwritten
            else:
                self._write(logger, unwritten)

    def _write_metrics(self, trainer: Trainer) -> None:
        """Write every metric not written yet, each logger with calls of its own."""
        unwritten, self._unwritten = self._unwritten, []
        for logger in _distinct(trainer.loggers):
            shared = self._shared.get(id(logger))
            queued = shared.queues.get(id(self)) if shared is not None else None
            if queued:
                self._write(logger, queued[:])
                queued.clear()
            self._write(logger, unwritten)

    def _write(self, logger: Any, entries: list[tuple[int, dict[str, float]]]) -> None:
        if id(logger) in self._failed_loggers:
            return
        shared = self._shared.get(id(logger))
        write = shared.write if shared is not None else logger.log_metrics
        for log_step, metrics in entries:
            try:
                write(metrics, step=log_step)
            except Exception as err:  # noqa: BLE001 - e.g. disk full: stop writing there, keep training
                self._failed_loggers.add(id(logger))
                log.warning("GradGuard: logging to %s failed (%r); the guard stops logging there, training goes on",
                            type(logger).__name__, err)
                return

    def _logged_layers(self, host: np.ndarray, present) -> list[int]:
        """Series indices of the layers to log: all, or the ``top_k`` largest and smallest norms, of the
        layers with gradients this step (``present``, by series): a frozen layer, or an expert nothing
        was routed to, has no norm this step, not a norm of 0."""
        if self.log_layers == "none":
            return []
        n = host.shape[1] - 1
        if isinstance(present, np.ndarray):  # many layers, or sharded
            live = range(1, n + 1) if present[1:].all() else (np.flatnonzero(present[1:]) + 1).tolist()  # numpy: no sync
        else:
            live = range(1, n + 1) if all(present) else [i for i in range(1, n + 1) if present[i]]
        if self.log_layers == "all" or len(live) <= 2 * self.top_k:
            return list(live)
        if n <= _SMALL:
            norm = host[Row.NORM].tolist()  # numpy, on the host already: no sync
            # NaN layers count as the largest; ties keep model order
            order = sorted(live, key=lambda i: math.inf if math.isnan(norm[i]) else norm[i])
            return sorted(set(order[: self.top_k] + order[-self.top_k :]))
        live = np.asarray(live)
        order = live[np.argsort(np.nan_to_num(host[Row.NORM, live], nan=np.inf), kind="stable")]
        return np.union1d(order[: self.top_k], order[-self.top_k :]).tolist()  # numpy: no sync

    # ------------------------------------------------------------------ checkpointing
    @override
    def state_dict(self) -> dict[str, Any]:
        trainer, module = (self._trainer and self._trainer()), (self._module and self._module())
        if trainer is not None and module is not None and any(w.in_flight for w in self._watches.values()):
            stopping = trainer.should_stop
            self._land_all(trainer, module, quiet=True)  # sync="deferred": the checkpoint holds the last step
            if trainer.should_stop and not stopping:
                # a "stop" found while landing for a checkpoint takes effect where it would have without one:
                # after the next step (a run saved every step stopped a step earlier than one saved never)
                trainer.should_stop, self._late_stop = False, True
        if self._pending_losses:
            self._flush_losses()  # the trend observes them now instead of at the next step: same state then
        watches = {}
        for index, w in self._watches.items():
            watches[index] = {
                "layers": list(w.plan.layers),
                "detector": w.detector.state_dict(),
                "counts": dict(w.counts),
                "overflow_streak": w.overflow_streak,
                "lr_scale": w.lr_scale.value if w.lr_scale else 1.0,
                "last_lr_change": w.last_lr_change,
                "healthy_since": w.healthy_since,
                "last_fired": {bit: v.tolist() for bit, v in w.last_fired.items()},  # numpy: no sync
                "anchor": None if w.anchor is None else [w.anchor.tolist(), w.anchor_until.tolist(),  # numpy: no sync
                                                         w.anchor_since, w.anchor_warned, w.anchor_first.tolist()],
                "streaks": [w.bad_streak, w.skip_streak, w.rollbacks_in_a_row],
                # numpy or a list, on the host: no sync
                "present": None if w.present is None else [bool(v) for v in list(w.present)[1:]],
                "absent": None if w.absent is None else [int(n) for n in w.absent],  # host ints: no sync
                "cut_reported": sorted(w.cut_reported),
            }
        for index, pending in self._pending_state.items():
            watches.setdefault(index, pending)
        return {
            "version": 1,
            "events": [e.to_dict() for e in self.events],
            "event_counts": dict(self._event_counts),
            "watches": watches,
            "loss": self._loss.state_dict(),
            # alert_quiet_steps goes on across a resume: (optimizer, kind, reason, layer, step of the last alert)
            "last_alert": [[*key, step] for key, step in self._last_alert.items()],
            "usual_samples": [self._usual_samples, self._small_steps],
            # non-finite losses read for the checkpoint and not reported yet (unless a NaN step explains them)
            "bad_losses": [] if self._nonfinite_batch >= self._read_batch else [float(v) for v in self._bad_losses],
        }

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # saved from inside optimizer.step() (Lightning runs the training closure there: a SLURM requeue
        # signal, a checkpoint in the user's own hook), the param groups hold the LR times the guard's
        # scale; the checkpoint gets the schedule's own, or a resume would apply the scale twice
        states = checkpoint.get("optimizer_states")
        for index, scale in self._lr_scales.items():  # (the first step after a resume has no watch yet)
            lrs = scale.unscaled()
            if lrs is None or not isinstance(states, list) or index >= len(states):
                continue
            groups = states[index].get("param_groups") if isinstance(states[index], dict) else None
            if isinstance(groups, list) and len(groups) == len(lrs):
                for group, lr in zip(groups, lrs):
                    group["lr"] = lr

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores the callbacks for validate/test/predict(ckpt_path=...) too; only a fit resumes the
        # run, the others must not replace the guard's live state (nor leave it to a later fit)
        self._skip_load = getattr(trainer.state, "fn", None) not in (None, "fit")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._skip_load:
            self._skip_load = False
            return
        self.events = [GradEvent.from_dict(e) for e in state_dict.get("events", [])]
        self._event_counts = {**self._event_counts, **state_dict.get("event_counts", {})}
        self._pending_state = {int(i): w for i, w in state_dict.get("watches", {}).items()}
        self._pending_losses, self._unwritten = [], []  # of another run
        self._watches = {}
        self._opt_index = {}
        self._last_alert = {tuple(entry[:-1]): int(entry[-1]) for entry in state_dict.get("last_alert", [])}
        self._usual_samples, self._small_steps = (int(v) for v in state_dict.get("usual_samples", [0, 0]))
        self._bad_losses = [float(v) for v in state_dict.get("bad_losses", [])]
        self._batches, self._nonfinite_batch, self._read_batch = 0, -1, 0
        loss = state_dict.get("loss")
        if isinstance(loss, dict):
            self._loss.load_state_dict(loss)

    def _restore_watch(self, watch: _Watch) -> None:
        state = self._pending_state.pop(watch.index, None)
        if not state:
            return
        # the run's counts and LR bookkeeping go on whatever the layers (summary() counts the whole run)
        watch.counts.update(state.get("counts", {}))
        watch.last_lr_change = int(state.get("last_lr_change", watch.last_lr_change))
        watch.healthy_since = int(state.get("healthy_since", 0))
        if list(state.get("layers", [])) != list(watch.plan.layers):
            log.warning("GradGuard: the model's layers changed since the checkpoint; the detector's levels, "
                        "thresholds and growth anchors start afresh (warm-up included), the counts go on")
            return
        watch.detector.load_state_dict(state.get("detector", {}))
        watch.overflow_streak = int(state.get("overflow_streak", 0))
        watch.last_fired = {int(b): np.asarray(v, dtype=np.int64) for b, v in state.get("last_fired", {}).items()}
        anchor = state.get("anchor")
        if anchor is not None:
            watch.anchor, watch.anchor_until = np.asarray(anchor[0], dtype=float), np.asarray(anchor[1], dtype=np.int64)
            # (checkpoints of earlier versions lack the rest: the hold counts from the resume, the floor is the
            # anchor)
            defaults = [None, False, anchor[0]]
            since, warned, first = [*anchor[2:5], *defaults[len(anchor) - 2:]]
            watch.anchor_since, watch.anchor_warned = None if since is None else int(since), bool(warned)
            watch.anchor_first = np.asarray(first, dtype=float)
        watch.bad_streak, watch.skip_streak, watch.rollbacks_in_a_row = state.get("streaks", [0, 0, 0])
        if watch.lr_scale is not None:
            watch.lr_scale.value = float(state.get("lr_scale", 1.0))
        absent = state.get("absent")
        if absent and len(absent) == watch.plan.num_layers + 1:
            watch.absent = [int(n) for n in absent]
            watch.cut_reported = {int(i) for i in state.get("cut_reported", [])}
        present = state.get("present")
        if present and len(present) == watch.plan.num_layers:
            watch.missing_since_resume = {i + 1 for i, had in enumerate(present) if had} or None


# ---------------------------------------------------------------------- helpers
def _shape(optimizer: torch.optim.Optimizer) -> tuple:
    """Its class and param group sizes: an optimizer state dict loads into another of the same shape."""
    return type(optimizer), tuple(len(group["params"]) for group in optimizer.param_groups)


def _batch_size(batch: Any) -> int:
    """The length of the first tensor in ``batch`` (nested tuples, lists, dicts, dataclasses), 0 if none.
    A few ``isinstance`` checks for the usual ``(x, y)``; at most 32 objects looked at, the first 4 items of
    each container (a batch of Python lists of token ids is not walked); no warning for ambiguous ones."""
    queue, budget = [batch], 32
    while queue and budget:
        item, budget = queue.pop(0), budget - 1
        if isinstance(item, Tensor):
            return int(item.shape[0]) if item.dim() else 1
        if isinstance(item, Mapping):  # a dict, HF's BatchEncoding
            queue += list(item.values())[:4]
        elif isinstance(item, (list, tuple)):
            queue += [x for x in item[:4] if isinstance(x, (Tensor, list, tuple, Mapping))
                      or hasattr(x, "__dataclass_fields__")]
        elif hasattr(item, "__dataclass_fields__"):
            queue += [getattr(item, name) for name in list(item.__dataclass_fields__)[:4]]
    return 0


def _overflowed_norms(plan: LayerPlan, positions: Sequence[int], norms: list[float]) -> list[float]:
    """``norms`` (per tensor) with each +Inf recomputed in float64: a float32 sum of squares overflows
    for entries above ~1e19, and gradients that large are exploding, not non-finite (clipping them
    works; their weights are still finite). A real Inf or NaN stays. One sync per such tensor,
    on these steps only."""
    out = list(norms)
    for j, v in enumerate(norms):
        if v == math.inf:
            g = plan.params[positions[j]].grad
            g = local_shards([g])[0] if plan.dtensor else g
            g = g.coalesce()._values() if g.is_sparse else g
            g = torch.view_as_real(g) if g.is_complex() else g  # the same L2 norm, and a real dtype
            out[j] = torch.linalg.vector_norm(g, dtype=torch.float64).item()  # sync: overflow steps only
    return out


def _members(plan: LayerPlan) -> dict[str, set[int]]:
    """Layer name -> ids of its parameters."""
    members: dict[str, set[int]] = {name: set() for name in plan.layers}
    for p, layer in zip(plan.params, plan.layer_of_param):
        members[plan.layers[layer]].add(id(p))
    return members


def _host_series(plan: LayerPlan, sums: LayerSums, flat: np.ndarray) -> dict[str, np.ndarray]:
    """Global + per-layer series (index 0 is global), float64, from the host copy of ``sums``' rows
    (concatenated in the order ``grad_sq, present, max_abs, weight_sq, update_sq``, absent ones skipped):
    the sharded counterpart of :func:`~lightning_gradguard.stats.layer_series`."""
    n = len(sums.grad_sq)
    flat = flat.astype(np.float64)

    def with_total(row: np.ndarray, total: float) -> np.ndarray:
        out = np.empty(n + 1)
        out[0], out[1:] = total, row
        return out

    norm = with_total(flat[:n], flat[:n].sum())  # NaN/Inf propagate to the global sum
    np.sqrt(norm, out=norm)
    k = n
    if isinstance(sums.present, Tensor):  # counts across ranks
        present, k = with_total(flat[k : k + n] > 0, True).astype(bool), k + n
    else:
        present = plan.host_present(sums.positions)
    if math.isfinite(norm[0]):  # a finite sum of squares: every layer is finite
        nonfinite = plan.host_all_finite
    else:
        nonfinite = ~np.isfinite(norm)  # the global entry too: it is a sum over the layers
    out = {"norm": norm, "present": present, "nonfinite": nonfinite}
    if sums.max_abs is not None:
        max_abs, k = flat[k : k + n], k + n
        out["max_abs"] = with_total(max_abs, max_abs.max() if n else math.nan)
    if sums.weight_sq is not None:
        weight_sq, k = flat[k : k + n], k + n
        out["weight"] = np.sqrt(with_total(weight_sq, weight_sq.sum()))
        if sums.update_sq is not None:
            with np.errstate(all="ignore"):  # inf / inf: NaN, a finding
                update = np.sqrt(flat[k : k + n]) / np.maximum(out["weight"][1:], np.finfo(np.float32).tiny)
            out["update_ratio"] = with_total(update, math.nan)
    return out


_F32_MAX = float(torch.finfo(torch.float32).max)
_SMALL = 112  # up to this many layers, host work on them is cheaper in Python floats than in numpy (see detectors)


def _distinct(loggers: Sequence[Any]) -> list[Any]:
    """The Trainer's loggers, each once (``Trainer(logger=[csv, csv])`` lists one object twice)."""
    return list({id(logger): logger for logger in loggers}.values())


def _on_device(value: Any) -> bool:
    """A tensor whose value lives on an accelerator (reading it on the host would sync)."""
    return isinstance(value, Tensor) and value.device.type != "cpu"


_RESUME_CHECK_STEPS = 10  # steps after a resume within which the layers trained before it must show gradients

# reasons that mean the weights are already damaged (a rollback is due even on the first bad step)
_ESCALATIONS = frozenset({"stop", "raise", "rollback"})
_DAMAGE = frozenset({"growth", "grad_weight_ratio", "amp_overflow", "weights"})


def _is_sharded(strategy: Any) -> bool:
    names = {cls.__name__ for cls in type(strategy).__mro__}
    return bool(names & {"FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy"})


def _worst_first(flags: np.ndarray, host: np.ndarray, reason: str) -> list[int]:
    """Flagged series, the most severe first: a layer is named rather than the global norm when one is flagged."""
    idx = [int(i) for i in np.flatnonzero(flags)]
    if reason == "grad_weight_ratio":
        return [0]
    if reason in ("spike", "max_norm"):
        severity = host[Row.NORM] / np.maximum(host[Row.SPIKE_AT], 1e-30)
    elif reason == "growth":
        severity = host[Row.FAST] - host[Row.GROWTH_BASE]
    elif reason == "update_ratio":
        severity = host[Row.UPDATE_RATIO]
    else:  # vanishing: the furthest below its reference
        severity = host[Row.VANISH_REF] - host[Row.FAST]
        severity = np.where((host[Row.CODE].astype(np.int64) & Code.DEAD) > 0, np.inf, severity)
    layers = sorted((i for i in idx if i > 0), key=lambda i: -np.nan_to_num(severity[i], nan=-np.inf))
    return layers + ([0] if 0 in idx else [])


def _where(watch: _Watch, i: int) -> str:
    return "global grad norm" if i == 0 else f"grad norm of {_q(watch.series_name(i))}"


def _q(name: str | None) -> str:
    return "global" if name is None else f"`{name}`"


def _f(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else str(x)
