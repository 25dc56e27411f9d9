"""Hypothesis strategies for random, valid, tiny models: CNNs, MLPs and transformer blocks.

A strategy draws a *spec*: plain, hashable data (layer kinds, shapes, options and a weight seed).
``build(spec)`` turns it into an eval-mode ``nn.Module`` with random weights, random BN statistics, some
zeroed output channels and BN gammas (so dead/constant channels exist), and its example inputs. Because a
spec is hashable, a test can cache the trace of each generated model across the passes it checks.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh",
               "leaky_relu", "hardsigmoid")
MAX_CHANNELS = 12


@dataclass(frozen=True)
class Spec:
    """A generated model: ``kind`` is cnn, mlp or transformer; ``layers`` are tuples built by the strategies."""

    kind: str
    seed: int
    batch: int
    input_shape: tuple[int, ...]  # without the batch dimension
    layers: tuple[tuple[Any, ...], ...]
    zero_fraction: float  # share of output channels / BN gammas set to zero


def activation(name: str) -> nn.Module:
    return {"none": nn.Identity, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "gelu": nn.GELU,
            "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU, "sigmoid": nn.Sigmoid,
            "tanh": nn.Tanh, "leaky_relu": lambda: nn.LeakyReLU(0.1), "hardsigmoid": nn.Hardsigmoid}[name]()


# ------------------------------------------------------------------------------------------------ strategies

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


@st.composite
def _conv(draw, c_in: int, size: tuple[int, int], *, keep_size: bool = False, keep_channels: bool = False) -> tuple:
    """('conv', c_out, k, stride, pad, dilation, groups, bias, bn, act): dense, grouped or depthwise;
    strided and dilated unless ``keep_size``; ``c_out == c_in`` if ``keep_channels``."""
    style = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = {"dense": 1, "depthwise": c_in}.get(style) or draw(st.sampled_from(_divisors(c_in)))
    c_out = c_in if keep_channels else groups * draw(st.integers(1, max(1, MAX_CHANNELS // groups)))
    k = draw(st.sampled_from([1, 3] if keep_size else [1, 2, 3]))
    dil = draw(st.sampled_from([1, 2])) if k > 1 else 1
    stride = 1 if keep_size else draw(st.sampled_from([1, 1, 2]))
    pad = dil * (k - 1) // 2 if keep_size else draw(st.sampled_from([0, dil * (k - 1) // 2]))
    if min(_out_size(s, k, stride, pad, dil) for s in size) < 1:
        k, dil, pad = 1, 1, 0
    return ("conv", c_out, k, stride, pad, dil, groups, draw(st.booleans()), draw(st.booleans()),
            draw(st.sampled_from(ACTIVATIONS)))


def _conv_out(layer: tuple, size: tuple[int, int]) -> tuple[int, int]:
    _, _, k, stride, pad, dil, *_ = layer
    return tuple(_out_size(s, k, stride, pad, dil) for s in size)  # type: ignore[return-value]


@st.composite
def cnns(draw) -> Spec:
    """conv/BN/activation stacks with residual adds, channel concats and pooling, then a pooled or flat head."""
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(3, 10)), draw(st.integers(3, 10))
    shape, size = (c, h, w), (h, w)
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "residual", "concat", "pool"]))
        if kind == "pool" and min(size) >= 2:
            pool = draw(st.sampled_from(["max", "avg"]))
            layers.append(("pool", pool, 2))
            size = tuple(s // 2 for s in size)
        elif kind == "residual":
            body = draw(_conv(c, size, keep_size=True, keep_channels=True))
            layers.append(("residual", body, draw(st.sampled_from(ACTIVATIONS))))
        elif kind == "concat":
            a, b = draw(_conv(c, size, keep_size=True)), draw(_conv(c, size, keep_size=True))
            layers.append(("concat", a, b))
            c = a[1] + b[1]
        else:
            conv = draw(_conv(c, size))
            layers.append(conv)
            c, size = conv[1], _conv_out(conv, size)
    head = draw(st.sampled_from(["adaptive_avg", "adaptive_max", "mean", "flatten"]))
    hidden = draw(st.sampled_from([0, 0, 6]))
    layers.append(("head", head, c * (size[0] * size[1] if head == "flatten" else 1), hidden,
                   draw(st.sampled_from(ACTIVATIONS)), draw(st.integers(1, 5))))
    return Spec("cnn", draw(st.integers(0, 2**16)), draw(st.integers(1, 3)), shape, tuple(layers),
                draw(st.sampled_from([0.0, 0.25, 0.5])))


@st.composite
def mlps(draw) -> Spec:
    """linear (± bias) → BatchNorm1d? → activation → dropout?, residual where the width is kept."""
    width = draw(st.integers(1, 16))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        out = draw(st.sampled_from([width, draw(st.integers(1, 16))]))
        layers.append(("linear", width, out, draw(st.booleans()), draw(st.booleans()),
                       draw(st.sampled_from(ACTIVATIONS)), draw(st.booleans()), out == width and draw(st.booleans())))
        width = out
    return Spec("mlp", draw(st.integers(0, 2**16)), draw(st.integers(1, 3)), (layers[0][1],), tuple(layers),
                draw(st.sampled_from([0.0, 0.25, 0.5])))


@st.composite
def transformers(draw) -> Spec:
    """pre-norm blocks: x + attention(LN(x)), x + MLP(LN(x)); nn.MultiheadAttention or hand-written."""
    heads = draw(st.sampled_from([1, 2, 4]))
    dim = heads * draw(st.sampled_from([2, 4]))
    layers = tuple(("block", draw(st.sampled_from(["mha", "manual"])), heads, draw(st.sampled_from([1, 2])),
                    draw(st.sampled_from(["gelu", "relu", "silu"]))) for _ in range(draw(st.integers(1, 2))))
    head = ("pool_head", draw(st.integers(1, 4))) if draw(st.booleans()) else ("norm_head",)
    return Spec("transformer", draw(st.integers(0, 2**16)), draw(st.integers(1, 3)),
                (draw(st.integers(2, 6)), dim), layers + (head,), draw(st.sampled_from([0.0, 0.25])))


def models() -> st.SearchStrategy[Spec]:
    """Any generated model; CNNs, where the passes have the most to do, are drawn twice as often."""
    return st.one_of(cnns(), mlps(), cnns(), transformers())


# ------------------------------------------------------------------------------------------------- modules

class ConvBlock(nn.Module):
    def __init__(self, c_in: int, layer: tuple) -> None:
        super().__init__()
        _, c_out, k, stride, pad, dil, groups, bias, bn, act = layer
        self.conv = nn.Conv2d(c_in, c_out, k, stride, pad, dil, groups, bias=bias)
        self.bn = nn.BatchNorm2d(c_out) if bn else nn.Identity()
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c: int, layer: tuple) -> None:
        super().__init__()
        self.body, self.act = ConvBlock(c, layer[1]), activation(layer[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


class Concat(nn.Module):
    def __init__(self, c: int, layer: tuple) -> None:
        super().__init__()
        self.a, self.b = ConvBlock(c, layer[1]), ConvBlock(c, layer[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


class Head(nn.Module):
    def __init__(self, layer: tuple) -> None:
        super().__init__()
        _, self.kind, features, hidden, act, classes = layer
        self.pool = {"adaptive_avg": nn.AdaptiveAvgPool2d(1), "adaptive_max": nn.AdaptiveMaxPool2d(1)}.get(
            self.kind, nn.Identity())
        fc = [nn.Linear(features, hidden), activation(act), nn.Linear(hidden, classes)] if hidden else \
            [nn.Linear(features, classes)]
        self.fc = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean((2, 3)) if self.kind == "mean" else torch.flatten(self.pool(x), 1)
        return self.fc(x)


class LinearBlock(nn.Module):
    def __init__(self, layer: tuple) -> None:
        super().__init__()
        _, n_in, n_out, bias, bn, act, dropout, self.residual = layer
        self.fc = nn.Linear(n_in, n_out, bias=bias)
        self.bn = nn.BatchNorm1d(n_out) if bn else nn.Identity()
        self.act, self.drop = activation(act), nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.act(self.bn(self.fc(x))))
        return y + x if self.residual else y


class ManualAttention(nn.Module):
    """Scaled dot-product attention written out: qkv projection, softmax(q kᵀ/√d) v, output projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, layer: tuple) -> None:
        super().__init__()
        _, attention, heads, mult, act = layer
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True) if attention == "mha" else \
            ManualAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, mult * dim), activation(act), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        y = self.attn(y, y, y, need_weights=False)[0] if isinstance(self.attn, nn.MultiheadAttention) else self.attn(y)
        x = x + y
        return x + self.mlp(self.ln2(x))


class TokenHead(nn.Module):
    def __init__(self, dim: int, layer: tuple) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, layer[1]) if layer[0] == "pool_head" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return self.fc(x.mean(1)) if self.fc is not None else x


def build(spec: Spec) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The eval-mode model a spec describes, with randomized weights, and its example inputs."""
    torch.manual_seed(spec.seed)
    mods: list[nn.Module] = []
    if spec.kind == "cnn":
        c = spec.input_shape[0]
        for layer in spec.layers:
            if layer[0] == "conv":
                mods.append(ConvBlock(c, layer))
                c = layer[1]
            elif layer[0] == "residual":
                mods.append(Residual(c, layer))
            elif layer[0] == "concat":
                mods.append(Concat(c, layer))
                c = layer[1][1] + layer[2][1]
            elif layer[0] == "pool":
                mods.append(nn.MaxPool2d(layer[2]) if layer[1] == "max" else nn.AvgPool2d(layer[2]))
            else:
                mods.append(Head(layer))
    elif spec.kind == "mlp":
        mods = [LinearBlock(layer) for layer in spec.layers]
    else:
        dim = spec.input_shape[1]
        mods = [Block(dim, layer) if layer[0] == "block" else TokenHead(dim, layer) for layer in spec.layers]
    model = nn.Sequential(*mods).eval()
    _randomize(model, spec)
    g = torch.Generator().manual_seed(spec.seed + 1)
    return model, (torch.randn(spec.batch, *spec.input_shape, generator=g),)


def calibration(spec: Spec, batches: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches for a spec's model: fresh normal inputs shaped like its example."""
    g = torch.Generator().manual_seed(spec.seed + 2)
    return [(torch.randn(spec.batch, *spec.input_shape, generator=g),) for _ in range(batches)]


@torch.no_grad()
def _randomize(model: nn.Module, spec: Spec) -> None:
    """Random BN statistics and affine terms; zero a share of conv/linear output channels and BN gammas."""
    g = torch.Generator().manual_seed(spec.seed + 3)

    def some(n: int) -> torch.Tensor:
        return torch.rand(n, generator=g) < spec.zero_fraction

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            rows = some(m.weight.shape[0])
            m.weight[rows] = 0
            if m.bias is not None:
                m.bias[rows] = 0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.3)
            m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            m.weight[some(m.weight.numel())] = 0
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        elif isinstance(m, nn.LayerNorm):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.5 + 1)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------- what is checked

def pipelines() -> dict[str, tuple[str, ...]]:
    """Every registered pass, preceded by the passes it must follow, and every preset, by name.

    Read from the registry, so a new pass is covered without touching the tests. Passes that test files
    register (deliberately broken test doubles) are left out.
    """
    from fxforge.compiler.pass_manager import _PASSES, _PRESETS, available_passes

    out: dict[str, tuple[str, ...]] = {}
    for name in available_passes():
        if name in _PRESETS:
            out[name] = (name,)
        elif not _from_tests(_PASSES[name]):
            out[name] = _with_prerequisites(name, _PASSES)
    return out


def _with_prerequisites(name: str, registry: dict) -> tuple[str, ...]:
    order: list[str] = []
    for dep in registry[name].after:
        order += [p for p in _with_prerequisites(dep, registry) if p not in order]
    return (*order, name)


def _from_tests(cls: type) -> bool:
    import inspect
    from pathlib import Path
    try:
        return Path(__file__).parent.parent in Path(inspect.getsourcefile(cls) or "").resolve().parents
    except TypeError:
        return False


@functools.lru_cache(maxsize=None)
def _trace(spec: Spec) -> tuple[Any, tuple[torch.Tensor, ...]]:
    from fxforge.compiler.trace import trace
    model, example = build(spec)
    gm, signature = trace(model, example)
    return gm, tuple(signature.flatten(example))


def traced(spec: Spec) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """A fresh copy of the traced graph of ``spec``'s model and its flat example inputs (traced once per spec:
    the derandomized profile draws the same specs for every parametrization of a test)."""
    gm, flat = _trace(spec)
    return copy.deepcopy(gm), flat


def features(spec: Spec) -> list[str]:
    """What a generated model contains, for ``hypothesis.event`` (shown by --hypothesis-show-statistics)."""
    found = {spec.kind}
    convs = [c for layer in spec.layers for c in (layer, *layer[1:3]) if isinstance(c, tuple) and c[0] == "conv"]
    for _, c_out, k, stride, _, dil, groups, _, bn, _ in convs:
        flags = {"conv": True, "grouped conv": groups > 1, "strided conv": stride > 1, "dilated conv": dil > 1,
                 "BN": bn}
        found |= {name for name, on in flags.items() if on}
    found |= {layer[0] for layer in spec.layers if layer[0] in ("residual", "concat", "pool")}
    found |= {f"{layer[1]} attention" for layer in spec.layers if layer[0] == "block"}
    if spec.zero_fraction > 0:
        found.add("zeroed channels")
    return sorted(found)
