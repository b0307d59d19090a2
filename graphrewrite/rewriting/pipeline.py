"""``compress``: scan -> load -> inline -> match -> plan -> build -> save (atomic) -> verify.

The one entry point the CLI and library users call. Nothing is written until the rewritten model
has been saved into a temporary directory beside the target and, unless ``verify=False``, reloaded
and checked against the original at alpha = 1; only then is it renamed into place.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import __version__, preflight, views
from graphrewrite.errors import (
    AlreadyRewrittenError,
    InputModelError,
    OutputError,
    UnsafeModelError,
    UsageError,
    VerificationError,
    first_line,
)
from graphrewrite.rewriting import manifest as manifest_lib
from graphrewrite.rewriting import sandbox
from graphrewrite.rewriting.advice import nothing_to_rewrite
from graphrewrite.rewriting.calibration.feedback import DEFAULT_PASSES
from graphrewrite.rewriting.calibration.reader import Calibration
from graphrewrite.rewriting.plan import RewritePlan, Selection, Spectrum, make_plan
from graphrewrite.rewriting.scan import MANIFEST_ASSET, read_saved_model_proto, scan
from graphrewrite.rewriting.verify import compare_outputs

Progress = Callable[[str], None]
DEFAULT_SELECTION = Selection()


def _quiet(_: str) -> None:
    return None


def _python_warning(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


@dataclasses.dataclass
class CompressResult:
    """What ``compress`` did: the plan, the manifest written, and the verification figures."""

    output: str | None
    plan: RewritePlan
    manifest: dict[str, Any] | None
    verification: dict[str, Any] | None


def check_output(input_dir: str, output_dir: str, overwrite: bool) -> None:
    """Refuses outputs that would clobber the input or an existing model, before any work."""
    src, dst = os.path.realpath(input_dir), os.path.realpath(output_dir)
    if dst == src:
        raise OutputError(f"{output_dir}: the output is the input model itself")
    if dst.startswith(src + os.sep):
        raise OutputError(f"{output_dir}: the output is inside the input model")
    if src.startswith(dst + os.sep):
        raise OutputError(f"{output_dir}: the input model is inside the output directory")
    if os.path.lexists(output_dir):
        if not os.path.isdir(output_dir):
            raise OutputError(f"{output_dir}: exists and is not a directory")
        if os.listdir(output_dir) and not overwrite:
            raise OutputError(f"{output_dir}: exists and is not empty (use --overwrite to replace it)")
        if os.listdir(output_dir) and not any(
                os.path.isfile(os.path.join(output_dir, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
            raise OutputError(f"{output_dir}: --overwrite replaces SavedModels only, and this directory holds none")
    parent = os.path.dirname(os.path.abspath(output_dir))
    if not os.path.isdir(parent):
        raise OutputError(f"{output_dir}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{output_dir}: cannot write in {parent} (permission denied)")


def plan_model(input_dir: str, hparams: Mapping[str, Any], tags: Sequence[str] = ("serve",),
               allow_unsafe_ops: bool = False, progress: Progress = _quiet,
               allow_larger: bool = False, selection: Selection = DEFAULT_SELECTION,
               warn: Progress = _python_warning,
               probe: Callable[[], None] | None = None, calibration: Calibration | None = None,
               calibration_signature: str = "serving_default",
               calibration_passes: int = DEFAULT_PASSES, distill_steps: int = 0,
               distill_loss: str = "mse", distill_mixup: bool = True, logits: bool | Sequence[str] = False,
               distill_refit: bool = True) -> tuple[Any, RewritePlan, Any]:
    """Scans, loads, calibrates (with ``calibration`` data: graphrewrite.rewriting.calibration.statistics) and plans;
    returns (loaded model, plan, transform).

    Between the scan and the load, ``probe`` (default: loading the model once in the sandbox)
    runs the model's load in a child process first, so that a model whose loading hangs or
    crashes stops there, with one line, rather than in this process.
    """
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import statistics
    from graphrewrite.transforms import make as make_transform

    transform = make_transform(hparams, allow_larger=allow_larger)
    if calibration is not None:
        statistics.check_method(transform)
    sandbox.start()  # it imports TensorFlow while this process scans
    progress(f"scanning {input_dir}")
    found = scan(input_dir)
    meta = found.meta_graph(tags)
    if found.rewritten:
        raise AlreadyRewrittenError(
            f"{input_dir}: already rewritten by graphrewrite (export it, or compress the original)")
    if meta.findings:
        names = "; ".join(str(f) for f in meta.findings[:5])
        more = f" and {len(meta.findings) - 5} more" if len(meta.findings) > 5 else ""
        if not allow_unsafe_ops:
            raise UnsafeModelError(
                f"{input_dir}: refusing a model with unsafe ops: {names}{more} (--allow-unsafe-ops overrides)")
        warn(f"loading a model with unsafe ops (--allow-unsafe-ops): {names}{more}")
    preflight.weights(input_dir)
    (probe or (lambda: sandbox_probe(input_dir, tags, progress, sandbox.Limits.from_env(allow_unsafe_ops))))()
    progress("loading and inlining")
    model = loader.load(input_dir, tags, meta.object_based)
    check_finite(model)
    if calibration is not None:
        model.calibration = statistics.calibrate(model, calibration, calibration_signature, progress, input_dir,
                                                 tags, meta.object_based,
                                                 sandbox.Limits.from_env(allow_io=allow_unsafe_ops),
                                                 # distilled factors leave A's column space: their
                                                 # output errors need the input Grams
                                                 outputs=transform.outputs_suffice and not distill_steps,
                                                 logits=logits)

    plan = make_plan(model.functions.values(), model.infos, transform, selection, spectrum_of(model, progress))
    if model.calibration is not None:
        plan = statistics.mark_plan(plan, model.calibration, calibration_passes, distill_steps, distill_loss,
                                    distill_mixup, logits, distill_refit)
    return model, plan, transform


def spectrum_of(model: Any, progress: Progress) -> Spectrum:
    """The rank policies' singular values of a weight: its matrix's, whitened by its input's
    statistics where calibrated (graphrewrite.rewriting.calibration.statistics.spectrum)."""
    def spectrum(key: str, view: views.View) -> np.ndarray:
        import scipy.linalg

        from graphrewrite.rewriting.calibration import statistics

        progress(f"singular values of {model.infos[key].name}")
        matrix = model.matrix(key, view)
        whitened = statistics.spectrum(matrix, model.calibration, key)
        return scipy.linalg.svdvals(matrix, check_finite=False) if whitened is None else whitened

    return spectrum


def compress(input_dir: str, output_dir: str, hparams: Mapping[str, Any], *,
             tags: Sequence[str] = ("serve",), verify: bool = True, overwrite: bool = False,
             allow_unsafe_ops: bool = False, dry_run: bool = False, allow_larger: bool = False,
             selection: Selection = DEFAULT_SELECTION, progress: Progress = _quiet,
             warn: Progress = _python_warning, allow_empty: bool = False,
             calibration: Calibration | None = None,
             calibration_signature: str = "serving_default",
             calibration_passes: int = DEFAULT_PASSES, distill_steps: int = 0,
             distill_loss: str | None = None, distill_mixup: bool = True,
             compare_allocations: bool = True, logits: bool | Sequence[str] = False,
             distill_refit: bool = True) -> CompressResult:
    """Rewrites ``input_dir`` into ``output_dir`` (see the module docstring).

    Args:
      input_dir: a SavedModel directory.
      output_dir: where the rewritten SavedModel goes (must not exist, or be empty, or --overwrite).
      hparams: the complete hyperparameters (graphrewrite.hparams.resolve).
      tags: the MetaGraph tag set to rewrite.
      verify: reload the output and compare it with the input at alpha = 1 before renaming it.
      overwrite: replace an existing non-empty output directory.
      allow_unsafe_ops: load models with file/network/process ops (after a warning).
      dry_run: plan only; write nothing.
      allow_larger: also rewrite sites whose compressed form is not smaller than the weight.
      selection: site filters and rank policy (graphrewrite.rewriting.plan.Selection).
      progress: called with one-line progress messages.
      warn: called with one-line warnings (default: Python warnings).
      allow_empty: write the output although every site was skipped (else NothingToRewriteError,
        before anything is written).
      calibration: example inputs (graphrewrite.rewriting.calibration.reader: an .npz or TFRecord path, a dict of
        arrays, an iterable of dicts): low rank and input/output then fit their factors, and the
        rank policies measure their errors, on the outputs of each weight for these inputs.
      calibration_signature: the signature the calibration examples are inputs of.
      calibration_passes: at most this many error-feedback passes after the first
        (graphrewrite.rewriting.calibration.feedback: sites after other sites refitted to their inputs in the
        compressed model); 0 fits every site to the original model's inputs only.
      distill_steps: after the factorisation, this many gradient steps on every site's factors so
        that the compressed model's outputs match the original's on the calibration examples
        (graphrewrite.rewriting.calibration.distill); needs ``calibration``; 0: none. With a ``target_ratio``
        policy, one rank for every weight at the same budget is distilled too, and the plan with
        the lower held-out loss is written (graphrewrite.rewriting.calibration.fitting).
      distill_loss: what distillation minimises: ``mse`` (relative mean-square error of the
        outputs) or ``softmax`` (outputs read as logits: cross-entropy against the original's);
        None: ``softmax`` with ``logits=True`` (every output), else ``mse``.
      distill_mixup: distillation trains on mixed pairs of examples (mixup, with the original's
        outputs for them) where every input of the signature is float; False: on the examples only.
      distill_refit: once distillation is kept, distil again on every calibration example (the
        held-out ones too) for the number of steps early stopping chose
        (graphrewrite.rewriting.calibration.distill.refit); False: write the early-stopped factors.
      compare_allocations: with distillation at a ``target_ratio`` policy, also distil one rank for
        every weight and write the plan with the lower held-out loss (graphrewrite.rewriting.calibration.fitting);
        False: the policy's plan only (half the distillation time).
      logits: with ``calibration``, the calibration signature's outputs are logits (read through a
        softmax or argmax over the last axis): True for all of them, or a list of output names
        (graphrewrite.rewriting.calibration.statistics.output_names) for those only. The weights that give
        them up to a bias are fitted with each output row's mean left out
        (graphrewrite.rewriting.calibration.shift), and the model check compares those outputs so.
    """
    from graphrewrite.rewriting.calibration.distill import LOSSES

    if calibration_passes < 0:
        raise UsageError(f"--calibration-passes {calibration_passes}: must be 0 or more")
    if distill_steps < 0:
        raise UsageError(f"--distill-steps {distill_steps}: must be 0 or more")
    if distill_steps and calibration is None:
        raise UsageError("--distill-steps: needs --calibration (the examples it trains on)")
    if logits and calibration is None:
        raise UsageError("--logits: needs --calibration (it says how to compare outputs on the examples)")
    if logits is not True:  # a name, names, or none: a list, or False for none
        logits = ([logits] if isinstance(logits, str) else list(logits or [])) or False
    distill_loss = distill_loss or ("softmax" if logits is True else "mse")
    if distill_loss not in LOSSES:
        raise UsageError(f"--distill-loss {distill_loss!r}: one of {', '.join(LOSSES)}")
    if not dry_run:
        check_output(input_dir, output_dir, overwrite)
    reference: dict[str, Any] = {}

    limits = sandbox.Limits.from_env(allow_io=allow_unsafe_ops)

    def probe() -> None:
        if not verify or dry_run:
            sandbox_probe(input_dir, tags, progress, limits)
            return
        progress("computing the input model's reference outputs (in the sandbox)")
        reference.update(sandbox.run("graphrewrite.rewriting.verify:reference_job", input_dir, list(tags),
                                     what=f"{input_dir}: running the input model", limits=limits))

    model, plan, transform = plan_model(input_dir, hparams, tags, allow_unsafe_ops, progress, allow_larger,
                                        selection, warn, probe, calibration, calibration_signature,
                                        calibration_passes, distill_steps, distill_loss, distill_mixup, logits,
                                        distill_refit)
    if dry_run:
        return CompressResult(None, plan, None, None)
    if not plan.sites and transform.option != 0 and not allow_empty:
        raise nothing_to_rewrite(plan, input_dir)
    if transform.option == 0:
        progress("compression_option=0: nothing is rewritten; writing an unchanged copy")
        _atomic_write(output_dir, overwrite, lambda tmp: copy_model(input_dir, tmp))
        return CompressResult(output_dir, plan, None, None)

    from graphrewrite.rewriting.calibration import fitting

    expected = reference if verify else None
    in_memory = verify and weight_bytes(model) > VERIFY_IN_MEMORY_ABOVE
    fitted = fitting.fit_best(model, plan, transform, selection, spectrum_of(model, progress), progress,
                              compare_allocations)
    plan = fitted.plan  # with distillation, maybe another allocation at the same budget (fitting.py)
    signatures = sorted(e.name for e in model.entries if e.kind == "signature")
    data = manifest_lib.build(plan, input_dir, model.kind, __version__, signatures)
    data["source"].update(manifest_lib.source_sizes(input_dir, model.infos.values()))
    fitting.record(data, model, fitted, transform)
    holder = [model, fitted.factors]
    del model, fitted  # _save_rewrite owns them from here, so their memory is free before verification
    verification: dict[str, Any] | None = None

    def write(tmp: str) -> None:
        nonlocal verification
        verification = _save_rewrite(holder.pop(0), holder.pop(0), plan, transform, hparams, data, tmp, output_dir,
                                     progress, expected if in_memory else None)
        gc.collect()  # the input model and the rewritten one in memory: release both
        if expected is not None and not in_memory:
            progress("verifying: reloading the output in the sandbox and comparing with the input at alpha = 1")
            verification = sandbox.run("graphrewrite.rewriting.verify:verify_output", expected, tmp, transform.blended,
                                       what="verifying the rewritten model", limits=limits)
        if verification is not None:
            data["verification"] = verification
            manifest_lib.write(data, os.path.join(tmp, "assets", MANIFEST_ASSET))

    _atomic_write(output_dir, overwrite, write)
    return CompressResult(output_dir, plan, data, verification)


def weight_bytes(model: Any) -> int:
    import tensorflow as tf

    return sum(int(np.prod(i.shape)) * tf.as_dtype(i.dtype).size for i in model.infos.values())


# Above this many bytes of weights, compress verifies the rebuilt model in memory before saving
# (and checks the saved files' structure) instead of reloading it: a reload would hold a second
# copy of every weight while the first is still in TensorFlow's memory pool.
VERIFY_IN_MEMORY_ABOVE = 1 << 30


def _save_rewrite(model: Any, initial: dict[str, dict[str, np.ndarray]], plan: RewritePlan, transform: Any,
                  hparams: Mapping[str, Any], data: dict[str, Any], tmp: str, output_dir: str, progress: Progress,
                  expected: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """Builds the model with the factors ``initial`` (graphrewrite.rewriting.calibration.fitting) and saves it into
    ``tmp``; every large object dies with this call.

    With ``expected``, the rebuilt model is verified in memory before saving and the saved files
    are checked structurally; returns that verification report (else None).
    """
    import tensorflow as tf

    from graphrewrite.rewriting import build as build_lib
    from graphrewrite.rewriting import irstore
    from graphrewrite.rewriting import schedule as schedule_lib

    schedule = schedule_lib.Schedule.from_hparams(hparams)

    def update_factory(root: Any, plan_: RewritePlan, transform_: Any) -> Any:
        handles = [schedule_lib.SiteHandle(state, site.view, site.size, transform_, schedule)
                   for state, site in zip(root.graphrewrite_sites, plan_.sites)]
        return schedule_lib.make_update_function(root, handles)

    progress("building the rewritten functions")
    try:
        built = build_lib.build(model, plan, transform, initial, update_factory)
    except Exception as exc:  # noqa: BLE001 - a damaged graph that loads but does not rebuild
        raise InputModelError(f"cannot rewrite this model: {type(exc).__name__}: {first_line(exc)}") from None
    del initial
    with tempfile.TemporaryDirectory(prefix="graphrewrite-manifest-") as scratch:
        path = os.path.join(scratch, MANIFEST_ASSET)
        manifest_lib.write(data, path)
        built.root.graphrewrite_manifest = tf.saved_model.Asset(path)
        ir_path = os.path.join(scratch, irstore.ASSET)
        irstore.write(model, ir_path)
        built.root.graphrewrite_ir = tf.saved_model.Asset(ir_path)
        report = None
        if expected is not None:
            progress("verifying the rebuilt model in memory against the input at alpha = 1")
            report = compare_outputs(expected, lambda key, inputs: built.signatures[key](**inputs),
                                     built.root.graphrewrite_sites, transform.blended)
        progress(f"saving to {output_dir}")
        save(built.root, tmp, built.signatures, output_dir)
    if report is not None:
        check_saved(tmp, built.signatures, len(built.root.variables))
        report["mode"] = "in memory, saved files checked"
    return report


def check_saved(path: str, signatures: Mapping[str, Any], variables: int) -> None:
    """The saved files hold every signature and a checkpoint entry for every variable."""
    import tensorflow as tf

    try:
        meta = read_saved_model_proto(path).meta_graphs[0]
        entries = tf.train.list_variables(os.path.join(path, "variables", "variables"))
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"the saved model cannot be read back ({first_line(exc)})") from None
    missing = set(signatures) - set(meta.signature_def)
    values = [name for name, _ in entries if name.endswith("VARIABLE_VALUE")]
    if missing or len(values) < variables:
        raise VerificationError(f"the saved model lacks signatures {sorted(missing)} or variables "
                                f"({len(values)} saved of {variables})")


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove_stale(parent: str, base: str) -> None:
    """Removes temporary directories of earlier runs for this output whose process is gone
    (killed mid-write), so they do not pile up beside the output."""
    pattern = re.compile(rf"^\.{re.escape(base)}\.graphrewrite-(tmp|old)-(\d+)-")
    for name in os.listdir(parent):
        found = pattern.match(name)
        if not found:
            continue
        try:
            os.kill(int(found.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (PermissionError, OverflowError):
            continue


def _discard(path: str) -> None:
    """Removes a directory tree, or a symbolic link without following it."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _atomic_write(output_dir: str, overwrite: bool, fill: Callable[[str], None]) -> None:
    """Fills a fresh temporary directory beside ``output_dir``, then renames it into place.

    An existing output (``--overwrite``) is swapped with the new one in one atomic exchange where
    the system has it (Linux), so a kill at any moment leaves the old model or the new one there.
    """
    parent = os.path.dirname(os.path.abspath(output_dir))
    base = os.path.basename(os.path.normpath(output_dir))
    _remove_stale(parent, base)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{base}.graphrewrite-tmp-{os.getpid()}-", dir=parent)
    except OSError as exc:
        raise OutputError(f"{output_dir}: cannot create a temporary directory ({exc.strerror})") from None
    try:
        fill(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it private; the output gets the usual mode
        if not os.path.lexists(output_dir):
            os.replace(tmp, output_dir)
        elif _exchange(tmp, output_dir):
            _discard(tmp)  # now holds the previous output (a directory, or the link OUT was)
        else:
            old = tempfile.mkdtemp(prefix=f".{base}.graphrewrite-old-{os.getpid()}-", dir=parent)
            os.replace(output_dir, os.path.join(old, "previous"))
            os.replace(tmp, output_dir)
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{output_dir}: cannot write the model ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save(root: Any, tmp: str, signatures: Mapping[str, Any], output_dir: str) -> None:
    """``tf.saved_model.save`` with its failures turned into one-line errors.

    Write errors (a full disk, a file size limit) are the output's. Anything else comes after the
    model loaded and every function was rebuilt and traced, so it is graphrewrite's failure, not the
    input's (EfficientNet's restored custom gradients once failed here): it reaches the CLI as an
    internal error (status 70), never as "the input is not a readable SavedModel".
    """
    import tensorflow as tf

    from graphrewrite.rewriting import build as build_lib

    try:
        tf.saved_model.save(root, tmp, signatures=signatures, options=build_lib.save_options())
    except (OSError, tf.errors.ResourceExhaustedError, tf.errors.OutOfRangeError,
            tf.errors.PermissionDeniedError) as exc:
        raise OutputError(f"{output_dir}: cannot write the model ({first_line(exc)})") from None


def sandbox_probe(input_dir: str, tags: Sequence[str], progress: Progress = _quiet,
                  limits: sandbox.Limits | None = None) -> None:
    progress("loading the model in the sandbox first")
    sandbox.probe_load(input_dir, tags, limits)


def check_finite(model: Any) -> None:
    """Every floating-point weight is finite: NaN or Inf in one is an input error naming it."""
    import tensorflow as tf

    for key, variable in model.variables.items():
        if variable.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(variable))):
            raise InputModelError(f"{model.path}: weight {model.infos[key].name!r} holds NaN or Inf values")


def copy_model(source: str, destination: str) -> None:
    """Copies a (scanned) model directory: regular files and directories only, a symbolic link
    only as the file inside the model it points at."""
    root = os.path.realpath(source)

    def copy_file(src: str, dst: str) -> None:
        real = os.path.realpath(src)
        if not real.startswith(root + os.sep) or not stat.S_ISREG(os.stat(real).st_mode):
            raise InputModelError(f"{source}: {os.path.relpath(src, source)} is not a regular file inside the model")
        shutil.copyfile(real, dst)

    shutil.copytree(source, destination, dirs_exist_ok=True, copy_function=copy_file)


__all__ = ["CompressResult", "check_output", "compress", "plan_model"]
