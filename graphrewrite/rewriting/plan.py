"""Decides, per weight variable, whether and how it is compressed (a site) or why not (a skip).

A site is one variable: every op reading it, in every signature and function, reads the same
factors, alpha and schedule (a tied embedding's lookup and its LM head's transposed MatMul too). A
variable is skipped when any reader is not a rewritable weight operand, when its readers see it
through matrix views other than one and its transpose, or when the method refuses its shape (the
refusal's reason is kept).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from graphrewrite.errors import UsageError
from graphrewrite.rewriting import coverage, rankpolicy
from graphrewrite.rewriting.match import Blocker, Use, match_function
from graphrewrite.rewriting.model import FunctionIR, VariableInfo
from graphrewrite.rewriting.rankpolicy import Policy
from graphrewrite.transforms import Refusal, SizePlan, Transform
from graphrewrite.views import View, simplify

Spectrum = Callable[[str, View], np.ndarray]  # (variable key, view) -> singular values, descending


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which sites to consider and how to choose k (beyond the reference, all optional).

    Attributes:
      include: regex; only variables or ops whose name it matches (``re.search``) are candidates.
      exclude: regex; variables or ops whose name it matches are left alone.
      min_params: weights with fewer parameters are left alone.
      policy: spectrum-based choice of k (low rank only).
    """

    include: str | None = None
    exclude: str | None = None
    min_params: int = 0
    policy: Policy = dataclasses.field(default_factory=Policy)

    def __post_init__(self) -> None:
        for flag, pattern in (("--include", self.include), ("--exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise UsageError(f"{flag}: {pattern!r} is not a regular expression ({exc})") from None
        if self.min_params < 0:
            raise UsageError("--min-params must be >= 0")
        given = [v for v in (self.policy.energy, self.policy.max_error, self.policy.target_ratio) if v is not None]
        if len(given) > 1:
            raise UsageError("--energy, --max-error and --target-ratio exclude each other")
        for name, value in (("--energy", self.policy.energy), ("--max-error", self.policy.max_error),
                            ("--target-ratio", self.policy.target_ratio)):
            if value is not None and not 0.0 < value <= 1.0:
                raise UsageError(f"{name} must be in (0, 1], got {value}")

    def refuses(self, variable: str, ops: list[str], size: int) -> str | None:
        names = [variable, *ops]
        if self.include is not None and not any(re.search(self.include, n) for n in names):
            return f"not matched by --include {self.include!r}"
        if self.exclude is not None and any(re.search(self.exclude, n) for n in names):
            return f"excluded by --exclude {self.exclude!r}"
        if size < self.min_params:
            return f"{size} parameters, fewer than --min-params {self.min_params}"
        return None

__all__ = ["RewritePlan", "Selection", "SitePlan", "Skip", "Use", "display_op", "make_plan"]

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
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # selection, allow_larger
    # reason -> [weights, parameters] of the model's variables that are not sites (coverage.py)
    left_dense: Mapping[str, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def params_before(self) -> int:
        return sum(s.size.params_before for s in self.sites)

    @property
    def params_after(self) -> int:
        return sum(s.size.params_after for s in self.sites)


def make_plan(functions: Iterable[FunctionIR], infos: Mapping[str, VariableInfo],
              transform: Transform, selection: Selection | None = None,
              spectrum: Spectrum | None = None) -> RewritePlan:
    """Matches every function and groups the results by variable.

    Args:
      functions: the model's flat functions.
      infos: its variables.
      transform: the compression method.
      selection: site filters and the rank policy.
      spectrum: singular values of a weight's view; needed by spectrum-based policies.
    """
    selection = selection or Selection()
    if selection.policy.uses_spectrum and (transform.name != "low_rank" or spectrum is None):
        raise UsageError("--energy, --max-error and --target-ratio choose ranks: low rank (option 1) only")
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
    ready: list[tuple] = []
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
        view, m, n = found[0].view, found[0].m, found[0].n
        # A tied weight (an embedding and its transposed LM head) is one site: its uses read the
        # same matrix, or its transpose (sites.transposed).
        flipped = (simplify(view + (("transpose", (1, 0)),), info.shape), n, m)
        if any((u.view, u.m, u.n) not in ((view, m, n), flipped) for u in found):
            reason = f"'{info.name}' is read as differently shaped matrices by different ops"
            skipped.append(Skip(op_name, op_type, info.name, info.shape, reason))
            continue
        refused = selection.refuses(info.name, sorted({display_op(u.op) for u in found}), m * n)
        if refused:
            skipped.append(Skip(op_name, op_type, info.name, info.shape, refused))
            continue
        ready.append((key, op_name, op_type, view, m, n, tuple(found)))
    decisions = _decide(ready, infos, transform, selection.policy, spectrum)
    for (key, op_name, op_type, view, _, _, found), decision in zip(ready, decisions):
        info = infos[key]
        if isinstance(decision, Refusal):
            skipped.append(Skip(op_name, op_type, info.name, info.shape, decision.reason))
        else:
            sites.append(SitePlan(f"site_{len(sites):03d}", info, found, view, decision))
    options = {"include": selection.include, "exclude": selection.exclude, "min_params": selection.min_params,
               "policy": selection.policy.describe(int(transform.hparams["rank"])),
               "allow_larger": transform.allow_larger}
    dense = coverage.left_dense(infos, (s.variable.key for s in sites), skipped, blockers)
    return RewritePlan(tuple(sites), tuple(skipped), dict(transform.hparams), transform.name, options, dense)


def _decide(ready: list[tuple], infos: Mapping[str, VariableInfo], transform: Transform, policy: Policy,
            spectrum: Spectrum | None) -> list[SizePlan | Refusal]:
    """The size plan or refusal of every candidate, by the reference's rule or a spectrum policy."""
    if not policy.uses_spectrum:
        return [transform.check(m, n) for _, _, _, _, m, n, _ in ready]
    assert spectrum is not None
    spectra = [spectrum(key, view) for key, _, _, view, _, _, _ in ready]
    shapes = [(m, n) for _, _, _, _, m, n, _ in ready]
    why = policy.describe(int(transform.hparams["rank"]))
    if policy.target_ratio is not None:
        allocate = rankpolicy.same_rank_ks if policy.same_rank else rankpolicy.target_ratio_ks
        ks = allocate(spectra, shapes, policy.target_ratio)
    elif policy.energy is not None:
        ks = [rankpolicy.energy_k(s, policy.energy) for s in spectra]
    else:
        ks = [rankpolicy.max_error_k(s, policy.max_error) for s in spectra]
    out: list[SizePlan | Refusal] = []
    for s, (m, n), k in zip(spectra, shapes, ks):
        if k is None:
            out.append(Refusal(f"{why} leaves it dense: {rankpolicy.why_dense(s, m, n)}"))
            continue
        decision = transform.with_k(m, n, k, why)  # type: ignore[attr-defined]
        if isinstance(decision, SizePlan):
            details = {"policy": why, "kept_energy": rankpolicy.kept_energy(s, k),
                       "relative_error": rankpolicy.relative_error(s, k)}
            decision = dataclasses.replace(decision, details={**decision.details, **details})
        out.append(decision)
    return out
