"""Builds the rewritten model: new variables, rebuilt functions, and the saveable root object.

Each flat function is re-imported inside a new ``tf.function``, in stages. Nodes that must be built
in Python (the alpha-gated replacement of every rewritten op, and reads of variables that carry
control dependencies) split the graph into levels; the GraphDef nodes of one level are imported with
one ``import_graph_def`` whose ``input_map`` feeds them what earlier levels and Python built. So the
replacement ops are ordinary Python-built ops of the saved function (their custom gradients are
saved with it), and weights are never turned into constants.

Every variable read is rebuilt as a read of the variable object (not an imported ReadVariableOp):
without that, a GradientTape does not watch the variable and its gradient comes back None.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.rewriting import loops, recurrent
from graphrewrite.rewriting.graph import Edge, Graph, Node
from graphrewrite.rewriting.model import NO_DEFAULT, Entry, FunctionIR, LoadedModel, Variant
from graphrewrite.rewriting.plan import RewritePlan, SitePlan, Use
from graphrewrite.rewriting.sites import SiteRuntime, site_output, weight_spec
from graphrewrite.transforms import Transform


def _site_state_class() -> type:
    import tensorflow as tf

    class SiteState(tf.__internal__.tracking.AutoTrackable):
        """The variables of one compressed weight: A (the original), factors, alpha, last update."""

        def __init__(self, weight: Any, factors: Mapping[str, Any], alpha: Any, last_update: Any) -> None:
            self.weight = weight
            self.factors = dict(factors)
            self.alpha = alpha
            self.last_update = last_update

    return SiteState


def make_site_state(plan: SitePlan, weight: Any, transform: Transform,
                    initial: Mapping[str, np.ndarray]) -> Any:
    """Creates a site's variables (factors from ``initial``, alpha = 1, last update = -1)."""
    import tensorflow as tf

    base = re.sub(r"[^A-Za-z0-9_.\-/]", "_", plan.variable.name)  # names TF accepts for new variables
    state_kw = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    factors = {}
    for spec in transform.factor_specs(plan.size):
        value = initial[spec.name]
        factors[spec.name] = tf.Variable(
            np.asarray(value, dtype=spec.dtype), name=f"{base}/{spec.name}_matrix",
            trainable=spec.trainable)
    alpha = tf.Variable(1.0 if transform.blended else 0.0, dtype=tf.float32, name=f"{base}/alpha", **state_kw)
    last = tf.Variable(-1, dtype=tf.int64, name=f"{base}/last_alpha_update_step", **state_kw)
    return _site_state_class()(weight, factors, alpha, last)


class FunctionBuilder:
    """Rebuilds one flat function inside the tf.function being traced (staged import).

    Args:
      fir: the flat function.
      model: what its variables and captures resolve to.
      sites: op node name -> [(site runtime, use)] for every rewritten op of this function (a While
        loop may carry several sites' weights).
      export: build the compressed form alone: the reads of compressed weights, their wrappers and
        everything only they feed are left out, so the original weights are not even captured
        (methods without alpha are built that way in the rewritten model too: A is not trained).
    """

    def __init__(self, fir: FunctionIR, model: LoadedModel, sites: Mapping[str, list[tuple[SiteRuntime, Use]]],
                 export: bool = False) -> None:
        self.fir = fir
        self.model = model
        self.sites = dict(sites)
        self.export = export
        graph = fir.graph
        self.live = self._live_nodes()
        input_nodes = {name.split(":")[0] for name in fir.inputs}
        controlled_reads = {n for n in fir.reads if any(e.control for e in graph[n].inputs)}
        self.provided = self.live & (input_nodes | set(fir.handles) | set(fir.captures)
                                     | (set(fir.reads) - controlled_reads))
        self.python_nodes = self.live & (controlled_reads | set(self.sites))
        order = [n for n in graph.topological_order() if n in self.live]
        level: dict[str, int] = {}
        for name in order:
            level[name] = 0 if name in self.provided else max(
                (level[e.node] + (1 if e.node in self.python_nodes else 0)
                 for e in self._edges(graph[name])), default=0)
        self.max_level = max(level.values(), default=0)
        self.stage_nodes: dict[int, list[str]] = {}
        self.stage_python: dict[int, list[str]] = {}
        for name in order:
            if name not in self.provided:
                bucket = self.stage_python if name in self.python_nodes else self.stage_nodes
                bucket.setdefault(level[name], []).append(name)
        # What each stage must hand on: tensors and ops read by later stages, Python nodes, outputs.
        self.exports: dict[int, set[str]] = {}
        imported = {n for names in self.stage_nodes.values() for n in names}
        for name in order:
            for edge in self._edges(graph[name]):
                if edge.node in imported and (name not in imported or level[name] != level[edge.node]):
                    self.exports.setdefault(level[edge.node], set()).add(edge.node if edge.control else edge.tensor)
        for name in fir.outputs:
            node = name.split(":")[0]
            if node in imported:
                self.exports.setdefault(level[node], set()).add(Edge.parse(name).tensor)

    def _dead(self) -> set[str]:
        """Reads of weights the rebuilt ops no longer read, and the wrappers between them and their
        ops: every compressed weight in export mode, else those of methods without alpha."""
        graph, fir = self.fir.graph, self.fir
        compressed = {use.variable for bound in self.sites.values() for runtime, use in bound
                      if self.export or not runtime.transform.blended}
        if not compressed:
            return set()
        dead = {n for n, k in {**fir.reads, **fir.handles}.items() if k in compressed}
        stack = list(dead)
        while stack:
            for consumer, _ in graph.data_consumers(stack.pop()):
                if consumer.name not in self.sites and consumer.name not in dead:
                    dead.add(consumer.name)
                    stack.append(consumer.name)
        return dead

    def _edges(self, node: Node) -> list[Any]:
        """The inputs a node keeps: all of them, less (in export mode) those from dead nodes."""
        return [e for e in node.inputs if e.node not in self._dead_nodes]

    def _live_nodes(self) -> set[str]:
        self._dead_nodes = self._dead()
        return self.fir.graph.upstream((name.split(":")[0] for name in self.fir.outputs), self._dead_nodes)

    def __call__(self, flat_inputs: Sequence[Any], site_reads: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        import tensorflow as tf
        from tensorflow.core.framework import graph_pb2

        fir, graph, model = self.fir, self.fir.graph, self.model
        tensors: dict[str, Any] = {}
        ops: dict[str, Any] = {}
        for name, value in zip(fir.inputs, flat_inputs):
            tensors[Edge.parse(name).tensor] = value
        handle_of, read_of = {}, {}
        for node, key in fir.handles.items():
            if node in self.provided:
                if key not in handle_of:
                    handle_of[key] = _watched_handle(model.variables[key])
                tensors[f"{node}:0"] = handle_of[key]
        for node, key in fir.reads.items():
            if node in self.provided:
                if key not in read_of:
                    read_of[key] = tf.identity(model.variables[key])
                tensors[f"{node}:0"] = read_of[key]
        for node, index in fir.captures.items():
            if node in self.provided:
                tensors[f"{node}:0"] = tf.identity(model.captured[index])

        def control_tensor(name: str) -> Any:
            if name in ops:
                op = ops[name]
                if op.outputs:
                    return op.outputs[0]
                with tf.control_dependencies([op]):
                    return tf.constant(0)
            return tensors[f"{name}:0"]

        def python_node(name: str) -> None:
            node = graph[name]
            edges = self._edges(node)
            data = [tensors[e.tensor] if e.tensor in tensors else None for e in node.inputs if not e.control]
            controls = [control_tensor(e.node) for e in edges if e.control]
            with tf.control_dependencies(controls):
                if node.op in loops.LOOP_OPS:  # a While carrying weights of sites (recurrent kernels)
                    outs = recurrent.loop_outputs(self.sites[name], graph, node, data, site_reads,
                                                  model.variables, self.export)
                    tensors.update({f"{name}:{i}": t for i, t in enumerate(outs)})
                    return
                if name in self.sites:
                    [(runtime, use)] = self.sites[name]
                    if self.export or not runtime.transform.blended:
                        data[use.operand] = weight_spec(runtime, use, node)
                    out = site_output(runtime, use, node, data, site_reads[runtime.plan.id], self.export)
                else:
                    out = tf.identity(model.variables[fir.reads[name]])
            tensors[f"{name}:0"] = out

        library_imported = False
        for level in range(self.max_level + 1):
            names = self.stage_nodes.get(level, [])
            if names:
                stage = graph_pb2.GraphDef()
                stage.versions.CopyFrom(graph.graph_def.versions)
                if not library_imported:  # functions stay in the graph for later stages
                    stage.library.CopyFrom(graph.graph_def.library)
                    library_imported = True
                local = set(names)
                input_map = {}
                for name in names:
                    proto = stage.node.add()
                    proto.CopyFrom(graph[name].proto)
                    proto.device = ""
                    # _gradient_op_type names a custom gradient restored with the input model, bound
                    # to tensors of the input's own function graphs: the save cannot re-bind those
                    # (swish/silu in EfficientNet). Without it the op gets the plain autodiff
                    # gradient of its forward ops, which is what Keras' custom gradients compute.
                    for attr in ("_class", "_gradient_op_type"):
                        if attr in proto.attr:
                            del proto.attr[attr]
                    kept = self._edges(graph[name])
                    if len(kept) != len(graph[name].inputs):
                        del proto.input[:]
                        proto.input.extend(e.tensor for e in kept)
                    for edge in kept:
                        if edge.node in local:
                            continue
                        if edge.control:
                            input_map[f"^{edge.node}"] = control_tensor(edge.node)
                        else:
                            input_map[edge.tensor] = tensors[edge.tensor]
                wanted = sorted(self.exports.get(level, ()))
                results = tf.graph_util.import_graph_def(
                    stage, input_map=input_map, return_elements=wanted, name=f"L{level}")
                for key, value in zip(wanted, results):
                    if ":" in key:
                        tensors[key] = value
                    else:
                        ops[key] = value
            for name in self.stage_python.get(level, []):
                python_node(name)
        return [tensors[Edge.parse(name).tensor] for name in fir.outputs]


def fingerprint(fir: FunctionIR) -> str:
    """Identifies a flat function by its content, ignoring the names TensorFlow gives captures."""
    import hashlib

    from tensorflow.core.framework import graph_pb2

    graph = graph_pb2.GraphDef()
    graph.CopyFrom(fir.graph.graph_def)
    for node in graph.node:
        for key in [k for k in node.attr if k.startswith("_")]:
            del node.attr[key]
    digest = hashlib.sha256(graph.SerializeToString(deterministic=True))
    digest.update(repr((fir.inputs, fir.outputs, sorted(fir.handles.items()), sorted(fir.reads.items()),
                        sorted(fir.captures.items()))).encode())
    return digest.hexdigest()


def _watched_handle(variable: Any) -> Any:
    """The variable's captured handle, marked accessed so that an outer tape watches the variable.

    The capture placeholder itself (not an Identity of it) is fed to the imported ops: after a
    save and reload only placeholders keep their resource handle data, and without it the gradient
    of a While loop (LSTM) treats the handle as untrainable and returns None.
    """
    import tensorflow as tf
    from tensorflow.python.eager import tape

    tape.variable_accessed(variable)
    return tf.compat.v1.get_default_graph().capture(variable.handle)


# ------------------------------------------------------------------------------------------------
# Exported callables
# ------------------------------------------------------------------------------------------------


def _is_spec(value: Any) -> bool:
    import tensorflow as tf

    return isinstance(value, tf.TensorSpec)


def _matches(signature: Any, call: Any) -> bool:
    import tensorflow as tf

    try:
        tf.nest.assert_same_structure(signature, call, check_types=False)
    except (ValueError, TypeError):
        return False
    for spec, value in zip(tf.nest.flatten(signature), tf.nest.flatten(call)):
        if _is_spec(spec):
            if not hasattr(value, "dtype") or tf.as_dtype(value.dtype) != spec.dtype:
                return False
            if not spec.shape.is_compatible_with(value.shape):
                return False
        elif spec != value:
            return False
    return True


def _tensor_leaves(structure: Any) -> list[Any]:
    import tensorflow as tf

    return [leaf for leaf in tf.nest.flatten(structure) if hasattr(leaf, "dtype")]


def make_callable(entry: Entry, run: Callable[[Variant, list[Any]], list[Any]]) -> Any:
    """A tf.function with the entry's Python signature whose body runs the rebuilt graph."""
    import inspect

    import tensorflow as tf

    variants = entry.variants

    def body(variant: Variant, flat: list[Any]) -> Any:
        outputs = run(variant, flat)
        return tf.nest.pack_sequence_as(variant.output_structure, outputs)

    if entry.kind == "signature":
        variant = variants[0]
        kwargs = variant.input_signature[1]
        keys = sorted(kwargs)
        specs = [tf.TensorSpec(kwargs[k].shape, kwargs[k].dtype, name=kwargs[k].name or k) for k in keys]

        def signature_fn(*args: Any) -> Any:
            return body(variant, list(args))

        signature_fn.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [inspect.Parameter(k if k.isidentifier() else f"input_{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD)
             for i, k in enumerate(keys)])
        return tf.function(signature_fn, input_signature=specs, autograph=False)

    if len(variants) == 1:
        args, kwargs = variants[0].input_signature
        if not kwargs and all(_is_spec(leaf) for leaf in tf.nest.flatten(args)):
            def positional_fn(*call_args: Any) -> Any:
                return body(variants[0], _tensor_leaves(call_args))

            return tf.function(positional_fn, input_signature=list(args), autograph=False)

    python_signature = None
    if entry.parameters is not None:
        python_signature = inspect.Signature([
            inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              default=inspect.Parameter.empty if default is NO_DEFAULT else default)
            for name, default in entry.parameters])

    def dispatch(*call_args: Any, **call_kwargs: Any) -> Any:
        if python_signature is not None:
            bound = python_signature.bind(*call_args, **call_kwargs)
            bound.apply_defaults()
            call_args, call_kwargs = bound.args, bound.kwargs
        for variant in variants:
            if _matches(variant.input_signature, (call_args, call_kwargs)):
                return body(variant, _tensor_leaves((call_args, call_kwargs)))
        raise TypeError(f"{entry.name}: no traced variant accepts these arguments")

    if python_signature is not None:
        dispatch.__signature__ = python_signature  # type: ignore[attr-defined]
    function = tf.function(dispatch, autograph=False)
    for variant in variants:
        args, kwargs = variant.input_signature
        function.get_concrete_function(*args, **kwargs)
    return function


def save_options() -> Any:
    """The options every graphrewrite save uses (custom gradients saved: the gated ops need them)."""
    import tensorflow as tf

    return tf.saved_model.SaveOptions(experimental_custom_gradients=True)


@contextlib.contextmanager
def tracing_as_saved() -> Any:
    """Traces functions the way ``tf.saved_model.save`` will.

    Whether a save is in progress is part of every tf.function's trace cache key, so functions
    traced at build time would all be traced a second time by the save. Traced inside the same save
    context, they are reused (ResNet50: each core and gated function traced once instead of twice).
    """
    from tensorflow.python.saved_model import save_context

    with save_context.save_context(save_options()):
        yield


@dataclasses.dataclass
class Built:
    """The saveable root and what saving needs."""

    root: Any
    signatures: dict[str, Any]


def _rebuild(model: LoadedModel, plan: RewritePlan, runtimes: Mapping[str, SiteRuntime],
             export: bool) -> tuple[Any, dict[str, Any], list[Any]]:
    """A root holding every exported callable rebuilt; returns (root, signatures, variables used)."""
    import tensorflow as tf

    builders: dict[str, FunctionBuilder] = {}
    for key, fir in model.functions.items():
        bound: dict[str, list[tuple[SiteRuntime, Use]]] = {}
        for site in plan.sites:
            for use in (u for u in site.uses if u.function == key):
                bound.setdefault(use.op, []).append((runtimes[site.id], use))
        builders[key] = FunctionBuilder(fir, model, bound, export)

    def reads_for(builder: FunctionBuilder) -> dict[str, dict[str, Any]]:
        reads = {}
        for site_id in sorted({rt.plan.id for bound in builder.sites.values() for rt, _ in bound}):
            state = runtimes[site_id].state
            values = {name: tf.identity(v) for name, v in state.factors.items()}
            if not export:
                values["__alpha__"] = tf.identity(state.alpha)
            reads[site_id] = values
        return reads

    # Callables with the same flat function (Keras 3 exports serve, its serve signature and
    # serving_default alike) share one rebuilt core: built, traced and saved once.
    fingerprints = {key: fingerprint(fir) for key, fir in model.functions.items()}
    cores: dict[tuple[str, ...], Any] = {}

    def run(variant: Variant, flat: list[Any]) -> list[Any]:
        specs = tuple(tf.TensorSpec(t.shape, t.dtype) for t in flat)
        key = (fingerprints[variant.function], *(repr(spec) for spec in specs))
        if key not in cores:
            builder = builders[variant.function]

            def core(*inputs: Any) -> list[Any]:
                return builder(list(inputs), reads_for(builder))

            cores[key] = tf.function(core, input_signature=list(specs), autograph=False)
        return cores[key](*flat)

    root = tf.__internal__.tracking.AutoTrackable()
    signatures = {}
    for entry in model.entries:
        fn = make_callable(entry, run)
        if entry.kind == "signature":
            signatures[entry.name] = fn
        else:
            setattr(root, entry.name, fn)
    if not any(e.kind == "function" and e.name == "__call__" for e in model.entries):
        default = getattr(root, "serve", None) or signatures.get("serving_default") or next(
            (signatures[k] for k in sorted(signatures)), None)
        if default is not None:
            root.__call__ = default
    concrete = {key: fn.get_concrete_function() for key, fn in signatures.items()}
    used_keys = {k for b in builders.values() for n, k in {**b.fir.reads, **b.fir.handles}.items() if n in b.live}
    used_keys |= {k for b in builders.values() for n, k in b.fir.reads.items() if n in b.python_nodes}
    used = [model.variables[k] for k in model.variables if k in used_keys]
    return root, concrete, used


def build(model: LoadedModel, plan: RewritePlan, transform: Transform,
          initial: Mapping[str, Mapping[str, np.ndarray]], update_fn_factory: Callable[..., Any]) -> Built:
    """The rewritten model: site variables, every callable rebuilt with alpha-gated ops, the update."""
    import tensorflow as tf

    runtimes = {}
    gates: dict[Any, Any] = {}
    for site in plan.sites:
        state = make_site_state(site, model.variables[site.variable.key], transform, initial[site.id])
        runtimes[site.id] = SiteRuntime(site, state, transform, gates)
    with tracing_as_saved():
        root, signatures, used = _rebuild(model, plan, runtimes, export=False)
    states = [runtimes[s.id].state for s in plan.sites]
    new_vars = [v for st in states for v in (*st.factors.values(), st.alpha, st.last_update)]
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="graphrewrite_global_step",
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    _set_variables(root, used + new_vars + [global_step])
    root.regularization_losses = list(model.regularization_losses)
    root.global_step = global_step
    root.graphrewrite_sites = states
    root.graphrewrite_resources = list(model.resources)
    root.graphrewrite_source_variables = list(model.variables.values())
    update = update_fn_factory(root, plan, transform)
    root.compression_update = update
    with tracing_as_saved():
        signatures["compression_update"] = update.get_concrete_function()
    # A plain tf.saved_model.save(loaded, dir) keeps only this one as a signature (TensorFlow drops
    # the others unless given signatures=loaded.signatures).
    default_key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    root._default_save_signature = signatures[default_key]
    return Built(root=root, signatures=signatures)


def build_export(model: LoadedModel, plan: RewritePlan, transform: Transform, states: Sequence[Any]) -> Built:
    """The final model: every callable rebuilt with the compressed forms alone (no A, no alpha)."""
    import tensorflow as tf

    runtimes = {}
    for site, state in zip(plan.sites, states):
        values = {name: var.numpy() for name, var in state.factors.items()}
        final, final_values = transform.export_form(values, site.size)
        if final is not transform:  # a smaller inference form: new variables for it
            specs = {spec.name: spec for spec in final.factor_specs(site.size)}
            factors = {name: tf.Variable(np.asarray(value, specs[name].dtype), trainable=specs[name].trainable,
                                         name=re.sub(r"[^A-Za-z0-9_.\-/]", "_", f"{site.variable.name}/{name}_matrix"))
                       for name, value in final_values.items()}
            state = _site_state_class()(None, factors, None, None)
        runtimes[site.id] = SiteRuntime(site, state, final)
    with tracing_as_saved():
        root, signatures, used = _rebuild(model, plan, runtimes, export=True)
    factors = [v for rt in runtimes.values() for v in rt.state.factors.values()]
    _set_variables(root, used + factors)
    root.regularization_losses = []
    root.graphrewrite_resources = list(model.resources)
    return Built(root=root, signatures=signatures)


def _set_variables(root: Any, variables: list[Any]) -> None:
    root.variables = variables
    root.trainable_variables = [v for v in variables if v.trainable]
    root.non_trainable_variables = [v for v in variables if not v.trainable]


def factorize_all(model: LoadedModel, plan: RewritePlan, transform: Transform,
                  progress: Callable[[str], None]) -> dict[str, dict[str, np.ndarray]]:
    """Initial factor values of every site, from the weights as they are now (LAPACK), fitted to
    the calibration statistics (``model.calibration``) where the plan marks a site calibrated."""
    grams = model.calibration.grams if model.calibration is not None else {}
    out = {}
    for i, site in enumerate(plan.sites, 1):
        progress(f"factorizing {i}/{len(plan.sites)}: {site.variable.name} {site.size.m}x{site.size.n}")
        matrix = model.matrix(site.variable.key, site.view)
        if site.size.details.get("factors") == "calibrated":
            out[site.id] = transform.factorize_calibrated(matrix, site.size, grams[site.variable.key])
        else:
            out[site.id] = transform.factorize(matrix, site.size)
        del matrix
    return out


__all__ = ["Built", "FunctionBuilder", "Graph", "build", "build_export", "factorize_all", "make_callable"]
