"""Low-rank factorisation (reference option 1, ``LowRankDecompMatrixCompressor``).

Math. For the m x n weight ``W`` and the reference's ``rank`` hyperparameter r (a compression
factor x 100, not a rank):

    k = min(m, n, ceil(min(m, n) * 100 / r))
    U, s, V^T = svd(W)                    (LAPACK gesdd, economy size)
    B = U[:, :k] diag(sqrt(s[:k]))        (m x k)
    C = diag(sqrt(s[:k])) V^T[:k, :]      (k x n)

so ``B @ C`` is the best rank-k approximation of ``W`` in Frobenius norm, with the singular values
split evenly between the factors. Where k is at most a quarter of min(m, n) (and the matrix has at
least 2^18 entries) the leading triplets come from a randomized SVD instead (``randomized_svd``),
recorded as ``details.svd`` in the manifest. The blended weight is ``alpha * A + (1 - alpha) * B @ C``; the
product with an input is taken as ``(x @ B) @ C``, which costs ``k (m + n)`` per row instead of
``m n``. Parameters after: ``m k + k n``; a site where that is not below ``m n`` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np
import scipy.linalg

from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform


def compressed_rank(m: int, n: int, rank: int) -> int:
    """The reference's ``compute_compressed_rank_from_matrix_shape`` (exact integer arithmetic)."""
    return min(m, n, -(-min(m, n) * 100 // rank))


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Economy SVD by LAPACK gesdd, falling back to the slower but always-converging gesvd."""
    try:
        return scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:
        return scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd", check_finite=False)


def randomized_svd(matrix: np.ndarray, k: int, oversample: int | None = None, power_iterations: int = 4,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading k singular triplets by a randomized range finder (Halko, Martinsson, Tropp).

    ``k + oversample`` Gaussian probes (by default ``max(10, k // 2)`` extra),
    ``power_iterations`` re-orthonormalised power steps, then
    an exact SVD of the small projected matrix: for k well below min(m, n) far cheaper than a full
    SVD, and within a fraction of a percent of its error even for flat spectra (tests/test_low_rank).
    """
    a = np.asarray(matrix, np.float32)
    flip = a.shape[0] < a.shape[1]
    if flip:
        a = a.T
    width = min(k + (max(10, k // 2) if oversample is None else oversample), min(a.shape))
    probes = np.random.default_rng(seed).standard_normal((a.shape[1], width)).astype(np.float32)
    q, _ = np.linalg.qr(a @ probes)
    for _ in range(power_iterations):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    u_small, s, vt = svd(q.T @ a)
    u = q @ u_small
    u, s, vt = u[:, :k], s[:k], vt[:k]
    return (vt.T, s, u.T) if flip else (u, s, vt)


def use_randomized(m: int, n: int, k: int) -> bool:
    """A randomized SVD where k is well below min(m, n) and the matrix is big enough to matter."""
    return 4 * k <= min(m, n) and m * n >= 1 << 18


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """B = U_k sqrt(S_k), C = sqrt(S_k) V_k^T."""
    root = np.sqrt(s[:k])
    return u[:, :k] * root[None, :], root[:, None] * vt[:k, :]


@final
class LowRank(Transform):
    """Truncated SVD into B (m x k) and C (k x n)."""

    name = "low_rank"
    option = 1

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        return self.with_k(m, n, self.choose_k(m, n), f"rank={int(self.hparams['rank'])}")

    def choose_k(self, m: int, n: int) -> int:
        return compressed_rank(m, n, int(self.hparams["rank"]))

    def with_k(self, m: int, n: int, k: int, why: str) -> SizePlan | Refusal:
        """The plan for a given k (chosen by ``why``, e.g. ``rank=200`` or ``energy=0.95``)."""
        after = m * k + k * n
        if after >= m * n and not self.allow_larger:
            return Refusal(
                f"{why} gives k={k} on {m}x{n}: factors ({after} parameters) would not be "
                f"smaller than the weight ({m * n})"
            )
        return SizePlan(m, n, k, after, {"svd": "randomized" if use_randomized(m, n, k) else "full"})

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        assert plan.k is not None
        return [
            FactorSpec("b", (plan.m, plan.k), "float32", bool(self.hparams["is_b_matrix_trainable"])),
            FactorSpec("c", (plan.k, plan.n), "float32", bool(self.hparams["is_c_matrix_trainable"])),
        ]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        assert plan.k is not None
        if use_randomized(plan.m, plan.n, plan.k):
            u, s, vt = randomized_svd(matrix, plan.k)
        else:
            u, s, vt = svd(np.asarray(matrix, dtype=np.float32))
        b, c = split_factors(u, s, vt, plan.k)
        return {"b": b.astype(np.float32), "c": c.astype(np.float32)}

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        import tensorflow as tf

        s, u, v = tf.linalg.svd(tf.cast(matrix, tf.float32))
        root = tf.sqrt(s[: plan.k])
        return {"b": u[:, : plan.k] * root[None, :], "c": root[:, None] * tf.transpose(v)[: plan.k, :]}

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        import tensorflow as tf

        return tf.matmul(factors["b"], factors["c"])

    def matmul(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        import tensorflow as tf

        b = tf.cast(factors["b"], x.dtype)
        c = tf.cast(factors["c"], x.dtype)
        if x.shape.rank == 2:
            return tf.matmul(tf.matmul(x, b), c)
        return tf.tensordot(tf.tensordot(x, b, axes=[[-1], [0]]), c, axes=[[-1], [0]])

    def flops(self, plan: SizePlan) -> int:
        assert plan.k is not None
        return 2 * plan.k * (plan.m + plan.n)

    def low_rank(self, factors: Mapping[str, Any], plan: SizePlan) -> tuple[Any, Any]:
        return factors["b"], factors["c"]

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        return values["b"] @ values["c"]
