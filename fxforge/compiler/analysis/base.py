"""The Analysis contract: a pure computation over a graph, cached by the pass context until a pass invalidates it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch.fx as fx

if TYPE_CHECKING:
    from ..pass_manager import PassContext


class Analysis:
    """A pure computation over a graph whose result is cached until a pass invalidates it."""

    name: ClassVar[str]

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> Any:
        raise NotImplementedError
