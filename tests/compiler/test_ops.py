"""compiler/ops.py: arguments read and written by schema name, op families spanning an op's ATen forms."""
import torch
from torch import nn
from torch.nn import functional as F

from fxforge.compiler import ops
from graphs import traced


def _calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def test_arguments_by_name_positional_keyword_or_default():
    conv, = _calls(traced(nn.Conv2d(4, 4, 3, groups=2, bias=False), torch.randn(2, 4, 6, 6)))
    assert ops.conv_groups(conv) == 2 and ops.bias_of(conv) is None
    assert ops.conv_geometry(conv) == ([1, 1], [0, 0], [1, 1])  # schema defaults filled in
    ops.set_argument(conv, "groups", 4)
    assert ops.conv_groups(conv) == 4 and len(conv.args) == 7  # padded with the defaults
    linear, = _calls(traced(nn.Linear(3, 2), torch.randn(2, 3)))
    assert ops.conv_groups(linear) == 1 and ops.conv_geometry(linear) == ()
    assert ops.argument(linear, "groups", None) is None  # an argument this overload lacks


def test_clamp_family_spans_the_relu6_forms():
    for act in (F.relu6, nn.ReLU6(), nn.Hardtanh(0.0, 6.0)):
        node = _calls(traced(nn.Sequential(nn.Linear(3, 3), act) if isinstance(act, nn.Module)
                             else _Fn(act), torch.randn(2, 3)))[-1]
        assert ops.is_op(node, *ops.CLAMP) and ops.clamp_range(node) == (0.0, 6.0)


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def test_q_params_and_bn_params():
    qd = ops.qd
    x = torch.randn(2, 3)
    q, dq = _calls(traced(_Fn(lambda t: qd.dequantize_per_tensor(qd.quantize_per_tensor(t, 0.1, 3, 0, 255, torch.uint8),
                                                                   0.1, 3, 0, 255, torch.uint8)), x))
    grid = ops.q_params(q)
    assert grid == ops.QParams(0.1, 3, 0, 255, torch.uint8) and ops.q_params(dq).args() == (0.1, 3, 0, 255, torch.uint8)
    ops.set_q_scale(q, 0.2, 5)
    assert ops.q_params(q).args()[:2] == (0.2, 5)
    bn = next(n for n in _calls(traced(nn.BatchNorm2d(3).eval(), torch.randn(2, 3, 4, 4)))
              if ops.is_op(n, *ops.BATCH_NORM))
    p = ops.bn_params(bn)
    assert not p.training and p.eps == 1e-5 and all(t.op == "get_attr" for t in p.tensors())


def test_no_positional_aten_argument_index_outside_ops():
    """ATen arguments are read through compiler/ops.py's named accessors, never as ``node.args[i]`` elsewhere
    (an output node's ``args[0]``, the tuple of graph outputs, is torch.fx structure and allowed; so is a relax
    ``call.args[0]`` in the TVM lowering, which is TVM IR)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "fxforge"
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}"
             for p in root.rglob("*.py") if p.name != "ops.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\.args\[\d", line) and "output" not in line and "call.args" not in line]
    assert found == []
