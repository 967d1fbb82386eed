"""GPU checks for GradGuard: run once on a machine with a CUDA card.

Three checks, one results file (``<out-dir>/overhead-<card>-gpu-check.md``,
written section by section, so a run cut short still leaves what it measured):

(a) **Overhead on CUDA**: ``benchmarks/overhead.py --device cuda`` under
    ``bf16-mixed``, one call per model group, each with its own
    ``overhead-<card>-<models>.md/.json``, copied into the check file with a
    verdict against the GPU targets of issue #8 (defaults <= +2 %, per-layer
    every step <= +5 %, >= 10x less added time than the ``grad_norm`` recipe
    and ``wandb.watch(log_freq=1)``, no extra peak memory in proportion to the
    gradients). Groups: the hand-written ``gpt`` (~110M parameters) and
    ``resnet50`` with every variant (none, GradGuard defaults, GradGuard
    per-layer every step, ``grad_norm``, ``wandb.watch`` at log_freq 1 and
    100, static clipping, the floor ``norm_pass``), then ``many_tensors`` vs
    ``few_tensors`` (2,000 vs 20 tensors) with the guard and the floor only.
(b) **Host syncs per step**: a few training steps run under
    ``torch.cuda.set_sync_debug_mode("warn")``; every "synchronizing CUDA
    operation" warning is recorded (``warnings.catch_warnings(record=True)``)
    and attributed to the step it happened in and to the Python line that
    caused it. Compared: no monitor, ``GradGuard()``, ``GradGuard(log_layers="all")``,
    and Lightning's ``grad_norm`` recipe, on a model with 26 and one with
    2,000 parameter tensors, with logging every step (``log_every_n_steps=1``)
    and on steps that do not log (``log_every_n_steps=1000``). The target: the
    guard's own per-step path does at most one host sync per step.
(c) **fp16 AMP**: a short ``precision="16-mixed"`` run with ``GradGuard()``
    (GradScaler path), once clean and once with one deliberately overflowing
    step (loss x 1e30 at step 15), printing the guard's events and the
    ``grad/`` metrics it logged (read back from a CSVLogger).
(d) **``GradGuard(sync="deferred")``**, with ``AdamW(fused=True)`` for every
    variant: (b)'s sync count for it next to ``GradGuard()`` (target: none
    from the guard's code), then ``overhead.py --fused --no-separate`` on
    ``gpt`` (batch 8 and 16) and ``resnet50`` (batch 64 and 128): no monitor,
    ``GradGuard()``, ``GradGuard(sync="deferred")`` and the one-sync floor
    ``norm_pass`` in alternating blocks, judged against the 2 % target.

Usage (on the GPU machine, from the repository root)::

    python benchmarks/gpu_check.py                 # all four: over 10 min (a, b, c took 451 s on an H200 and
                                                   # were cut inside (a)'s last group): run them apart
    python benchmarks/gpu_check.py --skip-bench    # only (b), (c) and (d)'s sync count, ~1 min
    python benchmarks/gpu_check.py --only d        # sync="deferred": syncs, then GPT and ResNet-50 (~5 min?)
    python benchmarks/gpu_check.py --out-dir /some/dir --alternate-steps 150
    python benchmarks/gpu_check.py --accelerator cpu --steps 5 --warmup 2 --repeats 1 --alternate-steps 40 \
        --out-dir /tmp/gc                          # smoke test of this script on a CPU (~1 min), no GPU claims

On an H200 (session 6): (b) 58 s, (c) 1 s, (a) 126 s for gpt, 111 s for
resnet50, and more than the ~60 s that were left for many_tensors/few_tensors
(whose steps take ~250 ms there). Results: ``benchmarks/results/overhead-nvidia-h200*.md``.

Without CUDA (and without ``--accelerator cpu``) it stops at once with a clear
message (exit code 2). Importing this module does nothing but define functions.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import io
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SYNC_MARK = "synchroniz"  # "called a synchronizing CUDA operation"


def _card_slug(accelerator: str = "cuda") -> str:
    import torch

    if accelerator != "cuda":
        return "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


class Report:
    """The results file, rewritten after every section."""

    def __init__(self, path: Path, header: str) -> None:
        self.path, self.parts = path, [header]
        self.flush()

    def add(self, text: str) -> None:
        self.parts.append(text)
        print(text, flush=True)
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("\n\n".join(self.parts) + "\n")


# ---------------------------------------------------------------- (a) overhead
# One overhead.py run per group, each with its own results files, so a check cut short keeps what it finished.
GROUPS = {"cuda": (("gpt",), ("resnet50",), ("many_tensors", "few_tensors")), "cpu": (("mlp",),)}
SMALL_VARIANTS = "none,gradguard,gradguard_layers,norm_pass"  # many vs few: the guard against the floor
GPU_TARGETS = {"gradguard": 1.02, "gradguard_layers": 1.05, "gradguard_deferred": 1.02}  # ratio to no monitor (#8)
# (d): sync="deferred" against GradGuard() and the one-sync floor, fused AdamW throughout, the batch sizes
DEFERRED_GROUPS = {"cuda": (("gpt", 8), ("gpt", 16), ("resnet50", 64), ("resnet50", 128)), "cpu": (("mlp", 64),)}
DEFERRED_VARIANTS = "none,gradguard,gradguard_deferred,norm_pass"


def _overhead_targets(result: dict) -> list[str]:
    """Verdicts against the GPU targets: defaults <= +2 %, per-layer every step <= +5 %, >= 10x less added time
    than the grad_norm recipe and wandb.watch(log_freq=1), no extra memory in proportion to the model."""
    lines = []
    alt = {(r["model"], r["variant"]): r for r in result.get("alternating", []) if "ratio" in r}
    sep = {(r["model"], r["variant"]): r for r in result["results"]}
    for (model, variant), row in sorted(sep.items()):
        if variant not in GPU_TARGETS or row.get("ratio") is None:
            continue
        limit, a = GPU_TARGETS[variant], alt.get((model, variant))
        ratio = a["ratio"] if a else row["ratio"]  # the alternating ratio is the steadier one where there is one
        added = a["added_ms"] if a else row["added_ms"]
        lines.append(f"- {model}/{variant}: ratio {ratio:.3f} ({'alternating blocks' if a else 'separate runs'}; "
                     f"separate runs {row['ratio']:.3f}, paired {row.get('paired_ratio_median') or float('nan'):.3f}), "
                     f"target <= {limit} -> {'OK' if ratio <= limit else 'ABOVE TARGET'}")
        for other in ("grad_norm", "wandb_watch_1"):
            o = sep.get((model, other))
            if o and o.get("added_ms") is not None:
                factor = o["added_ms"] / max(added, 1e-3)
                lines.append(f"  - vs {other}: +{added:.2f} ms against +{o['added_ms']:.2f} ms, {factor:.0f}x less "
                             f"-> {'OK' if factor >= 10 else 'BELOW 10x'}")
        mem, base = row["stats"].get("peak_mem_mb"), sep.get((model, "none"), {}).get("stats", {}).get("peak_mem_mb")
        grads_mb = row["params"] * 4 / 2**20  # fp32 gradients (bf16-mixed keeps fp32 parameters)
        if mem is not None and base is not None:
            extra = mem - base
            lines.append(f"  - peak memory {mem:.0f} MB against {base:.0f} MB with no monitor: {extra:+.1f} MB, "
                         f"{100 * extra / grads_mb:+.2f} % of the {grads_mb:.0f} MB of gradients -> "
                         f"{'OK (no gradient copy)' if extra < 0.05 * grads_mb else 'ABOVE 5 % OF THE GRADIENTS'}")
    for c in result.get("alternating_many_vs_few", []):
        if c["verdict"] != "reference":
            lines.append(f"- many_tensors vs few_tensors, {c['variant']} (alternating): +{c['added_many_ms']:.3f} ms "
                         f"against +{c['added_few_ms']:.3f} ms, {c['ratio']:.2f}x -> {c['verdict']}")
    return lines


def _run_overhead(report: Report, argv: list[str], title: str) -> tuple[dict, float] | None:
    """``overhead.main(argv)`` and its seconds; ``None`` when it failed (its traceback then goes into the report)."""
    import overhead

    t = time.perf_counter()
    try:
        return overhead.main(argv), time.perf_counter() - t
    except Exception:
        report.add(f"## {title}: failed\n\n```\n{traceback.format_exc()}\n```")
        return None


def check_overhead(args, report: Report) -> None:
    for models in GROUPS[args.accelerator]:
        out = args.out_dir / f"overhead-{_card_slug(args.accelerator)}-{'-'.join(models)}"
        argv = ["--device", args.accelerator, "--models", ",".join(models), "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--run-budget", str(args.run_budget),
                "--alternate-steps", str(args.alternate_steps), "--out", str(out)]
        if len(models) > 1:
            argv += ["--variants", SMALL_VARIANTS]
        ran = _run_overhead(report, argv, f"(a) Overhead, {', '.join(models)}")
        if ran is None:
            continue
        result, seconds = ran
        md = out.with_suffix(".md").read_text()
        # Everything after the title: command, versions, tables, GradGuard cost, notes.
        report.add(f"## (a) Overhead on {args.accelerator}, {', '.join(models)} (benchmarks/overhead.py, "
                   f"{seconds:.0f} s)\n\n" + md.split("\n", 1)[1].strip())
        report.add("\n".join([f"### Targets, {', '.join(models)}", ""] + (_overhead_targets(result) or ["- (no rows)"])))


# ---------------------------------------------------------------- (b) host syncs
def _sync_counting_callbacks(warmup: int, measure: int, cuda: bool):
    import torch
    from lightning.pytorch.callbacks import Callback

    class SyncDebug(Callback):
        """Turns on sync debug mode for steps [warmup, warmup + measure) and notes where each step starts
        in the list of recorded warnings. Must be the first callback."""

        def __init__(self) -> None:
            self.record: list | None = None  # set by the caller: the catch_warnings list
            self.marks: list[int] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            if warmup <= batch_idx <= warmup + measure:
                self.marks.append(len(self.record))
            if batch_idx == warmup + measure and cuda:
                torch.cuda.set_sync_debug_mode("default")

        def on_train_end(self, trainer, pl_module) -> None:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")

    return SyncDebug()


def count_syncs(model_name: str, variant: str, log_every: int, accelerator: str = "cuda", warmup: int = 3,
                measure: int = 5, fused: bool = False) -> dict:
    """Train a few steps; return sync warnings per measured step and the lines that caused them."""
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    import overhead
    from models import build_model

    torch.manual_seed(0)
    spec = build_model(model_name)
    module_cls = overhead.GradNormRecipeModule if variant == "grad_norm" else overhead.BenchModule
    module = module_cls(spec.net, spec.loss_fn, 1e-3, fused)
    g = torch.Generator().manual_seed(0)
    pool = [spec.make_batch(g) for _ in range(4)]
    total = warmup + measure + 1
    loader = torch.utils.data.DataLoader(overhead.BatchPool(pool, total), batch_size=None)
    cuda = accelerator == "cuda"
    counter = _sync_counting_callbacks(warmup, measure, cuda)
    callbacks = [counter]
    if variant.startswith("gradguard"):
        from lightning_gradguard import GradGuard

        callbacks.append({"gradguard": GradGuard, "gradguard_layers": lambda: GradGuard(log_layers="all"),
                          "gradguard_deferred": lambda: GradGuard(sync="deferred")}[variant]())
    tmp = tempfile.mkdtemp(prefix="gradguard-sync-")
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed", max_steps=total, max_epochs=1,
                        logger=CSVLogger(tmp), log_every_n_steps=log_every, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        counter.record = rec
        try:
            trainer.fit(module, train_dataloaders=loader)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [i for i, w in enumerate(rec) if SYNC_MARK in str(w.message)]
    per_step = [sum(1 for i in syncs if a <= i < b) for a, b in zip(counter.marks, counter.marks[1:])]
    sites = collections.Counter()
    for i in syncs:
        if counter.marks and counter.marks[0] <= i < counter.marks[-1]:
            w = rec[i]
            fn = w.filename
            for root in ("site-packages/", str(REPO) + "/"):
                fn = fn.split(root, 1)[-1]
            sites[f"{fn}:{w.lineno}"] += 1
    n = max(len(per_step), 1)
    return {"per_step": per_step, "sites": {k: v / n for k, v in sites.most_common()},
            "guard_sites": {k: v / n for k, v in sites.items() if "lightning_gradguard" in k}}


def check_syncs(args, report: Report, deferred: bool = False) -> None:
    """(b), or with ``deferred`` (d)'s sync count: fused AdamW, GradGuard() against sync="deferred"."""
    title = ("## (d) Host syncs per optimizer step with sync='deferred', AdamW(fused=True)" if deferred else
             "## (b) Host syncs per optimizer step")
    lines = [f"{title} (torch.cuda.set_sync_debug_mode('warn'))", "",
             "bf16-mixed, 3 warm-up steps then 5 counted steps. 'guard lines' = warnings raised from "
             "lightning_gradguard's own code; 'vs none' = total minus the no-monitor run (includes Lightning's "
             "own `.item()` per logged tensor metric at the logger flush).", "",
             "| model | log_every_n_steps | variant | syncs per step | vs none | from guard lines per step | top sites |",
             "|---|---:|---|---|---:|---:|---|"]
    verdicts = []
    variants = ("none", "gradguard", "gradguard_deferred") if deferred else (
        "none", "gradguard", "gradguard_layers", "grad_norm")
    for model_name in ("mlp",) if deferred else ("mlp", "many_tensors"):
        for log_every in (1000, 1):
            base = None
            for variant in variants:
                try:
                    r = count_syncs(model_name, variant, log_every, args.accelerator, fused=deferred)
                except Exception as exc:
                    traceback.print_exc()
                    lines.append(f"| {model_name} | {log_every} | {variant} | failed: {type(exc).__name__}: {exc} | | | |")
                    continue
                mean = sum(r["per_step"]) / max(len(r["per_step"]), 1)
                if variant == "none":
                    base = mean
                guard_lines = sum(r["guard_sites"].values())
                top = "; ".join(f"`{k}` {v:g}" for k, v in list(r["sites"].items())[:4]) or "–"
                delta = "–" if base is None else f"{mean - base:+.1f}"
                lines.append(f"| {model_name} | {log_every} | {variant} | {r['per_step']} | {delta} | {guard_lines:g} | {top} |")
                if variant == "gradguard_deferred":
                    # both: a sync inside a torch Python wrapper the guard calls is attributed to torch's line
                    ok = guard_lines == 0 and (base is None or mean - base <= 0)
                    vs = "no baseline" if base is None else f"{mean - base:+.1f} syncs vs none"
                    verdicts.append(f"- {model_name}/{variant}, log_every_n_steps={log_every}: {vs}, "
                                    f"{guard_lines:g} from guard code -> {'OK (none)' if ok else 'NOT SYNC-FREE'}")
                elif variant.startswith("gradguard") and log_every == 1000 and base is not None:
                    ok = mean - base <= 1 and guard_lines <= 1
                    verdicts.append(f"- {model_name}/{variant}, non-logging steps: {mean - base:+.1f} syncs vs none, "
                                    f"{guard_lines:g} from guard code -> {'OK (<= 1)' if ok else 'ABOVE TARGET (> 1)'}")
    report.add("\n".join(lines + [""] + verdicts))


# ---------------------------------------------------------------- (d) sync="deferred"
def check_deferred(args, report: Report) -> None:
    try:
        check_syncs(args, report, deferred=True)
    except Exception as exc:  # the timings below are still worth their minutes
        traceback.print_exc()
        report.add(f"## (d) Host syncs per optimizer step with sync='deferred'\n\nfailed: {type(exc).__name__}: {exc}")
    import overhead

    logger = "wandb" if overhead.wandb is not None else "csv"  # overhead.py's own optional import
    if logger == "csv":  # not on every GPU image: the runs still compare the variants, with a CSV logger
        report.add("(d): wandb does not import here; the overhead runs below use `--logger csv`.")
    for model, batch in DEFERRED_GROUPS[args.accelerator]:
        out = args.out_dir / f"overhead-{_card_slug(args.accelerator)}-deferred-{model}-b{batch}"
        # Lightning's default logging cadence (50): at log_every_n_steps=1 Lightning's own `.item()` of the
        # logged loss syncs every step, for every variant alike, and the host can never run ahead of the GPU,
        # which is what sync="deferred" is for. Block timing: the timer syncs at block boundaries only
        argv = ["--device", args.accelerator, "--models", model, "--batch-size", f"{model}={batch}", "--fused",
                "--no-separate", "--variants", DEFERRED_VARIANTS, "--warmup", str(args.warmup),
                "--alternate-steps", str(args.alternate_steps), "--out", str(out), "--logger", logger,
                "--log-every-n-steps", "50", "--block-timing"]
        ran = _run_overhead(report, argv, f"(d) sync='deferred', {model} batch {batch}")
        if ran is None:
            continue
        result, seconds = ran
        rows = [r for r in result.get("alternating", []) if "ratio" in r]
        lines = [f"## (d) sync='deferred', {model} batch {batch}, AdamW(fused=True) ({out.name}.md, "
                 f"{seconds:.0f} s)", "",
                 "| variant | ratio (on / off) | +ms/step | ratio IQR | in-hook ms | target |", "|---|---:|---:|---|---:|---|"]
        for r in rows:
            limit = GPU_TARGETS.get(r["variant"])
            verdict = "floor" if limit is None else ("OK" if r["ratio"] <= limit else "ABOVE TARGET")
            lines.append(f"| {r['variant']} | {r['ratio']:.3f} | {r['added_ms']:+.2f} | "
                         f"{r['ratio_p25']:.3f}-{r['ratio_p75']:.3f} | "
                         f"{r.get('hook_ms', float('nan')):.3f} | {verdict} |")
        report.add("\n".join(lines))


# ---------------------------------------------------------------- (c) fp16 AMP
def fp16_run(overflow_step: int | None, accelerator: str = "cuda", steps: int = 40) -> tuple[list, list[dict], dict]:
    import lightning.pytorch as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    import overhead
    from lightning_gradguard import GradGuard
    from models import build_model

    class Module(overhead.BenchModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if overflow_step is not None and self.trainer.global_step == overflow_step:
                loss = loss * 1e30  # fp16 gradients overflow to inf; the GradScaler skips the step
            return loss

    torch.manual_seed(0)
    spec = build_model("mlp")
    module = Module(spec.net, spec.loss_fn, 1e-3)
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(overhead.BatchPool([spec.make_batch(g) for _ in range(8)], steps),
                                         batch_size=None)
    guard = GradGuard()
    tmp = tempfile.mkdtemp(prefix="gradguard-fp16-")
    logger = CSVLogger(tmp, name="fp16")
    # on a CPU (the script's own smoke test) bf16: Lightning's 16-mixed needs CUDA
    precision = "16-mixed" if accelerator == "cuda" else "bf16-mixed"
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_steps=steps, max_epochs=1,
                        logger=logger, log_every_n_steps=1, callbacks=[guard], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=loader)
    rows = []
    metrics_csv = Path(logger.log_dir) / "metrics.csv"
    if metrics_csv.exists():
        with metrics_csv.open() as f:
            rows = [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    info = {"final_loss_scale": scaler.get_scale() if scaler is not None else None,
            "global_step": trainer.global_step}
    return list(getattr(guard, "events", [])), rows, info


def check_fp16(args, report: Report) -> None:
    parts = ["## (c) precision='16-mixed' with GradGuard() (GradScaler path), mlp, 40 steps",
             "Metrics table: the first 5 steps, the steps around the overflow, and the last 3."]
    for label, overflow in (("clean run", None), ("one overflowing step (loss x 1e30 at global_step 15)", 15)):
        try:
            events, rows, info = fp16_run(overflow, args.accelerator)
        except Exception as exc:
            traceback.print_exc()
            parts.append(f"### {label}\n\nfailed: {type(exc).__name__}: {exc}")
            continue
        ev = "\n".join(f"- step {getattr(e, 'step', '?')} {getattr(e, 'kind', '?')} "
                       f"({getattr(e, 'reason', '')}): actions {getattr(e, 'actions', '')}: {getattr(e, 'message', e)}"
                       for e in events) or "- (no events)"
        grad_keys = sorted({k for r in rows for k in r if k.startswith("grad/")})
        global_keys = [k for k in grad_keys if k.count("/") == 1]
        table = io.StringIO()
        if global_keys:
            table.write("| step | " + " | ".join(global_keys) + " |\n|" + "---|" * (len(global_keys) + 1) + "\n")
            for r in rows:
                step = int(float(r.get("step", -99)))
                near = step < 5 or step >= 37 or (overflow is not None and abs(step - overflow) <= 3)
                if near and any(k in r for k in global_keys):
                    table.write(f"| {r.get('step', '?')} | " + " | ".join(r.get(k, "") for k in global_keys) + " |\n")
        parts.append(
            f"### {label}\n\nglobal_step {info['global_step']}, final loss scale {info['final_loss_scale']}\n\n"
            f"Events ({len(events)}):\n\n{ev}\n\n"
            f"grad/ keys logged ({len(grad_keys)}): {', '.join(f'`{k}`' for k in grad_keys[:40])}"
            f"{' ...' if len(grad_keys) > 40 else ''}\n\n{table.getvalue() or '(no global grad/ metrics logged)'}")
    report.add("\n\n".join(parts))


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU checks for GradGuard (needs CUDA).")
    p.add_argument("--steps", type=int, default=20, help="measured steps per overhead run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--run-budget", type=float, default=8.0, help="seconds per overhead run before it is cut")
    p.add_argument("--alternate-steps", type=int, default=300, help="measured steps of each alternating run")
    p.add_argument("--skip-bench", action="store_true", help="skip (a), the overhead benchmark")
    p.add_argument("--only", choices=("a", "b", "c", "d"), action="append", help="run only these checks")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                   help="where the results files go (default benchmarks/results)")
    p.add_argument("--accelerator", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke test of this script on small models, no GPU claims (default cuda)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir.resolve()

    import torch

    if args.accelerator == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}). Nothing was run.", file=sys.stderr)
        return 2

    import os

    import lightning
    import overhead  # sets up offline W&B in a temporary folder

    os.chdir(REPO)  # the recorded commands are relative to the repository root

    name = torch.cuda.get_device_name(0) if args.accelerator == "cuda" else "CPU smoke test (no GPU claims)"
    path = args.out_dir / f"overhead-{_card_slug(args.accelerator)}-gpu-check.md"
    header = (f"# GradGuard GPU check — {name}\n\n```bash\npython benchmarks/gpu_check.py"
              f"{(' ' + ' '.join(argv if argv is not None else sys.argv[1:])) if (argv or sys.argv[1:]) else ''}\n```\n\n"
              f"- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"lightning {lightning.__version__}, " + ", ".join(f"{k} {v}" for k, v in overhead.versions().items()
                                                                 if k not in ("torch", "lightning")))
    report = Report(path, header)
    only = set(args.only or ("a", "b", "c", "d"))
    if args.skip_bench:
        only.discard("a")
    if args.skip_bench and "d" in only:
        checks_d = [("d", lambda a, r: check_syncs(a, r, deferred=True))]  # (d)'s sync count only
    else:
        checks_d = [("d", check_deferred)]
    checks = [("b", check_syncs), ("c", check_fp16), *checks_d, ("a", check_overhead)]  # the long one last
    t0 = time.perf_counter()
    for key, fn in checks:
        if key not in only:
            continue
        t = time.perf_counter()
        try:
            fn(args, report)
        except Exception as exc:
            report.add(f"## ({key}) failed\n\n```\n{traceback.format_exc()}\n```")
            print(f"check ({key}) failed: {exc}", file=sys.stderr)
        print(f"[check ({key}) took {time.perf_counter() - t:.0f} s]", flush=True)
    report.add(f"_total {time.perf_counter() - t0:.0f} s_")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
