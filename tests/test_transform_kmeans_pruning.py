"""k-means + pruning (option 8): schedule, magnitude mask, k-means of the pruned weight (seed-spec §3.5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphrewrite import hparams
from graphrewrite.transforms import SizePlan
from graphrewrite.transforms.kmeans import kmeans_quantize_block
from graphrewrite.transforms.kmeans_pruning import (
    KMeansPruning,
    magnitude_mask,
    magnitude_mask_tf,
    sparsity_at,
    sparsity_at_tf,
)

SCHEDULE = {"initial_sparsity": 0.1, "target_sparsity": 0.7, "sparsity_function_begin_step": 100,
            "sparsity_function_end_step": 300, "sparsity_function_exponent": 3.0}


def transform(**kw) -> KMeansPruning:
    return KMeansPruning(hparams.resolve(None, {"compression_option": 8, "rank": 4, "block_size": 2, **kw}))


def weight(m: int = 12, n: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((m, n)).astype(np.float32)


@pytest.mark.parametrize("step, expected", [
    (0, 0.1), (100, 0.1), (200, 0.7 - 0.6 * 0.5 ** 3), (250, 0.7 - 0.6 * 0.25 ** 3), (300, 0.7), (10_000, 0.7),
])
def test_polynomial_schedule(step, expected):
    hp = hparams.resolve(None, SCHEDULE)
    assert sparsity_at(step, hp) == pytest.approx(expected)
    assert float(sparsity_at_tf(step, hp)) == pytest.approx(expected)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.99])
def test_magnitude_mask_numpy_and_tf(sparsity):
    import tensorflow as tf

    a = weight(10, 7)
    a[0, :4] = 0.25  # ties are cut by position
    mask = magnitude_mask(a, sparsity)
    count = math.ceil(a.size * sparsity)
    assert mask.dtype == np.float32 and (mask == 0).sum() == count
    if 0 < count < a.size:
        assert np.abs(a[mask == 0]).max() <= np.abs(a[mask == 1]).min()
    np.testing.assert_array_equal(magnitude_mask_tf(tf.constant(a), sparsity).numpy(), mask)
    as_tensor = tf.constant(sparsity, tf.float64)
    np.testing.assert_array_equal(magnitude_mask_tf(tf.constant(a), as_tensor).numpy(), mask)


def test_factors_are_k_means_of_the_pruned_weight():
    import tensorflow as tf

    a = weight()
    t = transform(pruning_fraction=0.25)
    plan = t.check(12, 8)
    assert isinstance(plan, SizePlan) and plan.details["bytes_after"] == 4 * 8 + 48 + 96
    specs = {s.name: s for s in t.factor_specs(plan)}
    assert (specs["mask"].shape, specs["mask"].dtype, specs["mask"].trainable) == ((12, 8), "uint8", False)
    assert (specs["codes"].shape, specs["codes"].dtype) == ((12, 4), "uint8")
    values = t.factorize(a, plan)
    mask = values["mask"].astype(np.float32)
    assert (mask == 0).sum() == 24 and np.abs(a[mask == 0]).max() <= np.abs(a[mask == 1]).min()
    codebook, codes = kmeans_quantize_block(a * mask, 4, 2, 0.25)
    np.testing.assert_array_equal(values["codebook"], codebook)
    np.testing.assert_array_equal(values["codes"], codes)
    w = t.numpy_dense(values, plan)
    np.testing.assert_array_equal(w, codebook[codes].reshape(12, 8) * mask)
    factors = {k: tf.constant(v) for k, v in values.items()}
    np.testing.assert_array_equal(t.mask(factors, plan).numpy(), mask)
    np.testing.assert_allclose(t.dense(factors, plan).numpy(), w, rtol=1e-6)
    rng = np.random.default_rng(1)
    for shape in ((5, 12), (2, 3, 12)):
        x = rng.standard_normal(shape).astype(np.float32)
        np.testing.assert_allclose(t.matmul(tf.constant(x), factors, plan).numpy(), x @ w, rtol=1e-4, atol=1e-4)


def test_initial_mask_follows_the_schedule_without_pruning_fraction():
    t = transform(begin_pruning_step=200, **SCHEDULE)
    expected = 0.7 - 0.6 * 0.5 ** 3
    assert t.initial_sparsity == pytest.approx(expected)
    values = t.factorize(weight(), t.check(12, 8))
    assert (values["mask"] == 0).sum() == math.ceil(96 * expected)


def test_transposed_quantisation():
    a = weight(12, 8)
    t = transform(do_transpose=True, block_size=3, pruning_fraction=0.1)
    plan = t.check(12, 8)
    assert {s.name: s.shape for s in t.factor_specs(plan)}["codes"] == (8, 4)
    values = t.factorize(a, plan)
    mask = values["mask"].astype(np.float32)
    codebook, codes = kmeans_quantize_block((a * mask).T, 4, 3, 0.1)
    np.testing.assert_array_equal(t.numpy_dense(values, plan), codebook[codes].reshape(8, 12).T * mask)
    decision = transform(do_transpose=True, block_size=5).check(12, 8)
    assert decision.reason == "block_size=5 does not divide the 12 rows"


def test_in_graph_factorisation():
    import tensorflow as tf

    a = weight(40, 16, seed=3)
    t = transform(pruning_fraction=0.5, rank=8)
    plan = t.check(40, 16)
    expected = t.factorize(a, plan)
    got = {k: v.numpy() for k, v in t.factorize_tf(tf.constant(a), plan).items()}
    np.testing.assert_array_equal(got["mask"], expected["mask"])
    error = np.linalg.norm(t.numpy_dense(got, plan) - a * expected["mask"])
    assert error <= 1.25 * np.linalg.norm(t.numpy_dense(expected, plan) - a * expected["mask"])
