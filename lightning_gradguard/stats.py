"""Gradient statistics computed on the device: plain PyTorch, no Lightning.

A :class:`LayerPlan` maps an optimizer's parameters to *layers* (the module that
owns them, ``encoder.layers.0.linear1``, optionally grouped coarser), once.
:func:`grad_stats` then measures the gradients the optimizer is about to apply:

* one ``torch._foreach_norm`` pass per (device, dtype) group gives every
  tensor's L2 norm in float32;
* an ``index_add_`` folds squared tensor norms into per-layer norms and the
  global norm, and flags the layers that hold NaN/Inf;
* optionally (at a cadence chosen by the caller, since each costs one more
  pass) per-layer max ``|g|``, parameter norms and the update-to-weight ratio.

Nothing here synchronises with the host: every result is a device tensor.
Nothing allocates in proportion to the model: ``_foreach_norm`` reads the
gradients in place and only the per-tensor scalars are materialised.

The same code runs in a bare training loop::

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> plan = LayerPlan.from_named_parameters(net.named_parameters())
    >>> plan.layers
    ('0', '1')
    >>> for p in net.parameters():
    ...     p.grad = torch.zeros_like(p)
    >>> net[0].weight.grad[0] = torch.tensor([3.0, 4.0])
    >>> stats = grad_stats(plan)
    >>> stats.total.item(), stats.norm.tolist()
    (5.0, [5.0, 0.0])
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GradStats", "LayerPlan", "LayerSums", "PackedRead", "grad_stats", "layer_name", "layer_series", "layer_sums",
    "local_shards", "read_tensors", "shard_share",
]

_ROOT = "(root)"
# name components added by wrappers (torch.compile, DDP, FSDP, activation checkpointing), not layers
_WRAPPERS = frozenset({"_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def layer_name(param_name: str, depth: int | None = None) -> str:
    """The layer a parameter belongs to: its owning module's qualified name.

    ``depth`` keeps only the first ``depth`` components, to group coarser.

    >>> layer_name("encoder.layers.0.linear1.weight")
    'encoder.layers.0.linear1'
    >>> layer_name("encoder.layers.0.linear1.weight", depth=3)
    'encoder.layers.0'
    >>> layer_name("scale")
    '(root)'
    >>> layer_name("net._orig_mod.0.weight")  # torch.compile's wrapper is not a layer
    'net.0'
    """
    parts = [p for p in param_name.split(".")[:-1] if p not in _WRAPPERS]
    if depth is not None:
        parts = parts[:depth]
    return ".".join(parts) or _ROOT


@dataclass
class LayerPlan:
    """Which layer each parameter belongs to, in model order. Built once per optimizer."""

    params: tuple[torch.nn.Parameter, ...]
    param_names: tuple[str, ...]
    layers: tuple[str, ...]
    layer_of_param: tuple[int, ...]
    # index tensors for the subsets of parameters that have gradients, keyed by
    # the tuple of their positions (``None`` for "all of them", the usual case)
    _index_cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_named_parameters(
        cls,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        depth: int | None = None,
        only: Iterable[torch.nn.Parameter] | None = None,
    ) -> LayerPlan:
        """Plan for ``named_params`` (model order), restricted to ``only`` if given.

        Parameters in ``only`` that have no name in ``named_params`` (not part of
        the module) are kept, named ``param_<i>``.
        """
        named = [(n, p) for n, p in named_params]
        if only is not None:
            wanted = {id(p): p for p in only}
            named = [(n, p) for n, p in named if id(p) in wanted]
            known = {id(p) for _, p in named}
            named += [(f"param_{i}", p) for i, p in enumerate(wanted.values()) if id(p) not in known]
        seen: set[int] = set()
        params, names, layer_ids, layers = [], [], [], {}
        for name, p in named:
            if id(p) in seen:  # shared (tied) parameters count once
                continue
            seen.add(id(p))
            layer = layer_name(name, depth)
            params.append(p)
            names.append(name)
            layer_ids.append(layers.setdefault(layer, len(layers)))
        return cls(tuple(params), tuple(names), tuple(layers), tuple(layer_ids))

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """Per-plan cache of index vectors and masks, keyed by which parameters have gradients
        (usually all of them: the key is then just their count). Bounded: which parameters have
        gradients rarely varies, but nothing here may grow without limit."""
        try:
            return self._index_cache[key]
        except KeyError:
            pass
        if len(self._index_cache) > 256:
            self._index_cache.clear()
        value = self._index_cache[key] = make()
        if isinstance(value, np.ndarray):
            value.flags.writeable = False  # shared between steps
        return value

    def _key(self, positions: Sequence[int]) -> int | tuple[int, ...]:
        return len(positions) if len(positions) == len(self.params) else tuple(positions)

    @property
    def all_positions(self) -> list[int]:
        return self._memo(("all_positions",), lambda: list(range(len(self.params))))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def uniform(self) -> bool:
        """All parameters on one device with one dtype (so are their gradients)."""
        return self._memo(("uniform",), lambda: len({(p.device, p.dtype) for p in self.params}) <= 1)

    @property
    def dtensor(self) -> bool:
        """Some parameters are DTensors (FSDP2's ``fully_shard``, tensor parallelism): their gradients
        are read through their local shards (see :func:`local_shards`)."""
        return self._memo(("dtensor",), lambda: _dtensor_class() is not None and any(
            isinstance(p, _dtensor_class()) for p in self.params))

    def shares(self, positions: Sequence[int], device: torch.device) -> Tensor:
        """Float32 per parameter at ``positions``, on ``device``: the share of its local sum of squares
        this rank adds to an all-reduce sum over every rank, so that each element counts once
        (see :func:`shard_share`). Cached."""
        return self._memo(("shares", self._key(positions), device), lambda: _to_device(torch.tensor(
            [shard_share(self.params[i]) for i in positions], dtype=torch.float32), device))

    def present_mask(self, positions: Sequence[int]) -> np.ndarray:
        """Host bool per layer: does any parameter in ``positions`` belong to it? Cached, read-only."""

        def make() -> np.ndarray:
            mask = np.zeros(self.num_layers, dtype=bool)
            mask[[self.layer_of_param[i] for i in positions]] = True
            return mask

        return self._memo(("present_mask", self._key(positions)), make)

    def host_present(self, positions: Sequence[int]) -> np.ndarray:
        """``[True] + present_mask(positions)``: the series form (index 0 global). Cached, read-only."""
        return self._memo(("host_present", self._key(positions)),
                          lambda: np.concatenate([[True], self.present_mask(positions)]))

    def host_present_list(self, positions: Sequence[int]) -> list[bool]:
        """:meth:`host_present` as a list. Cached, read-only."""
        return self._memo(("host_present_list", self._key(positions)),
                          lambda: self.host_present(positions).tolist())  # numpy: no sync

    @property
    def host_all_finite_list(self) -> list[bool]:
        """:attr:`host_all_finite` as a list. Cached, read-only."""
        return self._memo(("host_all_finite_list",), lambda: [False] * (self.num_layers + 1))

    @property
    def host_all_finite(self) -> np.ndarray:
        """All-False ``nonfinite`` series, shared (read-only) by every finite step."""
        return self._memo(("host_all_finite",), lambda: np.zeros(self.num_layers + 1, dtype=bool))

    def host_index_list(self, positions: Sequence[int]) -> list[int]:
        """``1 + layer`` of each parameter in ``positions`` (its series index), a list. Cached."""
        return self._memo(("host_index_list", self._key(positions)), lambda: [self.layer_of_param[i] + 1 for i in positions])

    def host_index(self, positions: Sequence[int]) -> np.ndarray:
        """Layer of each parameter in ``positions``, a host int array. Cached, read-only."""
        return self._memo(("host_index", self._key(positions)),
                          lambda: np.asarray([self.layer_of_param[i] for i in positions], dtype=np.int64))

    def stacking(self, positions: Sequence[int]) -> _Stacking | None:
        """How to read the tensors at ``positions`` on a CPU in few operations (see :class:`_Stacking`);
        ``None`` when it would not pay. Cached."""
        return self._memo(("stacking", self._key(positions)), lambda: _Stacking.plan([self.params[i] for i in positions]))

    def present(self, positions: Sequence[int], device: torch.device) -> Tensor:
        """Bool per layer on ``device``: does any parameter in ``positions`` belong to it? Cached."""
        return self._memo(("present", self._key(positions), device),
                          lambda: _to_device(torch.from_numpy(self.present_mask(positions).copy()), device))

    def positions(self, positions: Sequence[int], device: torch.device) -> Tensor:
        """``positions`` as a device index tensor. Cached."""
        return self._memo(("positions", tuple(positions), device),
                          lambda: _to_device(torch.tensor(list(positions), dtype=torch.long), device))

    def index(self, positions: Sequence[int] | None, device: torch.device) -> Tensor:
        """Layer index of each parameter in ``positions`` (``None``: all), on ``device``. Cached."""
        key = ("index", len(self.params) if positions is None else self._key(positions), device)
        return self._memo(key, lambda: _to_device(torch.tensor(
            self.layer_of_param if positions is None else [self.layer_of_param[i] for i in positions],
            dtype=torch.long), device))


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without a host sync: through pinned memory where ``device`` is CUDA (torch's
    caching host allocator keeps the pinned block until the copy has run; a blocking copy would sync)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# CPU reading of many small tensors: see _Stacking
_STACK_MAX_NUMEL = 1 << 14  # tensors up to this size are stacked with others of their shape...
_STACK_MIN_GROUP = 8  # ...when at least this many share the shape...
_STACK_MIN_TOTAL = 64  # ...and at least this many are stacked in all (fewer: the extra operations do not pay)...
_AMINMAX_MIN_NUMEL = 1 << 12  # CPU max |x| of tensors this large is read with aminmax (see _norms)
_PYTHON_MAX_TENSORS = 256  # host sums over this few tensors run in Python floats (no numpy cold start)
_STACK_CHUNK = 1 << 18  # ...into blocks of at most this many elements (1 MiB in float32): the bound on scratch memory


@dataclass(frozen=True)
class _Stacking:
    """Reads many small same-shaped tensors with a few large operations instead of one each.

    On a CPU ``torch._foreach_norm`` is a loop over tensors in C++ that pays the
    dispatcher's ~1 us per tensor, which for a model of 2,000 small tensors is
    ten times the cost of reading the bytes. Tensors that share a shape are
    instead copied, a block of at most ``_STACK_CHUNK`` elements at a time, into
    one ``torch.stack`` and measured with one ``vector_norm(dim=1)`` per block:
    the scratch block is bounded (it does not grow with the model) and stays
    in cache. Everything else goes through ``_foreach_norm`` as usual. On CUDA
    ``_foreach_norm`` is already one fused kernel per few hundred tensors; this
    is not used there.
    """

    blocks: tuple[Callable, ...]  # itemgetter of each stacked block's tensors (indices into the tensor list)
    rest: Callable | None  # itemgetter of the tensors measured by _foreach_norm
    order: Tensor  # where tensor i's norm lands in cat(blocks..., rest)

    @classmethod
    def plan(cls, params: Sequence[Tensor]) -> _Stacking | None:
        if (not params or len({(p.device, p.dtype) for p in params}) > 1 or params[0].device.type != "cpu"
                or params[0].is_complex()):  # complex: no amax/amin for max |x|
            return None
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            if 0 < p.numel() <= _STACK_MAX_NUMEL:
                by_shape.setdefault((tuple(p.shape), p.dtype), []).append(i)
        blocks = []
        for (shape, _), members in by_shape.items():
            if len(members) >= _STACK_MIN_GROUP:
                per_block = max(1, _STACK_CHUNK // max(1, math.prod(shape)))
                blocks += [tuple(members[k : k + per_block]) for k in range(0, len(members), per_block)]
        if sum(len(b) for b in blocks) < _STACK_MIN_TOTAL:
            return None
        stacked = {i for block in blocks for i in block}
        rest = [i for i in range(len(params)) if i not in stacked]
        flat = [i for block in blocks for i in block] + rest
        order = torch.empty(len(flat), dtype=torch.long)
        order[flat] = torch.arange(len(flat))
        return cls(tuple(_getter(b) for b in blocks), _getter(rest) if rest else None, order)

    def norms(self, tensors: Sequence[Tensor], ord: float) -> Tensor:
        """Float32 norm of each of ``tensors`` (the list this plan was made for), in their order."""
        parts = []
        for block in self.blocks:
            members = block(tensors)
            stacked = torch.stack(members)  # a bounded scratch block, not a model-sized copy
            rows = stacked.view(len(members), -1)
            if ord == math.inf:  # see _norms; NaN propagates through amax, amin and maximum
                parts.append(torch.maximum(rows.amax(1), rows.amin(1).neg()).to(torch.float32))
            else:
                parts.append(torch.linalg.vector_norm(rows, ord, dim=1, dtype=_into_f32(rows)).to(torch.float32))
        if self.rest is not None:
            parts.append(torch.stack(_norms(self.rest(tensors), ord)))
        return torch.cat(parts)[self.order]


def _norms(tensors: list[Tensor], ord: float) -> list[Tensor]:
    """``torch._foreach_norm(tensors, ord, dtype=torch.float32)`` for tensors of one device and dtype,
    with two differences for max ``|x|`` (``ord=inf``, read on detail steps only): an empty tensor's
    is 0 (as its L2 norm) where the inf-norm kernel raises, and on a CPU it is read with ``aminmax``,
    at memory speed, where the inf-norm kernel runs ~15x slower (8.8 ms against 0.6 ms for the
    13 MB of the benchmark MLP's gradients)."""
    if ord != math.inf:
        return _foreach_norm32(tensors, ord)
    if not tensors:
        return []
    if not all(t.numel() for t in tensors):  # max has no identity: keep the empty ones out of the kernels
        full = iter(_norms([t for t in tensors if t.numel()], ord))
        return [next(full) if t.numel() else torch.zeros((), dtype=torch.float32, device=t.device) for t in tensors]
    cpu = tensors[0].device.type == "cpu" and not tensors[0].is_complex()  # aminmax has no complex kernel
    large = [t.numel() >= _AMINMAX_MIN_NUMEL for t in tensors] if cpu else []
    if not any(large):
        return _foreach_norm32(tensors, ord)
    # on a CPU the inf-norm kernel costs ~0.6 ns per element, aminmax ~0.04 ns and ~1.5 us per call
    small = [t for t, is_large in zip(tensors, large) if not is_large]
    small_max = iter(_foreach_norm32(small, ord) if small else ())
    lo, hi = zip(*(torch.aminmax(t) for t, is_large in zip(tensors, large) if is_large))
    large_max = iter(torch.maximum(torch.stack(hi), torch.stack(lo).neg()).to(torch.float32).unbind())  # NaN propagates
    return [next(large_max) if is_large else next(small_max) for is_large in large]


def _foreach_norm32(tensors: list[Tensor], ord: float) -> list[Tensor]:
    """``torch._foreach_norm`` into float32, for tensors of one dtype. Float64 ones (``precision="64-true"``,
    a float64 head) and complex ones are measured in their own precision and cast: the kernel refuses to
    narrow, and takes no real ``dtype`` for complex input. A norm beyond float32's range then reads Inf; a
    sum of squares that overflows is re-read in float64 on the host (see ``_overflowed_norms`` in the callback)."""
    if tensors and _into_f32(tensors[0]) is None:
        return [n.to(torch.float32) for n in torch._foreach_norm(tensors, ord)]
    return torch._foreach_norm(tensors, ord, dtype=torch.float32)


def _into_f32(tensor: Tensor) -> torch.dtype | None:
    """The ``dtype=`` that makes a norm kernel accumulate into float32: float32 itself, except for float64
    (torch refuses to narrow in the kernel) and complex tensors (their norm's own real dtype): ``None``,
    measure in their precision, then cast."""
    return None if tensor.dtype == torch.float64 or tensor.is_complex() else torch.float32


def _getter(indices: Sequence[int]) -> Callable:
    """``f(seq) -> list`` of ``seq[i]`` for ``indices``, in C (``operator.itemgetter``)."""
    get = operator.itemgetter(*indices)
    return (lambda seq: [get(seq)]) if len(indices) == 1 else (lambda seq: list(get(seq)))


_GRAD = operator.attrgetter("grad")
_IS_NONE = functools.partial(operator.is_, None)


@dataclass
class GradStats:
    """Per-step gradient statistics, all float32 device tensors of shape ``[num_layers]``
    except ``total`` (a scalar)."""

    layers: tuple[str, ...]
    norm: Tensor  # L2 norm of the layer's gradients (0 where it has none)
    total: Tensor  # global L2 norm over every gradient
    nonfinite: Tensor  # bool: the layer's gradients hold NaN or Inf
    present: Tensor  # bool: the layer had at least one gradient this step
    max_abs: Tensor | None = None  # max |g| in the layer
    param_norm: Tensor | None = None  # L2 norm of the layer's weights
    update_ratio: Tensor | None = None  # lr * grad norm / weight norm


def _tensor_norms(
    tensors: list[Tensor], ord: float, device: torch.device, uniform: bool = False, stacking: _Stacking | None = None
) -> Tensor:
    """Float32 norm of each tensor, one foreach kernel per (device, dtype), stacked on ``device``.

    ``uniform``: the caller knows all tensors share one device and dtype (a
    plan's parameters, and so their gradients): then, unless one is sparse,
    a single foreach call with no per-tensor grouping work in Python.
    Sparse tensors are coalesced first (duplicate indices add up) and measured
    by their values; they are rare (embeddings with ``sparse=True``).
    ``stacking``: a CPU reading plan for exactly these tensors (see :class:`_Stacking`).
    """
    if stacking is not None:
        try:
            return stacking.norms(tensors, ord)
        except RuntimeError:  # a sparse gradient in a block (Embedding(sparse=True)) cannot be stacked
            pass
    if uniform and not any(t.is_sparse for t in tensors):
        return torch.stack(_norms(tensors, ord)).to(device)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype, t.is_sparse), []).append(i)
    if len(groups) == 1:
        (dev, _, sparse), _ = next(iter(groups.items()))
        if not sparse:
            return torch.stack(_norms(tensors, ord)).to(device)
    ordered: list[Tensor | None] = [None] * len(tensors)
    for (_, _, sparse), positions in groups.items():
        members = [tensors[i] for i in positions]
        if sparse:
            norms = [torch.linalg.vector_norm(t.coalesce()._values(), ord, dtype=_into_f32(t)).to(torch.float32)
                     for t in members]
        else:
            norms = _norms(members, ord)
        for i, n in zip(positions, norms):
            ordered[i] = n.to(device)
    return torch.stack(ordered)  # type: ignore[arg-type]


@dataclass
class LayerSums:
    """One step's per-layer sums, float32 device vectors ``[num_layers]``: what :class:`GradStats`
    is derived from, and what the guard copies to the host (its one sync) to derive it there."""

    grad_sq: Tensor  # sum of squared gradient norms (NaN/Inf where a gradient holds NaN/Inf)
    present: Tensor | np.ndarray  # the layer had a gradient: a host mask, or (sharded) a device count across ranks
    positions: list[int] = field(default_factory=list)  # plan positions of the parameters that had a gradient
    max_abs: Tensor | None = None  # max |g|
    weight_sq: Tensor | None = None  # sum of squared weight norms
    update_sq: Tensor | None = None  # sum of squared (lr * gradient norm)


def _present_grads(plan: LayerPlan) -> tuple[list[Tensor], list[int]]:
    """The gradients the plan's parameters hold (a DTensor's as its local shard), and their positions in the plan."""
    # C-level loops (map/attrgetter): this runs over every parameter every step
    grads, positions = list(map(_GRAD, plan.params)), plan.all_positions
    if any(map(_IS_NONE, grads)):  # frozen in this step, unused branch: measure those that have one
        positions = [i for i, g in enumerate(grads) if g is not None]
        grads = [g for g in grads if g is not None]
    if plan.dtensor:
        grads = local_shards(grads)
    return grads, positions


def _dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor`` once something imported it (FSDP2, tensor parallelism),
    else ``None``: no DTensor can exist before its module is imported, and importing it here
    would cost every user a fraction of a second."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def local_shards(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each DTensor (FSDP2's ``fully_shard``, tensor parallelism) as the shard this rank holds,
    other tensors as they are. The shard is the DTensor's own local tensor, not a copy: an
    in-place change to it (clipping) changes the DTensor."""
    dtensor = _dtensor_class()
    if dtensor is None:
        return list(tensors)
    with torch.no_grad():  # to_local() is then the local tensor itself, no autograd node
        return [t.to_local() if isinstance(t, dtensor) else t for t in tensors]


def shard_share(tensor: Tensor) -> float:
    """What a rank's sum of squares of ``tensor``'s local shard is weighted by, so that summing
    over every rank of the default process group counts each element once: the number of
    distinct shards over the world size (HSDP on a 2 x 2 mesh, replicated along one dimension and
    sharded along the other: 2 / 4). Ranks outside the DTensor's mesh are taken to hold copies
    (not so under pipeline parallelism). 1 for a plain tensor: each rank's is taken to be its own
    piece (FSDP1's flat shards). A ``Partial`` placement (values still to be summed across ranks)
    is counted as a shard, which is not exact; FSDP2 hands the optimizer ``Shard`` gradients."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(tensor, dtensor):
        return 1.0
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mesh = tensor.device_mesh
    distinct = math.prod(mesh.size(d) for d, p in enumerate(tensor.placements) if not p.is_replicate())
    return distinct / world


@dataclass
class PackedRead:
    """One step's per-tensor norms packed in one float32 device vector (see :func:`read_tensors`)."""

    packed: Tensor
    positions: list[int]  # plan positions of the tensors read
    names: tuple[str, ...]  # what the packed vector holds, in order: "grad", "max_abs", "weight", then "extra"

    def unpack(self, host: np.ndarray) -> dict[str, np.ndarray]:
        """Split the host copy of :attr:`packed` (float64 arrays in plan order; ``"extra"`` as given)."""
        n = len(self.positions)
        host = host.astype(np.float64)
        out = {name: host[k * n : (k + 1) * n] for k, name in enumerate(self.names)}
        out["extra"] = host[len(self.names) * n :]
        return out


def read_tensors(
    plan: LayerPlan, *, max_abs: bool = False, param_norms: bool = False, extra: Sequence[Tensor] = ()
) -> PackedRead | None:
    """Read the step's gradients (and optionally weights) into one device vector for one host copy.

    The per-step path of :class:`~lightning_gradguard.GradGuard`: per-tensor L2 norms of
    the gradients (and max ``|g|`` and weight norms when asked), plus the scalars in
    ``extra`` (0-d float32 tensors on the gradients' device: the last losses, a loss
    scale), in as few device operations as possible: the norm pass and one ``stack``.
    Right after the backward pass every distinct operation runs on cold caches (a
    few to tens of microseconds each on a CPU; a kernel launch each on a GPU), so
    everything else (sums per layer, ratios, detection) is done on the host copy,
    see :func:`layer_series`. ``None`` when no parameter has a gradient.
    """
    grads, positions = _present_grads(plan)
    if not grads:
        return None
    device = grads[0].device
    reads = [("grad", grads, 2.0)]
    if max_abs:
        reads.append(("max_abs", grads, math.inf))
    if param_norms:
        weights = plan.params if len(positions) == len(plan.params) else [plan.params[i] for i in positions]
        reads.append(("weight", local_shards(weights) if plan.dtensor else list(weights), 2.0))
    names = tuple(name for name, _, _ in reads)
    # planned from the parameters' shapes; a DTensor's local shard has another
    stacking = plan.stacking(positions) if device.type == "cpu" and not plan.dtensor else None
    with torch.no_grad():  # read in place: no per-tensor detach(), no autograd graph
        if stacking is None and plan.uniform:
            try:  # the usual case: one foreach pass per read, one stack for everything
                scalars = [n for _, tensors, ord in reads for n in _norms(tensors, ord)]
                return PackedRead(torch.stack(scalars + list(extra)), positions, names)
            except (NotImplementedError, RuntimeError):  # a sparse gradient (Embedding(sparse=True))
                pass
        vectors = [_tensor_norms(tensors, ord, device, plan.uniform, stacking) for _, tensors, ord in reads]
        if extra:
            vectors.append(torch.stack([e.to(device, torch.float32) for e in extra]))
        return PackedRead(torch.cat(vectors), positions, names)


def layer_series(
    plan: LayerPlan, read: PackedRead, host: np.ndarray, lrs: Sequence[float] | None = None,
    grad_scale: float | None = None,
) -> dict:
    """Host numpy: per-layer series from the host copy of a :class:`PackedRead`, float64, index 0 the
    global value: ``norm``, ``present``, ``nonfinite``, and as read, ``max_abs``, ``weight`` and (with
    ``lrs``, each plan parameter's learning rate) ``update_ratio``. ``grad_scale``:
    the gradients still carry this AMP loss scale (divided out here)."""
    parts = read.unpack(host)
    if grad_scale is not None:
        parts["grad"] = parts["grad"] / grad_scale
        if "max_abs" in parts:
            parts["max_abs"] = parts["max_abs"] / grad_scale
    index = plan.host_index(read.positions)
    n = plan.num_layers

    def with_total(row: np.ndarray, total: float) -> np.ndarray:
        out = np.empty(n + 1)
        out[0], out[1:] = total, row
        return out

    grad = parts["grad"]
    if len(grad) <= _PYTHON_MAX_TENSORS:  # Python floats: no numpy cold start for a few dozen values
        norm = np.array(_layer_norms(plan, read.positions, grad.tolist()))  # numpy: no sync
    else:
        norm = with_total(np.bincount(index, weights=grad * grad, minlength=n), 0.0)
        norm[0] = norm[1:].sum()  # NaN/Inf propagate to the global sum
        np.sqrt(norm, out=norm)
    out = {"norm": norm, "present": plan.host_present(read.positions)}
    out["nonfinite"] = plan.host_all_finite if math.isfinite(norm[0]) else ~np.isfinite(norm)
    if "max_abs" in parts:
        layer_max = np.zeros(n)
        np.maximum.at(layer_max, index, parts["max_abs"])  # NaN propagates
        out["max_abs"] = with_total(layer_max, layer_max.max() if n else math.nan)
    if "weight" in parts:
        weight = parts["weight"]
        out["weight"] = with_total(np.bincount(index, weights=weight * weight, minlength=n), 0.0)
        out["weight"][0] = out["weight"][1:].sum()
        np.sqrt(out["weight"], out=out["weight"])
        if lrs is not None:
            step = np.asarray(lrs, dtype=np.float64)[read.positions] * grad
            with np.errstate(all="ignore"):  # inf / inf: NaN, a finding
                update = np.sqrt(np.bincount(index, weights=step * step, minlength=n)) / np.maximum(
                    out["weight"][1:], np.finfo(np.float32).tiny)
            out["update_ratio"] = with_total(update, math.nan)
    return out


def layer_series_lists(plan: LayerPlan, positions: Sequence[int], grad: list[float]) -> dict[str, list]:
    """:func:`layer_series` without the optional reads, as Python lists, for up to
    ``_PYTHON_MAX_TENSORS`` tensors: ``grad`` holds the tensor norms (loss scale divided out).
    The guard's usual step on a small model: no numpy call at all (each costs microseconds on
    the cold caches right after the backward pass). The lists are shared: read them only."""
    norm = _layer_norms(plan, positions, grad)
    finite = math.isfinite(norm[0])  # NaN/Inf anywhere reach the global sum
    return {"norm": norm, "present": plan.host_present_list(positions),
            "nonfinite": plan.host_all_finite_list if finite else [not math.isfinite(x) for x in norm]}


def _layer_norms(plan: LayerPlan, positions: Sequence[int], grad: list[float]) -> list[float]:
    """Global (index 0) and per-layer L2 norms from per-tensor norms, in Python floats."""
    sums = [0.0] * (plan.num_layers + 1)
    for j, v in zip(plan.host_index_list(positions), grad):
        sums[j] += v * v
    sums[0] = sum(sums)  # NaN/Inf propagate to the global sum
    return [math.sqrt(x) for x in sums]


def layer_sums(
    plan: LayerPlan,
    *,
    max_abs: bool = False,
    param_norms: bool = False,
    lrs: Tensor | Sequence[float] | None = None,
    grad_scale: Tensor | None = None,
    all_reduce: Callable[[Tensor, str], Tensor] | None = None,
) -> LayerSums | None:
    """The device half of :func:`grad_stats` (same arguments): a handful of operations, no sync."""
    grads, positions = _present_grads(plan)
    placeholder = False
    if not grads:
        if all_reduce is None:
            return None
        # a rank holding no gradient shard must still join the collectives
        device = plan.params[0].device if plan.params else torch.device("cpu")
        grads, positions, placeholder = [torch.zeros(0, device=device)], [0], True
    device = grads[0].device
    index = plan.index(None if len(positions) == len(plan.params) else positions, device)
    uniform = plan.uniform  # one device, one dtype: a gradient always has its parameter's
    # stacking is planned from the parameters' shapes; a DTensor's local shard has another
    stacking = plan.stacking(positions) if device.type == "cpu" and not placeholder and not plan.dtensor else None
    # DTensors: each rank's sums of squares weighted so the all-reduce counts replicas once
    share = plan.shares(positions, device) if plan.dtensor and not placeholder else None

    tensor_norm = _tensor_norms(grads, 2.0, device, uniform, stacking)
    if grad_scale is not None:
        tensor_norm = tensor_norm / grad_scale.to(device=device, dtype=torch.float32)
    zeros = torch.zeros(plan.num_layers, dtype=torch.float32, device=device)

    def squares(norms: Tensor) -> Tensor:
        return norms.square() if share is None else norms.square() * share

    # a NaN/Inf anywhere in a tensor makes its norm, and so its layer's sum of squares, NaN/Inf
    sums = [zeros.index_add(0, index, squares(tensor_norm))]
    if all_reduce is not None:  # which layers hold gradients differs between ranks: count them
        sums.append(zeros.index_add(0, index, torch.full_like(tensor_norm, 0.0 if placeholder else 1.0)))
    if param_norms:
        weights = plan.params if len(positions) == len(plan.params) else [plan.params[i] for i in positions]
        weights = local_shards(weights) if plan.dtensor else list(weights)
        with torch.no_grad():  # read in place: no per-tensor detach(), no autograd graph
            w_norm = _tensor_norms(weights, 2.0, device, uniform, stacking)
        sums.append(zeros.index_add(0, index, squares(w_norm)))
        if lrs is not None:
            lr = lrs if isinstance(lrs, Tensor) else torch.tensor(list(lrs), dtype=torch.float32, device=device)
            if len(positions) != len(plan.params):
                lr = lr[plan.positions(positions, device)]
            sums.append(zeros.index_add(0, index, squares(lr.to(device, torch.float32) * tensor_norm)))
    if all_reduce is not None:
        sums = list(all_reduce(torch.stack(sums), "sum").unbind())
    out = LayerSums(sums.pop(0), sums.pop(0) if all_reduce is not None else plan.present_mask(positions), positions)
    if param_norms:
        out.weight_sq = sums.pop(0)
        out.update_sq = sums.pop(0) if lrs is not None else None
    if max_abs:
        tensor_max = _tensor_norms(grads, math.inf, device, uniform, stacking)
        if grad_scale is not None:
            tensor_max = tensor_max / grad_scale.to(device=device, dtype=torch.float32)
        # scatter_reduce's amax propagates NaN, so a NaN layer reports NaN
        out.max_abs = zeros.scatter_reduce(0, index, tensor_max, "amax", include_self=True)
        if all_reduce is not None:
            out.max_abs = all_reduce(out.max_abs, "max")
    return out


def grad_stats(
    plan: LayerPlan,
    *,
    max_abs: bool = False,
    param_norms: bool = False,
    lrs: Tensor | Sequence[float] | None = None,
    grad_scale: Tensor | None = None,
    all_reduce: Callable[[Tensor, str], Tensor] | None = None,
) -> GradStats | None:
    """Measure the gradients currently held by ``plan.params``; ``None`` if none has one.

    Args:
        max_abs: also compute each layer's max ``|g|`` (one more pass over the gradients).
        param_norms: also compute each layer's weight norm, and, with ``lrs``, the
            update-to-weight ratio (one pass over the weights).
        lrs: the learning rate of each parameter of the plan (same order), a
            device vector (or a list of floats).
        grad_scale: divide every statistic by this device scalar; for gradients
            that are still multiplied by an AMP loss scale.
        all_reduce: for sharded gradients (FSDP, DeepSpeed): ``all_reduce(t, op)``
            with ``op`` ``"sum"`` or ``"max"`` combines the per-layer partial
            sums across ranks (one collective for the sums, one more for max
            ``|g|``), so every rank computes the same statistics.
    """
    sums = layer_sums(plan, max_abs=max_abs, param_norms=param_norms, lrs=lrs, grad_scale=grad_scale,
                      all_reduce=all_reduce)
    if sums is None:
        return None
    device = sums.grad_sq.device
    present = sums.present > 0 if isinstance(sums.present, Tensor) else plan.present(sums.positions, device)
    norm = sums.grad_sq.sqrt()
    stats = GradStats(plan.layers, norm, sums.grad_sq.sum().sqrt(), ~torch.isfinite(sums.grad_sq), present,
                      max_abs=sums.max_abs)
    if sums.weight_sq is not None:
        stats.param_norm = sums.weight_sq.sqrt()
        if sums.update_sq is not None:
            stats.update_ratio = sums.update_sq.sqrt() / stats.param_norm.clamp_min(torch.finfo(torch.float32).tiny)
    return stats
