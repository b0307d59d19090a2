"""Error feedback: calibrated factors fitted to what each weight sees in the *compressed* model.

The first calibration pass fits every site to ``||X A - X M||``: its outputs on the inputs ``X``
it has in the original model. In the compressed model a site downstream of other sites sees
``X~`` instead (their errors), and what should come out is still ``X A``. This module refits
those sites to ``||X A - X~ M||`` (``whiten.feedback_target``: the exact rank-k optimum of the
damped objective, given ``X~``), in the order of the graph, as sequential post-training
compression does (GPTQ's and SVD-LLM's layer-by-layer updates):

- a site's *level* is 0 when no other site's weight is read on the way to its input, else one
  more than the highest level among those (the digits CNN: conv_2 0, the head 1);
- levels 1, 2, ... are refitted in order, one calibration pass each, at most ``passes`` of them:
  with more levels than passes, the deepest ``passes`` levels (``groups``; the error that reaches
  the output accumulates there), the others keeping their first-pass factors;
- a pass runs the model twice on each batch, as it is and with every site's weight replaced by
  its current compressed value (``statistics.collect(replaced=...)``), in the sandbox.

A refit replaces the first pass's factors only where it lowers the site's output error given
the compressed sites before it, on all the pass's rows and, fitted without the pass's held-out
batches (statistics.HOLD_OUT_EVERY), on those (``_held_out_check``): a refit is a regression of
``X A`` on ``X~`` and can fit the calibration rows without generalising.

Ranks stay those of the plan (chosen from the first pass's spectra). Lookups are never refitted
(their rows are token ids); nor are sites without statistics, nor recurrent kernels (their rows
are summed inside the loop, statistics' first pass only). A recurrent kernel is replaced in the
second copy like any weight (replay swaps the handle its loop takes), so the sites after a
compressed recurrent layer are refitted to what it gives; its level is one more than the weights
before its loop (the loop's own weights do not count for each other).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import views, whiten
from graphrewrite.rewriting.calibration.statistics import without
from graphrewrite.rewriting.loops import LOOP_OPS
from graphrewrite.rewriting.match import match_function
from graphrewrite.rewriting.model import LoadedModel
from graphrewrite.rewriting.ops import ADAPTERS
from graphrewrite.rewriting.plan import RewritePlan
from graphrewrite.transforms import Transform

# A weight is refitted only where the first pass saw at least this many rows per feature of its
# input (m / 4 rows): the refit is a regression of X A on X~, which with far fewer rows than
# features fits the calibration rows and not the inputs to come. On the test zoo's ResNet50
# (32 x 32 inputs, 256 images) the last stage's weights see 256 rows for 4,608 features, and
# refitting its last four levels made the held-out output error 0.0164 against 0.0158 for the
# first pass alone; the digits CNN head (512 rows, 1,024 features) gains 1-2 points of accuracy.
MIN_ROWS_PER_FEATURE = 0.25

# At most this many error-feedback passes by default (each costs about two forward passes of the
# calibration data plus its Grams); --calibration-passes changes it, 0 turns error feedback off.
DEFAULT_PASSES = 4


def levels(model: LoadedModel, signature: str, keys: Sequence[str]) -> dict[str, int]:
    """Variable key -> level for each of ``keys`` read by ``signature`` (see the module doc).

    Linear in the graph: one walk in topological order gives each node the set of ``keys`` read
    upstream of it (a bit mask), then the levels are a longest path over the weights, without
    recursion (a deep model has thousands of weights in a chain). A weight reached again on its
    own path (a weight shared between an early and a late layer) does not count for itself.
    """
    fir = model.functions[f"signature:{signature}"]
    graph = fir.graph
    bits = {key: 1 << i for i, key in enumerate(sorted(set(keys)))}
    # a weight's reads, and its handle where a loop takes it (Keras 3 RNNs read it in the body)
    reads = {name: bits[key] for name, key in {**fir.handles, **fir.reads}.items() if key in bits}
    masks: dict[str, int] = {}
    for name in graph.topological_order():
        mask = reads.get(name, 0)
        for edge in graph[name].inputs:
            mask |= masks.get(edge.node, 0)
        masks[name] = mask
    uses, _ = match_function(fir, dict(model.infos))
    upstream: dict[str, int] = {}
    carried: dict[str, int] = {}  # per loop, the weights it takes
    for use in uses:
        if use.variable in bits and graph[use.op].op in LOOP_OPS:
            carried[use.op] = carried.get(use.op, 0) | bits[use.variable]
    for use in uses:
        if use.variable in bits:
            node = graph[use.op]
            if node.op in LOOP_OPS:  # a recurrent kernel: after what enters the loop but the loop's weights
                mask = 0
                for edge in node.data_inputs:
                    mask |= masks.get(edge.node, 0)
                mask &= ~carried[use.op]
            else:
                mask = masks.get(node.data_inputs[ADAPTERS[node.op].activation_position(use.operand)].node, 0)
            upstream[use.variable] = upstream.get(use.variable, 0) | (mask & ~bits[use.variable])
    before = {key: [k for k, b in bits.items() if mask & b] for key, mask in upstream.items()}
    out: dict[str, int] = {}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in before:
        stack = [root]
        while stack:
            key = stack[-1]
            if state.get(key) is None:
                state[key] = 1
                stack.extend(k for k in before.get(key, ()) if state.get(k) is None)
                continue
            if state[key] == 1:
                # weights with no use here (read otherwise) are level 0; one on the path is a cycle
                out[key] = max((out.get(k, 0 if k not in before else -1) + 1 for k in before.get(key, ())
                                if state.get(k) != 1), default=0)
                state[key] = 2
            stack.pop()
    return {key: out[key] for key in before}


def groups(by_level: Mapping[str, int], passes: int) -> list[list[str]]:
    """The keys to refit, one level per pass, in order: every level >= 1 where there are at most
    ``passes`` of them, else the ``passes`` deepest (the others keep their first-pass factors).

    One level per pass keeps every refit exact: the weights before a refitted one are final when
    its pass runs (refitted already, or never to be). Sharing passes between consecutive levels
    would not: a weight would be fitted to the first-pass factors of the weights before it in its
    own pass, which then change under it (on ResNet50, four shared passes over its ~50 levels made
    the output error 2.7 times that of the first pass alone; measured 2026-12-01)."""
    distinct = sorted({lv for lv in by_level.values() if lv > 0})
    chosen = distinct[len(distinct) - passes:] if 0 < passes < len(distinct) else distinct if passes else []
    return [sorted(k for k, lv in by_level.items() if lv == level) for level in chosen]


def compressed_value(model: LoadedModel, transform: Transform, site: Any, factors: Mapping[str, np.ndarray]) -> np.ndarray:
    """The weight of ``site`` as ``factors`` give it, in the variable's shape (float32)."""
    return views.invert_numpy(transform.numpy_dense(factors, site.size), site.view,
                              model.infos[site.variable.key].shape).astype(np.float32)


def refine(model: LoadedModel, plan: RewritePlan, transform: Transform, initial: dict[str, dict[str, np.ndarray]],
           passes: int, progress: Callable[[str], None], plain: Mapping[str, Mapping[str, np.ndarray]] | None = None
           ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Refits the calibrated sites downstream of other sites, in place in ``initial`` (site id ->
    factor values). Returns, per refitted site id, its chained output errors (``whiten.chained_error``
    on the calibration rows, given the compressed sites before it: of its factors, of the first
    pass's and of plain ones) and its level, and per site left out, why (``feedback``); and per
    site id whose refit was kept, that refit fitted without the held-out batches (the trial that
    graphrewrite.rewriting.calibration.modelcheck checks the model with). A refit is kept only where it lowers
    that error (always, up to rounding, for low rank: it is the optimum) and where, fitted without
    the pass's held-out batches, it lowers it on them too. ``plain``: the sites' factors from the
    weight alone where already computed (statistics.plain_factors)."""
    stats = model.calibration
    by_key = {site.variable.key: site for site in plan.sites}
    calibrated = [key for key, site in by_key.items() if site.size.details.get("factors") == "calibrated"
                  and (isinstance(whiten.inner(stats.grams[key]), (whiten.RowGram, whiten.OutputGram))
                       or np.ndim(whiten.inner(stats.grams[key])) == 2)]
    by_level = levels(model, stats.signature, list(by_key)) if calibrated and passes else {}
    errors: dict[str, dict[str, Any]] = {}
    trials: dict[str, dict[str, np.ndarray]] = {}
    candidates = []
    for key in calibrated:
        if by_level.get(key, 0) == 0:
            continue
        need = int(np.ceil(MIN_ROWS_PER_FEATURE * by_key[key].size.m))
        if stats.rows[key] < need:
            errors[by_key[key].id] = {"feedback": f"not refitted: {stats.rows[key]:,} calibration rows for "
                                                  f"{by_key[key].size.m:,} input features (error feedback needs "
                                                  f"{need:,})"}
        else:
            candidates.append(key)
    chosen = groups({k: by_level[k] for k in candidates}, passes)

    def compressed(key: str) -> np.ndarray:  # the weight as its current factors give it
        return compressed_value(model, transform, by_key[key], initial[by_key[key].id])

    replaced = {key: compressed(key) for key in by_key} if chosen else {}  # updated as refits are kept
    for number, keys in enumerate(chosen, 1):
        progress(f"calibration: error-feedback pass {number}/{len(chosen)} ({len(keys)} weights)")
        result = stats.rerun(replaced, keys)
        for key in keys:
            if key not in result.tilde:
                continue
            site = by_key[key]
            matrix = model.matrix(key, site.view)
            gram, tilde, cross = result.grams[key], result.tilde[key], result.cross[key]
            refitted = transform.factorize_calibrated(whiten.feedback_target(matrix, tilde, cross), site.size, tilde)

            def chained(factors: Mapping[str, np.ndarray], grams: tuple[np.ndarray, ...], site=site,
                        matrix=matrix, measured=gram) -> float:  # measured as the pass's Gram (shift-free)
                return whiten.chained_error(matrix, transform.numpy_dense(factors, site.size),
                                            whiten.like(measured, grams[0]), *grams[1:])

            every = (gram, tilde, cross)
            first, after = chained(initial[site.id], every), chained(refitted, every)
            why, trial = _held_out_check(transform, site, matrix, initial[site.id], result, key, chained)
            if why is None and after > first:
                # low rank's refit is the optimum of this objective (damped); input/output's is a
                # fit that may not be
                why = f"refit not kept: output error {after:.4f} against {first:.4f} with the first pass's factors"
            if why is None:
                initial[site.id] = refitted
                replaced[key] = compressed(key)
                if trial is not None:
                    trials[site.id] = trial
            errors[site.id] = {"output_error": first if why else after, "output_error_first_pass": first,
                               "output_error_plain": chained((plain or {}).get(site.id)
                                                             or transform.factorize(matrix, site.size), every),
                               "feedback_level": by_level[key], **({"feedback": why} if why else {})}
    return errors, trials


def _held_out_check(transform: Transform, site: Any, matrix: np.ndarray, first: Mapping[str, np.ndarray],
                    result: Any, key: str, chained: Callable[..., float]
                    ) -> tuple[str | None, dict[str, np.ndarray] | None]:
    """``(why a refit is not kept or None, the trial refit)``: refitted without the pass's held-out
    batches (the trial), it must reproduce ``X A`` on them better than the first pass's factors (a
    refit is a regression of ``X A`` on ``X~``, which can fit the calibration rows and not the
    inputs to come). Passes with no held-out batch (fewer than statistics.HOLD_OUT_EVERY batches)
    are not checked (no trial)."""
    rows, held = result.held_rows.get(key, 0), result.held.get(key)
    total = result.rows[key]
    if held is None or not 0 < rows < total:
        return None, None
    every = np.stack([whiten.inner(result.grams[key]), whiten.inner(result.tilde[key]), result.cross[key]])
    fitted = without(every, total, held, rows)  # the other batches' Grams
    trial = transform.factorize_calibrated(whiten.feedback_target(matrix, fitted[1], fitted[2]), site.size,
                                           whiten.like(result.tilde[key], fitted[1]))
    before, after = chained(first, tuple(held)), chained(trial, tuple(held))
    if after < before:
        return None, trial
    return (f"refit not kept: on the held-out calibration rows ({rows:,}) it gives output error {after:.4f} "
            f"against {before:.4f} with the first pass's factors"), trial


__all__ = ["DEFAULT_PASSES", "MIN_ROWS_PER_FEATURE", "compressed_value", "groups", "levels", "refine"]
