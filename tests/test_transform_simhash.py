"""Simhash (option 2): k rule, sign bits, column norms, rank, zero weight (seed-spec §3.1, §3.3, §6.3)."""

from __future__ import annotations

import numpy as np
import pytest
from transform_checks import assert_tf_consistent

from graphrewrite import hparams
from graphrewrite.transforms import Refusal, SizePlan
from graphrewrite.transforms.simhash import Simhash, sketch_size, unpack_signs

# §6.3: rank 2; all entries positive, so every row of R^T A has one sign in every column.
A_63 = (np.outer([1, 2, 3], [4, 5, 6]) + np.tile([0, 0.1, 0.02], (3, 1))).astype(np.float32)


def transform(rank: int = 200, allow_larger: bool = False, **kw) -> Simhash:
    return Simhash(hparams.resolve(None, {"compression_option": 2, "rank": rank, **kw}), allow_larger=allow_larger)


def reference(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """W_c = R S D written out from the spec, with R from the stated generator; returns (W_c, S)."""
    import tensorflow as tf

    r = tf.random.stateless_normal([a.shape[0], k], seed=[42, 0]).numpy().astype(np.float64)
    s = np.sign(r.T @ a)
    s[s == 0] = 1.0
    rs = r @ s
    d = np.array([np.linalg.norm(a[:, j]) / np.linalg.norm(rs[:, j]) if np.linalg.norm(rs[:, j]) else 0.0
                  for j in range(a.shape[1])])
    return rs * d, s


@pytest.mark.parametrize("m, n, rank, k", [(3, 3, 200, 2), (5, 5, 200, 3), (10, 20, 200, 6),
                                           (20, 10, 200, 6), (64, 32, 800, 5), (7, 9, 300, 3)])
def test_k_rule(m, n, rank, k):
    assert sketch_size(m, n, rank) == k


def test_plan_and_specs():
    t = transform(200)
    plan = t.check(40, 30)
    assert isinstance(plan, SizePlan) and plan.k == 16
    assert plan.params_after == 2 * 30 + 30 and plan.details["bytes_after"] == 2 * 30 + 4 * 30
    specs = {s.name: s for s in t.factor_specs(plan)}
    assert (specs["signs"].shape, specs["signs"].dtype) == ((2, 30), "uint8")
    assert (specs["scale"].shape, specs["scale"].dtype) == ((30,), "float32")
    assert not specs["signs"].trainable and not specs["scale"].trainable


def test_factors_match_an_independent_reference():
    a = np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32)
    t = transform(200)
    plan = t.check(40, 30)
    values = t.factorize(a, plan)
    w_ref, s_ref = reference(a.astype(np.float64), plan.k)
    np.testing.assert_array_equal(unpack_signs(values["signs"], plan.k), s_ref)
    np.testing.assert_allclose(t.numpy_dense(values, plan), w_ref, rtol=1e-5, atol=1e-5)
    assert_tf_consistent(t, values, plan)


def test_reference_scenario_rank_and_column_norms():
    # The reference asserts matrix_rank(B) == matrix_rank(A) / 2 (1 == 2 / 2). In general
    # rank(W_c) = rank(S): R (3 x 2) has full column rank and D no zero. Here every row of
    # S = sign(R^T A) is constant across the columns (A's entries are all positive and its rows
    # nearly parallel), so rank(S) = 1 although k = 2.
    t = transform(200)
    plan = t.check(3, 3)
    assert plan.k == 2
    values = t.factorize(A_63, plan)
    s = unpack_signs(values["signs"], plan.k)
    w = t.numpy_dense(values, plan)
    assert (s == s[:, :1]).all()
    assert np.linalg.matrix_rank(w) == np.linalg.matrix_rank(s) == 1 == np.linalg.matrix_rank(A_63) // 2
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), np.linalg.norm(A_63, axis=0), rtol=1e-5)
    np.testing.assert_allclose(w, reference(A_63.astype(np.float64), 2)[0], rtol=1e-5)
    assert_tf_consistent(t, values, plan)


def test_zero_weight_and_zero_column():
    t = transform(200)
    plan = t.check(6, 4)
    values = t.factorize(np.zeros((6, 4), np.float32), plan)
    assert not values["scale"].any() and not t.numpy_dense(values, plan).any()
    a = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    a[:, 2] = 0.0  # R^T A is exactly 0 there: sign(0) := +1, and the scale is 0
    values = t.factorize(a, plan)
    assert (unpack_signs(values["signs"], plan.k)[:, 2] == 1).all()
    w = t.numpy_dense(values, plan)
    assert not w[:, 2].any() and w[:, [0, 1, 3]].all()


def test_in_graph_factorisation_agrees_with_numpy_also_under_xla():
    import tensorflow as tf

    a = np.random.default_rng(2).standard_normal((24, 16)).astype(np.float32)
    t = transform(200)
    plan = t.check(24, 16)
    expected = t.factorize(a, plan)
    eager = t.factorize_tf(tf.constant(a), plan)
    compiled = tf.function(lambda m: t.factorize_tf(m, plan), jit_compile=True)(tf.constant(a))
    for got in (eager, compiled):
        np.testing.assert_array_equal(got["signs"].numpy(), expected["signs"])
        np.testing.assert_allclose(got["scale"].numpy(), expected["scale"], rtol=1e-5)


def test_refuses_when_the_bits_would_not_be_smaller():
    decision = transform(1).check(4, 8)
    assert isinstance(decision, Refusal)
    assert decision.reason == ("rank=1 gives k=401 sign bits per column on 4x8: factors (440 bytes) would "
                               "not be smaller than the weight (128 bytes)")
    assert transform(1, allow_larger=True).check(4, 8).details["bytes_after"] == 440
