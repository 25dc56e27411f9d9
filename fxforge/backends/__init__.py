"""Backends lower the optimized graph to something that runs: eager, TorchScript, ONNX Runtime, TVM."""
from .base import Artifact, Backend, available_backends, get_backend, load, register_backend

__all__ = ["Artifact", "Backend", "available_backends", "get_backend", "load", "register_backend"]
