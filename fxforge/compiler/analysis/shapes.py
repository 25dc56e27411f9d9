"""Concrete shapes and dtypes of every node, from one run on the example inputs.

export's symbolic ``meta["val"]`` covers the traced nodes only; passes add nodes without it. Running the
graph once on the example inputs gives every node a concrete shape, which is what FLOPs counting and the
structural passes need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .base import Analysis

if TYPE_CHECKING:
    from ..pass_manager import PassContext


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.info: dict[str, TensorInfo] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.info[n.name] = TensorInfo(tuple(out.shape), out.dtype)
        return out


class Shapes(Analysis):
    """node name → TensorInfo for every tensor-valued node."""

    name = "shapes"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, TensorInfo]:
        rec = _Recorder(gm)
        with torch.no_grad():
            rec.run(*ctx.example_inputs)
        return rec.info
