"""Hardware targets: what each backend needs to generate code for a machine.

A Target maps one name (``x86``, ``arm64``, ``cuda``) to a TVM 0.27 target dict (the JSON form is the only
one TVM 0.27 accepts), a cross compiler where the code runs elsewhere, and ONNX Runtime execution providers.
Users register their own with :func:`register_target`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import TargetError

HOST_CPU = "native"  # placeholder in a TVM dict: replaced by the CPU LLVM detects on this machine


@dataclass(frozen=True)
class Target:
    """A code-generation target. ``tvm`` is a TVM target dict; ``tvm_host`` the host part for devices."""

    name: str
    description: str
    tvm: Mapping[str, Any]
    tvm_host: Mapping[str, Any] | None = None
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    torch_device: str = "cpu"
    cross_compiler: str | None = None  # C++ driver that links shared libraries for this target
    runs_on_host: bool = True  # False: code is built here but must run on another machine

    def with_tvm(self, **fields: Any) -> Target:
        """A copy with TVM target fields replaced, e.g. ``get_target("cuda").with_tvm(arch="sm_90")``."""
        return dataclasses.replace(self, tvm={**self.tvm, **fields})

    def tvm_dict(self) -> dict[str, Any]:
        """The TVM target dict with host-dependent fields resolved."""
        return _resolve(self.tvm)

    def tvm_host_dict(self) -> dict[str, Any] | None:
        return _resolve(self.tvm_host) if self.tvm_host is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tvm": dict(self.tvm), "tvm_host": dict(self.tvm_host or {}) or None,
                "ort_providers": list(self.ort_providers), "torch_device": self.torch_device}


@functools.cache
def host_cpu() -> str:
    """The CPU name LLVM (through TVM) detects here, e.g. ``znver3``; ``generic`` without TVM."""
    try:
        from tvm.target import codegen
    except ImportError:
        return "generic"
    return str(codegen.llvm_get_system_cpu())


def _resolve(spec: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(spec)
    if out.get("mcpu") == HOST_CPU:
        out["mcpu"] = host_cpu()
    return out


_TARGETS: dict[str, Target] = {}


def register_target(target: Target, *, replace: bool = False) -> Target:
    """Add a target to the registry (``fxforge targets`` lists it)."""
    if target.name in _TARGETS and not replace:
        raise TargetError(f"target {target.name!r} is already registered")
    _TARGETS[target.name] = target
    return target


def available_targets() -> dict[str, Target]:
    return dict(_TARGETS)


def get_target(target: str | Target) -> Target:
    """Look a target up by name; a Target passes through."""
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target not in _TARGETS:
        raise TargetError(f"unknown target {target!r}; valid targets: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[target]


register_target(Target(
    "x86", "this machine's x86-64 CPU (LLVM, host CPU detected)",
    tvm={"kind": "llvm", "mcpu": HOST_CPU, "num-cores": os.cpu_count() or 1},
))
register_target(Target(
    "arm64", "AArch64 CPU with NEON (Cortex-A72/A76 class boards); cross-compiled here",
    tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    cross_compiler="aarch64-linux-gnu-g++", runs_on_host=False,
))
register_target(Target(
    "cuda", "NVIDIA GPU (CUDA, default arch sm_80)",
    tvm={"kind": "cuda", "arch": "sm_80"}, tvm_host={"kind": "llvm"},
    ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), torch_device="cuda", runs_on_host=False,
))
