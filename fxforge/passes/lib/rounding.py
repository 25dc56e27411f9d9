"""AdaRound's rounding optimisation (passes/adaround.py, whose docstring holds the loss and the math): the float and
quantized graphs run in lockstep over the calibration data; at each layer to round, the second moments of its input
patches on both sides give F and B, Adam learns V on Σ_g ‖Ŵ_g F_g‖² − 2 tr(Ŵ_g B_g) + λ·regulariser, and the chosen
weight is written back on its grid before the run goes on with the rounded layer's output."""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.compiler.graph import get_tensor, set_tensor
from fxforge.compiler.ops import LINEAR, argument, call_with, data, is_op, q_params, value_of, weight_of

from .qdq import Lockstep

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1)


def patches(node: fx.Node, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input columns the layer multiplies its weight with, (g, K, n): K = C_in/g · kh · kw, n = positions."""
    if is_op(node, *LINEAR):
        return x.reshape(1, -1, x.shape[-1]).transpose(1, 2)
    stride, padding, dilation, groups = (argument(node, k) for k in ("stride", "padding", "dilation", "groups"))
    cols = torch.nn.functional.unfold(x, weight.shape[2:], dilation=dilation, padding=padding, stride=stride)
    return cols.reshape(x.shape[0], groups, -1, cols.shape[-1]).permute(1, 2, 0, 3).reshape(
        groups, cols.shape[1] // groups, -1)


class Rounding(Lockstep):
    """At each layer to round (the float and quantized graphs in lockstep, :class:`Lockstep`) it measures F and B on
    both sides' inputs, learns the rounding (``iterations`` Adam steps at ``lr``, the regulariser weighted by ``reg``
    after the ``warmup`` share of them), writes it back, and goes on with the rounded layer's output. It counts the
    weights ``flipped`` off their nearest value, the output ``error`` against ``nearest`` rounding's, and the layers
    left at nearest rounding for ``few`` samples."""

    def __init__(self, gm: fx.GraphModule, layers: set[fx.Node], batches: int, *, iterations: int, lr: float,
                 reg: float, warmup: float) -> None:
        super().__init__(gm, batches)
        self.layers, self.iterations, self.lr, self.reg, self.warmup = layers, iterations, lr, reg, warmup
        self.flipped, self.error, self.nearest, self.few = 0, 0.0, 0.0, 0

    def step(self, n: fx.Node, fp_inputs: list, q_inputs: list) -> tuple[list, list]:
        if n not in self.layers:
            return super().step(n, fp_inputs, q_inputs)
        weight = self.round(n, q_inputs, fp_inputs)
        return self.float_side(n, fp_inputs), [call_with(n, a, k, weight=weight) for a, k in q_inputs]

    def round(self, n: fx.Node, q_inputs: list, fp_inputs: list) -> torch.Tensor:
        gm, q = self.module, data(weight_of(n))
        weight = get_tensor(gm, data(q)).detach().float()
        p = q_params(q)
        per_row = (-1, *[1] * (weight.dim() - 1))
        scale, zero = (torch.as_tensor(get_tensor(gm, t) if isinstance(t, fx.Node) else t).double().reshape(-1)
                       for t in (p.scale, p.zero_point))
        a = c = d = count = 0
        for (qa, qk), (fa, fk) in zip(q_inputs, fp_inputs):
            xq = patches(n, value_of(n, qa, qk, "input").double(), weight)
            xf = patches(n, value_of(n, fa, fk, "input").double(), weight)
            a, c, d = a + xq @ xq.transpose(1, 2), c + xq @ xf.transpose(1, 2), d + xf @ xf.transpose(1, 2)
            count += xq.shape[2]
        s, z = scale.reshape(per_row), zero.reshape(per_row)
        nearest = s * (torch.clamp(torch.round(weight.double() / s) + z, p.quant_min, p.quant_max) - z)
        if count < a.shape[1]:  # fewer patches than unknowns: a rounding fitted to them would not generalise
            self.few += 1
            return nearest.float()  # what the graph's quantizer makes of the float weight, left as it is
        a, c, d = a / count, c / count, d / count
        w = weight.double().reshape(a.shape[0], -1, a.shape[1])          # (g, C_out/g, K)
        cross = c @ w.transpose(1, 2)                                     # B = E[x̂ xᵀ] Wᵀ
        values, vectors = torch.linalg.eigh(a)                           # F = U √Λ over the non-zero part
        keep = values.gt(1e-12 * values.amax().clamp(min=1e-30)).any(0)
        factor = vectors[..., keep] * values[:, keep].clamp(min=0).sqrt()[:, None, :]
        grid = (scale.float(), zero.float(), p.quant_min, p.quant_max)
        chosen = self.learn(weight, grid, factor.float(), cross.float())

        def error(wq: torch.Tensor) -> float:  # E‖Ŵ x̂ − W x‖² on the calibration data
            wq = wq.double().reshape(w.shape)
            return float((wq @ a * wq).sum() - 2 * (wq * cross.transpose(1, 2)).sum() + (w @ d * w).sum())

        self.error += error(chosen)
        self.nearest += error(nearest)
        self.flipped += int((chosen.double() - nearest).abs().gt(0.5 * s).sum())
        set_tensor(gm, data(q), chosen.float())
        return chosen.float()

    def learn(self, weight: torch.Tensor, grid: tuple, factor: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """The rounded weight (on the grid) minimising Σ_g ‖Ŵ_g F_g‖² − 2 tr(Ŵ_g B_g) + λ·regulariser.
        ``weight`` (C_out, …), ``factor`` F (g, K, r), ``cross`` B (g, K, C_out/g)."""
        scale, zero, qmin, qmax = grid
        shape = (factor.shape[0], -1, factor.shape[1])
        w = weight.reshape(shape)
        scale, zero = (t.reshape(-1, 1).expand(weight.shape[0], 1).reshape(*shape[:2], 1) for t in (scale, zero))
        base = torch.floor(w / scale)
        rest = (w / scale - base).clamp(1e-4, 1 - 1e-4)
        v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_()

        def rounded(h: torch.Tensor) -> torch.Tensor:
            return scale * (torch.clamp(base + zero + h, qmin, qmax) - zero)

        def h_of(v: torch.Tensor) -> torch.Tensor:
            return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

        optimizer = torch.optim.Adam([v], lr=self.lr)
        start = int(self.warmup * self.iterations)
        with torch.enable_grad():
            for step in range(self.iterations):
                wq = rounded(h_of(v))
                loss = (wq @ factor).square().sum() - 2 * (wq * cross.transpose(1, 2)).sum()
                if step >= start:
                    beta = 20 + (2 - 20) * (step - start) / max(self.iterations - start - 1, 1)
                    loss = loss + self.reg * (1 - (2 * h_of(v) - 1).abs().pow(beta)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return rounded((v.detach() >= 0).float()).reshape(weight.shape)
