"""The per-step path: at most one host sync per step, no allocation proportional to model size."""

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import DigitsMLP, digits_loader, trainer
from lightning_gradguard import GradGuard, LayerPlan, grad_stats
from lightning_gradguard.detectors import REPORT_ROWS, DetectorConfig, TrendDetector

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


def test_statistics_and_detectors_never_sync():
    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(20)])
    net(torch.randn(4, 16)).sum().backward()
    plan = LayerPlan.from_named_parameters(net.named_parameters())
    det = TrendDetector(DetectorConfig(), plan.num_layers + 1)
    with count_syncs() as counts:
        for _ in range(3):
            stats = grad_stats(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
            norm = torch.cat([stats.total.reshape(1), stats.norm])
            present = torch.cat([torch.ones(1, dtype=torch.bool), stats.present])
            nonfinite = torch.cat([stats.nonfinite.any().reshape(1), stats.nonfinite])
            det.update(norm, present, nonfinite, converged=torch.tensor(False))
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
    det = TrendDetector(DetectorConfig(), plan.num_layers + 1)
    mode = MaxNumel()
    with mode:
        stats = grad_stats(plan, max_abs=True, param_norms=True, lrs=[0.1] * len(plan.params))
        det.update(torch.cat([stats.total.reshape(1), stats.norm]), torch.ones(7, dtype=torch.bool), torch.zeros(7, dtype=torch.bool))
    # only per-tensor and per-layer scalars: the report is REPORT_ROWS x (layers + 1), the growth ring 50 x (layers + 1)
    assert mode.largest <= max(REPORT_ROWS, DetectorConfig().growth_window) * (plan.num_layers + 1)
    assert mode.largest < 128  # smaller than even one bias vector
