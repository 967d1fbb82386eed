"""Weights & Biases: alerts that name the problem, gradient-flow pictures, run summary.

Everything here uses the run that the user's ``WandbLogger`` (or an active
``wandb.run``) owns; it never calls ``wandb.init`` or ``wandb.finish``.
Without ``wandb`` installed nothing here runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WandbSink", "wandb_run"]


def wandb_run(trainer: Any) -> Any | None:
    """The W&B run of the Trainer's ``WandbLogger``, else the active ``wandb.run``, else ``None``.

    Rank 0 only: on other ranks the logger's experiment is a no-op and ``None`` is returned.
    """
    if not getattr(trainer, "is_global_zero", True):
        return None
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        return None
    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, WandbLogger):
            return logger.experiment
    import wandb

    return wandb.run


import time  # noqa: E402

from lightning_gradguard.sinks import GuardSink  # noqa: E402

# event severity -> W&B alert level
_LEVELS = {"nonfinite": "ERROR", "exploding": "WARN", "vanishing": "WARN"}


class WandbSink(GuardSink):
    """Alerts and the run summary on the W&B run of the Trainer.

    Args:
        alert_window_s: an alert for the same (kind, layer) is sent at most once
            per this many seconds (the W&B client does no rate limiting itself).
        max_alerts: at most this many alerts per run; later events are still
            logged and counted.
    """

    def __init__(self, alert_window_s: float = 600.0, max_alerts: int = 20) -> None:
        if not isinstance(alert_window_s, (int, float)) or alert_window_s < 0:
            raise ValueError(f"`alert_window_s` must be a number of seconds >= 0, got {alert_window_s!r}.")
        if not isinstance(max_alerts, int) or max_alerts < 0:
            raise ValueError(f"`max_alerts` must be an integer >= 0, got {max_alerts!r}.")
        self.alert_window_s = alert_window_s
        self.max_alerts = max_alerts
        self.run: Any = None
        self._last_alert: dict[tuple, float] = {}
        self.alerts_sent = 0
        self.alerts_suppressed = 0

    def setup(self, guard, trainer) -> None:
        self.run = wandb_run(trainer)

    def on_event(self, guard, trainer, event) -> None:
        if self.run is None or "alert" not in event.actions:
            return
        key = (event.kind, event.layer, event.optimizer)
        now = time.monotonic()
        last = self._last_alert.get(key)
        if (last is not None and now - last < self.alert_window_s) or self.alerts_sent >= self.max_alerts:
            self.alerts_suppressed += 1
            return
        self._last_alert[key] = now
        self.alerts_sent += 1
        import wandb

        where = event.layer or "global"
        title = f"GradGuard: {event.kind} gradients ({where})"
        if len(title) > 63:
            title = title[:60] + "..."
        level = getattr(wandb.AlertLevel, _LEVELS[event.kind])
        self.run.alert(title=title, text=event.message, level=level, wait_duration=0)

    def on_fit_end(self, guard, trainer, summary: dict) -> None:
        if self.run is None:
            return
        for key, value in summary.items():
            self.run.summary[f"{guard.prefix}{key}"] = value if value is not None else "none"
        self.run.summary[f"{guard.prefix}alerts_suppressed"] = self.alerts_suppressed
