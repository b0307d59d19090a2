"""Human and JSON renderings of plans, manifests and results (no TensorFlow here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graphrewrite import __version__
from graphrewrite import manifest as manifest_lib
from graphrewrite.plan import RewritePlan

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
        for key in ("policy", "kept_energy", "relative_error"):
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
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(lines)


def inspect_text(data: dict[str, Any]) -> str:
    state = "rewritten model" if data.get("rewritten", True) else "plan (dry run, nothing written)"
    hp = data["hparams"]
    policy = (data.get("options") or {}).get("policy") or f"rank={hp.get('rank')}"
    out = [f"{state}: method {data.get('method')} (compression_option={hp.get('compression_option')}, {policy})"]
    if "global_step" in data:
        out.append(f"global step {data['global_step']}")
    if data["sites"]:
        live = "alpha" in data["sites"][0]
        header = ["op", "variable", "type", "shape", "k", "params", "ratio", "FLOPs/row"]
        header += ["alpha", "error now"] if live else []
        rows = []
        for s in data["sites"]:
            row = [s["op"], s["variable"], s.get("op_type", ""), "x".join(map(str, s["shape"])),
                   "-" if s.get("k") is None else str(s["k"]), f"{s['params_before']:,} -> {s['params_after']:,}",
                   f"{s['params_after'] / max(s['params_before'], 1):.3f}",
                   f"{s.get('flops_before', 0):,} -> {s.get('flops_after', 0):,}"]
            if live:
                row += [f"{s['alpha']:.4f}", f"{s['reconstruction_error']:.4f}"]
            rows.append(row)
        out.append(table(rows, header))
    else:
        out.append("no sites")
    if data["skipped"]:
        out.append("skipped:")
        out.extend(f"  {s['op']} ({s.get('variable')}): {s['reason']}" for s in data["skipped"])
    out.extend(_left_dense_lines(data))
    t = data["totals"]
    out.append(f"total: {t['sites']} sites, {t['skipped']} skipped, parameters {t['params_before']:,} -> "
               f"{t['params_after']:,} ({t['ratio']:.3f}x), FLOPs per row {t.get('flops_before', 0):,} -> "
               f"{t.get('flops_after', 0):,}")
    return "\n".join(out)


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

    from graphrewrite import plots, rankpolicy

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


def compress_text(result: Any, source: str) -> str:
    plan = result.plan
    before, after = plan.params_before, plan.params_after
    if result.output is None:
        return inspect_text(plan_dict(plan))
    lines = [f"rewrote {len(plan.sites)} site(s), skipped {len(plan.skipped)}: {source} -> {result.output}"]
    if plan.sites:
        lines.append(f"parameters of the rewritten weights: {before:,} -> {after:,} "
                     f"(ratio {after / max(before, 1):.3f})")
    else:
        lines.append("no weight was rewritten" + (f" ({plan.skipped[0].reason})" if plan.skipped else ""))
    stored = [s.size.details.get("bytes_after") for s in plan.sites]
    if plan.sites and all(b is not None for b in stored):
        lines.append(f"stored bytes of the rewritten weights: {4 * before:,} -> {sum(stored):,} "
                     f"(ratio {sum(stored) / max(4 * before, 1):.3f})")
    from graphrewrite.transforms import BY_NAME

    ver = result.verification
    if ver is not None and BY_NAME[plan.method].blended:
        lines.append(f"verified: at alpha = 1 the outputs equal the input model's; at alpha = 0 "
                     f"(one-shot) they move by {ver['max_rel_diff_alpha0']:.2%} (max relative)")
    elif ver is not None:
        lines.append(f"note: {plan.method} replaces each weight outright, as the reference does (no alpha): "
                     f"the outputs start {ver['max_rel_diff_alpha0']:.2%} (max relative) away from the input "
                     "model's; fine-tune to recover (see the README)")
    for skip in plan.skipped:
        lines.append(f"skipped {skip.op} ({skip.variable}): {skip.reason}")
    return "\n".join(lines)
