"""Gradient health as a test: a short fit under a strict guard, one line inside a pytest test.

::

    from lightning_gradguard.testing import check_gradients

    def test_gradients_are_healthy():
        check_gradients(MyModule(), train_loader)        # raises GradientHealthError with a report

:func:`check_gradients` trains a short run (``max_steps=50`` on
CPU, no logger, no checkpoints, no progress bar, no validation) with every
condition set to ``"raise"``, and either returns a :class:`GradReport` or
raises :class:`~lightning_gradguard.GradientHealthError` whose message says
what was found, where (layer), when (step), the numbers, the usual causes of
that kind of problem, and the per-layer gradient norms so far.
"""

from __future__ import annotations

import contextlib
import logging
import textwrap
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightning_gradguard.events import GradEvent, GradientHealthError
from lightning_gradguard.record import NormSummary
from lightning_gradguard.sinks import GuardSink

__all__ = ["HINTS", "STRICT", "GradReport", "LayerNorms", "check_gradients", "hint"]

#: What :func:`check_gradients` changes from ``GradGuard()``'s defaults. Every
#: condition raises; a layer must stay vanishing for 15 steps (not 50), so a
#: vanishing stack is caught well within a few dozen steps.
STRICT: dict[str, Any] = {
    "on_nonfinite": "raise",
    "on_exploding": "raise",
    "on_vanishing": "raise",
    "vanish_patience": 15,
}

# One table: the usual causes per detector (event ``reason``), then per kind as a fallback.
# The test report and the ``gradguard`` command both print from it.
HINTS: dict[str, str] = {
    "nan": (
        "NaN gradients usually come from log(0), sqrt(0) or x/0 in the loss (add an eps, clamp before log/sqrt, "
        "use cross_entropy/log_softmax on logits instead of log(softmax)), a NaN/Inf in the input batch (check the "
        "data), weights that already diverged (learning rate too high), or fp16 overflow (train in bf16, or use "
        "precision='16-mixed' with its GradScaler)."
    ),
    "inf": (
        "Inf gradients usually come from an Inf in the input batch (check the data), division by a value near 0 or "
        "exp() of a large number in the loss, or fp16 overflow (values above 65504: train in bf16, or use "
        "precision='16-mixed' with its GradScaler)."
    ),
    "weights": (
        "The weights themselves hold NaN/Inf: an earlier update broke them, and every gradient after it is NaN. "
        "Usual causes: an optimizer step that divides by ~0 (Adam/AdamW with eps=1e-8 on fp16 weights, where eps "
        "is 0: use precision='16-mixed' or 'bf16-mixed' rather than '16-true', or raise eps), a learning rate so high "
        "the update overflows, or code that writes into the weights. Skipping cannot repair them; roll back "
        "(on_nonfinite='rollback') or restart from a checkpoint."
    ),
    "amp_overflow": (
        "The fp16 GradScaler overflows step after step: its scale is collapsing. Look for activations that overflow "
        "fp16 (above 65504): exp(), softmax without subtracting the max, large logits or attention scores; or train "
        "in bf16 ('bf16-mixed')."
    ),
    "spike": (
        "A sudden spike usually comes from an outlier or corrupt batch, a learning rate too high for this phase of "
        "training (add a warm-up), or a loss with a sharp edge (division by a small number). Gradient clipping "
        "(Trainer(gradient_clip_val=1.0), or GradGuard's 'clip') contains it."
    ),
    "growth": (
        "Gradients growing step after step while the loss does not improve: the learning rate is too high (lower "
        "it, add a warm-up), the initialisation too large (use Kaiming/Xavier; recurrent weights with spectral "
        "radius > 1), or a deep stack lacks normalisation (BatchNorm/LayerNorm) or residual connections."
    ),
    "max_norm": (
        "The global norm is above `max_norm`: the usual causes are a learning rate too high, a too-large "
        "initialisation, missing normalisation or an outlier batch; raise `max_norm` if norms this size are normal "
        "for your model."
    ),
    "update_ratio": (
        "The update is a large fraction of the weights (lr * |g| / |w|; around 1e-3 is typical): the learning "
        "rate is too high for this layer, or its weights are tiny (check its initialisation)."
    ),
    "loss": (
        "The loss is NaN/Inf while its gradients are finite: a term of the loss is broken where its derivative "
        "is not (log or sqrt of a negative number: d log(b) = 1/b stays finite; 0/0 in a normalisation; a NaN "
        "target masked out of the gradient). Clamp or softplus the input of log/sqrt, check the targets; the "
        "run optimises something else than the loss it reports."
    ),
    "no_grad": (
        "A layer that requires grad and is in the optimizer but gets no gradient at all is cut off from the loss: "
        "it is unused in forward (a layer built but forgotten, a branch never taken, a mixture-of-experts expert "
        "the router has stopped sending tokens to: collapsed routing, which a load-balancing loss prevents), its "
        "output goes through "
        ".detach() or is computed under torch.no_grad(), or its parameters were replaced by copies after the "
        "optimizer was built. If it is meant to be frozen, set requires_grad=False (or leave it out of the "
        "optimizer)."
    ),
    "dead": (
        "A layer with exactly zero gradient is cut off: a parameter whose output is multiplied by 0 or masked "
        "out everywhere, dead ReLUs (every pre-activation negative: lower the learning rate, use LeakyReLU/GELU, "
        "check the bias initialisation), or an activation saturated at its limits."
    ),
    "relative": (
        "Layers whose gradients are orders of magnitude smaller than the rest, usually the first layers of a deep "
        "stack: saturating activations (sigmoid/tanh: use ReLU/GELU), no normalisation (add BatchNorm/LayerNorm) "
        "or residual connections, or an initialisation too small for the depth (use Kaiming/Xavier). In RNNs: "
        "long spans (use LSTM/GRU, truncate backpropagation through time)."
    ),
    "drop": (
        "A layer's gradients collapsed far below their own earlier level while the loss has not converged: "
        "activations saturating as training goes on (sigmoid/tanh with growing pre-activations), ReLUs dying "
        "(lower the learning rate), or a learning-rate schedule that decays too early."
    ),
    "nonfinite": "NaN/Inf gradients: check the data, the loss for log(0) or x/0, the learning rate, and fp16 overflow.",
    "exploding": (
        "Exploding gradients: usually a learning rate too high, a too-large initialisation, missing normalisation "
        "or an outlier batch; clipping contains it."
    ),
    "vanishing": (
        "Vanishing gradients: usually saturating activations (sigmoid/tanh), missing normalisation or residual "
        "connections, or an initialisation too small for the depth."
    ),
}


def hint(event: GradEvent) -> str:
    """The usual causes of ``event``'s kind of problem (from :data:`HINTS`).

    >>> hint(GradEvent(3, "vanishing", "net.0", 1e-9, 1e-5, (), "", reason="dead")).split(":")[0]
    'A layer with exactly zero gradient is cut off'
    """
    return HINTS.get(event.reason) or HINTS.get(event.kind, "")


@dataclass(frozen=True)
class LayerNorms:
    """Gradient L2 norm of one layer (or ``"global"``) over the steps run; min/max over finite values."""

    first: float
    last: float
    min: float
    max: float
    nonfinite_steps: int = 0


@dataclass
class GradReport:
    """What :func:`check_gradients` saw.

    Attributes:
        steps: optimizer steps measured.
        max_steps: the step budget asked for.
        events: every event, oldest first (empty when healthy).
        layers: ``"global"`` then every layer, in model order, with its
            :class:`LayerNorms` (names get ``opt<i>/`` in front with several optimizers).
        summary: :meth:`GradGuard.summary` at the end.
        model: the module's class name.
    """

    steps: int
    max_steps: int
    events: tuple[GradEvent, ...]
    layers: dict[str, LayerNorms]
    summary: dict[str, Any] = field(default_factory=dict)
    model: str = ""
    overrides: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def healthy(self) -> bool:
        return not self.events

    def format(self, max_rows: int = 24) -> str:
        """A multi-line, readable report: the findings with their usual causes, then the per-layer norms."""
        if self.events:
            first = self.events[0]
            head = (
                f"GradGuard: unhealthy gradients in {self.model or 'the model'}: {first.kind} at step {first.step} "
                f"of a {self.max_steps}-step check"
            )
        else:
            head = f"GradGuard: healthy gradients in {self.model or 'the model'} over {self.steps} steps"
        lines = [head, ""]
        for event in self.events[:10]:
            where = f"layer `{event.layer}`" if event.layer is not None else "the global norm"
            lines.append(
                f"{event.kind} ({event.reason}) at step {event.step}, {where}: "
                f"value {_g(event.value)}, threshold {_g(event.threshold)}"
            )
            lines += textwrap.wrap(event.message, 110, initial_indent="  ", subsequent_indent="    ")
            lines += textwrap.wrap("usual causes: " + hint(event), 110, initial_indent="  ", subsequent_indent="    ")
            lines.append("")
        if len(self.events) > 10:
            lines += [f"... and {len(self.events) - 10} more events", ""]
        # with several optimizers the table's keys are ``opt<i>/<layer>``: name the flagged rows the same way
        several = bool(self.layers) and "global" not in self.layers
        flagged = {
            f"opt{e.optimizer}/{name}" if several else name
            for e in self.events
            for name in (e.layers or ((e.layer,) if e.layer else ()))
        }
        lines.append(f"gradient L2 norm per layer over {self.steps} steps (< : named by an event):")
        lines += _table(self.layers, flagged, max_rows)
        settings = ", ".join(f"{k}={v!r}" for k, v in self.overrides.items())
        lines += ["", f"(check_gradients: max_steps={self.max_steps}{', ' + settings if settings else ''})"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def check_gradients(
    model: Any,
    train_dataloaders: Any = None,
    datamodule: Any = None,
    *,
    max_steps: int = 50,
    accelerator: str = "cpu",
    devices: int | str = 1,
    seed: int | None = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    **guard_overrides: Any,
) -> GradReport:
    """Train ``model`` for ``max_steps`` optimizer steps under a strict :class:`GradGuard`; raise if unhealthy.

    The guard is ``GradGuard(**STRICT, **guard_overrides)``: every condition
    (``nonfinite``, ``exploding``, ``vanishing``) raises, and
    ``vanish_patience=15`` instead of 50, so that a layer vanishing from the
    start is caught in a few dozen steps (at step 14). ``max_steps`` below
    ``vanish_patience`` is refused (vanishing could not be caught at all); keep it above
    ``vanish_patience + warmup_steps`` (25) to also catch a layer whose
    gradients collapse after the warm-up. Pass any other :class:`GradGuard`
    argument to change it, e.g. ``on_vanishing="log"`` to report vanishing
    without failing, or ``vanish_factor=1e3`` to be stricter.

    The run uses a fresh Trainer on ``accelerator`` (CPU by default) with no
    logger, checkpointing, progress bar, model summary or validation;
    ``trainer_kwargs`` adds or overrides Trainer arguments (``precision``,
    ``accumulate_grad_batches``, ``gradient_clip_val``, extra ``callbacks``...).
    The strict guard comes first among the callbacks, so it sees every step's
    gradients before any of yours; a ``GradGuard`` of your own among
    ``trainer_kwargs["callbacks"]`` is refused (``ValueError``): it would skip,
    clip or roll back the very steps under check. Pass its settings as
    keyword arguments instead.
    ``seed`` seeds Python, NumPy and torch first (``None``: leave them alone).
    It trains ``model`` in place. A ``pytorch_lightning.LightningModule``
    runs on ``pytorch_lightning``'s Trainer.

    Returns:
        a :class:`GradReport`; its ``events`` are empty (``report.healthy``)
        unless a condition was set to something other than ``"raise"``.

    Raises:
        GradientHealthError: a condition set to ``"raise"`` fired; the message
            is ``GradReport.format()``: what, where, when, the numbers, the
            usual causes, the per-layer norms. ``err.events`` holds the events,
            ``err.report`` the :class:`GradReport`.
        ValueError: ``max_steps`` below 1 or (vanishing raising) below ``vanish_patience``, an invalid
            :class:`GradGuard` argument, ``seed`` or ``trainer_kwargs``,
            ``max_steps`` in ``trainer_kwargs``, or a ``GradGuard`` in
            ``trainer_kwargs["callbacks"]`` (before training).
        RuntimeError: the run could not be checked: no optimizer step, steps the
            guard itself failed on (internal errors), a ``GradGuard`` from the
            module's ``configure_callbacks()`` that Lightning put in place of the
            strict one, or (vanishing raising) an optimizer that took fewer than
            ``vanish_patience`` steps (a fit ended early; several optimizers
            sharing ``max_steps``; one that never stepped). A fit that ends before ``max_steps`` but after
            ``vanish_patience`` steps warns.
    """
    __tracebackhide__ = True  # pytest: show the report, not this frame
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an integer >= 1, got {max_steps!r}.")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"`seed` must be an integer, or None to leave the seeds alone, got {seed!r}.")
    if trainer_kwargs is not None and not isinstance(trainer_kwargs, Mapping):
        raise ValueError(f"`trainer_kwargs` must be a dict of Trainer arguments, got {trainer_kwargs!r}, e.g. "
                         "trainer_kwargs={'precision': 'bf16-mixed'}.")
    if trainer_kwargs and "max_steps" in trainer_kwargs:
        raise ValueError(f"`trainer_kwargs` got max_steps={trainer_kwargs['max_steps']!r}: pass it as "
                         "check_gradients(..., max_steps=N), which the checks and the report use.")
    settings = {**STRICT, **guard_overrides}
    collector = _Collector()
    sinks = settings.get("sinks")
    # anything but a list is left to GradGuard, whose message names it
    settings["sinks"] = [*sinks, collector] if isinstance(sinks, (list, tuple)) else sinks or [collector]
    pl, guard_cls = _namespace(model)
    guard = guard_cls(**settings)
    patience = guard.config.vanish_patience
    checks_vanishing = "raise" in guard.on_vanishing
    if checks_vanishing and max_steps < patience:
        raise ValueError(
            f"`max_steps`={max_steps} is below `vanish_patience`={patience}: no layer could be found vanishing in "
            f"this run, and it would pass unchecked. Raise max_steps to at least {patience} ("
            f"{patience + guard.config.warmup_steps} also catches a collapse after the warm-up), or pass "
            f"vanish_patience={max_steps}."
        )

    kwargs: dict[str, Any] = dict(
        accelerator=accelerator, devices=devices, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs or {})
    extra = kwargs.pop("callbacks", None) or []
    extra = list(extra) if isinstance(extra, (list, tuple)) else [extra]
    _refuse_other_guards(extra, guard_cls)
    # a model that never steps (manual optimization without `opt.step()`) would never reach max_steps
    budget = _batch_budget(pl, 10 * max_steps * int(kwargs.get("accumulate_grad_batches", 1)))
    # the strict guard first: it sees the gradients before any other callback can change them
    kwargs["callbacks"] = [guard, *extra, budget]

    error: GradientHealthError | None = None
    with _quiet():
        if seed is not None:
            pl.seed_everything(seed, verbose=False)
        trainer = pl.Trainer(**kwargs)
        try:
            trainer.fit(model, train_dataloaders=train_dataloaders, datamodule=datamodule)
        except GradientHealthError as err:
            error = err

    overrides = {k: v for k, v in guard_overrides.items() if k != "sinks"}
    report = GradReport(
        steps=int(guard.summary()["steps"]), max_steps=max_steps, events=tuple(guard.events),
        layers=collector.layer_norms(), summary=guard.summary(), model=type(model).__name__, overrides=overrides,
    )
    if error is not None:
        failure = GradientHealthError(report.format(), tuple(error.events) or report.events)
        failure.report = report
        raise failure from None  # the report says it all; Lightning's internals add nothing
    if guard not in trainer.callbacks:
        other = next((c for c in trainer.callbacks if isinstance(c, guard_cls)), None)
        raise RuntimeError(
            f"check_gradients: {type(model).__name__}.configure_callbacks() returns "
            f"{'a ' + type(other).__name__ if other is not None else 'a callback'}, and Lightning replaced the "
            "strict guard with it: nothing was checked strictly. Leave it out of configure_callbacks for this "
            "check (its settings can be passed to check_gradients as keyword arguments)."
        )
    if guard.internal_errors:
        raise RuntimeError(
            f"check_gradients: the guard failed on {guard.internal_errors} step(s) of {type(model).__name__} "
            f"(reported above as warnings: {', '.join(f'{t}: {m}' for t, m in sorted(guard._reported_errors))}); "
            "those steps were not checked, so this run cannot pass. Please report it as a bug of "
            "lightning_gradguard."
        )
    if report.steps == 0:
        raise RuntimeError(
            f"check_gradients: {type(model).__name__} took no optimizer step (max_steps={max_steps}), so no "
            "gradient was checked. Is the dataloader empty, or does manual optimization never call `opt.step()`?"
        )
    # every optimizer of the Trainer: one that never stepped has no watch (nothing of it was checked)
    taken = {i: guard._watches[i].counts["steps"] if i in guard._watches else 0 for i in range(len(trainer.optimizers))}
    short = {i: n for i, n in taken.items() if n < patience}
    if checks_vanishing and short:
        several = len(taken) > 1
        took = ", ".join(f"optimizer {i}: {n}" for i, n in short.items()) if several else str(report.steps)
        if report.steps < max_steps:
            fix = ("The fit ended early (trainer_kwargs' max_epochs or limit_train_batches, or the dataloader): let "
                   "it run longer")
        elif 0 in short.values():
            fix = (f"Optimizer {min(i for i, n in short.items() if not n)} never stepped: does training_step call "
                   "its `opt.step()`? Leave it out of configure_optimizers if it is not trained")
        else:  # max_steps counts the steps of every optimizer; each took its share
            needed = -(-max_steps * patience // min(short.values()))  # ceil: the slowest one reaches patience
            fix = (f"max_steps={max_steps} counts the steps of all {len(taken)} optimizers: raise it to {needed} "
                   f"or more")
        raise RuntimeError(
            f"check_gradients: {type(model).__name__} took {took} optimizer steps, fewer than "
            f"vanish_patience={patience}: no layer could be found vanishing, so this run cannot pass. {fix}, or "
            "pass vanish_patience (or on_vanishing='log' to leave vanishing unchecked)."
        )
    if report.steps < max_steps:
        warnings.warn(
            f"check_gradients: {type(model).__name__} took {report.steps} optimizer steps of max_steps={max_steps} "
            "(the fit ended early: trainer_kwargs' max_epochs or limit_train_batches, or the dataloader).",
            stacklevel=2,
        )
    return report


# ---------------------------------------------------------------------- helpers
class _Collector(GuardSink):
    """Per-layer first/last/min/max from every step's norms (already on the host: no extra sync)."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[str, ...]] = {}
        self.norms = NormSummary()

    def on_step(self, guard, trainer, *, optimizer, step, log_step, layers, norms, metrics) -> None:
        self.layers[optimizer] = tuple(layers)
        self.norms.update(optimizer, norms)

    def layer_norms(self) -> dict[str, LayerNorms]:
        out: dict[str, LayerNorms] = {}
        stats = self.norms.as_dict()
        several = len(stats) > 1
        for opt in sorted(stats):
            s = stats[opt]
            for i, name in enumerate(["global", *self.layers[opt]]):
                key = f"opt{opt}/{name}" if several else name
                out[key] = LayerNorms(s["first"][i], s["last"][i], s["min"][i], s["max"][i], int(s["nonfinite"][i]))
        return out


def _refuse_other_guards(callbacks: list, guard_cls: type) -> None:
    """A ``GradGuard`` among ``trainer_kwargs``' callbacks would act on the gradients the strict one checks."""
    from lightning_gradguard.callback import GradGuard  # the pytorch_lightning one subclasses it

    others = [c for c in callbacks if isinstance(c, GradGuard)]
    if others:
        raise ValueError(
            f"check_gradients: trainer_kwargs['callbacks'] holds {len(others)} {type(others[0]).__name__}"
            f"{'s' if len(others) > 1 else ''}, but check_gradients runs its own strict {guard_cls.__name__} "
            "(every condition raises). A second guard would skip, clip or roll back the steps it is meant to "
            "check, or clash with it in the Trainer. Leave it out of the callbacks (e.g. "
            "`[c for c in callbacks if not isinstance(c, GradGuard)]`) and pass the settings you want checked "
            "as keyword arguments: check_gradients(model, loader, max_norm=10.0)."
        )


def _namespace(model: Any) -> tuple[Any, type]:
    """``(lightning.pytorch, GradGuard)``, or the ``pytorch_lightning`` pair for a module of that package."""
    import lightning.pytorch as lp

    if isinstance(model, lp.LightningModule):
        from lightning_gradguard.callback import GradGuard

        return lp, GradGuard
    try:
        import pytorch_lightning as ptl
    except ImportError:
        ptl = None
    if ptl is not None and isinstance(model, ptl.LightningModule):
        from lightning_gradguard.pl import GradGuard as PLGradGuard

        return ptl, PLGradGuard
    raise TypeError(
        f"`model` must be a LightningModule (lightning.pytorch or pytorch_lightning), got {type(model).__name__}."
    )


def _batch_budget(pl: Any, batches: int) -> Any:
    """A callback (of ``pl``'s namespace) that stops the fit after ``batches`` training batches."""

    class _BatchBudget(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.seen = getattr(self, "seen", 0) + 1
            if self.seen >= batches:
                trainer.should_stop = True

    return _BatchBudget()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute Lightning's start-up chatter (tips, device info, 'max_steps reached') and the num_workers advice."""
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # lightning vs newer torch
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _g(x: float) -> str:
    x = float(x)
    return f"{x:.3g}" if np.isfinite(x) else str(x)


def _table(layers: Mapping[str, LayerNorms], flagged: set[str], max_rows: int) -> list[str]:
    names = list(layers)
    if len(names) > max_rows:
        keep = set(names[: max_rows // 2]) | set(names[-(max_rows // 4):]) | {n for n in names if n in flagged}
        keep |= {n for n in names if n.rpartition("/")[2] == "global"}  # each optimizer's global norm
    else:
        keep = set(names)
    width = max([len(n) for n in names if n in keep] + [5])
    out = [f"  {'layer':<{width}}    {'first':>9} {'last':>9} {'min':>9} {'max':>9}"]
    skipped = 0
    for name in names:
        if name not in keep:
            skipped += 1
            continue
        if skipped:
            out.append(f"  ... {skipped} more")
            skipped = 0
        n = layers[name]
        mark = "<" if name in flagged else " "
        bad = n.nonfinite_steps
        nonfinite = f"  ({bad} non-finite step{'s' if bad > 1 else ''})" if bad else ""
        out.append(
            f"  {name:<{width}} {mark}  {_g(n.first):>9} {_g(n.last):>9} {_g(n.min):>9} {_g(n.max):>9}{nonfinite}"
        )
    if skipped:
        out.append(f"  ... {skipped} more")
    return out
