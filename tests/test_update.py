"""The alpha schedule through rewritten SavedModels: the reference's scenarios (seed-spec §4.3,
§6.1, §6.8) and the update's behaviour in every execution context."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from models import matrix_model

import graphrewrite
from graphrewrite import hparams

CIFAR_LIKE = dict(name="cifar10_compression", begin_compression_step=1000, end_compression_step=120000,
                  compression_frequency=10, compression_option=1, update_option=0, rank=200)


def rewrite(tmp_path, matrices, **hp):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    matrix_model(src, matrices)
    graphrewrite.compress(src, out, hparams.resolve(None, hp), allow_larger=True)
    return tf.saved_model.load(out)


def static_factors(a, k):
    u, s, vt = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    return u[:, :k] * np.sqrt(s[:k]), np.sqrt(s[:k])[:, None] * vt[:k]


def run(model, step, how="helper"):
    step = tf.constant(step, tf.int64)
    if how == "helper":
        out = graphrewrite.compression_update(model, step)
    elif how == "function":
        out = model.compression_update(step)
    else:
        out = model.signatures["compression_update"](step=step)
    return out["alpha"].numpy(), bool(out["updated"].numpy())


@pytest.mark.parametrize("how", ["helper", "function", "signature"])
def test_compression_op_interface_scenario(tmp_path, how):
    """§6.1 testCompressionOpInterface: begin 1000, frequency 10; 3x3 A, rank 200 -> k = 2."""
    a = np.array([[1, 1, 1], [1, 0, 0], [1, 0, 0]], np.float32)
    model = rewrite(tmp_path, {"a": a}, **CIFAR_LIKE)
    site = model.graphrewrite_sites[0]
    assert site.factors["b"].shape == (3, 2) and site.factors["c"].shape == (2, 3)
    model.global_step.assign(30)
    # Before the first due update the factors hold the rewrite-time SVD (the reference: zeros), so
    # change A: the first due update must take its factors from the *current* A.
    site.weight.assign(a * 2.0)
    assert run(model, 30, how) == (pytest.approx([1.0]), False)

    alpha, updated = run(model, 1001, how)
    assert updated and alpha == pytest.approx([0.99])
    assert int(model.global_step.numpy()) == 1001 and int(site.last_update.numpy()) == 1001
    b_ref, c_ref = static_factors(a * 2.0, 2)
    np.testing.assert_allclose(np.abs(site.factors["b"].numpy()), np.abs(b_ref), atol=1e-5)
    np.testing.assert_allclose(np.abs(site.factors["c"].numpy()), np.abs(c_ref), atol=1e-5)
    assert all(np.linalg.norm(v.numpy()) > 0 for v in (site.weight, site.factors["b"], site.factors["c"]))

    assert run(model, 1001, how) == (pytest.approx([0.99]), False)  # not due again
    assert int(site.last_update.numpy()) == 1001
    alpha, updated = run(model, 2000, how)
    assert updated and alpha == pytest.approx([0.98]) and int(site.last_update.numpy()) == 2000


@pytest.mark.parametrize("how", ["helper", "function", "signature"])
def test_apply_compression_two_op_scenario(tmp_path, how):
    """§6.1 testApplyCompression: two ops, frequency 100; both decrement at 1001 and 2001. The saved
    update runs both equally shaped sites through one shared function: each keeps its own A."""
    a = np.outer([1, 2, 3], [4, 5, 6]).astype(np.float32)
    model = rewrite(tmp_path, {"first": a, "second": a * 0.5}, **{**CIFAR_LIKE, "compression_frequency": 100})
    first, second = model.graphrewrite_sites
    model.global_step.assign(30)
    assert run(model, 30, how) == (pytest.approx([1.0, 1.0]), False)
    assert [int(s.last_update.numpy()) for s in (first, second)] == [-1, -1]
    alpha, updated = run(model, 1001, how)
    assert updated and alpha == pytest.approx([0.99, 0.99])
    for site, weight in ((first, a), (second, a * 0.5)):
        b_ref, c_ref = static_factors(weight, 2)
        b, c = site.factors["b"].numpy(), site.factors["c"].numpy()
        # Each site is factored from its own A (the reference's shared counter left the second op's
        # factors at zero on its Python path). A has rank 1: its second singular pair is arbitrary.
        np.testing.assert_allclose(np.abs(b[:, 0]), np.abs(b_ref[:, 0]), atol=1e-4)
        np.testing.assert_allclose(np.abs(c[0]), np.abs(c_ref[0]), atol=1e-4)
        np.testing.assert_allclose(b @ c, weight, atol=1e-4)
    assert run(model, 1001, how) == (pytest.approx([0.99, 0.99]), False)
    alpha, _ = run(model, 2001, how)
    assert alpha == pytest.approx([0.98, 0.98])
    assert [int(s.last_update.numpy()) for s in (first, second)] == [2001, 2001]


def test_schedule_properties(tmp_path):
    """§6.8: updates at b, b+f, ...; alpha = max(1 - j*delta, 0); nothing outside [b, end]; factors once."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    model = rewrite(tmp_path, {"w": a}, begin_compression_step=50, end_compression_step=130,
                    compression_frequency=20, alpha_decrement_value=0.25, rank=400)
    site = model.graphrewrite_sites[0]
    fired = []
    for step in range(0, 200):
        alpha, updated = run(model, step)
        if updated:
            fired.append(step)
            if len(fired) == 1:
                site.weight.assign(a * 3.0)  # factors must not follow A after the first update
                b_first = site.factors["b"].numpy().copy()
        assert alpha[0] == pytest.approx(max(1 - 0.25 * len(fired), 0.0))
    assert fired == [50, 70, 90, 110, 130]  # end is inclusive
    np.testing.assert_array_equal(site.factors["b"].numpy(), b_first)
    assert float(site.alpha.numpy()) == 0.0


@pytest.mark.parametrize("delta, updates", [(0.01, 101), (0.005, 201)])
def test_float32_alpha_reaches_exactly_zero(tmp_path, delta, updates):
    """§4.3: with float32 alpha, 1/delta decrements leave a residue; one more update reaches 0."""
    model = rewrite(tmp_path, {"w": np.eye(6, dtype=np.float32)}, compression_frequency=1,
                    alpha_decrement_value=delta, rank=300)
    count = 0
    for step in range(1, 400):
        alpha, updated = run(model, step, "function")
        count += updated
        if alpha[0] == 0.0:
            break
    assert count == updates


def test_update_in_every_context_gives_the_same_result(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 6)).astype(np.float32)
    results = []
    for mode in ("eager", "function", "xla"):
        model = rewrite(tmp_path / mode, {"w": a}, compression_frequency=5, rank=300)
        fn = lambda s, m=model: graphrewrite.compression_update(m, s)  # noqa: E731
        if mode != "eager":
            fn = tf.function(fn, jit_compile=mode == "xla")
        for step in (3, 4, 9, 10, 14):
            out = fn(tf.constant(step, tf.int64))
        site = model.graphrewrite_sites[0]
        results.append((out["alpha"].numpy(), site.factors["b"].numpy() @ site.factors["c"].numpy()))
    for alpha, product in results[1:]:
        np.testing.assert_allclose(alpha, results[0][0])
        np.testing.assert_allclose(product, results[0][1], atol=1e-4)
    assert results[0][0] == pytest.approx([0.97])  # updates at 4, 9 and 14


def test_update_options(tmp_path):
    a = np.random.default_rng(2).standard_normal((6, 6)).astype(np.float32)
    python_side = rewrite(tmp_path / "py", {"w": a}, update_option=1, rank=300)
    # update_option=1: the in-graph function leaves the site alone; the Python helper moves it.
    assert run(python_side, 100, "function") == (pytest.approx([1.0]), False)
    assert run(python_side, 100, "helper") == (pytest.approx([0.99]), True)
    frozen = rewrite(tmp_path / "none", {"w": a}, update_option=3, rank=300)
    assert run(frozen, 100, "helper") == (pytest.approx([1.0]), False)
    assert int(frozen.global_step.numpy()) == 100
    tpu = rewrite(tmp_path / "tpu", {"w": a}, use_tpu=True, rank=300)
    tpu.graphrewrite_sites[0].weight.assign(a * 2)
    assert run(tpu, 100, "helper")[1]  # factors from tf.linalg.svd even eagerly
    site = tpu.graphrewrite_sites[0]
    b_ref, c_ref = static_factors(a * 2, site.factors["b"].shape[1])
    np.testing.assert_allclose(site.factors["b"].numpy() @ site.factors["c"].numpy(), b_ref @ c_ref, atol=1e-4)
