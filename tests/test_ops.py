"""Op adapters: matrix views and the cheap low-rank forms equal the original op numerically."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from graphrewrite import views
from graphrewrite.rewriting.graph import Graph
from graphrewrite.rewriting.ops import ADAPTERS, OperandView


def node_of(fn, *values):
    """The single weight-bearing node of ``fn`` traced on ``values`` (as graphrewrite sees it)."""
    specs = [tf.TensorSpec(v.shape, tf.float32) for v in values]
    graph = Graph(tf.function(fn).get_concrete_function(*specs).graph.as_graph_def())
    return next(n for n in graph if n.op in ADAPTERS)


rng = np.random.default_rng(0)


def arr(*shape):
    return rng.standard_normal(shape).astype(np.float32)


CASES = {
    # name: (fn(x, w), x, w, weight position)
    "matmul": (lambda x, w: tf.matmul(x, w), arr(5, 12), arr(12, 7), 1),
    "matmul_tb": (lambda x, w: tf.matmul(x, w, transpose_b=True), arr(5, 12), arr(7, 12), 1),
    "matmul_ta": (lambda x, w: tf.matmul(x, w, transpose_a=True), arr(12, 5), arr(12, 7), 1),
    "matmul_weight_first": (lambda w, x: tf.matmul(w, x), arr(7, 12), arr(12, 5), 0),
    "matmul_weight_first_t": (lambda w, x: tf.matmul(w, x, transpose_a=True, transpose_b=True),
                              arr(12, 7), arr(5, 12), 0),
    "bmm": (lambda x, w: tf.matmul(x, w), arr(2, 5, 12), arr(12, 7), 1),
    "bmm_adj": (lambda x, w: tf.matmul(x, w, adjoint_a=True, adjoint_b=True), arr(2, 12, 5), arr(7, 12), 1),
    "bmm_weight_first": (lambda w, x: tf.matmul(w, x), arr(7, 12), arr(3, 12, 5), 0),
    "conv_same": (lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"), arr(2, 9, 9, 3), arr(3, 3, 3, 10), 1),
    "conv_strided_dilated": (lambda x, w: tf.nn.conv2d(x, w, 2, "VALID", dilations=1),
                             arr(2, 11, 11, 4), arr(3, 2, 4, 6), 1),
    "conv_dilated": (lambda x, w: tf.nn.conv2d(x, w, 1, "VALID", dilations=2), arr(1, 9, 9, 2),
                     arr(3, 3, 2, 5), 1),
    "einsum_dense": (lambda x, w: tf.einsum("abc,cde->abde", x, w), arr(2, 4, 6), arr(6, 3, 5), 1),
    "einsum_transposed_weight": (lambda x, w: tf.einsum("bi,ohi->boh", x, w), arr(3, 8), arr(5, 2, 8), 1),
    "einsum_weight_first": (lambda w, x: tf.einsum("io,bi->bo", w, x), arr(8, 5), arr(3, 8), 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_view_and_low_rank_forms_equal_the_op(name):
    fn, a, b, pos = CASES[name]
    node = node_of(fn, a, b)
    adapter = ADAPTERS[node.op]
    w = (a, b)[pos]
    inputs = [tf.constant(a), tf.constant(b)]
    expected = fn(*inputs).numpy()
    np.testing.assert_allclose(adapter.apply(node, inputs).numpy(), expected, rtol=1e-5, atol=1e-5)

    view = adapter.describe(node, pos, w.shape)
    assert isinstance(view, OperandView)
    matrix = views.apply_numpy(w, view.steps)
    assert matrix.shape == (view.m, view.n)
    np.testing.assert_array_equal(views.invert_tf(tf.constant(matrix), view.steps, w.shape).numpy(), w)

    # Exact factorisation B @ C == W's matrix: the two-step form must reproduce the op.
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    bm = tf.constant((u * np.sqrt(s)).astype(np.float32))
    cm = tf.constant((np.sqrt(s)[:, None] * vt).astype(np.float32))
    got = adapter.apply_low_rank(node, inputs, pos, bm, cm)
    assert got is not None
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)

    via_fn = adapter.apply_matrix_fn(node, inputs, pos,
                                     lambda x: tf.tensordot(x, tf.constant(matrix), axes=[[-1], [0]]))
    if via_fn is not None:
        np.testing.assert_allclose(via_fn.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_low_rank_conv_is_two_convolutions():
    fn, a, b, _ = CASES["conv_same"]
    node = node_of(fn, a, b)
    k = 4

    @tf.function
    def split(x, w):
        return ADAPTERS["Conv2D"].apply_low_rank(node, [x, w], 1, tf.zeros([27, k]), tf.zeros([k, 10]))

    graph = split.get_concrete_function(tf.TensorSpec(a.shape), tf.TensorSpec(b.shape)).graph
    convs = [op for op in graph.get_operations() if op.type == "Conv2D"]
    assert len(convs) == 2
    assert convs[0].inputs[1].shape.as_list() == [3, 3, 3, k]
    assert convs[1].inputs[1].shape.as_list() == [1, 1, k, 10]


@pytest.mark.parametrize("fn, a, b, reason", [
    (lambda x, w: tf.einsum("bhi,hio->bho", x, w), arr(2, 3, 4), arr(3, 4, 5), "batch or summed-out axes"),
    (lambda x, w: tf.einsum("...i,io->...o", x, w), arr(2, 4), arr(4, 5), "no '...'"),
    (lambda x, w: tf.matmul(x, w), arr(2, 3, 4), arr(2, 4, 5), "batch dimensions"),
])
def test_refusals_say_why(fn, a, b, reason):
    node = node_of(fn, a, b)
    described = ADAPTERS[node.op].describe(node, 1, b.shape)
    assert isinstance(described, str) and reason in described
