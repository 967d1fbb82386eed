"""lightning_gradguard: catch vanishing, exploding and non-finite gradients the step they appear.

>>> from lightning_gradguard import GradGuard
>>> guard = GradGuard()              # skip NaN/Inf steps, clip spikes, warn about all three
>>> guard.on_nonfinite, guard.on_exploding, guard.on_vanishing
(('skip', 'alert'), ('clip', 'alert'), ('alert',))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    "GradEvent",
    "GradGuard",
    "GradStats",
    "GradientHealthError",
    "GuardSink",
    "LayerPlan",
    "PicturesSink",
    "RecordSink",
    "grad_stats",
]
__version__ = "0.1.0"

# public name -> module; imported on first use (PEP 562), so the `gradguard` command
# reading a record starts without importing Lightning
_WHERE = {
    "GradGuard": "callback",
    "GradEvent": "events",
    "GradientHealthError": "events",
    "GuardSink": "sinks",
    "GradStats": "stats",
    "LayerPlan": "stats",
    "grad_stats": "stats",
    "PicturesSink": "pictures",
    "RecordSink": "record",
}

if TYPE_CHECKING:
    from lightning_gradguard.callback import GradGuard
    from lightning_gradguard.events import GradEvent, GradientHealthError
    from lightning_gradguard.pictures import PicturesSink
    from lightning_gradguard.record import RecordSink
    from lightning_gradguard.sinks import GuardSink
    from lightning_gradguard.stats import GradStats, LayerPlan, grad_stats


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_gradguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lightning_gradguard.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
