"""The per-step path: at most one host sync per step, no allocation proportional to model size."""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DigitsMLP, digits_loader, trainer
from lightning_gradguard import GradGuard, LayerPlan, grad_stats
from lightning_gradguard.stats import layer_sums

# every way a tensor's value reaches the host (each is a device sync on CUDA)
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_syncs():
    counts = {"n": 0, "where": []}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            counts["n"] += 1
            counts["where"].append(name)
            return fn(self, *args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class CountingGuard(GradGuard):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.syncs_per_step: list[list[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with count_syncs() as counts:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.syncs_per_step.append(counts["where"])


@pytest.mark.parametrize("log_layers", ["all", "none"])
def test_one_host_sync_per_step_in_a_real_trainer(tmp_path, log_layers):
    from lightning.pytorch.loggers import CSVLogger

    guard = CountingGuard(log_every_n_steps=1, log_layers=log_layers, detail_every_n_steps=1)
    trainer(max_steps=8, logger=CSVLogger(tmp_path), callbacks=[guard]).fit(DigitsMLP(depth=8), digits_loader())
    assert len(guard.syncs_per_step) == 8
    for where in guard.syncs_per_step:
        # exactly the one commented `.cpu()`; `.numpy()` then reads that host copy in place
        assert where == ["cpu", "numpy"], where


def test_device_statistics_never_sync():
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)])
    net(torch.randn(4, 16)).sum().backward()
    plan = LayerPlan.from_named_parameters(net.named_parameters())
    with count_syncs() as counts:
        for _ in range(3):
            layer_sums(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
            grad_stats(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
    assert counts["n"] == 0, counts["where"]


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op allocates (views of existing storage do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = list(args) + list((kwargs or {}).values())
        inputs = {a.untyped_storage().data_ptr() for a in _tensors(flat)}
        for t in _tensors(out if isinstance(out, (list, tuple)) else [out]):
            if t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def _tensors(items):
    for a in items:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def test_no_allocation_proportional_to_model_size():
    net = nn.Sequential(*[nn.Linear(128, 128) for _ in range(6)])  # 16k elements per weight
    net(torch.randn(4, 128)).sum().backward()
    plan = LayerPlan.from_named_parameters(net.named_parameters())
    mode = MaxNumel()
    with mode:
        layer_sums(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
    # only per-tensor and per-layer scalars
    assert mode.largest < 128  # smaller than even one bias vector


def test_thousands_of_small_tensors_cost_a_few_operations_and_bounded_scratch():
    """On a CPU, 2,000 small tensors are read in a few stacked blocks: the number of operations does
    not grow with the number of tensors, scratch memory is bounded, and the numbers are the same."""
    from lightning_gradguard.stats import _STACK_CHUNK

    def measure(n_layers):
        torch.manual_seed(0)
        net = nn.Sequential(*[nn.Linear(32, 32) for _ in range(n_layers)])
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        plan = LayerPlan.from_named_parameters(net.named_parameters())
        layer_sums(plan, max_abs=True)  # plans are cached after the first step
        ops, largest = OpCount(), MaxNumel()
        with ops, largest:
            sums = layer_sums(plan, max_abs=True)
        return net, sums, ops.n, largest.largest

    net, sums, ops_many, largest = measure(1000)
    _, _, ops_few, _ = measure(10)
    # 100x the tensors (and bytes): a few more bounded blocks, not 2,000 more operations
    assert ops_many < 2 * ops_few < 100
    assert largest <= _STACK_CHUNK < sum(p.numel() for p in net.parameters())
    expected = torch.stack([
        torch.stack([m.weight.grad.norm(), m.bias.grad.norm()]).norm() for m in net
    ])
    torch.testing.assert_close(sums.grad_sq.sqrt(), expected, rtol=1e-5, atol=0)
    expected_max = torch.stack([torch.maximum(m.weight.grad.abs().max(), m.bias.grad.abs().max()) for m in net])
    torch.testing.assert_close(sums.max_abs, expected_max)


def test_a_sparse_gradient_among_stacked_tensors_falls_back_to_the_general_path():
    embs = nn.ModuleList([nn.Embedding(8, 4, sparse=True) for _ in range(10)])
    for e in embs:
        e(torch.tensor([1, 2, 2])).sum().backward()
    plan = LayerPlan.from_named_parameters(embs.named_parameters())
    stats = grad_stats(plan)
    expected = torch.stack([e.weight.grad.to_dense().norm() for e in embs])
    torch.testing.assert_close(stats.norm, expected)
