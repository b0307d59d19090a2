"""The alpha-gated op: values and gradients of the blend, including under XLA."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from graphrewrite.rewriting import blend

rng = np.random.default_rng(0)
X = tf.constant(rng.standard_normal((6, 10)).astype(np.float32))
A = tf.constant(rng.standard_normal((10, 8)).astype(np.float32))
B = tf.constant(rng.standard_normal((10, 3)).astype(np.float32))
C = tf.constant(rng.standard_normal((3, 8)).astype(np.float32))


def gated(x, a, b, c, alpha):
    return blend.gated(lambda t: tf.matmul(t[0], t[1]), lambda t: tf.matmul(tf.matmul(t[0], t[1]), t[2]),
                       [x, a], [x, b, c], alpha)


def reference(x, a, b, c, alpha):
    return tf.matmul(x, alpha * a + (1 - alpha) * tf.matmul(b, c))


@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.25, 0.0])
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_value_and_gradients_equal_the_blended_weight(alpha, mode):
    def both(x, a, b, c, al):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, a, b, c])
            y1 = gated(x, a, b, c, al)
            y2 = reference(x, a, b, c, al)
            l1 = tf.reduce_sum(tf.sin(y1))
            l2 = tf.reduce_sum(tf.sin(y2))
        return [y1, y2, *tape.gradient(l1, [x, a, b, c]), *tape.gradient(l2, [x, a, b, c])]

    run = {"eager": both, "function": tf.function(both), "xla": tf.function(both, jit_compile=True)}[mode]
    out = [t.numpy() for t in run(X, A, B, C, tf.constant(alpha))]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-4)
    for got, want in zip(out[2:6], out[6:10]):
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_alpha_one_is_the_original_op_bit_for_bit():
    np.testing.assert_array_equal(gated(X, A, B, C, tf.constant(1.0)).numpy(), tf.matmul(X, A).numpy())


def test_factors_get_zero_not_none_gradients_at_alpha_one():
    with tf.GradientTape() as tape:
        tape.watch([B, C])
        loss = tf.reduce_sum(gated(X, A, B, C, tf.constant(1.0)))
    gb, gc = tape.gradient(loss, [B, C])
    assert gb is not None and gc is not None
    assert not np.any(gb.numpy()) and not np.any(gc.numpy())


def test_compressed_path_skips_the_dense_op():
    @tf.function
    def at_zero(x, a, b, c):
        return gated(x, a, b, c, tf.constant(0.0))

    graph = at_zero.get_concrete_function(X, A, B, C).graph
    # The dense matmul only lives in a cond branch that alpha = 0 does not take.
    top_level = [op.type for op in graph.get_operations()]
    assert "MatMul" not in top_level
