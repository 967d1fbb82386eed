"""Argument validation for ``GradGuard``: every bad value is refused at construction
with a message that names the argument, shows the value and says what to do."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from lightning_gradguard.events import CONFLICTS, RESPONSES

__all__ = ["check_number", "check_responses", "check_choice", "check_stop", "unused_settings"]


def _names(values) -> str:
    return ", ".join(repr(v) for v in values)


def check_responses(arg: str, kind: str, value: Any) -> tuple[str, ...]:
    """Normalise ``on_<kind>`` to a tuple of response names, refusing what makes no sense for ``kind``."""
    allowed = [name for name, spec in RESPONSES.items() if kind in spec["kinds"]]
    names = (value,) if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"`{arg}` must be a response name or a non-empty sequence of names, got {value!r}."
            f" Choose from {_names(allowed)}."
        )
    out: list[str] = []
    for name in names:
        if name not in RESPONSES:
            raise ValueError(f"`{arg}` got {name!r}, which is not a response. Choose from {_names(allowed)}.")
        if kind not in RESPONSES[name]["kinds"]:
            why = RESPONSES[name].get("why_not", {}).get(kind, f"it does not apply to {kind} gradients")
            raise ValueError(f"`{arg}` got {name!r}: {why}. Choose from {_names(allowed)}.")
        if name not in out:
            out.append(name)
    for pair, why in CONFLICTS.items():
        if pair <= set(out):
            a, b = sorted(pair)
            raise ValueError(f"`{arg}` got both {a!r} and {b!r}: {why}.")
    return tuple(out)


def check_stop(arg: str, value: Any, responses: tuple[str, ...]) -> None:
    """``"stop"`` for NaN/Inf without ``"skip"`` or ``"rollback"``: the stop takes effect after the step, whose
    NaN/Inf update is applied first (under ``sync="step"``; ``sync="deferred"`` stops a step late anyway, and
    its on-device skip needs a fused optimizer, which not every optimizer has)."""
    if "stop" in responses and not {"skip", "rollback"} & set(responses):
        fixed = ("skip", *responses)
        raise ValueError(
            f"`{arg}` got {value!r}: 'stop' ends the run after the step, so that step's NaN/Inf gradients still "
            f"reach the weights (and the last checkpoint). Add 'skip' to drop the step first: {arg}={fixed!r}."
        )


def check_number(
    arg: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
    optional: bool = False,
    hint: str = "",
) -> Any:
    """Refuse a value that is not a (finite) number in range; ``optional`` lets ``None`` through.
    Numpy scalars are numbers too: returned as the Python ``int`` / ``float`` they stand for."""
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ValueError(f"`{arg}` must be {kind}{' or None' if optional else ''}, got {value!r}.{_hint(hint)}")
    value = int(value) if integer else (value if isinstance(value, (int, float)) else float(value))
    if low is not None and (value <= low if low_open else value < low):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise ValueError(f"`{arg}` must be {bound}, got {value!r}.{_hint(hint)}")
    if high is not None and value > high:
        raise ValueError(f"`{arg}` must be at most {high}, got {value!r}.{_hint(hint)}")
    return value


def check_choice(arg: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"`{arg}` must be one of {_names(choices)}, got {value!r}.")
    return value


# settings only a response, or an option, reads: (what they need, how the message says it)
_READ_BY = {
    "lr_factor": ({"reduce_lr"}, "'reduce_lr'"),
    "lr_cooldown": ({"reduce_lr"}, "'reduce_lr'"),
    "lr_min_scale": ({"reduce_lr"}, "'reduce_lr'"),
    "lr_recover_after": ({"reduce_lr"}, "'reduce_lr'"),
    "rollback_every": ({"rollback"}, "'rollback'"),
    "rollback_keep": ({"rollback"}, "'rollback'"),
    "rollback_margin": ({"rollback"}, "'rollback'"),
    "max_rollbacks": ({"rollback"}, "'rollback'"),
    "max_consecutive_skips": ({"skip", "rollback"}, "'skip' or 'rollback'"),
}


def unused_settings(values: dict[str, Any], defaults: dict[str, Any], responses: dict[str, Sequence[str]],
                    log_layers: str) -> list[str]:
    """One message per setting given a value other than its default that nothing configured reads
    (``lr_factor`` without a ``'reduce_lr'`` response, ``top_k`` without ``log_layers='topk'``):
    the user meant something the guard will not do. ``responses``: ``{"on_nonfinite": (...), ...}``."""
    configured = {name for names in responses.values() for name in names}
    out = []
    for arg, (needs, which) in _READ_BY.items():
        # (None turns an option off: harmless where nothing reads it)
        if arg in values and values[arg] is not None and values[arg] != defaults[arg] and not needs & configured:
            # the lists that may hold it ("on_exploding" for kind "exploding"), as they are now
            lists = {on: names for on, names in responses.items()
                     if any(on[3:] in RESPONSES[n]["kinds"] for n in needs)}
            now = ", ".join(f"{on}={tuple(names)!r}" for on, names in lists.items())
            out.append(f"`{arg}={values[arg]!r}` has no effect: no response list holds {which} ({now}). "
                       f"Add {which} to {' or '.join(lists)}, or drop `{arg}`.")
    if "top_k" in values and values["top_k"] != defaults["top_k"] and log_layers != "topk":
        out.append(f"`top_k={values['top_k']!r}` has no effect with `log_layers={log_layers!r}`. "
                   f"Set log_layers='topk', or drop `top_k`.")
    return out


def _hint(hint: str) -> str:
    return f" {hint}" if hint else ""
