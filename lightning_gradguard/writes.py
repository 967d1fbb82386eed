"""Handing the guard's metrics to the Trainer's loggers, inside Lightning's own call where it can.

A logger call costs far more per call than per key: with W&B ~0.3 ms warm and
~0.7 ms on the cold caches of a training step (Python layers and a message to
the wandb service), measured in a Trainer on the benchmark MLP. Lightning makes
one such call at each of its logging steps, right after the
``on_train_batch_end`` hooks. So while a guard is attached, each logger's
``log_metrics`` is stood in for by a :class:`SharedWrite` that adds the guard's
metrics of the same step to Lightning's call: one call per step instead of two.
What Lightning does not write (it logs nothing that step, or it logs at another
cadence) the guard writes with a call of its own at its next flush.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("lightning_gradguard")

Entry = tuple[int, dict[str, float]]  # (logging step, metrics)


class SharedWrite:
    """Stands in for one logger's ``log_metrics`` while guards are attached (one per logger, shared).

    ``queues`` holds each attached guard's metrics waiting for the logger;
    :meth:`__call__` (Lightning's call) writes those of its step together with
    Lightning's own metrics, and any others first, apart. ``write`` is the
    logger's own method, for the guard's direct writes.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.had_attribute = "log_metrics" in vars(logger)  # someone stood in before us: restore theirs
        self.write = logger.log_metrics
        self.queues: dict[int, list[Entry]] = {}  # id(guard) -> entries
        self.broken = False  # a merged write failed: the guards write apart (and so find out) from then on

    @classmethod
    def attach(cls, logger: Any, guard: object) -> SharedWrite | None:
        """The logger's stand-in, installed on first use; ``None`` where it cannot be installed."""
        try:
            hook = vars(logger).get("log_metrics")
            if not isinstance(hook, cls):
                hook = cls(logger)
                logger.log_metrics = hook
        except (TypeError, AttributeError):  # no instance __dict__ (slots), a read-only attribute
            return None
        hook.queues.setdefault(id(guard), [])
        return hook

    def detach(self, guard: object) -> None:
        """Forget ``guard``; the last one out gives the logger its own method back."""
        self.queues.pop(id(guard), None)
        if not self.queues and vars(self.logger).get("log_metrics") is self:
            if self.had_attribute:
                self.logger.log_metrics = self.write
            else:
                del self.logger.log_metrics

    def __call__(self, metrics: dict[str, float], step: int | None = None) -> Any:
        merged: dict[str, float] = {}
        for queue in self.queues.values():
            entries = queue[:]
            queue.clear()
            for entry_step, entry in entries:
                if entry_step == step and not (entry.keys() & metrics.keys() or entry.keys() & merged.keys()):
                    merged.update(entry)
                else:  # another step (Lightning did not log at it), or a key Lightning's metrics hold too
                    try:
                        self.write(entry, step=entry_step)
                    except Exception as err:  # noqa: BLE001 - the guard's metrics must never stop training
                        self._fail(err)
        if not merged:
            return self.write(metrics, step=step)
        try:
            return self.write({**metrics, **merged}, step=step)
        except Exception as err:  # noqa: BLE001 - maybe ours: write Lightning's own alone, as without us
            self._fail(err)
        return self.write(metrics, step=step)

    def _fail(self, err: Exception) -> None:
        if not self.broken:
            log.warning("GradGuard: writing its metrics to %s failed (%r); the guard writes there on its own "
                        "from now on (and stops at the next failure), training goes on", type(self.logger).__name__, err)
        self.broken = True
