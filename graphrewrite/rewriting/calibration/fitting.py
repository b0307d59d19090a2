"""The factors of a plan, and with distillation the rank allocation it does best with.

compress's fitting stage (graphrewrite.rewriting.pipeline, between planning and building): the
first pass (build.factorize_all, whitened where calibrated), then with calibration data error
feedback (feedback.refine), the model check (modelcheck.choose) and distillation
(distill.distill); ``record`` then writes what they did into the manifest.

Which allocation distillation does best with. ``--target-ratio`` spends the budget where each
weight's own error falls most per parameter (rankpolicy.target_ratio_ks): the right split for
factors fitted a weight at a time, and what stands where distillation is not kept. Trained
together on the model's outputs, factors do better with another split: on the digits CNN at 20%
of its kernel parameters the allocation leaves the 10-class head rank 3 (conv_1 whole, conv_2
rank 6), and a head of rank k holds the logits in k dimensions whatever training does to the
factors before it; the same rank 4 for all three weights, at the same budget, distilled to
97.50% against 96.67% (4 draws, README). So where distillation runs on a ``--target-ratio``
plan, the plan with one rank for every weight at that budget (rankpolicy.same_rank_ks; it can
compress weights the allocation left whole, so it is a plan of its own, from make_plan) is
fitted and distilled too, and where its distillation is kept (where it is not, its factors are
fitted a weight at a time, which is what ``--target-ratio``'s allocation is for, and that
stands), the one written is the one whose mean held-out distillation loss
(of the factors each kept, on the same held-out examples) is lower: the two are of equal
standing, the same budget, both distilled; the paired z (modelcheck.decide's) is recorded to say
how clear the choice was (on the CNN's first two draws -0.7 and -2.9, both for one rank). The manifest's
``options.calibration.distill.allocation`` has both figures. Cost: a second fitting and
distillation (about twice distillation's time; ``compare_allocations=False``,
``--no-compare-allocations``, skips it). Where the second fitting fails (its distillation out of
time or memory in the sandbox), the first plan is written, as without it, and the record says why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from graphrewrite.errors import GraphrewriteError, first_line
from graphrewrite.rewriting import build as build_lib
from graphrewrite.rewriting.calibration import distill, feedback, modelcheck, statistics
from graphrewrite.rewriting.model import LoadedModel
from graphrewrite.rewriting.plan import RewritePlan, Selection, Spectrum, make_plan
from graphrewrite.transforms import Transform

Progress = Callable[[str], None]
ALLOCATION, SAME_RANK = "target_ratio", "one rank for every weight"


@dataclasses.dataclass
class Fitted:
    """A plan's factors (site id -> name -> array) and what fitting them did (the manifest's)."""

    plan: RewritePlan
    factors: dict[str, dict[str, np.ndarray]]
    notes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per site id, to its details
    check: dict[str, Any] | None = None  # modelcheck.choose's record
    distilled: dict[str, Any] | None = None  # distill.distill's record
    plain: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    held_out: np.ndarray | None = None  # distillation's held-out loss per example, of the factors kept
    undistilled: dict[str, dict[str, np.ndarray]] | None = None  # the factors distillation started from


def fit(model: LoadedModel, plan: RewritePlan, transform: Transform, progress: Progress) -> Fitted:
    """The plan's factors: the first pass, and with calibration data the stages above."""
    initial = build_lib.factorize_all(model, plan, transform, progress)
    if model.calibration is None:
        return Fitted(plan, initial)
    options = plan.options["calibration"]
    first_pass, plain = dict(initial), statistics.plain_factors(model, plan, transform)
    chained, trials = feedback.refine(model, plan, transform, initial, options["passes"], progress, plain)
    check = modelcheck.choose(model, plan, transform, initial, first_pass, trials, progress, plain)
    notes = modelcheck.notes(check, chained, plan)
    asked = options.get("distill", {})  # statistics.mark_plan records it where --distill-steps
    undistilled = {sid: dict(f) for sid, f in initial.items()}
    distilled, held_out = distill.distill(model, plan, transform, initial, asked.get("steps", 0),
                                          asked.get("loss", "mse"), progress, mixup=asked.get("mixup", True))
    if distilled is not None and distilled.get("kept"):
        for sid in distilled["trained"]:
            notes[sid] = {**notes.get(sid, {}), "distilled": True}
    return Fitted(plan, initial, notes, check, distilled, plain, held_out, undistilled)


def fit_best(model: LoadedModel, plan: RewritePlan, transform: Transform, selection: Selection,
             spectrum: Spectrum, progress: Progress, compare: bool = True) -> Fitted:
    """``fit``; where distillation ran on a ``--target-ratio`` plan (and ``compare``), also the same
    budget at one rank for every weight, and the better of the two as the module doc says. Where
    the second plan's fitting fails (its distillation ran out of time or memory in the sandbox),
    the first stands and the record says why. Then, where the plan written was distilled and
    its distillation kept, and the plan's options ask for it (``refit``, the default), its
    factors are distilled again on every calibration example (distill.refit)."""
    chosen = _choose(model, plan, transform, selection, spectrum, progress, compare)
    asked = chosen.plan.options.get("calibration", {}).get("distill", {})
    if chosen.distilled is not None and chosen.undistilled is not None:
        if asked.get("refit", True):
            distill.refit(model, chosen.plan, transform, chosen.undistilled, chosen.factors, chosen.distilled,
                          progress)
        elif chosen.distilled.get("run"):
            chosen.distilled["refit"] = {"run": False, "why": "not asked: --no-distill-refit"}
    return chosen


def _choose(model: LoadedModel, plan: RewritePlan, transform: Transform, selection: Selection,
            spectrum: Spectrum, progress: Progress, compare: bool) -> Fitted:
    """``fit_best`` before the refit."""
    first = fit(model, plan, transform, progress)
    policy = selection.policy
    if first.held_out is None or policy.target_ratio is None or policy.same_rank:
        return first
    if not compare:
        first.distilled["allocation"] = {"compared": False, "why": "not asked: --no-compare-allocations"}
        return first
    other = make_plan(model.functions.values(), model.infos, transform,
                      dataclasses.replace(selection, policy=dataclasses.replace(policy, same_rank=True)), spectrum)
    if _ranks(other) == _ranks(plan):
        first.distilled["allocation"] = {"compared": False, "why": "one rank for every weight is the same plan"}
        return first
    other = statistics.mark_plan(other, model.calibration, plan.options["calibration"]["passes"])
    # the same calibration, passes and distillation as the first plan's
    other = dataclasses.replace(other, options={**other.options, "calibration": plan.options["calibration"]})
    progress(f"calibration: fitting and distilling one rank for every weight at the same budget "
             f"({', '.join(str(k) for k in sorted(set(_ranks(other).values())))})")
    try:
        second = fit(model, other, transform, progress)
    except GraphrewriteError as exc:  # the plan written is then the first, as without the comparison
        first.distilled["allocation"] = {"compared": False, "why": f"one rank for every weight failed: "
                                                                   f"{first_line(exc)}"}
        return first
    if not (second.distilled or {}).get("kept"):
        first.distilled["allocation"] = {"compared": False, "why": "at one rank for every weight distillation "
                                         + _why_not(second.distilled)}
        return first
    _, z = modelcheck.decide({ALLOCATION: first.held_out, SAME_RANK: second.held_out})
    # of equal standing (the same budget, both distilled): the lower held-out loss is written
    kept = SAME_RANK if float(np.mean(second.held_out)) < float(np.mean(first.held_out)) else ALLOCATION
    chosen = second if kept == SAME_RANK else first
    chosen.distilled["allocation"] = {
        "compared": True, "kept": kept, "z": z[SAME_RANK],
        "held_out": {ALLOCATION: float(np.mean(first.held_out)), SAME_RANK: float(np.mean(second.held_out))},
        "ranks": {ALLOCATION: _ranks(plan), SAME_RANK: _ranks(other)},
        "params_after": {ALLOCATION: plan.params_after, SAME_RANK: other.params_after}}
    return chosen


def _why_not(record: Mapping[str, Any] | None) -> str:
    if record is None or not record.get("run"):
        return f"did not run ({(record or {}).get('why', 'no record')})"
    return "was not kept (no epoch lowered the held-out loss beyond noise)"


def _ranks(plan: RewritePlan) -> dict[str, int]:
    """Variable name -> k of the plan's sites (a weight absent: left whole)."""
    return {s.variable.name: int(s.size.k) for s in plan.sites}


def record(data: dict[str, Any], model: LoadedModel, fitted: Fitted, transform: Transform) -> None:
    """Adds to a manifest (manifest.build of ``fitted.plan``) what the calibrated stages did: each
    site's output errors (statistics.record_errors) and the check's and distillation's records."""
    if model.calibration is None:
        return
    statistics.record_errors(data["sites"], model, fitted.plan, transform, fitted.factors, fitted.notes, fitted.plain)
    recorded = dict(data["options"]["calibration"])  # the plan's options stay as they were
    if fitted.check is not None:
        recorded["model_check"] = fitted.check
    if fitted.distilled is not None:
        recorded["distill"] = {**recorded["distill"], **fitted.distilled}
    data["options"]["calibration"] = recorded


__all__ = ["Fitted", "fit", "fit_best", "record"]
