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


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_fault_on_one_rank_same_events_and_action_everywhere(tmp_path, mode):
    ranks = run_ddp(tmp_path, mode)
    events = [r["events"] for r in ranks]
    assert events[0] == events[1]  # identical on every rank
    (event,) = events[0]
    assert event["kind"] == "nonfinite" and event["step"] == 5
    assert all(r["finite"] for r in ranks)
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # same weights: same action taken everywhere
    expected_steps = 6 if mode == "stop" else 12
    assert [r["global_step"] for r in ranks] == [expected_steps, expected_steps]
    # the sink (alerts, files) ran on rank 0 only, once
    assert (tmp_path / "sink-rank0.txt").read_text().count("\n") == 1
    assert not (tmp_path / "sink-rank1.txt").exists()
