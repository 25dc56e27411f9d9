"""The eager backend: the optimized GraphModule itself, run by PyTorch; saved as a torch.export program.

Fusion groups tagged by ``fuse_activation`` are realized here as in-place activations (the activation
writes into the producer's buffer, saving one allocation and one pass over memory per group).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.errors import ArtifactError, first_line
from fxforge.compiler.graph import fusion_groups, inplace_variant, views_as_reshapes
from fxforge.compiler.ops import graph_outputs, set_graph_outputs
from fxforge.compiler.target import Target
from fxforge.compiler.trace import EXPORT_LOCK, SYMBOLIC_SCALARS, Signature, batch_dynamic

from .base import Artifact, Backend, register_backend

PROGRAM = "program.pt2"


class EagerArtifact(Artifact):
    backend = "eager"
    portable = True
    files = (PROGRAM,)

    def __init__(self, gm: fx.GraphModule, signature: Signature, target: Target,
                 info: dict[str, Any] | None = None) -> None:
        super().__init__(signature, target, info)
        self.gm = gm

    def run(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        with torch.inference_mode():
            return self.gm(*inputs)

    def write(self, directory: Path) -> None:
        example = tuple(_example(s) for s in self.signature.inputs)
        example, dynamic = batch_dynamic(example, self.signature.batched(), max_batch=None)
        with EXPORT_LOCK:
            try:
                ep = torch.export.export(_for_export(self.gm), example, dynamic_shapes=dynamic, strict=False)
            except Exception as e:  # the artifact runs; only its program could not be captured again
                raise ArtifactError(f"cannot save the eager artifact: re-exporting its graph failed: "
                                    f"{type(e).__name__}: {first_line(e)}") from None
            torch.export.save(ep, directory / PROGRAM)

    @classmethod
    def read(cls, directory: Path, signature: Signature, target: Target, info: dict[str, Any]) -> EagerArtifact:
        with EXPORT_LOCK:
            program = torch.export.load(directory / PROGRAM).module()
        return cls(program, signature, target, info)


def _for_export(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` as the program saved: its views reshapes (``views_as_reshapes``: the re-export of a T5
    encoder failed on one), and each number computed from the inputs' sizes (``x.shape[0] > 3``) returned as a 0-d
    tensor, since torch.export cannot save a symbolic bool output (``Signature.unflatten`` turns it back)."""
    dtypes = {sym: {"int": torch.int64, "float": torch.float64, "bool": torch.bool}[kind]
              for sym, kind in SYMBOLIC_SCALARS.items()}
    gm = copy.deepcopy(gm)
    views_as_reshapes(gm.graph)
    output = gm.graph.output_node()
    outputs = graph_outputs(gm.graph)
    for i, o in enumerate(outputs):
        if isinstance(o, fx.Node) and type(o.meta.get("val")) in dtypes:
            with gm.graph.inserting_before(output):
                outputs[i] = gm.graph.call_function(torch.ops.aten.scalar_tensor.default, (o,),
                                                    {"dtype": dtypes[type(o.meta["val"])]})
    set_graph_outputs(gm.graph, outputs)
    gm.recompile()
    return gm


def _example(spec) -> torch.Tensor:
    shape = [2 if d is None else d for d in spec.shape]
    return torch.zeros(shape, dtype=spec.dtype)


@register_backend
class EagerBackend(Backend):
    """Runs the optimized graph in PyTorch (the reference every other backend is compared with)."""

    name = "eager"
    artifact = EagerArtifact
    cpu_only = True  # the graph's tensors stay on the CPU (a program for PyTorch on x86 or arm64)
    pytorch_kernels = True

    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
              target: Target, **options: Any) -> EagerArtifact:
        self.check_options(options)
        gm = copy.deepcopy(gm)
        fused = 0
        for nodes in fusion_groups(gm).values():
            act = nodes[-1]
            inplace = inplace_variant(act)
            if inplace is not None:
                act.target = inplace
                fused += 1
        gm.recompile()
        return EagerArtifact(gm, signature, target, {"fused_groups": fused})
