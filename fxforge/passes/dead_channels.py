"""dead_channels: remove channel groups whose value is the same for every input, or that nothing reads. Exact.

A channel is constant when its producer's weight row is zero (conv/linear: the bias; a BN with γ = 0: β) and
stays constant through channel-wise ops; a ReLU turns a constant ≤ 0 into 0 (ConstantChannels proves it).
A coupled group (ChannelGroups) is removed from its producers and every coupled op when each consumer that
mixes it into other channels (a conv or linear) reads it as a constant v or ignores it (zero weight
columns); RemovableChannels decides, lib/channel_surgery.py cuts. The constant moves into the consumer's bias:

    y[o] = b[o] + Σ_c W[o, c] ∗ x_c,   x_c ≡ v_c   ⇒   b'[o] = b[o] + Σ_{removed c} v_c · ΣW[o, c]

Under zero padding a constant v ≠ 0 is not constant at the borders, so a padded conv reading it blocks the
group (``skipped.padding_border``); layer norm over channels would see other statistics
(``skipped.layer_norm``). Unprunable groups (model outputs, attention, ...) are counted, never touched.
"""
from __future__ import annotations

import torch.fx as fx

from fxforge.compiler.pass_manager import Pass, PassContext, PassResult, register_pass

from .lib.channel_surgery import remove_removable


@register_pass
class DeadChannels(Pass):
    """Remove constant or unread channel groups, folding constants into consumer biases (exact)."""

    name = "dead_channels"
    before = ("insert_qdq",)  # a quantized layer's channels are no coupled float groups: nothing would be removed

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = remove_removable(gm, ctx)
        changed = "channels_removed" in stats
        return PassResult(changed=changed, preserves="none" if changed else "all", stats=stats)
