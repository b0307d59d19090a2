"""A small read-only view of a flat GraphDef: nodes, attributes as Python values, edges.

The matcher and planner see graphs only through this class, so they never parse protobufs
themselves (the onnx-graphsurgeon idea: one thin wrapper around the serialized form).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Iterable, Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Edge:
    """One input of a node: the producing node, its output index, and whether it is control-only."""

    node: str
    index: int
    control: bool

    @classmethod
    def parse(cls, text: str) -> Edge:
        if text.startswith("^"):
            return cls(text[1:], -1, True)
        name, _, idx = text.partition(":")
        return cls(name, int(idx) if idx else 0, False)

    @property
    def tensor(self) -> str:
        """The canonical tensor name ``node:index`` (``^node`` for a control edge)."""
        return f"^{self.node}" if self.control else f"{self.node}:{self.index}"


class Node:
    """One NodeDef, with its attributes decoded lazily into Python values."""

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.name: str = proto.name
        self.op: str = proto.op
        self.inputs: tuple[Edge, ...] = tuple(Edge.parse(t) for t in proto.input)

    @property
    def data_inputs(self) -> tuple[Edge, ...]:
        return tuple(e for e in self.inputs if not e.control)

    def attr(self, key: str, default: Any = None) -> Any:
        """The attribute ``key`` as a Python value (str, int, float, bool, list, dtype enum, ...)."""
        if key not in self.proto.attr:
            return default
        return decode_attr(self.proto.attr[key])

    def has_attr(self, key: str) -> bool:
        return key in self.proto.attr

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.op})"


def decode_attr(value: Any) -> Any:
    """Decodes an AttrValue proto into a Python value (tensors become numpy arrays)."""
    kind = value.WhichOneof("value")
    if kind == "list":
        lst = value.list
        for field in ("s", "i", "f", "b", "type", "shape", "tensor", "func"):
            items = getattr(lst, field)
            if len(items):
                if field == "s":
                    return [x.decode("utf-8", "replace") for x in items]
                if field == "shape":
                    return [shape_dims(x) for x in items]
                if field == "tensor":
                    return [_tensor(x) for x in items]
                if field == "func":
                    return [x.name for x in items]
                return list(items)
        return []
    if kind == "s":
        return value.s.decode("utf-8", "replace")
    if kind == "shape":
        return shape_dims(value.shape)
    if kind == "tensor":
        return _tensor(value.tensor)
    if kind == "func":
        return value.func.name
    if kind is None:
        return None
    return getattr(value, kind)


def shape_dims(proto: Any) -> tuple[int | None, ...] | None:
    """A TensorShapeProto as dimensions (None: unknown), or None for an unknown rank."""
    if proto.unknown_rank:
        return None
    return tuple(None if d.size < 0 else int(d.size) for d in proto.dim)


def _tensor(proto: Any) -> np.ndarray:
    from tensorflow.python.framework import tensor_util  # lazily: keeps --help fast

    return tensor_util.MakeNdarray(proto)


class Graph:
    """A flat GraphDef as nodes and edges (function library bodies are not expanded)."""

    def __init__(self, graph_def: Any) -> None:
        self.graph_def = graph_def
        self.nodes: dict[str, Node] = {}
        for proto in graph_def.node:
            self.nodes[proto.name] = Node(proto)
        self._consumers: dict[str, list[tuple[Node, int]]] = {}
        for node in self.nodes.values():
            for pos, edge in enumerate(node.inputs):
                self._consumers.setdefault(edge.node, []).append((node, pos))
        self.function_names = {f.signature.name for f in graph_def.library.function}

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def consumers(self, name: str, index: int | None = None) -> list[tuple[Node, int]]:
        """Nodes reading ``name`` (output ``index`` only, if given; control edges only if None)."""
        found = self._consumers.get(name, [])
        if index is None:
            return list(found)
        return [(n, pos) for n, pos in found if not n.inputs[pos].control and n.inputs[pos].index == index]

    def data_consumers(self, name: str) -> list[tuple[Node, int]]:
        return [(n, pos) for n, pos in self._consumers.get(name, []) if not n.inputs[pos].control]

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a Const node (looking through Identity), or None."""
        node = self.nodes.get(name)
        while node is not None and node.op == "Identity" and node.data_inputs:
            node = self.nodes.get(node.data_inputs[0].node)
        if node is None or node.op != "Const":
            return None
        return node.attr("value")

    def upstream(self, starts: Iterable[str], stop: Container[str] = ()) -> set[str]:
        """The nodes ``starts`` (node names) depend on, themselves included, through data and
        control edges, without entering ``stop`` or names the graph does not have."""
        found: set[str] = set()
        stack = list(starts)
        while stack:
            name = stack.pop()
            if name in found or name in stop or name not in self.nodes:
                continue
            found.add(name)
            stack.extend(e.node for e in self.nodes[name].inputs)
        return found

    def topological_order(self) -> list[str]:
        """Node names with every producer before its consumers (data and control edges)."""
        indegree = {name: 0 for name in self.nodes}
        for node in self.nodes.values():
            for edge in node.inputs:
                if edge.node in self.nodes:
                    indegree[node.name] += 1
        ready = [name for name, deg in indegree.items() if deg == 0]
        order: list[str] = []
        while ready:
            name = ready.pop()
            order.append(name)
            for consumer, _ in self._consumers.get(name, []):
                indegree[consumer.name] -= 1
                if indegree[consumer.name] == 0:
                    ready.append(consumer.name)
        if len(order) != len(self.nodes):
            raise ValueError("graph has a cycle outside functional control flow")
        return order
