"""k-means (option 4): the reference's block quantiser, codes, zero fix-up and the TF Lloyd
(seed-spec §3.4, §6.3, §6.4)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.cluster.vq
from transform_checks import assert_tf_consistent as check

from graphrewrite import hparams
from graphrewrite.transforms import Refusal, SizePlan
from graphrewrite.transforms.kmeans import KMeans, kmeans_quantize_block

A_63 = (np.outer([1, 2, 3], [4, 5, 6]) + np.tile([0, 0.1, 0.02], (3, 1))).astype(np.float32)


def transform(rank: int, block_size: int, allow_larger: bool = False, **kw) -> KMeans:
    hp = hparams.resolve(None, {"compression_option": 4, "rank": rank, "block_size": block_size, **kw})
    return KMeans(hp, allow_larger=allow_larger)


def mixture() -> np.ndarray:
    """§6.4: 3 x 100 points of R^4 around -5 e0, 0 and +5 e0, as a 60 x 20 matrix."""
    rng = np.random.RandomState(0)
    centres = (-5 * np.eye(4)[0], np.zeros(4), 5 * np.eye(4)[0])
    return np.concatenate([rng.randn(100, 4) + c for c in centres]).reshape(60, 20).astype(np.float32)


def reconstruct(codebook: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """codebook[codes] laid out row-major, block by block, written as loops."""
    rows, per_row = codes.shape
    b = codebook.shape[1]
    out = np.zeros((rows, per_row * b), codebook.dtype)
    for i in range(rows):
        for j in range(per_row):
            out[i, j * b:(j + 1) * b] = codebook[codes[i, j]]
    return out


def assert_tf_consistent(t, values: dict, plan) -> None:
    check(t, values, plan, dense_rtol=1e-6, dense_atol=0.0)


def test_basic_shapes_and_the_reference_seed_protocol():
    m = np.random.RandomState(3).randn(20, 20)
    codebook, codes = kmeans_quantize_block(m, 7, 4)
    assert codebook.shape == (7, 4) and codes.shape == (20, 5)
    # The same steps written out: np.random.seed(42), scipy kmeans, vq, zero the centroid nearest 0.
    np.random.seed(42)
    book, _ = scipy.cluster.vq.kmeans(m.reshape(-1, 4), 7, thresh=1e-5)
    expected_codes, _ = scipy.cluster.vq.vq(m.reshape(-1, 4), book)
    book[np.argmin(np.linalg.norm(book, axis=1))] = 0
    np.testing.assert_array_equal(codebook[: len(book)], book)
    np.testing.assert_array_equal(codes.ravel(), expected_codes)


def test_global_random_state_is_left_alone():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    kmeans_quantize_block(np.random.RandomState(0).randn(8, 8), 3, 2)
    assert np.random.rand() == expected


def test_gaussian_mixture_bound():
    m = mixture()
    codebook, codes = kmeans_quantize_block(m, 3, 4)
    assert codebook.shape == (3, 4) and codes.shape == (60, 5)
    assert np.linalg.norm(reconstruct(codebook, codes) - m) / 300 < 0.2


def test_zero_blocks_map_to_exact_zeros():
    m = np.random.RandomState(4).randn(100, 4)
    m[:2] = 0
    codebook, codes = kmeans_quantize_block(m, 3, 4)
    assert not reconstruct(codebook, codes)[:2].any()
    assert (np.linalg.norm(codebook, axis=1) == 0).sum() == 1


def test_padding_when_scipy_returns_fewer_centroids():
    m = np.tile([[1.0, 2.0]], (6, 1))  # one distinct block: scipy drops the empty clusters
    codebook, _ = kmeans_quantize_block(m, 4, 2)
    assert codebook.shape == (4, 2)
    assert kmeans_quantize_block(m, 4, 2, is_padded=False)[0].shape[0] < 4


def test_pruning_zeroes_the_smallest_entries_first():
    m = np.random.RandomState(5).randn(10, 6).astype(np.float32)
    pruned = m.copy()
    pruned.ravel()[np.argsort(np.abs(m).ravel())[:18]] = 0  # ceil(60 * 0.3) = 18
    np.testing.assert_array_equal(kmeans_quantize_block(m, 4, 3, 0.3)[0], kmeans_quantize_block(pruned, 4, 3)[0])
    with pytest.warns(UserWarning, match="clamped"):
        kmeans_quantize_block(m, 4, 3, 1.5)


def test_reference_scenario_codebook():
    # §6.3 with rank=2, block_size=3: the rows [4, 5.1, 6.02], [8, 10.1, 12.02], [12, 15.1, 18.02]
    # split into {row 0} and {rows 1, 2}; row 0's centroid is the one nearest zero and becomes 0.
    t = transform(2, 3)
    plan = t.check(3, 3)
    values = t.factorize(A_63, plan)
    expected = np.stack([np.zeros(3), A_63[1:].mean(axis=0)])
    order = np.argsort(np.linalg.norm(values["codebook"], axis=1))
    np.testing.assert_allclose(values["codebook"][order], expected, rtol=1e-6)
    np.testing.assert_array_equal(values["codes"].ravel(), [order[0], order[1], order[1]])


def test_transform_factors_specs_and_tf_agreement():
    a = mixture()
    t = transform(3, 4)
    plan = t.check(60, 20)
    assert isinstance(plan, SizePlan) and plan.k == 3 and plan.params_after == 12 + 300
    assert plan.details["bytes_after"] == 4 * 12 + 300
    specs = {s.name: (s.shape, s.dtype, s.trainable) for s in t.factor_specs(plan)}
    assert specs == {"codebook": ((3, 4), "float32", True), "codes": ((60, 5), "uint8", False)}
    values = t.factorize(a, plan)
    assert values["codes"].dtype == np.uint8
    np.testing.assert_array_equal(t.numpy_dense(values, plan), reconstruct(values["codebook"], values["codes"]))
    assert_tf_consistent(t, values, plan)
    big = transform(300, 4)
    assert [s.dtype for s in big.factor_specs(big.check(80, 80))] == ["float32", "int32"]


def test_in_graph_lloyd_meets_the_same_bounds_also_under_xla():
    import tensorflow as tf

    t = transform(3, 4)
    plan = t.check(60, 20)
    m = mixture()
    eager = t.factorize_tf(tf.constant(m), plan)
    compiled = tf.function(lambda x: t.factorize_tf(x, plan), jit_compile=True)(tf.constant(m))
    for got in (eager, compiled):
        values = {k: v.numpy() for k, v in got.items()}
        assert values["codes"].dtype == np.uint8 and values["codes"].shape == (60, 5)
        assert np.linalg.norm(t.numpy_dense(values, plan) - m) / 300 < 0.2
    zeros = np.random.RandomState(4).randn(100, 4).astype(np.float32)
    zeros[:2] = 0
    z = transform(3, 4)
    values = {k: v.numpy() for k, v in z.factorize_tf(tf.constant(zeros), z.check(100, 4)).items()}
    assert not z.numpy_dense(values, z.check(100, 4))[:2].any()


def test_refusals():
    assert transform(4, 3).check(16, 64) == Refusal("block_size=3 does not divide the 64 columns")
    assert transform(16, 4).check(4, 8) == Refusal("rank=16 centroids need at least 16 blocks, got 8")
    decision = transform(256, 1).check(16, 16)
    assert isinstance(decision, Refusal) and "would not be smaller than the weight (1024 bytes)" in decision.reason
    assert isinstance(transform(256, 1, allow_larger=True).check(16, 16), SizePlan)
    assert isinstance(transform(16, 4, allow_larger=True).check(4, 8), Refusal)  # impossible, not just large


def test_codebook_gradient_is_dense():
    # The blend's gradient switches between branches; an IndexedSlices codebook gradient would not
    # reconcile with the other branch's dense zeros, so the lookup must give a dense one.
    import tensorflow as tf

    t = transform(3, 4)
    plan = t.check(60, 20)
    values = t.factorize(mixture(), plan)
    codebook = tf.Variable(values["codebook"])
    upstream = np.random.default_rng(2).standard_normal((60, 20)).astype(np.float32)
    with tf.GradientTape() as tape:
        w = t.dense({"codebook": codebook, "codes": tf.constant(values["codes"])}, plan)
        loss = tf.reduce_sum(w * upstream)
    grad = tape.gradient(loss, codebook)
    assert isinstance(grad, tf.Tensor)
    expected = np.zeros((3, 4), np.float32)
    np.add.at(expected, values["codes"].ravel(), upstream.reshape(-1, 4))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-5)
