"""The manifest: a JSON asset inside every rewritten model saying what the rewrite did.

``inspect``, ``diff``, ``export`` and the Python update helper read it; it is stable JSON that
scripts may read too (``format`` and ``version`` say which layout).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from graphrewrite import views
from graphrewrite.errors import GraphrewriteError, InputModelError
from graphrewrite.hparams import alpha_schedule
from graphrewrite.rewriting.model import VariableInfo
from graphrewrite.rewriting.plan import RewritePlan, Use, display_op
from graphrewrite.rewriting.scan import MANIFEST_ASSET

FORMAT = "graphrewrite-manifest"
LOOKUPS = frozenset({"GatherV2", "ResourceGather"})
VERSION = 1


def source_sizes(path: str, variables: Iterable[VariableInfo]) -> dict[str, int]:
    """The original model's size, for export's original -> final figures: ``parameters`` (scalars
    in its variables, each weight once) and ``bytes`` (every file of its directory)."""
    return {"parameters": sum(math.prod(v.shape) for v in variables), "bytes": dir_bytes(path)}


def dir_bytes(path: str) -> int:
    """Bytes of every file under ``path``."""
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


def build(plan: RewritePlan, source: str, kind: str, tool_version: str,
          signatures: list[str]) -> dict[str, Any]:
    """The manifest of a rewrite (before its verification figures are added)."""
    from graphrewrite.transforms import make

    transform = make(plan.hparams, allow_larger=True)
    sites = []
    for site in plan.sites:
        first = site.uses[0]
        sites.append({
            "id": site.id,
            "op": site.op,
            "ops": sorted({display_op(u.op) for u in site.uses}),
            "op_type": site.op_type,
            "variable": site.variable.name,
            "variable_key": site.variable.key,
            "option": int(plan.hparams["compression_option"]),
            "method": plan.method,
            "shape": list(site.variable.shape),
            "matrix": [site.size.m, site.size.n],
            "view": views.to_json(site.view),
            "operand": first.operand,
            "k": site.size.k,
            "params_before": site.size.params_before,
            "params_after": site.size.params_after,
            # A lookup (the first use) multiplies nothing; its compressed form costs 2 k n per row.
            "flops_before": 0 if first.op_type in LOOKUPS else 2 * site.size.m * site.size.n,
            "flops_after": 2 * (site.size.k or 0) * site.size.n if first.op_type in LOOKUPS
            else transform.flops(site.size),
            "details": dict(site.size.details),
            "uses": [{"function": u.function, "node": u.op, "op_type": u.op_type, "operand": u.operand,
                      "chain": views.to_json(u.chain), "op_steps": views.to_json(u.op_steps),
                      "view": views.to_json(u.view)}
                     for u in site.uses],
        })
    skipped = [{"op": s.op, "op_type": s.op_type, "variable": s.variable, "shape": list(s.shape),
                "reason": s.reason} for s in plan.skipped]
    before, after = plan.params_before, plan.params_after
    return {
        "format": FORMAT,
        "version": VERSION,
        "tool_version": tool_version,
        "source": {"path": os.path.abspath(source), "kind": kind},
        "method": plan.method,
        "hparams": dict(plan.hparams),
        "options": dict(plan.options),
        "schedule": alpha_schedule(plan.hparams),  # when alpha reaches 0 (inspect shows it)
        "signatures": signatures,
        "sites": sites,
        "skipped": skipped,
        "left_dense": [{"reason": reason, "weights": count, "params": params}
                       for reason, (count, params) in plan.left_dense.items()],
        "totals": {
            "sites": len(sites),
            "skipped": len(skipped),
            "params_before": before,
            "params_after": after,
            "ratio": (after / before) if before else 1.0,
            "flops_before": sum(s["flops_before"] for s in sites),
            "flops_after": sum(s["flops_after"] for s in sites),
        },
    }


def plan_from(data: dict[str, Any], infos: Mapping[str, VariableInfo], transform: Any) -> RewritePlan:
    """The RewritePlan a manifest records (for export), with ``infos`` keyed by variable key."""
    from graphrewrite.rewriting.plan import SitePlan
    from graphrewrite.transforms import SizePlan

    sites = []
    try:
        for site in data["sites"]:
            info = infos[site["variable_key"]]
            uses = tuple(
                _use(u, site, info.key)
                for u in site["uses"])
            size = SizePlan(int(site["matrix"][0]), int(site["matrix"][1]), site["k"], int(site["params_after"]),
                            dict(site.get("details", {})))
            sites.append(SitePlan(site["id"], info, uses, views.from_json(site["view"]), size))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputModelError(f"damaged graphrewrite manifest ({type(exc).__name__}: {exc})") from None
    return RewritePlan(tuple(sites), (), dict(data["hparams"]), data.get("method", transform.name))


def _use(use: dict[str, Any], site: dict[str, Any], key: str) -> Use:
    """One recorded use; its view is the site's, or (a tied weight's other reader) the transpose."""
    view = views.from_json(use.get("view", site["view"]))
    m, n = int(site["matrix"][0]), int(site["matrix"][1])
    flipped = view != views.from_json(site["view"])
    return Use(use["function"], use["node"], use["op_type"], int(use["operand"]), key, views.from_json(use["chain"]),
               views.from_json(use["op_steps"]), view, n if flipped else m, m if flipped else n)


@contextlib.contextmanager
def damage_guard(where: str) -> Iterator[None]:
    """Turns the errors a hand-edited manifest can still cause in its readers into one clear line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise InputModelError(f"{where}: damaged graphrewrite manifest ({type(exc).__name__}: {exc})") from None


def write(data: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")


def read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputModelError(f"{path}: unreadable graphrewrite manifest ({exc})") from None
    validate(data, path)
    return data


def read_dir(model_dir: str) -> dict[str, Any] | None:
    """The manifest of a SavedModel directory, or None if it was not written by graphrewrite."""
    path = os.path.join(model_dir, "assets", MANIFEST_ASSET)
    if not os.path.isfile(path):
        return None
    return read_file(path)


def read_from_object(model: Any) -> dict[str, Any]:
    """The manifest of a loaded rewritten model (through its asset)."""
    import tensorflow as tf

    asset = getattr(model, "graphrewrite_manifest", None)
    if asset is None:
        raise ValueError("this object is not a model rewritten by graphrewrite (no manifest)")
    with tf.init_scope():
        path = asset.asset_path
        if hasattr(path, "numpy"):
            value = path.numpy()
        else:  # loaded into a tf.compat.v1 graph: the asset path is a constant of that graph
            value = tf.get_static_value(path)
            if value is None:
                raise ValueError("cannot read the manifest asset path of this model")
    value = value.item() if hasattr(value, "item") else value  # numpy bytes scalar
    return read_file(value.decode() if isinstance(value, bytes) else str(value))


def validate(data: Any, where: str) -> None:
    """Checks the manifest's whole layout, so that a damaged or hand-edited one gives one clear
    line here, never a KeyError or IndexError later."""
    def bad(what: str) -> InputModelError:
        return InputModelError(f"{where}: damaged graphrewrite manifest ({what})")

    def expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise bad(f"{what} missing or of the wrong type")
        return value

    def ints(value: Any, what: str, length: int | None = None) -> list[int]:
        expect(value, list, what)
        if (length is not None and len(value) != length) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            raise bad(f"{what} is not a list of {length or 'some'} non-negative integers")
        return value

    def view(value: Any, what: str) -> views.View:
        try:
            return views.from_json(expect(value, list, what))
        except (TypeError, ValueError):
            raise bad(f"{what} is malformed") from None

    expect(data, dict, "the manifest")
    if data.get("format") != FORMAT:
        raise bad("not a graphrewrite manifest")
    if data.get("version") != VERSION:
        raise bad(f"version {data.get('version')!r}, expected {VERSION}")
    expect(data.get("sites"), list, "'sites'")
    expect(data.get("skipped"), list, "'skipped'")
    totals = expect(data.get("totals"), dict, "'totals'")
    for key in ("sites", "skipped", "params_before", "params_after", "ratio"):
        expect(totals.get(key), (int, float), f"totals: '{key}'")
    for key, value in totals.items():
        expect(value, (int, float), f"totals: '{key}'")
    for key in ("options", "verification", "source"):
        if key in data:
            expect(data[key], dict, f"'{key}'")
    try:
        from graphrewrite.hparams import resolve

        resolve(None, expect(data.get("hparams"), dict, "'hparams'"))
    except GraphrewriteError as exc:
        raise bad(f"hparams: {exc}") from None
    for i, group in enumerate(expect(data.get("left_dense", []), list, "'left_dense'")):
        expect(expect(group, dict, f"left_dense {i}").get("reason"), str, f"left_dense {i}: 'reason'")
        for key in ("weights", "params"):
            expect(group.get(key), int, f"left_dense {i}: '{key}'")
    for i, skip in enumerate(data["skipped"]):
        for key in ("op", "reason"):
            expect(expect(skip, dict, f"skipped {i}").get(key), str, f"skipped {i}: '{key}'")
    for i, site in enumerate(data["sites"]):
        expect(site, dict, f"site {i}")
        for key in ("id", "op", "variable", "variable_key", "method"):
            expect(site.get(key), str, f"site {i}: '{key}'")
        for key in ("params_before", "params_after", "option"):
            expect(site.get(key), int, f"site {i}: '{key}'")
        if "k" not in site:
            raise bad(f"site {i}: 'k' missing")
        if site["k"] is not None:
            expect(site["k"], int, f"site {i}: 'k'")
        expect(site.get("details", {}), dict, f"site {i}: 'details'")
        shape = ints(site.get("shape"), f"site {i}: 'shape'")
        matrix = ints(site.get("matrix"), f"site {i}: 'matrix'", 2)
        steps = view(site.get("view"), f"site {i}: 'view'")
        try:
            if list(views.shape_after(shape, steps)) != matrix:
                raise bad(f"site {i}: 'view' does not take 'shape' to 'matrix'")
        except (IndexError, ValueError):
            raise bad(f"site {i}: 'view' does not fit 'shape'") from None
        for j, use in enumerate(expect(site.get("uses"), list, f"site {i}: 'uses'")):
            expect(use, dict, f"site {i} use {j}")
            for key in ("function", "node", "op_type"):
                expect(use.get(key), str, f"site {i} use {j}: '{key}'")
            expect(use.get("operand"), int, f"site {i} use {j}: 'operand'")
            view(use.get("chain"), f"site {i} use {j}: 'chain'")
            view(use.get("op_steps"), f"site {i} use {j}: 'op_steps'")
            if "view" in use:
                view(use["view"], f"site {i} use {j}: 'view'")
