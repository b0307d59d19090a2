"""Why ``compress`` would rewrite nothing, and what to try instead (one line for the error).

A "rewritten" copy in which every site was skipped looks like success, and then blocks a second
``compress`` as already rewritten; ``compress`` refuses it with this message unless asked not to.
"""

from __future__ import annotations

import collections
import re

from graphrewrite.errors import NothingToRewriteError
from graphrewrite.rewriting.plan import RewritePlan

_SHOWN = 3


def nothing_to_rewrite(plan: RewritePlan, source: str) -> NothingToRewriteError:
    """The error for a plan without sites: how many candidates, each distinct reason (the first
    three, with how many sites gave it), and the options that would rewrite something."""
    if not plan.skipped:
        why = ("no weight-bearing op (MatMul, BatchMatMulV2, Conv2D, Einsum with a weight operand) "
               "reads a variable")
    else:
        kinds = collections.Counter(_kind(s.reason) for s in plan.skipped)
        example = {}
        for skip in plan.skipped:
            example.setdefault(_kind(skip.reason), f"{skip.variable}: {skip.reason}")
        shown = "; ".join(example[kind] + (f" (and {n - 1} more like it)" if n > 1 else "")
                          for kind, n in kinds.most_common(_SHOWN))
        more = f"; and {len(kinds) - _SHOWN} other reason(s)" if len(kinds) > _SHOWN else ""
        why = f"all {len(plan.skipped)} candidate site(s) were skipped: {shown}{more}"
    tries = "--rank=200 (halves each weight's rank)"
    if plan.method == "low_rank":
        tries += " or --target-ratio 0.5"
    return NothingToRewriteError(
        f"{source}: nothing to rewrite, so nothing was written: {why}; try {tries}, or loosen "
        "--include/--exclude/--min-params (--allow-empty writes the unchanged copy anyway)")


def _kind(reason: str) -> str:
    """A skip reason with its numbers blanked, so sites skipped for one reason count together
    (``rank=7 gives k=64 on 64x256: ...`` and ``rank=7 gives k=10 on 128x10: ...``)."""
    return re.sub(r"\d+", "#", reason)
