"""The report's FLOPs against PyTorch's own counter (torch.utils.flop_counter) run on the eager model."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxforge


class Einsum(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 24))

    def forward(self, x):
        return torch.einsum("bij,jk->bik", x, self.w)


class Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = kind(8, 16, num_layers=2, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class Attention(nn.Module):
    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v)


CASES = {
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1, groups=2), (2, 8, 8, 8)),
    "conv_transpose1d": (lambda: nn.ConvTranspose1d(4, 8, 3, stride=2), (2, 4, 7)),
    "conv2d_dilated_grouped": (lambda: nn.Conv2d(8, 16, 3, stride=2, dilation=2, groups=4), (3, 8, 17, 17)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3), (2, 2, 6, 6, 6)),
    "linear_3d_input": (lambda: nn.Linear(12, 7), (2, 5, 12)),
    "einsum": (Einsum, (2, 5, 16)),
}


@pytest.mark.parametrize("name", CASES)
def test_flops_are_what_pytorchs_counter_counts(name):
    """A ConvTranspose decoder, an einsum or an LSTM counted 0 FLOPs: the hand-written formulas knew conv, linear and
    matmul alone. Each node is now counted by torch.utils.flop_counter, on meta tensors of its inputs' shapes."""
    make, shape = CASES[name]
    model, x = make().eval(), torch.randn(shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    cm = fxforge.compile(model, (x,), verify="off")
    assert cm.report.row("input").flops == counter.get_total_flops() > 0


@pytest.mark.parametrize("kind, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_layers_count_their_gate_products(kind, gates):
    """Eager CPU runs a recurrent layer as one fused kernel that PyTorch's counter does not see; the graph's node,
    run on meta tensors, dispatches to its products: per layer, step and sample, gates × hidden × (input + hidden)
    multiply-accumulates."""
    model, x = Recurrent(kind).eval(), torch.randn(2, 5, 8)
    cm = fxforge.compile(model, (x,), verify="off")
    assert cm.report.row("input").flops == sum(2 * 2 * 5 * gates * 16 * (inputs + 16) for inputs in (8, 16))


class Cells(nn.Module):
    """A recurrent cell unrolled over the steps of its input."""

    def __init__(self, kind):
        super().__init__()
        self.cell = kind(8, 10)

    def forward(self, x):
        h = x.new_zeros(x.shape[0], 10)
        state = (h, h) if isinstance(self.cell, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return state[0] if isinstance(state, tuple) else state


@pytest.mark.parametrize("kind, gates", [(nn.LSTMCell, 4), (nn.GRUCell, 3), (nn.RNNCell, 1)])
def test_recurrent_cells_count_their_gate_products(kind, gates):
    """Before: an unrolled LSTMCell/GRUCell/RNNCell counted 0 (its lstm_cell, gru_cell, rnn_tanh_cell nodes were not
    counted; a differential run over sequence models). Per step and sample, gates × hidden × (input + hidden)."""
    cm = fxforge.compile(Cells(kind).eval(), (torch.randn(2, 6, 8),), verify="off")
    assert cm.report.row("input").flops == 2 * 2 * 6 * gates * 10 * (8 + 10)


def test_attention_flops():
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 16)
    cm = fxforge.compile(Attention(), (q, k, v), verify="off")
    assert cm.report.row("input").flops == 2 * 2 * 4 * 6 * 10 * (8 + 16)


def test_int8_dynamic_keeps_the_flops_of_the_linears_it_quantizes():
    """A linear with int8 weights (fxforge::dynamic_linear) counted 0: the report's FLOPs and fxforge bench's GFLOP/s
    fell to those of the float ops left."""
    model, x = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval(), torch.randn(4, 16, 64)
    cm = fxforge.compile(model, (x,), passes=["int8_dynamic"], calibration=[(torch.randn(4, 16, 64),)], verify="off")
    assert cm.report.final.flops == cm.report.row("input").flops == 2 * 4 * 16 * (64 * 128 + 128 * 64)
