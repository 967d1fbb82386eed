"""How much does GradGuard slow training down? One command to measure it.

The benchmark trains the same model, with the same Trainer and the same logger,
under several "gradient monitoring" variants and reports the per-step wall
time of each, relative to training with no monitor at all:

=================  ==========================================================
``none``           no monitor (the baseline)
``gradguard``      ``GradGuard()`` with its defaults
``gradguard_layers`` ``GradGuard(log_every_n_steps=1, log_layers="all")``
``grad_norm``      Lightning's documented recipe: ``self.log_dict(grad_norm(
                   self, norm_type=2))`` in ``on_before_optimizer_step``
``wandb_watch_1``  ``wandb.watch(model, log="gradients", log_freq=1)`` on the
                   WandbLogger's run
``wandb_watch_100`` the same with ``log_freq=100``
``clip``           ``Trainer(gradient_clip_val=1.0)``
``norm_pass``      one ``torch._foreach_norm`` over all gradients and one
                   ``.cpu()`` of the result per step, nothing else: the cost
                   of reading every gradient once, the floor of any monitor
                   that looks at every gradient (on a CPU, ``_foreach_norm``
                   pays ~1 us per tensor, so for many_tensors this is not a
                   floor: GradGuard reads those in stacked blocks)
=================  ==========================================================

How it measures
---------------
* Every (model, variant) pair is trained ``--repeats`` times, each time from a
  fresh model (same seed), a fresh logger and a fresh Trainer, all in this one
  process. Repeats are interleaved: round ``r`` runs every variant once, in an
  order rotated by ``r`` (or shuffled, ``--order shuffle``), so slow drift of
  the machine (thermal, other load) hits every variant alike.
* A tiny timing callback takes ``time.perf_counter()`` in
  ``on_train_batch_start`` (first callback) and ``on_train_batch_end`` (last
  callback), with ``torch.cuda.synchronize()`` there on CUDA and nowhere else.
  The headline number, "ms/step", is the time from one step's
  ``on_train_batch_start`` to the next one's: it covers the whole optimizer
  step *including* Lightning's logger flush, which runs after
  ``on_train_batch_end`` (so a start->end window would miss the cost of
  writing the logged metrics to W&B/CSV). The start->end window is reported
  too ("in-step ms"). The first ``--warmup`` steps of each run are discarded.
* Alternating blocks (``--alternate N``, default 5): the callback variants
  (``gradguard``, ``gradguard_layers``, ``norm_pass``) also run once each
  with the callback on in every other block of N steps and off in the others
  (``--alternate-steps``, default 400 measured steps). On and off steps then
  share one model, one process and the same minutes of the machine's life;
  the ratio is the median over neighbouring (off, on) block pairs. On a
  shared machine whose speed drifts by 10% between runs, this is the number
  to trust for differences of a few percent; the separate runs are kept for
  the variants that cannot be switched per step (``grad_norm`` lives in the
  LightningModule, ``wandb.watch`` in parameter hooks, ``clip`` in the Trainer).
  On CUDA the timer synchronizes the device at every step's start and end, so
  the host can never run ahead of the GPU; ``--block-timing`` synchronizes
  only at block boundaries instead and gives every step its block's mean
  time: a GPU's queue then runs ahead as in real training, which is where a
  per-step host sync costs most (and what ``sync="deferred"`` is for).
* Data are synthetic (generated once per model, a small pool of batches
  cycled by the DataLoader); nothing is downloaded.
* wandb runs offline (``WANDB_MODE=offline``) into a temporary folder that is
  deleted at the end. ``wandb.watch`` hooks are removed with ``unwatch`` after
  each run and every run builds a fresh model, so no hook outlives its run.
* CPU runs use one intra-op thread by default (``--threads 1``): on a small
  machine that also runs other work (2 cores, tests running beside), a second
  OpenMP thread makes every op wait for the busiest core and per-step times
  swing by 10x; with one thread they stay within a few percent. ``--threads 0``
  keeps torch's own choice.
* Peak memory: ``torch.cuda.max_memory_allocated`` per run on CUDA; not
  measured on CPU (the runs share one process, so ``maxrss`` would not
  separate them, and ``tracemalloc`` would distort the timings).
* A run whose measured part exceeds ``--run-budget`` seconds is stopped early
  (after at least ``--min-steps`` measured steps), so a pathological variant
  (per-step histograms of 2,000 tensors) cannot eat the whole time budget;
  the ``n`` column shows how many steps each median is over.

Usage
-----
    python benchmarks/overhead.py                      # full CPU run, ~10 min on 2 cores (log every step)
    python benchmarks/overhead.py --log-every-n-steps 50   # Lightning's default logging cadence
    python benchmarks/overhead.py --quick              # smoke test, < 1 min
    python benchmarks/overhead.py --device cuda        # gpt + resnet50, bf16-mixed
    python benchmarks/overhead.py --models mlp --variants none,gradguard --steps 100 --repeats 5
    python benchmarks/overhead.py --device cuda --models gpt --batch-size gpt=16 --no-separate \
        --variants none,gradguard,gradguard_nolog,norm_pass   # alternating runs only, another batch size

``gradguard_nolog`` (run only when named) is ``GradGuard(log_layers="none")``
logging at event steps only: its read and detection without the logging.

Results go to ``benchmarks/results/overhead-<machine-tag>.md`` and ``.json``
(``--out PATH`` to change; ``--quick`` appends ``-quick``). The markdown file
holds the exact command line, the versions and the machine.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Make `models` and the working tree's `lightning_gradguard` importable when run as a script.
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# W&B must be told before it is imported: offline, quiet, into a temporary folder.
_WANDB_TMP = tempfile.mkdtemp(prefix="gradguard-bench-wandb-")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ["WANDB_DIR"] = _WANDB_TMP
atexit.register(shutil.rmtree, _WANDB_TMP, ignore_errors=True)

import torch  # noqa: E402
import lightning  # noqa: E402
import lightning.pytorch as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, WandbLogger  # noqa: E402
from lightning.pytorch.utilities import grad_norm  # noqa: E402

from models import CPU_MODELS, CUDA_MODELS, MODELS, build_model, count_params  # noqa: E402

try:  # wandb is optional for --logger csv
    import wandb
except Exception:  # pragma: no cover - depends on the environment
    wandb = None

ALL_VARIANTS = ("none", "gradguard", "gradguard_layers", "grad_norm", "wandb_watch_1", "wandb_watch_100", "clip",
                "norm_pass")
# Not run unless named: GradGuard(log_layers="none") logging only at event steps, so that its read
# and detection can be told apart from its logging (diagnostic); GradGuard(sync="deferred"), which
# needs a fused optimizer (--fused).
EXTRA_VARIANTS = ("gradguard_nolog", "gradguard_deferred")
GUARD_VARIANTS = ("gradguard", "gradguard_layers", "gradguard_nolog", "gradguard_deferred")
LEARNING_RATES = {"gpt": 3e-4}  # everything else: 1e-3 (AdamW)
POOL_BATCHES = 8  # distinct synthetic batches per model, cycled by the DataLoader


def make_guard(variant: str, GradGuard):
    """The GradGuard of a guard variant (``GradGuard`` passed in: it is imported late, see _import_gradguard)."""
    if variant == "gradguard":
        return GradGuard()
    if variant == "gradguard_nolog":
        return GradGuard(log_every_n_steps=10**9, log_layers="none")
    if variant == "gradguard_deferred":
        return GradGuard(sync="deferred")
    return GradGuard(log_every_n_steps=1, log_layers="all")


def _import_gradguard():
    """Return (GradGuard class or None, error string or None). Retried per run, so a package
    that is still being written can be picked up without restarting."""
    try:
        from lightning_gradguard import GradGuard

        return GradGuard, None
    except Exception as exc:  # ImportError, or a syntax error in a half-written package
        return None, f"{type(exc).__name__}: {exc}"


# ---------------------------------------------------------------- timing
class StepTimer(Callback):
    """Records per-step wall times (and the process's CPU time per step). Must be the first
    callback in the Trainer's list; its companion :class:`StepTimerEnd` must be the last one."""

    def __init__(self, warmup: int, cuda: bool, budget_s: float | None, min_steps: int,
                 sync_every: int | None = None) -> None:
        self.warmup, self.cuda, self.budget_s, self.min_steps = warmup, cuda, budget_s, min_steps
        # None: the device is synchronized at every step's start and end; N: only at the start of every
        # N-th step (block timing: read block times from ``starts``, not per-step times)
        self.sync_every = sync_every
        self.starts: list[float] = []  # every step's on_train_batch_start time
        self.periods: list[float] = []  # on_train_batch_start -> next on_train_batch_start
        self.windows: list[float] = []  # on_train_batch_start -> on_train_batch_end
        self.cpu_periods: list[float] = []  # process CPU time, start -> next start
        self._start: float | None = None
        self._cpu_start: float | None = None
        self._measure_t0: float | None = None
        self.stopped_early = False

    def _now(self, sync: bool = True) -> float:
        if self.cuda and sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        t = self._now(self.sync_every is None or len(self.starts) % self.sync_every == 0)
        self.starts.append(t)
        c = time.process_time()
        if self._start is not None:
            self.periods.append(t - self._start)
            self.cpu_periods.append(c - self._cpu_start)
        self._start, self._cpu_start = t, c
        if len(self.windows) == self.warmup:
            self._measure_t0 = t

    def mark_end(self, trainer) -> None:
        t = self._now(self.sync_every is None)
        self.windows.append(t - self._start)
        measured = len(self.windows) - self.warmup - 1  # the last window's period would need one more step
        if (self.budget_s and self._measure_t0 is not None and measured >= self.min_steps
                and t - self._measure_t0 > self.budget_s):
            trainer.should_stop = True
            self.stopped_early = True

    def measured(self) -> tuple[list[float], list[float], list[float]]:
        """Post-warm-up (periods, windows, CPU periods) in milliseconds."""
        return tuple([x * 1e3 for x in xs[self.warmup:]] for xs in (self.periods, self.windows, self.cpu_periods))


class StepTimerEnd(Callback):
    """Closes the timing window after every other callback's on_train_batch_end."""

    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.timer.mark_end(trainer)


class WandbWatch(Callback):
    """``wandb.watch(model, log="gradients", log_freq=n)`` on the WandbLogger's own run,
    done once the model sits on its device; undone (hooks removed) when fit ends."""

    def __init__(self, log_freq: int) -> None:
        self.log_freq = log_freq

    def on_fit_start(self, trainer, pl_module) -> None:
        # log_graph=False: the wandb.watch default (WandbLogger.watch defaults it to True).
        trainer.logger.experiment.watch(pl_module, log="gradients", log_freq=self.log_freq, log_graph=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        trainer.logger.experiment.unwatch(pl_module)


# ---------------------------------------------------------------- modules and data
class BenchModule(L.LightningModule):
    """Wraps a network from models.py; AdamW (``fused``: its one-kernel form); logs the loss every step."""

    def __init__(self, net: torch.nn.Module, loss_fn, lr: float, fused: bool = False) -> None:
        super().__init__()
        self.net, self.loss_fn, self.lr, self.fused = net, loss_fn, lr, fused

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss_fn(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, fused=True if self.fused else None)


class NormPass(Callback):
    """The floor: read every gradient once (one foreach norm) and copy the norms to the host (one sync)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms = torch.stack(torch._foreach_norm(grads)).cpu()


class GradNormRecipeModule(BenchModule):
    """The same module plus Lightning's documented gradient-norm logging recipe."""

    def on_before_optimizer_step(self, optimizer) -> None:
        norms = grad_norm(self, norm_type=2)
        self.log_dict(norms)


class BatchPool(torch.utils.data.Dataset):
    """``length`` batches, cycling through a small pool of pre-generated ones (whole batches,
    so the DataLoader does no collation: ``batch_size=None``)."""

    def __init__(self, pool: list, length: int) -> None:
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.pool[i % len(self.pool)]


# ---------------------------------------------------------------- one run
@dataclass
class RunResult:
    periods_ms: list[float] = field(default_factory=list)
    windows_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None
    stopped_early: bool = False
    n_events: int | None = None
    event_kinds: dict | None = None
    hooks_left: int = 0
    error: str | None = None
    skipped: str | None = None


def make_logger(kind: str, save_dir: str, name: str):
    if kind == "wandb":
        return WandbLogger(offline=True, save_dir=save_dir, project="gradguard-overhead", name=name)
    return CSVLogger(save_dir=save_dir, name=name)


def variant_unavailable(variant: str, args) -> str | None:
    """Why a variant cannot run in this configuration (None when it can)."""
    if variant.startswith("wandb_watch") and args.logger != "wandb":
        return "wandb.watch needs the W&B logger (--logger wandb)"
    if variant.startswith("wandb_watch") and wandb is None:
        return "wandb does not import"
    if variant in GUARD_VARIANTS:
        _, err = _import_gradguard()
        return f"lightning_gradguard does not import ({err})" if err else None
    return None


def run_once(model_name: str, variant: str, pool: list, args, round_idx: int, *, warmup: int, steps: int,
             budget_s: float | None) -> RunResult:
    """Train ``model_name`` under ``variant`` once and return its step times."""
    res = RunResult()
    reason = variant_unavailable(variant, args)
    if reason:
        res.skipped = reason
        return res

    cuda = args.device == "cuda"
    torch.manual_seed(args.seed)  # same initial weights for every variant
    spec = build_model(model_name, **args.model_kwargs.get(model_name, {}))
    module_cls = GradNormRecipeModule if variant == "grad_norm" else BenchModule
    module = module_cls(spec.net, spec.loss_fn, LEARNING_RATES.get(model_name, 1e-3), args.fused)

    timer = StepTimer(warmup, cuda, budget_s, args.min_steps)
    extra_callbacks: list[Callback] = []
    guard = None
    trainer_kwargs: dict[str, Any] = {}
    if variant in GUARD_VARIANTS:
        GradGuard, _ = _import_gradguard()
        try:
            guard = make_guard(variant, GradGuard)
        except TypeError as exc:  # the package may not have every argument yet
            res.skipped = f"GradGuard rejected the arguments: {exc}"
            return res
        extra_callbacks.append(guard)
    elif variant.startswith("wandb_watch_"):
        extra_callbacks.append(WandbWatch(int(variant.rsplit("_", 1)[1])))
    elif variant == "clip":
        trainer_kwargs["gradient_clip_val"] = 1.0
    elif variant == "norm_pass":
        extra_callbacks.append(NormPass())

    save_dir = tempfile.mkdtemp(prefix=f"{model_name}-{variant}-", dir=_WANDB_TMP)
    logger = make_logger(args.logger, save_dir, f"{model_name}-{variant}-r{round_idx}")
    loader = torch.utils.data.DataLoader(BatchPool(pool, warmup + steps + 1), batch_size=None, shuffle=False, num_workers=0)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision,
        # +1 step: the last measured step's period ends at the next step's start.
        max_steps=warmup + steps + 1, max_epochs=1, logger=logger, log_every_n_steps=args.log_every_n_steps,
        callbacks=[timer, *extra_callbacks, StepTimerEnd(timer)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, benchmark=True if cuda else None, **trainer_kwargs,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        trainer.fit(module, train_dataloaders=loader)
    except Exception as exc:  # keep going: one broken variant must not lose the whole benchmark
        res.error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        if args.logger == "wandb" and logger._experiment is not None:
            if variant.startswith("wandb_watch_"):  # WandbWatch.on_fit_end does it, unless fit failed first
                with contextlib.suppress(Exception):
                    logger.experiment.unwatch(module)
            logger.experiment.finish()  # the benchmark owns these runs
    if cuda:
        res.peak_mem_mb = torch.cuda.max_memory_allocated() / 2**20
    res.periods_ms, res.windows_ms, res.cpu_ms = timer.measured()
    res.windows_ms = res.windows_ms[: len(res.periods_ms)]  # drop the extra closing step
    res.stopped_early = timer.stopped_early
    # Every parameter hook (wandb.watch installs one per parameter) must be gone now.
    res.hooks_left = sum(len(getattr(p, attr, None) or {}) for p in module.parameters()
                         for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"))
    if res.hooks_left:
        warnings.warn(f"{res.hooks_left} parameter hooks left behind by {variant}", stacklevel=1)
    if guard is not None:
        events = list(getattr(guard, "events", []) or [])
        res.n_events = len(events)
        kinds: dict[str, int] = {}
        for e in events:
            k = getattr(e, "kind", None) or (e.get("kind") if isinstance(e, dict) else "?")
            kinds[str(k)] = kinds.get(str(k), 0) + 1
        res.event_kinds = kinds
    del trainer, module, spec, logger, guard
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------- alternating blocks within one run
TOGGLED_HOOKS = frozenset({"on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
                           "on_before_zero_grad", "on_train_batch_end"})
ALTERNATING_VARIANTS = ("gradguard", "gradguard_layers", "gradguard_nolog", "gradguard_deferred",
                        "norm_pass")  # the callback-based ones


class Alternating(Callback):
    """Runs ``inner`` callbacks on alternate blocks of ``block`` steps only: per-step hooks are
    forwarded in "on" blocks and skipped in "off" blocks; every other ``on_*`` hook, ``setup`` and
    ``teardown`` are always forwarded (not ``state_dict``: these runs save no checkpoints). Steps of both kinds then share one run, one model, one
    process and the same minutes of the machine's life."""

    def __init__(self, inner: list[Callback], block: int) -> None:
        self.inner, self.block = inner, block
        self.step_flags: list[bool] = []  # per step (on?), from its on_train_batch_start
        self.hook_ms: list[float] = []  # per step: time spent in the inner callbacks' per-step hooks

    def __getattribute__(self, name: str):
        if name.startswith("on_") or name in ("setup", "teardown"):
            inner, flags = object.__getattribute__(self, "inner"), object.__getattribute__(self, "step_flags")
            hook_ms = object.__getattribute__(self, "hook_ms")
            record, toggled = name == "on_train_batch_start", name in TOGGLED_HOOKS

            def forward(*args, **kwargs):
                if record:
                    flags.append((len(flags) // object.__getattribute__(self, "block")) % 2 == 1)
                    hook_ms.append(0.0)
                if toggled and not (flags and flags[-1]):
                    return None
                start = time.perf_counter()
                for cb in inner:
                    getattr(cb, name)(*args, **kwargs)
                if toggled and hook_ms:
                    hook_ms[-1] += (time.perf_counter() - start) * 1e3
                return None

            return forward
        return object.__getattribute__(self, name)


def alternating_callbacks(variant: str) -> list[Callback]:
    if variant == "norm_pass":
        return [NormPass()]
    GradGuard, _ = _import_gradguard()
    return [make_guard(variant, GradGuard)]


def run_alternating(model_name: str, variant: str, pool: list, args) -> dict:
    """One run, the variant on in every other block of ``args.alternate`` steps: per-block-pair ratio
    of median step times (off block, then on block)."""
    torch.manual_seed(args.seed)
    spec = build_model(model_name, **args.model_kwargs.get(model_name, {}))
    module = BenchModule(spec.net, spec.loss_fn, LEARNING_RATES.get(model_name, 1e-3), args.fused)
    warmup, steps = args.warmup + args.alternate * 2, args.alternate_steps
    timer = StepTimer(warmup, args.device == "cuda", None, 0, args.alternate if args.block_timing else None)
    alternating = Alternating(alternating_callbacks(variant), args.alternate)
    save_dir = tempfile.mkdtemp(prefix=f"{model_name}-{variant}-alt-", dir=_WANDB_TMP)
    logger = make_logger(args.logger, save_dir, f"{model_name}-{variant}-alternating")
    loader = torch.utils.data.DataLoader(BatchPool(pool, warmup + steps + 1), batch_size=None, shuffle=False, num_workers=0)
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=warmup + steps + 1, max_epochs=1,
        logger=logger, log_every_n_steps=args.log_every_n_steps, callbacks=[timer, alternating, StepTimerEnd(timer)],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
        benchmark=True if args.device == "cuda" else None,
    )
    try:
        trainer.fit(module, train_dataloaders=loader)
    finally:
        if args.logger == "wandb" and logger._experiment is not None:
            logger.experiment.finish()
    periods, _, cpu = timer.measured()
    first = warmup
    flags = alternating.step_flags[warmup : warmup + len(periods)]
    if args.block_timing:  # synced only at block starts: each step gets its block's mean time
        size, starts = args.alternate, timer.starts
        first = -(-warmup // size) * size
        periods = []
        for s in range(first, len(starts) - size, size):
            periods += [(starts[s + size] - starts[s]) * 1e3 / size] * size
        flags = alternating.step_flags[first : first + len(periods)]
    # blocks: consecutive steps with the same flag; ratio of each (off, on) pair of neighbouring blocks
    blocks: list[tuple[bool, list[float]]] = []
    for flag, ms in zip(flags, periods):
        if not blocks or blocks[-1][0] != flag:
            blocks.append((flag, []))
        blocks[-1][1].append(ms)
    pairs = [(statistics.median(a[1]), statistics.median(b[1])) for a, b in zip(blocks, blocks[1:])
             if not a[0] and b[0] and len(a[1]) == len(b[1]) == args.alternate]
    on = [ms for flag, ms in zip(flags, periods) if flag]
    off = [ms for flag, ms in zip(flags, periods) if not flag]
    in_hooks = [ms for flag, ms in zip(flags, alternating.hook_ms[first : first + len(periods)]) if flag]
    del trainer, module, spec, logger
    gc.collect()
    if not pairs:
        return {"error": "no complete pair of blocks"}
    return {
        "model": model_name, "variant": variant, "pairs": len(pairs), "steps_on": len(on), "steps_off": len(off),
        "median_on_ms": statistics.median(on), "median_off_ms": statistics.median(off),
        "hook_ms": statistics.median(in_hooks),
        "ratio": statistics.median(b / a for a, b in pairs),
        "added_ms": statistics.median(b - a for a, b in pairs),
        "ratio_p25": _quantile([b / a for a, b in pairs], 0.25), "ratio_p75": _quantile([b / a for a, b in pairs], 0.75),
    }


# ---------------------------------------------------------------- statistics and output
def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(runs: list[RunResult]) -> dict:
    ok = [r for r in runs if not r.skipped and not r.error and r.periods_ms]
    out: dict[str, Any] = {
        "skipped": next((r.skipped for r in runs if r.skipped), None),
        "errors": [r.error for r in runs if r.error],
    }
    if not ok:
        return out
    periods = [p for r in ok for p in r.periods_ms]
    windows = [w for r in ok for w in r.windows_ms]
    rep_medians = [statistics.median(r.periods_ms) for r in ok]
    out.update(
        n=len(periods), median_ms=statistics.median(periods), p25_ms=_quantile(periods, 0.25),
        p75_ms=_quantile(periods, 0.75), min_ms=min(periods), max_ms=max(periods),
        repeat_medians_ms=rep_medians, in_step_median_ms=statistics.median(windows),
        peak_mem_mb=max((r.peak_mem_mb for r in ok if r.peak_mem_mb is not None), default=None),
        stopped_early=sum(r.stopped_early for r in ok), hooks_left=sum(r.hooks_left for r in ok),
        cpu_median_ms=statistics.median([c for r in ok for c in r.cpu_ms]),
        cpu_repeat_medians_ms=[statistics.median(r.cpu_ms) for r in ok],
    )
    if any(r.n_events is not None for r in ok):
        out["guard_events_per_run"] = [r.n_events for r in ok]
        out["guard_event_kinds"] = [r.event_kinds for r in ok]
    return out


def machine_tag(device: str) -> tuple[str, str]:
    """(file-name tag, human description) for the CPU or GPU doing the work."""
    slug = lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")  # noqa: E731
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        return slug(name), f"{name} (CUDA {torch.version.cuda}), host {platform.processor() or platform.machine()}"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    n = os.cpu_count() or 1
    return f"{slug(name)}-{n}c", f"{name}, {n} cores, torch threads {torch.get_num_threads()}"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
         "wandb": getattr(wandb, "__version__", None)}
    with contextlib.suppress(Exception):
        import lightning_gradguard

        v["lightning_gradguard"] = getattr(lightning_gradguard, "__version__", "unversioned")
    return v


def fmt(x: float | None, nd: int = 2) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _pct(x: float | None) -> float | None:
    return None if x is None else (x - 1) * 100


def render_markdown(meta: dict, table: list[dict], comparisons: list[dict], alternating: list[dict] = (),
                    alt_comparisons: list[dict] = ()) -> str:
    cpu = meta["device"] == "cpu"
    lines = [
        f"# GradGuard overhead benchmark — {meta['machine']}",
        "",
        "Reproduce with:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['machine']}",
        f"- device: {meta['device']}, precision `{meta['precision']}`, logger `{meta['logger']}` "
        f"(log_every_n_steps={meta['log_every_n_steps']}), torch threads {meta['torch_threads']}, "
        f"optimizer AdamW{' (fused=True)' if meta.get('fused') else ''}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- steps per run: {meta['warmup']} warm-up (discarded) + {meta['steps']} measured, "
        f"{meta['repeats']} interleaved repeats ({meta['order']} order), run budget {meta['run_budget']} s"
        if table else "- separate runs: none (`--no-separate`), only the alternating runs",
        f"- GradGuard import: {meta['gradguard_import']}",
        *([f"- batch sizes (instead of the models' defaults): "
           + ", ".join(f"{m} {n}" for m, n in meta["batch_sizes"].items())] if meta.get("batch_sizes") else []),
        f"- load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in meta['loadavg_start'])}, "
        f"at end {'/'.join(f'{x:.2f}' for x in meta['loadavg_end'])}; wall time {meta['wall_s']} s",
        "",
        "ms/step = wall time from one `on_train_batch_start` to the next (the whole optimizer step, incl. the "
        "logger flush); median over all measured steps of all repeats. IQR = 25th–75th percentile of those steps; "
        "repeats = range of the per-repeat medians. ratio and +ms are against `none` of the same model. "
        "in-step = `on_train_batch_start` → `on_train_batch_end` (excludes the logger flush)."
        + (" CPU ms/step = CPU time of this process over the same interval (`time.process_time`): it does not "
           "count time spent waiting for a core taken by other work on the machine, so on a busy machine its "
           "ratio is the steadier one; it does not count work done in wandb's own service process either."
           if cpu else ""),
        "",
    ]
    if alternating:
        lines += [
            f"## Alternating blocks within one run (the steadier measurement)", "",
            f"One run per (model, variant), {meta['alternate_steps']} measured steps; the variant's callback is on "
            f"in every other block of {meta['alternate']} steps and off in the others, so both kinds of steps share "
            "the model, the process and the same minutes of the machine's life (separate runs of the *same* variant "
            "differed by up to 10% between repeats, on the shared 2-core CPU VM and on the H200's host alike). ratio = median over "
            "neighbouring (off, on) block pairs of median on-step / median off-step time; +ms likewise. in-hook ms = "
            "median over the on-steps of the time spent inside the callback's own per-step hooks (its direct cost, "
            "steadier than a difference of step times; it misses what the callback does to the caches of the work "
            "around it)." + (" Block timing (`--block-timing`): the device is synchronized only at block "
                             "boundaries and each step counts as its block's mean time, so the GPU queue runs ahead "
                             "as in real training." if meta.get("block_timing") else ""), "",
            "| model | variant | ratio (on / off) | +ms/step | ratio IQR over pairs | in-hook ms | median on ms | median off ms | block pairs |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in alternating:
            if "ratio" not in r:
                lines.append(f"| {r['model']} | {r['variant']} | {r.get('error', 'failed')} | | | | | | |")
                continue
            lines.append(f"| {r['model']} | {r['variant']} | {fmt(r['ratio'], 3)} | {fmt(r['added_ms'])} | "
                         f"{fmt(r['ratio_p25'], 3)}–{fmt(r['ratio_p75'], 3)} | {fmt(r.get('hook_ms'), 3)} | "
                         f"{fmt(r['median_on_ms'])} | {fmt(r['median_off_ms'])} | {r['pairs']} |")
        if alt_comparisons:
            lines += ["", "many_tensors (2,000 tensors) vs few_tensors (20 tensors), alternating runs, added ms per step "
                      "(target for GradGuard: within 2x):", "",
                      "| variant | +ms many_tensors | +ms few_tensors | many / few | verdict |", "|---|---:|---:|---:|---|"]
            lines += [f"| {c['variant']} | {fmt(c['added_many_ms'])} | {fmt(c['added_few_ms'])} | {fmt(c['ratio'])} | "
                      f"{c['verdict']} |" for c in alt_comparisons]
        lines += ["", "## Separate runs, interleaved repeats", ""]
    if not table:
        lines += ["Not run (`--no-separate`)."]
    cols = ["model", "params", "tensors", "variant", "ms/step (median)", "IQR", "repeats", "ratio vs none",
            "+ms vs none"] + (["CPU ms/step", "CPU ratio"] if cpu else []) + ["in-step ms"] + \
        ([] if cpu else ["peak mem MB"]) + ["n"]
    lines += [] if not table else ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i in (0, 3) else "---:" for i in range(len(cols))) + "|"]
    for row in table:
        s = row["stats"]
        cells = [row["model"], f"{row['params']:,}", f"{row['tensors']:,}", row["variant"]]
        if "median_ms" not in s:
            cells.append(f"{'skipped' if s.get('skipped') else 'failed'} (see notes)")
            lines.append("| " + " | ".join(cells + [""] * (len(cols) - len(cells))) + " |")
            continue
        rm = s["repeat_medians_ms"]
        cells += [fmt(s["median_ms"]), f"{fmt(s['p25_ms'])}–{fmt(s['p75_ms'])}", f"{fmt(min(rm))}–{fmt(max(rm))}",
                  fmt(row.get("ratio"), 3), fmt(row.get("added_ms"))]
        if cpu:
            cells += [fmt(s["cpu_median_ms"]), fmt(row.get("cpu_ratio"), 3)]
        cells.append(fmt(s["in_step_median_ms"]))
        if not cpu:
            cells.append(fmt(s["peak_mem_mb"], 0))
        cells.append(f"{s['n']}" + (f" ({s['stopped_early']} cut)" if s["stopped_early"] else ""))
        lines.append("| " + " | ".join(cells) + " |")

    guard_rows = [r for r in table if r["variant"] in GUARD_VARIANTS and r.get("added_ms") is not None]
    if guard_rows:
        lines += ["", "## Cost per step of GradGuard minus none", "",
                  "pooled = from the pooled medians above; paired = median over rounds of (variant / none) within "
                  "the round; best = best repeat of each (the least disturbed by other work on the machine)"
                  + ("; CPU = process CPU time." if cpu else "."), "",
                  "| model | variant | +ms/step pooled | +% pooled | +% paired | +ms best | +% best"
                  + (" | +CPU ms | +% CPU" if cpu else "") + " | guard events per run |",
                  "|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else "") + "---|"]
        for r in guard_rows:
            ev = r["stats"].get("guard_events_per_run")
            lines.append(f"| {r['model']} | {r['variant']} | {fmt(r['added_ms'])} | {fmt(_pct(r['ratio']), 1)} | "
                         f"{fmt(_pct(r.get('paired_ratio_median')), 1)} | {fmt(r.get('best_repeat_added_ms'))} | "
                         f"{fmt(_pct(r.get('best_repeat_ratio')), 1)} | "
                         + (f"{fmt(r.get('cpu_added_ms'))} | {fmt(_pct(r.get('cpu_ratio')), 1)} | " if cpu else "")
                         + f"{ev if ev is not None else '–'} |")
    if comparisons:
        lines += ["", "## many_tensors (2,000 tensors) vs few_tensors (20 tensors), same parameter count", "",
                  "Target: GradGuard's added cost per step on many_tensors within 2x of its added cost on "
                  "few_tensors. When the few_tensors cost is below the noise floor (the spread of the baseline's "
                  "repeat medians), the ratio is taken against the floor.", "",
                  "| variant | metric | +ms many_tensors | +ms few_tensors | many / few | verdict |",
                  "|---|---|---:|---:|---:|---|"]
        for c in comparisons:
            lines.append(f"| {c['variant']} | {c['metric']} | {fmt(c['added_many_ms'])} | {fmt(c['added_few_ms'])} | "
                         f"{fmt(c['ratio'])} | {c['verdict']} |")
    problems: dict[str, list[str]] = {}
    for r in table:
        s = r["stats"]
        if "median_ms" not in s:
            why = s.get("skipped") or "; ".join(s.get("errors") or []) or "no data"
            problems.setdefault(why, []).append(f"{r['model']}/{r['variant']}")
    notes = list(meta.get("notes", [])) + [f"not measured: {', '.join(w)}: {why}" for why, w in problems.items()]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def compare_many_few_alternating(rows: list[dict]) -> list[dict]:
    """many_tensors vs few_tensors from the alternating runs (added ms per step)."""
    by = {(r["model"], r["variant"]): r for r in rows if "ratio" in r}
    out = []
    for v in ALTERNATING_VARIANTS:
        many, few = by.get(("many_tensors", v)), by.get(("few_tensors", v))
        if many and few:
            ratio = many["added_ms"] / max(few["added_ms"], 0.05)
            verdict = "reference" if v not in GUARD_VARIANTS else ("within 2x" if ratio <= 2 else "ABOVE 2x")
            out.append({"variant": v, "added_many_ms": many["added_ms"], "added_few_ms": few["added_ms"],
                        "ratio": ratio, "verdict": verdict})
    return out


def compare_many_few(table: list[dict], cpu: bool) -> list[dict]:
    """Added cost of each variant on many_tensors vs few_tensors (wall time, and CPU time on CPU)."""
    by = {(r["model"], r["variant"]): r for r in table}
    base = by.get(("few_tensors", "none"), {}).get("stats", {})
    metrics = [("wall", "added_ms", "repeat_medians_ms")] + ([("CPU", "cpu_added_ms", "cpu_repeat_medians_ms")] if cpu else [])
    out = []
    for v in ALL_VARIANTS[1:]:
        many, few = by.get(("many_tensors", v)), by.get(("few_tensors", v))
        for metric, key, spread_key in metrics:
            if not many or not few or many.get(key) is None or few.get(key) is None:
                continue
            reps = base.get(spread_key) or [0.0]
            noise = max(max(reps) - min(reps), 0.05)
            a_many, a_few = many[key], few[key]
            denom = max(a_few, noise)  # below the noise floor a ratio means nothing: use the floor
            ratio = a_many / denom
            if v in GUARD_VARIANTS:
                verdict = ("within 2x" if ratio <= 2 else "ABOVE 2x") + (
                    f" (few_tensors cost below the {noise:.2f} ms noise floor)" if a_few < noise else "")
            else:
                verdict = "reference"
            out.append({"variant": v, "metric": metric, "added_many_ms": a_many, "added_few_ms": a_few,
                        "noise_floor_ms": noise, "ratio": ratio, "verdict": verdict})
    return out


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma list from {','.join(MODELS)} (default: {','.join(CPU_MODELS)} on CPU, "
                                    f"{','.join(CUDA_MODELS)} on CUDA)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma list (default: all)")
    p.add_argument("--steps", type=int, help="measured steps per run (default 50; 5 with --quick)")
    p.add_argument("--warmup", type=int, help="discarded warm-up steps per run (default 5; 2 with --quick)")
    p.add_argument("--repeats", type=int, help="interleaved repeats per variant (default 3; 1 with --quick)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", help='Trainer precision (default "32-true" on CPU, "bf16-mixed" on CUDA)')
    p.add_argument("--logger", choices=("wandb", "csv"), default="wandb")
    p.add_argument("--log-every-n-steps", type=int, default=1, help="Trainer(log_every_n_steps=...) (default 1)")
    p.add_argument("--order", choices=("rotate", "shuffle"), default="rotate", help="variant order per round")
    p.add_argument("--run-budget", type=float, default=10.0,
                   help="stop a run after this many measured seconds (0: never; default 10)")
    p.add_argument("--min-steps", type=int, default=8, help="measured steps a run gets even past its budget")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads; default 1 on CPU (see module docstring), 0 = torch's own choice; "
                        "on CUDA the default is torch's own choice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alternate", type=int, default=5, metavar="N",
                   help="also measure the callback variants (gradguard, gradguard_layers, norm_pass) in one run each, "
                        "on in every other block of N steps (0: off; default 5)")
    p.add_argument("--alternate-steps", type=int, default=400, help="measured steps of each alternating run (default 400)")
    p.add_argument("--no-prewarm", action="store_true", help="skip the untimed warm-up run per model")
    p.add_argument("--no-separate", action="store_true",
                   help="only the alternating runs: no separate run per variant (grad_norm, wandb.watch and clip "
                        "then go unmeasured)")
    p.add_argument("--batch-size", action="append", default=[], metavar="MODEL=N",
                   help="a model's batch size instead of its default (models.py), e.g. gpt=16; repeatable")
    p.add_argument("--block-timing", action="store_true",
                   help="alternating runs on CUDA: synchronize the device at block boundaries only, each step "
                        "counted as its block's mean time (the GPU queue runs ahead as in real training)")
    p.add_argument("--fused", action="store_true",
                   help="every variant trains with AdamW(fused=True) (needed by the gradguard_deferred variant)")
    p.add_argument("--quick", action="store_true", help="smoke test: mlp+few_tensors, 2+5 steps, 1 repeat (<1 min)")
    p.add_argument("--out", help="output path without extension (default benchmarks/results/overhead-<machine-tag>)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch.cuda.is_available() is False")
    default_models = CUDA_MODELS if args.device == "cuda" else CPU_MODELS
    if args.quick:
        default_models = ("mlp", "few_tensors")
    args.models = [m for m in (args.models.split(",") if args.models else default_models) if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {','.join(MODELS)}")
        if m in CUDA_MODELS and args.device != "cuda":
            p.error(f"model {m!r} is CUDA-sized; use --device cuda")
    for v in args.variants:
        if v not in ALL_VARIANTS + EXTRA_VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {','.join(ALL_VARIANTS + EXTRA_VARIANTS)}")
    if "gradguard_deferred" in args.variants and not args.fused:
        p.error("the gradguard_deferred variant skips NaN/Inf steps through a fused optimizer: add --fused "
                "(every variant then trains with AdamW(fused=True), the baseline too)")
    if "none" not in args.variants:
        args.variants.insert(0, "none")  # ratios need the baseline
    args.steps = args.steps or (5 if args.quick else 50)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.model_kwargs = {}
    for item in args.batch_size:
        model, _, n = item.partition("=")
        if model not in args.models or not n.isdigit() or int(n) < 1:
            p.error(f"--batch-size {item!r}: expected MODEL=N with MODEL one of the models run "
                    f"({','.join(args.models)}) and N a positive integer, e.g. gpt=16")
        args.model_kwargs[model] = {"batch_size": int(n)}
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    command = "python benchmarks/overhead.py" + ("" if not (argv if argv is not None else sys.argv[1:])
                                                 else " " + shlex.join(argv if argv is not None else sys.argv[1:]))
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*anonymous setting has no effect.*")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)  # "GPU available", "seed set", ...
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.threads:
        torch.set_num_threads(args.threads)

    tag, machine = machine_tag(args.device)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"overhead-{tag}{'-quick' if args.quick else ''}"
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    _, gg_err = _import_gradguard()
    print(f"# {command}\n# machine: {machine}; device {args.device}; precision {args.precision}; "
          f"logger {args.logger}; GradGuard: {'ok' if not gg_err else gg_err}", flush=True)

    t_start = time.perf_counter()
    load_start = os.getloadavg()  # other work on the machine shows up here
    rng = random.Random(args.seed)
    table: list[dict] = []
    for model_name in [] if args.no_separate else args.models:
        spec = build_model(model_name, **args.model_kwargs.get(model_name, {}))
        n_params, n_tensors = count_params(spec.net)
        g = torch.Generator().manual_seed(args.seed)
        pool = [spec.make_batch(g) for _ in range(POOL_BATCHES)]
        if args.device == "cuda":
            pool = [tuple(t.pin_memory() for t in b) for b in pool]
        del spec
        print(f"\n## {model_name}: {n_params:,} params in {n_tensors:,} tensors", flush=True)
        if not args.no_prewarm:  # untimed: first-run costs (allocator, kernels, wandb service) hit no variant
            run_once(model_name, "none", pool, args, -1, warmup=0, steps=3 if args.quick else max(5, args.warmup), budget_s=None)
            gc.collect()
        runs: dict[str, list[RunResult]] = {v: [] for v in args.variants}
        for r in range(args.repeats):
            order = list(args.variants)
            if args.order == "shuffle":
                rng.shuffle(order)
            else:
                k = r % len(order)
                order = order[k:] + order[:k]
            for v in order:
                t0 = time.perf_counter()
                res = run_once(model_name, v, pool, args, r, warmup=args.warmup, steps=args.steps,
                               budget_s=args.run_budget or None)
                runs[v].append(res)
                if res.skipped:
                    msg = f"skipped: {res.skipped}"
                elif res.error:
                    msg = f"ERROR: {res.error}"
                else:
                    msg = (f"median {statistics.median(res.periods_ms):8.2f} ms/step (CPU "
                           f"{statistics.median(res.cpu_ms):8.2f}) over {len(res.periods_ms)} steps"
                           + (" (cut by budget)" if res.stopped_early else ""))
                print(f"  round {r} {v:<17} {msg}  [{time.perf_counter() - t0:.1f} s]", flush=True)
        base = summarize(runs["none"])
        for v in args.variants:
            s = summarize(runs[v]) if v != "none" else base
            row = {"model": model_name, "params": n_params, "tensors": n_tensors, "variant": v, "stats": s}
            if "median_ms" in s and "median_ms" in base:
                row["ratio"] = s["median_ms"] / base["median_ms"]
                row["added_ms"] = s["median_ms"] - base["median_ms"]
                # Ratio within each round (same moment of the machine's life), then the median over rounds.
                paired = [statistics.median(a.periods_ms) / statistics.median(b.periods_ms)
                          for a, b in zip(runs[v], runs["none"]) if a.periods_ms and b.periods_ms]
                row["paired_ratio_median"] = statistics.median(paired) if paired else None
                # Interference from other work only ever adds time: the best repeat is the least disturbed.
                row["best_repeat_ratio"] = min(s["repeat_medians_ms"]) / min(base["repeat_medians_ms"])
                row["best_repeat_added_ms"] = min(s["repeat_medians_ms"]) - min(base["repeat_medians_ms"])
                row["cpu_ratio"] = s["cpu_median_ms"] / base["cpu_median_ms"]
                row["cpu_added_ms"] = s["cpu_median_ms"] - base["cpu_median_ms"]
            table.append(row)

    alternating: list[dict] = []
    if args.alternate:
        print(f"\n## alternating blocks of {args.alternate} steps within one run", flush=True)
        for model_name in args.models:
            spec = build_model(model_name, **args.model_kwargs.get(model_name, {}))
            g = torch.Generator().manual_seed(args.seed)
            pool = [spec.make_batch(g) for _ in range(POOL_BATCHES)]
            if args.device == "cuda":
                pool = [tuple(t.pin_memory() for t in b) for b in pool]
            del spec
            for v in [v for v in ALTERNATING_VARIANTS if v in args.variants]:
                t0 = time.perf_counter()
                row = run_alternating(model_name, v, pool, args)
                row.setdefault("model", model_name)
                row.setdefault("variant", v)
                alternating.append(row)
                msg = row.get("error") or (f"ratio {row['ratio']:.3f} (+{row['added_ms']:.2f} ms, in hooks {row['hook_ms']:.3f} ms) "
                                           f"over {row['pairs']} block pairs")
                print(f"  {model_name:<13} {v:<17} {msg}  [{time.perf_counter() - t0:.1f} s]", flush=True)

    comparisons = compare_many_few(table, cpu=args.device == "cpu")
    alt_comparisons = compare_many_few_alternating(alternating)

    notes = [
        "Each run: fresh model (same seed), fresh logger, fresh Trainer, one process; wandb offline into a temp dir.",
        "wandb.watch runs call unwatch at fit end; parameter hooks left behind after all runs: "
        f"{sum(r['stats'].get('hooks_left', 0) for r in table)}.",
    ]
    if any(r["stats"].get("stopped_early") for r in table):
        notes.append(f"'cut' = runs stopped by the {args.run_budget} s run budget after >= {args.min_steps} measured steps.")
    meta = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine, "machine_tag": tag,
        "device": args.device, "precision": args.precision, "logger": args.logger, "fused": args.fused,
        "log_every_n_steps": args.log_every_n_steps, "warmup": args.warmup, "steps": args.steps,
        "repeats": args.repeats, "order": args.order, "run_budget": args.run_budget, "versions": versions(),
        "gradguard_import": "ok" if not gg_err else gg_err, "torch_threads": torch.get_num_threads(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "wall_s": round(time.perf_counter() - t_start, 1), "notes": notes,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "alternate": args.alternate, "alternate_steps": args.alternate_steps, "block_timing": args.block_timing,
        "batch_sizes": {m: kw["batch_size"] for m, kw in args.model_kwargs.items()},
    }
    md = render_markdown(meta, table, comparisons, alternating, alt_comparisons)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    result = {"meta": meta, "results": table, "many_vs_few": comparisons, "alternating": alternating,
              "alternating_many_vs_few": alt_comparisons}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print("\n" + md)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} in {meta['wall_s']} s", flush=True)
    return result


if __name__ == "__main__":
    main()
