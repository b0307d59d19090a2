"""The calibration pass's TensorFlow function: what one batch adds to each weight's statistics.

graphrewrite.rewriting.calibration.statistics decides which weights get which statistic and sums the batches;
this module builds the ``tf.function`` that runs a pruned copy of the signature (replay.Pruned) on
one batch and reduces, inside the graph, each weight's rows ``x`` (``y = x @ W``: a convolution's
im2col patches, an Einsum's contracted axes) to:

* ``X^T X``, or the rows themselves where the whole pass sees no more rows than the weight has
  features (``_statistic``);
* for an embedding lookup, the lookup count of each table row (the diagonal of its one-hot Gram);
* given the op's outputs ``y`` (a weight with fewer outputs than inputs), ``[Y^T Y, sum ||x_r||^2]``
  over every row, with no im2col patches formed (``_output_gram``);
* in an error-feedback pass, ``[X^T X, X~^T X~, X~^T X]`` with ``X~`` the rows of a second copy of
  the graph whose replaced weights read their compressed values (``_paired``);
* for a While loop's weights, the Gram and row count the rewritten loop sums itself
  (loops.gram_loop).

Convolutions keep a seeded sample of at most ``cap`` rows a batch, their patches formed a chunk of
examples at a time, at most PATCH_FLOATS values at once (``_rows``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite import views
from graphrewrite.rewriting import loops
from graphrewrite.rewriting.calibration import replay
from graphrewrite.rewriting.graph import Edge
from graphrewrite.rewriting.match import Use
from graphrewrite.rewriting.model import FunctionIR, LoadedModel
from graphrewrite.rewriting.ops import ADAPTERS, Gather

PATCH_FLOATS = 1 << 24  # 64 MiB of im2col patches at most at once


def lookup(op: str) -> bool:
    """Whether ``op`` is an embedding lookup, whose rows are one-hot (their Gram is diagonal)."""
    return op in Gather.op_types


def rows_function(fir: FunctionIR, model: LoadedModel, uses: Sequence[Use], dtypes: Sequence[Any],
                   shapes: Sequence[tuple[int, ...]], caps: Sequence[int], examples: int,
                   replaced: Mapping[str, np.ndarray] | None = None, narrow: Sequence[bool] | None = None,
                   most: int | None = None) -> Any:
    """``run(batch_number, *inputs)`` -> ``(values, counts, as_rows)``: for each use, what one
    batch adds to its statistics (``_statistic``), the number of rows (-1 where a use has none),
    and whether the value is the rows themselves (``narrow``: the uses whose value is an output Gram,
    ``_statistic``; ``most``: the most examples a batch has). With ``replaced``, each value is the stack
    ``[X^T X, X~^T X~, X~^T X]`` of the rows ``X`` of the model and ``X~`` of a second copy of the
    pruned graph whose reads of the ``replaced`` variables read those values instead."""
    import tensorflow as tf

    holders = {key: tf.Variable(tf.cast(value, model.variables[key].dtype), trainable=False)
               for key, value in (replaced or {}).items()}
    graph = fir.graph
    # a loop's weights: the loop sums their Grams itself (loops.gram_loop); the tensors to take
    # are its Gram and row-count outputs, named like an activation
    rewritten, functions, loop_outputs = [], [], {}
    for name in sorted({u.op for u in uses if graph[u.op].op in loops.LOOP_OPS}):
        weights = {u.operand: (loops.loop_weight(graph, graph[name], u.operand, model.infos[u.variable].dtype), u.m)
                   for u in uses if u.op == name}
        nodes, library, indices = loops.gram_loop(graph, graph[name], weights)
        rewritten += nodes
        functions += library
        loop_outputs.update({(name, pos): (Edge(name, g, False), Edge(name, r, False)) for pos, (g, r) in indices.items()})
    activations = [loop_outputs[(u.op, u.operand)][0] if (u.op, u.operand) in loop_outputs else
                   graph[u.op].data_inputs[ADAPTERS[graph[u.op].op].activation_position(u.operand)] for u in uses]
    outputs = [Edge(u.op, 0, False) if wide else None for u, wide in zip(uses, narrow or [False] * len(uses))]
    pruned = replay.Pruned(fir, model, sorted({e.tensor for e in activations} | {e.tensor for e in outputs if e}
                                              | {rows.tensor for _, rows in loop_outputs.values()}),
                           rewritten, functions)
    specs = [tf.TensorSpec([], tf.int32)] + [tf.TensorSpec([None, *shape[1:]], dtype)
                                             for shape, dtype in zip(shapes, dtypes)]

    @tf.function(input_signature=specs, autograph=False)
    def run(number: Any, *inputs: Any) -> Any:
        feeds = pruned.feeds(inputs)
        tensors = pruned.run(feeds, name="calib")
        if replaced is None:
            out = [(tensors[edge.tensor], tf.cast(tf.round(tensors[loop_outputs[(use.op, use.operand)][1].tensor]),
                                                  tf.int64), False) if (use.op, use.operand) in loop_outputs else
                   _statistic(fir, model, use, tensors[edge.tensor], cap, tf.stack([number, i]), examples,
                              tensors[out.tensor] if out else None, most)
                   for i, (use, edge, cap, out) in enumerate(zip(uses, activations, caps, outputs))]
        else:
            compressed = pruned.run(feeds, holders, name="calib_compressed")
            out = [_paired(fir, model, use, tensors[edge.tensor], compressed[edge.tensor], cap, tf.stack([number, i]),
                           most)
                   for i, (use, edge, cap) in enumerate(zip(uses, activations, caps))]
        return [value for value, _, _ in out], tf.stack([c for _, c, _ in out]), tf.constant([r for *_, r in out])

    return run


def _statistic(fir: FunctionIR, model: LoadedModel, use: Use, x: Any, cap: int, seed: Any,
               examples: int, y: Any = None, most: int | None = None) -> tuple[Any, Any, bool]:
    """``(value, rows, as_rows)`` of one use in one batch: its rows X where the whole pass will see
    no more rows than the weight has features (as far as the static shapes tell), else ``X^T X``.
    Given the op's output ``y``, the flat ``[Y^T Y, sum of the rows' ||x||^2]`` over all the
    batch's rows instead (an output Gram, n * n + 1 values: ``_output_gram``). ``most``: the most
    examples a batch has (``_rows``)."""
    import tensorflow as tf

    if y is not None:
        return _output_gram(fir.graph[use.op], x, y, use, views.shape_after(model.infos[use.variable].shape, use.chain))
    rows, count = _rows(fir, model, use, x, cap, seed, most)
    adapter = ADAPTERS[fir.graph[use.op].op]
    if rows.shape.rank == 1:  # a lookup's counts
        return rows, count, False
    one = None if not x.shape[1:].is_fully_defined() else adapter.activation_rows(
        fir.graph[use.op], tf.zeros([1, *x.shape[1:]]), use.operand,
        views.shape_after(model.infos[use.variable].shape, use.chain))
    per_example = None if one is None else one.shape[0]
    # a convolution's sample keeps ROWS_PER_FEATURE * m > m rows: it never decides this
    if per_example is not None and examples * per_example <= use.m:
        return rows, count, True
    return tf.matmul(rows, rows, transpose_a=True), count, False


def _paired(fir: FunctionIR, model: LoadedModel, use: Use, x: Any, x_tilde: Any, cap: int,
            seed: Any, most: int | None = None) -> tuple[Any, Any, bool]:
    """``([X^T X, X~^T X~, X~^T X], rows, False)`` of one use in one batch: the rows of the model's
    activation ``x`` and of the replaced model's ``x_tilde``, sampled alike (same seed, same count)."""
    import tensorflow as tf

    rows, count = _rows(fir, model, use, x, cap, seed, most)
    rows_tilde, _ = _rows(fir, model, use, x_tilde, cap, seed, most)
    return tf.stack([tf.matmul(a, b, transpose_a=True) for a, b in
                     ((rows, rows), (rows_tilde, rows_tilde), (rows_tilde, rows))]), count, False


def _rows(fir: FunctionIR, model: LoadedModel, use: Use, x: Any, cap: int, seed: Any,
          most: int | None = None) -> tuple[Any, Any]:
    """``(X, rows)`` of one use's activation ``x`` in one batch (float32).

    A lookup's rows are one-hot: what is returned is their sum, the lookup count of each table row
    (the diagonal of its Gram). Ops with many rows per example (convolutions) keep at most ``cap``
    of a batch's rows, a seeded random subset (``seed``: batch number and use), so that their Gram
    costs at most ``cap m^2`` however many positions the batch has (see ROWS_PER_FEATURE); patches
    are formed a chunk of examples at a time, at most PATCH_FLOATS values at once (in a
    ``tf.while_loop``, unless ``most``, the most examples a batch has, fit in one chunk).
    """
    import tensorflow as tf

    node = fir.graph[use.op]
    if lookup(node.op):
        ids = tf.reshape(tf.cast(x, tf.int32), [-1])
        counts = tf.math.bincount(ids, minlength=use.m, maxlength=use.m, dtype=tf.float32)
        return counts, tf.size(ids, out_type=tf.int64)
    adapter = ADAPTERS[node.op]
    shape = views.shape_after(model.infos[use.variable].shape, use.chain)
    x = tf.cast(x, tf.float32)

    def reduce(part: Any, keep: Any) -> tuple[Any, Any]:
        rows = adapter.activation_rows(node, part, use.operand, shape)
        if rows is None:  # known only with the tensor (a grouped convolution): rows = -1 says so
            return tf.zeros([0, use.m]), tf.constant(-1, tf.int64)
        if keep is not None:  # draws with replacement (no sort): an unbiased estimate all the same
            total = tf.shape(rows)[0]
            rows = tf.cond(total > keep[0], lambda: tf.gather(rows, tf.random.stateless_uniform(
                [keep[0]], seed + [0, keep[1] * 100_003], maxval=total, dtype=tf.int32)), lambda: rows)
        return rows, tf.cast(tf.shape(rows)[0], tf.int64)

    if not adapter.rows_per_example:
        return reduce(x, None)
    chunk = 1
    if x.shape[1:].is_fully_defined():
        positions = int(np.prod(x.shape[1:-1]))  # an upper bound (stride 1, channels last)
        chunk = max(1, PATCH_FLOATS // (positions * use.m))
    batch = tf.shape(x)[0]
    # each chunk keeps its share of the batch's cap, at least one row per example of the chunk
    share = tf.maximum(cap * tf.minimum(chunk, batch) // batch, tf.minimum(chunk, batch))
    if most is not None and chunk >= most:  # one chunk: what the loop's one iteration would draw
        return reduce(x, (share, tf.constant(0)))

    def body(i: Any, rows: Any, count: Any) -> tuple[Any, Any, Any]:
        part, r = reduce(x[i:i + chunk], (share, i))
        return i + chunk, tf.concat([rows, part], 0), tf.where(r < 0, r, count + r)

    _, rows, count = tf.while_loop(lambda i, *_: i < batch, body,
                                   (tf.constant(0), tf.zeros([0, use.m]), tf.constant(0, tf.int64)),
                                   shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, use.m]),
                                                     tf.TensorShape([])))
    return rows, count


def _output_gram(node: Any, x: Any, y: Any, use: Use, shape: tuple[int, ...]) -> tuple[Any, Any, bool]:
    """``([Y^T Y, sum_r ||x_r||^2], rows, False)`` over all of one batch's output rows ``Y`` (``y``
    reshaped to n columns, channels last) and the input rows ``x_r`` that made them, without forming
    those: a convolution's from one channel through its own window (``Conv.patch_energy``), a
    MatMul's or BatchMatMul's the squares of ``x``, whose entries its rows only rearrange. Every
    row, not a sample: a row costs n^2 here against the op's m n, with n < m. Rows -1 for a
    grouped convolution."""
    import tensorflow as tf

    x = tf.cast(x, tf.float32)
    if node.op == "Conv2D":
        energy = ADAPTERS[node.op].patch_energy(node, x, shape)
        if energy is None:
            return tf.zeros([use.n * use.n + 1]), tf.constant(-1, tf.int64), False
        y = tf.transpose(y, [0, 2, 3, 1]) if node.attr("data_format", "NHWC") == "NCHW" else y
    else:
        energy = tf.reduce_sum(tf.square(x))
    rows = tf.reshape(tf.cast(y, tf.float32), [-1, use.n])
    return (tf.concat([tf.reshape(tf.matmul(rows, rows, transpose_a=True), [-1]), [energy]], 0),
            tf.cast(tf.shape(rows)[0], tf.int64), False)


__all__ = ["PATCH_FLOATS", "lookup", "rows_function"]
