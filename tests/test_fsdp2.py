"""FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard``) with 2 CPU processes: the parameters and
gradients are DTensors, each rank holds half of each. The guard must measure the full gradients
(not its rank's half, not each replica twice), act on the shards it holds, and agree across ranks.
Before DTensors were read through their local shards, every step failed inside the guard (an
"internal error", training unguarded): the Inf below reached the weights."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch without distributed", allow_module_level=True)
pytest.importorskip("lightning.pytorch.strategies", reason="needs ModelParallelStrategy").ModelParallelStrategy

WORKER = os.path.join(os.path.dirname(__file__), "fsdp2_worker.py")
LAYERS = ["net.0", "net.2", "net.4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    # a hang (ranks disagreeing on a collective) would show as a timeout here
    proc = subprocess.run([sys.executable, WORKER, str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(out / f"rank{r}.json")) for r in (0, 1)]
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    return ranks, rows


def test_same_events_on_both_ranks_and_no_nan_reaches_the_weights(run):
    ranks, _ = run
    assert [r["internal_errors"] for r in ranks] == [0, 0]
    assert ranks[0]["events"] == ranks[1]["events"]  # same numbers everywhere: same decisions, no hang
    got = [(e["step"], e["kind"], e["layer"], e["actions"]) for e in ranks[0]["events"]]
    assert got == [(5, "nonfinite", "net.0", ["skip", "alert"]), (15, "exploding", "net.0", ["clip", "alert"])]
    assert all(r["finite"] for r in ranks) and [r["global_step"] for r in ranks] == [20, 20]
    assert all(r["after"]["5"] is None for r in ranks)  # the Inf step was skipped on both ranks
    assert ranks[1]["guard_norms"] == {}  # sinks run on rank 0 only


def test_norms_are_those_of_the_full_gradients(run):
    ranks, _ = run
    before, guard = ranks[0]["before"], ranks[0]["guard_norms"]
    assert sorted(map(int, guard)) == list(range(20))
    for step, norms in guard.items():
        if step == "5":
            assert math.isnan(norms["total"])
            continue
        assert norms["total"] == pytest.approx(before[step]["total"], rel=1e-5), step
        for layer in LAYERS:
            assert norms[layer] == pytest.approx(before[step]["grad"][layer], rel=1e-5), (step, layer)


def test_clipping_scales_the_sharded_gradients(run):
    ranks, rows = run
    for rank in ranks:
        before, after = rank["before"]["15"]["total"], rank["after"]["15"]["total"]
        coef = float(rows[15]["grad/clip_coef"])
        assert coef < 0.5
        # every rank clipped its own shards: by the global factor, and a layer it left over its own limit further
        assert before * coef <= after * (1 + 1e-5) and after < before
        assert after == pytest.approx(float(rows[15]["grad/norm_clipped"]), rel=1e-5)
        assert rank["after"]["14"]["total"] == pytest.approx(rank["before"]["14"]["total"], rel=1e-6)


def test_weight_norms_max_abs_and_update_ratio_of_the_full_tensors(run):
    ranks, rows = run
    before = ranks[0]["before"]
    lr = 1e-2
    detail_steps = [s for s, r in rows.items() if r["grad/max_abs_total"]]
    assert detail_steps == [4, 9, 14, 19]
    weight_steps = [s for s, r in rows.items() if r["grad/param_norm/net.0"]]
    assert set(range(10)) - {5} <= set(weight_steps)  # the warm-up's grad/weight check, then detail steps
    for step in weight_steps:
        if step == 5:
            continue
        row, ref = rows[step], before[str(step)]
        for layer in LAYERS:
            assert float(row[f"grad/param_norm/{layer}"]) == pytest.approx(ref["weight"][layer], rel=1e-5)
            ratio = lr * ref["grad"][layer] / ref["weight"][layer]
            assert float(row[f"grad/update_ratio/{layer}"]) == pytest.approx(ratio, rel=1e-4)
    for step in detail_steps:
        row, ref = rows[step], before[str(step)]
        for layer in LAYERS:
            assert float(row[f"grad/max_abs/{layer}"]) == pytest.approx(ref["max_abs"][layer], rel=1e-6)
        assert float(row["grad/max_abs_total"]) == pytest.approx(max(ref["max_abs"].values()), rel=1e-6)


def test_one_process_dtensors_read_through_their_local_shards():
    """ModelParallelStrategy on one device: DTensors without the all-reduce path (world size 1)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_gradguard.stats import LayerPlan, grad_stats, layer_series, read_tensors

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
        reference = [(n, p.detach().clone()) for n, p in net.named_parameters()]
        fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
        net(torch.randn(8, 5)).square().sum().backward()
        plan = LayerPlan.from_named_parameters(net.named_parameters())
        assert plan.dtensor
        grads = {n: p.grad.full_tensor() for n, p in net.named_parameters()}
        want = [torch.linalg.vector_norm(torch.cat([grads[f"{i}.weight"].flatten(), grads[f"{i}.bias"]])).item()
                for i in (0, 2)]
        read = read_tensors(plan, max_abs=True, param_norms=True)
        series = layer_series(plan, read, read.packed.numpy())
        assert series["norm"][1:].tolist() == pytest.approx(want, rel=1e-6)
        weights = [torch.linalg.vector_norm(torch.cat([w.flatten() for n, w in reference if n.startswith(f"{i}.")]))
                   .item() for i in (0, 2)]
        assert series["weight"][1:].tolist() == pytest.approx(weights, rel=1e-6)
        assert grad_stats(plan).norm.tolist() == pytest.approx(want, rel=1e-6)
    finally:
        dist.destroy_process_group()


def test_rollback_restores_the_sharded_weights_exactly(tmp_path):
    # an Inf on rank 1 at steps 12 and 13: the second means damage, and the newest snapshot at
    # least 2 steps old (taken at step 10, every 5 healthy steps) is restored on both ranks
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, WORKER, str(tmp_path), "rollback"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert ranks[0]["events"] == ranks[1]["events"]
    got = [(e["step"], e["reason"], e["actions"]) for e in ranks[0]["events"]]
    assert got == [(12, "nan", ["skip", "alert"]), (13, "nan", ["rollback", "alert"])]  # a rollback always alerts
    for r in ranks:
        assert r["internal_errors"] == 0 and r["rollbacks"] == 1 and r["finite"] and r["global_step"] == 20
        weights = {step: r["before"][str(step)]["weight"] for step in (10, 12, 13, 14)}
        assert weights[13] == weights[12]  # step 12 skipped: nothing applied
        assert weights[14] == pytest.approx(weights[10], rel=1e-12)  # the full weights of step 10, back
        assert weights[14] != pytest.approx(weights[12], rel=1e-3)
