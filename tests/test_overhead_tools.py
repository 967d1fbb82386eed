"""The overhead benchmark's alternating-blocks wrapper: per-step hooks only in "on" blocks."""

import os
import sys
import time

from lightning.pytorch.callbacks import Callback

from helpers import DigitsMLP, digits_loader, trainer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


class Counting(Callback):
    def __init__(self):
        self.calls: dict[str, list[int]] = {}

    def _seen(self, name, trainer):
        self.calls.setdefault(name, []).append(trainer.global_step)

    def setup(self, trainer, pl_module, stage):
        self._seen("setup", trainer)

    def on_train_start(self, trainer, pl_module):
        self._seen("on_train_start", trainer)

    def on_train_batch_start(self, trainer, *args):
        self._seen("on_train_batch_start", trainer)

    def on_before_optimizer_step(self, trainer, *args):
        self._seen("on_before_optimizer_step", trainer)
        time.sleep(0.002)  # a known cost, for the in-hook time

    def on_train_batch_end(self, trainer, *args):
        self._seen("on_train_batch_end", trainer)

    def on_train_end(self, trainer, pl_module):
        self._seen("on_train_end", trainer)


def test_alternating_runs_per_step_hooks_only_in_on_blocks_and_everything_else_always():
    from overhead import Alternating

    inner = Counting()
    wrapper = Alternating([inner], block=3)
    trainer(max_steps=12, callbacks=[wrapper]).fit(DigitsMLP(), digits_loader())
    on = [3, 4, 5, 9, 10, 11]  # blocks of 3: off, on, off, on
    assert wrapper.step_flags == [step in on for step in range(12)]
    assert inner.calls["on_train_batch_start"] == on
    assert inner.calls["on_before_optimizer_step"] == on
    assert inner.calls["on_train_batch_end"] == [s + 1 for s in on]  # global_step has advanced by then
    assert len(inner.calls["setup"]) == len(inner.calls["on_train_start"]) == len(inner.calls["on_train_end"]) == 1
    # time inside the inner callback's per-step hooks, per step: only on-steps spend any
    assert len(wrapper.hook_ms) == 12
    assert all(ms == 0.0 for ms, on_step in zip(wrapper.hook_ms, wrapper.step_flags) if not on_step)
    assert all(ms >= 2.0 for ms, on_step in zip(wrapper.hook_ms, wrapper.step_flags) if on_step)


def test_batch_size_override_is_checked_and_reaches_the_model_builder(tmp_path, monkeypatch):
    import pytest

    import overhead

    args = overhead.parse_args(["--models", "few_tensors", "--batch-size", "few_tensors=3"])
    assert args.model_kwargs == {"few_tensors": {"batch_size": 3}}
    for bad in ("gpt=16", "few_tensors=0", "few_tensors", "few_tensors=x"):  # a model not run, not a count
        with pytest.raises(SystemExit):
            overhead.parse_args(["--models", "few_tensors", "--batch-size", bad])

    built = []
    real = overhead.build_model

    def spy(name, **kwargs):
        built.append((name, kwargs))
        return real(name, **kwargs)

    monkeypatch.setattr(overhead, "build_model", spy)
    out = tmp_path / "r"
    result = overhead.main(["--models", "few_tensors", "--batch-size", "few_tensors=3", "--no-separate",
                            "--variants", "none,gradguard_nolog", "--warmup", "1", "--alternate", "2",
                            "--alternate-steps", "8", "--logger", "csv", "--out", str(out)])
    assert built and all(kw == {"batch_size": 3} for _, kw in built)
    # --no-separate: no separate run at all, only the alternating one of the callback variant named
    assert result["results"] == []
    assert [(r["variant"], r["pairs"] > 0) for r in result["alternating"]] == [("gradguard_nolog", True)]
    md = out.with_suffix(".md").read_text()
    assert "Not run (`--no-separate`)" in md and "few_tensors 3" in md


def test_nolog_variant_is_a_guard_that_logs_at_events_only():
    from overhead import make_guard

    from lightning_gradguard import GradGuard

    guard = make_guard("gradguard_nolog", GradGuard)
    assert (guard.log_layers, guard.log_every_n_steps) == ("none", 10**9)
    assert make_guard("gradguard", GradGuard).log_layers == "topk"
    assert make_guard("gradguard_layers", GradGuard).log_layers == "all"


def test_gpu_check_verdicts_against_the_gpu_targets():
    from gpu_check import _overhead_targets

    def row(variant, ratio, added, mem=1000.0):
        return {"model": "m", "variant": variant, "params": 2**20 * 25, "ratio": ratio, "added_ms": added,
                "paired_ratio_median": ratio, "stats": {"peak_mem_mb": mem}}  # 100 MB of fp32 gradients

    result = {
        "results": [row("none", 1.0, 0.0), row("gradguard", 1.05, 1.0, mem=1001.0),
                    row("gradguard_layers", 1.04, 2.0, mem=1010.0), row("grad_norm", 3.0, 50.0),
                    row("wandb_watch_1", 4.0, 5.0)],
        # alternating rows win over the separate runs where there is one
        "alternating": [{"model": "m", "variant": "gradguard", "ratio": 1.015, "added_ms": 0.4}],
        "alternating_many_vs_few": [{"variant": "gradguard", "added_many_ms": 3.0, "added_few_ms": 1.0,
                                     "ratio": 3.0, "verdict": "ABOVE 2x"},
                                    {"variant": "norm_pass", "added_many_ms": 1.0, "added_few_ms": 1.0,
                                     "ratio": 1.0, "verdict": "reference"}],
    }
    text = "\n".join(_overhead_targets(result))
    assert "m/gradguard: ratio 1.015 (alternating blocks" in text and "target <= 1.02 -> OK" in text
    assert "m/gradguard_layers: ratio 1.040 (separate runs" in text and "target <= 1.05 -> OK" in text
    assert "+0.40 ms against +50.00 ms, 125x less -> OK" in text  # grad_norm vs the alternating cost
    assert "+0.40 ms against +5.00 ms, 12x less -> OK" in text
    assert "+2.00 ms against +5.00 ms, 2x less -> BELOW 10x" in text
    assert "+1.0 MB, +1.00 % of the 100 MB of gradients -> OK" in text
    assert "+10.0 MB, +10.00 % of the 100 MB of gradients -> ABOVE 5 % OF THE GRADIENTS" in text
    assert "many_tensors vs few_tensors, gradguard (alternating): +3.000 ms against +1.000 ms, 3.00x -> ABOVE 2x" in text
    assert "norm_pass" not in text  # the floor is a reference, not judged
    above = _overhead_targets({**result, "alternating": [], "results": [row("none", 1.0, 0.0), row("gradguard", 1.021, 0.8)]})
    assert "ratio 1.021 (separate runs" in above[0] and above[0].endswith("ABOVE TARGET")


def test_the_deferred_variant_needs_a_fused_optimizer_and_gets_one(tmp_path):
    import pytest
    import torch

    import overhead
    from lightning_gradguard import GradGuard

    with pytest.raises(SystemExit):  # it would be refused at the start of training
        overhead.parse_args(["--variants", "gradguard_deferred"])
    args = overhead.parse_args(["--variants", "gradguard_deferred", "--fused"])
    assert args.fused and args.variants == ["none", "gradguard_deferred"]
    assert overhead.make_guard("gradguard_deferred", GradGuard).sync == "deferred"
    net = torch.nn.Linear(2, 2)
    assert overhead.BenchModule(net, None, 1e-3, fused=True).configure_optimizers().defaults["fused"] is True
    assert not overhead.BenchModule(net, None, 1e-3).configure_optimizers().defaults["fused"]


def test_gpu_check_deferred_section_runs_on_a_cpu(tmp_path, monkeypatch):
    """The GPU session's first command, as a CPU smoke test: sync counts and alternating runs, with verdicts."""
    import gpu_check

    monkeypatch.setitem(gpu_check.DEFERRED_GROUPS, "cpu", (("few_tensors", 8),))
    assert gpu_check.main(["--accelerator", "cpu", "--only", "d", "--warmup", "1", "--alternate-steps", "20",
                           "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "overhead-cpu-smoke-gpu-check.md").read_text()
    assert "mlp/gradguard_deferred, log_every_n_steps=1: +0.0 syncs vs none, 0 from guard code -> OK (none)" in text
    assert "## (d) sync='deferred', few_tensors batch 8, AdamW(fused=True)" in text
    table = text.split("few_tensors batch 8, AdamW(fused=True)")[1]
    assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| gradguard") or
            line.startswith("| norm_pass")] == ["| gradguard", "| gradguard_deferred", "| norm_pass"]
    assert "optimizer AdamW (fused=True)" in (tmp_path / "overhead-cpu-smoke-deferred-few_tensors-b8.md").read_text()


def test_block_timing_syncs_the_device_at_block_starts_only_and_times_whole_blocks(tmp_path, monkeypatch):
    """``--block-timing``: a GPU's queue may run ahead within a block; each step counts as its block's mean."""
    import torch

    import overhead

    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(len(timer.starts)))
    timer = overhead.StepTimer(0, True, None, 0, sync_every=3)  # cuda=True: the device synchronized by the timer
    for _ in range(9):
        timer.on_train_batch_start(None, None, None, 0)
        timer.mark_end(None)
    assert syncs == [0, 3, 6]  # before the start of steps 0, 3 and 6 only; never at a step's end
    syncs.clear()
    timer = overhead.StepTimer(0, True, None, 0)
    for _ in range(2):
        timer.on_train_batch_start(None, None, None, 0)
        timer.mark_end(None)
    assert syncs == [0, 1, 1, 2]  # without it: at every step's start and end

    out = tmp_path / "r"
    result = overhead.main(["--models", "few_tensors", "--batch-size", "few_tensors=3", "--no-separate",
                            "--variants", "none,gradguard_nolog", "--warmup", "1", "--alternate", "2",
                            "--alternate-steps", "12", "--logger", "csv", "--block-timing", "--out", str(out)])
    (row,) = result["alternating"]
    assert row["pairs"] >= 2 and row["median_on_ms"] > 0 and row["median_off_ms"] > 0
    assert "Block timing (`--block-timing`)" in out.with_suffix(".md").read_text()
