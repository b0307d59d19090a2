"""A check every transform test shares: the numpy and TF forms of a method agree."""

from __future__ import annotations

import numpy as np

from graphrewrite.transforms import SizePlan, Transform


def assert_tf_consistent(t: Transform, values: dict, plan: SizePlan, dense_rtol: float = 1e-5,
                         dense_atol: float = 1e-5, matmul_tol: float = 1e-4) -> None:
    """numpy_dense == dense (TF) and matmul(x) == x @ dense for x of rank 2 and 3."""
    import tensorflow as tf

    factors = {k: tf.constant(v) for k, v in values.items()}
    w = t.dense(factors, plan).numpy()
    np.testing.assert_allclose(t.numpy_dense(values, plan), w, rtol=dense_rtol, atol=dense_atol)
    rng = np.random.default_rng(7)
    for shape in ((5, plan.m), (2, 3, plan.m)):
        x = rng.standard_normal(shape).astype(np.float32)
        got = t.matmul(tf.constant(x), factors, plan).numpy()
        np.testing.assert_allclose(got, x @ w, rtol=matmul_tol, atol=matmul_tol)
