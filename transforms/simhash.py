"""Simhash: a random-projection sign sketch (reference option 2, ``SimhashMatrixCompressor``).

Math. For the m x n weight ``A`` and the reference's ``rank`` r:

    k = floor(min(m, n) * 100 / r) + 1           (the reference's NumPy-path rule)
    R = stateless_normal([m, k], seed=[42, 0])   (i.i.d. N(0, 1), regenerated in-graph, never stored)
    S = sign(R^T A)                              (k x n, with sign(0) := +1)
    D_jj = ||A[:, j]|| / ||(R S)[:, j]||         (n x n diagonal; 0 where the denominator is 0)
    W_c = R (S D)

so every column of ``W_c`` has the norm of the matching column of ``A``, and ``rank(W_c) = rank(S)``
(R has full column rank almost surely, D no zero unless a column of A is zero). The blended weight
is ``alpha * A + (1 - alpha) * W_c``; a product is taken as ``(x @ R) @ (S * d)`` with ``d = diag D``.

Storage. ``signs``: S packed eight rows to a byte (uint8, ``ceil(k / 8) x n``; bit j of byte i is
row ``8 i + j``, 1 meaning +1); ``scale``: ``d`` (float32, n). Nothing is trainable: the reference's
wrapper forces B non-trainable for this option whatever ``is_b_matrix_trainable`` says.

Differences from the reference:

* It keeps ``B = R S D`` as a dense m x n float variable (§7: no memory saving); here only the sign
  bits and the n scales are stored and R is regenerated from the seed.
* R comes from TF's stateless Philox generator (seed [42, 0]) instead of ``np.random.seed(42)``, so
  the NumPy and in-graph factorisations, and every device, see the same R.
* Its TF path used n instead of min(m, n) in the k rule (§7); both paths here use min(m, n).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite.transforms._common import FLOAT_BYTES, plan_or_refusal, right_matmul
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform

SEED = (42, 0)


def sketch_size(m: int, n: int, rank: int) -> int:
    """``k = floor(min(m, n) * 100 / rank) + 1``."""
    return min(m, n) * 100 // rank + 1


def projection(m: int, k: int) -> Any:
    """R (m x k, float32 tensor), the same on every call, device and compilation."""
    import tensorflow as tf

    return tf.random.stateless_normal([m, k], seed=list(SEED), dtype=tf.float32, alg="philox")


def pack_signs(signs: np.ndarray) -> np.ndarray:
    """k x n array of +/-1 -> ceil(k/8) x n uint8 (bit j of byte i holds row 8 i + j)."""
    return np.packbits(signs > 0, axis=0, bitorder="little")


def unpack_signs(packed: np.ndarray, k: int) -> np.ndarray:
    """The inverse of ``pack_signs``: k x n float32 array of +/-1."""
    bits = np.unpackbits(np.asarray(packed, np.uint8), axis=0, count=k, bitorder="little")
    return 2.0 * bits.astype(np.float32) - 1.0


def pack_signs_tf(signs: Any) -> Any:
    """``pack_signs`` in TF ops (signs: k x n float tensor of +/-1)."""
    import tensorflow as tf

    k, n = signs.shape
    bits = tf.cast(signs > 0, tf.int32)
    bits = tf.pad(bits, [[0, -k % 8], [0, 0]])
    weights = tf.constant([1 << j for j in range(8)], tf.int32)[None, :, None]
    return tf.cast(tf.reduce_sum(tf.reshape(bits, [-1, 8, n]) * weights, axis=1), tf.uint8)


def unpack_signs_tf(packed: Any, k: int) -> Any:
    """``unpack_signs`` in TF ops (XLA-friendly shifts and masks)."""
    import tensorflow as tf

    shifts = tf.range(8, dtype=tf.int32)[None, :, None]
    bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(tf.cast(packed, tf.int32)[:, None, :], shifts), 1)
    bits = tf.reshape(bits, [-1, packed.shape[-1]])[:k]
    return 2.0 * tf.cast(bits, tf.float32) - 1.0


def column_scale(a_norms: Any, sketch_norms: Any, where: Any) -> Any:
    """``||A[:, j]|| / ||(R S)[:, j]||``, 0 where the denominator is 0 (numpy or TF via ``where``)."""
    safe = where(sketch_norms > 0, sketch_norms, 1.0)
    return where(sketch_norms > 0, a_norms / safe, 0.0)


@final
class Simhash(Transform):
    """Sign bits of a Gaussian projection plus a per-column scale; R regenerated from a seed."""

    name = "simhash"
    option = 2

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        rank = int(self.hparams["rank"])
        k = sketch_size(m, n, rank)
        rows = -(-k // 8)
        return plan_or_refusal(
            m, n, k, rows * n + n, rows * n + FLOAT_BYTES * n, {"sign_bytes_per_column": rows},
            f"rank={rank} gives k={k} sign bits per column on {m}x{n}", self.allow_larger)

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        assert plan.k is not None
        return [FactorSpec("signs", (-(-plan.k // 8), plan.n), "uint8", False),
                FactorSpec("scale", (plan.n,), "float32", False)]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        assert plan.k is not None
        a = np.asarray(matrix, np.float64)
        r = np.asarray(projection(plan.m, plan.k), np.float64)
        signs = np.where(r.T @ a >= 0, 1.0, -1.0)
        scale = column_scale(np.linalg.norm(a, axis=0), np.linalg.norm(r @ signs, axis=0), np.where)
        return {"signs": pack_signs(signs), "scale": scale.astype(np.float32)}

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        import tensorflow as tf

        assert plan.k is not None
        a = tf.cast(matrix, tf.float32)
        r = projection(plan.m, plan.k)
        signs = tf.where(tf.matmul(r, a, transpose_a=True) >= 0, 1.0, -1.0)
        scale = column_scale(tf.norm(a, axis=0), tf.norm(tf.matmul(r, signs), axis=0), tf.where)
        return {"signs": pack_signs_tf(signs), "scale": scale}

    def _second(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        """S D (k x n)."""
        assert plan.k is not None
        return unpack_signs_tf(factors["signs"], plan.k) * factors["scale"][None, :]

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        import tensorflow as tf

        assert plan.k is not None
        return tf.matmul(projection(plan.m, plan.k), self._second(factors, plan))

    def matmul(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        assert plan.k is not None
        return right_matmul(right_matmul(x, projection(plan.m, plan.k)), self._second(factors, plan))

    def flops(self, plan: SizePlan) -> int:
        assert plan.k is not None
        return 2 * plan.k * (plan.m + plan.n)

    def low_rank(self, factors: Mapping[str, Any], plan: SizePlan) -> tuple[Any, Any]:
        assert plan.k is not None
        return projection(plan.m, plan.k), self._second(factors, plan)

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        assert plan.k is not None
        r = np.asarray(projection(plan.m, plan.k))
        return r @ (unpack_signs(values["signs"], plan.k) * np.asarray(values["scale"])[None, :])
