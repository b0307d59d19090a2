"""Human and JSON renderings of plans, manifests and results (no TensorFlow here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graphrewrite import __version__
from graphrewrite import manifest as manifest_lib
from graphrewrite.plan import RewritePlan

_SITE_KEYS = ("op", "variable", "option", "method", "op_type", "shape", "k", "params_before", "params_after")


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
        for extra in ("alpha", "reconstruction_error"):
            if extra in site:
                entry[extra] = site[extra]
        sites.append(entry)
    out = {
        "rewritten": data.get("rewritten", True),
        "method": data.get("method"),
        "sites": sites,
        "skipped": [{"op": s["op"], "variable": s.get("variable"), "reason": s["reason"]} for s in data["skipped"]],
        "totals": data["totals"],
        "hparams": data["hparams"],
    }
    for extra in ("global_step", "verification"):
        if extra in data:
            out[extra] = data[extra]
    return out


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return "\n".join(lines)


def inspect_text(data: dict[str, Any]) -> str:
    state = "rewritten model" if data.get("rewritten", True) else "plan (dry run, nothing written)"
    hp = data["hparams"]
    out = [f"{state}: method {data.get('method')} (compression_option={hp.get('compression_option')}, "
           f"rank={hp.get('rank')})"]
    if data["sites"]:
        rows = []
        for s in data["sites"]:
            row = [s["op"], s["variable"], s.get("op_type", ""), "x".join(map(str, s["shape"])),
                   "-" if s.get("k") is None else str(s["k"]), f"{s['params_before']:,}",
                   f"{s['params_after']:,}", f"{s['params_after'] / max(s['params_before'], 1):.3f}"]
            if "alpha" in s:
                row.append(f"{s['alpha']:.4f}")
            rows.append(row)
        header = ["op", "variable", "type", "shape", "k", "before", "after", "ratio"]
        if data["sites"] and "alpha" in data["sites"][0]:
            header.append("alpha")
        out.append(_table(rows, header))
    else:
        out.append("no sites")
    if data["skipped"]:
        out.append("skipped:")
        out.extend(f"  {s['op']} ({s.get('variable')}): {s['reason']}" for s in data["skipped"])
    t = data["totals"]
    out.append(f"total: {t['sites']} sites, {t['skipped']} skipped, parameters {t['params_before']:,} -> "
               f"{t['params_after']:,} ({t['ratio']:.3f}x)")
    return "\n".join(out)


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
