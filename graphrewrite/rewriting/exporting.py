"""``export``: the final model, with only the compressed factors.

A rewritten model still carries each original weight A, alpha, the global step and the update
function. Export rebuilds every signature and function from the source functions kept inside the
rewritten model (graphrewrite.rewriting.irstore), putting each site's compressed form alone in place of the
op (``(x @ B) @ C`` for low rank, a kh x kw x cin -> k convolution followed by a 1 x 1 one for
Conv2D, codebook lookups for k-means, ...), with the fine-tuned factor values. The weights that were
not compressed are carried over. Its outputs equal the rewritten model's at alpha = 0.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphrewrite.errors import (
    ExportRefusedError,
    InputModelError,
    UnsafeModelError,
    VerificationError,
    first_line,
)
from graphrewrite.rewriting import irstore, sandbox
from graphrewrite.rewriting import manifest as manifest_lib
from graphrewrite.rewriting.model import LoadedModel, VariableInfo
from graphrewrite.rewriting.pipeline import _atomic_write, _quiet, check_output, save
from graphrewrite.rewriting.scan import scan
from graphrewrite.rewriting.verify import max_diff, reproducible

Progress = Callable[[str], None]


@dataclasses.dataclass
class ExportResult:
    """What ``export`` wrote and measured. "Original" is the model ``compress`` was given (its
    figures recorded in the manifest); "tuned" the rewritten model export read (A, factors, alpha).

    Attributes:
      output: the final model's directory.
      sites: number of compressed sites.
      params_before: parameters (scalars in variables) of the original model, each weight once.
      params_after: parameters of the final model.
      bytes_before: bytes on disk of the original SavedModel directory (every file); None when
        its manifest predates this figure.
      bytes_after: bytes on disk of the final SavedModel directory.
      params_tuned: parameters of the tuned model (A plus the factors: the original's weights and
        more), a secondary detail.
      bytes_tuned: bytes on disk of the tuned model's directory.
      max_alpha: the largest alpha of the tuned model (above 0 only with ``force``).
      output_shift: max relative change of the outputs between the tuned model as it is (its
        current alphas) and the final model (its alpha = 0 form): max |tuned - final| / max |tuned|
        over every signature and output, on deterministic standard-normal inputs (unknown
        dimensions 32, 8 or 2, verify.reproducible); None with ``verify=False``.
      max_rel_diff_alpha0: the same measure between the tuned model at alpha = 0 and the final
        model (the verification: ~1e-6); None with ``verify=False``.
      unchecked: signature -> why the verification could not compare it (verify.reproducible:
        inputs that cannot be sampled, outputs that differ between two calls).
    """

    output: str
    sites: int
    params_before: int
    params_after: int
    bytes_before: int | None
    bytes_after: int
    params_tuned: int
    bytes_tuned: int
    max_alpha: float
    output_shift: float | None
    max_rel_diff_alpha0: float | None
    unchecked: dict[str, str] = dataclasses.field(default_factory=dict)


def _load_tuned(path: str, tags: Sequence[str], checkpoint: str | None,
                allow_unsafe_ops: bool) -> tuple[Any, dict, str | None]:
    import tensorflow as tf

    found = scan(path)
    meta = found.meta_graph(tags)
    if meta.findings and not allow_unsafe_ops:
        raise UnsafeModelError(f"{path}: refusing a model with unsafe ops: {meta.findings[0]}")
    data = manifest_lib.read_dir(path)
    if data is None:
        raise InputModelError(f"{path}: not a model rewritten by graphrewrite (no manifest)")
    sandbox.probe_load(path, tags, sandbox.Limits.from_env(allow_unsafe_ops))
    try:
        tuned = tf.saved_model.load(path, tags=list(tags))
    except (tf.errors.OpError, ValueError, KeyError, OSError) as exc:
        raise InputModelError(f"{path}: cannot load the SavedModel ({first_line(exc)})") from None
    for attr in ("graphrewrite_sites", "graphrewrite_source_variables", "graphrewrite_ir"):
        if not hasattr(tuned, attr):
            raise InputModelError(f"{path}: the rewritten model lost its '{attr}' (was it re-saved whole?)")
    if checkpoint is not None:
        _restore(tuned, checkpoint)
    return tuned, data, found.source_functions


def _restore(tuned: Any, checkpoint: str) -> None:
    """Restores ``tf.train.Checkpoint(model=loaded)`` (or ``root=``) into the loaded model."""
    import tensorflow as tf

    path = tf.train.latest_checkpoint(checkpoint) if os.path.isdir(checkpoint) else checkpoint
    if not path:
        raise InputModelError(f"{checkpoint}: no checkpoint found")
    errors = []
    for key in ("model", "root"):
        try:
            status = tf.train.Checkpoint(**{key: tuned}).read(path)
            status.assert_existing_objects_matched()
            status.expect_partial()
            return
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            errors.append(first_line(exc, limit=200))
    raise InputModelError(f"{checkpoint}: not a checkpoint of this model ({errors[0]})")


def _source_model(tuned: Any, data: dict, path: str, source_functions: str | None) -> LoadedModel:
    """The source functions as the scan read them from ``assets/`` inside the model (never from
    wherever the loaded model's asset path points)."""
    if source_functions is None:
        raise InputModelError(f"{path}: the rewritten model lost its assets/{irstore.ASSET}")
    variables = list(tuned.graphrewrite_source_variables)
    resources = list(getattr(tuned, "graphrewrite_resources", []))
    functions, entries, captured, by_key = irstore.load(irstore.parse(source_functions, path), variables,
                                                        resources)
    infos = {key: VariableInfo(key, v.name.split(":")[0], tuple(v.shape), v.dtype.name, v.trainable)
             for key, v in by_key.items()}
    return LoadedModel(path=path, kind=str((data.get("source") or {}).get("kind", "")), variables=by_key, infos=infos,
                       functions=functions, entries=entries, captured=captured, resources=resources,
                       regularization_losses=[], source=tuned,
                       signature_functions=dict(tuned.signatures.items()))


def export(tuned_dir: str, output_dir: str, *, checkpoint: str | None = None, force: bool = False,
           verify: bool = True, overwrite: bool = False, tags: Sequence[str] = ("serve",),
           allow_unsafe_ops: bool = False, progress: Progress = _quiet) -> ExportResult:
    """Writes the final compressed model of a (fine-tuned) rewritten model.

    Args:
      tuned_dir: a rewritten model, as written by compress or re-saved after fine-tuning.
      output_dir: where the final model goes.
      checkpoint: a ``tf.train.Checkpoint(model=loaded)`` to restore into it first.
      force: export although some alpha > 0 (reports how far the outputs move).
      verify: reload the output and compare it with the rewritten model at alpha = 0.
    """
    check_output(tuned_dir, output_dir, overwrite)
    progress(f"loading {tuned_dir}")
    tuned, data, source_functions = _load_tuned(tuned_dir, tags, checkpoint, allow_unsafe_ops)
    with manifest_lib.damage_guard(tuned_dir):
        run = _Run(tuned_dir, tuple(tags), checkpoint, sandbox.Limits.from_env(allow_unsafe_ops))
        return _export(output_dir, tuned, data, source_functions, force, verify, overwrite, progress, run)


@dataclasses.dataclass(frozen=True)
class _Run:
    """How the sandbox reloads the tuned model to run it (its functions never run in this process)."""

    tuned_dir: str
    tags: tuple[str, ...]
    checkpoint: str | None
    limits: sandbox.Limits


def _export(output_dir: str, tuned: Any, data: dict, source_functions: str | None, force: bool,
            verify: bool, overwrite: bool, progress: Progress, run: _Run) -> ExportResult:
    tuned_dir = run.tuned_dir

    from graphrewrite.rewriting.build import build_export
    from graphrewrite.transforms import make as make_transform

    transform = make_transform(data["hparams"], allow_larger=True)
    states = list(tuned.graphrewrite_sites)
    alphas = [float(s.alpha.numpy()) for s in states] if transform.blended else []
    max_alpha = max(alphas, default=0.0)
    if max_alpha > 0 and not force:
        busy = sum(a > 0 for a in alphas)
        raise ExportRefusedError(
            f"{tuned_dir}: alpha is still {max_alpha:.4g} at {busy} of {len(alphas)} sites; fine-tune "
            "until alpha = 0, or pass --force to export the compressed form anyway")
    model = _source_model(tuned, data, tuned_dir, source_functions)
    plan = manifest_lib.plan_from(data, model.infos, transform)
    _check_plan(plan, model, len(states))
    progress("building the compressed functions")
    try:
        built = build_export(model, plan, transform, states)
    except Exception as exc:  # noqa: BLE001 - a manifest or asset edited to disagree with the model
        raise InputModelError(f"{tuned_dir}: cannot rebuild its functions ({first_line(exc)})") from None
    report: dict[str, Any] = {}

    def write(tmp: str) -> None:
        progress(f"saving to {output_dir}")
        save(built.root, tmp, built.signatures, output_dir)
        if verify:
            progress("verifying against the rewritten model at alpha = 0 (in the sandbox)")
            report.update(sandbox.run("graphrewrite.rewriting.exporting:compare_job", run.tuned_dir, run.tags,
                                      run.checkpoint, tmp, alphas, what="verifying the exported model",
                                      limits=run.limits))

    _atomic_write(output_dir, overwrite, write)
    source = data.get("source") or {}
    original = source.get("parameters", _params(model.variables.values()))
    return ExportResult(
        output=output_dir, sites=len(plan.sites), params_before=int(original),
        params_after=_params(built.root.variables), bytes_before=source.get("bytes"),
        bytes_after=manifest_lib.dir_bytes(output_dir), params_tuned=_params(tuned.variables),
        bytes_tuned=manifest_lib.dir_bytes(tuned_dir), max_alpha=max_alpha,
        output_shift=report.get("shift"), max_rel_diff_alpha0=report.get("alpha0"),
        unchecked=report.get("unchecked", {}))


def _params(variables: Any) -> int:
    return sum(int(np.prod(v.shape)) for v in variables)


def _check_plan(plan: Any, model: LoadedModel, states: int) -> None:
    """The manifest's sites must name ops of the kept source functions, one site per state."""
    from graphrewrite.rewriting.ops import ADAPTERS

    if len(plan.sites) != states:
        raise InputModelError("the manifest's sites do not match the model's graphrewrite_sites")
    for site in plan.sites:
        if not site.uses:
            raise InputModelError(f"the manifest's site {site.id} names no op")
        for use in site.uses:
            fir = model.functions.get(use.function)
            node = fir.graph.nodes.get(use.op) if fir is not None else None
            if (node is None or node.op != use.op_type or node.op not in ADAPTERS
                    or not 0 <= use.operand < len(node.data_inputs)):
                raise InputModelError(f"the manifest's site {site.id} does not match the model's source functions")


def compare_job(tuned_dir: str, tags: Sequence[str], checkpoint: str | None, exported_dir: str,
                alphas: list[float]) -> dict[str, float]:
    """Sandbox job: max relative differences of the exported model's outputs against the tuned
    model's at alpha = 0 (must be ~0) and as it is (the shift --force accepts)."""
    tuned = sandbox.load_for_run(tuned_dir, tags)
    if checkpoint is not None:
        _restore(tuned, checkpoint)
    exported = sandbox.load_for_run(exported_dir, ["serve"])
    worst0, shift, unchecked = 0.0, 0.0, {}
    for key, original in sorted(tuned.signatures.items()):
        if key == "compression_update" or key not in exported.signatures:
            continue
        for state in tuned.graphrewrite_sites:
            state.alpha.assign(0.0)
        found = reproducible(original)  # at alpha = 0: what the export must equal
        for state, alpha in zip(tuned.graphrewrite_sites, alphas):
            state.alpha.assign(alpha)
        if isinstance(found, str):
            unchecked[key] = found
            continue
        inputs, at_zero = found
        got = exported.signatures[key](**inputs)
        as_is = original(**inputs)
        for out in at_zero:
            diff, rel = max_diff(at_zero[out], got[out])
            if not (rel <= 1e-4 or diff <= 1e-5):
                raise VerificationError(
                    f"signature {key!r} output {out!r} of the exported model differs from the rewritten "
                    f"model at alpha = 0 (max abs diff {diff:.3g}, relative {rel:.3g})")
            worst0 = max(worst0, rel)
            shift = max(shift, max_diff(as_is[out], got[out])[1])
    return {"alpha0": worst0, "shift": shift, "unchecked": unchecked}
