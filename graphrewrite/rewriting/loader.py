"""Loads a SavedModel into the flat intermediate form (graphrewrite.rewriting.model).

Two kinds of SavedModel exist:

* object-based (TF2: Keras 3 ``model.export()``, tf.keras/tf_keras, ``tf.saved_model.save`` of a
  ``tf.Module``): loaded with ``tf.saved_model.load``; each signature and each variant of each
  exported tf.function is inlined by Grappler into one flat GraphDef whose weights are still reads of
  captured resource handles (never constants: no 2 GB protobuf, every weight stays trainable).
* TF1 (``tf.compat.v1.saved_model.Builder``): the MetaGraph is read as a protobuf, each signature's
  subgraph is extracted, and its ``VariableV2``/``VarHandleOp`` weights become new resource variables
  holding the checkpoint's values. No TF1 init op is run.

This module and graphrewrite.rewriting.build are the only ones that touch TensorFlow internals.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from graphrewrite.errors import InputModelError, first_line
from graphrewrite.rewriting.graph import Graph
from graphrewrite.rewriting.model import (
    NO_DEFAULT,
    Entry,
    FunctionIR,
    LoadedModel,
    VariableInfo,
    Variant,
)
from graphrewrite.rewriting.scan import read_saved_model_proto

# tf.keras internals that duplicate __call__; rebuilding them would only bloat the output.
_SKIPPED_FUNCTIONS = frozenset({
    "call_and_return_all_conditional_losses", "call_and_return_conditional_losses",
    "_default_save_signature",
})
_TF1_VARIABLE_OPS = frozenset({"VariableV2", "Variable"})
_TABLE_OPS = ("HashTable", "MutableHashTable", "LookupTable", "InitializeTable")


def inline_function(concrete_function: Any) -> Any:
    """Grappler function inlining of a ConcreteFunction into one flat GraphDef.

    Control flow (While/If) is kept functional (``lower_control_flow=False``) so that gradients and
    XLA keep working; its bodies stay in the GraphDef's function library. This wraps a private
    TensorFlow helper, so it is the one place to fix when TensorFlow moves it.

    To keep it functional the helper marks every While and If ``_lower_using_switch_merge: False``;
    that attribute also tells TensorFlow's runtime whether to lower the op to Switch/Merge when it
    runs, which the model's own tf.function had set (True outside XLA). Left False, every loop and
    conditional of the rewritten model ran its bodies as separate functions, which oneDNN rounds
    differently: the rewritten LSTM/GRU loops were off by up to 2e-6 at alpha = 1. So each op gets
    back the value it had before inlining (``_lowering``, ``_restore_lowering``).
    """
    from tensorflow.python.framework import convert_to_constants

    before = _lowering(concrete_function.graph.as_graph_def())
    graph_def = convert_to_constants._run_inline_graph_optimization(  # noqa: SLF001
        concrete_function, lower_control_flow=False, aggressive_inlining=False
    )
    _restore_lowering(graph_def, before)
    return graph_def


_LOWERING = "_lower_using_switch_merge"
_CONTROL_FLOW = frozenset({"While", "StatelessWhile", "If", "StatelessIf"})
_BRANCHES = ("body", "cond", "then_branch", "else_branch")


def _control_flow_nodes(graph_def: Any) -> Any:
    for node in graph_def.node:
        if node.op in _CONTROL_FLOW:
            yield node
    for function in graph_def.library.function:
        for node in function.node_def:
            if node.op in _CONTROL_FLOW:
                yield node


def _branches(node: Any) -> tuple[str, ...]:
    """The functions a While or If runs: each traced loop or conditional has its own, and inlining
    renames the op but not them, so they identify it before and after."""
    return tuple(node.attr[name].func.name if name in node.attr else "" for name in _BRANCHES)


def _lowering(graph_def: Any) -> dict[tuple[str, ...], bool | None]:
    """Each control-flow op's ``_lower_using_switch_merge`` (None: not set), by ``_branches``."""
    return {_branches(node): node.attr[_LOWERING].b if _LOWERING in node.attr else None
            for node in _control_flow_nodes(graph_def)}


def _restore_lowering(graph_def: Any, before: dict[tuple[str, ...], bool | None]) -> None:
    """Gives every control-flow op of ``graph_def`` its ``_lower_using_switch_merge`` of ``before``
    (an op not found there stays functional)."""
    for node in _control_flow_nodes(graph_def):
        key = _branches(node)
        if key not in before:
            continue
        if before[key] is None:
            del node.attr[_LOWERING]
        else:
            node.attr[_LOWERING].b = before[key]


def load(path: str, tags: Sequence[str], object_based: bool) -> LoadedModel:
    """Loads ``path`` (already scanned) into the intermediate form."""
    if object_based:
        return _load_object_based(path, tags)
    return _load_tf1(path, tags)


REUSE_BYTES = 1 << 30
_reused: dict[str, Any] = {}  # the worker's last model: "key", "model", "values" (``load_reused``)


def load_reused(path: str, tags: Sequence[str], object_based: bool) -> LoadedModel:
    """``load`` for the sandbox's jobs, which one process (the sandbox worker) runs one after
    another on one model: compress with calibration sends it the calibration pass, four error-
    feedback passes, the model check's and distillation, and a ResNet50 takes 2.3 s to load for a
    pass of about 9 s. So the model loaded last is kept and handed out again for the same path,
    tags and files (every file's size and modification time under ``path``), with each variable
    set back to the value it had when loaded: the jobs only read the LoadedModel (their functions
    are copies), but the model's own ops, run by them, may assign its variables. A model whose
    variables take more than REUSE_BYTES is loaded anew each time (the kept values would double
    its memory), as is any model after a job failed (the sandbox starts a fresh worker then)."""
    key = (os.path.realpath(path), tuple(tags), object_based, _files(path))
    if _reused.get("key") == key:
        model = _reused["model"]
        for name, value in _reused["values"].items():
            model.variables[name].assign(value)
        return model
    _reused.clear()
    model = load(path, tags, object_based)
    values = {name: v.numpy() for name, v in model.variables.items()}
    if sum(value.nbytes for value in values.values()) <= REUSE_BYTES:
        _reused.update(key=key, model=model, values=values)
    return model


def _files(path: str) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``path``: its path, size and modification time (ns)."""
    out = []
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.stat(os.path.join(folder, name))
            out.append((os.path.relpath(os.path.join(folder, name), path), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(out))


def _clean_name(name: str) -> str:
    return name[:-2] if name.endswith(":0") else name


class _VariableTable:
    """Assigns stable keys to variables in order of first use."""

    def __init__(self) -> None:
        self.variables: dict[str, Any] = {}
        self.infos: dict[str, VariableInfo] = {}
        self._by_id: dict[int, str] = {}

    def key_of(self, variable: Any, name: str | None = None, trainable: bool | None = None) -> str:
        ident = id(variable)
        if ident in self._by_id:
            return self._by_id[ident]
        key = f"v{len(self.variables)}"
        self._by_id[ident] = key
        self.variables[key] = variable
        self.infos[key] = VariableInfo(
            key=key,
            name=name or _clean_name(variable.name),
            shape=tuple(int(d) for d in variable.shape),
            dtype=variable.dtype.name,
            trainable=bool(variable.trainable if trainable is None else trainable),
        )
        return key


def _label_reads(graph: Graph, handles: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Extends handle labels through Identity chains and labels the ReadVariableOps of them."""
    handles = dict(handles)
    stack = list(handles)
    while stack:
        name = stack.pop()
        for consumer, _ in graph.data_consumers(name):
            if consumer.op == "Identity" and consumer.name not in handles:
                handles[consumer.name] = handles[name]
                stack.append(consumer.name)
    reads = {}
    for name, key in handles.items():
        for consumer, pos in graph.data_consumers(name):
            if consumer.op == "ReadVariableOp" and pos == 0:
                reads[consumer.name] = key
    return handles, reads


# ----------------------------------------------------------------------------------------------
# Object-based (TF2) SavedModels
# ----------------------------------------------------------------------------------------------


def _load_object_based(path: str, tags: Sequence[str]) -> LoadedModel:
    import tensorflow as tf

    try:
        obj = tf.saved_model.load(path, tags=list(tags))
    except Exception as exc:  # noqa: BLE001 - whatever a damaged model makes TensorFlow raise
        raise InputModelError(f"{path}: cannot load the SavedModel ({first_line(exc)})") from None
    table = _VariableTable()
    captured: list[Any] = []
    resource_owners = _resource_owners(obj)
    needed_owners: dict[int, Any] = {}
    functions: dict[str, FunctionIR] = {}
    entries: list[Entry] = []

    def add(key: str, concrete: Any) -> Variant:
        functions[key] = _function_ir(key, concrete, table, captured, resource_owners, needed_owners)
        return Variant(key, concrete.structured_input_signature, concrete.structured_outputs)

    signature_functions = {}
    signatures = getattr(obj, "signatures", None) or {}
    for sig_key in sorted(signatures.keys()):
        concrete = signatures[sig_key]
        signature_functions[sig_key] = concrete
        entries.append(Entry("signature", sig_key, [add(f"signature:{sig_key}", concrete)]))
    for name, child in sorted(_exported_functions(obj).items()):
        variants = [add(f"function:{name}#{i}", cf) for i, cf in enumerate(child.concrete_functions)]
        if variants:
            entries.append(Entry("function", name, variants, _parameters(child)))
    if not entries:
        raise InputModelError(f"{path}: the SavedModel exports no signature and no function")
    reg_losses = list(getattr(obj, "regularization_losses", []) or [])
    return LoadedModel(
        path=path, kind="tf2", variables=table.variables, infos=table.infos, functions=functions,
        entries=entries, captured=captured, resources=list(needed_owners.values()),
        regularization_losses=reg_losses, source=obj, signature_functions=signature_functions,
    )


def _exported_functions(obj: Any) -> dict[str, Any]:
    import tensorflow as tf

    found = {}
    for name, child in obj._trackable_children(save_type="savedmodel").items():  # noqa: SLF001
        if not isinstance(child, tf.types.experimental.GenericFunction):
            continue
        if name in _SKIPPED_FUNCTIONS or (name.startswith("_") and name != "__call__"):
            continue
        found[name] = child
    return found


def _parameters(function: Any) -> list[tuple[str, Any]] | None:
    """The (name, default) parameters of a restored tf.function, or None if not recorded."""
    spec = getattr(getattr(function, "function_spec", None), "fullargspec", None)
    if spec is None or spec.varargs or spec.varkw or spec.kwonlyargs:
        return None
    args = [a for a in spec.args if a != "self"]
    defaults = list(spec.defaults or ())
    required = len(args) - len(defaults)
    return [(name, NO_DEFAULT if i < required else defaults[i - required]) for i, name in enumerate(args)]


def _resource_owners(obj: Any) -> dict[int, Any]:
    """id(resource handle) -> trackable owning it, for captured non-variable resources (tables)."""
    from tensorflow.python.checkpoint import graph_view, util

    owners = {}
    for trackable in util.list_objects(graph_view.ObjectGraphView(obj)):
        handle = getattr(trackable, "_resource_handle", None)
        if handle is not None and not hasattr(trackable, "assign"):
            owners[id(handle)] = trackable
    return owners


def _function_ir(key: str, concrete: Any, table: _VariableTable, captured: list[Any],
                 owners: dict[int, Any], needed: dict[int, Any]) -> FunctionIR:
    import tensorflow as tf

    graph_def = inline_function(concrete)
    graph = Graph(graph_def)
    by_handle = {id(v.handle): v for v in concrete.variables}
    handles: dict[str, str] = {}
    captures: dict[str, int] = {}
    for external, internal in concrete.graph.captures:
        node = internal.op.name
        variable = by_handle.get(id(external))
        if variable is not None:
            handles[node] = table.key_of(variable)
            continue
        if external.dtype == tf.resource and id(external) in owners:
            needed[id(external)] = owners[id(external)]
        captures[node] = len(captured)
        captured.append(external)
    handles, reads = _label_reads(graph, handles)
    n_user = len(concrete.inputs) - len(concrete.captured_inputs)
    return FunctionIR(
        key=key, graph=graph,
        inputs=[t.name for t in concrete.inputs[:n_user]],
        outputs=[t.name for t in concrete.outputs],
        handles=handles, reads=reads, captures=captures,
    )


# ----------------------------------------------------------------------------------------------
# TF1 SavedModels
# ----------------------------------------------------------------------------------------------


def _load_tf1(path: str, tags: Sequence[str]) -> LoadedModel:
    import tensorflow as tf

    proto = read_saved_model_proto(path)
    wanted = set(tags)
    meta = next((mg for mg in proto.meta_graphs if set(mg.meta_info_def.tags) == wanted), None)
    if meta is None:
        raise InputModelError(f"{path}: no MetaGraph with tag set {','.join(sorted(wanted))!r}")
    if not meta.signature_def:
        raise InputModelError(f"{path}: the TF1 SavedModel has no signature")
    try:
        reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint raises many kinds of errors
        raise InputModelError(f"{path}: cannot read the variables checkpoint ({first_line(exc)})") from None
    trainable = tf1_trainable_names(meta)
    graph_def = meta.graph_def
    var_nodes = {n.name: n for n in graph_def.node if n.op in _TF1_VARIABLE_OPS or n.op == "VarHandleOp"}
    table = _VariableTable()
    functions: dict[str, FunctionIR] = {}
    entries: list[Entry] = []
    made: dict[str, Any] = {}
    for sig_key in sorted(meta.signature_def.keys()):
        sig = meta.signature_def[sig_key]
        in_keys, out_keys = sorted(sig.inputs), sorted(sig.outputs)
        outputs = [sig.outputs[k].name for k in out_keys]
        if not outputs or any(not name for name in outputs):
            raise InputModelError(f"{path}: signature {sig_key!r} has an output that is not a dense tensor")
        sub = tf.compat.v1.graph_util.extract_sub_graph(graph_def, sorted({o.split(":")[0] for o in outputs}))
        graph = Graph(sub)
        if any(node.op.startswith(_TABLE_OPS) for node in graph):
            raise InputModelError(f"{path}: TF1 models with lookup tables are not supported")
        handles: dict[str, str] = {}
        reads: dict[str, str] = {}
        for node in graph:
            if node.name not in var_nodes:
                continue
            if node.name not in made:
                try:
                    value = reader.get_tensor(node.name)
                except Exception:  # noqa: BLE001 - missing key or damaged data
                    raise InputModelError(
                        f"{path}: variable {node.name!r} is missing from the checkpoint") from None
                made[node.name] = tf.Variable(value, name=node.name, trainable=node.name in trainable)
            key = table.key_of(made[node.name], name=node.name, trainable=node.name in trainable)
            if node.op == "VarHandleOp":
                handles[node.name] = key
            else:
                reads[node.name] = key
        handles, more_reads = _label_reads(graph, handles)
        reads.update(more_reads)
        fkey = f"signature:{sig_key}"
        functions[fkey] = FunctionIR(
            key=fkey, graph=graph, inputs=[sig.inputs[k].name for k in in_keys], outputs=outputs,
            handles=handles, reads=reads, captures={},
        )
        in_specs = {k: _spec(sig.inputs[k], k) for k in in_keys}
        out_specs = {k: _spec(sig.outputs[k], k) for k in out_keys}
        entries.append(Entry("signature", sig_key, [Variant(fkey, ((), in_specs), out_specs)]))
    # The original model, loaded only to compute reference outputs for verification.
    try:
        source = tf.saved_model.load(path, tags=list(tags))
    except Exception as exc:  # noqa: BLE001
        raise InputModelError(f"{path}: cannot load the SavedModel ({first_line(exc)})") from None
    return LoadedModel(
        path=path, kind="tf1", variables=table.variables, infos=table.infos, functions=functions,
        entries=entries, captured=[], resources=[], regularization_losses=[], source=source,
        signature_functions={k: source.signatures[k] for k in source.signatures.keys()},
    )


def tf1_trainable_names(meta: Any) -> set[str]:
    from tensorflow.core.framework import variable_pb2

    names = set()
    for raw in meta.collection_def["trainable_variables"].bytes_list.value:
        var = variable_pb2.VariableDef()
        var.ParseFromString(raw)
        names.add(var.variable_name.split(":")[0])
    return names


def _spec(info: Any, name: str) -> Any:
    import tensorflow as tf

    shape = None if info.tensor_shape.unknown_rank else [
        None if d.size < 0 else d.size for d in info.tensor_shape.dim]
    return tf.TensorSpec(shape, tf.as_dtype(info.dtype), name=name)
