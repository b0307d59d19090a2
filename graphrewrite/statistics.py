"""Calibration statistics: one pass of example inputs through the original model, one Gram per weight.

For every weight read by the chosen signature, the rows ``x`` that multiply its matrix view ``W``
(``y = x @ W``; a Conv2D's im2col patches, an Einsum's contracted axes) are reduced, inside the
model's own inlined graph, to their Gram ``X^T X``; only those m x m matrices leave TensorFlow,
and they are summed (float64) over batches and divided by the number of rows. A weight read by
several ops sums the Grams of all its readers (its output error is the sum of theirs).

The pass runs a pruned copy of the flat signature function: only the ops the weights' inputs
depend on, so the layers after the last weight are not even computed. It is a function of (loaded
model, data) returning numpy arrays, so that it can run in another process.

Memory bound, besides the model and the calibration arrays: the float64 accumulators,
``8 * sum(m_i^2)`` bytes over the sites (a ResNet50's 54 sites: 0.26 GB), the activations of one
batch (``batch_size`` examples), and for each Conv2D site at most ``PATCH_FLOATS`` (64 MiB) of
im2col patches, or one example's where that is more: patches are extracted and reduced a chunk of
examples at a time (``tf.image.extract_patches`` in a ``tf.while_loop``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import calibration, sandbox, views, whiten
from graphrewrite.calibration import InputSpec
from graphrewrite.errors import CalibrationDataError, UsageError, first_line
from graphrewrite.match import Use, match_function
from graphrewrite.model import FunctionIR, LoadedModel
from graphrewrite.ops import ADAPTERS, OpAdapter
from graphrewrite.plan import RewritePlan
from graphrewrite.transforms import Transform

DEFAULT_BATCH = 32
PATCH_FLOATS = 1 << 24  # 64 MiB of im2col patches at most at once


@dataclasses.dataclass
class Statistics:
    """What one calibration pass measured.

    Attributes:
      signature: the signature the examples went through.
      examples: how many examples.
      grams: variable key -> ``X^T X / rows`` (float64, m x m) of the rows that multiply its matrix.
      rows: variable key -> the number of rows behind its Gram.
      missing: variable key -> why a weight read by the signature has no statistics.
    """

    signature: str
    examples: int
    grams: dict[str, np.ndarray]
    rows: dict[str, int]
    missing: dict[str, str]


def check_method(transform: Transform) -> None:
    """Refuses --calibration for methods without a data-aware factorisation (before any work)."""
    if type(transform).factorize_calibrated is Transform.factorize_calibrated:
        raise UsageError(f"--calibration: method {transform.name} does not use calibration data "
                         "(low_rank and input_output do)")


def calibrate(model: LoadedModel, source: calibration.Calibration, signature: str,
              progress: Callable[[str], None], input_dir: str, tags: Sequence[str], object_based: bool,
              limits: sandbox.Limits | None = None) -> Statistics:
    """Reads and checks ``source`` against ``signature`` here, then collects its statistics in the
    sandbox (the calibration pass runs the model's own ops on the data: graphrewrite.sandbox), from
    the same model directory loaded there; variable keys are the loader's, stable across loads."""
    data = calibration.read(source, input_specs(model, signature))
    progress(f"calibration: {len(next(iter(data.values())))} examples of {signature}, in the sandbox")
    return sandbox.run("graphrewrite.statistics:collect_job", input_dir, list(tags), object_based, data,
                       signature, what=f"{input_dir}: the calibration pass", limits=limits)


def collect_job(input_dir: str, tags: Sequence[str], object_based: bool, data: Mapping[str, np.ndarray],
                signature: str) -> Statistics:
    """Sandbox job: loads the model and runs ``collect`` on the checked data."""
    from graphrewrite import loader

    return collect(loader.load(input_dir, tags, object_based), data, signature)


def spectrum(matrix: np.ndarray, stats: Statistics | None, key: str) -> np.ndarray | None:
    """Singular values in output space (of the whitened matrix) where ``key`` has a Gram, else None."""
    gram = stats.grams.get(key) if stats is not None else None
    return None if gram is None else whiten.whitened_spectrum(matrix, gram)


def mark_plan(plan: RewritePlan, stats: Statistics) -> RewritePlan:
    """The plan with each site whose weight has statistics marked ``factors: calibrated`` (and why
    the others are not), and the calibration recorded in its options."""
    sites = []
    for site in plan.sites:
        key = site.variable.key
        if key in stats.grams:
            extra = {"factors": "calibrated"}
        else:
            extra = {"calibration": stats.missing.get(key, f"not read by signature {stats.signature!r}")}
        sites.append(dataclasses.replace(site, size=dataclasses.replace(
            site.size, details={**site.size.details, **extra})))
    options = {**plan.options, "calibration": {"signature": stats.signature, "examples": stats.examples,
                                               "damping": whiten.DAMPING}}
    return dataclasses.replace(plan, sites=tuple(sites), options=options)


def record_errors(sites: Sequence[dict[str, Any]], model: LoadedModel, plan: RewritePlan, transform: Transform,
                  initial: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Adds to each calibrated site of a manifest ``output_error`` (its factors' relative output
    error on the calibration rows, ``||X (A - W_c)|| / ||X A||``) and ``output_error_plain`` (the
    same for the factors computed from the weight alone)."""
    stats = model.calibration
    for entry, site in zip(sites, plan.sites):
        if site.size.details.get("factors") != "calibrated":
            continue
        gram = stats.grams[site.variable.key]
        matrix = views.apply_numpy(model.variables[site.variable.key].numpy(), site.view).astype(np.float32)
        plain = transform.factorize(matrix, site.size)
        entry["details"]["output_error"] = whiten.output_error(
            matrix, transform.numpy_dense(initial[site.id], site.size), gram)
        entry["details"]["output_error_plain"] = whiten.output_error(
            matrix, transform.numpy_dense(plain, site.size), gram)


def input_specs(model: LoadedModel, signature: str) -> list[InputSpec]:
    """The inputs of ``signature``, or a CalibrationDataError naming the signatures there are."""
    function = model.signature_functions.get(signature)
    if function is None or f"signature:{signature}" not in model.functions:
        raise CalibrationDataError(
            f"--calibration-signature {signature!r}: the model has no such signature "
            f"(it has {sorted(model.signature_functions)})")
    specs = function.structured_input_signature[1]
    out = []
    for name in sorted(specs):
        spec = specs[name]
        shape = tuple(spec.shape.as_list()) if spec.shape.rank is not None else ()
        if spec.shape.rank is None or not (spec.dtype.is_floating or spec.dtype.is_integer or spec.dtype.is_bool):
            raise CalibrationDataError(f"signature {signature!r}: input {name!r} ({spec.dtype.name}, "
                                       "unknown rank or not numeric) cannot take calibration arrays")
        out.append(InputSpec(name, shape, np.dtype(spec.dtype.as_numpy_dtype)))
    return out


def collect(model: LoadedModel, data: Mapping[str, np.ndarray], signature: str,
            batch_size: int = DEFAULT_BATCH, progress: Callable[[str], None] = lambda _: None) -> Statistics:
    """Runs the checked calibration ``data`` (calibration.read) through ``signature`` once."""
    fir = model.functions[f"signature:{signature}"]
    uses, _ = match_function(fir, dict(model.infos))
    by_variable: dict[str, list[Use]] = {}
    for use in uses:
        by_variable.setdefault(use.variable, []).append(use)
    missing = {key: reason for key, group in by_variable.items() if (reason := _unsupported(fir, group))}
    kept = [u for u in uses if u.variable not in missing]
    names = sorted(data)
    examples = len(data[names[0]])
    grams = {key: np.zeros((group[0].m, group[0].m)) for key, group in by_variable.items() if key not in missing}
    rows = dict.fromkeys(grams, 0)
    if kept:
        run = _gram_function(fir, model, kept, [data[n].dtype for n in names], [data[n].shape for n in names])
        step = _batch(model, signature, batch_size)
        for start in range(0, examples, step):
            batch = [data[n][start:start + step] for n in names]
            try:
                out_grams, out_rows = run(*batch)
            except Exception as exc:  # noqa: BLE001 - whatever the model raises on these values
                raise CalibrationDataError(
                    f"the model fails on the calibration data: {type(exc).__name__}: {first_line(exc)}") from None
            for use, gram, count in zip(kept, out_grams, out_rows):
                if int(count) < 0:
                    missing[use.variable] = f"no calibration statistics for this {use.op_type} (grouped)"
                elif use.variable in grams:
                    grams[use.variable] += np.asarray(gram, np.float64)
                    rows[use.variable] += int(count)
            progress(f"calibration: {min(start + step, examples)}/{examples} examples through {signature}")
    for key in missing:
        grams.pop(key, None)
        rows.pop(key, None)
    for key in grams:
        grams[key] /= max(rows[key], 1)
        if not np.all(np.isfinite(grams[key])):
            raise CalibrationDataError(f"the inputs of {model.infos[key].name} overflow on the calibration data "
                                       "(non-finite activations)")
    return Statistics(signature, examples, grams, rows, missing)


def _batch(model: LoadedModel, signature: str, batch_size: int) -> int:
    """The batch size: ``batch_size``, or the signature's fixed batch dimension where it has one."""
    specs = model.signature_functions[signature].structured_input_signature[1]
    fixed = {spec.shape[0] for spec in specs.values() if spec.shape.rank and spec.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else batch_size


def _unsupported(fir: FunctionIR, uses: Sequence[Use]) -> str | None:
    for use in uses:
        op = fir.graph[use.op].op
        if type(ADAPTERS[op]).activation_rows is OpAdapter.activation_rows:
            return f"no calibration statistics for {op} inputs"
    return None


def _gram_function(fir: FunctionIR, model: LoadedModel, uses: Sequence[Use], dtypes: Sequence[Any],
                   shapes: Sequence[tuple[int, ...]]) -> Any:
    """A tf.function of the signature's flat inputs returning each use's ``(X^T X, rows)``."""
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2

    graph = fir.graph
    provided = {name.split(":")[0] for name in fir.inputs} | set(fir.handles) | set(fir.reads) | set(fir.captures)
    activations = [graph[u.op].data_inputs[1 - u.operand] for u in uses]
    needed: set[str] = set()
    stack = [e.node for e in activations]
    while stack:
        name = stack.pop()
        if name in needed or name in provided:
            continue
        needed.add(name)
        stack.extend(e.node for e in graph[name].inputs)
    specs = [tf.TensorSpec([None, *shape[1:]], dtype) for shape, dtype in zip(shapes, dtypes)]

    @tf.function(input_signature=specs, autograph=False)
    def run(*inputs: Any) -> tuple[list[Any], list[Any]]:
        mapped = {_canonical(name): value for name, value in zip(fir.inputs, inputs)}
        mapped.update({f"{n}:0": model.variables[k].handle for n, k in fir.handles.items()})
        mapped.update({f"{n}:0": tf.identity(model.variables[k]) for n, k in fir.reads.items()})
        mapped.update({f"{n}:0": tf.identity(model.captured[i]) for n, i in fir.captures.items()})
        stage = graph_pb2.GraphDef()
        stage.versions.CopyFrom(graph.graph_def.versions)
        stage.library.CopyFrom(graph.graph_def.library)
        input_map = {}
        for name in needed:
            proto = stage.node.add()
            proto.CopyFrom(graph[name].proto)
            proto.device = ""
            if "_class" in proto.attr:
                del proto.attr["_class"]
            kept = [e for e in graph[name].inputs if not (e.control and e.node in provided)]
            del proto.input[:]
            proto.input.extend(e.tensor for e in kept)
            input_map.update({e.tensor: mapped[e.tensor] for e in kept if e.node in provided})
        wanted = sorted({e.tensor for e in activations if e.node in needed})
        results = tf.graph_util.import_graph_def(stage, input_map=input_map, return_elements=wanted, name="calib")
        tensors = {**mapped, **dict(zip(wanted, results))}
        out = [_gram(fir, model, use, tensors[edge.tensor]) for use, edge in zip(uses, activations)]
        return [g for g, _ in out], [r for _, r in out]

    return run


def _gram(fir: FunctionIR, model: LoadedModel, use: Use, x: Any) -> tuple[Any, Any]:
    """``(X^T X, rows)`` of one use's activation ``x`` (float32).

    Ops with many rows per example (convolutions) are reduced a chunk of examples at a time, with
    at most PATCH_FLOATS patch values formed at once. Every row counts: the Gram costs ``m^2`` per
    row against the op's own ``m n`` (9x for a 3 x 3 convolution with as many outputs as inputs).
    """
    import tensorflow as tf

    node = fir.graph[use.op]
    adapter = ADAPTERS[node.op]
    shape = views.shape_after(model.infos[use.variable].shape, use.chain)
    x = tf.cast(x, tf.float32)

    def reduce(part: Any) -> tuple[Any, Any]:
        rows = adapter.activation_rows(node, part, use.operand, shape)
        if rows is None:  # known only with the tensor (a grouped convolution): rows = -1 says so
            return tf.zeros([use.m, use.m]), tf.constant(-1, tf.int64)
        return tf.matmul(rows, rows, transpose_a=True), tf.cast(tf.shape(rows)[0], tf.int64)

    if not adapter.rows_per_example:
        return reduce(x)
    chunk = 1
    if x.shape[1:].is_fully_defined():
        positions = int(np.prod(x.shape[1:])) // max(int(shape[-2]), 1)  # an upper bound (stride 1)
        chunk = max(1, PATCH_FLOATS // (positions * use.m))

    def body(i: Any, gram: Any, count: Any) -> tuple[Any, Any, Any]:
        g, r = reduce(x[i:i + chunk])
        return i + chunk, gram + g, count + r

    _, gram, count = tf.while_loop(lambda i, *_: i < tf.shape(x)[0], body,
                                   (tf.constant(0), tf.zeros([use.m, use.m]), tf.constant(0, tf.int64)))
    return gram, count


def _canonical(name: str) -> str:
    return name if ":" in name else f"{name}:0"


__all__ = ["DEFAULT_BATCH", "Statistics", "calibrate", "check_method", "collect", "input_specs", "mark_plan",
           "record_errors", "spectrum"]
