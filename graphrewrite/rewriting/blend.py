"""The alpha-gated replacement of one weight-bearing op, built inside the saved functions.

For an op ``y = op(x, A)`` and a compressed weight ``W_c`` (from the method's factors):

    alpha == 1:     y = op(x, A)                                (the original op, bit for bit)
    alpha == 0:     y = op(x, W_c)  computed the method's cheap way, e.g. (x @ B) @ C
    otherwise:      y = alpha * op(x, A) + (1 - alpha) * op(x, W_c)

which equals ``op(x, alpha * A + (1 - alpha) * W_c)`` because every rewritten op is linear in its
weight, but never pays for the path whose coefficient is zero.

The switch is a ``tf.cond`` with an explicit gradient (``tf.custom_gradient``): TensorFlow's own
gradient of a *restored* cond wraps branch intermediates in Optionals, which XLA cannot compile, so
a reloaded model could not be trained under ``jit_compile=True``. The explicit gradient is again a
cond on alpha; each branch differentiates its own path with a tape, so it never needs forward
intermediates, and factors receive zeros (not None) while alpha is 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Path = Callable[[Sequence[Any]], Any]


def _grads(path: Path, xs: Sequence[Any], dy: Any) -> list[Any]:
    import tensorflow as tf

    floats = [i for i, x in enumerate(xs) if x.dtype.is_floating]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        for i in floats:
            tape.watch(xs[i])
        y = path(xs)
    got = tape.gradient(y, [xs[i] for i in floats], output_gradients=dy,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
    out: list[Any] = [None] * len(xs)
    for i, g in zip(floats, got):
        # Both cond branches must return dense tensors (a gather's gradient is IndexedSlices).
        out[i] = tf.convert_to_tensor(g)
    return out


def gated(dense: Path, compressed: Path, dense_inputs: Sequence[Any],
          compressed_inputs: Sequence[Any], alpha: Any) -> Any:
    """``alpha * dense(dense_inputs) + (1 - alpha) * compressed(compressed_inputs)``, gated.

    Args:
      dense: the original op as a function of ``dense_inputs`` (activations and the weight A).
      compressed: the compressed op as a function of ``compressed_inputs`` (activations, factors).
      dense_inputs, compressed_inputs: tensors; an activation may appear in both lists.
      alpha: float32 scalar tensor.
    """
    import tensorflow as tf

    n_dense = len(dense_inputs)
    flat = list(dense_inputs) + list(compressed_inputs)

    # Graph-building code only (tf.cond, no Python control flow on tensors): AutoGraph would just
    # spend time converting it, for every site of every function, and again when saving.
    @tf.custom_gradient
    @tf.autograph.experimental.do_not_convert
    def blended(*args: Any) -> Any:
        d_in, c_in, a = list(args[:n_dense]), list(args[n_dense:-1]), args[-1]

        def mixed() -> Any:
            y_d = dense(d_in)
            return tf.cast(a, y_d.dtype) * y_d + tf.cast(1.0 - a, y_d.dtype) * compressed(c_in)

        y = tf.cond(a >= 1.0, lambda: dense(d_in),
                    lambda: tf.cond(a <= 0.0, lambda: compressed(c_in), mixed))

        @tf.autograph.experimental.do_not_convert
        def grad(dy: Any) -> list[Any]:
            def zeros(xs: Sequence[Any]) -> list[Any]:
                return [tf.zeros_like(x) if x.dtype.is_floating else None for x in xs]

            def dense_only() -> list[Any]:
                return _grads(dense, d_in, dy) + zeros(c_in)

            def compressed_only() -> list[Any]:
                return zeros(d_in) + _grads(compressed, c_in, dy)

            def both() -> list[Any]:
                scale_d, scale_c = tf.cast(a, dy.dtype), tf.cast(1.0 - a, dy.dtype)
                return _grads(dense, d_in, dy * scale_d) + _grads(compressed, c_in, dy * scale_c)

            def branch(fn: Callable[[], list[Any]]) -> Callable[[], list[Any]]:
                # cond branches must return tensors: carry Nones (integer inputs) as empty slots.
                return lambda: [g for g in fn() if g is not None]

            picked = tf.cond(a >= 1.0, branch(dense_only),
                             lambda: tf.cond(a <= 0.0, branch(compressed_only), branch(both)))
            picked = list(picked) if isinstance(picked, (list, tuple)) else [picked]
            it = iter(picked)
            grads = [next(it) if x.dtype.is_floating else None for x in d_in + c_in]
            # Activations shared by both paths get one gradient each; the tape sums them itself.
            return grads + [tf.zeros_like(a)]

        return y, grad

    return blended(*flat, alpha)
