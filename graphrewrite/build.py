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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import blend, views
from graphrewrite.graph import Graph, Node
from graphrewrite.model import NO_DEFAULT, Entry, FunctionIR, LoadedModel, Variant
from graphrewrite.ops import ADAPTERS
from graphrewrite.plan import RewritePlan, SitePlan, Use
from graphrewrite.transforms import Transform


@dataclasses.dataclass
class SiteRuntime:
    """What a rebuilt function needs to emit one site's replacement."""

    plan: SitePlan
    state: Any  # SiteState trackable
    transform: Transform


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

    base = plan.variable.name
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


def site_output(runtime: SiteRuntime, use: Use, node: Node, inputs: list[Any], reads: Mapping[str, Any]) -> Any:
    """The replacement of one rewritten op (alpha-gated where the method blends)."""
    import tensorflow as tf

    adapter = ADAPTERS[node.op]
    transform, size, pos = runtime.transform, runtime.plan.size, use.operand
    names = sorted(reads)
    weight = inputs[pos]
    others = [t for i, t in enumerate(inputs) if i != pos]

    def with_weight(xs: Sequence[Any], w: Any) -> list[Any]:
        out = list(xs)
        out.insert(pos, w)
        return out

    def dense(args: Sequence[Any]) -> Any:
        return adapter.apply(node, with_weight(args[:-1], args[-1]))

    def compressed(args: Sequence[Any]) -> Any:
        xs, factor_values = list(args[: len(others)]), dict(zip(names, args[len(others):]))
        full = with_weight(xs, weight)
        pair = transform.low_rank(factor_values)
        if pair is not None:
            b, c = (tf.cast(t, weight.dtype) for t in pair)
            y = adapter.apply_low_rank(node, full, pos, b, c)
            if y is not None:
                return y
        y = adapter.apply_matrix_fn(node, full, pos, lambda x: transform.matmul(x, factor_values, size))
        if y is not None:
            return y
        matrix = tf.cast(transform.dense(factor_values, size), weight.dtype)
        op_steps = use.view[len(use.chain):]
        w = views.invert_tf(matrix, op_steps, weight.shape.as_list())
        return adapter.apply(node, with_weight(xs, w))

    factor_tensors = [reads[name] for name in names]
    if not transform.blended:
        return compressed(others + factor_tensors)
    return blend.gated(dense, compressed, others + [weight], others + factor_tensors, reads["__alpha__"])


class FunctionBuilder:
    """Rebuilds one flat function inside the tf.function being traced (staged import)."""

    def __init__(self, fir: FunctionIR, model: LoadedModel, sites: Mapping[str, tuple[SiteRuntime, Use]]) -> None:
        self.fir = fir
        self.model = model
        self.sites = dict(sites)
        graph = fir.graph
        input_nodes = {name.split(":")[0] for name in fir.inputs}
        controlled_reads = {n for n in fir.reads if any(e.control for e in graph[n].inputs)}
        self.provided = input_nodes | set(fir.handles) | set(fir.captures) | (set(fir.reads) - controlled_reads)
        self.python_nodes = controlled_reads | set(self.sites)
        level: dict[str, int] = {}
        for name in graph.topological_order():
            if name in self.provided:
                level[name] = 0
                continue
            level[name] = max(
                (level[e.node] + (1 if e.node in self.python_nodes else 0) for e in graph[name].inputs),
                default=0)
        self.levels = level
        self.max_level = max(level.values(), default=0)
        self.stage_nodes: dict[int, list[str]] = {}
        self.stage_python: dict[int, list[str]] = {}
        for name in graph.topological_order():
            if name in self.provided:
                continue
            bucket = self.stage_python if name in self.python_nodes else self.stage_nodes
            bucket.setdefault(level[name], []).append(name)
        # What each stage must hand on: tensors and ops read by later stages, Python nodes, outputs.
        self.exports: dict[int, set[str]] = {}
        imported = {n for names in self.stage_nodes.values() for n in names}
        consumers_of = [(graph[n], e) for n in graph.nodes for e in graph[n].inputs]
        for node, edge in consumers_of:
            if edge.node in imported and (node.name not in imported or level[node.name] != level[edge.node]):
                self.exports.setdefault(level[edge.node], set()).add(edge.node if edge.control else edge.tensor)
        for name in fir.outputs:
            node = name.split(":")[0]
            if node in imported:
                self.exports.setdefault(level[node], set()).add(_canonical(name))

    def __call__(self, flat_inputs: Sequence[Any], site_reads: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        import tensorflow as tf
        from tensorflow.core.framework import graph_pb2

        fir, graph, model = self.fir, self.fir.graph, self.model
        tensors: dict[str, Any] = {}
        ops: dict[str, Any] = {}
        for name, value in zip(fir.inputs, flat_inputs):
            tensors[_canonical(name)] = value
        handle_of, read_of = {}, {}
        for node, key in fir.handles.items():
            if key not in handle_of:
                handle_of[key] = _watched_handle(model.variables[key])
            tensors[f"{node}:0"] = handle_of[key]
        for node, key in fir.reads.items():
            if node in self.provided:
                if key not in read_of:
                    read_of[key] = tf.identity(model.variables[key])
                tensors[f"{node}:0"] = read_of[key]
        for node, index in fir.captures.items():
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
            data = [tensors[e.tensor] for e in node.data_inputs]
            controls = [control_tensor(e.node) for e in node.inputs if e.control]
            with tf.control_dependencies(controls):
                if name in self.sites:
                    runtime, use = self.sites[name]
                    out = site_output(runtime, use, node, data, site_reads[runtime.plan.id])
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
                    if "_class" in proto.attr:
                        del proto.attr["_class"]
                    for edge in graph[name].inputs:
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
        return [tensors[_canonical(name)] for name in fir.outputs]


def _canonical(tensor_name: str) -> str:
    return tensor_name if ":" in tensor_name else f"{tensor_name}:0"


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
        return tf.function(signature_fn, input_signature=specs)

    if len(variants) == 1:
        args, kwargs = variants[0].input_signature
        if not kwargs and all(_is_spec(leaf) for leaf in tf.nest.flatten(args)):
            def positional_fn(*call_args: Any) -> Any:
                return body(variants[0], _tensor_leaves(call_args))

            return tf.function(positional_fn, input_signature=list(args))

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
    function = tf.function(dispatch)
    for variant in variants:
        args, kwargs = variant.input_signature
        function.get_concrete_function(*args, **kwargs)
    return function


@dataclasses.dataclass
class Built:
    """The saveable root and what saving needs."""

    root: Any
    signatures: dict[str, Any]
    states: list[Any]


def build(model: LoadedModel, plan: RewritePlan, transform: Transform,
          initial: Mapping[str, Mapping[str, np.ndarray]], update_fn_factory: Callable[..., Any]) -> Built:
    """Creates site variables, rebuilds every exported callable, and assembles the root object."""
    import tensorflow as tf

    states = {}
    runtimes: dict[str, SiteRuntime] = {}
    for site in plan.sites:
        weight = model.variables[site.variable.key]
        states[site.id] = make_site_state(site, weight, transform, initial[site.id])
        runtimes[site.id] = SiteRuntime(site, states[site.id], transform)

    builders: dict[str, FunctionBuilder] = {}
    for key, fir in model.functions.items():
        bound = {use.op: (runtimes[site.id], use) for site in plan.sites for use in site.uses
                 if use.function == key}
        builders[key] = FunctionBuilder(fir, model, bound)

    def run(variant: Variant, flat: list[Any]) -> list[Any]:
        builder = builders[variant.function]
        needed = {rt.plan.id for rt, _ in builder.sites.values()}
        reads = {}
        for site_id in sorted(needed):
            state = states[site_id]
            values = {name: tf.identity(v) for name, v in state.factors.items()}
            values["__alpha__"] = tf.identity(state.alpha)
            reads[site_id] = values
        return builder(flat, reads)

    root = tf.__internal__.tracking.AutoTrackable()
    signatures = {}
    callables = {}
    for entry in model.entries:
        fn = make_callable(entry, run)
        if entry.kind == "signature":
            signatures[entry.name] = fn.get_concrete_function()
        else:
            callables[entry.name] = fn
    for name, fn in callables.items():
        setattr(root, name, fn)
    if "__call__" not in callables:
        root.__call__ = callables.get("serve") or _signature_call(model, signatures)

    used = [model.variables[k] for k in model.variables]
    new_vars = [v for st in states.values() for v in (*st.factors.values(), st.alpha, st.last_update)]
    global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="graphrewrite_global_step",
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    all_vars = used + new_vars + [global_step]
    root.variables = all_vars
    root.trainable_variables = [v for v in all_vars if v.trainable]
    root.non_trainable_variables = [v for v in all_vars if not v.trainable]
    root.regularization_losses = list(model.regularization_losses)
    root.global_step = global_step
    root.graphrewrite_sites = [states[s.id] for s in plan.sites]
    root.graphrewrite_resources = list(model.resources)
    update = update_fn_factory(root, plan, transform)
    root.compression_update = update
    signatures["compression_update"] = update.get_concrete_function()
    # A plain tf.saved_model.save(loaded, dir) keeps only this one as a signature (TensorFlow drops
    # the others unless given signatures=loaded.signatures).
    default_key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    root._default_save_signature = signatures[default_key]
    return Built(root=root, signatures=signatures, states=[states[s.id] for s in plan.sites])


def _signature_call(model: LoadedModel, signatures: Mapping[str, Any]) -> Any:
    """``__call__`` for models without one: the default signature, called with keyword tensors."""
    key = "serving_default" if "serving_default" in signatures else sorted(signatures)[0]
    concrete = signatures[key]
    import tensorflow as tf

    return tf.function(lambda *args, **kwargs: concrete(*args, **kwargs))


def factorize_all(model: LoadedModel, plan: RewritePlan, transform: Transform,
                  progress: Callable[[str], None]) -> dict[str, dict[str, np.ndarray]]:
    """Initial factor values of every site, from the weights as they are now (LAPACK)."""
    out = {}
    for i, site in enumerate(plan.sites, 1):
        progress(f"factorizing {i}/{len(plan.sites)}: {site.variable.name} {site.size.m}x{site.size.n}")
        value = model.variables[site.variable.key].numpy()
        matrix = views.apply_numpy(value, site.view).astype(np.float32, copy=False)
        out[site.id] = transform.factorize(matrix, site.size)
        del value, matrix
    return out


__all__ = ["Built", "FunctionBuilder", "Graph", "build", "factorize_all", "make_callable"]
