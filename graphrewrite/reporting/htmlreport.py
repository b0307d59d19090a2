"""One self-contained HTML page of a diff: summary, signatures, variables, and a picture per site.

The page has inline CSS and one inline SVG per rewritten site, and nothing else: no script, no
external resource. Every string that comes from the models (names, op types, manifest fields) may
be hostile, so each one passes through ``html.escape`` (control characters spelled out) on its way
into the page, which is also well-formed XML.

A site's picture shows the op before, ``x -> op <- A``, and after, as the manifest's method builds
it: for an alpha-gated method ``alpha * op(x, A) + (1 - alpha) * op(x, W_c)``, where ``op(x, W_c)``
is ``(x B) C`` for low rank and an op reading ``W_c`` made from the method's factor variables
otherwise; for methods without alpha (options 9, 10, 12) only ``op(x, W_c)``.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Mapping, Sequence
from typing import Any, final

from graphrewrite.errors import OutputError
from graphrewrite.reporting.diff import (
    dims_text,
    op_changes,
    params_text,
    printable,
    site_params,
    status_text,
    tensor_text,
    variable_text,
    variables_text,
)
from graphrewrite.reporting.report import calibration_text, distill_text, model_check_text

_CHAR_W = 7.3  # advance of one 12px monospace character
_LINE_H = 15
_PAD_X, _PAD_Y = 8, 5
_GAP_X, _GAP_Y = 38, 20
_MARGIN = 10
_MAX_CHARS = 56  # longer names are cut in pictures; the box's tooltip holds the whole name
# Methods whose compressed weight is a product of factors, in the order x meets them.
_CHAINS: dict[str, dict[str, str]] = {
    "low_rank": {"b": "B", "c": "C"},
    "input_output": {"b": "blockdiag(B)", "c": "C", "d": "blockdiag(D)"},
}

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.num { text-align: right; }
code { font-family: monospace; }
section.site { margin-bottom: 2em; }
svg text { font: 12px monospace; fill: #222; }
svg text.caption { font-weight: bold; }
svg rect { stroke-width: 1.2; }
svg .io rect { fill: #eeeeee; stroke: #888888; }
svg .op rect { fill: #dbe9ff; stroke: #3b6fc2; }
svg .var rect { fill: #ffe9cc; stroke: #c2873b; }
svg .new rect { fill: #dcf5dc; stroke: #3b9a3b; }
svg .math rect { fill: #ffffff; stroke: #888888; }
svg line { stroke: #555555; stroke-width: 1.3; }
svg polygon { fill: #555555; }
"""


def write_html(result: Mapping[str, Any], path: str) -> str:
    """Writes the page of a ``graphrewrite.reporting.diff.diff_models`` result to ``path``; returns ``path``.

    Raises:
      OutputError: ``path`` cannot be written.
    """
    page = render(result)
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the HTML report ({exc.strerror})") from None
    return path


def render(result: Mapping[str, Any]) -> str:
    """The page as a string."""
    manifest = result["manifest"]
    body = ["<h1>graphrewrite diff</h1>", _summary(result),
            "<h2>Signatures</h2>", _signatures(result["signatures"]),
            "<h2>Variables</h2>", _variables(result["variables"])]
    if manifest is not None:
        body += ["<h2>Rewritten sites</h2>"]
        body += [_site_section(site) for site in manifest["sites"]] or ["<p>no sites</p>"]
        if manifest["skipped"]:
            body += ["<h2>Skipped</h2>", _table(["op", "type", "variable", "reason"],
                                                [[s["op"], s["op_type"], s["variable"], s["reason"]]
                                                 for s in manifest["skipped"]])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/>"
            f"<title>graphrewrite diff</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _e(value: Any) -> str:
    """Escaped text: a string of the models may hold markup or control characters."""
    return html.escape(printable(str(value)), quote=True)


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    lines = [f"<table class=\"{_e(cls)}\">" if cls else "<table>"]
    if header is not None:
        lines.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    lines += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</table>"])


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _summary(result: Mapping[str, Any]) -> str:
    variables, manifest = result["variables"], result["manifest"]
    rows = [["in model", f"{result['in']['path']} ({result['in']['kind']})"],
            ["out model", f"{result['out']['path']} ({result['out']['kind']})"],
            ["signatures", status_text(result["signatures"])],
            ["variables", variables_text(variables)],
            ["parameters", params_text(variables["params_before"], variables["params_after"])]]
    if manifest is not None:
        rows += [["rewritten sites", f"{len(manifest['sites'])} ({manifest['method']}, compression_option="
                                     f"{manifest['option']}), {len(manifest['skipped'])} skipped"],
                 ["parameters of the rewritten weights", params_text(*site_params(manifest["sites"]))]]
        if manifest.get("model_check"):
            rows.append(["model check (--calibration)", model_check_text(manifest["model_check"])])
        if "run" in (manifest.get("distill") or {}):
            rows.append(["distillation (--distill-steps)", distill_text(manifest["distill"])])
    return _table(None, rows, "summary")


def _signatures(signatures: Mapping[str, Any]) -> str:
    rows = []
    for key, sig in signatures.items():
        side = sig["out"] or sig["in"]
        rows.append([key, sig["status"],
                     ", ".join(f"{n}: {tensor_text(s)}" for n, s in side["inputs"].items()),
                     ", ".join(f"{n}: {tensor_text(s)}" for n, s in side["outputs"].items()),
                     op_changes(sig["ops"])])
    return _table(["signature", "interface", "inputs", "outputs", "op types executed (out minus in)"],
                  rows, "signatures")


def _variables(variables: Mapping[str, Any]) -> str:
    rows = [["added", variable_text(v)] for v in variables["added"]]
    rows += [["removed", variable_text(v)] for v in variables["removed"]]
    rows += [["changed", f"{c['name']}: {tensor_text(c['in'])} -> {tensor_text(c['out'])}"]
             for c in variables["changed"]]
    return _table(["change", "variable"], rows, "variables") if rows else "<p>no variable added or removed</p>"


def _site_section(site: Mapping[str, Any]) -> str:
    facts = [[site.get("op", ""), site.get("op_type", ""), dims_text(site["shape"]), dims_text(site["matrix"]),
              "-" if site.get("k") is None else site["k"], site.get("method", ""),
              f"{site['params_before']:,} -> {site['params_after']:,}"]]
    header = ["op", "type", "shape", "matrix", "k", "method", "parameters"]
    details = site.get("details") or {}
    if "output_error" in details or "calibration" in details:
        header.append("output error on calibration data: plain -> calibrated")
        facts[0].append(calibration_text(details))
    return "\n".join([
        "<section class=\"site\">",
        f"<h3><code>{_e(site['variable'])}</code></h3>",
        _table(header, facts),
        site_svg(site),
        "</section>",
    ])


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Node:
    col: int
    row: int
    lines: tuple[str, ...]
    kind: str  # CSS class: io, op, var (the original weight), new (new variables), math


@dataclasses.dataclass(frozen=True)
class _Box:
    x: float
    y: float
    w: float
    h: float


@final
class _Grid:
    """Boxes in rows and columns joined by arrows; columns and rows size to their largest box."""

    def __init__(self) -> None:
        self.nodes: dict[str, _Node] = {}
        self.edges: list[tuple[str, str]] = []

    def add(self, key: str, col: int, row: int, lines: Sequence[str], kind: str) -> None:
        self.nodes[key] = _Node(col, row, tuple(lines), kind)

    def link(self, *keys: str) -> None:
        """Arrows from each key to the next."""
        self.edges.extend(zip(keys, keys[1:]))

    def render(self, top: float) -> tuple[list[str], float, float]:
        """(SVG elements, width, height) with the grid's top edge at ``top``."""
        boxes = self._layout(top)
        parts = [_arrow(boxes[a], boxes[b], self.nodes[a], self.nodes[b]) for a, b in self.edges]
        parts += [_box_svg(boxes[k], n) for k, n in self.nodes.items()]
        width = max(b.x + b.w for b in boxes.values()) + _MARGIN
        height = max(b.y + b.h for b in boxes.values()) - top
        return parts, width, height

    def _layout(self, top: float) -> dict[str, _Box]:
        sizes = {k: _size(n.lines) for k, n in self.nodes.items()}
        cols = sorted({n.col for n in self.nodes.values()})
        rows = sorted({n.row for n in self.nodes.values()})
        col_w = {c: max(sizes[k][0] for k, n in self.nodes.items() if n.col == c) for c in cols}
        row_h = {r: max(sizes[k][1] for k, n in self.nodes.items() if n.row == r) for r in rows}
        col_x = {c: _MARGIN + sum(col_w[d] + _GAP_X for d in cols[:i]) for i, c in enumerate(cols)}
        row_y = {r: top + sum(row_h[d] + _GAP_Y for d in rows[:i]) for i, r in enumerate(rows)}
        return {k: _Box(col_x[n.col] + (col_w[n.col] - sizes[k][0]) / 2,
                        row_y[n.row] + (row_h[n.row] - sizes[k][1]) / 2, *sizes[k])
                for k, n in self.nodes.items()}


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 1] + "\u2026"


def _size(lines: Sequence[str]) -> tuple[float, float]:
    return (max(len(_cut(t)) for t in lines) * _CHAR_W + 2 * _PAD_X, len(lines) * _LINE_H + 2 * _PAD_Y)


def _box_svg(box: _Box, node: _Node) -> str:
    cx = box.x + box.w / 2
    texts = "".join(
        f"<text x=\"{cx:.1f}\" y=\"{box.y + _PAD_Y + (i + 0.8) * _LINE_H:.1f}\" text-anchor=\"middle\">"
        f"{_e(_cut(line))}</text>" for i, line in enumerate(node.lines))
    return (f"<g class=\"{node.kind}\"><title>{_e(' '.join(node.lines))}</title>"
            f"<rect x=\"{box.x:.1f}\" y=\"{box.y:.1f}\" width=\"{box.w:.1f}\" height=\"{box.h:.1f}\" rx=\"4\"/>"
            f"{texts}</g>")


def _arrow(a: _Box, b: _Box, na: _Node, nb: _Node) -> str:
    """A line with a head from box a to box b: side to side, or top/bottom within one column."""
    if na.col == nb.col:
        down = na.row < nb.row
        start = (a.x + a.w / 2, a.y + a.h if down else a.y)
        end = (b.x + b.w / 2, b.y if down else b.y + b.h)
    else:
        right = na.col < nb.col
        start = (a.x + a.w if right else a.x, a.y + a.h / 2)
        end = (b.x if right else b.x + b.w, b.y + b.h / 2)
    (x1, y1), (x2, y2) = start, end
    length = max(((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5, 1e-6)
    ux, uy = (x2 - x1) / length, (y2 - y1) / length
    head = [(x2, y2), (x2 - 8 * ux - 4 * uy, y2 - 8 * uy + 4 * ux), (x2 - 8 * ux + 4 * uy, y2 - 8 * uy - 4 * ux)]
    points = " ".join(f"{px:.1f},{py:.1f}" for px, py in head)
    return (f"<line x1=\"{x1:.1f}\" y1=\"{y1:.1f}\" x2=\"{x2 - 6 * ux:.1f}\" y2=\"{y2 - 6 * uy:.1f}\"/>"
            f"<polygon points=\"{points}\"/>")


def site_svg(site: Mapping[str, Any]) -> str:
    """One inline SVG of a diff site: the op before the rewrite, and after it."""
    pictures = [(f"before: {site.get('op_type', '')} reads {site['variable']}", _before(site)),
                (f"after: {_formula(site)}", _after(site))]
    parts: list[str] = []
    top, width = 0.0, 0.0
    for caption, grid in pictures:
        parts.append(f"<text class=\"caption\" x=\"{_MARGIN}\" y=\"{top + 16:.1f}\">{_e(caption)}</text>")
        body, grid_w, grid_h = grid.render(top + 26)
        parts += body
        width = max(width, grid_w, (len(caption) * _CHAR_W) + 2 * _MARGIN)
        top += 26 + grid_h + 18
    return (f"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0f}\" height=\"{top:.0f}\" "
            f"viewBox=\"0 0 {width:.0f} {top:.0f}\" role=\"img\"><title>{_e(site['variable'])}</title>"
            + "".join(parts) + "</svg>")


def _formula(site: Mapping[str, Any]) -> str:
    chain = _chain(site)
    compressed = "@".join(label for _, label in chain) if chain else f"W_c ({site.get('method', '')})"
    if site["blended"]:
        return f"W = alpha*A + (1-alpha)*{compressed}"
    return f"W = {compressed}, no alpha: the factors replace A"


def _chain(site: Mapping[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """The factors ``x`` meets one after another, with their labels, for methods that are such a
    product (``W_c = B @ C``, ``blockdiag(B) @ C @ blockdiag(D)``); empty for the others."""
    labels = _CHAINS.get(str(site.get("method")), {})
    factors = {f["role"]: f for f in site["factors"]}
    if not labels or not set(factors) <= set(labels) or "c" not in factors:
        return []
    return [(factors[role], label) for role, label in labels.items() if role in factors]


def _weight_lines(site: Mapping[str, Any]) -> list[str]:
    lines = [f"A: {site['variable']}", dims_text(site["shape"])]
    if list(site["shape"]) != list(site["matrix"]):
        lines.append(f"as matrix {dims_text(site['matrix'])}")
    return lines


def _before(site: Mapping[str, Any]) -> _Grid:
    grid = _Grid()
    grid.add("x", 0, 1, ["x"], "io")
    grid.add("A", 1, 0, _weight_lines(site), "var")
    grid.add("op", 1, 1, [str(site.get("op_type", "")), str(site.get("op", ""))], "op")
    grid.add("y", 2, 1, ["y"], "io")
    grid.link("x", "op", "y")
    grid.link("A", "op")
    return grid


def _after(site: Mapping[str, Any]) -> _Grid:
    grid = _Grid()
    grid.add("x", 0, 1, ["x"], "io")
    if not site["blended"]:
        first, last, col = _compressed_path(grid, site, row=1, col=1)
        grid.add("y", col, 1, ["y"], "io")
        grid.link("x", first)
        grid.link(last, "y")
        return grid
    op_type = str(site.get("op_type", ""))
    grid.add("A", 1, 0, _weight_lines(site), "var")
    grid.add("opA", 1, 1, [op_type, "reads A"], "op")
    first, last, col = _compressed_path(grid, site, row=2, col=1)
    alpha = str(site.get("alpha_variable") or "alpha")
    grid.add("scaleA", col, 1, ["* alpha", alpha], "math")
    grid.add("scaleC", col, 2, ["* (1-alpha)"], "math")
    grid.add("sum", col + 1, 1, ["+"], "math")
    grid.add("y", col + 2, 1, ["y"], "io")
    grid.link("x", "opA", "scaleA", "sum", "y")
    grid.link("A", "opA")
    grid.link("x", first)
    grid.link(last, "scaleC", "sum")
    return grid


def _compressed_path(grid: _Grid, site: Mapping[str, Any], row: int, col: int) -> tuple[str, str, int]:
    """Adds the ops computing ``op(x, W_c)`` on ``row`` from ``col``, their factor variables below.

    Returns:
      (first op, last op, the next free column).
    """
    op_type = str(site.get("op_type", ""))
    chain = _chain(site)
    if chain:
        ops = [f"op{i}" for i in range(len(chain))]
        for i, (factor, label) in enumerate(chain):
            grid.add(ops[i], col + i, row, [op_type, f"by {label}"], "op")
            grid.add(f"factor{i}", col + i, row + 1, _factor_lines(label, factor), "new")
            grid.link(f"factor{i}", ops[i])
        grid.link(*ops)
        return ops[0], ops[-1], col + len(chain)
    grid.add("opW", col, row, [op_type, "reads W_c"], "op")
    lines = [f"W_c ({site.get('method', '')}) from"]
    lines += [line for f in site["factors"] for line in _factor_lines(f["role"], f)]
    grid.add("W", col, row + 1, lines, "new")
    grid.link("W", "opW")
    return "opW", "opW", col + 1


def _factor_lines(label: str, factor: Mapping[str, Any]) -> list[str]:
    return [f"{label}: {factor['name']}", f"{dims_text(factor['shape'])} {factor['dtype']}"]
