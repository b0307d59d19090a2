"""The replacement of one rewritten op inside a rebuilt function (one site's use of its factors).

A site is one weight; each op reading it (a *use*) is replaced by the op on the compressed weight,
blended with the original by alpha. Most ops go through a gated function (graphrewrite.rewriting.blend) that
never pays for the path whose coefficient is zero. Lookups (``GatherV2``/``ResourceGather``) are
blended directly, ``alpha * gather(A, ids) + (1 - alpha) * gather(B, ids) @ C``: both paths cost
only the rows looked up, and TensorFlow's own gather gradients (IndexedSlices) for A and B are
not densified by a cond branch inside the function.

A use may read the site's matrix transposed (a tied embedding: ``gather(W, ids)`` and the LM head's
``x @ W^T``): it computes with ``W_c^T = C^T B^T``, the same factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from graphrewrite import views
from graphrewrite.rewriting import blend
from graphrewrite.rewriting.graph import Node
from graphrewrite.rewriting.ops import ADAPTERS
from graphrewrite.rewriting.plan import SitePlan, Use
from graphrewrite.transforms import Transform


@dataclasses.dataclass
class SiteRuntime:
    """What a rebuilt function needs to emit one site's replacement."""

    plan: SitePlan
    state: Any  # SiteState trackable
    transform: Transform
    gates: dict[Any, Any] = dataclasses.field(default_factory=dict)  # shared by the sites of one build


def transposed(runtime: SiteRuntime, use: Use) -> bool:
    """Whether ``use`` reads the site's matrix transposed (a tied weight's second kind of reader)."""
    return use.view != runtime.plan.view


def site_output(runtime: SiteRuntime, use: Use, node: Node, inputs: list[Any], reads: Mapping[str, Any],
                export: bool = False) -> Any:
    """The replacement of one rewritten op: alpha-gated where the method blends, or (``export``)
    the compressed form alone, which never reads the original weight."""
    import tensorflow as tf

    adapter = ADAPTERS[node.op]
    transform, size, pos = runtime.transform, runtime.plan.size, use.operand
    flip = transposed(runtime, use)
    names = sorted(n for n in reads if n != "__alpha__")
    # The compressed form uses only the weight's shape and dtype (in export mode it is given as a
    # TensorSpec): never its value, which a gated function shared by several sites must not capture.
    weight = inputs[pos]
    if not isinstance(weight, tf.TensorSpec):  # a tensor, or the handle a ResourceGather reads
        weight = weight_spec(runtime, use, node) if weight.dtype == tf.resource else tf.TensorSpec(
            weight.shape, weight.dtype)
    others = [t for i, t in enumerate(inputs) if i != pos]

    def with_weight(xs: Sequence[Any], w: Any) -> list[Any]:
        out = list(xs)
        out.insert(pos, w)
        return out

    def dense(args: Sequence[Any]) -> Any:
        w = args[-1]
        mask = transform.mask(dict(zip(names, args[len(others):-1])), size)
        if mask is not None:
            if w.dtype == tf.resource:
                w = tf.raw_ops.ReadVariableOp(resource=w, dtype=weight.dtype)
            mask = tf.cast(mask, w.dtype)
            w = w * views.invert_tf(tf.transpose(mask) if flip else mask, use.op_steps, w.shape.as_list())
        return adapter.apply(node, with_weight(args[:len(others)], w))

    def compressed(args: Sequence[Any]) -> Any:
        xs, factor_values = list(args[: len(others)]), dict(zip(names, args[len(others):]))
        full = with_weight(xs, weight)
        pair = transform.low_rank(factor_values, size)
        if pair is not None:
            b, c = (tf.cast(t, weight.dtype) for t in pair)
            y = adapter.apply_low_rank(node, full, pos, tf.transpose(c), tf.transpose(b)) if flip else (
                adapter.apply_low_rank(node, full, pos, b, c))
            if y is not None:
                return y
        if not flip:
            y = adapter.apply_matrix_fn(node, full, pos, lambda x: transform.matmul(x, factor_values, size))
            if y is not None:
                return y
        matrix = tf.cast(transform.dense(factor_values, size), weight.dtype)
        w = views.invert_tf(tf.transpose(matrix) if flip else matrix, use.op_steps, weight.shape.as_list())
        return adapter.apply(node, with_weight(xs, w))

    factor_tensors = [reads[name] for name in names]
    if export or not transform.blended:
        return compressed(others + factor_tensors)
    has_mask = type(transform).mask is not Transform.mask
    dense_inputs = others + (factor_tensors if has_mask else []) + [inputs[pos]]
    compressed_inputs = others + factor_tensors
    alpha = reads["__alpha__"]
    if adapter.cheap:
        y_dense = dense(dense_inputs)
        return (tf.cast(alpha, y_dense.dtype) * y_dense
                + tf.cast(1.0 - alpha, y_dense.dtype) * compressed(compressed_inputs))
    # Sites that compute the same thing share one gated function (a nested tf.function): its custom
    # gradient is then traced once for all of them when the model is saved, not once per site.
    key = (id(transform), node.op, _attr_key(node), pos, use.op_steps, flip, size.structure_key(), tuple(names),
           has_mask, str(weight.shape), weight.dtype.name, len(dense_inputs))
    gate = runtime.gates.get(key)
    if gate is None:
        n_dense = len(dense_inputs)

        def gate_body(*args: Any) -> Any:
            return blend.gated(dense, compressed, args[:n_dense], args[n_dense:-1], args[-1])

        gate = runtime.gates[key] = tf.function(gate_body, autograph=False)
    return gate(*dense_inputs, *compressed_inputs, alpha)


def _attr_key(node: Node) -> tuple[tuple[str, bytes], ...]:
    """The attributes that define what an op computes (not its device, class or gradient type)."""
    return tuple(sorted((k, v.SerializeToString(deterministic=True))
                        for k, v in node.proto.attr.items() if not k.startswith("_")))


def weight_spec(runtime: SiteRuntime, use: Use, node: Node) -> Any:
    """Shape and dtype of a rewritten op's weight operand, without reading the weight."""
    import tensorflow as tf

    shape = views.shape_after(runtime.plan.variable.shape, use.chain)
    return tf.TensorSpec(shape, tf.as_dtype(ADAPTERS[node.op].weight_dtype(node)))
