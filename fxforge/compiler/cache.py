"""What fxforge keeps on disk between runs: the cache directory, and layer timings per target.

Passes that decide by measured speed (``low_rank{budget='latency'}``) time a layer against its replacement on
the host. Those timings depend on the target's instruction set, PyTorch's version and thread count, and the
layer's shapes, not on its weights, so they are kept in ``<cache dir>/timings/<target>-<isa hash>.json``, one
entry per key, and a recompile of the same model (or another model with a layer of the same shape) reads them
instead of timing again. Delete the file, or point ``$FXFORGE_CACHE`` elsewhere, to time afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .target import Target


def cache_dir() -> Path:
    """``$FXFORGE_CACHE`` or ``~/.cache/fxforge`` (created)."""
    path = Path(os.environ.get("FXFORGE_CACHE") or Path.home() / ".cache" / "fxforge")
    path.mkdir(parents=True, exist_ok=True)
    return path


def timings_path(target: Target) -> Path:
    isa = hashlib.sha256(",".join(sorted(target.features())).encode()).hexdigest()[:8]
    return cache_dir() / "timings" / f"{target.name}-{isa}.json"


def cached_timing(target: Target, key: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stored timing of ``key`` on ``target`` (PyTorch version and thread count are part of the key), or
    ``measure()`` stored and returned. A file other processes wrote meanwhile is merged, and replaced atomically."""
    path = timings_path(target)
    key = f"torch {torch.__version__}|threads {torch.get_num_threads()}|{key}"
    if (hit := _read(path).get(key)) is not None:
        return hit
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**_read(path), key: value}, indent=0, sort_keys=True))
    tmp.replace(path)
    return value


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut short by a crash: time again
        return {}
    return data if isinstance(data, dict) else {}
