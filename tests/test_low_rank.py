"""Low-rank factorisation: the reference's k rule and factors (seed-spec §3.1, §3.2, §6.1, §6.2)."""

from __future__ import annotations

import numpy as np
import pytest

from graphrewrite import hparams
from graphrewrite.transforms import Refusal, SizePlan, make
from graphrewrite.transforms.low_rank import compressed_rank


@pytest.mark.parametrize("m, n, rank, k", [
    (10, 20, 200, 5), (20, 10, 200, 5), (10, 20, 50, 10), (9, 20, 200, 5),  # compression_op_utils_test
    (3, 3, 200, 2), (5, 5, 200, 3), (2304, 384, 200, 192), (384, 192, 200, 96),  # §3.1 examples
    (2048, 2048, 400, 512), (100, 100, 7, 100), (10, 10, 100, 10), (7, 3, 300, 1),
])
def test_k_rule(m, n, rank, k):
    assert compressed_rank(m, n, rank) == k


def transform(rank: int = 200, **kw):
    return make(hparams.resolve(None, {"rank": rank, **kw}))


def test_factors_reproduce_the_reference_math():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 30)).astype(np.float32)
    t = transform(200)
    plan = t.check(40, 30)
    assert isinstance(plan, SizePlan) and plan.k == 15
    f = t.factorize(a, plan)
    u, s, vt = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    b_ref = u[:, :15] * np.sqrt(s[:15])
    c_ref = np.sqrt(s[:15])[:, None] * vt[:15]
    # Singular vectors are defined up to sign: compare absolute values, as the reference's test does.
    np.testing.assert_allclose(np.abs(f["b"]), np.abs(b_ref), atol=1e-4)
    np.testing.assert_allclose(np.abs(f["c"]), np.abs(c_ref), atol=1e-4)
    np.testing.assert_allclose(f["b"] @ f["c"], b_ref @ c_ref, atol=1e-4)
    # Singular values split evenly: B^T B == C C^T == diag(s_k).
    np.testing.assert_allclose(f["b"].T @ f["b"], np.diag(s[:15]), atol=1e-3)
    np.testing.assert_allclose(f["c"] @ f["c"].T, np.diag(s[:15]), atol=1e-3)
    assert plan.params_after == 40 * 15 + 15 * 30


def test_reference_interface_scenario_rank_100_reconstructs_exactly():
    # testLowRankDecompMatrixCompressorInterface: default compressor rank=100 -> k=10 on 10x10;
    # A = B0 C0 with B0 10x5, C0 5x10; ||A - B C|| < 0.01.
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((10, 5)) @ rng.standard_normal((5, 10))).astype(np.float32)
    t = transform(100)
    plan = SizePlan(10, 10, compressed_rank(10, 10, 100), 200)
    f = t.factorize(a, plan)
    assert np.linalg.norm(a - f["b"] @ f["c"]) < 0.01


def test_tf_factorisation_matches_lapack():
    import tensorflow as tf

    rng = np.random.default_rng(2)
    a = rng.standard_normal((24, 16)).astype(np.float32)
    t = transform(400)
    plan = t.check(24, 16)
    f_np = t.factorize(a, plan)
    f_tf = {k: v.numpy() for k, v in t.factorize_tf(tf.constant(a), plan).items()}
    np.testing.assert_allclose(np.abs(f_tf["b"]), np.abs(f_np["b"]), atol=1e-4)
    np.testing.assert_allclose(f_tf["b"] @ f_tf["c"], f_np["b"] @ f_np["c"], atol=1e-4)


def test_zero_matrix_gives_zero_factors():
    t = transform(200)
    plan = t.check(6, 4)
    f = t.factorize(np.zeros((6, 4), np.float32), plan)
    assert not f["b"].any() and not f["c"].any()


def test_refuses_sites_that_would_not_shrink():
    decision = transform(200).check(40, 40)
    assert isinstance(decision, Refusal)
    assert decision.reason == ("rank=200 gives k=20 on 40x40: factors (1600 parameters) would not be "
                               "smaller than the weight (1600)")
    assert isinstance(transform(7).check(2048, 2048), Refusal)  # the reference default compresses nothing


def test_trainable_flags_follow_the_compressor_spec():
    t = transform(200, is_b_matrix_trainable="False")
    specs = {s.name: s for s in t.factor_specs(t.check(40, 30))}
    assert specs["b"].trainable is False and specs["c"].trainable is True
    assert specs["b"].shape == (40, 15) and specs["c"].shape == (15, 30)


@pytest.mark.parametrize("spectrum", ["decaying", "flat"])
def test_randomized_svd_is_nearly_optimal(spectrum):
    from graphrewrite.transforms.low_rank import randomized_svd, use_randomized

    rng = np.random.default_rng(3)
    m, n, k = 1024, 1024, 64
    if spectrum == "decaying":
        u, _ = np.linalg.qr(rng.standard_normal((m, n)))
        v, _ = np.linalg.qr(rng.standard_normal((n, n)))
        a = ((u * (1.0 / np.arange(1, n + 1))) @ v.T).astype(np.float32)
    else:
        a = rng.standard_normal((m, n)).astype(np.float32)  # the hardest case: no decay at all
    assert use_randomized(m, n, k)
    s_exact = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(s_exact[k:] ** 2))
    u, s, vt = randomized_svd(a, k)
    error = np.linalg.norm(a - (u * s) @ vt)
    assert error <= optimal * (1.001 if spectrum == "decaying" else 1.01)
    np.testing.assert_allclose(s, s_exact[:k], rtol=1e-3 if spectrum == "decaying" else 5e-2)
    for wide in (False, True):  # both orientations
        b = a.T if wide else a
        u, s, vt = randomized_svd(b, k)
        assert u.shape == (b.shape[0], k) and vt.shape == (k, b.shape[1])


def test_transform_records_which_svd_it_uses():
    t = transform(800)
    assert t.check(1024, 1024).details["svd"] == "randomized"  # k = 128
    assert t.check(1024, 512).details["svd"] == "gram"
    assert t.check(40, 30).details["svd"] == "full"
    assert t.check(8192, 256).details["svd"] == "gram"


@pytest.mark.parametrize("shape", [(8192, 64), (64, 8192)])
def test_gram_svd_matches_lapack_on_tall_and_wide_matrices(shape):
    from graphrewrite.transforms.low_rank import gram_svd

    rng = np.random.default_rng(5)
    a = (rng.standard_normal(shape) * np.geomspace(1, 1e-3, min(shape))[None, :][:, : shape[1]]
         if shape[0] > shape[1] else rng.standard_normal(shape)).astype(np.float32)
    k = 16
    u, s, vt = gram_svd(a, k, chunk_entries=1 << 14)  # several chunks
    s_exact = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, s_exact[:k], rtol=1e-5)
    optimal = np.sqrt(np.sum(s_exact[k:] ** 2))
    assert np.linalg.norm(a - (u * s) @ vt) <= optimal * 1.0001
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=1e-4)
