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
  per float output ``||Y_c - Y||_F / ||Y||_F`` over the examples, the model's error the largest
  over its outputs;
- the set with the lowest error is kept (a tie keeps the more data-aware one), with its factors
  fitted on all examples; the manifest's ``options.calibration.model_check`` has every figure.

What this estimates: how far the compressed model's outputs are from the original's on inputs
like the calibration data that its factors were not fitted to. It is slightly optimistic for error
feedback: a refit's trial leaves the held-out rows out of its own Grams, but the rows it regresses
on came through the weights before it with their factors fitted on all examples. Integer outputs
(class ids) are not compared. A weight read inside a While body (a recurrent kernel) keeps its
value in the check (replay's limit), so the check leaves out its error in all three sets alike.
Cost: per set one pass of the held-out examples through the signature, and the set's compressed
weights sent to the sandbox (the three sets: up to three times the compressed weights' size).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import views
from graphrewrite.rewriting import replay
from graphrewrite.rewriting.model import LoadedModel
from graphrewrite.rewriting.plan import RewritePlan
from graphrewrite.rewriting.statistics import HOLD_OUT_EVERY
from graphrewrite.transforms import Transform

PLAIN, FIRST_PASS, FEEDBACK = "plain", "first pass", "error feedback"


def choose(model: LoadedModel, plan: RewritePlan, transform: Transform, initial: dict[str, dict[str, np.ndarray]],
           first_pass: Mapping[str, Mapping[str, np.ndarray]], trials: Mapping[str, Mapping[str, np.ndarray]],
           progress: Callable[[str], None]) -> dict[str, Any] | None:
    """Checks the model with each set of factors (see the module doc) and keeps the best in
    ``initial`` (site id -> factors; it holds error feedback's on entry, ``first_pass`` the first
    pass's, ``trials`` the kept refits fitted without the held-out batches). Returns what the
    manifest records, or None without calibrated sites."""
    stats = model.calibration
    sites = [s for s in plan.sites if s.size.details.get("factors") == "calibrated"]
    if stats is None or stats.check is None or not sites:
        return None
    fitted = {s.id: stats.fitted(s.variable.key) for s in sites}
    if any(g is None for g in fitted.values()):
        return {"checked": False, "why": f"fewer than {HOLD_OUT_EVERY} batches of calibration examples: "
                                         "none to hold out"}
    plain, first_trial = {}, {}
    for site in sites:
        matrix = views.apply_numpy(model.variables[site.variable.key].numpy(), site.view).astype(np.float32)
        plain[site.id] = transform.factorize(matrix, site.size)
        first_trial[site.id] = transform.factorize_calibrated(matrix, site.size, fitted[site.id])
    sets = {FIRST_PASS: first_trial, PLAIN: plain}
    refitted = [sid for sid in initial if initial[sid] is not first_pass.get(sid)]  # refine replaced them
    if refitted:
        sets = {FEEDBACK: {**first_trial, **{sid: trials[sid] for sid in refitted if sid in trials}}, **sets}

    by_id = {s.id: s for s in plan.sites}

    def value(sid: str, factors: Mapping[str, np.ndarray]) -> np.ndarray:
        site = by_id[sid]
        return views.invert_numpy(transform.numpy_dense(factors, site.size), site.view,
                                  model.infos[site.variable.key].shape).astype(np.float32)

    common = {s.variable.key: value(s.id, initial[s.id]) for s in plan.sites if s.id not in plain}
    variants = [{by_id[sid].variable.key: value(sid, f) for sid, f in factors.items()} for factors in sets.values()]
    progress(f"calibration: checking the compressed model on the held-out examples ({', '.join(sets)})")
    outputs = stats.check(common, variants)
    worst = {name: max(errors.values(), default=0.0) for name, errors in zip(sets, outputs)}
    kept = min(sets, key=lambda name: worst[name])  # in order: a tie keeps the first (more data-aware)
    if kept == PLAIN:
        initial.update(plain)
    elif kept == FIRST_PASS:
        initial.update({sid: first_pass[sid] for sid in refitted})
    return {"checked": True, "examples": stats.held_examples, "errors": worst,
            "outputs": dict(zip(sets, outputs)), "kept": kept}


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
    out = dict(chained)
    if FEEDBACK in errors:
        why = (f"refit not kept: the model check kept the {kept} factors (model output error {errors[kept]:.4f} "
               f"against {errors[FEEDBACK]:.4f} with error feedback's)")
        out = {sid: (entry if "feedback" in entry else {"feedback": why}) for sid, entry in chained.items()}
    if kept == PLAIN:
        for site in plan.sites:
            if site.size.details.get("factors") == "calibrated":
                out[site.id] = {**out.get(site.id, {}), "factors": "plain (kept by the model check)"}
    return out


def errors_job(input_dir: str, tags: Sequence[str], object_based: bool, data: Mapping[str, np.ndarray],
               signature: str, batch: int, common: Mapping[str, np.ndarray],
               variants: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, float]]:
    """Sandbox job: loads the model and returns ``errors`` of each variant."""
    from graphrewrite.rewriting import loader

    return errors(loader.load(input_dir, tags, object_based), data, signature, batch, common, variants)


def errors(model: LoadedModel, data: Mapping[str, np.ndarray], signature: str, batch: int,
           common: Mapping[str, np.ndarray], variants: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, float]]:
    """Per variant (variable key -> value, with ``common`` for the keys it lacks; a key in neither
    keeps the model's value), per float output
    of ``signature``, ``||Y_c - Y||_F / ||Y||_F`` over the examples ``data`` (checked calibration
    arrays, run ``batch`` at a time), Y the model's outputs and Y_c those with the variables
    replaced (inf where they are not finite)."""
    import tensorflow as tf

    fir = model.functions[f"signature:{signature}"]
    structured = model.signature_functions[signature].structured_outputs
    names = sorted(structured) if isinstance(structured, Mapping) and len(structured) == len(fir.outputs) else [
        f"output {i}" for i in range(len(fir.outputs))]
    pruned = replay.Pruned(fir, model, fir.outputs)
    keys = sorted({*common, *(k for v in variants for k in v)})
    holders = {k: tf.Variable(tf.zeros(model.infos[k].shape, model.variables[k].dtype), trainable=False) for k in keys}
    inputs = sorted(data)
    specs = [tf.TensorSpec([None, *data[n].shape[1:]], tf.as_dtype(data[n].dtype)) for n in inputs]

    def function(swap: Mapping[str, Any] | None) -> Any:
        @tf.function(input_signature=specs, autograph=False)
        def run(*values: Any) -> Any:
            outputs = pruned.run(pruned.feeds(values), swap)
            return [outputs[t] for t in pruned.wanted]
        return run

    examples = len(data[inputs[0]])
    batches = [[data[n][start:start + batch] for n in inputs] for start in range(0, examples, batch)]
    run = function(None)
    original = [[y.numpy() for y in run(*values)] for values in batches]
    floating = [np.issubdtype(y.dtype, np.floating) for y in original[0]] if original else []
    run = function(holders)
    out = []
    for variant in variants:
        for key in keys:
            value = variant[key] if key in variant else common[key] if key in common else model.variables[key]
            holders[key].assign(tf.cast(value, holders[key].dtype))
        num, den = np.zeros(len(names)), np.zeros(len(names))
        for values, ys in zip(batches, original):
            for i, (y, y_c) in enumerate(zip(ys, run(*values))):
                if floating[i]:
                    y, y_c = y.astype(np.float64), y_c.numpy().astype(np.float64)
                    num[i] += np.sum(np.square(y_c - y)) if np.all(np.isfinite(y_c)) else np.inf
                    den[i] += np.sum(np.square(y))
        out.append({name: float(np.sqrt(n / d)) if d > 0 else float(n > 0)
                    for name, n, d, f in zip(names, num, den, floating) if f})
    return out


__all__ = ["FEEDBACK", "FIRST_PASS", "PLAIN", "choose", "errors", "notes"]
