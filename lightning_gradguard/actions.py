"""Responses that change training: clip, skip, scheduler-proof LR reduction, rollback.

Each is a small unit that knows nothing of detection or Lightning:

* :func:`clip_` multiplies the gradients by a device scalar (no host sync);
* :func:`skip_` drops a step by setting gradients to ``None`` (torch optimizers
  then leave the weights *and* their state alone; zeroing would not: momentum,
  Adam moments and weight decay would still move the weights);
* :class:`DeviceVerdict` skips or scales a step from the device, without the
  host knowing yet, through the ``found_inf`` and ``grad_scale`` tensors that
  torch's fused optimizers read inside their own kernel;
* :class:`LRScale` scales the learning rate inside ``optimizer.step`` through
  step pre/post hooks, so no scheduler ever sees (or overwrites) the factor;
* :class:`Snapshots` keeps recent known-good model and optimizer state in host
  memory and restores it.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections import deque
from collections.abc import Iterable

import torch
from torch import Tensor

from lightning_gradguard.stats import local_shards

__all__ = ["DeviceVerdict", "LRScale", "Snapshots", "clip_", "skip_"]


def _grads(params: Iterable[torch.nn.Parameter]) -> list[Tensor]:
    """The gradients held, a DTensor's (FSDP2, tensor parallelism) as its local shard: changed in place."""
    return local_shards([p.grad for p in params if p.grad is not None])


def clip_(params: Iterable[torch.nn.Parameter], coef: Tensor) -> None:
    """Multiply every gradient by ``coef`` (a device scalar, at most 1) in place, one foreach kernel per dtype."""
    groups: dict[tuple, list[Tensor]] = {}
    for g in _grads(params):
        groups.setdefault((g.device, g.dtype, g.is_sparse), []).append(g)
    for (device, dtype, sparse), grads in groups.items():
        c = coef.to(device=device, dtype=dtype)
        if sparse:
            for g in grads:
                g.mul_(c)
        else:
            torch._foreach_mul_(grads, c)


def skip_(optimizer: torch.optim.Optimizer) -> None:
    """Drop this step's update: every gradient of ``optimizer`` becomes ``None``."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


class DeviceVerdict:
    """Hands an optimizer's next step a verdict held on the device: skip it, or scale its gradients.

    torch's fused optimizers (``fused=True``: ``Adam``, ``AdamW``, ``SGD``,
    ``Adagrad``) read two optional device scalars inside their one kernel, the
    way a fp16 ``GradScaler`` hands them over: ``found_inf`` (non-zero: leave
    the weights *and* the optimizer state as they are, step count included) and
    ``grad_scale`` (the gradients are divided by it). Set here before the step,
    removed by a step post-hook after it: a skip or a clip decided by device
    tensors, with no host sync and no extra pass over the gradients.

    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.SGD([p], lr=1.0, fused=True)
    >>> verdict = DeviceVerdict(opt)
    >>> p.grad = torch.full((2,), float("nan"))
    >>> verdict.set(found_inf=torch.tensor(1.0))
    >>> opt.step()
    >>> p.tolist(), hasattr(opt, "found_inf")
    ([1.0, 1.0], False)
    >>> p.grad = torch.full((2,), 4.0)
    >>> verdict.set(found_inf=torch.tensor(0.0), grad_scale=torch.tensor(8.0))  # clip: scale by 1/8
    >>> opt.step()
    >>> p.tolist()
    [0.5, 0.5]
    """

    _NAMES = ("found_inf", "grad_scale")

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self._mine: set[str] = set()  # what this verdict handed to the coming step
        self._handle = optimizer.register_step_post_hook(self._clear)

    @staticmethod
    def supported(optimizer: torch.optim.Optimizer) -> bool:
        """Does ``optimizer``'s step read ``found_inf`` and ``grad_scale`` (torch's fused optimizers)?"""
        return bool(getattr(optimizer, "_step_supports_amp_scaling", False))

    def set(self, found_inf: Tensor | None = None, grad_scale: Tensor | None = None) -> None:
        """Hand the next step these (float32 device scalars); ``None``: that one is not handed over.

        Another verdict's for the same step (two guards on one optimizer) is combined, not replaced: the
        step is skipped if either says so, and the larger ``grad_scale`` (the tighter clip) applies
        (``torch.maximum``, on the device).
        """
        held = self.optimizer.__dict__
        for name, value in zip(self._NAMES, (found_inf, grad_scale)):
            if value is None:
                if name in self._mine:
                    held.pop(name, None)
                    self._mine.discard(name)
                continue
            other = held.get(name) if name not in self._mine else None  # another verdict's, this step
            held[name] = value if other is None else torch.maximum(other, value.to(other.device, other.dtype))
            self._mine.add(name)

    def _clear(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for name in self._NAMES:
            optimizer.__dict__.pop(name, None)
        self._mine.clear()

    def remove(self) -> None:
        """Leave the optimizer as it was (another verdict's hand-over aside)."""
        for name in self._mine:
            self.optimizer.__dict__.pop(name, None)
        self._mine.clear()
        self._handle.remove()


class LRScale:
    """A multiplier on an optimizer's learning rates that survives every scheduler.

    The factor is applied in a step pre-hook and undone in the post-hook, so
    ``param_group["lr"]`` holds the scheduler's value at all other times and
    ``LambdaLR``, ``OneCycleLR``, ``CyclicLR`` and restarts keep their shape,
    scaled.

    >>> p = torch.nn.Parameter(torch.ones(1))
    >>> opt = torch.optim.SGD([p], lr=1.0)
    >>> scale = LRScale(opt)
    >>> scale.value = 0.5
    >>> p.grad = torch.ones(1)
    >>> opt.step()
    >>> p.item(), opt.param_groups[0]["lr"]
    (0.5, 1.0)
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self._value = 1.0
        self._optimizer = optimizer
        self._saved: list | None = None  # the LRs this scale found inside step() (unscaled if first), else None
        _SCALES.setdefault(optimizer, []).append(self)
        self._handles = (
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        )

    @property
    def value(self) -> float:
        return self._value

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose learning rates this scales."""
        return self._optimizer

    @property
    def pending(self) -> float:
        """The factor still missing from a param group's ``lr`` read now: 1 inside ``step()`` (the groups
        hold the scaled LR then, Lightning's training closure and so the guard run there), the scale
        outside it."""
        return 1.0 if self._saved is not None else self._value

    @value.setter
    def value(self, value: float) -> None:
        self._value = float(value)
        if self._saved is not None:
            # changed from inside step(): Lightning runs the training closure (and so the guard)
            # within optimizer.step, after the pre-hook; apply the new factor to this step too
            self._apply(self._optimizer)

    # Several scales on one optimizer (two guards with "reduce_lr") multiply. Their pre-hooks run in order,
    # each on the LR the one before it left, and so do their post-hooks: each giving back what it found
    # would leave the first scale's factor in the group after every step (compounding). The first scale
    # inside step() gives back the unscaled LRs for all of them.
    def _inside(self) -> list[LRScale]:
        return [s for s in _SCALES.get(self._optimizer, ()) if s._saved is not None] or [self]

    def _apply(self, optimizer) -> None:
        inside = self._inside()
        factor = math.prod(s._value for s in inside)
        for group, lr in zip(optimizer.param_groups, inside[0]._saved):
            group["lr"] = lr * factor if factor != 1.0 else lr

    def _pre(self, optimizer, args, kwargs) -> None:
        self._saved = [group["lr"] for group in optimizer.param_groups]
        if self._value != 1.0:
            for group, lr in zip(optimizer.param_groups, self._saved):
                group["lr"] = lr * self._value

    def _post(self, optimizer, args, kwargs) -> None:
        if self._saved is None:  # given back already, by the first scale
            return
        for group, lr in zip(optimizer.param_groups, self._inside()[0]._saved):
            group["lr"] = lr
        for s in _SCALES.get(optimizer, ()):
            s._saved = None
        self._saved = None

    def unscaled(self) -> list[float] | None:
        """Inside ``step()``: each param group's LR without the scales (the schedule's); else ``None``
        (the groups hold it then)."""
        return None if self._saved is None else list(self._inside()[0]._saved)

    def remove(self) -> None:
        """Unhook, leaving the groups' ``lr`` unscaled: removed from inside ``step()`` (an exception raised
        in Lightning's training closure, the guard's ``"raise"``), the post-hook that gives the schedule's
        values back never runs, and a checkpoint saved then would hold the scaled LR as the schedule's."""
        if self._saved is not None:
            self._post(self._optimizer, (), {})
        scales = _SCALES.get(self._optimizer, [])
        if self in scales:
            scales.remove(self)
        for handle in self._handles:
            handle.remove()


# the scales hooked on each optimizer, in hook order
_SCALES: weakref.WeakKeyDictionary[torch.optim.Optimizer, list[LRScale]] = weakref.WeakKeyDictionary()


class Snapshots:
    """Recent known-good copies of a module's and an optimizer's state, in host memory.

    Holds at most ``keep`` snapshots; memory is ``keep`` x (weights + buffers +
    optimizer state), e.g. 2 x 3 x the weights for Adam. With ``own_only`` (a
    module trained by several optimizers, a GAN's generator and discriminator)
    a snapshot holds only the optimizer's own parameters and the buffers of the
    modules that own them: rolling one optimizer back leaves the others' weights
    alone (their optimizers' states would not match weights rolled back).
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._snaps: deque[tuple[int, dict, dict, bool]] = deque(maxlen=keep)  # (step, module, optimizer, whole)
        self.restored_lrs: list[float] = []  # each param group's lr in the snapshot last restored

    def __len__(self) -> int:
        return len(self._snaps)

    @property
    def steps(self) -> list[int]:
        return [s[0] for s in self._snaps]

    def take(self, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer, own_only: bool = False) -> None:
        state = module.state_dict()
        if own_only:
            keys = _own_keys(module, optimizer)
            state = {k: v for k, v in state.items() if k in keys}
        model_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        opt_state = _to_cpu(optimizer.state_dict())
        self._snaps.append((step, model_state, opt_state, not own_only))

    def restore(self, before_step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int | None:
        """Load the newest snapshot taken at or before ``before_step``; its step, or ``None`` if there is none.

        A snapshot of step 0 (the initial weights, before any update could
        damage them) is always eligible. The weights and the optimizer's state
        (momenta) are restored, not its param groups' hyperparameters (``lr``,
        momentum, ``initial_lr``): they belong to the schedule, and a recursive
        one (``StepLR``, ``CosineAnnealingLR``) would go on from the old values,
        shifted for the rest of the run. The snapshot's ``lr`` of each group is
        in :attr:`restored_lrs`.
        """
        for step, model_state, opt_state, whole in reversed(self._snaps):
            if step <= before_step or step == 0:
                module.load_state_dict(model_state, strict=whole)
                hyper = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
                optimizer.load_state_dict(copy.deepcopy(opt_state))
                self.restored_lrs = [float(group["lr"]) for group in optimizer.param_groups]
                for group, values in zip(optimizer.param_groups, hyper):
                    group.update(values)
                # drop the newer ones: they may hold the damage we are undoing
                while self._snaps and self._snaps[-1][0] > step:
                    self._snaps.pop()
                return step
        return None


def _own_keys(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    """``module.state_dict()`` keys of the parameters ``optimizer`` holds and of the buffers of the
    modules that own them (a tied parameter under each of its names)."""
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    keys: set[str] = set()
    for name, sub in module.named_modules():
        own = [(n, p) for n, p in sub.named_parameters(recurse=False) if id(p) in ids]
        if own:
            prefix = f"{name}." if name else ""
            keys |= {prefix + n for n, _ in own} | {prefix + n for n, _ in sub.named_buffers(recurse=False)}
    return keys


def _to_cpu(obj):
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)
