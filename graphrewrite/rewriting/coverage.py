"""What a plan leaves dense, by reason: every weight of the model that is not a site, counted.

``inspect`` prints these groups so that "N sites" is never read as "the whole model": the
parameters of the original model's variables are split into those in rewritten sites and, per
reason, those left as they are (biases and norms, weights read inside If bodies or loops that do more
than multiply by them, depthwise kernels, weights the method or rank policy keeps dense, weights read
by other ops, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.rewriting.model import VariableInfo

# (substring of a skip reason, the group it falls in), first match wins.
_SKIP_GROUPS = (
    ("inside a While/If", "read inside a While/If body that is not rewritten (an If, a call, a loop body doing more "
                          "than MatMul)"),
    ("depthwise", "depthwise kernels (no matrix to factor)"),
    ("leaves it dense", "kept dense by the rank policy"),
    ("would not be smaller", "no saving at this rank"),
    ("--include", "left out by --include/--exclude/--min-params"),
    ("--exclude", "left out by --include/--exclude/--min-params"),
    ("--min-params", "left out by --include/--exclude/--min-params"),
)


def _skip_group(reason: str) -> str:
    return next((group for key, group in _SKIP_GROUPS if key in reason), "other reasons (see skipped)")


def left_dense(infos: Mapping[str, VariableInfo], site_keys: Iterable[str], skipped: Sequence[Any],
               blockers: Mapping[str, Sequence[Any]]) -> dict[str, list[int]]:
    """``{reason: [weights, parameters]}`` for every variable of the model that is not a site.

    Args:
      infos: the model's variables.
      site_keys: keys of the variables that are sites.
      skipped: the plan's skips (candidates left alone, with their reasons), matched by name.
      blockers: per variable key, the matcher's blockers (why a variable is no candidate).
    """
    sites = set(site_keys)
    skip_reasons = {skip.variable: skip.reason for skip in skipped}
    out: dict[str, list[int]] = {}
    for key, info in infos.items():
        if key in sites:
            continue
        if info.name in skip_reasons:
            group = _skip_group(skip_reasons[info.name])
        elif len(info.shape) <= 1:
            group = "vectors (biases, norm scales and offsets)"
        elif blockers.get(key):
            first = blockers[key][0]
            group = (_skip_group(first.reason) if "inside a While/If" in first.reason
                     else f"read by {first.op_type} (not a weight-bearing op)")
        else:
            group = "not read by any signature or function"
        entry = out.setdefault(group, [0, 0])
        entry[0] += 1
        entry[1] += int(np.prod(info.shape, dtype=np.int64))
    return dict(sorted(out.items(), key=lambda item: -item[1][1]))
