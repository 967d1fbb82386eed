"""Sinks: where the guard's measurements and decisions go besides the Trainer's loggers.

A sink receives, on rank 0 only, every step's per-layer norms (already on the
host: no extra sync), each logged step's metrics, every event, and the end of
fit. W&B alerts and pictures, and the on-disk run record, are sinks. A sink
that raises is reported once and switched off: the guard's own failures never
stop training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_gradguard.callback import GradGuard
    from lightning_gradguard.events import GradEvent

__all__ = ["GuardSink", "series_columns"]


def series_columns(old: Sequence[str], new: Sequence[str]) -> list[int | None]:
    """For each position of the norms layout of layers ``new`` (the global norm first, as
    :meth:`GuardSink.on_step` gets them), its position in the layout of ``old``; ``None`` for a
    layer ``old`` lacks. For sinks that keep history across a change of layers (a param group
    added mid-run).

    >>> series_columns(["head"], ["backbone", "head"])
    [0, None, 1]
    """
    where = {name: i + 1 for i, name in enumerate(old)}
    return [0] + [where.get(name) for name in new]


class GuardSink:
    """Base class: override what you need; every method is optional."""

    #: ``True``: :meth:`on_step` may get ``norms`` as a list of floats (on the usual step of a
    #: small model the guard holds them so, and making an array costs a cold numpy call right
    #: after the backward pass); ``False`` (the default): always a numpy array.
    norms_as_list = False

    def setup(self, guard: GradGuard, trainer: Trainer) -> None:
        """Once, when fitting starts (rank 0)."""

    def on_step(
        self,
        guard: GradGuard,
        trainer: Trainer,
        *,
        optimizer: int,
        step: int,
        log_step: int,
        layers: tuple[str, ...],
        norms: np.ndarray,
        metrics: dict[str, float] | None,
    ) -> None:
        """Every optimizer step.

        ``norms`` holds the global norm then one per layer (``layers``), 0 for
        layers without gradients, NaN/Inf where they are non-finite (a numpy
        array, or a list if :attr:`norms_as_list`; read it, do not keep it); ``step`` is
        ``trainer.global_step``, ``log_step`` the step Lightning logs at;
        ``metrics`` is what went to the loggers this step, ``None`` on steps
        that were not logged.
        """

    def on_event(self, guard: GradGuard, trainer: Trainer, event: GradEvent) -> None:
        """Each event, after its responses were applied (``event.actions`` is final)."""

    def on_fit_end(self, guard: GradGuard, trainer: Trainer, summary: dict) -> None:
        """Once at the end of fit (also after ``"stop"``); ``summary`` is :meth:`GradGuard.summary`."""
