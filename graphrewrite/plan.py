"""Decides, per weight variable, whether and how it is compressed (a site) or why not (a skip).

A site is one variable: every op reading it, in every signature and function, reads the same
factors, alpha and schedule. A variable is skipped when any reader is not a rewritable weight
operand, when its readers see it through different matrix views, or when the method refuses its
shape (the refusal's reason is kept).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from graphrewrite.match import Blocker, Use, match_function
from graphrewrite.model import FunctionIR, VariableInfo
from graphrewrite.transforms import Refusal, SizePlan, Transform
from graphrewrite.views import View

__all__ = ["RewritePlan", "SitePlan", "Skip", "Use", "display_op", "make_plan"]

_CALL_PREFIX = re.compile(r"^((StatefulPartitionedCall|PartitionedCall)(_\d+)?/)+")


def display_op(node_name: str) -> str:
    """An op name without the call-site prefixes Grappler's inlining adds."""
    return _CALL_PREFIX.sub("", node_name)


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """One compressed weight."""

    id: str
    variable: VariableInfo
    uses: tuple[Use, ...]
    view: View
    size: SizePlan

    @property
    def op(self) -> str:
        return display_op(self.uses[0].op)

    @property
    def op_type(self) -> str:
        return self.uses[0].op_type


@dataclasses.dataclass(frozen=True)
class Skip:
    """A candidate weight left as it is, and why."""

    op: str
    op_type: str
    variable: str
    shape: tuple[int, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class RewritePlan:
    """Every site and skip of one model, in a stable order."""

    sites: tuple[SitePlan, ...]
    skipped: tuple[Skip, ...]
    hparams: Mapping[str, Any]
    method: str

    @property
    def params_before(self) -> int:
        return sum(s.size.params_before for s in self.sites)

    @property
    def params_after(self) -> int:
        return sum(s.size.params_after for s in self.sites)


def make_plan(functions: Iterable[FunctionIR], infos: Mapping[str, VariableInfo],
              transform: Transform) -> RewritePlan:
    """Matches every function and groups the results by variable."""
    uses: dict[str, list[Use]] = {}
    blockers: dict[str, list[Blocker]] = {}
    functions_list = list(functions)
    for fir in functions_list:
        found, blocked = match_function(fir, dict(infos))
        for use in found:
            uses.setdefault(use.variable, []).append(use)
        for blocker in blocked:
            blockers.setdefault(blocker.variable, []).append(blocker)
    sites: list[SitePlan] = []
    skipped: list[Skip] = []
    candidates = list(uses) + [k for k, bs in blockers.items() if k not in uses and any(b.at_weight_op for b in bs)]
    # Sites in the order their first reader appears in the graphs (input side first).
    position = {}
    for f_index, fir in enumerate(functions_list):
        for n_index, name in enumerate(fir.graph.nodes):
            position.setdefault((fir.key, name), (f_index, n_index))

    def first_position(key: str) -> tuple[int, int]:
        readers = [(u.function, u.op) for u in uses.get(key, [])] or [
            (b.function, b.op) for b in blockers[key] if b.at_weight_op]
        return min(position.get(r, (1 << 30, 0)) for r in readers)

    candidates.sort(key=first_position)
    for key in candidates:
        info = infos[key]
        found = uses.get(key, [])
        first_op = found[0] if found else next(b for b in blockers[key] if b.at_weight_op)
        op_name, op_type = display_op(first_op.op), first_op.op_type
        if key in blockers:
            skipped.append(Skip(op_name, op_type, info.name, info.shape, blockers[key][0].reason))
            continue
        views_seen = {(u.view, u.m, u.n) for u in found}
        if len(views_seen) > 1:
            reason = f"'{info.name}' is read as differently shaped matrices by different ops"
            skipped.append(Skip(op_name, op_type, info.name, info.shape, reason))
            continue
        view, m, n = views_seen.pop()
        decision = transform.check(m, n)
        if isinstance(decision, Refusal):
            skipped.append(Skip(op_name, op_type, info.name, info.shape, decision.reason))
            continue
        assert isinstance(decision, SizePlan)
        sites.append(SitePlan(f"site_{len(sites):03d}", info, tuple(found), view, decision))
    return RewritePlan(tuple(sites), tuple(skipped), dict(transform.hparams), transform.name)
