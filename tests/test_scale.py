"""Thousands of parameter tensors and torch.compile'd modules."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DigitsMLP, digits_loader, trainer
from lightning_gradguard import GradGuard, LayerPlan, grad_stats
from helpers import NormRecorder
from test_hot_path import CountingGuard, MaxNumel
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
    # foreach kernels, and on a CPU stacked blocks of bounded size: 2,000 tensors and 8,000 tensors
    # (of the same shapes) take the same handful of operations
    assert ops_for(1000) == ops_for(4000) < 40
    assert ops_for(10) < 20


def test_thousands_of_small_tensors_cost_a_few_operations_and_bounded_scratch():
    """On a CPU, 2,000 small tensors are read in a few stacked blocks (not a foreach loop paying
    ~1 us per tensor): few operations, bounded scratch memory, the same numbers."""
    from lightning_gradguard.stats import _STACK_CHUNK, layer_series, read_tensors

    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(1000)])
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    plan = LayerPlan.from_named_parameters(net.named_parameters())
    assert plan.stacking(plan.all_positions) is not None
    read_tensors(plan, max_abs=True, param_norms=True)  # plans are cached after the first step
    ops, largest = OpCounter(), MaxNumel()
    with ops, largest:
        read = read_tensors(plan, max_abs=True, param_norms=True)
    # 5 blocks x 3 reads (a stack and a norm; max |g| in 4 ops, amax/amin beat the inf-norm kernel 20x)
    # and a few more, for 2,000 tensors
    assert ops.ops < 80
    assert largest.largest <= _STACK_CHUNK < sum(p.numel() for p in net.parameters())
    series = layer_series(plan, read, read.packed.numpy())
    expected = torch.stack([torch.stack([m.weight.grad.norm(), m.bias.grad.norm()]).norm() for m in net])
    np.testing.assert_allclose(series["norm"][1:], expected.numpy(), rtol=1e-5)
    np.testing.assert_allclose(series["norm"][0], expected.norm().item(), rtol=1e-5)
    expected_max = torch.stack([torch.maximum(m.weight.grad.abs().max(), m.bias.grad.abs().max()) for m in net])
    np.testing.assert_allclose(series["max_abs"][1:], expected_max.numpy(), rtol=1e-6)
    expected_w = torch.stack([torch.stack([m.weight.norm(), m.bias.norm()]).norm() for m in net]).detach()
    np.testing.assert_allclose(series["weight"][1:], expected_w.numpy(), rtol=1e-5)


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
