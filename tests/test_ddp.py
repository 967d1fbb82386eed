"""DDP with 2 CPU processes: identical events on every rank, sinks on rank 0 only, no hang."""

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def run_ddp(tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    # a hang (ranks disagreeing on a collective) would show as a timeout here
    proc = subprocess.run(
        [sys.executable, WORKER, str(tmp_path), mode], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["skip", "stop", "deferred_stop"])
def test_fault_on_one_rank_same_events_and_action_everywhere(tmp_path, mode):
    ranks = run_ddp(tmp_path, mode)
    events = [r["events"] for r in ranks]
    assert events[0] == events[1]  # identical on every rank
    (event,) = events[0]
    assert event["kind"] == "nonfinite" and event["step"] == 5
    assert all(r["finite"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # same weights: same action taken everywhere
    # "stop" ends the run after the faulty step; sync="deferred" reads it, and stops, one step later
    expected_steps = {"stop": 6, "deferred_stop": 7}.get(mode, 12)
    assert [r["global_step"] for r in ranks] == [expected_steps, expected_steps]
    # the sink (alerts, files) ran on rank 0 only, once
    assert (tmp_path / "sink-rank0.txt").read_text().count("\n") == 1
    assert not (tmp_path / "sink-rank1.txt").exists()


def test_a_layer_unfrozen_under_ddp_is_said_to_train_apart_on_each_rank(tmp_path):
    # torch's DDP all-reduces only the parameters that required gradients when it wrapped the model:
    # the backbone BackboneFinetuning unfreezes later trains on each rank's batches alone
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    worker = os.path.join(os.path.dirname(__file__), "ddp_finetune_worker.py")
    proc = subprocess.run([sys.executable, worker, str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    trained = [s for s, g in ranks[0]["grads"].items() if g is not None]
    assert trained and all(ranks[0]["grads"][s] != ranks[1]["grads"][s] for s in trained)  # the drift is real
    warning = [m for m in ranks[0]["messages"] if "under DDP" in m]
    assert len(warning) == 1 and "`backbone.0`, `backbone.2`" in warning[0] and "4 parameter tensors" in warning[0]
    assert not any("under DDP" in m for m in ranks[1]["messages"])  # rank 0 speaks
    assert [r["internal_errors"] for r in ranks] == [0, 0] and ranks[0]["events"] == ranks[1]["events"] == []
