"""Trend detectors: robust running statistics of gradient norms, on the device.

:class:`TrendDetector` follows a set of *series* (series 0 is the global norm,
series ``1..L`` the layers of a :class:`~lightning_gradguard.stats.LayerPlan`)
in log10 space and flags, every step, without a host sync:

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

The caller gets one packed ``[REPORT_ROWS, S]`` float32 tensor per step (see
:data:`REPORT_ROWS`); turning it into events is host work, done once per step
after the single sync (see :mod:`lightning_gradguard.callback`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

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
    """Rows of the packed report, each a float32 vector over the series."""

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
_LOG_TINY = -30.0


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


_STATE = ("count", "level", "scale", "fast", "maxseen", "peak", "streak", "ring")


class TrendDetector:
    """Running trend state over ``num_series`` norms; one per optimizer.

    >>> det = TrendDetector(DetectorConfig(warmup_steps=3), num_series=1)
    >>> for norm in [1.0, 1.1, 0.9, 1.0, 1.05]:
    ...     report = det.update(torch.tensor([norm]), torch.tensor([True]), torch.tensor([False]))
    >>> int(det.update(torch.tensor([500.0]), torch.tensor([True]), torch.tensor([False]))[Row.CODE, 0]) & Code.SPIKE
    2
    """

    def __init__(self, config: DetectorConfig, num_series: int, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.num_series = num_series
        self.steps = 0  # updates so far: a host integer, so ring indexing needs no sync
        c, s = config, num_series
        f32 = dict(dtype=torch.float32, device=device)
        self.count = torch.zeros(s, **f32)
        self.level = torch.zeros(s, **f32)
        self.scale = torch.full((s,), c.initial_scale, **f32)
        self.fast = torch.full((s,), math.nan, **f32)
        self.maxseen = torch.full((s,), -math.inf, **f32)
        self.peak = torch.full((s,), -math.inf, **f32)
        self.streak = torch.zeros(s, **f32)
        self.ring = torch.full((c.growth_window, s), math.nan, **f32)
        self._bits: dict[tuple, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.level.device

    def update(
        self,
        norm: Tensor,
        present: Tensor,
        nonfinite: Tensor,
        converged: Tensor | None = None,
        update_ratio: Tensor | None = None,
        worsening: Tensor | None = None,
        weight_norm: Tensor | None = None,
    ) -> Tensor:
        """Consume one step's norms (``[S]``) and return the packed ``[REPORT_ROWS, S]`` report.

        ``present`` marks series that had gradients this step; ``converged`` is a
        boolean scalar (the loss has converged: vanishing is then expected);
        ``update_ratio`` is per series, NaN where unknown; ``worsening`` is a
        boolean scalar (the loss has not improved over the growth window):
        growing norms are only reported as exploding while it holds, since
        norms also grow in healthy phases (sharpening logits, LR warm-up)
        while the loss falls. ``weight_norm`` is per series (NaN where unknown).
        """
        c = self.config
        norm = norm.to(self.device, torch.float32)
        finite = torch.isfinite(norm) & ~nonfinite.to(self.device)
        present = present.to(self.device)
        ok = present & finite & (norm > 0)
        x = torch.log10(norm.clamp_min(_TINY))
        x = torch.where(finite, x, torch.zeros_like(x))  # placeholder; never used where not finite
        warm = self.count >= c.warmup_steps
        level, scale = self.level, self.scale

        # --- spike: z-score on the slow level after warm-up, ratio to the max seen before
        spike_log = torch.where(
            warm,
            level + torch.clamp(c.spike_zscore * scale, min=math.log10(c.spike_min_ratio)),
            self.maxseen + math.log10(c.warmup_spike_ratio),
        )
        spike = ok & (self.count >= 1) & (x > spike_log)
        # (bit, bool mask) pairs, packed into one code row at the end with a single weighted sum
        flags: list[tuple[int, Tensor]] = [(Code.SPIKE, spike), (Code.NONFINITE, present & ~finite)]
        only_global = torch.zeros_like(present)
        only_global[0] = True
        if c.max_norm is not None:
            flags.append((Code.CEILING, only_global & finite & (norm > c.max_norm)))
        grad_weight = torch.full_like(norm, math.nan)
        if weight_norm is not None:
            weight_norm = weight_norm.to(self.device, torch.float32)
            grad_weight = torch.where(weight_norm > 0, norm / weight_norm.clamp_min(_TINY), math.nan)
            if c.max_grad_weight_ratio is not None:
                flags.append((Code.GRAD_WEIGHT, only_global & finite & (grad_weight > c.max_grad_weight_ratio)))
        if update_ratio is not None and c.max_update_ratio is not None:
            over = present & (update_ratio.to(self.device) > c.max_update_ratio)
            flags.append((Code.UPDATE_RATIO, over))

        # --- update the running statistics with finite, positive observations only
        dev = x - level
        in_warmup = ~warm
        rate = torch.where(in_warmup, 1.0 / (self.count + 1.0), c.level_alpha)
        bound = c.clamp_sigmas * scale
        step = torch.where(in_warmup, dev, torch.maximum(torch.minimum(dev, bound), -bound))
        scale_rate = torch.where(in_warmup, 1.0 / (self.count + 2.0), c.scale_beta)  # warm-up: mean with the prior
        new_scale = (scale + scale_rate * (step.abs() - scale)).clamp_min(c.min_scale)
        new_level = torch.where(self.count == 0, x, level + rate * step)
        self.level = torch.where(ok, new_level, level)
        self.scale = torch.where(ok & (self.count > 0), new_scale, scale)
        # the fast level ignores the excess of a spike, so one spike is not mistaken for growth
        x_fast = torch.where(warm, torch.minimum(x, spike_log), x)
        new_fast = torch.where(self.count == 0, x, self.fast + c.fast_alpha * (x_fast - self.fast))
        self.fast = torch.where(ok, new_fast, self.fast)
        self.maxseen = torch.where(ok, torch.maximum(self.maxseen, x), self.maxseen)
        self.count = self.count + ok.float()
        warm_now = self.count >= c.warmup_steps
        self.peak = torch.where(ok & warm_now, torch.maximum(self.peak, self.fast), self.peak)

        # --- growth of the fast level over the window (ring of past fast levels)
        w = c.growth_window
        self.ring[self.steps % w] = self.fast
        self.steps += 1
        lag = min(self.steps - 1, w - 1)
        base = self.ring[self.steps % w] if self.steps >= w else self.ring[0]
        if lag >= c.growth_min_steps:
            grew = ok & (self.fast - base > math.log10(c.growth_factor))
            if worsening is not None:
                grew = grew & worsening.to(self.device)
            flags.append((Code.GROWTH, grew))

        # --- vanishing: dead, far below the median layer, or far below its own peak
        known = present & (self.count > 0)
        layer_fast = torch.where(known[1:], self.fast[1:], math.nan)
        median = torch.nanmedian(layer_fast) if self.num_series > 1 else torch.tensor(math.nan, device=self.device)
        median_row = torch.full_like(self.fast, math.nan)
        median_row[1:] = median
        dead = present & finite & (norm <= c.vanish_floor)
        rel = known & (median_row - self.fast > math.log10(c.vanish_factor))
        drop = known & warm_now & (self.peak - self.fast > math.log10(c.vanish_drop))
        cond = dead | rel | drop
        self.streak = torch.where(cond, self.streak + 1, 0.0)
        vanish = self.streak >= c.vanish_patience
        if converged is not None:
            vanish = vanish & ~converged.to(self.device)
        flags += [(Code.VANISH, vanish), (Code.DEAD, vanish & dead), (Code.REL, vanish & rel), (Code.DROP, vanish & drop)]
        key = tuple(b for b, _ in flags)
        bits = self._bits.get(key)
        if bits is None:  # a handful of combinations: copied to the device once each
            bits = self._bits[key] = torch.tensor(key, dtype=torch.float32).to(self.device)
        code = bits @ torch.stack([m for _, m in flags]).float()  # distinct bits: the sum is the bitwise or

        vanish_ref = torch.where(rel, median_row, self.peak)
        ratio_row = update_ratio.to(self.device, torch.float32) if update_ratio is not None else torch.full_like(norm, math.nan)
        return torch.stack(
            [
                code,
                norm,
                level,
                scale,
                torch.pow(10.0, spike_log),
                self.fast,
                base,
                vanish_ref,
                self.streak,
                ratio_row,
                grad_weight,
            ]
        )

    def clip_threshold(self, report: Tensor) -> Tensor:
        """The global norm this step is clipped to (device scalar): the spike threshold, or ``max_norm``."""
        threshold = report[Row.SPIKE_AT, 0]
        if self.config.max_norm is not None:
            threshold = torch.clamp(threshold, max=self.config.max_norm)
        # before the first observation there is no threshold: inf means "no clipping"
        return torch.nan_to_num(threshold, nan=math.inf)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain, small state (CPU tensors and numbers), safe for ``torch.load(weights_only=True)``."""
        state = {name: getattr(self, name).detach().cpu().clone() for name in _STATE}  # sync: checkpoint time only
        state["steps"] = self.steps
        state["num_series"] = self.num_series
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; state for another layout (the model changed) is ignored."""
        if state.get("num_series") != self.num_series:
            return
        for name in _STATE:
            value = state.get(name)
            current = getattr(self, name)
            if isinstance(value, Tensor) and value.shape == current.shape:
                setattr(self, name, value.to(device=current.device, dtype=current.dtype).clone())
        self.steps = int(state.get("steps", self.steps))


def config_fields() -> tuple[str, ...]:
    """Names of every :class:`DetectorConfig` threshold (``GradGuard`` arguments)."""
    return tuple(f.name for f in fields(DetectorConfig))


class LossTrend:
    """The loss's running level on the device: the gates of growth and vanishing.

    * ``converged()``: the running level fell below ``converged_ratio`` of its
      initial level (the mean of the first ``warmup`` finite losses): small
      gradients are then expected, not vanishing. Off for losses that start
      at or below zero (a ratio means nothing there).
    * ``worsening()``: the running level (of finite losses) rose over the last
      ``window`` steps by more than ``noise`` x the initial level: growing norms
      are then a divergence. The margin ignores the jitter of a loss that has
      already converged (1e-3 wobbling to 2e-3 is not a divergence of a loss
      that started at 1). A NaN/Inf loss does not open this gate by itself
      (its gradients are reported as non-finite; one skipped NaN step must not
      turn healthy growth into an alarm).

    >>> trend = LossTrend(warmup=2, window=3, converged_ratio=0.01)
    >>> for loss in [2.0, 2.0, 1.0, 0.5]:
    ...     trend.observe(torch.tensor(loss))
    >>> bool(trend.worsening()), bool(trend.converged())
    (False, False)
    >>> for loss in [3.0] * 5:
    ...     trend.observe(torch.tensor(loss))
    >>> bool(trend.worsening())
    True
    >>> for loss in [1e-4] * 80:
    ...     trend.observe(torch.tensor(loss))
    >>> bool(trend.converged())
    True
    """

    def __init__(
        self, warmup: int, window: int, converged_ratio: float, rate: float = 0.1, noise: float = 0.01
    ) -> None:
        self.warmup, self.window, self.converged_ratio, self.rate, self.noise = warmup, window, converged_ratio, rate, noise
        self.seen = 0  # host counter: ring indexing needs no sync
        self.first: Tensor | None = None
        self.fast: Tensor | None = None
        self.ring: Tensor | None = None

    def observe(self, loss: Tensor) -> None:
        loss = loss.detach().float().reshape(())
        finite = torch.isfinite(loss)
        if self.first is None:
            self.first = torch.where(finite, loss, math.nan)
            self.fast = self.first.clone()
            self.ring = torch.full((self.window,), math.nan, device=loss.device)
        if self.seen < self.warmup:
            mean = torch.where(torch.isnan(self.first), loss, self.first + (loss - self.first) / (self.seen + 1))
            self.first = torch.where(finite, mean, self.first)
        blended = torch.where(torch.isnan(self.fast), loss, self.fast + self.rate * (loss - self.fast))
        self.fast = torch.where(finite, blended, self.fast)
        self.ring[self.seen % self.window] = self.fast
        self.seen += 1

    def converged(self) -> Tensor | None:
        if self.first is None:
            return None
        return (self.first > 0) & (self.fast < self.converged_ratio * self.first)

    def worsening(self) -> Tensor | None:
        if self.ring is None:
            return None
        oldest = self.ring[self.seen % self.window] if self.seen >= self.window else self.ring[0]
        return self.fast > oldest + self.noise * self.first.abs()

    def state_dict(self) -> dict:
        if self.first is None:
            return {"seen": self.seen}
        # sync: checkpoint time only
        levels, ring = torch.stack([self.first, self.fast]).cpu(), self.ring.cpu()  # sync: checkpoint time only
        return {"seen": self.seen, "levels": levels, "ring": ring}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.seen = int(state.get("seen", 0))
        levels, ring = state.get("levels"), state.get("ring")
        if isinstance(levels, Tensor) and levels.numel() == 2 and isinstance(ring, Tensor) and ring.numel() == self.window:
            self.first, self.fast = levels[0].to(device).clone(), levels[1].to(device).clone()
            self.ring = ring.to(device).clone()

    def to(self, device: torch.device) -> None:
        if self.first is not None:
            self.first, self.fast, self.ring = self.first.to(device), self.fast.to(device), self.ring.to(device)
