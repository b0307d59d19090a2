"""Calibration statistics: one pass of example inputs through the original model, one Gram per weight.

For every weight read by the chosen signature, the rows ``x`` that multiply its matrix view ``W``
(``y = x @ W``; a Conv2D's or Conv3D's im2col patches, a Conv2DTranspose's input pixels, an
Einsum's contracted axes) are reduced, inside the model's own inlined graph, to their Gram
``X^T X``, summed (float64) over batches and divided by the number of rows. Three exceptions
keep the pass near the cost of a forward pass: a convolution keeps a seeded sample of its patch
rows (ROWS_PER_FEATURE per Gram feature over the pass); a weight whose pass sees no more rows
than it has features keeps the rows themselves (``whiten.RowGram``: no m x m product of rank
N < m to form, and no m^3 Cholesky later); an embedding lookup's rows are one-hot, so its Gram is
the diagonal of lookup counts (bincount in the graph). A weight read by several ops sums the
statistics of all its readers (its output error is the sum of theirs); one read both as a table
and as a matrix (tied) gets none. A weight a While loop multiplies in its body (a recurrent
kernel) has its rows only inside the loop: the pass runs a copy of the loop that sums their Gram
and count as extra loop variables (loops.gram_loop) and takes those outputs. Readers that no
output depends on (Keras computes an RNN's first step before the loop for its shapes only) do
not run and are left out.

With ``outputs`` (low rank, whose factors and errors need only these), a weight with fewer
outputs than inputs (n < m) read by MatMul or BatchMatMul (as their second operand) or Conv2D
keeps instead the Gram of the op's own outputs ``Y = X A`` (n x n) and the mean squared norm of
its input rows, ``tr(X^T X) / rows`` (whiten.OutputGram: the same damped whitened factors and
spectrum). The outputs are computed by the model anyway, so no im2col patches are formed: a
convolution's row norms are the patch sums of one channel, the input's squared norm summed over
channels, through the op's own window (``Conv.patch_energy``). These take every row, not a sample
(a row costs n^2 against the op's m n): the statistic is ``A^T G A`` of the Gram ``G`` of all the
rows, which the input Gram only estimates from its sample.

The pass runs a pruned copy of the flat signature function: only the ops the weights' inputs
depend on, so the layers after the last weight are not even computed (its tf.function, and the
reductions of one batch inside it, are graphrewrite.rewriting.calibration.passgraph; this module chooses
each weight's statistic and sums the batches). It is a function of (loaded
model, data) returning numpy arrays, so that it can run in another process.

Memory bound, besides the model and the calibration arrays: ``16 * sum(d_i^2)`` bytes over the
sites, ``d_i`` the side of the Gram kept (m, or n for an output Gram; float64 Grams, or float32
rows, at most m of them; a lookup: 8 m; each twice: all batches and the held-out ones, see
HOLD_OUT_EVERY), the activations of one
batch (``batch_size`` examples), and for each convolution at most ``passgraph.PATCH_FLOATS`` (64 MiB) of
patches, or one example's where that is more: patches are extracted a chunk of examples at a time
(``tf.image.extract_patches``; in a ``tf.while_loop`` where a batch is more than one chunk),
sampled, then reduced.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import whiten
from graphrewrite.errors import CalibrationDataError, UsageError, first_line
from graphrewrite.rewriting import loops, sandbox
from graphrewrite.rewriting.calibration import passgraph, reader, shift
from graphrewrite.rewriting.calibration.reader import InputSpec
from graphrewrite.rewriting.graph import Edge
from graphrewrite.rewriting.match import Use, match_function
from graphrewrite.rewriting.model import FunctionIR, LoadedModel
from graphrewrite.rewriting.ops import ADAPTERS, BatchMatMul, MatMul, OpAdapter
from graphrewrite.rewriting.plan import RewritePlan
from graphrewrite.transforms import Transform

DEFAULT_BATCH = 32
# Rows kept per Gram feature over the whole pass, for ops with many rows per example (a
# convolution's patches): a batch keeps a seeded random draw (with replacement) of ROWS_PER_FEATURE * m /
# batches of its rows. The Gram is an estimate of E[x x^T] (its scale does not matter to whitening), and
# an m x m sample Gram from N independent rows has relative spectral error about sqrt(m / N):
# 16 rows per feature puts it near 0.25, with the damping (1% of the mean eigenvalue) keeping the
# small eigenvalues away from zero. Every row costs m^2 against the op's own m n, so the cap bounds
# a convolution's Gram at 16 m^3 multiply-adds over the pass however large its inputs (measured
# against the forward pass: benchmarks/bench_calibration.py --only cost, the README's cost table).
ROWS_PER_FEATURE = 16
# Every HOLD_OUT_EVERY-th batch is also summed apart: factors fitted without those batches are
# checked on them, a refit of error feedback on its weight's outputs (feedback.refine) and the
# compressed model on its outputs (modelcheck).
HOLD_OUT_EVERY = 4


def held_out(data: Mapping[str, np.ndarray], batch: int, held: bool = True) -> dict[str, np.ndarray]:
    """The examples of the held-out batches (every HOLD_OUT_EVERY-th of ``batch`` examples, as
    ``collect`` cuts them); with ``held`` False, those of the other batches."""
    examples = len(next(iter(data.values())))
    index = np.concatenate([np.arange(start, min(start + batch, examples)) for number, start in
                            enumerate(range(0, examples, batch))
                            if (number % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1) == held]
                           or [np.zeros(0, np.int64)])
    return {name: values[index] for name, values in data.items()}


@dataclasses.dataclass
class Statistics:
    """What one calibration pass measured.

    Attributes:
      signature: the signature the examples went through.
      examples: how many examples.
      grams: variable key -> ``X^T X / rows`` (float64, m x m) of the rows that multiply its matrix
        (or a whiten.RowGram of them, a lookup's diagonal, or with ``collect(outputs=True)`` a
        whiten.OutputGram).
      rows: variable key -> the number of rows behind its Gram.
      missing: variable key -> why a weight read by the signature has no statistics.
      tilde: in an error-feedback pass (``collect(replaced=...)``), variable key -> ``X~^T X~ / rows``
        of the rows ``X~`` the weight sees when the ``replaced`` weights are compressed.
      cross: in such a pass, variable key -> ``X~^T X / rows`` (the same sampled rows as ``grams``).
      held: variable key -> the statistic of the held-out batches alone (every HOLD_OUT_EVERY-th;
        they are also in the above): the Gram as in ``grams`` (``fitted`` gives the other batches');
        in an error-feedback pass the stack ``[X^T X, X~^T X~, X~^T X] / rows``, which
        graphrewrite.rewriting.calibration.feedback checks a refit on.
      held_rows: the rows behind ``held``.
    """

    signature: str
    examples: int
    grams: dict[str, np.ndarray]
    rows: dict[str, int]
    missing: dict[str, str]
    tilde: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    cross: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    held: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    held_rows: dict[str, int] = dataclasses.field(default_factory=dict)
    # (common, variants) -> each variant's model errors on the held-out examples, and how many
    # examples those are (set by ``calibrate``: graphrewrite.rewriting.calibration.modelcheck)
    check: Callable[[Mapping[str, np.ndarray], Sequence[Mapping[str, np.ndarray]]], list[dict[str, Any]]] | None = (
        dataclasses.field(default=None, repr=False, compare=False))
    held_examples: int = 0
    # the variable keys that --logits would fit up to a shift of each row (their outputs are the
    # signature's up to a bias), where it was not given (set by ``calibrate``; compress hints at it)
    as_logits: list[str] = dataclasses.field(default_factory=list)
    # (transform, sites, factors, steps, loss, rate, seed, mixup) -> graphrewrite.rewriting.calibration.distill's
    # result: the factors trained on the examples not held out (set by ``calibrate``)
    distill: Callable[..., dict[str, Any]] | None = dataclasses.field(default=None, repr=False, compare=False)
    # (replaced, only) -> Statistics: an error-feedback pass over the same data (set by ``calibrate``)
    rerun: Callable[[Mapping[str, np.ndarray], Sequence[str]], Statistics] | None = dataclasses.field(
        default=None, repr=False, compare=False)

    def fitted(self, key: str) -> whiten.Gram | None:
        """``key``'s Gram without the held-out batches (None where the pass had none or only those):
        what factors checked on the held-out batches are fitted to (graphrewrite.rewriting.calibration.modelcheck)."""
        rows, held = self.rows[key], self.held_rows.get(key, 0)
        if not 0 < held < rows:
            return None
        gram = whiten.inner(self.grams[key])
        if isinstance(gram, whiten.OutputGram):
            part = self.held[key]
            rest = whiten.OutputGram(without(gram.h, rows, part.h, held), without(gram.trace, rows, part.trace, held),
                                     gram.m)
        elif isinstance(gram, whiten.RowGram):  # the held-out rows come last (_Sum.result)
            rest = whiten.RowGram(gram.rows[:rows - held] * np.float32(np.sqrt(rows / (rows - held))))
        else:
            part = self.held[key]  # rows where only row-keeping readers saw the held-out batches
            rest = without(gram, rows, whiten.dense(part) if isinstance(part, whiten.RowGram) else part, held)
        return whiten.like(self.grams[key], rest)


def without(total: Any, rows: int, part: Any, part_rows: int) -> Any:
    """The mean statistic ``X^T X / rows`` of the rows other than ``part``'s (``part`` a mean over
    ``part_rows`` of the ``rows``)."""
    return (total * rows - part * part_rows) / (rows - part_rows)


def check_method(transform: Transform) -> None:
    """Refuses --calibration for methods without a data-aware factorisation (before any work)."""
    if type(transform).factorize_calibrated is Transform.factorize_calibrated:
        raise UsageError(f"--calibration: method {transform.name} does not use calibration data "
                         "(low_rank and input_output do)")


def calibrate(model: LoadedModel, source: reader.Calibration, signature: str,
              progress: Callable[[str], None], input_dir: str, tags: Sequence[str], object_based: bool,
              limits: sandbox.Limits | None = None, outputs: bool = False,
              logits: bool | Sequence[str] = False) -> Statistics:
    """Reads and checks ``source`` against ``signature`` here, then collects its statistics in the
    sandbox (the calibration pass runs the model's own ops on the data: graphrewrite.rewriting.sandbox), from
    the same model directory loaded there; variable keys are the loader's, stable across loads.
    ``outputs``: output Grams where they are smaller (``collect``). The Grams of weights whose
    outputs matter only up to a shift of each row (graphrewrite.rewriting.calibration.shift; ``logits``: the
    signature's outputs are logits, True for all of them or a list of their names) come wrapped in
    whiten.ShiftFree, in this pass and in error feedback's, and the model check then compares
    those outputs with each row's mean removed. An unknown output name is a UsageError, before
    the pass."""
    specs = input_specs(model, signature)  # (an unknown signature is a CalibrationDataError)
    names = output_names(model, signature)
    declared = list(names) if logits is True else list(logits or [])
    if unknown := [name for name in declared if name not in names]:
        raise UsageError(f"--logits-output {unknown[0]!r}: signature {signature!r} has the outputs "
                         f"{', '.join(names)}")
    data = reader.read(source, specs)
    progress(f"calibration: {len(next(iter(data.values())))} examples of {signature}, in the sandbox")
    stats = sandbox.run("graphrewrite.rewriting.calibration.statistics:collect_job", input_dir, list(tags),
                        object_based, data, signature, outputs, what=f"{input_dir}: the calibration pass",
                        limits=limits)
    fir = model.functions[f"signature:{signature}"]
    uses = [u for u in match_function(fir, dict(model.infos))[0] if u.variable in stats.grams]
    shapes = {key: tuple(info.shape) for key, info in model.infos.items()}
    free = shift.shift_free(fir, uses, shapes, [fir.outputs[names.index(name)] for name in declared])
    if not declared:
        stats.as_logits = sorted(set(shift.shift_free(fir, uses, shapes, fir.outputs)) - set(free))

    def wrap(grams: Mapping[str, whiten.Gram]) -> dict[str, whiten.Gram]:
        return {key: whiten.ShiftFree(gram, free[key]) if key in free else gram for key, gram in grams.items()}

    stats.grams = wrap(stats.grams)

    def rerun(replaced: Mapping[str, np.ndarray], only: Sequence[str]) -> Statistics:
        result = sandbox.run("graphrewrite.rewriting.calibration.statistics:feedback_job", input_dir, list(tags),
                             object_based, data, signature, dict(replaced), list(only),
                             what=f"{input_dir}: an error-feedback calibration pass", limits=limits)
        result.grams, result.tilde = wrap(result.grams), wrap(result.tilde)
        return result

    batch = _batch(model, signature, DEFAULT_BATCH)
    held = held_out(data, batch)

    def check(common: Mapping[str, np.ndarray], variants: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, Any]]:
        return sandbox.run("graphrewrite.rewriting.calibration.modelcheck:errors_job", input_dir, list(tags),
                           object_based, held, signature, batch, dict(common), [dict(v) for v in variants], declared,
                           what=f"{input_dir}: the model check on held-out calibration examples", limits=limits)

    def distill(transform: Transform, sites: Sequence[Any], factors: Mapping[str, Mapping[str, np.ndarray]],
                steps: int, loss: str, rate: float, seed: int, mixup: bool = True,
                everything: bool = False) -> dict[str, Any]:
        # the job stops itself at an epoch's end past 80% of the sandbox's time (what it had is kept);
        # ``everything``: trains on every example, held-out ones included, all ``steps`` (distill.refit)
        seconds = 0.8 * (limits or sandbox.Limits.from_env()).seconds
        return sandbox.run("graphrewrite.rewriting.calibration.distill:distill_job", input_dir, list(tags),
                           object_based, data if everything else held_out(data, batch, held=False), held,
                           signature, batch, transform, list(sites), dict(factors), steps, loss, rate, seed,
                           seconds, mixup, not everything,
                           what=f"{input_dir}: distilling the factors on the calibration examples", limits=limits)

    stats.rerun, stats.check, stats.held_examples = rerun, check, len(next(iter(held.values())))
    stats.distill = distill
    return stats


def collect_job(input_dir: str, tags: Sequence[str], object_based: bool, data: Mapping[str, np.ndarray],
                signature: str, outputs: bool = False) -> Statistics:
    """Sandbox job: loads the model and runs ``collect`` on the checked data."""
    from graphrewrite.rewriting import loader

    return collect(loader.load_reused(input_dir, tags, object_based), data, signature, outputs=outputs)


def feedback_job(input_dir: str, tags: Sequence[str], object_based: bool, data: Mapping[str, np.ndarray],
                 signature: str, replaced: Mapping[str, np.ndarray], only: Sequence[str]) -> Statistics:
    """Sandbox job: loads the model and runs an error-feedback pass (``collect`` with ``replaced``)."""
    from graphrewrite.rewriting import loader

    return collect(loader.load_reused(input_dir, tags, object_based), data, signature, replaced=replaced, only=only)


def spectrum(matrix: np.ndarray, stats: Statistics | None, key: str) -> np.ndarray | None:
    """Singular values in output space (of the whitened matrix) where ``key`` has a Gram, else None."""
    gram = stats.grams.get(key) if stats is not None else None
    return None if gram is None else whiten.whitened_spectrum(matrix, gram)


def mark_plan(plan: RewritePlan, stats: Statistics, passes: int, distill_steps: int = 0,
              distill_loss: str = "mse", distill_mixup: bool = True,
              logits: bool | Sequence[str] = False, distill_refit: bool = True) -> RewritePlan:
    """The plan with each site whose weight has statistics marked ``factors: calibrated`` (and why
    the others are not), and the calibration (with at most ``passes`` error-feedback passes:
    graphrewrite.rewriting.calibration.feedback) and distillation (graphrewrite.rewriting.calibration.distill, where
    ``distill_steps``) recorded in its options; ``logits`` as pipeline.compress normalises it
    (True, False, or a list of output names)."""
    sites = []
    as_logits = [site.variable.name for site in plan.sites if site.variable.key in stats.as_logits]
    for site in plan.sites:
        key = site.variable.key
        if key in stats.grams:
            gram = stats.grams[key]
            extra = {"factors": "calibrated",
                     **({"outputs": f"fitted up to a shift of each row: {gram.why}"}
                        if isinstance(gram, whiten.ShiftFree) else {})}
        else:
            extra = {"calibration": stats.missing.get(key, f"not read by signature {stats.signature!r}")}
        sites.append(dataclasses.replace(site, size=dataclasses.replace(
            site.size, details={**site.size.details, **extra})))
    options = {**plan.options, "calibration": {"signature": stats.signature, "examples": stats.examples,
                                               "damping": whiten.DAMPING, "passes": passes,
                                               "logits": logits,
                                               **({"as_logits": as_logits} if as_logits else {})}}
    if distill_steps:
        options["calibration"]["distill"] = {"steps": distill_steps, "loss": distill_loss, "mixup": distill_mixup,
                                             "refit": distill_refit}
    return dataclasses.replace(plan, sites=tuple(sites), options=options)


def plain_factors(model: LoadedModel, plan: RewritePlan, transform: Transform) -> dict[str, dict[str, np.ndarray]]:
    """Site id -> the factors from the weight alone, for each calibrated site: what their errors are
    compared with (record_errors, feedback.refine) and the model check's plain set."""
    out = {}
    for site in plan.sites:
        if site.size.details.get("factors") == "calibrated":
            matrix = model.matrix(site.variable.key, site.view)
            out[site.id] = transform.factorize(matrix, site.size)
    return out


def record_errors(sites: Sequence[dict[str, Any]], model: LoadedModel, plan: RewritePlan, transform: Transform,
                  initial: Mapping[str, Mapping[str, np.ndarray]],
                  chained: Mapping[str, Mapping[str, Any]] | None = None,
                  plain: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
    """Adds to each calibrated site of a manifest ``output_error`` (its factors' relative output
    error on the calibration rows, ``||X (A - W_c)|| / ||X A||``) and ``output_error_plain`` (the
    same for the factors computed from the weight alone). Sites refitted by error feedback
    (``chained``, from graphrewrite.rewriting.calibration.feedback.refine) get the errors given the compressed
    sites before them instead, ``||X A - X~ W_c|| / ||X A||``, and their ``feedback_level``, unless
    distillation (``distilled`` in ``chained``) trained their factors after: its errors are then
    those of the distilled factors on the original rows."""
    stats = model.calibration
    for entry, site in zip(sites, plan.sites):
        if site.size.details.get("factors") != "calibrated":
            continue
        extra = dict((chained or {}).get(site.id, {}))
        if extra.get("distilled"):  # error feedback's figures describe the factors before it
            extra = {k: v for k, v in extra.items() if not k.startswith(("feedback_", "output_error"))}
        if "feedback_level" in extra:
            entry["details"].update(extra)
            continue
        entry["details"].update(extra)  # why error feedback left it as it was
        gram = stats.grams[site.variable.key]
        matrix = model.matrix(site.variable.key, site.view)
        alone = (plain or {}).get(site.id) or transform.factorize(matrix, site.size)
        entry["details"]["output_error"] = whiten.output_error(
            matrix, transform.numpy_dense(initial[site.id], site.size), gram)
        entry["details"]["output_error_plain"] = whiten.output_error(
            matrix, transform.numpy_dense(alone, site.size), gram)


def output_names(model: LoadedModel, signature: str) -> list[str]:
    """The names of ``signature``'s outputs in its flat function's order (a dict's keys, sorted as
    nest flattens them; ``output i`` where its outputs are not a dict)."""
    fir = model.functions[f"signature:{signature}"]
    structured = model.signature_functions[signature].structured_outputs
    if isinstance(structured, Mapping) and len(structured) == len(fir.outputs):
        return sorted(structured)
    return [f"output {i}" for i in range(len(fir.outputs))]


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
            batch_size: int = DEFAULT_BATCH, progress: Callable[[str], None] = lambda _: None,
            replaced: Mapping[str, np.ndarray] | None = None, only: Sequence[str] | None = None,
            outputs: bool = False) -> Statistics:
    """Runs the checked calibration ``data`` (reader.read) through ``signature`` once.

    With ``outputs``, each weight with fewer outputs than inputs whose readers all allow it
    (``_outputs_fit``) gets a whiten.OutputGram (see the module docstring) instead of its Gram.

    With ``replaced`` (variable key -> a value of the variable's shape), an error-feedback pass:
    the model runs twice on each batch, as it is and with those weights replaced (their compressed
    values), and for each weight of ``only`` the pass returns, over the same sampled rows, the
    Gram ``X^T X`` of its original inputs, ``X~^T X~`` of its inputs in the replaced model
    (``tilde``) and ``X~^T X`` (``cross``), all dense m x m.
    """
    fir = model.functions[f"signature:{signature}"]
    uses, _ = match_function(fir, dict(model.infos))
    live = _live(fir)
    uses = [u for u in uses if u.op in live]  # a product nothing reads does not run
    if only is not None:
        uses = [u for u in uses if u.variable in set(only)]
    if replaced is not None:  # a lookup's rows (token ids) do not change with the weights before it;
        # a loop's weights have their rows inside the loop (the second copy does replace them)
        uses = [u for u in uses
                if not passgraph.lookup(fir.graph[u.op].op) and fir.graph[u.op].op not in loops.LOOP_OPS]
    by_variable: dict[str, list[Use]] = {}
    for use in uses:
        by_variable.setdefault(use.variable, []).append(use)
    missing = {key: reason for key, group in by_variable.items() if (reason := _unsupported(fir, model, group))}
    kept = [u for u in uses if u.variable not in missing]
    narrow = {key for key, group in by_variable.items()
              if outputs and replaced is None and all(_outputs_fit(fir, u) for u in group)
              and len({u.view for u in group}) == 1}  # one A for the sum of its readers' Y^T Y
    names = sorted(data)
    examples = len(data[names[0]])
    sums = {u.variable: _Sum(u.n * u.n + 1 if u.variable in narrow else u.m) for u in kept}
    held: dict[str, _Sum] = {}  # the held-out batches (every HOLD_OUT_EVERY-th), besides their share of sums
    if kept:
        step = _batch(model, signature, batch_size)
        batches = -(-examples // step)
        run = passgraph.rows_function(fir, model, kept, [data[n].dtype for n in names], [data[n].shape for n in names],
                             [-(-ROWS_PER_FEATURE * u.m // batches) for u in kept], examples, replaced,
                             [u.variable in narrow for u in kept], step)
        for number, start in enumerate(range(0, examples, step)):
            batch = [data[n][start:start + step] for n in names]
            try:
                values, counts, as_rows = run(np.int32(number), *batch)
            except Exception as exc:  # noqa: BLE001 - whatever the model raises on these values
                raise CalibrationDataError(
                    f"the model fails on the calibration data: {type(exc).__name__}: {first_line(exc)}") from None
            for use, value, count, rows in zip(kept, values, counts.numpy(), as_rows.numpy()):
                if count < 0:
                    missing[use.variable] = (f"no calibration statistics for this {use.op_type} (grouped; "
                                            "or 3-D with dilations or channels first)")
                else:
                    out = number % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
                    sums[use.variable].add(value.numpy(), int(count), bool(rows), held=out)
                    if out:
                        held.setdefault(use.variable, _Sum(sums[use.variable].m)).add(value.numpy(), int(count),
                                                                                      bool(rows))
            progress(f"calibration: {min(start + step, examples)}/{examples} examples through {signature}")
    shapes = {u.variable: (u.m, u.n) for u in kept}

    def result(key: str, total: _Sum) -> whiten.Gram:
        if key not in narrow:
            return total.result()
        (m, n), flat = shapes[key], total.result()
        if not total.rows:  # (result() is then a square of zeros)
            return whiten.OutputGram(np.zeros((n, n)), 0.0, m)
        return whiten.OutputGram(flat[:-1].reshape(n, n), float(flat[-1]), m)

    grams = {key: result(key, total) for key, total in sums.items() if key not in missing}
    tilde, cross = {}, {}
    if replaced is not None:  # each value stacks [X^T X, X~^T X~, X~^T X]
        tilde = {key: gram[1] for key, gram in grams.items()}
        cross = {key: gram[2] for key, gram in grams.items()}
        grams = {key: gram[0] for key, gram in grams.items()}
    for key, gram in grams.items():
        values = (gram.rows if isinstance(gram, whiten.RowGram) else
                  np.append(gram.h, gram.trace) if isinstance(gram, whiten.OutputGram) else gram)
        if not np.all(np.isfinite(values)):
            raise CalibrationDataError(f"the inputs of {model.infos[key].name} overflow on the calibration data "
                                       "(non-finite activations)")
    for key in tilde:
        if not (np.all(np.isfinite(tilde[key])) and np.all(np.isfinite(cross[key]))):
            raise CalibrationDataError(f"the inputs of {model.infos[key].name} overflow in the compressed model "
                                       "on the calibration data (non-finite activations)")
    return Statistics(signature, examples, grams, {key: sums[key].rows for key in grams}, missing, tilde, cross,
                      {key: result(key, total) for key, total in held.items() if key in grams},
                      {key: total.rows for key, total in held.items() if key in grams})


class _Sum:
    """One weight's statistics as the batches come: the rows themselves where the pass will see no
    more of them than the weight has features m (a whiten.RowGram: an m x m Gram of rank N < m
    costs more to form, store and factorise than its rows), else the Gram summed in float64
    (float32 products of one batch each); a lookup's counts. Memory: at most 4 m^2 bytes of rows
    or 8 m^2 of Gram."""

    def __init__(self, m: int) -> None:
        self.m, self.rows = m, 0
        self.blocks: list[np.ndarray] = []
        self.last: list[np.ndarray] = []  # the held-out batches' rows, which come after the others'
        self.gram: np.ndarray | float = 0.0

    def add(self, value: np.ndarray, count: int, as_rows: bool, held: bool = False) -> None:
        """Adds one batch: ``count`` rows ``value`` (N x m) if ``as_rows``, else their Gram (m x m)
        or a lookup's counts (m,). The rows of ``held`` batches are put after all others (so that
        ``Statistics.fitted`` finds the others' first)."""
        self.rows += count
        if as_rows:
            (self.last if held else self.blocks).append(value)
        elif isinstance(self.gram, float):
            self.gram = value.astype(np.float64)
        else:  # in place: a batch of ResNet50's Grams is tens of MB
            np.add(self.gram, value, out=self.gram)

    def result(self) -> whiten.Gram:
        """``X^T X / rows``: a diagonal for a lookup, an m x m Gram, or the scaled rows."""
        self.blocks, self.last = self.blocks + self.last, []
        if self.blocks and isinstance(self.gram, float):
            return whiten.RowGram(np.concatenate(self.blocks) / np.float32(np.sqrt(max(self.rows, 1))))
        for block in self.blocks:  # a weight with readers of both kinds: one Gram for all
            self.gram = self.gram + block.T.astype(np.float64) @ block
        return np.asarray(self.gram / max(self.rows, 1)) if self.rows else np.zeros((self.m, self.m))


def _batch(model: LoadedModel, signature: str, batch_size: int) -> int:
    """The batch size: ``batch_size``, or the signature's fixed batch dimension where it has one."""
    specs = model.signature_functions[signature].structured_input_signature[1]
    fixed = {spec.shape[0] for spec in specs.values() if spec.shape.rank and spec.shape[0] is not None}
    return fixed.pop() if len(fixed) == 1 else batch_size


def _unsupported(fir: FunctionIR, model: LoadedModel, uses: Sequence[Use]) -> str | None:
    for use in uses:
        op = fir.graph[use.op].op
        if op in loops.LOOP_OPS:
            found = loops.loop_weight(fir.graph, fir.graph[use.op], use.operand, model.infos[use.variable].dtype)
            why = found if isinstance(found, str) else loops.gram_blocker(fir.graph, fir.graph[use.op], found)
            if why:
                return why
        elif not passgraph.lookup(op) and type(ADAPTERS[op]).activation_rows is OpAdapter.activation_rows:
            return f"no calibration statistics for {op} inputs"
    if len({passgraph.lookup(fir.graph[u.op].op) for u in uses}) > 1 or len({u.m for u in uses}) > 1:
        return "read through different matrix views (a tied lookup table and LM head): no one Gram fits all"
    return None


def _outputs_fit(fir: FunctionIR, use: Use) -> bool:
    """Whether ``use`` can give an output Gram: fewer outputs than inputs, and an op whose output
    rows are ``x @ W``'s rows in the order of its input rows (MatMul and BatchMatMul with the weight
    second; a 2-D Conv2D, whose output pixels are its patches')."""
    op = fir.graph[use.op].op
    return use.n < use.m and ((op in MatMul.op_types + BatchMatMul.op_types and use.operand == 1) or op == "Conv2D")


def _live(fir: FunctionIR) -> set[str]:
    """The nodes the function's outputs depend on (Keras' RNNs compute a first step before their
    loop only for its shapes: its products, which never run, must not add rows)."""
    return fir.graph.upstream(Edge.parse(name).node for name in fir.outputs)


__all__ = ["DEFAULT_BATCH", "HOLD_OUT_EVERY", "Statistics", "calibrate", "check_method", "collect", "held_out",
           "input_specs", "mark_plan", "plain_factors", "record_errors", "spectrum", "without"]
