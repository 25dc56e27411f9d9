"""Analyses: pure facts about a graph, cached by the pass manager until a pass invalidates them."""
from .channel_groups import ChannelGroups
from .constant_channels import ConstantChannels
from .flops import Flops
from .shapes import Shapes

__all__ = ["ChannelGroups", "ConstantChannels", "Flops", "Shapes"]
