"""Graph passes: plain functions `GraphModule -> GraphModule` that change the graph in place.

`run_passes` runs a literal tuple of them, lints and recompiles after each, and on failure re-raises a
`PassError` naming the pass and the passes before it. Passes that need settings take them as keyword
arguments bound with `functools.partial`.
"""

from __future__ import annotations

import functools
from typing import Callable, List, Sequence

from torch import fx

from fxquant.errors import FxQuantError, PassError

Pass = Callable[[fx.GraphModule], fx.GraphModule]


def pass_name(p: Pass) -> str:
    """The name of a pass function (also through `functools.partial`)."""
    while isinstance(p, functools.partial):
        p = p.func
    return getattr(p, "__name__", repr(p))


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass]) -> fx.GraphModule:
    """Run `passes` in order on `gm`; lint and recompile after each.

    Raises:
        FxQuantError: errors raised on purpose by a pass pass through unchanged.
        PassError: any other failure, naming the pass and the ones that ran before it.
    """
    done: List[Pass] = []
    for p in passes:
        try:
            result = p(gm)
            if result is not gm:
                raise PassError(f"pass {pass_name(p)} returned a new module; passes change the graph in place")
            gm.graph.lint()
            gm.recompile()
        except FxQuantError:
            raise
        except Exception as e:  # noqa: BLE001 - wrap with the pass context
            raise PassError(
                f"pass {pass_name(p)} failed (after {[pass_name(d) for d in done] or 'no other pass'}): "
                f"{type(e).__name__}: {e}. This is a bug in fxquant or an unsupported graph pattern; "
                "keep the offending layer float with an override or report it."
            ) from e
        done.append(p)
    return gm
