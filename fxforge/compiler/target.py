"""Hardware targets: what each backend needs to generate code for a machine.

A Target maps one name (``x86``, ``arm64``, ``cuda``) to a TVM 0.27 target dict (the JSON form is the only
one TVM 0.27 accepts), a cross compiler where the code runs elsewhere, ONNX Runtime execution providers, and
the instruction-set features the code may use. ``x86`` is the machine compiling (its CPU and features are
detected); the named variants ``x86-avx2``, ``x86-avx512``, ``x86-avx512-vnni`` and ``x86-amx`` cross-compile
for other x86 CPUs, ``arm64-dotprod`` for AArch64 cores with the dot-product extension. Users register their
own with :func:`register_target`.

The features decide the int8 weight grid. x86 CPUs without VNNI multiply uint8 activations by int8 weights
with ``vpmaddubsw``, which adds two products into a saturating int16: 255 · 127 · 2 > 32767, so 8-bit
weights overflow and quantizers keep them in 7 bits ([−64, 63], "reduce_range"). VNNI (``vpdpbusd``) and
AMX accumulate in int32, and AArch64 (NEON widening multiplies, ``sdot``/``udot``) never saturates: there
weights use all 8 bits.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import platform
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
    isa: frozenset[str] | None = None  # instruction-set features; None: this machine's (x86 only)

    def __post_init__(self) -> None:
        """A malformed TVM dict is a TargetError here, not a raw one at save."""
        if not isinstance(self.tvm, Mapping) or not all(isinstance(k, str) for k in self.tvm):
            raise TargetError(f"target {self.name!r}: tvm must be a dict of TVM target fields such as "
                              f"{{'kind': 'llvm', 'mcpu': 'cascadelake'}}, got {self.tvm!r}")

    def resolved(self) -> Target:
        """The target with the features of the code TVM builds for it: a TVM dict that names its machine
        (``mcpu``, ``mattr``, ``mtriple``) where ``isa`` is not given has LLVM's, and does not run here where this
        machine lacks one (a user's x86 target with ``mcpu="skylake-avx512"`` built AVX-512 code that the host
        check took for this machine's, and that died of an illegal instruction). Others as they are; without TVM
        too. Compile and ``register_target`` resolve the targets they are given (:func:`get_target`)."""
        if self.isa is not None or not _names_machine(self.tvm) or (isa := llvm_isa(self.tvm)) is None:
            return self
        return dataclasses.replace(self, isa=isa, runs_on_host=self.runs_on_host and isa <= host_features())

    def features(self) -> frozenset[str]:
        """The instruction-set features code for this target may use (``{"x86_64", "avx2", "vnni", …}``)."""
        if self.isa is not None:
            return self.isa
        host = host_features()
        return host if "x86_64" in host else frozenset({"x86_64"})

    def lacks(self) -> list[str]:
        """The x86 features code built for this target may use and this machine has not: an ``x86`` TVM library
        built on an AVX-512 machine would die of an illegal instruction on an AVX2 one."""
        features = self.features()
        return sorted(features - host_features()) if "x86_64" in features else []

    def saturates_u8s8(self) -> bool:
        """True where uint8 × int8 products go through a saturating int16 sum (x86 without VNNI or AMX)."""
        return saturates_u8s8(self.features())

    def with_tvm(self, **fields: Any) -> Target:
        """A copy with TVM target fields replaced, e.g. ``get_target("cuda").with_tvm(arch="sm_90")``. Fields
        that name another machine (``mcpu``, ``mattr``, ``mtriple``) take its features from LLVM, and whether
        this machine runs the code from them."""
        tvm = {**self.tvm, **fields}
        if tvm.get("kind") != "llvm" or not set(MACHINE_FIELDS) & fields.keys() or (isa := llvm_isa(tvm)) is None:
            return dataclasses.replace(self, tvm=tvm)
        return dataclasses.replace(self, tvm=tvm, isa=isa, runs_on_host=isa <= host_features())

    def tvm_dict(self) -> dict[str, Any]:
        """The TVM target dict with host-dependent fields resolved."""
        return _resolve(self.tvm)

    def tvm_host_dict(self) -> dict[str, Any] | None:
        return _resolve(self.tvm_host) if self.tvm_host is not None else None

    def to_dict(self) -> dict[str, Any]:
        """What an artifact records: the TVM dict resolved (``x86`` builds for this machine's CPU, and the record
        said "native", which a machine loading the artifact would read as its own) and the features code may use."""
        return {"name": self.name, "tvm": self.tvm_dict(), "tvm_host": self.tvm_host_dict(),
                "ort_providers": list(self.ort_providers), "torch_device": self.torch_device,
                "features": sorted(self.features())}


@functools.cache
def host_cpu() -> str:
    """The CPU name LLVM (through TVM) detects here, e.g. ``znver3``; ``generic`` without TVM."""
    try:
        from tvm.target import codegen
    except ImportError:
        return "generic"
    return str(codegen.llvm_get_system_cpu())


# /proc/cpuinfo flag → feature name (x86 "flags", AArch64 "Features")
_CPUINFO_FLAGS = {"avx2": "avx2", "avx512f": "avx512", "avx512_vnni": "vnni", "avx_vnni": "vnni", "amx_int8": "amx",
                  "asimd": "neon", "asimddp": "dotprod"}


@functools.cache
def host_features() -> frozenset[str]:
    """This machine's features: /proc/cpuinfo's flags where it exists, else torch's CPU capability (which
    cannot see VNNI, so such a machine is treated as saturating)."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower())
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
                    break
    except OSError:
        import torch
        capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", …
        flags.update({"AVX512": ("avx512f", "avx2"), "AVX2": ("avx2",)}.get(capability, ()))
    return frozenset({arch, *(_CPUINFO_FLAGS[f] for f in flags if f in _CPUINFO_FLAGS)})


MACHINE_FIELDS = ("mcpu", "mattr", "mtriple")  # TVM llvm target fields that say which CPU the code runs on
# LLVM feature → fxforge's name (as _CPUINFO_FLAGS: the features that decide kernels and the int8 weight grid)
_LLVM_FEATURES = {"avx2": "avx2", "avx512f": "avx512", "avx512vnni": "vnni", "avxvnni": "vnni", "amx-int8": "amx",
                  "neon": "neon", "dotprod": "dotprod"}


def _names_machine(tvm: Mapping[str, Any]) -> bool:
    """Whether a TVM dict chooses a CPU other than this one's."""
    return tvm.get("kind") == "llvm" and any(f in tvm and tvm[f] != HOST_CPU for f in MACHINE_FIELDS)


def llvm_isa(tvm: Mapping[str, Any]) -> frozenset[str] | None:
    """The features LLVM builds code of the TVM llvm target dict ``tvm`` for (None without TVM, or for another
    kind); an ``mcpu`` LLVM does not know is a TargetError (LLVM printed errors and built for a generic CPU)."""
    if tvm.get("kind") != "llvm":
        return None
    try:
        import tvm as tvm_module
        from tvm.target import codegen
    except ImportError:
        return None
    spec = _resolve(tvm)
    cpu = spec.get("mcpu")
    try:
        triple = tvm_module.target.Target({k: v for k, v in spec.items() if k != "mcpu"})
        known = cpu is None or cpu in codegen.llvm_get_cpu_archlist(triple)
        target = tvm_module.target.Target(spec) if known else None  # an unknown one: LLVM's errors on stderr
    except Exception as e:
        raise TargetError(f"TVM refuses the target dict {dict(tvm)}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}") from None
    if target is None:
        raise TargetError(f"LLVM does not know the CPU mcpu={cpu!r} for {triple.attrs.get('mtriple')}; "
                          "`llc -mcpu=help` lists them")
    return tvm_target_features(target)


def tvm_target_features(target: Any) -> frozenset[str]:
    """The architecture and features (fxforge's names) of the code LLVM builds for the ``tvm.target.Target``
    ``target`` of kind llvm."""
    from tvm.target import codegen
    arch = str(target.attrs.get("mtriple") or codegen.llvm_get_system_triple()).split("-")[0]
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)
    return frozenset({arch, *(name for feature, name in _LLVM_FEATURES.items()
                              if codegen.target_has_features(feature, target))})


def loaded_target(d: Mapping[str, Any]) -> Target:
    """The target an artifact recorded (:meth:`Target.to_dict`), with the features its code was built for, which a
    backend that generates machine code checks against this machine's (:meth:`Target.lacks`)."""
    isa = frozenset(d["features"]) if "features" in d else None  # an older artifact: the registered target's
    try:
        registered = _TARGETS[d["name"]]
        target = dataclasses.replace(registered, tvm=d["tvm"], isa=isa or registered.isa)
    except Exception:  # a target registered in the process that compiled it, not here
        target = Target(d["name"], "loaded from an artifact", d["tvm"], d.get("tvm_host"),
                        tuple(d.get("ort_providers", ("CPUExecutionProvider",))), d.get("torch_device", "cpu"),
                        isa=isa)
    # the code runs here where this machine has every feature it was built for (an AArch64 target's on x86: not)
    return dataclasses.replace(target, runs_on_host=target.features() <= host_features()) if isa else target


def _resolve(spec: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(spec)
    if out.get("mcpu") == HOST_CPU:
        out["mcpu"] = host_cpu()
    return out


_TARGETS: dict[str, Target] = {}


def register_target(target: Target, *, replace: bool = False) -> Target:
    """Add a target to the registry (``fxforge targets`` lists it), its features resolved (:meth:`Target.resolved`)."""
    if target.name in _TARGETS and not replace:
        raise TargetError(f"target {target.name!r} is already registered")
    _TARGETS[target.name] = target.resolved()
    return _TARGETS[target.name]


def available_targets() -> dict[str, Target]:
    """Every registered target by name (a copy: registering goes through :func:`register_target`)."""
    return dict(_TARGETS)


def saturates_u8s8(features: frozenset[str]) -> bool:
    """Whether a CPU with ``features`` (``host_features()`` for this one) sums uint8 × int8 products in a saturating
    int16: x86 without VNNI or AMX."""
    return "x86_64" in features and not features & {"vnni", "amx"}


def get_target(target: str | Target) -> Target:
    """Look a target up by name; a Target passes through, its features resolved (:meth:`Target.resolved`)."""
    if isinstance(target, Target):
        return target.resolved()
    if not isinstance(target, str) or target not in _TARGETS:
        raise TargetError(f"unknown target {target!r}; valid targets: {', '.join(sorted(_TARGETS))}")
    return _TARGETS[target]


register_target(Target(
    "x86", "this machine's x86-64 CPU (LLVM, host CPU detected)",
    tvm={"kind": "llvm", "mcpu": HOST_CPU, "num-cores": os.cpu_count() or 1},
))
for _name, _cpu, _features, _what in [
        ("x86-avx2", "haswell", ("avx2",), "AVX2 without VNNI (Haswell to Skylake client, Zen 1-3)"),
        ("x86-avx512", "skylake-avx512", ("avx2", "avx512"), "AVX-512 without VNNI (Skylake-SP)"),
        ("x86-avx512-vnni", "cascadelake", ("avx2", "avx512", "vnni"), "AVX-512 VNNI (Cascade Lake, Zen 4)"),
        ("x86-amx", "sapphirerapids", ("avx2", "avx512", "vnni", "amx"), "AMX (Sapphire Rapids and later)")]:
    _isa = frozenset({"x86_64", *_features})
    register_target(Target(
        _name, f"x86-64 CPU with {_what}; cross-compiled from any x86 machine",
        tvm={"kind": "llvm", "mcpu": _cpu, "num-cores": os.cpu_count() or 1},
        runs_on_host=_isa <= host_features(), isa=_isa,
    ))
register_target(Target(
    "arm64", "AArch64 CPU with NEON (Cortex-A72/A76 class boards); cross-compiled here",
    tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    cross_compiler="aarch64-linux-gnu-g++", runs_on_host=False, isa=frozenset({"aarch64", "neon"}),
))
register_target(Target(
    "arm64-dotprod", "AArch64 CPU with NEON and the dot-product extension (Cortex-A76/A78, Neoverse N1)",
    tvm={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    cross_compiler="aarch64-linux-gnu-g++", runs_on_host=False, isa=frozenset({"aarch64", "neon", "dotprod"}),
))
register_target(Target(
    "cuda", "NVIDIA GPU (CUDA, default arch sm_80)",
    tvm={"kind": "cuda", "arch": "sm_80"}, tvm_host={"kind": "llvm"},
    ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"), torch_device="cuda", runs_on_host=False,
    isa=frozenset({"cuda"}),
))
