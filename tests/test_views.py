"""Matrix views of weights."""

from __future__ import annotations

import numpy as np
import pytest

from graphrewrite import views


def test_resolve_reshape():
    assert views.resolve_reshape((4, 6), (-1, 3)) == (8, 3)
    assert views.resolve_reshape((4, 6), (24,)) == (24,)
    assert views.resolve_reshape((4, 6), (5, -1)) is None
    assert views.resolve_reshape((4, 6), (-1, -1)) is None


@pytest.mark.parametrize("shape, steps", [
    ((3, 4, 5), (("transpose", (2, 0, 1)), ("reshape", (5, 12)))),
    ((3, 3, 2, 8), (("reshape", (18, 8)),)),
    ((6, 4), (("transpose", (1, 0)),)),
])
def test_numpy_and_tf_views_agree_and_invert(shape, steps):
    import tensorflow as tf

    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    m = views.apply_numpy(x, steps)
    np.testing.assert_array_equal(m, views.apply_tf(tf.constant(x), steps).numpy())
    back = views.invert_tf(tf.constant(m), steps, shape).numpy()
    np.testing.assert_array_equal(back, x)
    assert views.from_json(views.to_json(steps)) == steps


def test_simplify_drops_no_ops():
    steps = (("transpose", (0, 1)), ("reshape", (4, 6)), ("reshape", (2, 12)), ("reshape", (24, 1)))
    assert views.simplify(steps, (4, 6)) == (("reshape", (24, 1)),)
