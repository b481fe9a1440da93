"""Small helpers on prepared modules that users call directly: switching quantizers on and off."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from fxquant.quantizer import iter_learnable


def set_quantizers_enabled(qm: nn.Module, enabled: bool) -> None:
    """Enable or disable every learnable quantizer (disabled = identity, the float model exactly)."""
    for _, q in iter_learnable(qm):
        q.enabled = enabled


@contextlib.contextmanager
def quantizers_enabled(qm: nn.Module, enabled: bool) -> Iterator[nn.Module]:
    """Context manager: quantizers enabled/disabled inside, restored on exit."""
    previous = [(q, q.enabled) for _, q in iter_learnable(qm)]
    set_quantizers_enabled(qm, enabled)
    try:
        yield qm
    finally:
        for q, state in previous:
            q.enabled = state
