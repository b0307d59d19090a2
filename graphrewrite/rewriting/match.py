"""Finds where weights enter weight-bearing ops, through the wrappers TensorFlow puts around them.

From every read of a variable the matcher walks forward through ``Identity``, ``Cast`` (mixed
precision), ``Reshape`` and ``Transpose`` with constant arguments (Keras 3 attention projections
reshape their kernel before a ``BatchMatMulV2``). A walk that ends in the weight operand of a
MatMul, BatchMatMul, Conv2D/3D, Conv2DBackpropInput, Einsum or lookup (GatherV2; ResourceGather
reads the handle itself) is a *use*; ``ExpandDims`` (Conv1D's kernel) is a wrapper too. Any other
consumer blocks the variable, because rewriting only some of its readers would change what the
others see. A variable whose handle (or value) is a While loop input is a use when the body only
multiplies by it (a recurrent kernel, graphrewrite.rewriting.loops); passed to an If, a call or any other
body, it is blocked too: weights inside control flow are reported, never silently lost.
"""

from __future__ import annotations

import dataclasses

from graphrewrite.rewriting import loops
from graphrewrite.rewriting.graph import Graph
from graphrewrite.rewriting.model import FunctionIR, VariableInfo
from graphrewrite.rewriting.ops import ADAPTERS
from graphrewrite.views import View, resolve_reshape, shape_after, simplify

_PASS_THROUGH = frozenset({"Identity", "Cast"})
_CONTROL_FLOW = frozenset({"While", "StatelessWhile", "If", "StatelessIf", "Case", "StatelessCase",
                           "PartitionedCall", "StatefulPartitionedCall"})
_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


@dataclasses.dataclass(frozen=True)
class Use:
    """One weight-bearing op reading a variable as its weight.

    Attributes:
      function: key of the FunctionIR.
      op: node name of the op in that function's flat graph.
      op_type: MatMul, BatchMatMulV2, Conv2D, Einsum, ...
      operand: input position of the weight.
      variable: variable key.
      chain: view steps from the variable to the op's weight operand (Reshape/Transpose wrappers).
      op_steps: view steps from the weight operand to the matrix W (the op's own).
      view: view steps from the variable to the matrix W (chain + op_steps, simplified).
      m, n: shape of W.
    """

    function: str
    op: str
    op_type: str
    operand: int
    variable: str
    chain: View
    op_steps: View
    view: View
    m: int
    n: int


@dataclasses.dataclass(frozen=True)
class Blocker:
    """Why a variable cannot be rewritten in one function."""

    function: str
    op: str
    op_type: str
    variable: str
    reason: str
    at_weight_op: bool  # the blocked reader is a weight-bearing op (so the variable is a candidate)


def match_function(fir: FunctionIR, infos: dict[str, VariableInfo]) -> tuple[list[Use], list[Blocker]]:
    """All uses and blockers of the variables read in one flat function."""
    graph = fir.graph
    uses: list[Use] = []
    blockers: list[Blocker] = []
    for read, key in fir.reads.items():
        info = infos[key]
        stack: list[tuple[str, View]] = [(read, ())]
        while stack:
            name, chain = stack.pop()
            shape = shape_after(info.shape, chain)
            for consumer, pos in graph.data_consumers(name):
                step = _wrapper_step(graph, consumer, pos, shape)
                if step is not None:
                    if isinstance(step, str):
                        blockers.append(Blocker(fir.key, consumer.name, consumer.op, key, step, False))
                    else:
                        stack.append((consumer.name, chain + step))
                    continue
                if consumer.op in loops.LOOP_OPS and info.dtype in _FLOAT_DTYPES:  # tf.keras RNNs
                    found = _loop_use(fir, consumer, pos, info, chain)
                    (blockers if isinstance(found, Blocker) else uses).append(found)
                    continue
                adapter = ADAPTERS.get(consumer.op)
                if adapter is None or pos not in adapter.weight_positions(consumer):
                    reason = f"'{info.name}' is also read by {consumer.op} '{consumer.name}'"
                    blockers.append(Blocker(fir.key, consumer.name, consumer.op, key, reason, False))
                    continue
                if info.dtype not in _FLOAT_DTYPES:
                    reason = f"'{info.name}' has dtype {info.dtype}, not a floating-point weight"
                    blockers.append(Blocker(fir.key, consumer.name, consumer.op, key, reason, True))
                    continue
                other = consumer.data_inputs[1 - pos].node if len(consumer.data_inputs) == 2 else ""
                if other in fir.reads or other in fir.captures:
                    reason = f"both operands of {consumer.op} '{consumer.name}' are weights"
                    blockers.append(Blocker(fir.key, consumer.name, consumer.op, key, reason, True))
                    continue
                found = _use(fir, consumer, pos, info, chain, shape)
                (blockers if isinstance(found, Blocker) else uses).append(found)
    for handle, key in fir.handles.items():
        for consumer, pos in graph.data_consumers(handle):
            if consumer.name in fir.reads or consumer.name in fir.handles:
                continue
            if consumer.op == "ResourceGather" and pos == 0 and infos[key].dtype in _FLOAT_DTYPES:
                # a lookup straight from the variable
                found = _use(fir, consumer, pos, infos[key], (), infos[key].shape)
                (blockers if isinstance(found, Blocker) else uses).append(found)
                continue
            if consumer.op in loops.LOOP_OPS and infos[key].dtype in _FLOAT_DTYPES:  # Keras 3 RNNs
                found = _loop_use(fir, consumer, pos, infos[key], ())
                (blockers if isinstance(found, Blocker) else uses).append(found)
                continue
            reason = f"the handle of '{infos[key].name}' goes to {consumer.op} '{consumer.name}'"
            if consumer.op in _CONTROL_FLOW:
                reason = _in_control_flow(infos[key].name, f"read inside the {consumer.op} '{consumer.name}'")
            blockers.append(Blocker(fir.key, consumer.name, consumer.op, key, reason, False))
    return uses, blockers


def _in_control_flow(name: str, why: str) -> str:
    # "inside a While/If" is the key graphrewrite.rewriting.coverage groups these by.
    return f"'{name}' is {why} (inside a While/If or function body that is not rewritten; it keeps working and training)"


def _loop_use(fir: FunctionIR, node, pos: int, info: VariableInfo, chain: View) -> Use | Blocker:
    """A While loop input carrying the weight: its handle, or its value read before the loop."""
    loop = (f"read inside {node.op} '{node.name}' after a reshape or transpose" if chain
            else loops.loop_weight(fir.graph, node, pos, info.dtype))
    if isinstance(loop, str):
        return Blocker(fir.key, node.name, node.op, info.key, _in_control_flow(info.name, loop), False)
    return _use(fir, node, pos, info, (), info.shape)


def _use(fir: FunctionIR, node, pos: int, info: VariableInfo, chain: View, shape: tuple[int, ...]) -> Use | Blocker:
    """The use of a weight by one weight-bearing op, or why it cannot be one."""
    adapter = ADAPTERS[node.op]
    constants = {i: fir.graph.constant(e.node) for i, e in enumerate(node.data_inputs) if i != pos}
    described = adapter.describe(node, pos, shape, {i: v for i, v in constants.items() if v is not None})
    if isinstance(described, str):
        return Blocker(fir.key, node.name, node.op, info.key, described, True)
    view = simplify(chain + described.steps, info.shape)
    return Use(fir.key, node.name, node.op, pos, info.key, chain, described.steps, view, described.m, described.n)


def _wrapper_step(graph: Graph, node, pos: int, shape: tuple[int, ...]) -> View | str | None:
    """The view step a wrapper op adds, a reason it cannot be followed, or None if not a wrapper."""
    if node.op in _PASS_THROUGH:
        return ()
    if node.op == "Reshape" and pos == 0:
        target = graph.constant(node.data_inputs[1].node)
        resolved = None if target is None else resolve_reshape(shape, target.reshape(-1).tolist())
        if resolved is None:
            return f"weight reshaped to a shape that is not a constant ({node.name})"
        return (("reshape", resolved),)
    if node.op == "ExpandDims" and pos == 0:  # Conv1D's kernel, [1, kw, cin, cout] for Conv2D
        axis = graph.constant(node.data_inputs[1].node)
        if axis is None:
            return f"weight expanded along an axis that is not a constant ({node.name})"
        at = int(axis.reshape(-1)[0])
        at = at + len(shape) + 1 if at < 0 else at
        return (("reshape", (*shape[:at], 1, *shape[at:])),)
    if node.op == "Transpose" and pos == 0:
        perm = graph.constant(node.data_inputs[1].node)
        if perm is None:
            return f"weight transposed by a permutation that is not a constant ({node.name})"
        return (("transpose", tuple(int(p) for p in perm.reshape(-1))),)
    return None
