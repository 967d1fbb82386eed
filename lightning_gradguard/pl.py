"""``GradGuard`` for code written against the standalone ``pytorch_lightning`` package.

``lightning_gradguard.GradGuard`` subclasses ``lightning.pytorch.Callback``.
``pytorch_lightning.Trainer(callbacks=[GradGuard()])`` runs it as it is (fit,
checkpoint save and resume), but two things refuse it: the Trainer given a
single callback without a list (``callbacks=GradGuard()``: "TypeError:
'GradGuard' object is not iterable", it only wraps its own ``Callback`` in a
list), and ``pytorch_lightning.cli.LightningCLI`` in ``trainer.callbacks``
(jsonargparse accepts only subclasses of ``pytorch_lightning.Callback`` there:
"Import path does not correspond to a subclass of Callback"). The class here
subclasses both ``Callback`` classes, so either namespace's Trainer,
LightningCLI and ``isinstance`` checks accept it.
It is the same guard: same arguments, same ``state_key``, so checkpoints move
freely between the two.

>>> import pytorch_lightning
>>> from lightning_gradguard.pl import GradGuard
>>> isinstance(GradGuard(), pytorch_lightning.Callback)
True

In a LightningCLI config::

    trainer:
      callbacks:
        - class_path: lightning_gradguard.pl.GradGuard
          init_args: {on_vanishing: raise}
"""

from __future__ import annotations

import pytorch_lightning

from lightning_gradguard import callback as _core
from lightning_gradguard.events import GradEvent, GradientHealthError
from lightning_gradguard.sinks import GuardSink

__all__ = ["GradEvent", "GradGuard", "GradientHealthError", "GuardSink"]


class GradGuard(_core.GradGuard, pytorch_lightning.Callback):
    # both Callback bases define every hook as a no-op; the guard's overrides come first in the MRO
    __doc__ = _core.GradGuard.__doc__
