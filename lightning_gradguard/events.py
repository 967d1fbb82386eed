"""What the guard found: event records, the exception CI pipelines catch, the response table."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["KINDS", "RESPONSES", "GradEvent", "GradientHealthError", "Kind", "Response"]

Kind = Literal["nonfinite", "exploding", "vanishing"]
Response = Literal["log", "alert", "clip", "skip", "reduce_lr", "rollback", "stop", "raise"]

KINDS: tuple[str, ...] = ("nonfinite", "exploding", "vanishing")

# One table says what each response does and where it makes sense; validation
# and its error messages are built from it, so they cannot drift apart.
RESPONSES: dict[str, dict] = {
    "log": dict(does="record the event and log it", kinds=KINDS),
    "alert": dict(does="warn through Python logging (and W&B, when attached)", kinds=KINDS),
    "clip": dict(
        does="clip the gradients down to the adaptive threshold",
        kinds=("exploding",),
        why_not={
            "nonfinite": "clipping cannot repair NaN/Inf gradients (the coefficient is NaN too); use 'skip'",
            "vanishing": "clipping only ever shrinks gradients; it cannot revive vanishing ones",
        },
    ),
    "skip": dict(
        does="drop this step's update, leaving weights and optimizer state untouched",
        kinds=("nonfinite", "exploding"),
        why_not={"vanishing": "vanishing is a trend, not a bad step; skipping steps only slows training further"},
    ),
    "reduce_lr": dict(
        does="multiply the learning rate by `lr_factor` (scheduler-proof, with cooldown and floor)",
        kinds=("nonfinite", "exploding"),
        why_not={"vanishing": "a smaller learning rate makes vanishing gradients worse"},
    ),
    "rollback": dict(
        does="restore the last known-good model and optimizer state",
        kinds=("nonfinite", "exploding"),
        why_not={"vanishing": "vanishing develops slowly; restoring a recent snapshot does not change its cause"},
    ),
    "stop": dict(does="stop the Trainer gracefully after this step", kinds=KINDS),
    "raise": dict(does="raise GradientHealthError (for CI smoke tests)", kinds=KINDS),
}

# pairs that contradict each other within one condition
CONFLICTS: dict[frozenset, str] = {
    frozenset({"clip", "skip"}): "a skipped step has no gradients left to clip; choose one",
    frozenset({"stop", "raise"}): "'raise' already ends the run; choose one",
}


@dataclass(frozen=True)
class GradEvent:
    """One finding of the guard.

    Attributes:
        step: ``trainer.global_step`` whose gradients triggered it.
        kind: ``"nonfinite"``, ``"exploding"`` or ``"vanishing"``.
        layer: the layer concerned (the worst one when several are), ``None`` when global.
        value: the measured number (a norm, a growth factor, ...), as the message says.
        threshold: the number it was compared with.
        actions: the responses taken, in order.
        message: one line with all of the above, as logged, alerted and raised.
        reason: the detector that fired (``"nan"``, ``"inf"``, ``"weights"``, ``"amp_overflow"``, ``"spike"``,
            ``"growth"``, ``"max_norm"``, ``"update_ratio"``, ``"dead"``, ``"relative"``, ``"drop"``, ``"no_grad"``,
            ``"loss"``).
        optimizer: index of the optimizer in ``trainer.optimizers``.
        layers: every layer concerned, worst first.
    """

    step: int
    kind: str
    layer: str | None
    value: float
    threshold: float
    actions: tuple[str, ...]
    message: str
    reason: str = ""
    optimizer: int = 0
    layers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """Plain dict (numbers, strings, tuples): checkpoint- and JSON-friendly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GradEvent:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["actions"] = tuple(known.get("actions", ()))
        known["layers"] = tuple(known.get("layers", ()))
        return cls(**known)


class GradientHealthError(RuntimeError):
    """Raised by the ``"raise"`` response; the message names kind, step, layer and numbers.

    ``events`` holds the :class:`GradEvent` records that caused it.
    """

    def __init__(self, message: str, events: tuple[GradEvent, ...] = ()) -> None:
        super().__init__(message)
        self.events = tuple(events)
