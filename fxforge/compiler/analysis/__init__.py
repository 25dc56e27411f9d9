"""Core analyses every layer may ask for: concrete shapes of every node, FLOPs of the compute-heavy ops."""
from .flops import Flops, node_flops
from .shapes import Shapes, TensorInfo

__all__ = ["Flops", "Shapes", "TensorInfo", "node_flops"]
