"""Concrete shapes and dtypes of every node, from one run on the example inputs.

export's symbolic ``meta["val"]`` covers the traced nodes only; passes add nodes without it. Running the
graph once on the example inputs (torch.fx's ``ShapeProp``, which also refreshes every node's
``meta["tensor_meta"]``) gives every node a concrete shape, which is what FLOPs counting and the structural
passes need.

A run that recorded every node's output on inputs of the example's shapes gives the same facts
(:meth:`Shapes.from_values`): the numeric check runs each changed stage on fresh inputs like the example anyway, and
hands the result to the analysis cache, so the report's FLOPs do not run the graph a second time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

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

    @staticmethod
    def from_values(values: Mapping[str, Any]) -> dict[str, TensorInfo]:
        """What :meth:`run` returns, from node name → output of a run of the graph on inputs with the example's
        shapes and dtypes (every node whose output is a tensor; other outputs are skipped, as ShapeProp's are)."""
        return {name: TensorInfo(tuple(v.shape), v.dtype) for name, v in values.items() if isinstance(v, torch.Tensor)}
