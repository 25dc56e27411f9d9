"""The Backend protocol, its registry, and Artifact: a compiled model that runs, saves and loads.

A backend lowers an optimized fx.GraphModule (flat tensors in, a tuple of tensors out) for a Target into an
Artifact. Artifacts take the user's call arguments, check them against the Signature, run, and rebuild the
output structure. ``save`` is atomic (a temp dir renamed into place) and writes ``fxforge.json`` with the
format version and a SHA-256 of every file; ``load`` checks both before handing the files to the backend.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.fx as fx

from fxforge.compiler.errors import ArtifactError, BackendError
from fxforge.compiler.target import Target, get_target
from fxforge.compiler.trace import Signature

FORMAT_VERSION = 1
META_FILE = "fxforge.json"


class Artifact(ABC):
    """A compiled model. Subclasses implement ``run`` (flat tensors → flat outputs), ``write`` and ``read``."""

    backend: ClassVar[str]

    def __init__(self, signature: Signature, target: Target, info: dict[str, Any] | None = None) -> None:
        self.signature = signature
        self.target = target
        self.info: dict[str, Any] = dict(info or {})  # backend facts worth reporting (fused kernels, files)

    def __call__(self, *args: Any) -> Any:
        flat = self.signature.flatten(args)
        return self.signature.unflatten(list(self.run(flat)))

    @abstractmethod
    def run(self, inputs: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
        """Run on flat, already checked inputs; return the flat outputs."""

    @abstractmethod
    def write(self, directory: Path) -> None:
        """Write the backend's files into ``directory`` (which exists and is empty)."""

    @classmethod
    @abstractmethod
    def read(cls, directory: Path, signature: Signature, target: Target, info: dict[str, Any]) -> Artifact:
        """Rebuild the artifact from files ``write`` produced."""

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the artifact atomically to ``directory`` (replacing an earlier artifact there)."""
        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            self.write(tmp)
            meta = {"format": FORMAT_VERSION, "fxforge": _version(), "backend": self.backend,
                    "target": self.target.to_dict(), "signature": self.signature.to_dict(), "info": self.info,
                    "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
            if final.exists():
                if not (final / META_FILE).exists() and any(final.iterdir()):
                    raise ArtifactError(f"{final} exists and is not an fxforge artifact; refusing to overwrite")
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final


def load(directory: str | os.PathLike[str]) -> Artifact:
    """Load a saved artifact, checking its format version and file hashes."""
    path = Path(directory)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path} is not an fxforge artifact (no {META_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path / META_FILE} is corrupt: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                            f"this fxforge reads format {FORMAT_VERSION}")
    missing = [key for key in ("backend", "target", "signature", "files") if key not in meta]
    if missing:
        raise ArtifactError(f"{path / META_FILE} lacks {', '.join(map(repr, missing))}; "
                            "it was not written by fxforge")
    for name, digest in meta["files"].items():
        file = path / name
        if not file.is_file() or _sha256(file) != digest:
            raise ArtifactError(f"{file} is missing or was modified after saving (hash mismatch)")
    try:
        cls = get_backend(meta["backend"]).artifact
    except BackendError as e:
        raise ArtifactError(f"{path} was saved by backend {meta['backend']!r}, which this fxforge lacks: "
                            f"{e}") from None
    try:
        target = _target_from(meta["target"])
        return cls.read(path, Signature.from_dict(meta["signature"]), target, meta.get("info", {}))
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"cannot load the {meta['backend']} artifact in {path}: {type(e).__name__}: {e}") from e


def _target_from(d: dict[str, Any]) -> Target:
    try:
        return get_target(d["name"]).with_tvm(**d["tvm"])
    except Exception:
        return Target(d["name"], "loaded from an artifact", d["tvm"], d.get("tvm_host"),
                      tuple(d.get("ort_providers", ("CPUExecutionProvider",))), d.get("torch_device", "cpu"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fxforge")
    except PackageNotFoundError:
        return "0+unknown"


class Backend(ABC):
    """Lowers an optimized graph for a target. Registered by ``name`` with :func:`register_backend`."""

    name: ClassVar[str]
    artifact: ClassVar[type[Artifact]]
    targets: ClassVar[tuple[str, ...]] = ("x86", "arm64", "cuda")

    @abstractmethod
    def lower(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor], signature: Signature,
              target: Target, **options: Any) -> Artifact:
        """Compile ``gm`` (flat inputs, tuple output) into an Artifact. Never mutates ``gm``."""


_BACKENDS: dict[str, type[Backend]] = {}
_LAZY = {"eager": "fxforge.backends.eager", "torchscript": "fxforge.backends.torchscript",
         "onnx": "fxforge.backends.onnx", "tvm": "fxforge.backends.tvm"}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def available_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_LAZY))


def get_backend(name: str) -> Backend:
    """The backend called ``name``; its module is imported on first use (TVM's import is slow)."""
    if name not in _BACKENDS and name in _LAZY:
        import importlib
        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("fxforge"):
                raise BackendError(f"backend {name!r} is not built yet") from None
            raise
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(available_backends())}")
    return _BACKENDS[name]()
