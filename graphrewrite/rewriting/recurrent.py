"""The While loops of recurrent sites, rebuilt inside the rewritten functions (as graphrewrite.rewriting.sites
does for single ops).

A recurrent site's use is a While loop input that carries the weight's handle
(graphrewrite.rewriting.loops). The loop is rebuilt with that input replaced, computed outside the loop:

    rewritten model:  W = alpha * A + (1 - alpha) * W_c   (alpha-gated, graphrewrite.rewriting.blend: A bit
                      for bit at alpha = 1, W_c = B @ C formed once per call, not per step)
    exported model:   B and C as loop invariants; the body computes (x @ B) @ C

Gradients reach A, the factors and every other weight through TensorFlow's While gradient
(float loop invariants are accumulated over the steps), and the loop still compiles with XLA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from graphrewrite.rewriting import blend, loops
from graphrewrite.rewriting.graph import Graph, Node
from graphrewrite.rewriting.plan import Use
from graphrewrite.rewriting.sites import SiteRuntime, transposed
from graphrewrite.transforms import Transform


def loop_outputs(bound: Sequence[tuple[SiteRuntime, Use]], graph: Graph, node: Node, data: Sequence[Any],
                 site_reads: Mapping[str, Mapping[str, Any]], variables: Mapping[str, Any],
                 export: bool) -> list[Any]:
    """The outputs of While ``node`` rebuilt with every site's loop input replaced.

    Args:
      bound: the sites this loop reads, with their uses (one loop input each).
      graph: the flat graph holding ``node`` and its body.
      data: the tensors of the loop's data inputs (None where a compressed weight's handle was).
      site_reads: per site id, its factor reads (and ``__alpha__`` unless ``export``).
      variables: key -> the model's variables (the original weights A).
      export: pass B and C into the loop (when the method has them) instead of the blended weight.
    """
    import tensorflow as tf

    inputs, feeds = {}, {}
    for runtime, use in bound:
        tensors = _loop_tensors(runtime, use, site_reads[runtime.plan.id], variables, export)
        inputs[use.operand] = loops.LoopInput(use.operand, runtime.plan.variable.dtype,
                                              tuple(tuple(t.shape.as_list()) for t in tensors))
        feeds[f"graphrewrite_input_{use.operand}:0"] = tensors[0]
        if len(tensors) == 2:
            feeds[f"graphrewrite_c_{use.operand}:0"] = tensors[1]
    proto, names = loops.rewrite_loop(graph, node, inputs)
    input_map = {name: feeds[name] if name in feeds else data[i] for i, name in enumerate(names)}
    [op] = tf.graph_util.import_graph_def(proto, input_map=input_map, return_elements=[node.name],
                                          name="recurrent")
    return list(op.outputs)


def _loop_tensors(runtime: SiteRuntime, use: Use, reads: Mapping[str, Any], variables: Mapping[str, Any],
                  export: bool) -> list[Any]:
    """What replaces the weight's handle: ``[W]`` (blended, or the compressed matrix), or ``[B, C]``."""
    import tensorflow as tf

    transform, size = runtime.transform, runtime.plan.size
    dtype = tf.as_dtype(runtime.plan.variable.dtype)
    names = sorted(n for n in reads if n != "__alpha__")
    factors = [reads[n] for n in names]
    flip = transposed(runtime, use)  # the site's matrix is the transpose of the loop's weight

    def compressed(args: Sequence[Any]) -> Any:
        matrix = tf.cast(transform.dense(dict(zip(names, args)), size), dtype)
        return tf.transpose(matrix) if flip else matrix

    if export:
        pair = transform.low_rank(dict(zip(names, factors)), size)
        if pair is not None:
            b, c = (tf.cast(t, dtype) for t in pair)
            return [tf.transpose(c), tf.transpose(b)] if flip else [b, c]
    if export or not transform.blended:
        return [compressed(factors)]
    has_mask = type(transform).mask is not Transform.mask

    def dense(args: Sequence[Any]) -> Any:
        weight = args[-1]
        mask = transform.mask(dict(zip(names, args[:-1])), size) if has_mask else None
        if mask is None:
            return weight
        mask = tf.cast(mask, dtype)
        return weight * (tf.transpose(mask) if flip else mask)

    weight = tf.identity(variables[runtime.plan.variable.key])
    return [blend.gated(dense, compressed, (factors if has_mask else []) + [weight], factors, reads["__alpha__"])]
