"""Which weights' outputs the model reads only up to a shift of each row.

A softmax, a log-softmax and an argmax over the last axis do not change when the same number is
added to every entry of a row. A weight whose op's outputs reach only such ops, through bias
additions and identities (the classifier head of most models: ``MatMul -> BiasAdd -> Softmax``),
can be fitted to its outputs with each row's mean removed (whiten.ShiftFree): its factors then
spend no rank on what a row's outputs share, which nothing after them reads. The same holds for a
signature output the user declares logits (``--logits``: read through a softmax or argmax outside
the model). At a hard budget this matters: the digits CNN's 10-class head at rank 3 gave 52%
test accuracy fitted to its plain outputs and 61% fitted modulo the shift (README: Data-aware
compression).

What counts, per reader of the weight (every reader must qualify):

- the op gives ``rows x n`` with the weight's n >= 2 outputs on the last axis: MatMul and
  BatchMatMul with the weight second, Conv2D in NHWC (one output, a sigmoid's logit, never: its
  shift is all there is);
- from its output, every path goes through Identity, StopGradient, Snapshot, Squeeze (it drops
  axes of size 1, never the last, of n >= 2: a Conv1D is ExpandDims, Conv2D, Squeeze), BiasAdd (NHWC),
  an Add/AddV2 of a length-n vector the inputs do not change (a variable or constant of shape
  ``(n,)``) or a Reshape to a constant last dimension n (Keras' Flatten of a 1 x 1 x n map;
  Shape, Size and Rank read nothing else), and ends at a Softmax, LogSoftmax, or an ArgMax/ArgMin over the last axis, or at one of the
  function's outputs declared ``logits``. Anything else on a path (an activation, a
  pooling, a second reader) and the weight is fitted as before.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np

from graphrewrite.rewriting.graph import Edge
from graphrewrite.rewriting.match import Use
from graphrewrite.rewriting.model import FunctionIR
from graphrewrite.rewriting.ops import BatchMatMul, MatMul

PASS_OPS = ("Identity", "StopGradient", "Snapshot")
SHAPE_OPS = ("Shape", "ShapeN", "Size", "Rank")  # they read the shape, never the values
ADD_OPS = ("Add", "AddV2", "BiasAdd", "BiasAddV1")
INVARIANT_OPS = {"Softmax": "a Softmax", "LogSoftmax": "a LogSoftmax", "ArgMax": "an argmax", "ArgMin": "an argmin"}


def shift_free(fir: FunctionIR, uses: Sequence[Use], shapes: Mapping[str, tuple[int, ...]],
               logits: Collection[str] = ()) -> dict[str, str]:
    """Variable key -> why (``"its outputs feed a Softmax"``) for each weight of ``uses`` whose
    every reader's outputs matter only up to a shift of each row (see the module doc).
    ``shapes``: variable key -> shape (a bias read as a variable must be a vector of n);
    ``logits``: the function's outputs (of ``fir.outputs``) that count as read through a softmax."""
    declared = {Edge.parse(name).tensor for name in logits}
    by_key: dict[str, list[Use]] = {}
    for use in uses:
        by_key.setdefault(use.variable, []).append(use)
    out = {}
    for key, group in by_key.items():
        ends = [_ends(fir, use, shapes, declared) for use in group]
        if all(ends):
            out[key] = "its outputs feed " + " and ".join(sorted(set().union(*ends)))
    return out


def _ends(fir: FunctionIR, use: Use, shapes: Mapping[str, tuple[int, ...]], declared: Collection[str]) -> set[str]:
    """What the outputs of ``use``'s op end in (empty where a path does not qualify)."""
    graph = fir.graph
    node = graph[use.op]
    if use.n < 2:  # one output (a sigmoid's logit): the shift is all there is
        return set()
    if not ((node.op in MatMul.op_types + BatchMatMul.op_types and use.operand == 1)
            or (node.op == "Conv2D" and node.attr("data_format", "NHWC") in ("NHWC", b"NHWC"))):
        return set()
    outputs = {Edge.parse(name).tensor for name in fir.outputs}
    ends: set[str] = set()
    stack, seen = [node.name], {node.name}
    while stack:
        name = stack.pop()
        if f"{name}:0" in outputs:
            if f"{name}:0" not in declared:
                return set()
            ends.add("an output declared logits")
        for consumer, position in graph.consumers(name, 0):
            op = consumer.op
            if op in INVARIANT_OPS and position == 0 and (op not in ("ArgMax", "ArgMin") or _last_axis(fir, consumer)):
                ends.add(INVARIANT_OPS[op])
                continue
            if op in SHAPE_OPS:
                continue
            if (op in PASS_OPS or op == "Squeeze"
                    or (op in ADD_OPS and _adds_vector(fir, consumer, position, use.n, shapes))
                    or (op == "Reshape" and position == 0 and _last_dim(fir, consumer) == use.n)):
                if consumer.name not in seen:
                    seen.add(consumer.name)
                    stack.append(consumer.name)
                continue
            return set()
    return ends


def _last_dim(fir: FunctionIR, node) -> int | None:
    """The last entry of a Reshape's target shape where it is a constant (the shape a Const, or a
    Pack whose last element is one: Keras' Flatten): a reshape that keeps n on the last axis keeps
    every row's n values together (row-major order), whatever it does to the other axes."""
    shape = fir.graph[node.data_inputs[1].node]
    value = fir.graph.constant(shape.name)
    if value is None and shape.op == "Pack" and shape.data_inputs:
        value = fir.graph.constant(shape.data_inputs[-1].node)
    value = np.ravel(value) if value is not None else ()
    return int(value[-1]) if len(value) else None


def _last_axis(fir: FunctionIR, node) -> bool:
    """Whether an ArgMax/ArgMin reduces the last axis (its dimension the constant -1)."""
    axis = fir.graph.constant(node.data_inputs[1].node) if len(node.data_inputs) > 1 else None
    return axis is not None and np.ndim(axis) == 0 and int(axis) == -1


def _adds_vector(fir: FunctionIR, node, position: int, n: int, shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Whether ``node`` adds to its input ``position`` a vector of n that the inputs do not change:
    BiasAdd (NHWC) of anything, Add/AddV2 of a variable or constant of shape ``(n,)`` (through
    Identity or Cast)."""
    if node.op.startswith("BiasAdd"):
        return position == 0 and node.attr("data_format", "NHWC") in ("NHWC", b"NHWC")
    if len(node.data_inputs) != 2:
        return False
    other = fir.graph[node.data_inputs[1 - position].node]
    while other.op in PASS_OPS + ("Cast",) and other.data_inputs:
        other = fir.graph[other.data_inputs[0].node]
    if other.name in fir.reads:
        return tuple(shapes.get(fir.reads[other.name], ())) == (n,)
    value = fir.graph.constant(other.name)
    return value is not None and np.shape(value) == (n,)


__all__ = ["shift_free"]
