"""Low-rank factorisation (reference option 1, ``LowRankDecompMatrixCompressor``).

Math. For the m x n weight ``W`` and the reference's ``rank`` hyperparameter r (a compression
factor x 100, not a rank):

    k = min(m, n, ceil(min(m, n) * 100 / r))
    U, s, V^T = svd(W)                    (LAPACK gesdd, economy size)
    B = U[:, :k] diag(sqrt(s[:k]))        (m x k)
    C = diag(sqrt(s[:k])) V^T[:k, :]      (k x n)

so ``B @ C`` is the best rank-k approximation of ``W`` in Frobenius norm, with the singular values
split evenly between the factors. For large matrices the leading triplets come from cheaper exact
or near-exact methods, recorded as ``details.svd`` in the manifest: ``gram`` for tall or wide ones
(at least twice as long as wide: the eigendecomposition of the small Gram matrix, one pass over W),
``randomized`` for big square-ish ones where k is at most an eighth of min(m, n) (a randomized range
finder with power iterations); measured on 2 cores, each is 1.5-4x faster than gesdd where chosen,
and slower elsewhere (``benchmarks/bench_rewrite_time.py``). The blended weight is ``alpha * A + (1 - alpha) * B @ C``; the
product with an input is taken as ``(x @ B) @ C``, which costs ``k (m + n)`` per row instead of
``m n``. Parameters after: ``m k + k n``; a site where that is not below ``m n`` is refused.

With calibration data (``factorize_calibrated``), B and C instead minimise the damped output-space
error ``tr((A - BC)^T (G + lambda I) (A - BC))`` for the Gram ``G`` of the site's input rows:
``S^T S = G + lambda I`` (Cholesky), ``S A = U diag(s) V^T``, ``B = S^-1 U_k sqrt(s_k)``,
``C = sqrt(s_k) V_k^T`` (graphrewrite.whiten has the derivation and the damping).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite import whiten
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform


def compressed_rank(m: int, n: int, rank: int) -> int:
    """The reference's ``compute_compressed_rank_from_matrix_shape`` (exact integer arithmetic)."""
    return min(m, n, -(-min(m, n) * 100 // rank))


def svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Economy SVD by LAPACK gesdd, falling back to the slower but always-converging gesvd."""
    import scipy.linalg  # here, not at the top: the command line's argument checks must not wait for it

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
    q = _orthonormal(a @ probes)
    for _ in range(power_iterations):
        q = _orthonormal(a @ _orthonormal(a.T @ q))
    u_small, s, vt = svd(q.T @ a)
    u = q @ u_small
    u, s, vt = u[:, :k], s[:k], vt[:k]
    return (vt.T, s, u.T) if flip else (u, s, vt)


def _orthonormal(columns: np.ndarray) -> np.ndarray:
    """An orthonormal basis of the columns (float32 LAPACK QR, in place: no float64 copies)."""
    import scipy.linalg

    q, _ = scipy.linalg.qr(columns, mode="economic", overwrite_a=True, check_finite=False)
    return q


def gram_svd(matrix: np.ndarray, k: int, chunk_entries: int = 1 << 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The leading k singular triplets of a tall (or wide) matrix from its small Gram matrix.

    With A m x n, m >> n: ``A^T A = V S^2 V^T`` (n x n, accumulated in float64 over row chunks), and
    ``U_k = A V_k S_k^-1``. It never copies A whole, so its memory is O(n^2 + m k), and it costs
    about one pass over A; singular values below ~1e-8 of the largest are not resolved, which only
    matters for factors that hold nothing.
    """
    a = np.asarray(matrix, np.float32)
    flip = a.shape[0] < a.shape[1]
    if flip:
        a = a.T
    rows, n = a.shape
    gram = np.zeros((n, n), np.float64)
    step = max(1, chunk_entries // n)
    for start in range(0, rows, step):
        block = a[start:start + step].astype(np.float64)
        gram += block.T @ block
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:k]
    s = np.sqrt(np.maximum(values[order], 0.0))
    v = vectors[:, order].astype(np.float32)
    u = (a @ v) / np.where(s > 0, s, 1.0).astype(np.float32)
    return (v, s, u.T) if flip else (u, s, v.T)


def svd_method(m: int, n: int, k: int) -> str:
    """``gram`` for tall or wide matrices, ``randomized`` where k is well below min(m, n), else ``full``.

    Measured on 2 cores (float32, gesdd): 3072x768 gram 0.16 s vs 0.37 s, 2048x1024 0.22 vs 0.45;
    2048x2048 at k=128 randomized 0.68 vs 1.37, 4096x4096 at k=256 2.4 vs 11.1; but at k = min/4
    (768x768, k=192) randomized takes 0.27 s against gesdd's 0.08, so it is not used there.
    """
    small, large = min(m, n), max(m, n)
    if large >= 2 * small and small <= 4096 and m * n >= 1 << 18:
        return "gram"
    return "randomized" if use_randomized(m, n, k) else "full"


def use_randomized(m: int, n: int, k: int) -> bool:
    """A randomized SVD where k is far below min(m, n) and the matrix is big enough to matter."""
    return 8 * k <= min(m, n) and m * n >= 1 << 20


def split_factors(u: np.ndarray, s: np.ndarray, vt: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """B = U_k sqrt(S_k), C = sqrt(S_k) V_k^T."""
    root = np.sqrt(s[:k])
    return u[:, :k] * root[None, :], root[:, None] * vt[:k, :]


@final
class LowRank(Transform):
    """Truncated SVD into B (m x k) and C (k x n)."""

    name = "low_rank"
    option = 1
    outputs_suffice = True

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
        return SizePlan(m, n, k, after, {"svd": svd_method(m, n, k)})

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        assert plan.k is not None
        return [
            FactorSpec("b", (plan.m, plan.k), "float32", bool(self.hparams["is_b_matrix_trainable"])),
            FactorSpec("c", (plan.k, plan.n), "float32", bool(self.hparams["is_c_matrix_trainable"])),
        ]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        assert plan.k is not None
        method = svd_method(plan.m, plan.n, plan.k)
        if method == "gram":
            u, s, vt = gram_svd(matrix, plan.k)
        elif method == "randomized":
            u, s, vt = randomized_svd(matrix, plan.k)
        else:
            u, s, vt = svd(np.asarray(matrix, dtype=np.float32))
        b, c = split_factors(u, s, vt, plan.k)
        return {"b": b.astype(np.float32), "c": c.astype(np.float32)}

    def factorize_calibrated(self, matrix: np.ndarray, plan: SizePlan, gram: np.ndarray) -> dict[str, np.ndarray]:
        assert plan.k is not None
        b, c = whiten.low_rank(matrix, gram, plan.k)
        return {"b": b, "c": c}

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
