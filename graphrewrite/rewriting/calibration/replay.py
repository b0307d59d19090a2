"""Part of a function's inlined graph, run again inside a tf.function, some variable reads replaced.

The calibration pass (graphrewrite.rewriting.calibration.statistics) needs the tensors that the weights
multiply; the model check (graphrewrite.rewriting.calibration.modelcheck) needs the signature's outputs with
the weights replaced by their compressed values. Both run the model's own graph (the loader's
FunctionIR: inlined, its variable reads labelled), pruned to the tensors they want, imported into
a tf.function with ``tf.graph_util.import_graph_def``: the graph's inputs, variable handles, reads
and captured constants are fed from the loaded model, and a read of a variable in ``swap`` reads
the value given instead. Only the ops that the wanted tensors depend on are imported.

A weight read inside a While body is swapped too: Keras 3 passes its handle into the loop, which
then gets the handle of the variable holding the new value; tf.keras reads it before the loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from graphrewrite.rewriting.graph import Edge
from graphrewrite.rewriting.model import FunctionIR, LoadedModel


class Pruned:
    """``fir``'s graph pruned to the tensors ``wanted`` (``node:index`` names) need."""

    def __init__(self, fir: FunctionIR, model: LoadedModel, wanted: Sequence[str],
                 rewritten: Sequence[Any] = (), functions: Sequence[Any] = ()) -> None:
        """``rewritten``: NodeDefs that replace the graph's nodes of their names where the pruned
        graph has them (their inputs as the originals' and new nodes among ``rewritten``), and
        new nodes; ``functions``: FunctionDefs they call (graphrewrite.rewriting.loops.gram_loop)."""
        from tensorflow.core.framework import graph_pb2

        self.fir, self.model = fir, model
        graph = fir.graph
        self.provided = ({Edge.parse(name).node for name in fir.inputs} | set(fir.handles) | set(fir.reads)
                         | set(fir.captures))
        needed = graph.upstream((Edge.parse(name).node for name in wanted), self.provided)
        self.stage = graph_pb2.GraphDef()
        self.stage.versions.CopyFrom(graph.graph_def.versions)
        self.stage.library.CopyFrom(graph.graph_def.library)
        self.fed: set[str] = set()  # the provided tensors the pruned graph reads
        for name in sorted(needed):
            proto = self.stage.node.add()
            proto.CopyFrom(graph[name].proto)
            proto.device = ""
            if "_class" in proto.attr:
                del proto.attr["_class"]
            kept = [e for e in graph[name].inputs if not (e.control and e.node in self.provided)]
            del proto.input[:]
            proto.input.extend(e.tensor for e in kept)
            self.fed.update(e.tensor for e in kept if e.node in self.provided)
        replacing = {proto.name: proto for proto in rewritten}
        for proto in self.stage.node:
            if proto.name in replacing:  # a loop without control inputs (loops.loop_weight): all fed alike
                proto.CopyFrom(replacing[proto.name])
                proto.device = ""
                if "_class" in proto.attr:
                    del proto.attr["_class"]
        self.stage.node.extend(p for p in rewritten if p.name not in graph)
        self.stage.library.function.extend(functions)
        if functions:
            # import_graph_def records them in the tf.function's graph, but the runtime does not
            # find new loop bodies there (NotFoundError at the first call, TensorFlow 2.21)
            from tensorflow.python.eager import context

            for function in functions:
                context.context().add_function_def(function)
        self.wanted = [Edge.parse(name).tensor for name in wanted]
        self.computed = sorted({t for t in self.wanted if Edge.parse(t).node in needed})

    def feeds(self, inputs: Sequence[Any]) -> dict[str, Any]:
        """Tensor name -> value for the graph's inputs (``inputs``, in ``fir.inputs`` order), its
        variable handles, reads and captures. Call inside the tf.function."""
        import tensorflow as tf

        fir, model = self.fir, self.model
        mapped = {Edge.parse(name).tensor: value for name, value in zip(fir.inputs, inputs)}
        # a graph tensor of the handle (import_graph_def cannot map an eager one): a loop taking it
        mapped.update({f"{n}:0": tf.compat.v1.get_default_graph().capture(model.variables[k].handle)
                       for n, k in fir.handles.items()})
        mapped.update({f"{n}:0": tf.identity(model.variables[k]) for n, k in fir.reads.items()})
        mapped.update({f"{n}:0": tf.identity(model.captured[i]) for n, i in fir.captures.items()})
        return mapped

    def run(self, feeds: Mapping[str, Any], swap: Mapping[str, Any] | None = None,
            name: str = "replay") -> dict[str, Any]:
        """The ``wanted`` tensors, with the reads of the variables (keys) in ``swap`` reading the
        values given there instead (tf.Variables: then a loop taking the weight's handle takes
        theirs). Call inside the tf.function."""
        import tensorflow as tf

        swap = swap or {}
        swapped = {f"{n}:0": tf.identity(swap[k]) for n, k in self.fir.reads.items() if k in swap}
        # a loop that reads the weight through its handle (Keras 3 RNNs) reads the holder's
        graph = tf.compat.v1.get_default_graph()
        swapped.update({f"{n}:0": graph.capture(swap[k].handle) for n, k in self.fir.handles.items()
                        if k in swap and hasattr(swap[k], "handle")})
        values = {**feeds, **swapped}
        results = tf.graph_util.import_graph_def(
            self.stage, input_map={t: values[t] for t in sorted(self.fed)}, return_elements=self.computed,
            name=name) if self.computed else []
        out = {**values, **dict(zip(self.computed, results))}
        return {t: out[t] for t in self.wanted}

    def outputs(self, specs: Sequence[Any], swap: Mapping[str, Any] | None = None,
                name: str = "replay") -> Any:
        """A tf.function of the graph's inputs (``specs``, in ``fir.inputs`` order) giving the
        ``wanted`` tensors in order, ``swap`` as ``run`` takes it."""
        import tensorflow as tf

        @tf.function(input_signature=list(specs), autograph=False)
        def function(*values: Any) -> Any:
            outputs = self.run(self.feeds(values), swap, name=name)
            return [outputs[t] for t in self.wanted]
        return function


def input_specs(data: Mapping[str, Any], names: Sequence[str]) -> list[Any]:
    """TensorSpecs of the arrays ``data[name]`` (examples first, any count) in ``names``' order."""
    import tensorflow as tf

    return [tf.TensorSpec([None, *data[n].shape[1:]], tf.as_dtype(data[n].dtype)) for n in names]


def batches(data: Mapping[str, Any], names: Sequence[str], batch: int) -> list[list[Any]]:
    """The examples of ``data`` cut ``batch`` at a time, each a list of arrays in ``names``' order."""
    count = len(data[names[0]]) if names else 0
    return [[data[n][start:start + batch] for n in names] for start in range(0, count, batch)]


__all__ = ["Pruned", "batches", "input_specs"]
