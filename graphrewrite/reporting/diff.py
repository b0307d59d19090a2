"""What a rewrite changed, from the two ``saved_model.pb`` protobufs alone (nothing is loaded or run).

``diff_models(in_dir, out_dir)`` parses both models (they may be untrusted: no op of theirs is
executed, no checkpoint is restored) and compares what their signatures accept and return, which
op types each signature executes, and which variables each model holds; where ``out_dir`` was
written by graphrewrite, its manifest's sites and skips come along.

Which ops a signature executes: the graph nodes its output tensors depend on (inputs and control
inputs, followed backwards), then every library function those nodes call, by a ``func`` or
``list(func)`` attribute (``f`` of (Stateful)PartitionedCall, the branches of If/StatelessIf/Case,
``cond``/``body`` of While, ...) or by op type, recursively. Each reachable function body counts
once per signature, all of its nodes; the saver functions reached from the MetaGraph's SaverDef are
never counted, nor are gradient functions (nothing calls them in inference).

Which variables a model holds: the ``variable`` nodes of its SavedObjectGraph (TF2), or, for a TF1
model without one, its ``VariableV2``/``Variable``/``VarHandleOp`` graph nodes (trainable when the
``trainable_variables`` collection names them). Each variable counts once: Keras 3's export saves
every weight a second time (``_all_variables``, a copy no function reads), so a variable node that
no concrete function binds and that has the name, dtype, shape and trainability of one that a
function does bind is the same weight under a second name, and is left out. Names may still repeat,
so variables are matched by name with multiplicity: the n-th variable of a name in one model pairs
with the n-th of that name in the other.

``diff_text`` renders the result for a terminal, with control characters in the models' strings
spelled out (``\\x1b``). The result is JSON (``json.dumps`` it as is); scripts may rely on this
layout (``format`` and ``version`` say which). Mappings keyed by names have sorted keys; lists keep
the models' order unless noted::

    {
      "format": "graphrewrite-diff", "version": 1,
      "in":  {"path": str, "tags": [str], "kind": "tf2" | "tf1", "rewritten": bool},
      "out": {... the same for the out model ...},
      "signatures": {                     # every key of either model but __saved_model_init_op
        KEY: {
          "status": "unchanged" | "changed" | "added" | "removed",   # of the interface only
          "in":  {"method": str, "inputs": {NAME: TENSOR}, "outputs": {NAME: TENSOR}} | null,
          "out": {... the same ...} | null,                          # null: not in that model
          "inputs":  {"added": [NAME], "removed": [NAME], "changed": {NAME: {"in": TENSOR, "out": TENSOR}}},
          "outputs": {... the same ...},
          "ops": {"in": {OP_TYPE: int}, "out": {OP_TYPE: int},       # executed, by type
                  "added": {OP_TYPE: int}, "removed": {OP_TYPE: int}},   # out minus in, > 0
          "functions": {"in": int | null, "out": int | null}         # reachable bodies
        }
      },
      "variables": {
        "in": [VARIABLE], "out": [VARIABLE],                         # the models' order
        "added": [VARIABLE], "removed": [VARIABLE],                  # sorted by name
        "changed": [{"name": str, "in": VARIABLE, "out": VARIABLE}], # same name, other dtype/shape/trainable
        "params_before": int, "params_after": int                    # sums of "size" (null sizes count 0)
      },
      "manifest": null | {                # the out model's graphrewrite manifest
        "method": str, "option": int, "hparams": {...}, "totals": {...},
        "sites": [SITE], "skipped": [{"op": str, "op_type": str, "variable": str, "reason": str}],
        "model_check": null | {...}      # with --calibration: options.calibration.model_check
        "distill": null | {...}          # with --distill-steps: options.calibration.distill
      }
    }
    TENSOR   = {"dtype": str, "shape": [int | null] | null}          # null dim: unknown; null: unknown rank
    VARIABLE = {"name": str, "dtype": str, "shape": [int | null] | null, "trainable": bool, "size": int | null}
    SITE     = the manifest site's id, op, op_type, variable, method, option, shape, matrix, k,
               params_before, params_after, details (and flops_before/after where recorded), plus
               "blended": bool (alpha-gated: the method blends and the out model has the alpha variable),
               "alpha_variable": str | null, and
               "factors": [{"role": str, "name": str, "dtype": str, "shape": [...]}]  # out variables
                           named VARIABLE/ROLE_matrix, in the model's order
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, final

from graphrewrite.errors import InputModelError
from graphrewrite.reporting.report import distill_text, model_check_text, table
from graphrewrite.rewriting import manifest as manifest_lib
from graphrewrite.rewriting.graph import shape_dims
from graphrewrite.rewriting.loader import tf1_trainable_names
from graphrewrite.rewriting.scan import (
    MANIFEST_ASSET,
    called_functions,
    read_saved_model_proto,
    saver_exempt,
)
from graphrewrite.safetext import printable
from graphrewrite.transforms import BY_NAME

FORMAT = "graphrewrite-diff"
VERSION = 1
INIT_OP_KEY = "__saved_model_init_op"  # a SavedModel's init op, not a signature users call
_TF1_VARIABLE_OPS = frozenset({"VariableV2", "Variable", "VarHandleOp"})
_SITE_KEYS = ("id", "op", "op_type", "variable", "method", "option", "shape", "matrix", "k",
              "params_before", "params_after", "flops_before", "flops_after", "details")
_FACTOR_SUFFIX = "_matrix"


@dataclasses.dataclass(frozen=True)
class _Model:
    """What the diff needs of one model."""

    header: dict[str, Any]
    signatures: dict[str, dict[str, Any]]
    ops: dict[str, tuple[collections.Counter[str], int]]
    variables: list[dict[str, Any]]


def diff_models(in_dir: str, out_dir: str, tags: Sequence[str] = ("serve",)) -> dict[str, Any]:
    """Compares two SavedModels from their protobufs (see the module docstring for the layout).

    Args:
      in_dir: the model before (usually the original).
      out_dir: the model after (usually graphrewrite's output).
      tags: the tag set of the MetaGraph to compare in both.

    Returns:
      The JSON-ready comparison.

    Raises:
      InputModelError: a directory is not a readable SavedModel, lacks the tag set, or holds a
        damaged graphrewrite manifest.
    """
    before, after = _describe(in_dir, tags), _describe(out_dir, tags)
    data = manifest_lib.read_dir(out_dir)
    return {
        "format": FORMAT,
        "version": VERSION,
        "in": before.header,
        "out": after.header,
        "signatures": {key: _signature_diff(key, before, after)
                       for key in sorted(before.signatures.keys() | after.signatures.keys())},
        "variables": _variable_diff(before.variables, after.variables),
        "manifest": None if data is None else _manifest_part(data, after.variables),
    }


# ------------------------------------------------------------------------------------------------
# One model
# ------------------------------------------------------------------------------------------------


def _describe(path: str, tags: Sequence[str]) -> _Model:
    proto = read_saved_model_proto(path)
    meta = _meta_graph(proto, path, tags)
    object_based = len(meta.object_graph_def.nodes) > 0
    keys = sorted(k for k in meta.signature_def if k != INIT_OP_KEY)
    counter = _OpCounter(meta)
    header = {"path": os.path.abspath(path), "tags": sorted(meta.meta_info_def.tags),
              "kind": "tf2" if object_based else "tf1",
              "rewritten": os.path.isfile(os.path.join(path, "assets", MANIFEST_ASSET))}
    return _Model(
        header=header,
        signatures={k: _interface(meta.signature_def[k]) for k in keys},
        ops={k: counter.count(_output_tensors(meta.signature_def[k])) for k in keys},
        variables=_object_variables(meta) if object_based else _graph_variables(meta),
    )


def _meta_graph(proto: Any, path: str, tags: Sequence[str]) -> Any:
    wanted = set(tags)
    for meta in proto.meta_graphs:
        if set(meta.meta_info_def.tags) == wanted:
            return meta
    raise InputModelError(f"{path}: no MetaGraph with tag set {','.join(sorted(wanted))!r}")


def _interface(sig: Any) -> dict[str, Any]:
    return {"method": sig.method_name,
            "inputs": {name: _tensor(sig.inputs[name]) for name in sorted(sig.inputs)},
            "outputs": {name: _tensor(sig.outputs[name]) for name in sorted(sig.outputs)}}


def _tensor(info: Any) -> dict[str, Any]:
    return {"dtype": _dtype_name(info.dtype), "shape": _shape(info.tensor_shape)}


def _output_tensors(sig: Any) -> list[str]:
    return [name for key in sorted(sig.outputs) for name in _tensor_names(sig.outputs[key])]


def _tensor_names(info: Any) -> list[str]:
    """The graph tensors a TensorInfo names (one, three for a sparse tensor, or a composite's)."""
    encoding = info.WhichOneof("encoding")
    if encoding == "name":
        return [info.name]
    if encoding == "coo_sparse":
        sparse = info.coo_sparse
        return [sparse.values_tensor_name, sparse.indices_tensor_name, sparse.dense_shape_tensor_name]
    if encoding == "composite_tensor":
        return [n for part in info.composite_tensor.components for n in _tensor_names(part)]
    return []


def _dtype_name(enum: int) -> str:
    import tensorflow as tf

    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:  # DT_INVALID or a value no TensorFlow knows (the file is untrusted)
        return f"dtype_{enum}"


def _shape(proto: Any) -> list[int | None] | None:
    dims = shape_dims(proto)
    return None if dims is None else list(dims)


@final
class _OpCounter:
    """Counts the op types a set of output tensors executes in one MetaGraph."""

    def __init__(self, meta: Any) -> None:
        self.nodes = {n.name: n for n in meta.graph_def.node}
        self.library = {f.signature.name: f for f in meta.graph_def.library.function}
        self.saver_functions = saver_exempt(meta)[1]

    def count(self, tensors: Iterable[str]) -> tuple[collections.Counter[str], int]:
        """(op type counts, number of function bodies) of what computing ``tensors`` runs."""
        counts: collections.Counter[str] = collections.Counter()
        called: list[str] = []
        seen: set[str] = set()
        stack = [_node_name(t) for t in tensors]
        while stack:
            name = stack.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            node = self.nodes[name]
            counts[node.op] += 1
            stack.extend(_node_name(i) for i in node.input)
            called.extend(called_functions(node))
        return counts, self._count_functions(called, counts)

    def _count_functions(self, pending: list[str], counts: collections.Counter[str]) -> int:
        done: set[str] = set()
        while pending:
            fname = pending.pop()
            if fname in done or fname not in self.library or fname in self.saver_functions:
                continue
            done.add(fname)
            for node in self.library[fname].node_def:
                counts[node.op] += 1
                pending.extend(called_functions(node))
        return len(done)


def _node_name(tensor: str) -> str:
    return tensor.lstrip("^").split(":")[0]


def _variable(name: str, dtype: int, shape: Any, trainable: bool) -> dict[str, Any]:
    dims = _shape(shape)
    size = math.prod(d or 0 for d in dims) if dims is not None and None not in dims else None
    return {"name": name, "dtype": _dtype_name(dtype), "shape": dims, "trainable": bool(trainable),
            "size": size}


def _object_variables(meta: Any) -> list[dict[str, Any]]:
    """The SavedObjectGraph's variables, each weight once (see the module docstring)."""
    graph = meta.object_graph_def
    bound = {i for function in graph.concrete_functions.values() for i in function.bound_inputs}
    found = [(i, _variable(n.variable.name, n.variable.dtype, n.variable.shape, n.variable.trainable))
             for i, n in enumerate(graph.nodes) if n.WhichOneof("kind") == "variable"]
    read = {json.dumps(v, sort_keys=True) for i, v in found if i in bound}
    return [v for i, v in found if i in bound or json.dumps(v, sort_keys=True) not in read]


def _graph_variables(meta: Any) -> list[dict[str, Any]]:
    trainable = tf1_trainable_names(meta)
    return [_variable(n.name, n.attr["dtype"].type, n.attr["shape"].shape, n.name in trainable)
            for n in meta.graph_def.node if n.op in _TF1_VARIABLE_OPS]


# ------------------------------------------------------------------------------------------------
# Comparisons
# ------------------------------------------------------------------------------------------------


def _signature_diff(key: str, before: _Model, after: _Model) -> dict[str, Any]:
    old, new = before.signatures.get(key), after.signatures.get(key)
    empty: dict[str, Any] = {"method": None, "inputs": {}, "outputs": {}}
    inputs = _named_diff((old or empty)["inputs"], (new or empty)["inputs"])
    outputs = _named_diff((old or empty)["outputs"], (new or empty)["outputs"])
    if old is None or new is None:
        status = "added" if old is None else "removed"
    else:
        same = old["method"] == new["method"] and not any(inputs.values()) and not any(outputs.values())
        status = "unchanged" if same else "changed"
    ops_in, functions_in = before.ops.get(key, (collections.Counter(), None))
    ops_out, functions_out = after.ops.get(key, (collections.Counter(), None))
    return {
        "status": status,
        "in": old,
        "out": new,
        "inputs": inputs,
        "outputs": outputs,
        "ops": {"in": _sorted(ops_in), "out": _sorted(ops_out),
                "added": _sorted(ops_out - ops_in), "removed": _sorted(ops_in - ops_out)},
        "functions": {"in": functions_in, "out": functions_out},
    }


def _named_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    return {"added": sorted(new.keys() - old.keys()),
            "removed": sorted(old.keys() - new.keys()),
            "changed": {k: {"in": old[k], "out": new[k]} for k in sorted(old.keys() & new.keys())
                        if old[k] != new[k]}}


def _sorted(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: counts[k] for k in sorted(counts)}


def _variable_diff(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> dict[str, Any]:
    by_old, by_new = _by_name(old), _by_name(new)
    added: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []
    for name in sorted(by_old.keys() | by_new.keys()):
        olds, news = by_old.get(name, []), by_new.get(name, [])
        changed.extend({"name": name, "in": a, "out": b} for a, b in zip(olds, news) if a != b)
        removed.extend(olds[len(news):])
        added.extend(news[len(olds):])
    return {"in": old, "out": new, "added": added, "removed": removed, "changed": changed,
            "params_before": _params(old), "params_after": _params(new)}


def _by_name(variables: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for var in variables:
        out.setdefault(var["name"], []).append(var)
    return out


def _params(variables: list[dict[str, Any]]) -> int:
    return sum(v["size"] or 0 for v in variables)


def _manifest_part(data: dict[str, Any], variables: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "method": data.get("method"),
        "option": data["hparams"].get("compression_option"),
        "hparams": data["hparams"],
        "totals": data["totals"],
        "sites": [_site(site, variables) for site in data["sites"]],
        "skipped": [{key: str(skip.get(key, "")) for key in ("op", "op_type", "variable", "reason")}
                    for skip in data["skipped"] if isinstance(skip, dict)],
        "model_check": ((data.get("options") or {}).get("calibration") or {}).get("model_check"),
        "distill": ((data.get("options") or {}).get("calibration") or {}).get("distill"),
    }


def _site(site: dict[str, Any], variables: list[dict[str, Any]]) -> dict[str, Any]:
    prefix = site["variable"] + "/"
    factors = [{"role": v["name"][len(prefix):-len(_FACTOR_SUFFIX)], "name": v["name"], "dtype": v["dtype"],
                "shape": v["shape"]}
               for v in variables if v["name"].startswith(prefix) and v["name"].endswith(_FACTOR_SUFFIX)]
    alpha = prefix + "alpha"
    has_alpha = any(v["name"] == alpha for v in variables)
    method = BY_NAME.get(str(site.get("method")))
    out = {key: site[key] for key in _SITE_KEYS if key in site}
    out.update(blended=has_alpha and (method is None or method.blended),
               alpha_variable=alpha if has_alpha else None, factors=factors)
    return out


# ------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------


def diff_text(result: Mapping[str, Any]) -> str:
    """A terminal rendering of ``diff_models``'s result: signatures, op changes, variables, sites."""
    result = printable(result)
    lines = [f"diff {result['in']['path']} -> {result['out']['path']}"]
    lines += _signature_lines(result["signatures"])
    lines += _variable_lines(result["variables"])
    if result["manifest"] is not None:
        lines += _manifest_lines(result["manifest"])
    return "\n".join(lines)


def op_changes(ops: Mapping[str, Mapping[str, int]]) -> str:
    """``+6 StatelessIf  +15 MatMul  -1 Foo``: added then removed op types, largest first."""
    def ordered(counts: Mapping[str, int]) -> list[tuple[str, int]]:
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    parts = [f"+{n} {op}" for op, n in ordered(ops["added"])]
    parts += [f"-{n} {op}" for op, n in ordered(ops["removed"])]
    return "  ".join(parts) or "no change"


def dims_text(shape: Sequence[Any] | None) -> str:
    """``[?,64]``: ``?`` for an unknown dimension, ``[*]`` for an unknown rank."""
    return "[*]" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def tensor_text(spec: Mapping[str, Any]) -> str:
    """``float32[?,64]``."""
    return f"{spec['dtype']}{dims_text(spec['shape'])}"


def status_text(signatures: Mapping[str, Any]) -> str:
    """``2 unchanged, 1 added``: how many signatures have each interface status."""
    statuses = [s["status"] for s in signatures.values()]
    return ", ".join(f"{statuses.count(s)} {s}" for s in ("unchanged", "changed", "added", "removed")
                     if s in statuses) or "none"


def variables_text(variables: Mapping[str, Any]) -> str:
    """``6 -> 19 (13 added, 0 removed, 0 changed)``."""
    return (f"{len(variables['in'])} -> {len(variables['out'])} ({len(variables['added'])} added, "
            f"{len(variables['removed'])} removed, {len(variables['changed'])} changed)")


def params_text(before: int, after: int) -> str:
    """``50,826 -> 86,339 (1.699x)``."""
    return f"{before:,} -> {after:,}" + (f" ({after / before:.3f}x)" if before else "")


def _signature_lines(signatures: Mapping[str, Any]) -> list[str]:
    rows = []
    for key, sig in signatures.items():
        side = sig["out"] or sig["in"]
        rows.append([key, sig["status"],
                     ", ".join(f"{n}:{tensor_text(s)}" for n, s in side["inputs"].items()),
                     ", ".join(side["outputs"])])
    lines = ["", f"signatures: {status_text(signatures)}",
             table(rows, ["signature", "interface", "inputs", "outputs"])]
    for key, sig in signatures.items():
        lines += [f"  {key}: {change}" for change in _interface_changes(sig)]
    lines += ["", "op types executed per signature (out minus in):"]
    lines += [f"  {key}: {op_changes(sig['ops'])}" for key, sig in signatures.items()]
    return lines


def _interface_changes(sig: Mapping[str, Any]) -> list[str]:
    if sig["status"] != "changed":
        return []
    out = []
    for part in ("inputs", "outputs"):
        what = part[:-1]
        diff = sig[part]
        out += [f"{what} {n} added ({tensor_text(sig['out'][part][n])})" for n in diff["added"]]
        out += [f"{what} {n} removed ({tensor_text(sig['in'][part][n])})" for n in diff["removed"]]
        out += [f"{what} {n} changed: {tensor_text(c['in'])} -> {tensor_text(c['out'])}"
                for n, c in diff["changed"].items()]
    if sig["in"]["method"] != sig["out"]["method"]:
        out.append(f"method {sig['in']['method']!r} -> {sig['out']['method']!r}")
    return out


def variable_text(var: Mapping[str, Any]) -> str:
    """``name float32[64,32] trainable``."""
    state = "trainable" if var["trainable"] else "non-trainable"
    return f"{var['name']} {tensor_text(var)} {state}"


def _variable_lines(variables: Mapping[str, Any]) -> list[str]:
    lines = ["", f"variables: {variables_text(variables)}"]
    count_in = collections.Counter(v["name"] for v in variables["in"])
    count_out = collections.Counter(v["name"] for v in variables["out"])

    def note(name: str) -> str:
        n_in, n_out = count_in[name], count_out[name]
        return f" (name held by {n_in} -> {n_out} variables)" if n_in > 1 or n_out > 1 else ""

    lines += [f"  + {variable_text(v)}{note(v['name'])}" for v in variables["added"]]
    lines += [f"  - {variable_text(v)}{note(v['name'])}" for v in variables["removed"]]
    lines += [f"  ~ {c['name']}: {tensor_text(c['in'])} -> {tensor_text(c['out'])}" for c in variables["changed"]]
    lines.append(f"parameters: {params_text(variables['params_before'], variables['params_after'])}")
    return lines


def site_params(sites: Sequence[Mapping[str, Any]]) -> tuple[int, int]:
    """Parameters of the rewritten weights before and after, summed over the sites."""
    return sum(s["params_before"] for s in sites), sum(s["params_after"] for s in sites)


def _manifest_lines(manifest: Mapping[str, Any]) -> list[str]:
    lines = ["", f"rewritten sites (manifest): method {manifest['method']} "
             f"(compression_option={manifest['option']})"]
    rows = [[s["variable"], s.get("op_type", ""), "x".join(map(str, s["shape"])),
             "-" if s.get("k") is None else str(s["k"]), f"{s['params_before']:,} -> {s['params_after']:,}",
             ", ".join(f["role"] for f in s["factors"]), "yes" if s["blended"] else "no"]
            for s in manifest["sites"]]
    header = ["variable", "op", "shape", "k", "params", "factors", "alpha"]
    lines.append(table(rows, header) if rows else "no sites")
    lines += [f"skipped {s['op']} ({s['variable']}): {s['reason']}" for s in manifest["skipped"]]
    lines.append(f"total: {len(manifest['sites'])} sites, {len(manifest['skipped'])} skipped, parameters of "
                 f"the rewritten weights {params_text(*site_params(manifest['sites']))}")
    if manifest.get("model_check"):
        lines.append(model_check_text(manifest["model_check"]))
    if "run" in (manifest.get("distill") or {}):
        lines.append(distill_text(manifest["distill"]))
    return lines
