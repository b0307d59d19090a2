"""The model check: the compressed model's outputs against the original's, on held-out examples.

Every figure before this one is a weight's: its output error on the rows it multiplies (whiten,
feedback). What the user gets is the model, and a weight's error is not the model's: on the test
zoo's ResNet50 at 32 x 32, error feedback halved three weights' own errors and made the model's
output 3% worse. So with calibration data, compress checks the model itself and keeps whichever
factors make it closest to the original:

- the held-out examples are those of every statistics.HOLD_OUT_EVERY-th batch of the calibration
  pass (128 of 512); every factor checked on them is fitted without them: the first pass's on the
  other batches' Grams (``Statistics.fitted``), error feedback's refits likewise
  (``feedback.refine``'s trials);
- three sets of factors are checked, each for every calibrated site (the others are the same in
  all three): *plain* (from the weight alone, at the plan's ranks: data cannot have fitted them),
  the *first pass*, and *error feedback* (the refits where kept, else the first pass), where
  error feedback refitted any weight;
- each runs the signature (``replay.Pruned``: the model's own graph, every site's weight read as
  its compressed value, alpha = 0) on the held-out examples in the sandbox, against the original:
  per float output ``||Y_c - Y||_F / ||Y||_F`` over the examples; the model's error is the root
  of their sum of squares (one output: its relative error), a sum over examples;
- the most data-aware set stands unless a less data-aware one is better on the held-out examples
  beyond their noise (``decide``: paired per-example differences, Z_TO_SWITCH standard errors):
  with 64 or 128 examples a small model's figure moves by a quarter between draws (the tf.keras
  LSTM of tests/test_recurrent.py at rank=400: 0.76-0.99 for the same factors), and the examples
  are paired but few. The kept set's factors are those fitted on all examples; the manifest's
  ``options.calibration.model_check`` has every figure and each comparison's z.

What this estimates: how far the compressed model's outputs are from the original's on inputs
like the calibration data that its factors were not fitted to. It is slightly optimistic for error
feedback: a refit's trial leaves the held-out rows out of its own Grams, but the rows it regresses
on came through the weights before it with their factors fitted on all examples. Integer outputs
(class ids) are not compared.
Cost: per set one pass of the held-out examples through the signature, and the compressed
weights sent to the sandbox: the first pass's and the other sites' once, plain ones for the
calibrated sites, error feedback's for the refitted ones (up to about twice the compressed
weights' size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.rewriting.calibration import replay
from graphrewrite.rewriting.calibration.feedback import compressed_value
from graphrewrite.rewriting.calibration.statistics import (
    HOLD_OUT_EVERY,
    output_names,
    plain_factors,
)
from graphrewrite.rewriting.model import LoadedModel
from graphrewrite.rewriting.plan import RewritePlan
from graphrewrite.transforms import Transform

PLAIN, FIRST_PASS, FEEDBACK = "plain", "first pass", "error feedback"


def choose(model: LoadedModel, plan: RewritePlan, transform: Transform, initial: dict[str, dict[str, np.ndarray]],
           first_pass: Mapping[str, Mapping[str, np.ndarray]], trials: Mapping[str, Mapping[str, np.ndarray]],
           progress: Callable[[str], None], plain: Mapping[str, Mapping[str, np.ndarray]] | None = None
           ) -> dict[str, Any] | None:
    """Checks the model with each set of factors (see the module doc) and keeps the best in
    ``initial`` (site id -> factors; it holds error feedback's on entry, ``first_pass`` the first
    pass's, ``trials`` the kept refits fitted without the held-out batches). Returns what the
    manifest records, or None without calibrated sites. ``plain``: statistics.plain_factors, where
    already computed."""
    stats = model.calibration
    sites = [s for s in plan.sites if s.size.details.get("factors") == "calibrated"]
    if stats is None or stats.check is None or not sites:
        return None
    fitted = {s.id: stats.fitted(s.variable.key) for s in sites}
    if any(g is None for g in fitted.values()):
        return {"checked": False, "why": f"fewer than {HOLD_OUT_EVERY} batches of calibration examples: "
                                         "none to hold out"}
    plain = dict(plain) if plain is not None else plain_factors(model, plan, transform)
    first_trial = {}
    for site in sites:
        matrix = model.matrix(site.variable.key, site.view)
        first_trial[site.id] = transform.factorize_calibrated(matrix, site.size, fitted[site.id])
    sets = {FIRST_PASS: first_trial, PLAIN: plain}
    refitted = [sid for sid in initial if initial[sid] is not first_pass.get(sid)]  # refine replaced them
    if refitted:
        sets = {FEEDBACK: {**first_trial, **{sid: trials[sid] for sid in refitted if sid in trials}}, **sets}

    by_id = {s.id: s for s in plan.sites}

    def value(sid: str, factors: Mapping[str, np.ndarray]) -> np.ndarray:
        return compressed_value(model, transform, by_id[sid], factors)

    # what the sets share goes once: the other sites, and the first pass's trial (error feedback's
    # set differs from it in the refitted sites only)
    common = {s.variable.key: value(s.id, initial[s.id]) for s in plan.sites if s.id not in plain}
    common.update({by_id[sid].variable.key: value(sid, f) for sid, f in first_trial.items()})
    variants = [{by_id[sid].variable.key: value(sid, f) for sid, f in factors.items() if f is not first_trial.get(sid)}
                for factors in sets.values()]
    progress(f"calibration: checking the compressed model on the held-out examples ({', '.join(sets)})")
    results = dict(zip(sets, stats.check(common, variants)))
    kept, z = decide({name: r["scores"] for name, r in results.items()})
    if kept == PLAIN:
        initial.update(plain)
    elif kept == FIRST_PASS:
        initial.update({sid: first_pass[sid] for sid in refitted})
    return {"checked": True, "examples": stats.held_examples,
            "errors": {name: float(np.sqrt(np.sum(r["scores"]))) for name, r in results.items()},
            "outputs": {name: r["outputs"] for name, r in results.items()}, "z": z, "kept": kept}


# A less data-aware set of factors replaces a more data-aware one only where the held-out examples
# say so beyond their noise: the mean per-example difference of their errors more than this many
# standard errors below zero (about 2.3% of such differences by chance, one-sided).
Z_TO_SWITCH = 2.0
Z_CAP = 1e6


def decide(scores: Mapping[str, np.ndarray]) -> tuple[str, dict[str, float]]:
    """``(the set kept, z per set compared)`` from each set's per-example errors (``scores``: the
    sets in order, most data-aware first; equal-length arrays over the same examples). The first
    set stands until a later one is better on the held-out examples by Z_TO_SWITCH standard errors
    of the paired differences: ``z = mean(d) / (sd(d) / sqrt(n))``, ``d = s_later - s_standing``."""
    names = list(scores)
    kept, z = names[0], {}
    for name in names[1:]:
        d = np.asarray(scores[name], np.float64) - np.asarray(scores[kept], np.float64)
        spread = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        mean = float(np.mean(d)) if len(d) else 0.0
        # capped, so that the manifest stays plain JSON where all differences are equal
        z[name] = float(np.clip(mean / spread, -Z_CAP, Z_CAP)) if spread > 0 else float(np.sign(mean) * Z_CAP)
        if z[name] < -Z_TO_SWITCH:
            kept = name
    return kept, z


def notes(check: Mapping[str, Any] | None, chained: Mapping[str, dict[str, Any]],
          plan: RewritePlan) -> dict[str, dict[str, Any]]:
    """Per site id, what the manifest adds to its details after the check: error feedback's
    figures (``feedback.refine``) where the check kept its factors; where it kept others, that the
    refits were not kept (the sites' errors are then the first pass's or plain ones:
    statistics.record_errors computes them), and with plain ones kept, ``factors`` says so."""
    kept = (check or {}).get("kept")
    if kept in (None, FEEDBACK):
        return dict(chained)
    errors = check["errors"]
    why = (f"refit not kept: the model check kept the {kept} factors (model output error {errors[kept]:.4f}"
           + (f" against {errors[FEEDBACK]:.4f} with error feedback's)" if FEEDBACK in errors else ")"))
    out = {sid: (entry if "feedback" in entry else {"feedback": why}) for sid, entry in chained.items()}
    if kept == PLAIN:  # no first-pass figures either: record_errors computes the plain factors'
        out = {sid: {"feedback": entry.get("feedback", why)} for sid, entry in out.items()}
        for site in plan.sites:
            if site.size.details.get("factors") == "calibrated":
                out[site.id] = {**out.get(site.id, {}), "factors": "plain (kept by the model check)"}
    return out


def errors_job(input_dir: str, tags: Sequence[str], object_based: bool, data: Mapping[str, np.ndarray],
               signature: str, batch: int, common: Mapping[str, np.ndarray],
               variants: Sequence[Mapping[str, np.ndarray]], logits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Sandbox job: loads the model and returns ``errors`` of each variant."""
    from graphrewrite.rewriting import loader

    return errors(loader.load_reused(input_dir, tags, object_based), data, signature, batch, common, variants, logits)


def errors(model: LoadedModel, data: Mapping[str, np.ndarray], signature: str, batch: int,
           common: Mapping[str, np.ndarray], variants: Sequence[Mapping[str, np.ndarray]],
           logits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per variant (variable key -> value, with ``common`` for the keys it lacks; a key in neither
    keeps the model's value), on the examples ``data`` (checked calibration arrays, run ``batch``
    at a time), with Y a float output of ``signature`` and Y_c the same with the variables
    replaced: ``outputs``, per output ``||Y_c - Y||_F / ||Y||_F``, and ``scores``, per example
    ``sum over the outputs of ||y_c - y||^2 / ||Y||_F^2`` (its rows y), whose sum is the outputs'
    summed squared relative errors (inf where Y_c is not finite). The outputs named in ``logits``
    (statistics.output_names), where of rank 2 or more with at least 2 entries on the last axis, are compared with each row's mean over the
    last axis removed (from Y and Y_c alike: a softmax or argmax of them does not see it)."""
    import tensorflow as tf

    fir = model.functions[f"signature:{signature}"]
    names = output_names(model, signature)
    pruned = replay.Pruned(fir, model, fir.outputs)
    keys = sorted({*common, *(k for v in variants for k in v)})
    holders = {k: tf.Variable(tf.zeros(model.infos[k].shape, model.variables[k].dtype), trainable=False) for k in keys}
    inputs = sorted(data)
    specs = replay.input_specs(data, inputs)
    examples = len(data[inputs[0]])
    batches = replay.batches(data, inputs, batch)
    run = pruned.outputs(specs)

    def centred(y: np.ndarray, name: str) -> np.ndarray:
        y = np.asarray(y, np.float64)
        return y - y.mean(axis=-1, keepdims=True) if name in logits and y.ndim >= 2 and y.shape[-1] >= 2 else y

    original = [[y.numpy() for y in run(*values)] for values in batches]
    floating = [np.issubdtype(y.dtype, np.floating) for y in original[0]] if original else []
    run = pruned.outputs(specs, holders)
    energy = [sum(float(np.sum(np.square(centred(ys[i], names[i])))) for ys in original) if f else 0.0
              for i, f in enumerate(floating)]
    out = []
    for variant in variants:
        for key in keys:
            value = variant[key] if key in variant else common[key] if key in common else model.variables[key]
            holders[key].assign(tf.cast(value, holders[key].dtype))
        squared = np.zeros((len(names), examples))  # per output, per example: ||y_c - y||^2
        start = 0
        for values, ys in zip(batches, original):
            for i, (y, y_c) in enumerate(zip(ys, run(*values))):
                if floating[i]:
                    diff = centred(y_c.numpy().astype(np.float64) - y.astype(np.float64), names[i])
                    count = len(values[0])
                    if diff.ndim and diff.shape[0] == count:
                        per = np.sum(np.square(diff).reshape(count, -1), axis=1)
                    else:  # an output without the batch dimension: its error spread evenly
                        per = np.full(count, np.sum(np.square(diff)) / count)
                    squared[i, start:start + len(diff)] = np.where(np.isfinite(per), per, np.inf)
            start += len(values[0])
        relative = [squared[i] / energy[i] if energy[i] > 0 else np.where(squared[i] > 0, np.inf, 0.0)
                    for i in range(len(names))]
        out.append({"outputs": {name: float(np.sqrt(np.sum(r))) for name, r, f in zip(names, relative, floating) if f},
                    "scores": np.sum([r for r, f in zip(relative, floating) if f] or [np.zeros(examples)], axis=0)})
    return out


__all__ = ["FEEDBACK", "FIRST_PASS", "PLAIN", "choose", "errors", "notes"]
