"""lightning_gradguard: catch vanishing, exploding and non-finite gradients the step they appear.

>>> from lightning_gradguard import GradGuard
>>> guard = GradGuard()              # skip NaN/Inf steps, clip spikes, warn about all three
>>> guard.on_nonfinite, guard.on_exploding, guard.on_vanishing
(('skip', 'alert'), ('clip', 'alert'), ('alert',))
"""

from lightning_gradguard.callback import GradGuard
from lightning_gradguard.events import GradEvent, GradientHealthError
from lightning_gradguard.pictures import PicturesSink
from lightning_gradguard.sinks import GuardSink
from lightning_gradguard.stats import GradStats, LayerPlan, grad_stats

__all__ = ["GradEvent", "GradGuard", "GradStats", "GradientHealthError", "GuardSink", "LayerPlan", "PicturesSink", "grad_stats"]
__version__ = "0.1.0"
