"""Input/output (9), block-diagonal (10) and mixed-block (12) compression (seed-spec §3.7-3.9, §6.1)."""

from __future__ import annotations

import numpy as np
import pytest
from transform_checks import assert_tf_consistent as check

from graphrewrite import hparams
from graphrewrite.transforms import Refusal, SizePlan, Transform
from graphrewrite.transforms.block import BlockDiagonal, block_mask
from graphrewrite.transforms.input_output import InputOutput
from graphrewrite.transforms.mixed_block import MixedBlock

# §6.1: A = outer([1,2,3,7,8,9,1,2,5,-2,-7,-1], [4,5,6,3,1,8,3,2]) (12 x 8); x = [1,2,3,4] x 3 (1 x 12).
A = np.outer([1, 2, 3, 7, 8, 9, 1, 2, 5, -2, -7, -1], [4, 5, 6, 3, 1, 8, 3, 2]).astype(np.float32)
X = np.array([[1, 2, 3, 4] * 3], np.float32)
IO = {"compress_input": True, "compress_output": True, "input_compression_factor": 2, "input_block_size": 4,
      "output_compression_factor": 2, "output_block_size": 4}


def make(cls: type[Transform], option: int, allow_larger: bool = False, **kw) -> Transform:
    return cls(hparams.resolve(None, {"compression_option": option, **kw}), allow_larger=allow_larger)


def run(t: Transform, x: np.ndarray, values: dict, plan: SizePlan) -> np.ndarray:
    import tensorflow as tf

    return t.matmul(tf.constant(x), {k: tf.constant(v) for k, v in values.items()}, plan).numpy()


def assert_tf_consistent(t, values: dict, plan) -> None:
    check(t, values, plan, dense_rtol=1e-5, dense_atol=1e-6, matmul_tol=1e-5)


def specs_of(t: Transform, plan: SizePlan) -> dict:
    return {s.name: s.shape for s in t.factor_specs(plan)}


def io_forward(x: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray) -> np.ndarray:
    """§3.7 written with explicit blocks: B on each input block, C, then D on each output block."""
    ibs, obs_in = b.shape[0], d.shape[0]
    h = np.concatenate([x[:, i:i + ibs] @ b for i in range(0, x.shape[1], ibs)], axis=1) @ c
    return np.concatenate([h[:, j:j + obs_in] @ d for j in range(0, h.shape[1], obs_in)], axis=1)


def test_input_output_reference_shapes_and_forward():
    t = make(InputOutput, 9, **IO)
    plan = t.check(12, 8)
    assert isinstance(plan, SizePlan) and plan.params_after == 8 + 24 + 8 and not t.blended
    assert specs_of(t, plan) == {"b": (4, 2), "c": (6, 4), "d": (2, 4)}
    values = t.factorize(A, plan)
    out = run(t, X, values, plan)
    assert out.shape == (1, 8)
    np.testing.assert_allclose(out, io_forward(X, values["b"], values["c"], values["d"]), rtol=1e-5)
    assert_tf_consistent(t, values, plan)


def test_input_output_initial_values_are_seeded_xavier_uniform():
    import tensorflow as tf

    t = make(InputOutput, 9, **IO)
    plan = t.check(12, 8)
    values = t.factorize(A, plan)
    limits = {"b": 1.0, "c": np.sqrt(3 / (10 / 4)), "d": 1.0}  # (rows + cols) / 2, and / (2 fi) for C
    for name, limit in limits.items():
        assert 0.5 * limit < np.abs(values[name]).max() <= limit
    # C's 24 draws come near its own limit, above the limit without the fi divisor.
    assert np.abs(values["c"]).max() > 0.8 * limits["c"] > np.sqrt(3 / (10 / 2))
    again = t.factorize(np.zeros_like(A), plan)
    in_graph = t.factorize_tf(tf.constant(A), plan)
    for name in limits:
        np.testing.assert_array_equal(again[name], values[name])
        np.testing.assert_array_equal(in_graph[name].numpy(), values[name])


def test_input_output_input_only():
    t = make(InputOutput, 9, input_block_size=4, input_compression_factor=4)
    plan = t.check(12, 8)
    assert specs_of(t, plan) == {"b": (4, 1), "c": (3, 8)}
    values = t.factorize(A, plan)
    blocks = np.stack([X[:, i:i + 4] @ values["b"] for i in range(0, 12, 4)], axis=1).reshape(1, 3)
    np.testing.assert_allclose(run(t, X, values, plan), blocks @ values["c"], rtol=1e-5)
    assert_tf_consistent(t, values, plan)


@pytest.mark.parametrize("overrides, reason", [
    ({**IO, "input_block_size": 5}, "input_block_size=5 does not divide the 12 rows"),
    ({**IO, "input_compression_factor": 3},
     "input_compression_factor=3 does not divide the 4 entries of an input block"),
    ({**IO, "output_block_size": 3}, "output_block_size=3 does not divide the 8 columns"),
    ({"compress_input": False, "input_compression_factor": 2},
     "input_compression_factor=2 needs compress_input=True"),
])
def test_input_output_refusals(overrides, reason):
    assert make(InputOutput, 9, **overrides).check(12, 8) == Refusal(reason)


def test_input_output_defaults_do_not_shrink():
    decision = make(InputOutput, 9).check(64, 64)  # B 32x32 plus a full C
    assert isinstance(decision, Refusal) and "would not be smaller" in decision.reason
    plan = make(InputOutput, 9, allow_larger=True).check(64, 64)
    assert isinstance(plan, SizePlan) and plan.details["c"] == [64, 64] and plan.params_after == 32 * 32 + 64 * 64


def test_block_mask_reference_scenario():
    t = make(BlockDiagonal, 10, block_method="mask", block_compression_factor=2)
    plan = t.check(12, 8)
    assert isinstance(plan, SizePlan) and plan.params_after == 48 and plan.details["stored_values"] == 96
    assert specs_of(t, plan) == {"c": (12, 8)}
    mask = block_mask(12, 8, 2)
    assert mask.shape == (12, 8) and np.count_nonzero(mask) == 48
    expected = np.zeros((12, 8))
    expected[:6, :4] = expected[6:, 4:] = 1
    np.testing.assert_array_equal(mask, expected)
    values = t.factorize(A, plan)
    limit = np.sqrt(3 / (20 / 4))
    assert 0.5 * limit < np.abs(values["c"]).max() <= limit
    out = run(t, X, values, plan)
    assert out.shape == (1, 8)
    np.testing.assert_allclose(out, X @ (values["c"] * expected), rtol=1e-5)
    assert_tf_consistent(t, values, plan)


def test_block_loop_equals_mask_with_the_same_blocks():
    import scipy.linalg

    loop = make(BlockDiagonal, 10, block_method="loop", block_compression_factor=2)
    mask = make(BlockDiagonal, 10, block_method="mask", block_compression_factor=2)
    loop_plan, mask_plan = loop.check(12, 8), mask.check(12, 8)
    assert specs_of(loop, loop_plan) == {"c": (2, 6, 4)} and loop_plan.details["stored_values"] == 48
    blocks = loop.factorize(A, loop_plan)
    noise = np.random.default_rng(0).standard_normal((12, 8)).astype(np.float32) * (1 - block_mask(12, 8, 2))
    full = {"c": scipy.linalg.block_diag(*blocks["c"]).astype(np.float32) + noise}  # off-block values are masked
    out = run(loop, X, blocks, loop_plan)
    assert out.shape == (1, 8)
    np.testing.assert_allclose(out, run(mask, X, full, mask_plan), rtol=1e-5)
    by_hand = np.concatenate([X[:, :6] @ blocks["c"][0], X[:, 6:] @ blocks["c"][1]], axis=1)
    np.testing.assert_allclose(out, by_hand, rtol=1e-5)
    assert_tf_consistent(loop, blocks, loop_plan)


def test_block_refusals():
    t = make(BlockDiagonal, 10, block_compression_factor=5)
    assert t.check(12, 10) == Refusal("block_compression_factor=5 does not divide the 12 rows")
    assert make(BlockDiagonal, 10, block_compression_factor=3).check(12, 8) == Refusal(
        "block_compression_factor=3 does not divide the 8 columns")
    decision = make(BlockDiagonal, 10).check(12, 8)
    assert isinstance(decision, Refusal) and "would not be smaller" in decision.reason
    assert isinstance(make(BlockDiagonal, 10, allow_larger=True).check(12, 8), SizePlan)


def mixed_forward(x: np.ndarray, bm: np.ndarray, mixer: np.ndarray) -> np.ndarray:
    """§3.9 with loops: strided split, per-block products, then output block i = sum_k sum_j inter_j L[i,j,k]."""
    nb = bm.shape[2]
    inter = [sum(x[:, b * nb + c:b * nb + c + 1] * bm[b, :, c][None, :] for b in range(bm.shape[0]))
             for c in range(nb)]
    outs = [sum(inter[j] * mixer[i, j, k] for j in range(nb) for k in range(mixer.shape[2])) for i in range(nb)]
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("factor, bases, bm_shape, mixer_shape", [(2, 1, (6, 4, 2), (2, 2, 1)),
                                                                  (4, 2, (3, 2, 4), (4, 4, 2))])
def test_mixed_block_reference_scenarios(factor, bases, bm_shape, mixer_shape):
    t = make(MixedBlock, 12, compression_factor=factor, num_bases=bases)
    plan = t.check(12, 8)
    assert isinstance(plan, SizePlan) and plan.params_after == 96 // factor + factor * factor * bases
    assert specs_of(t, plan) == {"block_matrices": bm_shape, "linear_mixer": mixer_shape}
    values = t.factorize(A, plan)
    assert np.abs(values["block_matrices"]).max() <= np.sqrt(3 / 10)
    assert np.abs(values["linear_mixer"]).max() <= np.sqrt(3 / factor)
    assert run(t, X, values, plan).shape == (1, 8)
    for x in (X, np.random.default_rng(1).standard_normal((3, 12)).astype(np.float32)):
        expected = mixed_forward(x, values["block_matrices"], values["linear_mixer"])
        np.testing.assert_allclose(run(t, x, values, plan), expected, rtol=1e-4, atol=1e-5)
    assert_tf_consistent(t, values, plan)


def test_mixed_block_refusal():
    assert make(MixedBlock, 12, compression_factor=5).check(12, 10) == Refusal(
        "compression_factor=5 does not divide the 12 rows")
