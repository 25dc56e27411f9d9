"""RemovableChannels: which channel ids dead_channels may cut, and why the others stay; it changes nothing."""
import pytest
import torch
from torch import nn

import fxforge
from fxforge.compiler.pass_manager import PassContext
from fxforge.passes.analysis import ChannelGroups, RemovableChannels


class TwoConvs(nn.Module):
    """c1 (3 → 8, padded 3×3) → relu? → c2 (8 → 6, 3×3 with padding ``pad``)."""

    def __init__(self, pad: int, relu: bool) -> None:
        super().__init__()
        self.c1, self.c2, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 6, 3, padding=pad), relu

    def forward(self, x):
        y = self.c1(x)
        return self.c2(torch.relu(y) if self.relu else y)


def _removable(bias: float, pad: int, relu: bool):
    """The analysis on TwoConvs whose c1 channel 2 is the constant ``bias``; also c1's channel ids."""
    model = TwoConvs(pad, relu).eval()
    with torch.no_grad():
        model.c1.weight[2] = 0
        model.c1.bias[2] = bias
    x = torch.randn(2, 3, 8, 8)
    gm, _ = fxforge.trace(model, (x,))
    before = gm.code
    ctx = PassContext(example_inputs=(x,))
    found = ctx.analysis(RemovableChannels, gm)
    c1 = next(n for n in gm.graph.nodes if n.name == "conv2d")
    assert gm.code == before  # pure
    return found, ctx.analysis(ChannelGroups, gm).map(c1).ids.flatten().tolist()


@pytest.mark.parametrize("bias, pad, relu, reason", [
    (2.0, 0, False, None),                # a constant read without padding: folds into c2's bias
    (-1.0, 1, True, None),                # relu makes it 0: no border effect
    (2.0, 1, True, "padding_border"),     # a constant 2 under zero padding is not constant at the border
])
def test_a_constant_channel_is_removable_unless_padding_sees_its_border(bias, pad, relu, reason):
    found, c1_ids = _removable(bias, pad, relu)
    assert found.skipped.pop("skipped.unprunable.model_output") == 6  # c2's output channels are the model's
    if reason is None:
        assert found.ids == [c1_ids[2]] and found.groups == 1 and not found.skipped
    else:
        assert found.ids == [] and found.groups == 0 and found.skipped == {f"skipped.{reason}": 1}


def test_varying_channels_are_neither_removable_nor_counted():
    """Live channels stay without a skip reason (only a group that is constant yet blocked is counted)."""
    found, _ = _removable(2.0, 1, True)
    assert set(found.skipped) == {"skipped.padding_border", "skipped.unprunable.model_output"}
