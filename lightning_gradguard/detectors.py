"""Trend detectors: robust running statistics of gradient norms, on the host.

:class:`TrendDetector` follows a set of *series* (series 0 is the global norm,
series ``1..L`` the layers of a :class:`~lightning_gradguard.stats.LayerPlan`)
in log10 space and flags, every step:

* ``SPIKE``: a norm far above its own robust running level (a z-score on a
  Huber-clamped running level and mean absolute deviation, and at least
  ``spike_min_ratio`` times the level). During the short warm-up the level is
  not yet trustworthy, so a spike there is a norm ``warmup_spike_ratio`` times
  above the largest seen so far.
* ``GROWTH``: the fast running level rose ``growth_factor``-fold within
  ``growth_window`` steps (sustained growth, no single step needs to be a
  spike) while the caller says the loss is not improving.
* ``GRAD_WEIGHT``: the global gradient norm is ``max_grad_weight_ratio``
  times the global weight norm or more. Scale-free and needs no history, so
  it catches exploding gradients from the very first step (bad init, an RNN
  with spectral radius > 1), when the running level knows nothing yet.
  Healthy networks stay around 0.01-2; one SGD step with such a gradient
  would move the weights many times their own size.
* ``CEILING`` / ``UPDATE_RATIO``: optional absolute limits.
* ``VANISH``: for ``vanish_patience`` steps in a row a layer's gradient is all
  zeros (``DEAD``, or at/below ``vanish_floor``), or ``vanish_factor`` below the
  median layer (``REL``), or ``vanish_drop`` below its own peak (``DROP``), while
  the caller says the loss has not converged.
* ``NONFINITE``: NaN/Inf in the series.

Robustness: a NaN/Inf step never enters the running statistics; any other step
moves the slow level by at most ``clamp_sigmas`` deviations, so one wild step
neither poisons the level nor freezes it (a lasting change of regime widens
the deviation and is followed within tens of steps, reported as ``GROWTH``).

Where it runs: the inputs are a few floats per layer that the guard copies to
the host anyway (its one sync per step: events, responses and logging need
them there), so the detector runs on that copy in float64 (Python floats up to
112 series, numpy beyond), a few tens of microseconds per step. On the device
the same ~100 tiny operations would cost a kernel launch each (and on a CPU
device, the dispatcher's overhead each).
The caller gets one ``[REPORT_ROWS, S]`` array per step (see :data:`REPORT_ROWS`)
and turns it into events (see :mod:`lightning_gradguard.callback`).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor

__all__ = ["Code", "DetectorConfig", "LossTrend", "Row", "TrendDetector"]


class Code:
    """Bit flags in the ``CODE`` row of the packed report."""

    NONFINITE = 1
    SPIKE = 2
    GROWTH = 4
    CEILING = 8
    UPDATE_RATIO = 16
    VANISH = 32
    # why a series counts as vanishing (set together with VANISH while it holds)
    DEAD = 64
    REL = 128
    DROP = 256
    GRAD_WEIGHT = 512  # the global gradient norm is many times the weight norm

    EXPLODING = SPIKE | GROWTH | CEILING | UPDATE_RATIO | GRAD_WEIGHT


class Row:
    """Rows of the report, each a float64 vector over the series."""

    CODE = 0  # Code bit flags
    NORM = 1  # the norm this step
    LEVEL = 2  # slow robust running level (log10), before this step's update
    SCALE = 3  # robust deviation (log10) before this step's update
    SPIKE_AT = 4  # the norm above which this step counts as a spike
    FAST = 5  # fast running level (log10) after this step
    GROWTH_BASE = 6  # fast level growth_window steps ago (log10)
    VANISH_REF = 7  # the reference a vanishing layer is compared with (log10): median layer or own peak
    STREAK = 8  # consecutive steps the vanishing condition held
    UPDATE_RATIO = 9  # update-to-weight ratio (NaN when not computed this step)
    GRAD_WEIGHT = 10  # gradient norm / weight norm (NaN when not computed this step)


REPORT_ROWS = 11

_TINY = 1e-30
# up to this many series (the global norm + layers) the detector runs in Python floats. Measured in a
# Trainer, the guard's whole per-step hook on the GPU's code path: Python 1.23-1.47 ms against numpy
# 1.35-1.76 ms for a GPT of 76 layers, about a tie at 101 and 108 series, numpy ahead from ~120
# (by 0.5 ms at 251)
_SCALAR_MAX_SERIES = 112


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of :class:`TrendDetector`; every one is a ``GradGuard`` argument of the same name."""

    warmup_steps: int = 10
    spike_zscore: float = 6.0
    spike_min_ratio: float = 4.0
    warmup_spike_ratio: float = 100.0
    growth_window: int = 50
    growth_factor: float = 10.0
    growth_min_steps: int = 5
    max_norm: float | None = None
    max_update_ratio: float | None = None
    max_grad_weight_ratio: float | None = 20.0
    vanish_factor: float = 1e4
    vanish_drop: float = 1e3
    vanish_floor: float = 0.0
    vanish_patience: int = 50
    # how the running statistics move (log10 units); rarely worth changing
    level_alpha: float = 0.05
    fast_alpha: float = 0.3
    scale_beta: float = 0.05
    clamp_sigmas: float = 3.0
    initial_scale: float = 0.15
    min_scale: float = 0.02

    def to_dict(self) -> dict:
        return asdict(self)


_STATE = ("count", "level", "scale", "fast", "maxseen", "peak", "streak", "ring", "seen")


def _host(x, dtype=np.float64) -> np.ndarray:
    """A host array from a numpy array, a sequence or a *CPU* tensor (never a device tensor: that would sync)."""
    if isinstance(x, Tensor):
        x = x.detach().numpy()
    return np.asarray(x, dtype=dtype)


def _lower_median(values: np.ndarray) -> float:
    """The lower median of the non-NaN values (NaN if none), as ``torch.nanmedian`` defines it."""
    if np.isnan(values).any():
        values = values[~np.isnan(values)]
    if not values.size:
        return math.nan
    k = (values.size - 1) // 2
    return float(np.partition(values, k)[k])


def _series_property(name: str) -> property:
    """A per-series state vector, always read as a numpy array; held as a list of Python floats
    when the detector runs in Python (no conversion per step), as an array otherwise."""

    def get(self) -> np.ndarray:
        value = self._series_state[name]
        return np.array(value) if isinstance(value, list) else value

    def set(self, value) -> None:
        value = np.asarray(value, dtype=np.float64)
        self._series_state[name] = value if self.vectorized else value.tolist()  # numpy: no sync

    return property(get, set, doc=f"``{name}`` of every series (numpy array).")


class TrendDetector:
    """Running trend state over ``num_series`` norms; one per optimizer.

    Host code on a handful of floats per layer: the guard copies the step's
    per-layer sums to the host once (its one sync) and runs this on the copy,
    so the device sees none of the ~100 tiny operations below.

    >>> det = TrendDetector(DetectorConfig(warmup_steps=3), num_series=1)
    >>> for norm in [1.0, 1.1, 0.9, 1.0, 1.05]:
    ...     report = det.update([norm], [True], [False])
    >>> int(det.update([500.0], [True], [False])[Row.CODE, 0]) & Code.SPIKE
    2
    """

    def __init__(self, config: DetectorConfig, num_series: int, *, vectorized: bool | None = None) -> None:
        self.config = config
        self.num_series = num_series
        # few series: plain Python floats in one loop; many: numpy over the series (same results).
        # Right after the backward pass caches are cold, and each distinct numpy function costs
        # microseconds to warm up, while one Python loop warms up once.
        self.vectorized = num_series > _SCALAR_MAX_SERIES if vectorized is None else vectorized
        self.flags = 0  # the last report's code bits of every series or-ed together (0: nothing flagged)
        self.steps = 0  # updates so far
        c, s = config, num_series
        self._series_state: dict[str, np.ndarray | list[float]] = {}  # see _series_property
        self.count = np.zeros(s)
        self.level = np.zeros(s)
        self.scale = np.full(s, c.initial_scale)
        self.fast = np.full(s, math.nan)
        self.maxseen = np.full(s, -math.inf)
        self.peak = np.full(s, -math.inf)
        self.streak = np.zeros(s)
        self.ring = np.full((c.growth_window, s), math.nan)
        self.seen = np.zeros(s)
        # constants of the update, in log10 units
        self._log_spike_min = math.log10(c.spike_min_ratio)
        self._log_warmup_spike = math.log10(c.warmup_spike_ratio)
        self._log_growth = math.log10(c.growth_factor)
        self._log_vanish = math.log10(c.vanish_factor)
        self._log_drop = math.log10(c.vanish_drop)
        self._all_warm = False  # every series past warm-up, with one observation at least: the steady state
        self._unseen = num_series > 1  # some layer series has never had a gradient yet (see _admit)
        self._prev_present: list | np.ndarray | None = None  # the last step's, where a layer had none (else None)

    def update(
        self,
        norm,
        present,
        nonfinite,
        converged: bool | None = None,
        update_ratio=None,
        worsening: bool | None = None,
        weight_norm=None,
        *,
        lists: bool = False,
        slack: float = 0.0,
    ) -> np.ndarray | list[list[float]]:
        """Consume one step's norms (``[S]``) and return the ``[REPORT_ROWS, S]`` float64 report.

        Arrays may be numpy arrays, sequences or CPU tensors. ``present`` marks
        series that had gradients this step; ``converged`` (the loss has
        converged: vanishing is then expected) and ``worsening`` (the loss has
        not improved over the growth window: growing norms are only reported
        as exploding while it holds, since norms also grow in healthy phases,
        sharpening logits, LR warm-up, while the loss falls) are booleans or
        ``None`` (unknown); ``update_ratio`` and ``weight_norm`` are per
        series, NaN where unknown. ``lists``: in the Python-float mode (not
        :attr:`vectorized`), return the report as ``REPORT_ROWS`` lists, valid
        until the next update (some are the live state): no numpy call at all.
        ``slack`` (log10) raises the post-warm-up spike thresholds for this step: the guard passes
        ``0.5 * log10(usual batch / this batch)`` for a smaller batch (an epoch's partial last batch),
        whose gradient noise is larger by the square root of the ratio.
        """
        if self._unseen:
            self._unseen = self._admit(present)
        if not self.vectorized:
            rows = self._update_scalar(norm, present, nonfinite, converged, update_ratio, worsening, weight_norm,
                                       slack)
            return rows if lists else np.array(rows, dtype=np.float64)
        with np.errstate(all="ignore"):  # NaN/Inf are data here (a NaN norm is a finding, not an error)
            return self._update(norm, present, nonfinite, converged, update_ratio, worsening, weight_norm, slack)

    def _returned(self, present) -> bool:
        """A layer without a gradient at the last step has one now (an auxiliary head used every 10th
        step, a task head of alternating batches, an expert routed to again). The global norm then sums
        other layers than the step before, and its jump is no spike of it: it counts as one only if a
        layer's own series spikes too (the returning layer's against its own history)."""
        prev = self._prev_present
        if prev is None:  # every layer had a gradient at the last step
            return False
        return any(now and not before for now, before in zip(list(present)[1:], list(prev)[1:]))

    def _admit(self, present) -> bool:
        """Before a step's update, while some layer has never had a gradient: if one has now (a frozen
        layer was unfrozen, a new param group added, an expert routed to for the first time), the
        global norm covers gradients it never covered, and a jump of it is no explosion; the global
        series starts afresh, warm-up included. Returns whether a layer remains without a gradient.
        A layer whose gradient was there but exactly 0 (dead, or underflowed) has been covered all
        along: its coming back to life is no admission, and an explosion of it is one of the global
        norm too."""
        count = self._series_state["count"]
        if self.vectorized:
            seen, now = self.seen, _host(present, bool)
            unseen = seen == 0
            unseen[0] = False
            admitted, remain = bool((unseen & now).any()), bool((unseen & ~now).any())
            seen[now] = 1.0
            self.seen = seen
        else:  # Python floats, as _update_scalar (frozen layers keep this running every step)
            seen = self._series_state["seen"]  # the live list, updated in place
            present = present if type(present) is list else _host(present, bool).tolist()  # no sync
            unseen = [i for i in range(1, self.num_series) if not seen[i]]
            admitted, remain = any(present[i] for i in unseen), not all(present[i] for i in unseen)
            for i in range(self.num_series):
                if present[i]:
                    seen[i] = 1.0
        if admitted and count[0] > 0:
            _copy_series(self, [0], TrendDetector(self.config, 1), [0])
            self._all_warm = False
        return remain

    def _update_scalar(self, norm, present, nonfinite, converged, update_ratio, worsening, weight_norm,
                       slack: float = 0.0) -> list[list]:
        """:meth:`_update`, series by series in Python floats (the same rules, line for line)."""
        c, n_series, isfinite = self.config, self.num_series, math.isfinite
        # lists are read as they are (the guard's usual step passes lists: no numpy call)
        norm = norm if type(norm) is list else _host(norm).tolist()  # numpy (host arrays only): no sync
        present = present if type(present) is list else _host(present, bool).tolist()  # no sync
        nonfinite = nonfinite if type(nonfinite) is list else _host(nonfinite, bool).tolist()  # no sync
        st = self._series_state  # Python lists in this mode, updated in place
        count, level, scale, fast = st["count"], st["level"], st["scale"], st["fast"]
        maxseen, peak, streak = st["maxseen"], st["peak"], st["streak"]
        level_before, scale_before = list(level), list(scale)
        code, spike_at, finite, ok = [0] * n_series, [0.0] * n_series, [False] * n_series, [False] * n_series
        # loop invariants in locals: this loop runs on every step, on caches the backward pass left cold
        warmup, log10, inf = c.warmup_steps, math.log10, math.inf
        zscore, spike_min, warmup_spike = c.spike_zscore, self._log_spike_min, self._log_warmup_spike
        clamp, level_alpha, scale_beta, min_scale, fast_alpha = (
            c.clamp_sigmas, c.level_alpha, c.scale_beta, c.min_scale, c.fast_alpha)
        SPIKE, NONFINITE = int(Code.SPIKE), int(Code.NONFINITE)  # noqa: N806 - plain ints: IntFlag's | runs Python code
        for i in range(n_series):
            x_norm = norm[i]
            fin = finite[i] = isfinite(x_norm) and not nonfinite[i]
            good = ok[i] = present[i] and fin and x_norm > 0
            x = log10(max(x_norm, _TINY)) if fin else 0.0
            cnt, lv, sc = count[i], level[i], scale[i]
            warm = cnt >= warmup
            # --- spike: z-score on the slow level after warm-up, ratio to the max seen before
            s_log = lv + max(zscore * sc, spike_min) + slack if warm else maxseen[i] + warmup_spike
            spike_at[i] = 10.0**s_log if cnt >= 1 and s_log < 308.0 else inf  # none before the first observation
            if good and cnt >= 1 and x > s_log:
                code[i] = SPIKE
            if present[i] and not fin:
                code[i] |= NONFINITE
            if not good:
                continue
            # --- running statistics, with finite, positive observations only
            dev = x - lv
            if warm:
                bound = clamp * sc
                rate, step, scale_rate = level_alpha, min(max(dev, -bound), bound), scale_beta
            else:  # warm-up: mean with the prior
                rate, step, scale_rate = 1.0 / (cnt + 1.0), dev, 1.0 / (cnt + 2.0)
            if cnt == 0:
                level[i] = fast[i] = x
            else:
                level[i] = lv + rate * step
                scale[i] = max(sc + scale_rate * (abs(step) - sc), min_scale)
                # the fast level ignores the excess of a spike, so one spike is not mistaken for growth
                fast[i] += fast_alpha * ((min(x, s_log) if warm else x) - fast[i])
            if x > maxseen[i]:
                maxseen[i] = x
            count[i] = cnt + 1.0
            # the peak: the fast level from the end of the warm-up on (spikes aside; it ignores their excess
            # then), and the warm-up's mean level, where gradients that collapse within the warm-up fall from
            # (a spike in it moves that mean by its share of the warm-up only, unlike the fast level)
            if cnt + 1.0 >= warmup and not code[i] and fast[i] > peak[i]:
                peak[i] = fast[i]
            if cnt + 1.0 == warmup and level[i] > peak[i]:
                peak[i] = level[i]

        if c.max_norm is not None and finite[0] and norm[0] > c.max_norm:
            code[0] |= Code.CEILING
        grad_weight = [math.nan] * n_series
        if weight_norm is not None:
            for i, w in enumerate(_host(weight_norm).tolist()):  # host values (never a device tensor): no sync
                if w > 0:
                    grad_weight[i] = norm[i] / max(w, _TINY)
            if c.max_grad_weight_ratio is not None and finite[0] and grad_weight[0] > c.max_grad_weight_ratio:
                code[0] |= Code.GRAD_WEIGHT
        ratio_row = [math.nan] * n_series if update_ratio is None else _host(update_ratio).tolist()  # host values: no sync
        if update_ratio is not None and c.max_update_ratio is not None:
            for i in range(n_series):
                if present[i] and ratio_row[i] > c.max_update_ratio:
                    code[i] |= Code.UPDATE_RATIO

        # --- growth of the fast level over the window (ring of past fast levels)
        w = c.growth_window
        ring = st["ring"]  # a list of rows in this mode; a row is replaced, never changed
        ring[self.steps % w] = list(fast)
        self.steps += 1
        base = ring[self.steps % w] if self.steps >= w else ring[0]
        if min(self.steps - 1, w - 1) >= c.growth_min_steps and (worsening is None or bool(worsening)):
            for i in range(n_series):
                if ok[i] and fast[i] - base[i] > self._log_growth:
                    code[i] |= Code.GROWTH

        # --- vanishing: dead, far below the median layer, or far below its own peak
        known = [present[i] and count[i] > 0 for i in range(n_series)]
        layers = sorted(fast[i] for i in range(1, n_series) if known[i])
        median = layers[(len(layers) - 1) // 2] if layers else math.nan  # the lower median, as torch's
        vanish_ref = list(peak)
        flag_vanish = converged is None or not bool(converged)
        floor, log_vanish, log_drop, patience = c.vanish_floor, self._log_vanish, self._log_drop, c.vanish_patience
        for i in range(n_series):
            dead = present[i] and finite[i] and norm[i] <= floor
            rel = i > 0 and known[i] and median - fast[i] > log_vanish
            drop = known[i] and count[i] >= warmup and peak[i] - fast[i] > log_drop
            if rel:
                vanish_ref[i] = median
            streak[i] = streak[i] + 1.0 if dead or rel or drop else 0.0
            if flag_vanish and streak[i] >= patience:
                code[i] |= Code.VANISH | (Code.DEAD if dead else 0) | (Code.REL if rel else 0) | (Code.DROP if drop else 0)

        if code[0] & SPIKE and self._returned(present) and not any(code[i] & SPIKE for i in range(1, n_series)):
            code[0] &= ~SPIKE  # see _returned
        self._prev_present = None if all(present) else list(present)
        self.flags = functools.reduce(operator.or_, code, 0)
        return [code, norm, level_before, scale_before, spike_at, fast, base, vanish_ref, streak, ratio_row,
                grad_weight]

    def _update(self, norm, present, nonfinite, converged, update_ratio, worsening, weight_norm,
                slack: float = 0.0) -> np.ndarray:
        # Host numpy on [S] vectors: the cost is ~1 us per call, whatever S, so the steady state
        # (every series warm, every value finite, the usual step) takes a shorter path with fewer calls.
        c = self.config
        norm = _host(norm)
        present = _host(present, bool)
        finite = np.isfinite(norm)
        all_finite = bool(finite.all())
        if not all_finite or _host(nonfinite, bool).any():
            finite &= ~_host(nonfinite, bool)
            all_finite = False
        ok = present & finite & (norm > 0)
        x = np.log10(np.maximum(norm, _TINY))
        if not all_finite:
            x[~finite] = 0.0  # a placeholder, never used where not finite
        count, level, scale, fast = self.count, self.level, self.scale, self.fast
        report = np.empty((REPORT_ROWS, self.num_series))
        report[Row.NORM], report[Row.LEVEL], report[Row.SCALE] = norm, level, scale

        bound = c.clamp_sigmas * scale
        steady = self._all_warm
        if steady:  # steady state: every series past warm-up
            # --- spike: a z-score on the slow level
            spike_log = level + np.maximum(c.spike_zscore * scale, self._log_spike_min) + slack
            code = (ok & (x > spike_log)) * Code.SPIKE
            # --- running statistics, with finite, positive observations only
            step = np.clip(x - level, -bound, bound)
            self.level = np.where(ok, level + c.level_alpha * step, level)
            self.scale = np.where(ok, np.maximum(scale + c.scale_beta * (np.abs(step) - scale), c.min_scale), scale)
            # the fast level ignores the excess of a spike, so one spike is not mistaken for growth
            self.fast = np.where(ok, fast + c.fast_alpha * (np.minimum(x, spike_log) - fast), fast)
            self.maxseen = np.where(ok, np.maximum(self.maxseen, x), self.maxseen)
            self.count = count + ok
            self.peak = np.where(ok & (code == 0), np.maximum(self.peak, self.fast), self.peak)
            known = present
        else:
            warm = count >= c.warmup_steps
            # --- spike: z-score on the slow level after warm-up, ratio to the max seen before
            spike_log = np.where(
                warm, level + np.maximum(c.spike_zscore * scale, self._log_spike_min) + slack,
                self.maxseen + self._log_warmup_spike,
            )
            code = (ok & (count >= 1) & (x > spike_log)) * Code.SPIKE
            # --- running statistics, with finite, positive observations only
            dev = x - level
            in_warmup = ~warm
            rate = np.where(in_warmup, 1.0 / (count + 1.0), c.level_alpha)
            step = np.where(in_warmup, dev, np.clip(dev, -bound, bound))
            scale_rate = np.where(in_warmup, 1.0 / (count + 2.0), c.scale_beta)  # warm-up: mean with the prior
            new_scale = np.maximum(scale + scale_rate * (np.abs(step) - scale), c.min_scale)
            first = count == 0
            self.level = np.where(ok, np.where(first, x, level + rate * step), level)
            self.scale = np.where(ok & ~first, new_scale, scale)
            x_fast = np.where(warm, np.minimum(x, spike_log), x)
            self.fast = np.where(ok, np.where(first, x, fast + c.fast_alpha * (x_fast - fast)), fast)
            self.maxseen = np.where(ok, np.maximum(self.maxseen, x), self.maxseen)
            self.count = count + ok
            warm_now = self.count >= c.warmup_steps  # the peak: see _update_scalar
            self.peak = np.where(ok & warm_now & (code == 0), np.maximum(self.peak, self.fast), self.peak)
            self.peak = np.where(ok & (self.count == c.warmup_steps), np.maximum(self.peak, self.level), self.peak)
            self._all_warm = bool(self.count.min() >= max(c.warmup_steps, 1))
            known = present & (self.count > 0)
        report[Row.SPIKE_AT] = np.power(10.0, spike_log)
        if not steady:
            report[Row.SPIKE_AT][count < 1] = np.inf  # no threshold before a series' first observation
        report[Row.FAST] = self.fast

        if not all_finite:
            code |= (present & ~finite) * Code.NONFINITE
        if c.max_norm is not None and finite[0] and norm[0] > c.max_norm:
            code[0] |= Code.CEILING
        if weight_norm is None:
            report[Row.GRAD_WEIGHT] = math.nan
        else:
            weight_norm = _host(weight_norm)
            grad_weight = report[Row.GRAD_WEIGHT]
            grad_weight[:] = np.where(weight_norm > 0, norm / np.maximum(weight_norm, _TINY), math.nan)
            if c.max_grad_weight_ratio is not None and finite[0] and grad_weight[0] > c.max_grad_weight_ratio:
                code[0] |= Code.GRAD_WEIGHT
        if update_ratio is None:
            report[Row.UPDATE_RATIO] = math.nan
        else:
            report[Row.UPDATE_RATIO] = _host(update_ratio)
            if c.max_update_ratio is not None:
                code |= (present & (report[Row.UPDATE_RATIO] > c.max_update_ratio)) * Code.UPDATE_RATIO

        # --- growth of the fast level over the window (ring of past fast levels)
        w = c.growth_window
        self.ring[self.steps % w] = self.fast
        self.steps += 1
        base = report[Row.GROWTH_BASE]
        base[:] = self.ring[self.steps % w] if self.steps >= w else self.ring[0]
        if min(self.steps - 1, w - 1) >= c.growth_min_steps and (worsening is None or bool(worsening)):
            code |= (ok & (self.fast - base > self._log_growth)) * Code.GROWTH

        # --- vanishing: dead, far below the median layer, or far below its own peak
        median = math.nan
        if self.num_series > 1:
            layers = self.fast[1:]
            if not known[1:].all():
                layers = layers[known[1:]]
            median = _lower_median(layers)
        dead = present & finite & (norm <= c.vanish_floor)
        rel = known & (median - self.fast > self._log_vanish)
        rel[0] = False  # the global norm has no median to compare with
        drop = known & (self.peak - self.fast > self._log_drop)
        if not self._all_warm:
            drop &= self.count >= c.warmup_steps
        cond = dead | rel | drop
        self.streak = np.where(cond, self.streak + 1, 0.0)
        report[Row.STREAK] = self.streak
        vanish = self.streak >= c.vanish_patience
        if (converged is None or not bool(converged)) and vanish.any():
            code |= vanish * Code.VANISH + (vanish & dead) * Code.DEAD + (vanish & rel) * Code.REL
            code |= (vanish & drop) * Code.DROP
        report[Row.VANISH_REF] = np.where(rel, median, self.peak)
        spike = int(Code.SPIKE)
        if code[0] & spike and self._returned(present) and not (code[1:] & spike).any():
            code[0] &= ~spike  # see _returned
        self._prev_present = None if present.all() else present.copy()
        report[Row.CODE] = code
        self.flags = int(np.bitwise_or.reduce(code))
        return report

    count = _series_property("count")  # finite, positive observations so far
    level = _series_property("level")  # slow robust running level (log10)
    scale = _series_property("scale")  # its robust deviation (log10)
    fast = _series_property("fast")  # fast running level (log10)
    maxseen = _series_property("maxseen")  # largest log10 norm seen
    peak = _series_property("peak")  # highest fast level after warm-up (spikes aside), or the warm-up's mean level
    streak = _series_property("streak")  # consecutive steps the vanishing condition held
    ring = _series_property("ring")  # [growth_window, S] past fast levels (a list of rows in Python mode)
    seen = _series_property("seen")  # 1 once the series has had a gradient (was present) at some step

    def admits(self, present: np.ndarray) -> bool:
        """Would an update with these series present (a host bool array, index 0 the global) admit a
        layer's first gradient, and so restart the global series (see :meth:`update`)?"""
        return self._unseen and bool((present[1:] & (self.seen[1:] == 0)).any())

    def returns(self, present: np.ndarray) -> bool:
        """Would an update with these series present (a host bool array, index 0 the global) see a layer
        back after a step without gradient, and so not count a jump of the global norm alone as a spike
        (see :meth:`_returned`)?"""
        return self._returned(present)

    def next_spike_at(self, slack: float = 0.0) -> np.ndarray:
        """Each series' spike threshold for the next update, from the state after the last one: the
        norm above which it would be flagged (``inf`` for a series with no observation yet); ``slack``
        as for :meth:`update`."""
        c = self.config
        count, level, scale = self.count, self.level, self.scale
        spike_log = np.where(count >= c.warmup_steps,
                             level + np.maximum(c.spike_zscore * scale, self._log_spike_min) + slack,
                             self.maxseen + self._log_warmup_spike)
        with np.errstate(over="ignore"):
            return np.where(count >= 1, np.power(10.0, spike_log), np.inf)

    def clip_threshold(self, report: np.ndarray) -> float:
        """The global norm this step is clipped to: the spike threshold, or ``max_norm`` (inf: no clipping)."""
        threshold = float(report[Row.SPIKE_AT, 0])
        if self.config.max_norm is not None:
            threshold = min(threshold, self.config.max_norm)
        return math.inf if math.isnan(threshold) else threshold  # (inf before the first observation)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain, small state (CPU tensors and numbers), safe for ``torch.load(weights_only=True)``."""
        state = {name: torch.from_numpy(getattr(self, name).copy()) for name in _STATE}
        state["steps"] = self.steps
        state["num_series"] = self.num_series
        if self._prev_present is not None:  # which layers had a gradient at the last step (see _returned)
            state["prev_present"] = torch.tensor([bool(v) for v in self._prev_present])
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; state for another layout (the model changed) is ignored."""
        if state.get("num_series") != self.num_series:
            return
        for name in _STATE:
            value = state.get(name)
            current = getattr(self, name)
            if isinstance(value, Tensor) and tuple(value.shape) == current.shape:
                setattr(self, name, value.detach().cpu().double().numpy().copy())
        self.steps = int(state.get("steps", self.steps))
        if not isinstance(state.get("seen"), Tensor):  # a checkpoint from before "seen" was kept
            self.seen = self.count > 0
        self._all_warm = bool(self.count.min() >= max(self.config.warmup_steps, 1))
        self._unseen = bool((self.seen[1:] == 0).any())
        prev = state.get("prev_present")
        self._prev_present = None if not (isinstance(prev, Tensor) and prev.numel() == self.num_series) else (
            prev.bool().numpy().copy() if self.vectorized else prev.bool().tolist())

    def remap(self, source: Sequence[int | None]) -> TrendDetector:
        """A detector of ``len(source)`` series where series ``j`` goes on from this one's series
        ``source[j]``, or starts afresh (warm-up included) where that is ``None``: for a model
        whose watched layers changed mid-run (a backbone unfrozen into a new param group).

        >>> old = TrendDetector(DetectorConfig(), 2)
        >>> _ = old.update([1.0, 1.0], [True, True], [False, False])
        >>> new = old.remap([None, 1, None])
        >>> new.count.tolist(), new.steps
        ([0.0, 1.0, 0.0], 1)
        """
        new = TrendDetector(self.config, len(source))
        kept = [(j, i) for j, i in enumerate(source) if i is not None]
        if kept:
            _copy_series(new, [j for j, _ in kept], self, [i for _, i in kept])
        new.steps = self.steps
        new._all_warm = bool(new.count.min() >= max(self.config.warmup_steps, 1))
        new._unseen = bool((new.seen[1:] == 0).any())
        return new


def _copy_series(dst: TrendDetector, to: list[int], src: TrendDetector, frm: list[int]) -> None:
    """Series ``to`` of ``dst`` take the whole state of series ``frm`` of ``src``."""
    for name in _STATE:
        values = getattr(dst, name)  # a copy in the Python-float mode, set back below
        values[..., to] = getattr(src, name)[..., frm]
        setattr(dst, name, values)


def config_fields() -> tuple[str, ...]:
    """Names of every :class:`DetectorConfig` threshold (``GradGuard`` arguments)."""
    return tuple(f.name for f in fields(DetectorConfig))


JITTER_MARGIN = 3.0  # LossTrend.worsening: the rise must exceed this many times the loss's jitter
# LossTrend.improving: the fall must exceed this many times the loss's jitter. Measured (rescue benchmark,
# 3 seeds): at 2 the LR faults held down by the growth anchors end as before (lr_too_high 9.46, lr_jump
# x100 79.7) while a healthy change of phase is let go; at 1, lr_too_high ended at 15.9
IMPROVING_MARGIN = 2.0


class LossTrend:
    """The loss's running level (host floats): the gates of growth and vanishing.

    * ``converged()``: the running level fell below ``converged_ratio`` of its
      initial level (the mean of the first ``warmup`` finite losses): small
      gradients are then expected, not vanishing. Off for losses that start
      at or below zero (a ratio means nothing there).
    * ``improving()``: the running level fell over the last ``window`` steps by
      more than 1% of the initial level and ``IMPROVING_MARGIN`` x the jitter:
      the gate that loosens the guard's growth anchors (a loss falling while
      the clip holds the norms down is a healthy new phase, not a divergence).
    * ``worsening()``: the running level (of finite losses) rose over the last
      ``window`` steps by more than ``noise`` x the initial level, and by more
      than ``JITTER_MARGIN`` x the loss's own jitter (the running mean of
      ``|loss - level|``) at the start of the window: growing norms are then
      a divergence. The first margin ignores the wobble of a loss that has
      already converged (1e-3 wobbling to 2e-3 is not a divergence of a loss
      that started at 1); the second, the few bad batches that lift the level
      of a small-batch run (batch 4: most losses ~0.03, some 1-3) without
      anything diverging. A NaN/Inf loss does not open this gate by itself
      (its gradients are reported as non-finite; one skipped NaN step must not
      turn healthy growth into an alarm).

    Both are ``None`` before the first loss. The guard feeds it the losses of
    the previous step, which ride along with the gradient statistics in the
    step's one device-to-host copy.

    >>> trend = LossTrend(warmup=2, window=10, converged_ratio=0.01)
    >>> for loss in [2.0, 2.0, 1.0, 0.5]:
    ...     trend.observe(loss)
    >>> trend.worsening(), trend.converged()
    (False, False)
    >>> for loss in [3.0] * 5:
    ...     trend.observe(loss)
    >>> trend.worsening()
    True
    >>> for loss in [1e-4] * 80:
    ...     trend.observe(loss)
    >>> trend.converged()
    True
    """

    def __init__(
        self, warmup: int, window: int, converged_ratio: float, rate: float = 0.1, noise: float = 0.01
    ) -> None:
        self.warmup, self.window, self.converged_ratio, self.rate, self.noise = warmup, window, converged_ratio, rate, noise
        self.seen = 0
        self.first: float | None = None
        self.fast: float | None = None
        self.ring: list[float] | None = None
        self.jitter = 0.0  # running mean of |loss - running level|: the loss's own batch-to-batch noise
        self.jitter_ring: list[float] | None = None  # the jitter at each of the ring's steps

    def observe(self, loss: float) -> None:
        loss = float(loss)
        finite = math.isfinite(loss)
        if self.first is None:
            self.first = loss if finite else math.nan
            self.fast = self.first
            self.ring = [math.nan] * self.window
            self.jitter_ring = [0.0] * self.window
        if finite:
            if self.seen < self.warmup:
                self.first = loss if math.isnan(self.first) else self.first + (loss - self.first) / (self.seen + 1)
            if not math.isnan(self.fast):
                self.jitter += self.rate * (abs(loss - self.fast) - self.jitter)
            self.fast = loss if math.isnan(self.fast) else self.fast + self.rate * (loss - self.fast)
        self.ring[self.seen % self.window] = self.fast
        self.jitter_ring[self.seen % self.window] = self.jitter
        self.seen += 1

    def converged(self) -> bool | None:
        if self.first is None:
            return None
        return self.first > 0 and self.fast < self.converged_ratio * self.first

    def worsening(self) -> bool | None:
        if self.ring is None:
            return None
        then, margin = self._window_start()
        return self.fast > then + margin

    def improving(self) -> bool | None:
        """The running level fell over the last ``window`` steps by more than 1% of the initial level and
        ``IMPROVING_MARGIN`` x the loss's jitter then (``False`` while fewer steps were seen)."""
        if self.ring is None:
            return None
        then, margin = self._window_start(IMPROVING_MARGIN)
        return self.seen >= self.window and self.fast < then - margin

    def _window_start(self, jitters: float = JITTER_MARGIN) -> tuple[float, float]:
        """The running level ``window`` steps ago (the first one while fewer were seen), and the margin a
        change of it must exceed: 1% (``noise``) of the initial level, and ``jitters`` x the loss's own
        jitter then (with small batches a few bad batches lift the running level of a healthy, converged
        loss by more than 1% of the initial one)."""
        at = self.seen % self.window if self.seen >= self.window else 0
        return self.ring[at], max(self.noise * abs(self.first), jitters * self.jitter_ring[at])

    def state_dict(self) -> dict:
        if self.first is None:
            return {"seen": self.seen}
        return {"seen": self.seen, "levels": torch.tensor([self.first, self.fast], dtype=torch.float64),
                "ring": torch.tensor(self.ring, dtype=torch.float64),
                "jitter": torch.tensor([self.jitter, *self.jitter_ring], dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        levels, ring = state.get("levels"), state.get("ring")
        if not (isinstance(levels, Tensor) and levels.numel() == 2 and isinstance(ring, Tensor)):
            return  # nothing observed yet (or not a LossTrend's state): starts afresh, warm-up included
        self.seen = int(state.get("seen", 0))
        self.first, self.fast = (float(v) for v in levels.double().tolist())
        old = [float(v) for v in ring.double().tolist()]
        jitter = state.get("jitter")  # absent from checkpoints written before it was kept: no jitter margin yet
        if not (isinstance(jitter, Tensor) and jitter.numel() == len(old) + 1):
            jitter = torch.zeros(len(old) + 1)
        jitter = [float(v) for v in jitter.double().tolist()]
        self.jitter, old_jitter = jitter[0], jitter[1:]
        # a ring of another size (growth_window changed since the checkpoint): the latest levels it holds
        # go where this window expects them, the older slots wait as at the start (NaN)
        self.ring, self.jitter_ring = [math.nan] * self.window, [0.0] * self.window
        for s in range(max(0, self.seen - min(len(old), self.window)), self.seen):
            self.ring[s % self.window] = old[s % len(old)]
            self.jitter_ring[s % self.window] = old_jitter[s % len(old)]
