"""Human and JSON renderings of plans, manifests and results (no TensorFlow here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphrewrite import __version__
from graphrewrite.rewriting import manifest as manifest_lib
from graphrewrite.rewriting.plan import RewritePlan
from graphrewrite.safetext import printable
from graphrewrite.transforms import BY_NAME

_SITE_KEYS = ("op", "variable", "option", "method", "op_type", "shape", "matrix", "k", "params_before",
              "params_after", "flops_before", "flops_after")


def plan_dict(plan: RewritePlan, path: str = "", kind: str = "", signatures: Sequence[str] = ()) -> dict[str, Any]:
    """A plan in the manifest's layout (what compress would write), marked as not rewritten."""
    data = manifest_lib.build(plan, path or ".", kind, __version__, list(signatures))
    data["rewritten"] = False
    return data


def inspect_json(data: dict[str, Any]) -> dict[str, Any]:
    """The stable JSON of ``inspect``: sites, skipped, totals, hyperparameters."""
    sites = []
    for site in data["sites"]:
        entry = {key: site.get(key) for key in _SITE_KEYS}
        entry["ratio"] = site["params_after"] / site["params_before"] if site["params_before"] else 1.0
        for key in ("policy", "kept_energy", "relative_error", "factors", "calibration", "outputs", "output_error",
                    "output_error_plain", "output_error_first_pass", "feedback_level", "feedback"):
            if key in site.get("details", {}):
                entry[key] = site["details"][key]
        for extra in ("alpha", "reconstruction_error"):
            if extra in site:
                entry[extra] = site[extra]
        sites.append(entry)
    out = {
        "rewritten": data.get("rewritten", True),
        "method": data.get("method"),
        "sites": sites,
        "skipped": [{"op": s["op"], "variable": s.get("variable"), "reason": s["reason"]} for s in data["skipped"]],
        "left_dense": data.get("left_dense", []),
        "totals": data["totals"],
        "hparams": data["hparams"],
    }
    for extra in ("global_step", "verification", "options"):
        if extra in data:
            out[extra] = data[extra]
    schedule = _schedule(data)
    if schedule is not None:
        out["schedule"] = schedule
    return out


def _schedule(data: dict[str, Any]) -> dict[str, Any] | None:
    """When alpha moves (hparams.alpha_schedule), for methods with an alpha; else None."""
    from graphrewrite.hparams import alpha_schedule
    from graphrewrite.transforms import BY_NAME

    method = BY_NAME.get(str(data.get("method")))
    return alpha_schedule(data["hparams"]) if method is not None and method.blended else None


def schedule_text(schedule: dict[str, Any], hp: dict[str, Any]) -> str:
    """``schedule: alpha 1 -> 0 in 100 updates every 10 steps from step 9: alpha = 0 at step 999``."""
    head = (f"schedule: alpha drops by {hp['alpha_decrement_value']:.6g} every {hp['compression_frequency']} "
            f"step(s) from step {schedule['first_update_step']}")
    if schedule["updates_to_zero"] is None:
        return f"{head}; alpha does not reach 0 within a million updates"
    if schedule["alpha_zero_step"] is None:
        return f"{head}; alpha does not reach 0 (the schedule ends at step {hp['end_compression_step']} first)"
    return (f"{head}: alpha = 0 at global step {schedule['alpha_zero_step']:,} "
            f"({schedule['updates_to_zero']} updates)")


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(lines)


def inspect_text(data: dict[str, Any]) -> str:
    data = printable(data)  # names from the model, never control characters on a terminal
    state = "rewritten model" if data.get("rewritten", True) else "plan (dry run, nothing written)"
    hp = data["hparams"]
    policy = (data.get("options") or {}).get("policy") or f"rank={hp.get('rank')}"
    out = [f"{state}: method {data.get('method')} (compression_option={hp.get('compression_option')}, {policy})"]
    if "global_step" in data:
        out.append(f"global step {data['global_step']}")
    schedule = _schedule(data)
    if schedule is not None:
        out.append(schedule_text(schedule, hp))
    if data["sites"]:
        live = "alpha" in data["sites"][0]
        calibrated = any("output_error" in s.get("details", {}) for s in data["sites"])
        header = ["op", "variable", "type", "shape", "k", "params", "ratio", "FLOPs/row"]
        header += ["alpha", "error now"] if live else []
        header += ["output error: plain -> calibrated"] if calibrated else []
        rows = []
        for s in data["sites"]:
            row = [s["op"], s["variable"], s.get("op_type", ""), "x".join(map(str, s["shape"])),
                   "-" if s.get("k") is None else str(s["k"]), f"{s['params_before']:,} -> {s['params_after']:,}",
                   f"{s['params_after'] / max(s['params_before'], 1):.3f}",
                   f"{s.get('flops_before', 0):,} -> {s.get('flops_after', 0):,}"]
            if live:
                row += [f"{s['alpha']:.4f}", f"{s['reconstruction_error']:.4f}"]
            if calibrated:
                row.append(calibration_text(s.get("details", {})))
            rows.append(row)
        out.append(table(rows, header))
    else:
        out.append("no sites")
    if calibrated_with := (data.get("options") or {}).get("calibration"):
        out.append(f"output error: ||X (A - W_c)|| / ||X A|| of each weight on the rows X it multiplies "
                   f"for the {calibrated_with['examples']} calibration examples of "
                   f"{calibrated_with['signature']!r}, with factors from the weight alone (plain) and calibrated")
        if any("feedback_level" in s.get("details", {}) for s in data["sites"]):
            out.append("fed back: refitted by error feedback (at most "
                       f"{calibrated_with.get('passes', 0)} passes); its output error is ||X A - X~ W_c|| / ||X A||, "
                       "X~ the rows it multiplies when the weights before it are compressed (plain: this weight's "
                       "factors from the weight alone, the others as they are; first pass: before its refit)")
        out.extend(f"  {s['variable']}: error feedback {s['details']['feedback']}"
                   for s in data["sites"] if "feedback" in s.get("details", {}))
        out.extend(f"  {s['variable']}: {s['details']['outputs']} (its output errors leave out each row's mean)"
                   for s in data["sites"] if "outputs" in s.get("details", {}))
        if "model_check" in calibrated_with:
            out.append(model_check_text(calibrated_with["model_check"]))
        if "run" in calibrated_with.get("distill", {}):
            out.append(distill_text(calibrated_with["distill"]))
    if data["skipped"]:
        out.append("skipped:")
        out.extend(f"  {s['op']} ({s.get('variable')}): {s['reason']}" for s in data["skipped"])
    out.extend(_left_dense_lines(data))
    t = data["totals"]
    out.append(f"total: {t['sites']} sites, {t['skipped']} skipped, parameters {t['params_before']:,} -> "
               f"{t['params_after']:,} ({t['ratio']:.3f}x), FLOPs per row {t.get('flops_before', 0):,} -> "
               f"{t.get('flops_after', 0):,}")
    return "\n".join(out)


# compress suggests distillation where the model check's held-out output error of the factors kept
# is at least this: measured on the digits models (README), the MLP stays below 0.07 at every
# --target-ratio down to 0.2 with its accuracy kept, the CNN is at 0.25 and 0.45 at 0.29 and 0.2,
# where distillation adds 11 and 45 points, and at 0.05 at 0.48, where it is not kept.
DISTILL_HINT = 0.1


def model_check_text(check: dict[str, Any]) -> str:
    """One line on the model check (graphrewrite.rewriting.calibration.modelcheck) a manifest records."""
    if not check.get("checked"):
        return f"model check: not run ({check.get('why', 'no reason recorded')})"
    figures = ", ".join(f"{name} {error:.4f}" for name, error in check["errors"].items())
    z = ", ".join(f"{name} {value:+.1f}" for name, value in check.get("z", {}).items())
    return (f"model check on {check['examples']} held-out calibration examples (||Y_c - Y|| / ||Y||, Y the "
            f"original model's outputs, Y_c at alpha = 0 with factors fitted without those examples; several "
            f"outputs: the root of their squares' sum): {figures}; kept {check['kept']} (a less data-aware set "
            f"needs z < -2 against the one standing; z: {z})")


def distill_text(record: dict[str, Any]) -> str:
    """One line on distillation (graphrewrite.rewriting.calibration.distill) as a manifest records it."""
    if not record.get("run"):
        return f"distillation: not run ({record.get('why', 'no reason recorded')})"
    held = record["held_out"]
    ran = record.get("steps_run", record["steps"])
    stopped = (f"; stopped after {ran} of {record['steps']} steps at 80% of the sandbox's time "
               "(GRAPHREWRITE_RUN_TIMEOUT)" if ran < record["steps"] else "")
    what = (f"kept the factors of step {record['best_step']} of {record['steps']}" if record["kept"] else
            "not kept (no epoch lowered the held-out loss beyond noise): the factors before it stand")
    mixup = record.get("mixup")  # absent from records before mixup: those trained on the examples only
    mixed = (" and mixed pairs of them (mixup)" if mixup is True else
             f" (no mixup: {mixup})" if isinstance(mixup, str) else "")
    schedule = ", cosine decay" if record.get("schedule") == "cosine" else ""
    return (f"distillation ({record['loss']} loss against the original model's outputs, {record['examples']} "
            f"calibration examples{mixed}, Adam {record['rate']:g}{schedule}): held-out loss {held['before']:.4f} -> "
            f"{held['after']:.4f} (z {record['z']:+.1f}, kept below -2); {what}{stopped}; sites trained: "
            f"{len(record['trained'])}"
            + (f", without gradient: {', '.join(record['untouched'])}" if record["untouched"] else "")
            + (f". {allocation_text(record['allocation'])}" if isinstance(record.get("allocation"), dict) else "")
            + (f". {refit_text(record['refit'])}" if isinstance(record.get("refit"), dict) else ""))


def refit_text(refit: dict[str, Any]) -> str:
    """Whether distillation's factors were trained again on every calibration example (distill.refit)."""
    if not refit.get("run"):
        return f"Not distilled again on every example ({refit.get('why', 'no reason recorded')})"
    ran = refit.get("steps_run", refit["steps"])
    stopped = f", stopped after {ran} at 80% of the sandbox's time" if ran < refit["steps"] else ""
    return (f"Then distilled again from the same start on all {refit['examples']} examples, the held-out ones "
            f"included, for as many epochs ({refit['steps']} steps{stopped}): those factors are written (their "
            f"loss on the held-out examples, trained on now, {refit['loss_on_held_out']:.4f})")


def allocation_text(allocation: dict[str, Any]) -> str:
    """Which rank allocation distillation's factors were written with (graphrewrite.rewriting.calibration.fitting)."""
    if not allocation.get("compared"):
        return f"Allocation: --target-ratio's ({allocation.get('why', 'no other compared')})"
    held, ranks, params = allocation["held_out"], allocation["ranks"], allocation["params_after"]
    weights = list(dict.fromkeys(w for r in ranks.values() for w in r))

    def one(name: str) -> str:
        written = ", ".join(f"{w} {ranks[name].get(w, 'whole')}" for w in weights)
        return f"{name} ({written}; {params[name]:,} parameters) {held[name]:.4f}"

    names = list(held)
    return (f"Allocation: held-out loss after distillation, {one(names[0])} against {one(names[1])} (paired z "
            f"{allocation['z']:+.1f}): written with the lower, {allocation['kept']}")


def calibration_text(details: dict[str, Any]) -> str:
    """``plain -> calibrated`` output errors of a site, or why it has none."""
    if "output_error" in details:
        fed = ""
        if "feedback_level" in details:
            fed = (f" (level {details['feedback_level']}: refit not kept)" if "feedback" in details else
                   f" (fed back, level {details['feedback_level']}; first pass {details['output_error_first_pass']:.4f})")
        fed += " (distilled)" if details.get("distilled") else ""
        fed += " (up to a shift per row)" if "outputs" in details else ""
        return f"{details['output_error_plain']:.4f} -> {details['output_error']:.4f}{fed}"
    return f"- ({details['calibration']})" if "calibration" in details else "-"


def _left_dense_lines(data: dict[str, Any]) -> list[str]:
    """What the rewrite leaves dense, by reason, against all of the original model's parameters."""
    groups = data.get("left_dense") or []
    if not groups:
        return []
    dense = sum(g["params"] for g in groups)
    total = dense + sum(s["params_before"] for s in data["sites"])
    lines = [f"parameters of the original model: {total:,}; in rewritten sites "
             f"{total - dense:,} ({(total - dense) / max(total, 1):.1%}); left dense {dense:,}, by reason:"]
    lines.extend(f"  {g['params']:,} in {g['weights']} weight(s): {g['reason']}" for g in groups)
    return lines


def add_spectra(data: dict[str, Any], model: Any, plan: RewritePlan) -> None:
    """Adds each planned site's singular values (for plots of a dry run)."""
    import numpy as np

    from graphrewrite import views

    for entry, site in zip(data["sites"], plan.sites):
        matrix = views.apply_numpy(model.variables[site.variable.key].numpy(), site.view)
        entry["singular_values"] = np.linalg.svd(matrix.astype(np.float64), compute_uv=False).tolist()


def write_plots(data: dict[str, Any], directory: str) -> list[str]:
    """A spectrum PNG per low-rank site with its chosen k, and an overview PNG of parameters."""
    import os
    import re

    import numpy as np

    from graphrewrite.reporting import plots
    from graphrewrite.rewriting import rankpolicy

    os.makedirs(directory, exist_ok=True)
    written = []
    for site in data["sites"]:
        s = np.asarray(site.get("singular_values", []))
        if not s.size or site.get("k") is None:
            continue
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", site["variable"])
        written.append(plots.spectrum_png(os.path.join(directory, f"spectrum_{name}.png"), site["variable"],
                                          s, int(site["k"]), rankpolicy.kept_energy(s, int(site["k"]))))
    if data["sites"]:
        written.append(plots.overview_png(os.path.join(directory, "overview.png"), data["sites"]))
    return written


def compress_json(result: Any) -> dict[str, Any]:
    data = result.manifest if result.manifest is not None else plan_dict(result.plan)
    out = inspect_json(data)
    out["output"] = result.output
    return out


# Methods whose saving is in bytes rather than in parameters, and why their parameters shrink less.
_CODES = ("each code counts as a parameter but is stored in 1 byte (uint8) where the weight's entry took 4 "
          "(float32), so the parameters shrink less than the bytes")
BYTES_FIRST = {
    "kmeans": _CODES,
    "kmeans_pruning": _CODES,
    "simhash": "each sign bit counts as a parameter but is stored in 1 bit where the weight's entry took 32 "
               "(float32), so the parameters shrink less than the bytes",
}


def overall_ratio_text(plan: RewritePlan, target: float) -> str:
    """``--target-ratio``'s achieved ratio: parameters of every candidate weight, the rewritten
    ones after and the ones left dense as they are, against all of them before."""
    import math

    dense = sum(math.prod(s.shape) for s in plan.skipped)
    before, after = plan.params_before + dense, plan.params_after + dense
    return (f"kernel parameters overall (the {len(plan.sites)} rewritten and {len(plan.skipped)} left dense): "
            f"{before:,} -> {after:,} (ratio {after / max(before, 1):.3f}; --target-ratio {target:g})")


def compress_text(result: Any, source: str) -> str:
    plan = result.plan
    before, after = plan.params_before, plan.params_after
    if result.output is None:
        return inspect_text(plan_dict(plan))
    lines = [f"rewrote {len(plan.sites)} site(s), skipped {len(plan.skipped)}: {source} -> {result.output}"]
    params = (f"parameters of the rewritten weights: {before:,} -> {after:,} "
              f"(ratio {after / max(before, 1):.3f})")
    stored = [s.size.details.get("bytes_after") for s in plan.sites]
    stored_line = None
    if plan.sites and all(b is not None for b in stored):
        stored_line = (f"stored bytes of the rewritten weights: {4 * before:,} -> {sum(stored):,} "
                       f"(ratio {sum(stored) / max(4 * before, 1):.3f})")
    if not plan.sites:
        lines.append("no weight was rewritten" + (f" ({plan.skipped[0].reason})" if plan.skipped else ""))
    elif stored_line is not None and plan.method in BYTES_FIRST:
        lines += [f"{stored_line}: the saving is in bytes", f"{params}: {BYTES_FIRST[plan.method]}"]
    else:
        lines += [params] + ([stored_line] if stored_line else [])
    target = (plan.options or {}).get("policy") or ""
    if plan.sites and target.startswith("target_ratio="):
        lines.append(overall_ratio_text(plan, float(target.partition("=")[2].split(",")[0])))
    ver = result.verification
    if ver is not None and BY_NAME[plan.method].blended:
        unchecked = {key: entry.get("why", "not compared") for key, entry in ver.get("signatures", {}).items()
                     if not entry.get("checked")}
        lines.append(f"verified: at alpha = 1 the outputs equal the input model's; at alpha = 0 "
                     f"(one-shot) they move by {ver['max_rel_diff_alpha0']:.2%} (max |change| / max |output|, "
                     "on seeded standard-normal inputs"
                     + ("; of the raw logits, with the shift per row that --logits leaves to the softmax"
                        if ((result.manifest or {}).get("options") or {}).get("calibration", {}).get("logits") else "")
                     + ")" + ("; every signature but those below" if unchecked else ""))
        lines.extend(f"not verified: signature {key!r}: {why}" for key, why in sorted(unchecked.items()))
    elif ver is not None:
        lines.append(f"note: {plan.method} replaces each weight outright, as the reference does (no alpha): "
                     f"the outputs start {ver['max_rel_diff_alpha0']:.2%} (max relative) away from the input "
                     "model's; fine-tune to recover (see the README)")
    errors = [s["details"] for s in (result.manifest or {}).get("sites", []) if "output_error" in s["details"]]
    if errors:
        lines.append(f"calibrated {len(errors)} site(s): relative output error of each weight on the calibration "
                     f"examples, mean {np.mean([e['output_error'] for e in errors]):.2%} (factors from the weight "
                     f"alone: {np.mean([e['output_error_plain'] for e in errors]):.2%}); per site in inspect"
                     + ("; distilled factors serve the model's outputs, not their weight's: the distillation "
                        "line below has the model's figure" if any(e.get("distilled") for e in errors) else ""))
        if shifted := sum("outputs" in e for e in errors):
            lines.append(f"{shifted} of them fitted up to a shift of each output row (their outputs reach a softmax "
                         "or argmax, or are declared --logits: per site in inspect); their errors leave out each "
                         "row's mean")
        if fed := sum("feedback_level" in e and "refit not kept" not in e.get("feedback", "") for e in errors):
            lines.append(f"error feedback: {fed} of them refitted to their inputs in the compressed model "
                         "(their errors are those given the compressed weights before them)")
    calibrated_with = ((result.manifest or {}).get("options") or {}).get("calibration") or {}
    if check := calibrated_with.get("model_check"):
        lines.append(model_check_text(check))
        error = check.get("errors", {}).get(check.get("kept"), 0.0) if check.get("checked") else 0.0
        if error >= DISTILL_HINT and "distill" not in calibrated_with:
            lines.append(f"hint: on the held-out calibration examples the compressed model's outputs are off by "
                         f"{error:.0%} (the model check's figure above); --distill-steps 3000 would train the "
                         "factors to give the original's outputs there (with --logits where the outputs are "
                         "logits, for the softmax loss; each step is a forward and backward pass of one calibration batch "
                         "plus, with mixup (float inputs), the original's; README: Distillation)")
    if "run" in calibrated_with.get("distill", {}):
        lines.append(distill_text(calibrated_with["distill"]))
    if names := calibrated_with.get("as_logits"):
        lines.append(f"hint: {', '.join(names)} give{'s' if len(names) == 1 else ''} the signature's outputs up to a "
                     "bias; if those are logits (a softmax or argmax reads them), --logits fits "
                     f"{'it' if len(names) == 1 else 'them'} up to a shift of each row, which the softmax ignores "
                     "(README: Data-aware compression)")
    for skip in plan.skipped:
        lines.append(f"skipped {skip.op} ({skip.variable}): {skip.reason}")
    return "\n".join(printable(line) for line in lines)  # each one line, whatever the names hold


OUTPUT_SHIFT = ("max relative change of the outputs, tuned model as it is (its alphas) vs the final model "
                "(alpha = 0): max |tuned - final| / max |tuned| over every signature output, on seeded "
                "standard-normal inputs")


def _size(before: int | None, after: int, unit: Callable[[int], str]) -> str:
    if before is None:
        return f"{unit(after)} (the original's not recorded)"
    return f"{unit(before)} -> {unit(after)} ({after / max(before, 1):.3f}x)"


def _kb(n: int) -> str:
    return f"{n / 1e3:,.1f} kB"


def export_json(result: Any) -> dict[str, Any]:
    """``export --json``: the ExportResult's fields, and what output_shift measures."""
    import dataclasses

    return {**dataclasses.asdict(result), "output_shift_is": OUTPUT_SHIFT}


def export_text(result: Any, tuned: str) -> str:
    """``export``'s lines: original -> final in parameters and bytes on disk, then the details."""
    lines = [f"exported {result.sites} compressed site(s): {tuned} -> {result.output}",
             f"original -> final: parameters {_size(result.params_before, result.params_after, '{:,}'.format)}; "
             f"on disk {_size(result.bytes_before, result.bytes_after, _kb)}",
             f"  (the tuned model, with A and the factors: {result.params_tuned:,} parameters, "
             f"{_kb(result.bytes_tuned)})"]
    if result.max_alpha > 0:
        shift = "not measured (--fast)" if result.output_shift is None else f"{result.output_shift:.2%}"
        lines.append(f"warning: exported with alpha up to {result.max_alpha:.4g} (--force): outputs move by "
                     f"{shift} ({OUTPUT_SHIFT})")
    if result.max_rel_diff_alpha0 is not None:
        lines.append("verified: outputs equal the rewritten model's at alpha = 0"
                     + (" (every signature but those below)" if result.unchecked else ""))
    lines.extend(f"not verified: signature {key!r}: {why}" for key, why in sorted(result.unchecked.items()))
    return "\n".join(printable(line) for line in lines)
