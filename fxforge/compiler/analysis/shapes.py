"""Concrete shapes and dtypes of every node, from one run on the example inputs.

export's symbolic ``meta["val"]`` covers the traced nodes only; passes add nodes without it. Running the
graph once on the example inputs (torch.fx's ``ShapeProp``, which also refreshes every node's
``meta["tensor_meta"]``) gives every node a concrete shape, which is what FLOPs counting and the structural
passes need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .base import Analysis

if TYPE_CHECKING:
    from ..pass_manager import PassContext


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class Shapes(Analysis):
    """node name → TensorInfo for every tensor-valued node."""

    name = "shapes"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, TensorInfo]:
        with torch.no_grad():
            ShapeProp(gm).propagate(*ctx.example_inputs)
        return {n.name: TensorInfo(tuple(meta.shape), meta.dtype) for n in gm.graph.nodes
                if isinstance(meta := n.meta.get("tensor_meta"), TensorMetadata)}
