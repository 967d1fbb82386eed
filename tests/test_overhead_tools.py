"""The overhead benchmark's alternating-blocks wrapper: per-step hooks only in "on" blocks."""

import os
import sys
import time

from lightning.pytorch.callbacks import Callback

from helpers import DigitsMLP, digits_loader, trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


class Counting(Callback):
    def __init__(self):
        self.calls: dict[str, list[int]] = {}

    def _seen(self, name, trainer):
        self.calls.setdefault(name, []).append(trainer.global_step)

    def setup(self, trainer, pl_module, stage):
        self._seen("setup", trainer)

    def on_train_start(self, trainer, pl_module):
        self._seen("on_train_start", trainer)

    def on_train_batch_start(self, trainer, *args):
        self._seen("on_train_batch_start", trainer)

    def on_before_optimizer_step(self, trainer, *args):
        self._seen("on_before_optimizer_step", trainer)
        time.sleep(0.002)  # a known cost, for the in-hook time

    def on_train_batch_end(self, trainer, *args):
        self._seen("on_train_batch_end", trainer)

    def on_train_end(self, trainer, pl_module):
        self._seen("on_train_end", trainer)


def test_alternating_runs_per_step_hooks_only_in_on_blocks_and_everything_else_always():
    from overhead import Alternating

    inner = Counting()
    wrapper = Alternating([inner], block=3)
    trainer(max_steps=12, callbacks=[wrapper]).fit(DigitsMLP(), digits_loader())
    on = [3, 4, 5, 9, 10, 11]  # blocks of 3: off, on, off, on
    assert wrapper.step_flags == [step in on for step in range(12)]
    assert inner.calls["on_train_batch_start"] == on
    assert inner.calls["on_before_optimizer_step"] == on
    assert inner.calls["on_train_batch_end"] == [s + 1 for s in on]  # global_step has advanced by then
    assert len(inner.calls["setup"]) == len(inner.calls["on_train_start"]) == len(inner.calls["on_train_end"]) == 1
    # time inside the inner callback's per-step hooks, per step: only on-steps spend any
    assert len(wrapper.hook_ms) == 12
    assert all(ms == 0.0 for ms, on_step in zip(wrapper.hook_ms, wrapper.step_flags) if not on_step)
    assert all(ms >= 2.0 for ms, on_step in zip(wrapper.hook_ms, wrapper.step_flags) if on_step)
