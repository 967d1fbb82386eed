"""Every example runs, offline on CPU, as a user would run it (a subprocess of this interpreter), so none can rot."""

from __future__ import annotations

import csv
import glob
import os
import re
import subprocess
import sys

import pytest

from lightning_gradguard.cli import main as gradguard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def run(args: list[str], cwd: str, tmp_path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
        "NO_COLOR": "1",
    }
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("sync", ["step", "deferred"])
def test_demo_the_main_job(tmp_path, sync):
    done = run([os.path.join(EXAMPLES, "demo.py"), "--steps", "200", "--sync", sync], cwd=str(tmp_path),
               tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "fault-free run          : weights finite=True" in out
    assert "faults, no guard        : weights finite=False" in out  # the Inf batch poisons the weights
    label = "GradGuard()" if sync == "step" else 'GradGuard(sync="deferred")'
    assert f"faults, {label:16s}: weights finite=True" in out
    assert "What the guard saw and did (2 events, in guard.events):" in out
    assert "[exploding] step 80: grad norm of `net.2`" in out and "-> clip, alert" in out
    clipped = re.search(r"clipped: global norm (\S+) -> (\S+) \(grad/norm_clipped\)", out)
    assert clipped and float(clipped[2]) < float(clipped[1]) / 10  # what the clip did, from the logged metrics
    assert "[nonfinite] step 160: non-finite gradients (NaN) in 3 layers" in out and "-> skip, alert" in out
    assert "skipped: gradients dropped, weights and optimizer state untouched" in out
    assert "steps clipped: 1, steps skipped: 1" in out


def test_add_to_existing_script(tmp_path):
    done = run([os.path.join(EXAMPLES, "add_to_existing_script.py"), "--max-epochs", "1", "--root", str(tmp_path)],
               cwd=str(tmp_path), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GradGuard: 0 events" in done.stdout
    (metrics,) = glob.glob(str(tmp_path / "lightning_logs" / "version_0" / "metrics.csv"))
    with open(metrics) as f:
        header = next(csv.reader(f))
    assert "grad/norm_total" in header and "grad/norm/net.0" in header


def test_wandb_alerts(tmp_path):
    from wandb_records import find_run_file, read_run

    pytest.importorskip("wandb")
    done = run([os.path.join(EXAMPLES, "wandb_alerts.py"), "--save-dir", str(tmp_path)], cwd=str(tmp_path),
               tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "wandb sync " in done.stdout
    alerts = read_run(find_run_file(str(tmp_path))).alerts
    texts = [a["text"] for a in alerts]
    # the Inf batch (step 40) and the corrupted batch (step 80) each reached W&B as an alert naming step and layer
    assert any(t.startswith("step 40: non-finite gradients (NaN)") for t in texts), texts
    assert any(t.startswith("step 80: grad norm of `net.") and "sigma above" in t for t in texts), texts
    assert any(a["level"] == "ERROR" and "nonfinite" in a["title"] for a in alerts)
    assert len(alerts) == 2, texts  # one per incident, nothing in between


def test_ci_smoke_test_passes_on_healthy_and_catches_the_vanishing_stack(tmp_path):
    folder = os.path.join(EXAMPLES, "ci_smoke_test")
    done = run(["-m", "pytest", folder, "-q", "-p", "no:cacheprovider"], cwd=folder, tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "1 passed, 1 xfailed" in done.stdout

    # without the xfail marker the vanishing model fails CI, and the failure is the readable report
    done = run(["-m", "pytest", folder, "-q", "-p", "no:cacheprovider", "--runxfail", "-k", "deep_sigmoid"],
               cwd=folder, tmp_path=tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    out = done.stdout
    assert "GradientHealthError: GradGuard: unhealthy gradients in Classifier: vanishing at step 14" in out
    assert "vanishing (relative) at step 14, layer `net.0`" in out
    assert "usual causes: Layers whose gradients are orders of magnitude smaller" in out
    assert "gradient L2 norm per layer over 15 steps" in out and "net.0  <" in out
    assert "lightning/pytorch/trainer" not in out  # the report, not Lightning's internals


def test_lightning_cli_config_then_the_gradguard_gate(tmp_path, capsys):
    folder = os.path.join(EXAMPLES, "lightning_cli")
    healthy, vanishing = tmp_path / "healthy", tmp_path / "vanishing"
    done = run(["main.py", "fit", "--config", "config.yaml", f"--trainer.default_root_dir={healthy}"],
               cwd=folder, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert gradguard([str(healthy), "--html", str(tmp_path / "report.html")]) == 0
    assert "OK: no nonfinite/exploding/vanishing events" in capsys.readouterr().out

    done = run(["main.py", "fit", "--config", "config.yaml", f"--trainer.default_root_dir={vanishing}",
                "--trainer.max_steps=20", "--model.depth=20", "--model.activation=sigmoid"],
               cwd=folder, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]  # on_vanishing: alert -- training finishes...
    assert gradguard([str(vanishing)]) == 1  # ...and the gate fails the pipeline
    out = capsys.readouterr().out
    assert "FAIL: 1 event (vanishing); first at step 14" in out
    assert not glob.glob(os.path.join(folder, "lightning_logs"))  # nothing written into the example folder
