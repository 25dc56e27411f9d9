"""Pass-level analyses: pure facts about a graph, cached by the pass manager until a pass invalidates them.

The core analyses (``Shapes``, ``Flops``) live in ``fxforge.compiler.analysis``, where passes import them from.
"""
from .channel_groups import ChannelGroups
from .constant_channels import ConstantChannels
from .removable_channels import RemovableChannels

__all__ = ["ChannelGroups", "ConstantChannels", "RemovableChannels"]
