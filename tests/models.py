"""The model zoo the tests run on: randomly initialised real architectures, plus tiny hand-written nets
(the trained models and real data live in fxforge/zoo.py).

Every entry builds ``(model.eval(), example_inputs)``. CNNs use 64×64 inputs to keep the suite fast on 2
cores. ``FAST`` is the representative subset CI runs; the rest is marked slow.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

Entry = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


def _seeded(fn: Callable[[], nn.Module], *shape: int) -> Entry:
    def build():
        torch.manual_seed(0)
        model = fn().eval()
        _randomize_bn(model)
        return model, (torch.randn(*shape),)
    return build


def _randomize_bn(model: nn.Module) -> None:
    """Fresh BN layers are the identity; random statistics make BN folding actually do something."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _tv(name: str, **kw) -> Callable[[], nn.Module]:
    def make():
        import torchvision
        return getattr(torchvision.models, name)(**kw)
    return make


def _vit() -> nn.Module:
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=10)


class _Bert(nn.Module):
    """A small transformers BertModel returning its last hidden state (input_ids, attention_mask)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=64)
        self.bert = BertModel(cfg, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def bert() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = _Bert().eval()
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    return model, (ids, mask)


class ConvBnRelu(nn.Module):
    """The smallest CNN with every fusable pattern: conv-bn-relu, a residual add+relu, a linear head."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.GELU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ZOO: dict[str, Entry] = {
    "convbnrelu": _seeded(ConvBnRelu, 2, 3, 16, 16),
    "mlp": _seeded(Mlp, 4, 32),
    "resnet18": _seeded(_tv("resnet18"), 1, 3, 64, 64),
    "mobilenet_v2": _seeded(_tv("mobilenet_v2"), 1, 3, 64, 64),
    "resnet50": _seeded(_tv("resnet50"), 1, 3, 64, 64),
    "mobilenet_v3_small": _seeded(_tv("mobilenet_v3_small"), 1, 3, 64, 64),
    "efficientnet_b0": _seeded(_tv("efficientnet_b0"), 1, 3, 64, 64),
    "regnet_x_400mf": _seeded(_tv("regnet_x_400mf"), 1, 3, 64, 64),
    "densenet121": _seeded(_tv("densenet121"), 1, 3, 64, 64),
    "shufflenet_v2_x1_0": _seeded(_tv("shufflenet_v2_x1_0"), 1, 3, 64, 64),
    "vit_tiny": _seeded(_vit, 1, 3, 64, 64),
    "bert": bert,
}
FAST = ("convbnrelu", "mlp", "resnet18", "mobilenet_v2", "bert")  # CI's representative subset


def zoo_params():
    """pytest params over the zoo: the FAST subset always, the rest marked slow."""
    import pytest
    return [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in ZOO]


from fxforge.zoo import DigitsCnn, digits_cnn, digits_data  # noqa: E402,F401  (the trained zoo's home)


def accuracy(model: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on (x, y), in [0, 1]."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


@torch.library.custom_op("fxforge_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    """An op no backend knows: what a backend must name, with its node, when it cannot lower it."""
    return x * 2


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


class Mystery(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mystery(torch.relu(x)) + 1


# a module a test writes to a file and imports: a model returning a namedtuple defined there (its import path is
# the file's), for what happens where that module is reloaded or absent
NAMEDTUPLE_MODEL = """
import collections
import torch

Out = collections.namedtuple("Out", "logits probs")


class Model(torch.nn.Linear):
    def forward(self, x):
        y = super().forward(x)
        return Out(y, y.softmax(-1))
"""
