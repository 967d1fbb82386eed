"""Synthetic model builders for the GradGuard benchmarks.

Every builder returns a :class:`ModelSpec`: a plain ``torch.nn.Module``, a
loss function, and a function that *generates* one batch of synthetic data
(no data is ever downloaded). The benchmarks wrap the network in a
LightningModule themselves, so the builders stay free of Lightning.

Models
------
``mlp``           ~3.4M parameters, 26 tensors (Linear + LayerNorm + GELU).
``cnn``           ~1.6M parameters, 17 tensors (5 conv layers with BatchNorm).
``many_tensors``  ~1.06M parameters in 2,000 tensors (1,000 tiny Linear layers).
``few_tensors``   ~1.05M parameters in 20 tensors (10 Linear layers); the
                  same parameter count as ``many_tensors`` within 0.5 %.
``gpt``           GPT-style decoder, 12 layers, d=768, vocab 16k, seq 512,
                  ~110M parameters (CUDA-sized; written by hand).
``resnet50``      ResNet-50 (25.6M parameters, 161 tensors), written by hand
                  (torchvision is deliberately not used).

The builders take size keyword arguments so tests can build small versions,
e.g. ``build_model("gpt", n_layer=2, d_model=64, vocab=128, seq_len=32)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "MODELS", "CPU_MODELS", "CUDA_MODELS", "build_model", "count_params"]


@dataclass
class ModelSpec:
    """A network plus how to feed it and what loss to train it with."""

    name: str
    net: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    description: str = ""
    extra: dict = field(default_factory=dict)


def count_params(net: nn.Module) -> tuple[int, int]:
    """Return (number of trainable parameters, number of parameter tensors)."""
    params = [p for p in net.parameters() if p.requires_grad]
    return sum(p.numel() for p in params), len(params)


# --------------------------------------------------------------------- mlp
class MLP(nn.Module):
    """Residual-free MLP: in -> [Linear, LayerNorm, GELU] x depth -> out."""

    def __init__(self, d_in: int = 512, hidden: int = 768, depth: int = 6, n_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.LayerNorm(hidden), nn.GELU()]
            d = hidden
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _mlp(batch_size: int = 64, d_in: int = 512, hidden: int = 768, depth: int = 6, n_classes: int = 10) -> ModelSpec:
    def make_batch(g: torch.Generator):
        return torch.randn(batch_size, d_in, generator=g), torch.randint(0, n_classes, (batch_size,), generator=g)

    return ModelSpec("mlp", MLP(d_in, hidden, depth, n_classes), F.cross_entropy, make_batch,
                     f"MLP {d_in}->{hidden}x{depth}->{n_classes}, LayerNorm+GELU, batch {batch_size}")


# --------------------------------------------------------------------- cnn
class SmallCNN(nn.Module):
    """Five 3x3 conv layers with BatchNorm + ReLU, stride-2 downsampling, linear head."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128, 256, 512), n_classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 3
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2  # 32x32 -> 32, 16, 8, 4, 2
            blocks += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cnn(batch_size: int = 32, image: int = 32, channels: tuple[int, ...] = (32, 64, 128, 256, 512), n_classes: int = 10) -> ModelSpec:
    def make_batch(g: torch.Generator):
        return torch.randn(batch_size, 3, image, image, generator=g), torch.randint(0, n_classes, (batch_size,), generator=g)

    return ModelSpec("cnn", SmallCNN(tuple(channels), n_classes), F.cross_entropy, make_batch,
                     f"5x conv3x3+BN+ReLU {list(channels)}, {image}x{image} input, batch {batch_size}")


# ------------------------------------------------------- many / few tensors
class ManyTinyLinears(nn.Module):
    """``n`` independent tiny ``Linear(d, d)`` branches over the same input, averaged.

    2 parameter tensors per branch (weight, bias): n=1000 gives 2,000 tensors.
    Parallel rather than stacked so the autograd graph stays shallow.
    """

    def __init__(self, n: int = 1000, d: int = 32) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([b(x) for b in self.branches]).mean(0)


class FewLinears(nn.Module):
    """``depth`` stacked ``Linear(d, d)`` layers with tanh: 2 tensors per layer."""

    def __init__(self, depth: int = 10, d: int = 324) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.tanh(x)
        return x


def _regression_batch(batch_size: int, d: int):
    def make_batch(g: torch.Generator):
        return torch.randn(batch_size, d, generator=g), torch.randn(batch_size, d, generator=g)

    return make_batch


def _many_tensors(batch_size: int = 64, n: int = 1000, d: int = 32) -> ModelSpec:
    return ModelSpec("many_tensors", ManyTinyLinears(n, d), F.mse_loss, _regression_batch(batch_size, d),
                     f"{n} parallel Linear({d},{d}) branches, batch {batch_size}")


def _few_tensors(batch_size: int = 64, depth: int = 10, d: int | None = None, match_n: int = 1000, match_d: int = 32) -> ModelSpec:
    if d is None:
        # Choose d so that depth*(d*d+d) ~= match_n*(match_d*match_d+match_d).
        target = match_n * (match_d * match_d + match_d) / depth
        d = int(round((-1 + math.sqrt(1 + 4 * target)) / 2))
    return ModelSpec("few_tensors", FewLinears(depth, d), F.mse_loss, _regression_batch(batch_size, d),
                     f"{depth} stacked Linear({d},{d}) + tanh, batch {batch_size}")


# --------------------------------------------------------------------- gpt
class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    """Pre-LayerNorm transformer decoder block (GPT-2 style)."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(approximate="tanh"), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A small GPT-2-like decoder-only language model (untied output head)."""

    def __init__(self, vocab: int = 16384, seq_len: int = 512, n_layer: int = 12, d_model: int = 768, n_head: int = 12) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(GPTBlock(d_model, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _gpt(batch_size: int = 8, vocab: int = 16384, seq_len: int = 512, n_layer: int = 12, d_model: int = 768, n_head: int = 12) -> ModelSpec:
    def make_batch(g: torch.Generator):
        tokens = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))

    return ModelSpec("gpt", GPT(vocab, seq_len, n_layer, d_model, n_head), loss_fn, make_batch,
                     f"GPT decoder {n_layer}L d={d_model} h={n_head} vocab={vocab} seq={seq_len}, batch {batch_size}")


# ---------------------------------------------------------------- resnet50
class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), expansion 4."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), n_classes: int = 1000, base: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, base, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(base), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        c_in = base
        for i, n_blocks in enumerate(layers):
            width = base * 2**i
            blocks = []
            for j in range(n_blocks):
                blocks.append(Bottleneck(c_in, width, stride=2 if (j == 0 and i > 0) else 1))
                c_in = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(c_in, n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block, as in common recipes
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _resnet50(batch_size: int = 64, image: int = 224, n_classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3), base: int = 64) -> ModelSpec:
    def make_batch(g: torch.Generator):
        return torch.randn(batch_size, 3, image, image, generator=g), torch.randint(0, n_classes, (batch_size,), generator=g)

    return ModelSpec("resnet50", ResNet(tuple(layers), n_classes, base), F.cross_entropy, make_batch,
                     f"ResNet-50 (hand-written, v1.5 bottlenecks {list(layers)}), {image}x{image}, batch {batch_size}")


MODELS: dict[str, Callable[..., ModelSpec]] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "many_tensors": _many_tensors,
    "few_tensors": _few_tensors,
    "gpt": _gpt,
    "resnet50": _resnet50,
}
CPU_MODELS = ("mlp", "cnn", "many_tensors", "few_tensors")
CUDA_MODELS = ("gpt", "resnet50")


def build_model(name: str, **kwargs) -> ModelSpec:
    """Build the named model (see module docstring); kwargs override its sizes."""
    try:
        builder = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    return builder(**kwargs)
