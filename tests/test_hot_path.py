"""The per-step path: at most one host sync per step, no allocation proportional to model size."""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DigitsMLP, digits_loader, trainer
from lightning_gradguard import GradGuard, LayerPlan, grad_stats
from lightning_gradguard.stats import layer_sums, read_tensors

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
        # exactly the one commented copy: `.cpu()` (then `.numpy()` reads that host copy in place), or
        # on the usual step of a small model `.tolist()` (straight to Python floats)
        assert where in (["cpu", "numpy"], ["tolist"]), where
    # detail_every_n_steps=1: every step reads max |g| and weights too, so the numpy form
    assert all(where == ["cpu", "numpy"] for where in guard.syncs_per_step)


def test_one_host_sync_on_the_usual_step_of_a_small_model(tmp_path):
    guard = CountingGuard()  # Lightning's cadence, details every 50 steps
    trainer(max_steps=30, callbacks=[guard]).fit(DigitsMLP(depth=8), digits_loader())
    # warm-up steps read weight norms too (the grad/weight ratio check): the numpy form
    assert guard.syncs_per_step[:10] == [["cpu", "numpy"]] * 10
    assert guard.syncs_per_step[10:] == [["tolist"]] * 20


def test_device_statistics_never_sync():
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)])
    net(torch.randn(4, 16)).sum().backward()
    plan = LayerPlan.from_named_parameters(net.named_parameters())
    with count_syncs() as counts:
        for _ in range(3):
            read_tensors(plan, max_abs=True, param_norms=True, extra=[torch.tensor(1.0)])
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


def test_no_allocation_proportional_to_model_size():
    net = nn.Sequential(*[nn.Linear(128, 128) for _ in range(6)])  # 16k elements per weight
    net(torch.randn(4, 128)).sum().backward()
    plan = LayerPlan.from_named_parameters(net.named_parameters())
    mode = MaxNumel()
    with mode:
        read_tensors(plan, max_abs=True, param_norms=True)
        layer_sums(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
    # only per-tensor and per-layer scalars
    assert mode.largest < 128  # smaller than even one bias vector


def test_a_sparse_gradient_among_stacked_tensors_falls_back_to_the_general_path():
    from lightning_gradguard.stats import layer_series

    embs = nn.ModuleList([nn.Embedding(8, 4, sparse=True) for _ in range(80)])  # enough to be stacked
    for e in embs:
        e(torch.tensor([1, 2, 2])).sum().backward()
    plan = LayerPlan.from_named_parameters(embs.named_parameters())
    assert plan.stacking(plan.all_positions) is not None
    expected = torch.stack([e.weight.grad.to_dense().norm() for e in embs])
    torch.testing.assert_close(grad_stats(plan).norm, expected)
    read = read_tensors(plan)
    torch.testing.assert_close(torch.from_numpy(layer_series(plan, read, read.packed.numpy())["norm"][1:]).float(), expected)


def test_sinks_get_arrays_unless_they_take_lists():
    """On the usual step of a small model the guard holds the norms as a list: sinks that say they
    take lists (the W&B and pictures sinks) get it as it is, every other sink a numpy array."""
    import numpy as np

    from lightning_gradguard import GuardSink

    class Keeps(GuardSink):
        def __init__(self):
            self.got = []

        def on_step(self, guard, trainer, *, norms, **kwargs):
            self.got.append((type(norms), list(norms)))

    class TakesLists(Keeps):
        norms_as_list = True

    arrays, lists = Keeps(), TakesLists()
    trainer(max_steps=30, callbacks=[GradGuard(sinks=[arrays, lists])]).fit(DigitsMLP(depth=8), digits_loader())
    assert [t for t, _ in arrays.got] == [np.ndarray] * 30
    assert [t for t, _ in lists.got] == [np.ndarray] * 10 + [list] * 20  # warm-up steps read weights: arrays
    assert [v for _, v in arrays.got] == [v for _, v in lists.got]
