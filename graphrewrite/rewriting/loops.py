"""Weights read inside While bodies (recurrent kernels): what the body does with them, and the
rewritten body and cond FunctionDefs that take a float tensor (or factors) in the weight's place.

A Keras LSTM/GRU/SimpleRNN kernel enters its ``While`` as a loop input: in Keras 3 the variable's
resource handle, which the body reads (``ReadVariableOp`` of the body argument) and multiplies
with ``MatMul``; in tf.keras its value, read before the loop. Two rewrites of such a loop input are
made here, as protobuf edits of the FunctionDefs (this module and graphrewrite.rewriting.loader are the graph
layer; graphrewrite.rewriting.recurrent builds the tensors):

* ``dense``: the argument becomes a float tensor ``W`` computed outside the loop (the alpha-blended
  weight); a read of the handle becomes an ``Identity`` of it, so every reader inside sees ``W``.
* ``factored`` (export): the argument becomes ``B`` and ``C`` is appended as a new loop invariant at
  the end (no existing output index moves); each ``MatMul(x, W)`` becomes ``MatMul(MatMul(x, B), C)``
  (transposes honoured), so ``B @ C`` is never formed.

Every reader of the weight's value in the body (of the handle's ``ReadVariableOp``s, or of the
argument itself) must be a ``MatMul`` weight operand, and the body must return the weight
unchanged; the loop's condition must not read it, the loop's own output of it must be unused, and
the loop must have no control inputs. Anything else (an If or a call inside the body, another
reader) leaves the weight dense, with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from graphrewrite.rewriting.graph import Graph, Node

LOOP_OPS = frozenset({"While", "StatelessWhile"})


@dataclasses.dataclass(frozen=True)
class LoopWeight:
    """How a While body uses the weight at one loop input.

    Attributes:
      reads: the body's ReadVariableOp nodes of it (none where the loop takes its value).
      matmuls: (MatMul node, operand position of the weight) of every reader of its value.
      dtype: the weight's DataType enum.
    """

    reads: tuple[str, ...]
    matmuls: tuple[tuple[str, int], ...]
    dtype: int


@dataclasses.dataclass(frozen=True)
class LoopInput:
    """What one rewritten loop input receives: the float ``W`` (dense) or ``B`` and ``C`` (factored).

    Attributes:
      pos: input position of the While.
      dtype: the weight's dtype name ("float32").
      shapes: one shape (dense) or the shapes of B and C (factored).
    """

    pos: int
    dtype: str
    shapes: tuple[tuple[int, ...], ...]

    @property
    def factored(self) -> bool:
        return len(self.shapes) == 2


def _library(graph: Graph) -> dict[str, Any]:
    return {f.signature.name: f for f in graph.graph_def.library.function}


def _aliases(body: Any, arg: str) -> set[str]:
    """References to the argument ``arg`` in the body, through Identity chains."""
    names = {arg}
    changed = True
    while changed:
        changed = False
        for nd in body.node_def:
            ref = f"{nd.name}:output:0"
            if nd.op == "Identity" and nd.input and nd.input[0] in names and ref not in names:
                names.add(ref)
                changed = True
    return names


def loop_weight(graph: Graph, node: Node, pos: int, dtype: str) -> LoopWeight | str:
    """What the body of While ``node`` does with loop input ``pos`` (the handle of a weight of
    ``dtype``, e.g. "float32", or its value: tf.keras reads its kernels before the loop), or why it
    cannot be rewritten."""
    from tensorflow.python.framework import dtypes
    where = f"{node.op} '{node.name}'"
    library = _library(graph)
    body, cond = library.get(node.attr("body")), library.get(node.attr("cond"))
    if body is None or cond is None:
        return f"read inside the body of {where}, which is not in the graph's library"
    arity = (len(node.data_inputs), len(body.signature.input_arg), len(body.signature.output_arg),
             len(cond.signature.input_arg), len(node.attr("T", [])))
    if len(set(arity)) != 1:
        return f"read inside {where}, whose body and condition do not match its inputs"
    if any(e.control for e in node.inputs):  # rebuilt loops take data inputs only
        return f"read inside {where}, which has control inputs"
    if graph.consumers(node.name, pos):
        return f"read inside {where}, whose output {pos} (the handle) is used after the loop"
    if any(cond.signature.input_arg[pos].name in nd.input for nd in cond.node_def):
        return f"read inside {where}, whose loop condition reads it"
    arg = body.signature.input_arg[pos]
    aliases = _aliases(body, arg.name)
    if body.ret.get(body.signature.output_arg[pos].name) not in aliases:
        return f"read inside {where}, whose body does not hand the weight on unchanged"
    handle = arg.type == dtypes.resource.as_datatype_enum
    if not handle and dtypes.as_dtype(arg.type).name != dtype:
        return f"read inside {where}, which takes it as {dtypes.as_dtype(arg.type).name}, not as {dtype}"
    reads = []
    for nd in body.node_def if handle else ():
        if nd.op == "Identity" or not any(ref in aliases for ref in nd.input):
            continue
        if nd.op != "ReadVariableOp":
            return f"read inside {where}, whose body passes the handle to {nd.op} '{nd.name}'"
        reads.append(nd.name)
    values = {f"{read}:value:0" for read in reads} if handle else aliases
    matmuls = []
    for nd in body.node_def:
        hits = [i for i, ref in enumerate(nd.input) if ref in values]
        if not hits or (nd.op == "Identity" and f"{nd.name}:output:0" in aliases):
            continue
        if nd.op != "MatMul" or len(hits) != 1:
            return (f"read inside {where}, whose body reads it with {nd.op} '{nd.name}' (only MatMul "
                    "weights are rewritten inside a loop)")
        matmuls.append((nd.name, hits[0]))
    if not matmuls:
        return f"read inside {where}, whose body multiplies nothing by it"
    return LoopWeight(tuple(reads), tuple(matmuls), dtypes.as_dtype(dtype).as_datatype_enum)


def rewrite_loop(graph: Graph, node: Node, inputs: Mapping[int, LoopInput]) -> tuple[Any, list[str]]:
    """A GraphDef holding the While ``node`` with the loop inputs ``inputs`` rewritten, and the
    input names to feed it, in order (``graphrewrite_input_<pos>`` / ``graphrewrite_c_<pos>``
    for the new tensors; the original names for the rest)."""
    from tensorflow.core.framework import graph_pb2

    library = _library(graph)
    body, cond = library[node.attr("body")], library[node.attr("cond")]
    new_body, new_cond = type(body)(), type(cond)()
    new_body.CopyFrom(body)
    new_cond.CopyFrom(cond)
    proto = graph_pb2.GraphDef()
    proto.versions.CopyFrom(graph.graph_def.versions)
    loop = proto.node.add()
    loop.CopyFrom(node.proto)
    loop.device = ""
    feeds = [e.tensor for e in node.data_inputs]
    del loop.input[:]
    if "_read_only_resource_inputs" in loop.attr:  # the rewritten inputs are no resources any more
        listed = loop.attr["_read_only_resource_inputs"].list.i
        kept = [i for i in listed if i not in inputs]
        del listed[:]
        listed.extend(kept)
    for pos, spec in sorted(inputs.items()):
        found = loop_weight(graph, node, pos, spec.dtype)
        assert isinstance(found, LoopWeight), found
        dtype = found.dtype
        feeds[pos] = f"graphrewrite_input_{pos}:0"
        loop.attr["T"].list.type[pos] = dtype
        shapes = loop.attr["output_shapes"].list.shape  # optional: empty, or one per loop input
        if shapes:
            _set_shape(shapes[pos], spec.shapes[0])
        _as_float_arg(new_body, pos, dtype, found)
        _as_float_arg(new_cond, pos, dtype, None)
        if spec.factored:
            feeds.append(f"graphrewrite_c_{pos}:0")
            loop.attr["T"].list.type.append(dtype)
            if shapes:
                _set_shape(shapes.add(), spec.shapes[1])
            _factor(new_body, new_cond, pos, dtype, found)
    loop.input.extend(feeds)
    _attach(loop, new_body, new_cond, "graphrewrite")
    proto.library.function.extend([new_body, new_cond])
    return proto, feeds


def _attach(loop: Any, body: Any, cond: Any, tag: str) -> None:
    """Names the rewritten ``body`` and ``cond`` after the originals, ``tag`` and a hash of their
    content (two rewrites of one loop never share a name), and points the While ``loop`` at them."""
    if "_num_original_outputs" in loop.attr:
        loop.attr["_num_original_outputs"].i = len(loop.attr["T"].list.type)
    suffix = hashlib.sha256(body.SerializeToString(deterministic=True)
                            + cond.SerializeToString(deterministic=True)).hexdigest()[:12]
    body.signature.name = f"{body.signature.name}_{tag}_{suffix}"
    cond.signature.name = f"{cond.signature.name}_{tag}_{suffix}"
    loop.attr["body"].func.name = body.signature.name
    loop.attr["cond"].func.name = cond.signature.name


def gram_blocker(graph: Graph, node: Node, found: LoopWeight) -> str | None:
    """Why ``gram_loop`` cannot sum the rows that multiply the weight ``found`` in While ``node``'s
    body (None where it can): every MatMul must take it as its second operand, untransposed, in
    float32 (the rows are then its first operand, ``x`` or, with transpose_a, ``x^T``)."""
    from tensorflow.python.framework import dtypes

    by_name = {nd.name: nd for nd in _library(graph)[node.attr("body")].node_def}
    for name, operand in found.matmuls:
        matmul = by_name[name]
        if operand != 1 or matmul.attr["transpose_b"].b:
            return f"no calibration statistics inside {node.op} '{node.name}': MatMul '{name}' takes it transposed"
        if matmul.attr["T"].type != dtypes.float32.as_datatype_enum:
            return (f"no calibration statistics inside {node.op} '{node.name}': MatMul '{name}' is "
                    f"{dtypes.as_dtype(matmul.attr['T'].type).name}")
    return None


def gram_loop(graph: Graph, node: Node, weights: Mapping[int, tuple[LoopWeight, int]]
              ) -> tuple[list[Any], list[Any], dict[int, tuple[int, int]]]:
    """The While ``node`` rewritten to sum, for each loop input ``pos`` of ``weights`` (its
    LoopWeight and the weight's m), the Gram ``X^T X`` of the rows X that multiply it over all
    iterations (float32, m x m) and their number (float32), as two more loop variables each,
    started at zero and appended after the others (no existing output index moves). Each reader
    must pass ``gram_blocker``. Returns (the new NodeDefs: the loop and the zeros it starts from,
    the new body and cond FunctionDefs, pos -> (output index of the Gram, of the row count))."""
    from tensorflow.core.framework import node_def_pb2
    from tensorflow.python.framework import dtypes, tensor_util

    float32 = dtypes.float32.as_datatype_enum
    library = _library(graph)
    body, cond = type(library[node.attr("body")])(), type(library[node.attr("cond")])()
    body.CopyFrom(library[node.attr("body")])
    cond.CopyFrom(library[node.attr("cond")])
    loop = node_def_pb2.NodeDef()
    loop.CopyFrom(node.proto)
    loop.device = ""
    del loop.input[:]
    loop.input.extend(e.tensor for e in node.data_inputs)
    nodes: list[Any] = [loop]
    by_name = {nd.name: nd for nd in body.node_def}
    shapes = loop.attr["output_shapes"].list.shape
    outputs: dict[int, tuple[int, int]] = {}

    def add(op: str, name: str, inputs: list[str], **attrs: Any) -> Any:
        nd = body.node_def.add()
        nd.name, nd.op = name, op
        nd.input.extend(inputs)
        for key, value in attrs.items():
            if isinstance(value, bool):
                nd.attr[key].b = value
            elif key == "value":
                nd.attr[key].tensor.CopyFrom(value)
            else:
                nd.attr[key].type = value
        return nd

    for pos, (found, m) in sorted(weights.items()):
        refs = {}
        for kind, shape in (("gram", (m, m)), ("rows", ())):
            arg = f"graphrewrite_{kind}_{pos}"
            for function in (body, cond):
                added = function.signature.input_arg.add()
                added.name, added.type = arg, float32
            start = node_def_pb2.NodeDef(name=f"{node.name}/graphrewrite_{kind}_{pos}_start", op="Const")
            start.attr["dtype"].type = float32
            start.attr["value"].tensor.CopyFrom(tensor_util.make_tensor_proto(np.zeros(shape, np.float32)))
            nodes.append(start)
            loop.input.append(f"{start.name}:0")
            loop.attr["T"].list.type.append(float32)
            if shapes:
                _set_shape(shapes.add(), shape)
            refs[kind] = arg
        outputs[pos] = (len(loop.attr["T"].list.type) - 2, len(loop.attr["T"].list.type) - 1)
        scale = add("Const", f"graphrewrite_rows_{pos}/per_row", [], dtype=float32,
                    value=tensor_util.make_tensor_proto(np.float32(1.0 / m)))
        for name, _ in found.matmuls:
            x, flipped = by_name[name].input[0], by_name[name].attr["transpose_a"].b
            gram = add("MatMul", f"{name}/graphrewrite_gram", [x, x], T=float32, transpose_a=not flipped,
                       transpose_b=flipped)
            total = add("AddV2", f"{name}/graphrewrite_gram_sum", [refs["gram"], f"{gram.name}:product:0"], T=float32)
            size = add("Size", f"{name}/graphrewrite_size", [x], T=float32, out_type=dtypes.int32.as_datatype_enum)
            cast = add("Cast", f"{name}/graphrewrite_size_float", [f"{size.name}:output:0"],
                       SrcT=dtypes.int32.as_datatype_enum, DstT=float32, Truncate=False)
            rows = add("Mul", f"{name}/graphrewrite_rows", [f"{cast.name}:y:0", f"{scale.name}:output:0"], T=float32)
            count = add("AddV2", f"{name}/graphrewrite_rows_sum", [refs["rows"], f"{rows.name}:z:0"], T=float32)
            refs = {"gram": f"{total.name}:z:0", "rows": f"{count.name}:z:0"}
        for kind in ("gram", "rows"):
            out = body.signature.output_arg.add()
            out.name, out.type = f"graphrewrite_{kind}_{pos}_out", float32
            body.ret[out.name] = refs[kind]
    if "_output_shapes" in loop.attr:
        del loop.attr["_output_shapes"]
    _attach(loop, body, cond, "graphrewrite_gram")
    return nodes, [body, cond], outputs


def _set_shape(proto: Any, shape: tuple[int, ...]) -> None:
    proto.Clear()
    for d in shape:
        proto.dim.add().size = d


def _as_float_arg(function: Any, pos: int, dtype: int, found: LoopWeight | None) -> None:
    """Argument ``pos`` (and, in a body, its output and reads) as a float tensor of ``dtype``."""
    arg = function.signature.input_arg[pos]
    arg.type = dtype
    if pos in function.arg_attr:
        attrs = function.arg_attr[pos].attr
        for key in [k for k in attrs if k.startswith("_handle") or k == "_output_shapes"]:
            del attrs[key]
    if found is None:
        return
    function.signature.output_arg[pos].type = dtype
    aliases = _aliases(function, arg.name)
    for nd in function.node_def:
        if nd.op == "Identity" and nd.input and nd.input[0] in aliases:
            nd.attr["T"].type = dtype
        elif nd.name in found.reads:  # the read becomes the value itself
            nd.op = "Identity"
            del nd.attr["dtype"]
            nd.attr["T"].type = dtype
    renamed = {f"{read}:value:0": f"{read}:output:0" for read in found.reads}
    for nd in function.node_def:
        for i, ref in enumerate(nd.input):
            if ref in renamed:
                nd.input[i] = renamed[ref]


def _factor(body: Any, cond: Any, pos: int, dtype: int, found: LoopWeight) -> None:
    """Appends ``C`` as the last argument (and body output); each MatMul by the weight (now B) becomes
    two: ``x @ W = (x @ B) @ C``, ``x @ W^T = (x @ C^T) @ B^T``, ``W @ x = B @ (C @ x)`` and
    ``W^T @ x = C^T @ (B^T @ x)``."""
    c_arg = f"graphrewrite_c_{pos}"
    for function in (body, cond):
        added = function.signature.input_arg.add()
        added.name, added.type = c_arg, dtype
    out = body.signature.output_arg.add()
    out.name, out.type = f"{c_arg}_out", dtype
    body.ret[out.name] = c_arg
    by_name = {nd.name: nd for nd in body.node_def}
    for name, operand in found.matmuls:
        outer = by_name[name]
        b_ref, x_ref = outer.input[operand], outer.input[1 - operand]
        flag = "transpose_b" if operand == 1 else "transpose_a"
        transposed = outer.attr[flag].b
        first = body.node_def.add()
        first.CopyFrom(outer)
        first.name = f"{name}/graphrewrite_first"
        # The factor next to x is B (W = B @ C), unless W is transposed on the x side of the product.
        near, far = (c_arg, b_ref) if transposed == (operand == 1) else (b_ref, c_arg)
        del first.input[:]
        first.input.extend([x_ref, near] if operand == 1 else [near, x_ref])
        del outer.input[:]
        product = f"{first.name}:product:0"
        outer.input.extend([product, far] if operand == 1 else [far, product])
        other = "transpose_a" if operand == 1 else "transpose_b"
        outer.attr[other].b = False  # x's own transpose was applied by the first product
