"""Scenario suite: small, real Lightning trainings on CPU with a known gradient pathology.

Each :class:`Scenario` is one training run (model, data, optimizer, Trainer
settings) in which a fault appears at a known ``trainer.global_step`` (the
*onset*), plus its fault-free twin (same seed, same data, no fault) so final
losses can be compared. Healthy scenarios have no fault and must raise no alarm.

Used by ``benchmarks/detection.py`` (detection rate, latency, false alarms of
``GradGuard``) and by the unit tests (the scenarios flagged ``small``).

Conventions shared by every scenario:

* Faults are injected inside the LightningModule, keyed on ``self.global_step``
  (in ``training_step`` that is the index of the optimizer step about to run,
  the same number a callback sees as ``trainer.global_step`` in
  ``on_before_optimizer_step``). The mapping fault -> step is therefore exact
  whatever the data order, and a one-off fault happens once: the next step gets
  normal data again, so a guard that skips the bad step can finish healthy.
* ``onset`` is the first step whose *gradients* are abnormal. Where the fault
  acts through a weight update (a learning-rate fault), the update that wrecks
  the weights is driven by a still-normal gradient, so the onset is one step
  after the fault starts; each docstring says why its onset is what it is.
* Data are load_digits (shipped inside scikit-learn) or generated from a seeded
  ``torch.Generator``; nothing is downloaded.

Run ``python benchmarks/detection.py --check`` to see, without any guard, the
gradient norms and losses that show each pathology.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "SCENARIOS",
    "Built",
    "Kind",
    "LossRecorder",
    "Scenario",
    "ScenarioResult",
    "get_scenario",
    "run_scenario",
    "select",
]

Kind = Literal["nonfinite", "exploding", "vanishing"]


# --------------------------------------------------------------------------- #
# Scenario records and registry
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Built:
    """What a scenario builder returns: the module, its data and Trainer extras."""

    module: L.LightningModule
    train_dataloader: DataLoader
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """One training run with a known pathology (or none).

    Attributes:
        name: unique identifier.
        expected: the condition a guard should report, ``None`` for healthy runs.
        onset: ``trainer.global_step`` whose gradients first show the pathology
            (``None`` for healthy runs).
        max_steps: default length of the run.
        builder: ``builder(fault, seed) -> Built``; ``fault=False`` builds the
            fault-free twin (same seed, same data, same architecture, no fault).
        small: cheap enough (about a second) to run inside the unit tests.
        expected_layer: module name (as in ``named_modules``) where the
            pathology is known to sit, or ``None`` when it is global.
        accepted_layers: other names a guard may rightly report instead (a
            layer hit as a consequence, or the exact parameter).
        description: what the scenario models, how and when the fault is
            injected (the builder's docstring).
    """

    name: str
    expected: Optional[Kind]
    onset: Optional[int]
    max_steps: int
    builder: Callable[[bool, int], Built]
    small: bool = False
    expected_layer: Optional[str] = None
    accepted_layers: tuple[str, ...] = ()
    description: str = ""

    def build(self, fault: bool = True, seed: int = 0) -> Built:
        return self.builder(fault, seed)

    @property
    def healthy(self) -> bool:
        return self.expected is None


SCENARIOS: dict[str, Scenario] = {}


def _scenario(
    name: str,
    expected: Optional[Kind],
    onset: Optional[int],
    max_steps: int,
    small: bool = False,
    expected_layer: Optional[str] = None,
    accepted_layers: tuple[str, ...] = (),
) -> Callable[[Callable[[bool, int], Built]], Callable[[bool, int], Built]]:
    """Register a builder function as a scenario; its docstring is the description."""

    def register(builder: Callable[[bool, int], Built]) -> Callable[[bool, int], Built]:
        if name in SCENARIOS:
            raise ValueError(f"duplicate scenario name {name!r}")
        SCENARIOS[name] = Scenario(
            name=name,
            expected=expected,
            onset=onset,
            max_steps=max_steps,
            builder=builder,
            small=small,
            expected_layer=expected_layer,
            accepted_layers=accepted_layers,
            description=inspect.cleandoc(builder.__doc__ or ""),
        )
        return builder

    return register


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise KeyError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}") from None


def select(names: Optional[Sequence[str]] = None, small: bool = False) -> list[Scenario]:
    """Scenarios by name (all when ``names`` is empty), optionally only the small ones."""
    chosen = [get_scenario(n) for n in names] if names else list(SCENARIOS.values())
    return [s for s in chosen if s.small or not small]


# --------------------------------------------------------------------------- #
# Data
# --------------------------------------------------------------------------- #


@lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """load_digits (1,797 8x8 images, 10 classes), standardised per pixel."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # +1: constant border pixels stay 0
    return x, torch.tensor(y, dtype=torch.long)


def _loader(*tensors: torch.Tensor, seed: int, batch_size: int = 64) -> DataLoader:
    """Shuffled loader with its own seeded generator: same seed -> same batches."""
    return DataLoader(
        TensorDataset(*tensors),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )


def _digits_loader(seed: int, images: bool = False, batch_size: int = 64) -> DataLoader:
    x, y = _digits_tensors()
    if images:
        x = x.view(-1, 1, 8, 8)
    return _loader(x, y, seed=seed, batch_size=batch_size)


def _mlp(sizes: Sequence[int], act: Callable[[], nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with ``act`` between them: modules named net.0, net.2, ... ."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- #
# Modules
# --------------------------------------------------------------------------- #


class _Module(L.LightningModule):
    """Common module: ``self.net`` + a loss + an optimizer (+ optional LR lambda).

    Subclasses inject faults by overriding :meth:`perturb` (called on the batch
    of every step, before the forward) or :meth:`training_step`.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: Literal["ce", "mse", "mse_onehot"] = "ce",
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.0,
        lr_lambda: Optional[Callable[[int], float]] = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_name = loss
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.lr_lambda = lr_lambda

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "ce":
            return F.cross_entropy(out.flatten(0, -2), y.flatten())
        if self.loss_name == "mse_onehot":
            return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype))
        return F.mse_loss(out, y)

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = self.perturb(*batch)
        return self.loss(self.net(x), y)

    fused = False  # the optimizers' one-kernel form (what GradGuard(sync="deferred") hands its verdict to)

    def configure_optimizers(self) -> Any:
        fused = True if self.fused else None
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, fused=fused)
        elif self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, fused=fused)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, fused=fused)
        if self.lr_lambda is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class _ScaleBatchAt(_Module):
    """Scales the inputs of the batch at step ``at`` by ``factor`` (a corrupted batch)."""

    def __init__(self, *args: Any, at: Optional[int], factor: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.factor = at, factor

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.global_step == self.at:
            x = x * self.factor
        return x, y


class _InfInputAt(_Module):
    """Puts one +Inf into the inputs of the batch at step ``at``."""

    def __init__(self, *args: Any, at: Optional[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at = at

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.global_step == self.at:
            x = x.clone()
            x[3, 10] = math.inf
        return x, y


class _MaskedSoftmaxNLL(_Module):
    """Hand-written softmax + log likelihood with a logit mask (as in masked LMs).

    At step ``at`` the mask wrongly covers the target class of sample 0: its
    logit gets ``-1e4``, its probability underflows to exactly 0 in float32, and
    ``log(0) = -inf``. The backward pass of log gives ``-inf`` for that entry,
    and the softmax backward turns it into NaN for every logit of the batch.
    """

    def __init__(self, *args: Any, at: Optional[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at = at

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.net(x)
        if self.global_step == self.at:
            mask = torch.zeros_like(logits)
            mask[0, y[0]] = -1e4
            logits = logits + mask
        probs = torch.softmax(logits, dim=-1)
        return -torch.log(probs.gather(1, y[:, None])).mean()


class _NaNGradInLayer(_Module):
    """Plants a NaN in the weight gradient of module ``layer`` at step ``at``.

    A tensor hook on that weight rewrites its incoming gradient during backward,
    so the NaN is already in ``.grad`` when any Lightning hook runs, and it
    stays in that one parameter (parameter gradients do not flow further).
    Models a numerically unsafe custom op in one layer.
    """

    def __init__(self, *args: Any, at: Optional[int], layer: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at = at
        if at is not None:
            self.get_submodule(layer).weight.register_hook(self._plant)

    def _plant(self, grad: torch.Tensor) -> torch.Tensor:
        if self.global_step != self.at:
            return grad
        grad = grad.clone()
        grad[0, 0] = math.nan
        return grad


class _KillBiasAt(_Module):
    """At step ``at``, shifts the bias of module ``layer`` by ``shift`` (dying ReLU)."""

    def __init__(self, *args: Any, at: Optional[int], layer: str, shift: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.at, self.layer, self.shift = at, layer, shift

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.global_step == self.at:
            with torch.no_grad():
                self.get_submodule(self.layer).bias.add_(self.shift)
        return x, y


class _CNN(nn.Module):
    """Two conv blocks with BatchNorm on 1x8x8 images, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class _TinyTransformer(nn.Module):
    """Token + position embeddings, a 2-layer encoder and a per-position head."""

    def __init__(self, vocab: int, length: int, d: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], device=x.device)
        return self.head(self.encoder(self.tok(x) + self.pos(pos)))


class _RNNModel(nn.Module):
    """(optional bias-free input projection) -> single-layer RNN/GRU -> head on the last state."""

    def __init__(
        self,
        n_in: int,
        hidden: int,
        n_out: int,
        cell: Literal["rnn_tanh", "rnn_relu", "gru"],
        project: bool = False,
    ) -> None:
        super().__init__()
        # ``inp`` has no bias so its gradient only comes from the non-zero inputs.
        self.inp = nn.Linear(n_in, hidden, bias=False) if project else nn.Identity()
        rnn_in = hidden if project else n_in
        if cell == "gru":
            self.rnn: nn.Module = nn.GRU(rnn_in, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(rnn_in, hidden, nonlinearity=cell[4:], batch_first=True)
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.inp(x))
        return self.head(out[:, -1])


def _scaled_orthogonal_(weight: torch.Tensor, radius: float) -> None:
    """Orthogonal init times ``radius``: every eigenvalue has modulus ``radius``."""
    with torch.no_grad():
        nn.init.orthogonal_(weight)
        weight.mul_(radius)


# --------------------------------------------------------------------------- #
# Healthy scenarios
# --------------------------------------------------------------------------- #


@_scenario("healthy_mlp", expected=None, onset=None, max_steps=1000, small=True)
def healthy_mlp(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 (ReLU) on load_digits, Adam lr 1e-3, batch 64.

    The plain baseline: the loss falls from 2.3 to ~0.003 and the gradient
    norm from ~0.7 to ~0.03 as it fits. No fault (``fault`` is ignored, as in
    every healthy scenario).
    """
    return Built(_Module(_mlp([64, 64, 64, 10]), lr=1e-3), _digits_loader(seed))


@_scenario("healthy_cnn_bn", expected=None, onset=None, max_steps=1000)
def healthy_cnn_bn(fault: bool, seed: int) -> Built:
    """Small CNN with BatchNorm on the 8x8 digit images, SGD momentum 0.9, lr 0.05.

    Fits fast: the loss falls from 2.5 to ~5e-4 and the gradient norm from ~4
    to ~0.006 (BatchNorm'd conv weights also get smaller gradients as their
    norm grows). A 700x fall of the gradients with a converged loss is not
    vanishing. No fault.
    """
    return Built(
        _Module(_CNN(), optimizer="sgd", lr=0.05, momentum=0.9),
        _digits_loader(seed, images=True),
    )


_SEQ_VOCAB, _SEQ_LEN = 10, 12


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@_scenario("healthy_transformer_warmup", expected=None, onset=None, max_steps=1000)
def healthy_transformer_warmup(fault: bool, seed: int) -> Built:
    """Tiny 2-layer transformer encoder learning to reverse a sequence of 12 tokens.

    Generated data (4,096 random sequences over 10 tokens). AdamW peak lr 3e-3,
    linear warm-up over 100 steps then cosine decay to 0 at step 1,000 (a
    LambdaLR stepped every step). The loss sits on a plateau (~2.3) then drops
    during the warm-up, and the gradient norm doubles (0.27 at step 30 -> 0.55
    at step 80) as it leaves the plateau, then falls to ~0.002. Neither is
    exploding. No fault.
    """
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randint(0, _SEQ_VOCAB, (4096, _SEQ_LEN), generator=g)
    module = _Module(
        _TinyTransformer(_SEQ_VOCAB, _SEQ_LEN),
        optimizer="adamw",
        lr=3e-3,
        lr_lambda=_warmup_cosine(100, 1000),
    )
    return Built(module, _loader(x, x.flip(1), seed=seed))


@_scenario("healthy_converge_zero", expected=None, onset=None, max_steps=1000)
def healthy_converge_zero(fault: bool, seed: int) -> Built:
    """Two-layer linear network fitting a noise-free linear target, SGD momentum 0.9.

    The target is exactly representable, so the loss legitimately goes to
    ~1e-14 and the gradients of both layers shrink together from ~3 to ~2e-7.
    That is convergence, not vanishing: a guard must stay silent. No fault.
    """
    g = torch.Generator().manual_seed(2000 + seed)
    x = torch.randn(2048, 16, generator=g)
    w = torch.randn(16, 1, generator=g) / 4.0
    net = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 1))
    return Built(_Module(net, loss="mse", optimizer="sgd", lr=0.05, momentum=0.9), _loader(x, x @ w, seed=seed))


@_scenario("healthy_rnn_clipped", expected=None, onset=None, max_steps=1000)
def healthy_rnn_clipped(fault: bool, seed: int) -> Built:
    """GRU (hidden 32) regressing the normalised sum of a 30-step noise sequence (MSE).

    Adam lr 1e-3 with the Trainer's own ``gradient_clip_val=0.5`` (norm
    clipping), which engages on ~20% of the steps. The guard sees the gradients
    before clipping: this run's gradient norm is spiky (single steps up to ~7x
    the median of the previous 50) while the loss falls from 1.1 to ~1e-3.
    Such clipped RNN spikes are normal. No fault.
    """
    g = torch.Generator().manual_seed(3000 + seed)
    x = torch.randn(4096, 30, 1, generator=g)
    y = x.sum(dim=1) / math.sqrt(30.0)  # unit variance target
    module = _Module(_RNNModel(1, 32, 1, cell="gru"), loss="mse", lr=1e-3)
    return Built(module, _loader(x, y, seed=seed), {"gradient_clip_val": 0.5})


# --------------------------------------------------------------------------- #
# Exploding
# --------------------------------------------------------------------------- #


@_scenario("lr_too_high", expected="exploding", onset=1, max_steps=150, small=True)
def lr_too_high(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 regressing one-hot digit targets (MSE), SGD with lr far too high.

    Fault: lr 12 instead of 1.0 (twin; lr 10 still trains, 12 does not) from
    the first step. The loss and the gradient norm grow ~1.4x per step for
    about ten steps, then super-exponentially; the loss overflows to Inf and
    then NaN around step 15 (seeds 0-3: steps 13-15). Onset is 1, not 0: the
    step-0 gradient is computed from the initial weights and is identical to
    the twin's; the first abnormal gradient is the one computed after the first
    oversized update.
    """
    lr = 12.0 if fault else 1.0
    return Built(_Module(_mlp([64, 64, 64, 10]), loss="mse_onehot", optimizer="sgd", lr=lr), _digits_loader(seed))


_LR_JUMP_AT = 200


@_scenario("lr_jump", expected="exploding", onset=_LR_JUMP_AT + 1, max_steps=400, small=True)
def lr_jump(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 on digits (cross-entropy), SGD momentum 0.9 lr 0.02; LR x300 from step 200.

    Fault: a LambdaLR stepped every step returns 1 before step 200 and 300
    afterwards (a schedule bug). Lightning steps the scheduler after each
    optimizer step, so optimizer step s uses ``lr * lambda(s)``: the update of
    step 200 is the first with the huge LR, but it is driven by the step-200
    gradient, computed from still-healthy weights. The first abnormal gradient
    is therefore step 201: onset 201 (norm ~30x the previous steps, then ~15x
    more every step). By steps 207-208 single gradient entries reach ~1e21:
    still finite, but the sum of their squares overflows float32, so a naive
    float32 norm reads Inf although no gradient is non-finite. Afterwards the
    ReLUs are dead and the loss sits at ~2.5 (no NaN).
    """
    factor = 300.0 if fault else 1.0
    module = _Module(
        _mlp([64, 64, 64, 10]),
        optimizer="sgd",
        lr=0.02,
        momentum=0.9,
        lr_lambda=lambda step: factor if step >= _LR_JUMP_AT else 1.0,
    )
    return Built(module, _digits_loader(seed))


@_scenario("corrupted_batch", expected="exploding", onset=150, max_steps=300, small=True)
def corrupted_batch(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 on digits, Adam lr 1e-3; the batch of step 150 has its inputs scaled by 1e3.

    Models a batch that skipped normalisation (raw values, wrong units). The
    gradient of that step spikes by orders of magnitude; the following batches
    are normal again. Onset 150: the corrupted data enter that step's forward.
    """
    module = _ScaleBatchAt(_mlp([64, 64, 64, 10]), lr=1e-3, at=150 if fault else None, factor=1e3)
    return Built(module, _digits_loader(seed))


@_scenario("deep_bad_init", expected="exploding", onset=0, max_steps=200, small=True)
def deep_bad_init(fault: bool, seed: int) -> Built:
    """12-layer ReLU MLP (width 64) on digits, SGD lr 0.01, with a too-large Gaussian init.

    Fault: weights ~ N(0, (2.5 / sqrt(fan_in))^2) instead of Kaiming's
    (sqrt(2) / sqrt(fan_in)); each layer amplifies activations and
    back-propagated gradients by ~1.77, so ~1e3 over 12 layers, and the first
    update sends the run diverging. Biases are zero in both. Onset 0: the
    gradient is abnormal from the very first step.
    """
    net = _mlp([64] * 12 + [10])
    std = 2.5 if fault else math.sqrt(2.0)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return Built(_Module(net, optimizer="sgd", lr=0.01), _digits_loader(seed))


@_scenario("rnn_exploding", expected="exploding", onset=0, max_steps=200, small=True)
def rnn_exploding(fault: bool, seed: int) -> Built:
    """ReLU RNN (hidden 32) over 40-step sequences whose recurrent matrix has spectral radius ~1.2.

    Task: is the sum of the first input channel positive (8 noise channels).
    W_hh = r * (I + 0.1 G / sqrt(32)), G Gaussian: the identity-based init of
    ReLU RNNs (IRNN), scaled. Fault: r = 1.2 instead of 0.9 (twin). The
    identity part keeps the state positive, so ReLU does not gate the growth
    away: state and back-propagated gradient grow ~1.2x per time step
    (1.2^40 ~ 1.5e3). The step-0 gradient norm is ~1e5 (twin: ~2-9) on seeds
    0-2; Adam (lr 1e-3) brings it down to ~1e3-1e4, still far above the
    twin's, and the loss never gets back to chance (final ~5-8, twin ~0.15).
    (A scaled orthogonal W_hh was tried first: with ReLU its explosion depends
    on the seed, 1e0 to 1e5.) Onset 0: the recurrent init is the fault, there
    is no healthy history.
    """
    g = torch.Generator().manual_seed(4000 + seed)
    x = torch.randn(4096, 40, 8, generator=g)
    y = (x[..., 0].sum(1) > 0).long()
    net = _RNNModel(8, 32, 2, cell="rnn_relu")
    radius = 1.2 if fault else 0.9
    with torch.no_grad():
        noise = 0.1 * torch.randn(32, 32) / math.sqrt(32)
        net.rnn.weight_hh_l0.copy_(radius * (torch.eye(32) + noise))
    return Built(_Module(net, lr=1e-3), _loader(x, y, seed=seed))


# --------------------------------------------------------------------------- #
# Vanishing
# --------------------------------------------------------------------------- #


@_scenario("deep_sigmoid", expected="vanishing", onset=0, max_steps=300, small=True)
def deep_sigmoid(fault: bool, seed: int) -> Built:
    """16-layer sigmoid MLP (width 32) on digits with PyTorch's default init, Adam lr 1e-3.

    Each sigmoid layer multiplies the back-propagated gradient by at most 0.25
    times a small weight: the gradient norm falls ~7x per layer, from ~0.4 at
    the head to ~1e-13 at ``net.0``, and the loss stays at chance (2.30).
    Adam's per-parameter scaling does not rescue gradients that far below its
    epsilon (1e-8). Twin: the same stack with ReLU and Kaiming init, which
    trains. Onset 0: the architecture is the fault.
    """
    net = _mlp([64] + [32] * 15 + [10], act=nn.Sigmoid if fault else nn.ReLU)
    if not fault:
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
    return Built(_Module(net, lr=1e-3), _digits_loader(seed))


_DYING_AT = 150


@_scenario(
    "dying_relu",
    expected="vanishing",
    onset=_DYING_AT,
    max_steps=400,
    small=True,
    expected_layer="net.2",
    accepted_layers=("net.0",),  # dead because net.2 is
)
def dying_relu(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-64-10 (ReLU) on digits, Adam lr 1e-3; layer ``net.2`` dies at step 150.

    Fault: just before the forward of step 150 the bias of ``net.2`` is shifted
    by -100 (what one huge update does to a bias), so every unit of that layer
    outputs 0 for every input. From step 150 on, ``net.2`` and ``net.0`` get
    exactly zero gradients, ``net.4`` gets zero weight gradients, and only the
    biases behind the dead layer still learn: the loss jumps from ~0.1 to
    chance (2.30) and stays there. The global gradient norm only drops ~4x
    (the head keeps normal gradients): the signal is per layer. Onset 150: the
    forward of that step already runs with the dead layer.
    """
    at = _DYING_AT if fault else None
    module = _KillBiasAt(_mlp([64, 64, 64, 64, 10]), lr=1e-3, at=at, layer="net.2", shift=-100.0)
    return Built(module, _digits_loader(seed))


@_scenario(
    "rnn_long_span",
    expected="vanishing",
    onset=0,
    max_steps=300,
    expected_layer="net.inp",
    accepted_layers=("net.rnn.weight_ih_l0",),  # the RNN's own input weights vanish too
)
def rnn_long_span(fault: bool, seed: int) -> Built:
    """tanh RNN (hidden 32) over 60 steps where only the input at t=0 matters.

    Inputs are zero except at t=0 (4 Gaussian channels); the label is the sign
    of channel 0 at t=0, read from the last state. A bias-free projection
    ``net.inp`` feeds the RNN, so its gradient only comes through 59 recurrent
    Jacobians. Fault: W_hh = 0.5 x orthogonal, so that path shrinks by ~0.5^59
    and ``net.inp`` (and the RNN's input weights) get ~1e-19 gradients; the loss
    stays at chance (0.69). Twin: W_hh = orthogonal (radius 1, norm
    preserving). Adam lr 1e-3. Onset 0.
    """
    g = torch.Generator().manual_seed(5000 + seed)
    x = torch.zeros(4096, 60, 4)
    x[:, 0] = torch.randn(4096, 4, generator=g)
    y = (x[:, 0, 0] > 0).long()
    net = _RNNModel(4, 32, 2, cell="rnn_tanh", project=True)
    _scaled_orthogonal_(net.rnn.weight_hh_l0, 0.5 if fault else 1.0)
    return Built(_Module(net, lr=1e-3), _loader(x, y, seed=seed))


# --------------------------------------------------------------------------- #
# Non-finite
# --------------------------------------------------------------------------- #


@_scenario("inf_input", expected="nonfinite", onset=120, max_steps=300, small=True)
def inf_input(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 on digits, Adam lr 1e-3; one input value of the step-120 batch is +Inf.

    Models a corrupt record. The forward produces Inf/NaN activations, the loss
    is NaN and every gradient is NaN at step 120 (no single layer: all are hit).
    The following batches are clean. Onset 120.
    """
    module = _InfInputAt(_mlp([64, 64, 64, 10]), lr=1e-3, at=120 if fault else None)
    return Built(module, _digits_loader(seed))


@_scenario("log_zero", expected="nonfinite", onset=150, max_steps=300, small=True)
def log_zero(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 on digits with a hand-written masked softmax + log likelihood, Adam lr 1e-3.

    Fault: at step 150 the logit mask wrongly covers the target of sample 0, its
    probability underflows to exactly 0 and the loss takes log(0) = -Inf: the
    loss is +Inf and every gradient is NaN (the softmax backward spreads it to
    all logits). Normal batches afterwards. Onset 150.
    """
    module = _MaskedSoftmaxNLL(_mlp([64, 64, 64, 10]), lr=1e-3, at=150 if fault else None)
    return Built(module, _digits_loader(seed))


@_scenario("nan_in_layer", expected="nonfinite", onset=200, max_steps=300, small=True, expected_layer="net.2")
def nan_in_layer(fault: bool, seed: int) -> Built:
    """MLP 64-64-64-10 on digits, Adam lr 1e-3; one NaN lands in ``net.2.weight.grad`` at step 200.

    Injected by a tensor hook on ``net.2.weight`` (see ``_NaNGradInLayer``):
    only that layer's gradient is non-finite and the loss itself stays finite,
    so the fault is invisible in the loss curve. Without a guard Adam turns the
    NaN into NaN weights and the following losses are NaN. Onset 200.
    """
    module = _NaNGradInLayer(_mlp([64, 64, 64, 10]), lr=1e-3, at=200 if fault else None, layer="net.2")
    return Built(module, _digits_loader(seed))


# --------------------------------------------------------------------------- #
# Running a scenario
# --------------------------------------------------------------------------- #


class LossRecorder(Callback):
    """Collects the training loss of every batch (from ``on_train_batch_end`` outputs)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss) if loss is not None else math.nan)


@dataclass
class ScenarioResult:
    """Outcome of one :func:`run_scenario` call.

    ``losses[i]`` is the training loss of the i-th batch (= step i without
    gradient accumulation). ``final_loss`` is the mean of the last 20 finite
    losses, or ``inf`` when the run ended non-finite (last loss or any weight
    non-finite). ``callbacks`` are the caller's callbacks (e.g. the guard, to
    read ``guard.events``).
    """

    scenario: Scenario
    fault: bool
    seed: int
    max_steps: int
    steps: int
    losses: list[float]
    final_loss: float
    first_nonfinite_loss_step: Optional[int]
    weights_finite: bool
    wall_time_s: float
    callbacks: list[Callback]
    module: L.LightningModule

    @property
    def name(self) -> str:
        return self.scenario.name


_BASE_TRAINER_KWARGS: dict[str, Any] = dict(
    accelerator="cpu",
    devices=1,
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)

_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def run_scenario(
    scenario: Scenario | str,
    callbacks: Sequence[Callback] = (),
    fault: bool = True,
    seed: int = 0,
    max_steps: Optional[int] = None,
    trainer_kwargs: Optional[dict[str, Any]] = None,
    num_threads: int = 1,
    module_attrs: Optional[dict[str, Any]] = None,
) -> ScenarioResult:
    """Train ``scenario`` (or its fault-free twin) on CPU and collect what happened.

    Seeds everything with ``seed`` before building, so two calls with the same
    arguments give the same run. ``trainer_kwargs`` override the scenario's own
    Trainer arguments (which override the CPU/no-logging defaults);
    ``module_attrs`` are set on the module built (``{"fused": True}``).
    """
    if isinstance(scenario, str):
        scenario = get_scenario(scenario)
    steps = scenario.max_steps if max_steps is None else max_steps
    callbacks = list(callbacks)
    recorder = LossRecorder()

    old_threads = torch.get_num_threads()
    old_levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    torch.set_num_threads(num_threads)  # tiny models: more threads only add overhead
    for name in _QUIET_LOGGERS:  # "GPU available: ..." banners
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")  # lightning vs torch 2.13
            L.seed_everything(seed, workers=True, verbose=False)
            built = scenario.build(fault=fault, seed=seed)
            for name, value in (module_attrs or {}).items():
                setattr(built.module, name, value)
            kwargs = {**_BASE_TRAINER_KWARGS, **built.trainer_kwargs, **(trainer_kwargs or {})}
            kwargs["max_steps"] = steps
            kwargs["callbacks"] = [*callbacks, recorder]
            trainer = L.Trainer(**kwargs)
            start = time.perf_counter()
            trainer.fit(built.module, train_dataloaders=built.train_dataloader)
            wall = time.perf_counter() - start
    finally:
        torch.set_num_threads(old_threads)
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)

    losses = recorder.losses
    first_bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    weights_finite = all(bool(torch.isfinite(p).all()) for p in built.module.parameters())
    finite = [v for v in losses if math.isfinite(v)]
    ended_bad = not weights_finite or not losses or not math.isfinite(losses[-1])
    final = math.inf if ended_bad or not finite else sum(finite[-20:]) / len(finite[-20:])
    return ScenarioResult(
        scenario=scenario,
        fault=fault,
        seed=seed,
        max_steps=steps,
        steps=trainer.global_step,
        losses=losses,
        final_loss=final,
        first_nonfinite_loss_step=first_bad,
        weights_finite=weights_finite,
        wall_time_s=wall,
        callbacks=callbacks,
        module=built.module,
    )
