"""Keeps the flat source functions inside the rewritten model, so ``export`` can rebuild them.

A rewritten model's own functions hold the alpha-gated replacement ops; the export needs the
original flat graphs to put the compressed-only form in their place. They are written as one asset
(``graphrewrite_ir.json``): each function's inlined GraphDef (no weights: those stay variables),
its input/output tensor names, which nodes are variable handles, reads and captured constants, and
each exported callable's Python-level structure. Variables are referred to by their position in the
rewritten model's ``graphrewrite_source_variables`` list, which survives a re-save.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from graphrewrite.errors import InputModelError
from graphrewrite.rewriting.graph import Graph
from graphrewrite.rewriting.model import NO_DEFAULT, Entry, FunctionIR, Variant
from graphrewrite.rewriting.scan import IR_ASSET

ASSET = IR_ASSET

FORMAT = "graphrewrite-ir"
VERSION = 1
_NO_DEFAULT_TAG = "__graphrewrite_no_default__"


def _encode_structure(value: Any) -> str:
    from tensorflow.python.saved_model import nested_structure_coder

    proto = nested_structure_coder.encode_structure(value)
    return base64.b64encode(proto.SerializeToString()).decode("ascii")


def _decode_structure(text: str) -> Any:
    from tensorflow.core.protobuf import struct_pb2
    from tensorflow.python.saved_model import nested_structure_coder

    proto = struct_pb2.StructuredValue()
    proto.ParseFromString(base64.b64decode(text))
    return nested_structure_coder.decode_proto(proto)


def dump(model: Any) -> dict[str, Any]:
    """The JSON form of a LoadedModel's functions and entries (variables by key order)."""
    import tensorflow as tf

    keys = list(model.variables)
    functions = {}
    for key, fir in model.functions.items():
        functions[key] = {
            "graph_def": base64.b64encode(fir.graph.graph_def.SerializeToString()).decode("ascii"),
            "inputs": fir.inputs, "outputs": fir.outputs,
            "handles": {n: keys.index(k) for n, k in fir.handles.items()},
            "reads": {n: keys.index(k) for n, k in fir.reads.items()},
            "captures": fir.captures,
        }
    owner_index = {id(getattr(o, "_resource_handle", None)): i for i, o in enumerate(model.resources)}
    captured = []
    for tensor in model.captured:
        if tensor.dtype == tf.resource:
            if id(tensor) not in owner_index:
                raise InputModelError("the model captures a resource that no tracked object owns")
            captured.append({"resource": owner_index[id(tensor)]})
        else:
            proto = tf.make_tensor_proto(tensor.numpy())
            captured.append({"constant": base64.b64encode(proto.SerializeToString()).decode("ascii")})
    entries = []
    for entry in model.entries:
        params = None
        if entry.parameters is not None:
            params = [[name, _NO_DEFAULT_TAG if default is NO_DEFAULT else default]
                      for name, default in entry.parameters]
        entries.append({
            "kind": entry.kind, "name": entry.name,
            "parameters": _encode_structure(params),
            "variants": [{"function": v.function, "input_signature": _encode_structure(v.input_signature),
                          "output_structure": _encode_structure(v.output_structure)} for v in entry.variants],
        })
    return {"format": FORMAT, "version": VERSION, "variables": len(keys), "functions": functions,
            "captured": captured, "entries": entries}


def write(model: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dump(model), f)


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputModelError(f"{path}: unreadable graphrewrite source functions ({exc})") from None
    return parse(text, path)


def parse(text: str, where: str) -> dict[str, Any]:
    """The source-function asset's data from its text (as the scan read it)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputModelError(f"{where}: unreadable graphrewrite source functions ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise InputModelError(f"{where}: not a graphrewrite source-function asset of version {VERSION}")
    return data


def load(data: dict[str, Any], variables: list[Any], resources: list[Any]) -> tuple[
        dict[str, FunctionIR], list[Entry], list[Any], dict[str, Any]]:
    """(functions, entries, captured tensors, variables by key) rebuilt from ``dump`` output."""
    import tensorflow as tf
    from tensorflow.core.framework import graph_pb2, tensor_pb2

    if data["variables"] != len(variables):
        raise InputModelError("the rewritten model's source variables do not match its source functions")
    by_key = {f"v{i}": v for i, v in enumerate(variables)}
    functions = {}
    try:
        for key, f in data["functions"].items():
            graph_def = graph_pb2.GraphDef()
            graph_def.ParseFromString(base64.b64decode(f["graph_def"]))
            functions[key] = FunctionIR(
                key=key, graph=Graph(graph_def), inputs=list(f["inputs"]), outputs=list(f["outputs"]),
                handles={n: f"v{i}" for n, i in f["handles"].items()},
                reads={n: f"v{i}" for n, i in f["reads"].items()},
                captures={n: int(i) for n, i in f["captures"].items()})
        captured = []
        for item in data["captured"]:
            if "constant" in item:
                proto = tensor_pb2.TensorProto()
                proto.ParseFromString(base64.b64decode(item["constant"]))
                captured.append(tf.constant(tf.make_ndarray(proto)))
            else:
                captured.append(resources[item["resource"]]._resource_handle)  # noqa: SLF001
        entries = []
        for e in data["entries"]:
            params = _decode_structure(e["parameters"])
            if params is not None:
                params = [(name, NO_DEFAULT if default == _NO_DEFAULT_TAG else default) for name, default in params]
            variants = [Variant(v["function"], _decode_structure(v["input_signature"]),
                                _decode_structure(v["output_structure"])) for v in e["variants"]]
            entries.append(Entry(e["kind"], e["name"], variants, params))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InputModelError(f"damaged graphrewrite source-function asset ({type(exc).__name__}: {exc})") from None
    return functions, entries, captured, by_key
