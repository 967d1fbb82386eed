"""The statistics engine against plain per-tensor references, in a bare torch loop."""

import math

import pytest
import torch
from torch import nn

from lightning_gradguard import LayerPlan, grad_stats
from lightning_gradguard.stats import layer_name


def reference(plan: LayerPlan) -> tuple[float, dict[str, float]]:
    sq: dict[str, float] = {}
    for p, layer in zip(plan.params, plan.layer_of_param):
        if p.grad is None:
            continue
        g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
        sq[plan.layers[layer]] = sq.get(plan.layers[layer], 0.0) + g.double().square().sum().item()
    return math.sqrt(sum(sq.values())), {k: math.sqrt(v) for k, v in sq.items()}


def test_three_four_five():
    lin = nn.Linear(2, 1, bias=False)
    lin.weight.grad = torch.tensor([[3.0, 4.0]])
    stats = grad_stats(LayerPlan.from_named_parameters(lin.named_parameters()))
    assert stats.total.item() == 5.0
    assert stats.layers == ("(root)",)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=True)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.fp16 = nn.Linear(16, 4).to(torch.float16)
        self.bf = nn.Linear(16, 4).to(torch.bfloat16)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(3, 3)  # never in the forward pass: grad stays None


def mixed_grads():
    torch.manual_seed(0)
    m = Mixed()
    idx = torch.tensor([[1, 2, 2, 7], [7, 1, 3, 3]])
    h = m.body(m.emb(idx).mean(1))
    loss = m.fp16(h.half()).float().pow(2).sum() + m.bf(h.bfloat16()).float().pow(2).sum()
    loss.backward()
    return m


def test_mixed_dtypes_sparse_frozen_unused_match_reference():
    m = mixed_grads()
    assert m.emb.weight.grad.is_sparse
    plan = LayerPlan.from_named_parameters(m.named_parameters(), only=[p for p in m.parameters() if p.requires_grad])
    assert "frozen" not in plan.layers
    stats = grad_stats(plan, max_abs=True)
    total, per = reference(plan)
    assert stats.total.item() == pytest.approx(total, rel=1e-5)
    for i, name in enumerate(plan.layers):
        if name == "unused":
            assert not stats.present[i] and stats.norm[i] == 0
        else:
            assert stats.present[i]
            assert stats.norm[i].item() == pytest.approx(per[name], rel=1e-5), name
    assert stats.norm.dtype == torch.float32 and not stats.nonfinite.any()
    # max |g| per layer against a reference
    body0 = plan.layers.index("body.0")
    expected = max(m.body[0].weight.grad.abs().max().item(), m.body[0].bias.grad.abs().max().item())
    assert stats.max_abs[body0].item() == pytest.approx(expected)


def test_nonfinite_flagged_per_layer_and_propagates():
    m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    m[1].bias.grad[0] = float("nan")
    m[2].weight.grad[1, 1] = float("inf")
    stats = grad_stats(LayerPlan.from_named_parameters(m.named_parameters()), max_abs=True)
    assert stats.nonfinite.tolist() == [False, True, True]
    assert math.isnan(stats.norm[1].item()) and math.isinf(stats.norm[2].item())
    assert math.isnan(stats.max_abs[1].item()) and math.isinf(stats.max_abs[2].item())
    assert not math.isfinite(stats.total.item())


def test_param_norms_and_update_ratio():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.5)
    plan = LayerPlan.from_named_parameters(m.named_parameters())
    lrs = [0.1, 0.1, 0.01, 0.01]
    stats = grad_stats(plan, param_norms=True, lrs=lrs)
    for i, layer in enumerate(m):
        w = torch.cat([p.detach().flatten() for p in layer.parameters()]).norm().item()
        g = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm().item()
        assert stats.param_norm[i].item() == pytest.approx(w, rel=1e-5)
        assert stats.update_ratio[i].item() == pytest.approx(lrs[2 * i] * g / w, rel=1e-5)


def test_grad_scale_divides_statistics():
    lin = nn.Linear(2, 1, bias=False)
    lin.weight.grad = torch.tensor([[3.0, 4.0]]) * 1024
    stats = grad_stats(LayerPlan.from_named_parameters(lin.named_parameters()), grad_scale=torch.tensor(1024.0))
    assert stats.total.item() == pytest.approx(5.0)


def test_no_gradients_at_all_returns_none():
    m = nn.Linear(2, 2)
    assert grad_stats(LayerPlan.from_named_parameters(m.named_parameters())) is None


def test_grouping_by_depth_and_tied_parameters():
    m = nn.Module()
    m.enc = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))
    m.head = m.enc[1]  # tied: counted once
    plan = LayerPlan.from_named_parameters(m.named_parameters(remove_duplicate=False), depth=2)
    assert plan.layers == ("enc.0", "enc.1")
    assert len(plan.params) == 6
    assert layer_name("a.b.c.weight", depth=1) == "a"


def test_subset_of_gradients_uses_a_matching_index():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    plan = LayerPlan.from_named_parameters(m.named_parameters())
    m[2].weight.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    stats = grad_stats(plan)
    assert stats.norm.tolist() == [0.0, 0.0, 5.0]
    assert stats.present.tolist() == [False, False, True]


def test_sharded_partial_sums_are_combined_by_all_reduce():
    """Two ranks each holding half of a layer's gradient: the reduced stats equal the whole."""
    whole = nn.Linear(4, 2)
    for p in whole.parameters():
        p.grad = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) - 1.5
    expected = grad_stats(LayerPlan.from_named_parameters(whole.named_parameters()), max_abs=True, param_norms=True)

    shard_a, shard_b = nn.Linear(4, 2), nn.Linear(4, 2)
    with torch.no_grad():
        for a, b, w in zip(shard_a.parameters(), shard_b.parameters(), whole.parameters()):
            a.copy_(w), b.copy_(w)
    for a, b, w in zip(shard_a.parameters(), shard_b.parameters(), whole.parameters()):
        mask = torch.arange(w.numel()).reshape(w.shape) % 2 == 0
        a.grad, b.grad = torch.where(mask, w.grad, 0.0), torch.where(mask, 0.0, w.grad)
    plan_b = LayerPlan.from_named_parameters(shard_b.named_parameters())
    partial_b = grad_stats(plan_b, max_abs=True)
    sq_b = partial_b.norm.square()

    def all_reduce(t, op):  # what dist.all_reduce would return on rank a
        if op == "max":
            return torch.maximum(t, partial_b.max_abs)
        other = torch.stack([sq_b, torch.ones_like(sq_b)])  # squared sums, layers present
        return t + torch.cat([other, torch.zeros_like(t[2:])])

    got = grad_stats(LayerPlan.from_named_parameters(shard_a.named_parameters()), max_abs=True, all_reduce=all_reduce)
    assert got.total.item() == pytest.approx(expected.total.item(), rel=1e-6)
    assert got.max_abs.tolist() == pytest.approx(expected.max_abs.tolist())
    assert got.present.tolist() == [True] and got.nonfinite.tolist() == [False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_same_shape", [3, 80])  # read one by one / in stacked blocks (see stats._Stacking)
def test_max_abs_matches_reference_with_nan_inf_and_empty_tensors(dtype, n_same_shape):
    """max |g| on a CPU is read with aminmax (large tensors) or the inf-norm kernel (small ones):
    the same values as the reference, NaN and -Inf included, and 0 for an empty tensor, where the
    inf-norm kernel raises."""
    from lightning_gradguard.stats import _AMINMAX_MIN_NUMEL, layer_series, read_tensors

    torch.manual_seed(0)
    shapes = [(64, 128), (_AMINMAX_MIN_NUMEL,), (7,), (0, 4)] + [(16, 16)] * n_same_shape
    params = [nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape).to(dtype)
    params[0].grad[3, 5] = -8192.0  # the largest |g| is negative (exact in every dtype)
    params[1].grad[7] = float("nan")
    params[-1].grad[0, 0] = float("-inf")
    plan = LayerPlan.from_named_parameters((f"layer{i}.weight", p) for i, p in enumerate(params))
    assert plan.num_layers == len(params)
    expected = [p.grad.float().abs().max().item() if p.numel() else 0.0 for p in params]

    read = read_tensors(plan, max_abs=True)
    got = layer_series(plan, read, read.packed.numpy())["max_abs"][1:].tolist()
    device = grad_stats(plan, max_abs=True).max_abs.tolist()
    for values in (got, device):
        assert values[0] == 8192.0 and math.isnan(values[1]) and values[3] == 0.0 and values[-1] == math.inf
        assert values == pytest.approx(expected, nan_ok=True)


@pytest.mark.parametrize("fault", [None, "nan", "inf"])
def test_layer_series_lists_equal_layer_series(fault):
    """The guard's usual step on a small model reads the host copy as Python lists
    (``layer_series_lists``): the same norms, presence and non-finite flags as ``layer_series``."""
    from lightning_gradguard.stats import layer_series, layer_series_lists, read_tensors

    m = mixed_grads()
    m.emb.weight.grad = None  # a parameter without a gradient this step: a subset of the plan
    if fault:
        m.body[2].weight.grad[0, 1] = float(fault)
    plan = LayerPlan.from_named_parameters(m.named_parameters(), only=[p for p in m.parameters() if p.requires_grad])
    read = read_tensors(plan)
    host = read.packed.numpy()
    expected = layer_series(plan, read, host)
    got = layer_series_lists(plan, read.positions, host.tolist())
    assert got["present"] == expected["present"].tolist() and got["present"].count(False) >= 1
    assert got["nonfinite"] == expected["nonfinite"].tolist() and any(got["nonfinite"]) == bool(fault)
    assert got["norm"] == pytest.approx(expected["norm"].tolist(), nan_ok=True, rel=1e-15)
