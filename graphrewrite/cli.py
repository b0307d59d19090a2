"""The ``graphrewrite`` command line: a thin click group over graphrewrite's library functions.

Every failure a user can cause ends as one line on stderr (``graphrewrite: error: ...``) and a
non-zero exit status (see graphrewrite.errors); TensorFlow is imported only by commands that need it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from graphrewrite import __version__
from graphrewrite.errors import INTERNAL_ERROR_EXIT, GraphrewriteError, first_line
from graphrewrite.hparams import HPARAMS
from graphrewrite.safetext import printable
from graphrewrite.tfimport import import_tensorflow_quietly, quiet_tensorflow

_STARTED = time.monotonic()  # the command's start, for the elapsed time of progress lines
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _progress(quiet: bool, forced: bool = False) -> Callable[[str], None]:
    """Progress lines on stderr when it is a terminal (or --progress); never with --quiet. Each
    carries the seconds elapsed since the command started.

    Off by default when stderr is a file or pipe, so that a failure there is exactly one line."""
    show = not quiet and (forced or sys.stderr.isatty())

    def report(message: str) -> None:
        if show:
            click.echo(f"graphrewrite: [{time.monotonic() - _STARTED:6.1f} s] {printable(message)}", err=True)

    return report


def _help_all(ctx: click.Context, _: click.Parameter, value: bool) -> None:
    """``--help-all``: the help with the reference's compatibility hyperparameters too."""
    if not value or ctx.resilient_parsing:
        return
    options = [p for p in ctx.command.params if isinstance(p, click.Option) and p.hidden]
    for option in options:
        option.hidden = False
    try:
        click.echo(ctx.get_help())
    finally:
        for option in options:  # the command object outlives this call (tests run several)
            option.hidden = True
    ctx.exit()


def hparam_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One option per reference hyperparameter (``--rank`` and ``--rank=200`` alike), plus the
    reference's ``--compression_hparams`` string and ``--method`` by name. Only ``--rank`` and
    ``--method`` show in ``--help``; ``--help-all`` lists the reference's compatibility options."""
    for param in reversed(HPARAMS):
        dashed = param.name.replace("_", "-")
        names = [f"--{param.name}"] + ([f"--{dashed}"] if dashed != param.name else [])
        fn = click.option(*names, param.name, default=None, metavar=param.type.__name__.upper(),
                          hidden=param.name != "rank",
                          help=f"{param.help} [reference default: {param.default!r}]")(fn)
    fn = click.option("--method", default=None, metavar="NAME",
                      help="compression method by name (none, low_rank, simhash, dictionary, kmeans, "
                           "kmeans_pruning, input_output, block, mixed_block); sets compression_option")(fn)
    fn = click.option("--compression_hparams", "--compression-hparams", "compression_hparams", default=None,
                      metavar="K=V,...", hidden=True,
                      help="the reference's hyperparameter string; single options win")(fn)
    fn = click.option("--help-all", is_flag=True, expose_value=False, is_eager=True, callback=_help_all,
                      help="also list the reference's compatibility hyperparameters, and exit")(fn)
    return fn


def _warning(message: str) -> None:
    """Warnings always reach stderr, one line each (progress lines only on a terminal)."""
    click.echo(f"graphrewrite: warning: {printable(message)}", err=True)


def selection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Site filters and rank policies beyond the reference (graphrewrite.rewriting.plan.Selection)."""
    options = [
        click.option("--energy", type=float, default=None, metavar="SHARE",
                     help="low rank: keep the fewest singular values holding SHARE of the squared spectrum"),
        click.option("--max-error", "max_error", type=float, default=None, metavar="ERR",
                     help="low rank: the fewest singular values with relative Frobenius error below ERR"),
        click.option("--target-ratio", "target_ratio", type=float, default=None, metavar="RATIO",
                     help="low rank: per-site k so the rewritten weights keep RATIO of their parameters "
                          "with the least total relative error"),
        click.option("--min-params", "min_params", type=int, default=0, metavar="N",
                     help="leave weights with fewer than N parameters alone"),
        click.option("--include", default=None, metavar="REGEX", help="only variables/ops matching REGEX"),
        click.option("--exclude", default=None, metavar="REGEX", help="leave variables/ops matching REGEX alone"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _selection(energy: float | None, max_error: float | None, target_ratio: float | None, min_params: int,
               include: str | None, exclude: str | None) -> Any:
    from graphrewrite.rewriting.plan import Selection
    from graphrewrite.rewriting.rankpolicy import Policy

    return Selection(include, exclude, min_params, Policy(energy, max_error, target_ratio))


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--tag-set", "tag_set", default="serve", show_default=True,
                      help="comma-separated tags of the MetaGraph to use")(fn)
    fn = click.option("--allow-unsafe-ops", is_flag=True,
                      help="load models with file/network/process ops (after a warning)")(fn)
    return fn


def _resolve(compression_hparams: str | None, method: str | None, values: dict[str, Any],
             schedule: tuple[int | None, int] = (None, 0)) -> dict[str, Any]:
    """The hyperparameters: the reference's defaults, the string, single options, --method, and
    the schedule of ``--schedule-steps``/``--schedule-start`` (``schedule``)."""
    from graphrewrite.errors import UsageError
    from graphrewrite.hparams import resolve, schedule_for_steps

    overrides = {p.name: values.pop(p.name) for p in HPARAMS}
    steps, start = schedule
    if steps is not None:
        derived = schedule_for_steps(steps, start)
        clash = [f"--{key}" for key in derived if overrides.get(key) is not None]
        if clash:
            raise UsageError(f"--schedule-steps sets {', '.join(clash)}: give one or the other")
        overrides.update(derived)
    elif start:
        raise UsageError("--schedule-start needs --schedule-steps")
    if method is not None:
        from graphrewrite.transforms import BY_NAME

        if method not in BY_NAME:
            raise UsageError(f"--method: unknown method {method!r} (known: {', '.join(BY_NAME)})")
        option = BY_NAME[method].option
        if overrides.get("compression_option") not in (None, str(option)):
            raise UsageError(f"--method {method} contradicts --compression_option={overrides['compression_option']}")
        overrides["compression_option"] = option
    return resolve(compression_hparams, overrides)


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="graphrewrite")
@click.option("-v", "--verbose", is_flag=True,
              help="let TensorFlow's own log lines through (also GRAPHREWRITE_DEBUG=1)")
def cli(verbose: bool) -> None:
    """Compress trained TensorFlow SavedModels with compression_lib's alpha-gated factors."""
    quiet_tensorflow(not (verbose or os.environ.get("GRAPHREWRITE_DEBUG")))


@cli.command(context_settings=CONTEXT)
@click.argument("in_model", type=click.Path())
@click.argument("out_model", type=click.Path())
@hparam_options
@selection_options
@model_options
@click.option("--schedule-steps", "schedule_steps", type=int, default=None, metavar="N",
              help="alpha goes from 1 to 0 within N fine-tuning steps (sets begin/end_compression_step, "
                   "compression_frequency, alpha_decrement_value)")
@click.option("--schedule-start", "schedule_start", type=int, default=0, metavar="S",
              help="with --schedule-steps: the global step of the first update [default: 0]")
@click.option("--fast", is_flag=True, help="skip reloading and checking the output at alpha = 1")
@click.option("--overwrite", is_flag=True, help="replace an existing non-empty OUT_MODEL")
@click.option("--dry-run", is_flag=True, help="print the plan, write nothing")
@click.option("--allow-empty", is_flag=True,
              help="write the output although every site was skipped (else exit 9, nothing written)")
@click.option("--allow-larger", is_flag=True,
              help="also rewrite sites whose compressed form is not smaller (the reference does)")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("-q", "--quiet", is_flag=True, help="no progress messages on stderr")
@click.option("--progress", "show_progress", is_flag=True,
              help="progress messages on stderr even when it is not a terminal")
@click.option("--calibration", type=click.Path(), default=None, metavar="DATA",
              help="example inputs (.npz or TFRecord dir): fit factors to each weight's outputs")
@click.option("--calibration-signature", "calibration_signature", default="serving_default", show_default=True,
              metavar="NAME", hidden=True, help="the signature whose inputs --calibration holds")
@click.option("--calibration-passes", "calibration_passes", type=click.IntRange(min=0), default=None, metavar="N",
              hidden=True, help="at most N error-feedback passes after the first: weights after other weights "
                                "refitted to their inputs in the compressed model (default 4; 0: none)")
@click.option("--distill-steps", "distill_steps", type=click.IntRange(min=0), default=0, metavar="N",
              help="with --calibration: then train the factors N steps to give the original's outputs "
                   "(--distill-loss softmax for logits)")
@click.option("--distill-loss", "distill_loss", type=click.Choice(["mse", "softmax"]), default=None, hidden=True,
              help="what distillation minimises; softmax: outputs are logits (default with --logits; else mse)")
@click.option("--logits", is_flag=True,
              help="with --calibration: the outputs are logits (a softmax/argmax reads them)")
@click.option("--logits-output", "logits_outputs", multiple=True, metavar="NAME", hidden=True,
              help="with --calibration: this output is logits (the others not); repeatable")
@click.option("--distill-mixup/--no-distill-mixup", "distill_mixup", default=True, hidden=True, show_default=True,
              help="distillation also trains on mixed pairs of examples where every input is float")
@click.option("--distill-refit/--no-distill-refit", "distill_refit", default=True, hidden=True, show_default=True,
              help="once distillation is kept, distil again on every calibration example for the steps it chose")
@click.option("--compare-allocations/--no-compare-allocations", "compare_allocations", default=True, hidden=True,
              show_default=True, help="with distillation at --target-ratio, also distil one rank for every weight "
                                      "and write the plan with the lower held-out loss")
def compress(in_model: str, out_model: str, compression_hparams: str | None, method: str | None,
             tag_set: str, allow_unsafe_ops: bool, fast: bool, overwrite: bool, dry_run: bool,
             allow_empty: bool, allow_larger: bool, schedule_steps: int | None, schedule_start: int,
             as_json: bool, quiet: bool, show_progress: bool, energy: float | None, max_error: float | None,
             target_ratio: float | None, min_params: int, include: str | None, exclude: str | None,
             calibration: str | None, calibration_signature: str, calibration_passes: int | None,
             distill_steps: int, distill_loss: str | None, distill_mixup: bool, distill_refit: bool,
             compare_allocations: bool,
             logits: bool, logits_outputs: tuple[str, ...], **values: Any) -> None:
    """Rewrite IN_MODEL into OUT_MODEL with compressed, alpha-gated weights.

    \b
    Examples:
      graphrewrite compress IN OUT --rank=200 --schedule-steps 1000
      graphrewrite compress IN OUT --target-ratio 0.5
      graphrewrite compress IN OUT --method simhash --rank=800

    --help-all also lists every hyperparameter of compression_lib (alpha_decrement_value,
    begin_compression_step, compression_frequency, ...), spelled as in the reference.
    """
    from graphrewrite.reporting import report
    from graphrewrite.rewriting import pipeline

    for name, given in (("--calibration-passes", calibration_passes is not None), ("--distill-steps", distill_steps),
                        ("--distill-loss", distill_loss is not None), ("--no-distill-mixup", not distill_mixup),
                        ("--no-distill-refit", not distill_refit),
                        ("--logits", logits), ("--logits-output", logits_outputs),
                        ("--no-compare-allocations", not compare_allocations)):
        if given and calibration is None:
            from graphrewrite.errors import UsageError

            raise UsageError(f"{name} needs --calibration")
    hp = _resolve(compression_hparams, method, values, (schedule_steps, schedule_start))
    selection = _selection(energy, max_error, target_ratio, min_params, include, exclude)
    _check_paths(in_model, None if dry_run else out_model, overwrite)
    progress = _progress(quiet, show_progress)
    progress("importing TensorFlow")
    import_tensorflow_quietly()
    result = pipeline.compress(
        in_model, out_model, hp, tags=_tags(tag_set), verify=not fast, overwrite=overwrite,
        allow_unsafe_ops=allow_unsafe_ops, dry_run=dry_run, allow_larger=allow_larger, selection=selection,
        progress=progress, warn=_warning, allow_empty=allow_empty, calibration=calibration,
        calibration_signature=calibration_signature, distill_steps=distill_steps, distill_loss=distill_loss,
        distill_mixup=distill_mixup, distill_refit=distill_refit, compare_allocations=compare_allocations,
        logits=True if logits else list(logits_outputs),
        **({} if calibration_passes is None else {"calibration_passes": calibration_passes}))
    if as_json:
        click.echo(json.dumps(report.compress_json(result), indent=1))
    else:
        click.echo(report.compress_text(result, in_model))


@cli.command(context_settings=CONTEXT)
@click.argument("tuned_model", type=click.Path())
@click.argument("final_model", type=click.Path())
@click.option("--checkpoint", type=click.Path(), default=None,
              help="restore this tf.train.Checkpoint(model=loaded) into TUNED_MODEL first")
@click.option("--force", is_flag=True, help="export although some alpha > 0 (says how far outputs move)")
@click.option("--fast", is_flag=True, help="skip reloading and checking the output")
@click.option("--overwrite", is_flag=True, help="replace an existing non-empty FINAL_MODEL")
@model_options
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@click.option("-q", "--quiet", is_flag=True, help="no progress messages on stderr")
def export(tuned_model: str, final_model: str, checkpoint: str | None, force: bool, fast: bool,
           overwrite: bool, tag_set: str, allow_unsafe_ops: bool, as_json: bool, quiet: bool) -> None:
    """Write FINAL_MODEL with only the compressed factors of a (fine-tuned) rewritten TUNED_MODEL."""
    _check_paths(tuned_model, final_model, overwrite)
    progress = _progress(quiet)
    progress("importing TensorFlow")
    import_tensorflow_quietly()
    from graphrewrite.reporting import report
    from graphrewrite.rewriting import exporting as export_lib

    result = export_lib.export(
        tuned_model, final_model, checkpoint=checkpoint, force=force, verify=not fast,
        overwrite=overwrite, tags=_tags(tag_set), allow_unsafe_ops=allow_unsafe_ops, progress=progress)
    click.echo(json.dumps(report.export_json(result), indent=1) if as_json else report.export_text(result, tuned_model))


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@hparam_options
@selection_options
@model_options
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--plot", "plot_dir", type=click.Path(), default=None,
              help="write a singular-value spectrum per site and a parameter overview (PNG) into this directory")
def inspect(model: str, compression_hparams: str | None, method: str | None, tag_set: str,
            allow_unsafe_ops: bool, as_json: bool, plot_dir: str | None, energy: float | None,
            max_error: float | None, target_ratio: float | None, min_params: int, include: str | None,
            exclude: str | None, **values: Any) -> None:
    """Show the sites of a rewritten MODEL (with alpha, global step and reconstruction error now),
    or, for an original MODEL, the plan compress would follow (a dry run)."""
    from graphrewrite.errors import UnsafeModelError, UsageError
    from graphrewrite.reporting import report
    from graphrewrite.rewriting import manifest, pipeline
    from graphrewrite.rewriting.scan import scan

    found = scan(model)
    data = manifest.read_dir(model)
    given = _plan_options_given(compression_hparams, method, values, energy, max_error, target_ratio,
                                min_params, include, exclude)
    if data is not None and given:
        raise UsageError(f"{model} is already rewritten: {', '.join(given)} plan a compression, for an "
                         "original model only (this one's plan is in its manifest)")
    import_tensorflow_quietly()
    if data is None:
        hp = _resolve(compression_hparams, method, values)
        selection = _selection(energy, max_error, target_ratio, min_params, include, exclude)
        loaded, plan, _ = pipeline.plan_model(model, hp, _tags(tag_set), allow_unsafe_ops, selection=selection,
                                              warn=_warning)
        data = report.plan_dict(plan, model, loaded.kind)
        if plot_dir:
            report.add_spectra(data, loaded, plan)
    else:
        from graphrewrite.reporting.status import rewritten_status

        if found.meta_graph(_tags(tag_set)).findings and not allow_unsafe_ops:
            raise UnsafeModelError(f"{model}: refusing to load a model with unsafe ops (graphrewrite scan lists them)")
        with manifest.damage_guard(model):
            data = rewritten_status(model, data, spectra=plot_dir is not None)
    with manifest.damage_guard(model):
        text = json.dumps(report.inspect_json(data), indent=1) if as_json else report.inspect_text(data)
        if plot_dir:
            written = report.write_plots(data, plot_dir)
            click.echo(f"wrote {len(written)} plot(s) to {plot_dir}", err=True)
    click.echo(text)


@cli.command(context_settings=CONTEXT)
@click.argument("in_model", type=click.Path())
@click.argument("out_model", type=click.Path())
@click.option("--tag-set", "tag_set", default="serve", show_default=True,
              help="comma-separated tags of the MetaGraph to compare")
@click.option("--json", "as_json", is_flag=True, help="print the stable JSON instead of tables")
@click.option("--html", "html_file", type=click.Path(), default=None,
              help="also write a self-contained HTML page with a picture of every rewritten site")
def diff(in_model: str, out_model: str, tag_set: str, as_json: bool, html_file: str | None) -> None:
    """Show what the rewrite changed between IN_MODEL and OUT_MODEL (read as protobufs, never run)."""
    from graphrewrite.reporting import diff as diff_lib
    from graphrewrite.rewriting import manifest

    result = diff_lib.diff_models(in_model, out_model, tags=_tags(tag_set))
    with manifest.damage_guard(out_model):  # a hand-edited manifest's records: one line
        if html_file:
            from graphrewrite.reporting import htmlreport

            htmlreport.write_html(result, html_file)
            click.echo(f"wrote {html_file}", err=True)
        text = json.dumps(result, indent=1) if as_json else diff_lib.diff_text(result)
    click.echo(text)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def scan(model: str, as_json: bool) -> None:
    """List MODEL's tag sets, signatures and the ops the allow-list refuses (op, node, function),
    without loading it. Exit 4 if any op is refused, 3 if variables/ is missing."""
    from graphrewrite.errors import InputModelError, UnsafeModelError
    from graphrewrite.preflight import variables_missing
    from graphrewrite.rewriting.scan import scan as do_scan

    found = do_scan(model)
    findings = [f for mg in found.meta_graphs for f in mg.findings]
    missing = variables_missing(model)
    if as_json:
        click.echo(json.dumps({
            "path": model, "rewritten": found.rewritten, "variables_missing": missing is not None,
            "meta_graphs": [{"tags": list(mg.tags), "signatures": list(mg.signatures),
                             "object_based": mg.object_based, "ops": mg.op_count,
                             "unsafe_ops": [vars(f) for f in mg.findings]} for mg in found.meta_graphs],
        }, indent=1))
    else:
        for mg in found.meta_graphs:
            kind = "TF2 object-based" if mg.object_based else "TF1"
            click.echo(printable(f"tag set {','.join(mg.tags) or '(none)'}: {kind}, {mg.op_count} ops, "
                                 f"signatures: {', '.join(mg.signatures) or '(none)'}"))
            for finding in mg.findings:
                click.echo(printable(f"  refused: {finding}"))
        click.echo("rewritten by graphrewrite" if found.rewritten else "not rewritten by graphrewrite")
        if missing is not None:
            click.echo("variables/ is missing: the model's weights are not there")
    if missing is not None:
        raise InputModelError(missing)
    if findings:
        raise UnsafeModelError(f"{model}: {len(findings)} unsafe op(s) found")


def _plan_options_given(compression_hparams: str | None, method: str | None, values: dict[str, Any],
                        energy: float | None, max_error: float | None, target_ratio: float | None,
                        min_params: int, include: str | None, exclude: str | None) -> list[str]:
    """The planning options (hyperparameters, site selection) given on the command line."""
    named = {"--compression_hparams": compression_hparams, "--method": method, "--energy": energy,
             "--max-error": max_error, "--target-ratio": target_ratio, "--min-params": min_params or None,
             "--include": include, "--exclude": exclude}
    named.update({f"--{name}": value for name, value in values.items()})
    return [name for name, value in named.items() if value is not None]


def _check_paths(model: str, output: str | None, overwrite: bool) -> None:
    """The input model's directory and the output's location, before TensorFlow is imported
    (whether ``variables/`` is there is checked after saved_model.pb: a damaged graph comes first)."""
    from graphrewrite import preflight
    from graphrewrite.rewriting.pipeline import check_output

    preflight.model_dir(model)
    if output is not None:
        check_output(model, output, overwrite)


def _tags(tag_set: str) -> list[str]:
    return [t.strip() for t in tag_set.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: runs the group and turns every failure into one line and an exit code."""
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        cli.main(args=argv, prog_name="graphrewrite", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("graphrewrite: error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"graphrewrite: error: {exc.format_message()}", err=True)
        sys.exit(2)
    except GraphrewriteError as exc:
        click.echo(f"graphrewrite: error: {printable(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("graphrewrite: error: interrupted", err=True)
        sys.exit(130)
    except MemoryError:
        click.echo("graphrewrite: error: out of memory", err=True)
        sys.exit(INTERNAL_ERROR_EXIT)
    except Exception as exc:  # noqa: BLE001 - the one place that turns bugs into one line
        if os.environ.get("GRAPHREWRITE_DEBUG"):
            raise
        click.echo(f"graphrewrite: error: internal error: {type(exc).__name__}: {printable(first_line(exc, default=''))} "
                   "(set GRAPHREWRITE_DEBUG=1 for a traceback)", err=True)
        sys.exit(INTERNAL_ERROR_EXIT)


if __name__ == "__main__":
    main()
