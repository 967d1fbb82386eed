"""Thousands of parameter tensors and torch.compile'd modules."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DigitsMLP, digits_loader, trainer
from lightning_gradguard import GradGuard, LayerPlan, grad_stats
from helpers import NormRecorder
from test_hot_path import CountingGuard
from test_precision_loops import NormSink


class Heads(nn.Module):
    """``n`` tiny parallel heads: 2n parameter tensors."""

    def __init__(self, n: int, width: int = 64):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, 1) for _ in range(n))

    def forward(self, x):
        return torch.cat([h(x) for h in self.heads], dim=1)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_for(n_heads: int, **kwargs) -> int:
    net = Heads(n_heads)
    net(torch.randn(4, 64)).sum().backward()
    plan = LayerPlan.from_named_parameters(net.named_parameters(), **kwargs)
    grad_stats(plan)  # warm the index cache, as after the first step
    counter = OpCounter()
    with counter:
        grad_stats(plan, max_abs=True)
    return counter.ops


def test_device_work_does_not_grow_with_the_number_of_tensors():
    # foreach kernels: the same handful of ops for 20 tensors and for 2,000
    assert ops_for(10) == ops_for(1000)


def test_thousands_of_tensors_in_a_trainer_grouped_and_one_sync_per_step():
    class Wide(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(Heads(1000), nn.Linear(1000, 10))

    guard = CountingGuard(group_depth=2, log_layers="all", log_every_n_steps=1)
    trainer(max_steps=3, callbacks=[guard]).fit(Wide(), digits_loader())
    plan = guard._watches[0].plan
    assert len(plan.params) == 2002
    assert plan.layers == ("net.0", "net.1")  # 1,000 heads grouped into one layer by group_depth
    assert all(w == ["cpu", "numpy"] for w in guard.syncs_per_step)
    ungrouped = LayerPlan.from_named_parameters(Wide().named_parameters())
    assert ungrouped.num_layers == 1001


def test_torch_compiled_module_is_measured_with_clean_layer_names():
    class Compiled(DigitsMLP):
        def __init__(self):
            super().__init__()
            self.net = torch.compile(self.net, backend="aot_eager")  # compiled forward and backward graphs

    seen = NormSink()
    guard, rec = GradGuard(sinks=[seen], on_nonfinite="raise", on_exploding="raise"), NormRecorder()
    trainer(max_steps=4, callbacks=[rec, guard]).fit(Compiled(), digits_loader())
    assert guard._watches[0].plan.layers == ("net.0", "net.2", "net.4")  # not net._orig_mod.0
    assert sorted(seen.total) == [0, 1, 2, 3]
    for step, norm in seen.total.items():
        assert norm == pytest.approx(rec.total[step], rel=1e-5)
