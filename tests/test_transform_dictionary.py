"""Dictionary learning (option 3): sizes, kNN/LSH init, least squares, OMP and the sparse B
(seed-spec §3.1, §3.6, §6.5)."""

from __future__ import annotations

import numpy as np
import pytest
from transform_checks import assert_tf_consistent

from graphrewrite import hparams
from graphrewrite.transforms import Refusal, SizePlan
from graphrewrite.transforms.dictionary import DictionaryLearning, dictionary_sizes, omp


def transform(rank: int = 100, allow_larger: bool = True, **kw) -> DictionaryLearning:
    """rank=100 (the reference test's compressor) never shrinks a weight: allow larger by default."""
    hp = hparams.resolve(None, {"compression_option": 3, "rank": rank,
                                **{k: v for k, v in kw.items() if k != "n_iterations"}})
    extra = {"n_iterations": kw["n_iterations"]} if "n_iterations" in kw else {}
    return DictionaryLearning({**hp, **extra}, allow_larger=allow_larger)


def plan_for(t: DictionaryLearning, m: int, n: int) -> SizePlan:
    plan = t.check(m, n)
    assert isinstance(plan, SizePlan)
    return plan


def interface_matrix() -> np.ndarray:
    """§6.5: B 20x10 ~ N(0, 1) with entries <= 0.5 zeroed and column 0 set to 1; C 10x5; A = B C."""
    rng = np.random.RandomState(0)
    b = rng.randn(20, 10)
    b[b <= 0.5] = 0
    b[:, 0] = 1
    return (b @ rng.randn(10, 5)).astype(np.float32)


def relative_error(t: DictionaryLearning, values: dict, plan: SizePlan, a: np.ndarray) -> float:
    return float(np.linalg.norm(a - t.numpy_dense(values, plan)) / np.linalg.norm(a))


@pytest.mark.parametrize("m, n, rank, d, s", [(20, 5, 100, 21, 6), (20, 5, 200, 11, 3), (40, 30, 400, 11, 8),
                                              (10, 10, 7, 143, 143), (4, 100, 100, 5, 5)])
def test_sizes(m, n, rank, d, s):
    assert dictionary_sizes(m, n, rank) == (d, s)


@pytest.mark.parametrize("use_lsh", [False, True])
def test_reference_interface_scenario(use_lsh):
    a = interface_matrix()
    t = transform(100, use_lsh=use_lsh)
    plan = plan_for(t, 20, 5)
    values = t.factorize(a, plan)
    assert plan.k == 21 and plan.details["nonzeros_per_row"] == 6 and plan.params_after == 2 * 20 * 6 + 21 * 5
    assert values["indices"].shape == values["values"].shape == (20, 6) and values["dictionary"].shape == (21, 5)
    assert relative_error(t, values, plan, a) <= 0.1
    norms = np.linalg.norm(values["dictionary"], axis=1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-5)
    assert_tf_consistent(t, values, plan)
    np.testing.assert_array_equal(t.factorize(a, plan)["indices"], values["indices"])  # deterministic


def test_one_iteration_is_the_reference_default_knn_code_and_least_squares_dictionary():
    a = interface_matrix()
    t = transform(100, n_iterations=1)
    plan = plan_for(t, 20, 5)
    values = t.factorize(a, plan)
    assert (values["values"] == 1).all()
    assert all(len(set(row)) == 6 for row in values["indices"])  # s distinct nearest samples
    code = np.zeros((20, 21))
    np.add.at(code, (np.repeat(np.arange(20), 6), values["indices"].ravel()), 1.0)
    solution = np.linalg.lstsq(code, a.astype(np.float64), rcond=None)[0]
    norms = np.linalg.norm(solution, axis=1, keepdims=True)
    used = norms[:, 0] > 1e-9
    unit = solution / np.where(norms > 0, norms, 1)
    np.testing.assert_allclose(values["dictionary"][used], unit[used], atol=1e-3)


def test_omp_matches_scikit_learn():
    sklearn_omp = pytest.importorskip("sklearn.linear_model").orthogonal_mp
    rng = np.random.default_rng(3)
    dictionary = rng.standard_normal((30, 16))
    dictionary /= np.linalg.norm(dictionary, axis=1, keepdims=True)
    x = rng.standard_normal((40, 16))
    ids, coef = omp(x, dictionary, 5)
    code = np.zeros((40, 30))
    np.add.at(code, (np.repeat(np.arange(40), 5), ids.ravel()), coef.ravel())
    np.testing.assert_allclose(code, sklearn_omp(dictionary.T, x.T, n_nonzero_coefs=5).T, atol=1e-10)


def test_a_zero_row_does_not_zero_the_result():
    a = interface_matrix()
    a[3] = 0
    t = transform(100)
    plan = plan_for(t, 20, 5)
    values = t.factorize(a, plan)
    w = t.numpy_dense(values, plan)
    assert not w[3].any() and relative_error(t, values, plan, a) <= 0.1


def test_all_zero_weight_gives_the_initial_form():
    t = transform(100)
    plan = plan_for(t, 20, 5)
    values = t.factorize(np.zeros((20, 5), np.float32), plan)
    np.testing.assert_array_equal(values["indices"], np.tile(np.arange(6), (20, 1)))
    assert (values["values"] == 1).all() and not values["dictionary"].any()
    assert not t.numpy_dense(values, plan).any()


def test_plan_specs_and_cheap_product():
    import tensorflow as tf

    t = transform(400, allow_larger=False, is_b_matrix_trainable=False)
    plan = t.check(40, 30)
    assert isinstance(plan, SizePlan) and plan.k == 11 and plan.details["nonzeros_per_row"] == 8
    assert plan.params_after == 2 * 40 * 8 + 11 * 30
    specs = {s.name: (s.shape, s.dtype, s.trainable) for s in t.factor_specs(plan)}
    assert specs == {"indices": ((40, 8), "int32", False), "values": ((40, 8), "float32", False),
                     "dictionary": ((11, 30), "float32", True)}
    a = np.random.default_rng(4).standard_normal((40, 30)).astype(np.float32)
    values = t.factorize(a, plan)
    assert_tf_consistent(t, values, plan)
    b, c = t.low_rank({k: tf.constant(v) for k, v in values.items()}, plan)
    assert b.shape == (40, 11)
    np.testing.assert_allclose((b @ c).numpy(), t.numpy_dense(values, plan), rtol=1e-5, atol=1e-5)
    tall = np.random.default_rng(5).standard_normal((100, 10)).astype(np.float32)
    tall_plan = t.check(100, 10)  # d (m + n) = 26 * 110 > m n: the product stays x @ W_c
    tall_values = t.factorize(tall, tall_plan)
    assert t.low_rank({k: tf.constant(v) for k, v in tall_values.items()}, tall_plan) is None
    assert_tf_consistent(t, tall_values, tall_plan)


def test_refusal_and_no_in_graph_factorisation():
    decision = transform(7, allow_larger=False).check(64, 64)
    assert isinstance(decision, Refusal) and decision.reason.startswith(
        "rank=7 gives a 915-word dictionary and 915 nonzeros per row on 64x64: factors")
    t = transform(400)
    with pytest.raises(NotImplementedError, match="no in-graph factorisation"):
        t.factorize_tf(None, t.check(40, 30))
