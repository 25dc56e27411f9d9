"""Analyses: pure facts about a graph, cached by the pass manager until a pass invalidates them."""
from .flops import Flops
from .shapes import Shapes

__all__ = ["Flops", "Shapes"]
