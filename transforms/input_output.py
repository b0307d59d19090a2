"""Input/output compression (reference option 9, ``InputOutputCompressionOp``).

Math. With ``ibs = input_block_size``, ``fi = input_compression_factor``, ``obs = output_block_size``
and ``fo = output_compression_factor``, the m x n weight is replaced outright (no alpha, the original
weight is not used) by

    W_c = blockdiag(B, ..., B) @ C @ blockdiag(D, ..., D)
          (m/ibs copies of B: ibs x ibs/fi)  (C: m/fi x n/fo)  (n/obs copies of D: obs/fo x obs)

B is present only with ``compress_input`` and D only with ``compress_output``. The product with
x of shape [..., m] follows ``get_apply_matmul``: reshape x to [..., m/ibs, ibs], multiply by B and
flatten to [..., m/fi]; multiply by C, giving [..., n/fo]; reshape to [..., n/obs, obs/fo], multiply
by D and flatten to [..., n]. Parameters: ``ibs^2/fi + (m/fi)(n/fo) + obs^2/fo``.

Initial values ignore the weight, as in the reference: ``uniform(+-sqrt(3 / max(1, (rows + cols) /
2)))`` for B and D, and ``(rows + cols) / (2 fi)`` in C's limit, drawn from a fixed seed.
Trainable flags: ``is_b/c/d_matrix_trainable``.

With calibration data (``factorize_calibrated``; ``G_d`` the damped Gram of the site's input rows,
graphrewrite.whiten) the start is fitted to the weight's outputs instead, blockwise PCA then least
squares: D's rows are the leading ``obs/fo`` eigenvectors of the output Gram ``A^T G_d A`` averaged
over its diagonal obs x obs blocks (Q = blockdiag(D), orthonormal rows); B's columns the leading
``ibs/fi`` generalised eigenvectors of ``(H, G)``, the block averages of ``H = G_d A Q^T Q A^T G_d``
and of ``G_d`` (the input directions that carry most of the kept output, exact for a single block);
and ``C = (P^T G_d P)^-1 P^T G_d A Q^T`` with P = blockdiag(B), the least-squares optimum of
``||S (A - P C Q)||_F`` for those projections.

Differences from the reference: none in the algebra. Sizes that do not divide, or a compression factor
without the matching ``compress_*`` flag (its C would not fit the input), are refused here instead of
failing inside TF; the weight-independent initial values come from NumPy's seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite import whiten
from graphrewrite.transforms._common import (
    FLOAT_BYTES,
    dense_by_identity,
    divisibility,
    on_rows,
    plan_or_refusal,
    tf_constants,
    uniform_init,
    xavier_limit,
)
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform


@final
class InputOutput(Transform):
    """A shared blockwise input projection B, a smaller C and a shared blockwise output projection D."""

    name = "input_output"
    option = 9
    blended = False

    def _sizes(self) -> tuple[bool, bool, int, int, int, int]:
        hp = self.hparams
        return (bool(hp["compress_input"]), bool(hp["compress_output"]), int(hp["input_block_size"]),
                int(hp["input_compression_factor"]), int(hp["output_block_size"]),
                int(hp["output_compression_factor"]))

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        ci, co, ibs, fi, obs, fo = self._sizes()
        for side, on, factor in (("input", ci, fi), ("output", co, fo)):
            if not on and factor != 1:
                return Refusal(f"{side}_compression_factor={factor} needs compress_{side}=True")
        pairs = [("input_block_size", ibs, m, "rows"),
                 ("input_compression_factor", fi, ibs, "entries of an input block")] if ci else []
        pairs += [("output_block_size", obs, n, "columns"),
                  ("output_compression_factor", fo, obs, "entries of an output block")] if co else []
        refusal = divisibility(pairs)
        if refusal:
            return refusal
        shapes = {"b": [ibs, ibs // fi] if ci else None, "c": [m // fi, n // fo],
                  "d": [obs // fo, obs] if co else None}
        params = sum(int(np.prod(s)) for s in shapes.values() if s)
        return plan_or_refusal(m, n, None, params, FLOAT_BYTES * params, shapes,
                               f"input_compression_factor={fi}, output_compression_factor={fo} on {m}x{n}",
                               self.allow_larger)

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        hp = self.hparams
        return [FactorSpec(name, tuple(plan.details[name]), "float32",
                           bool(hp[f"is_{name}_matrix_trainable"]))
                for name in ("b", "c", "d") if plan.details[name]]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        fi = int(self.hparams["input_compression_factor"])
        divisors = {"b": 2.0, "c": 2.0 * fi, "d": 2.0}
        return uniform_init([(s.name, s.shape, xavier_limit(*s.shape, divisors[s.name]))
                             for s in self.factor_specs(plan)])

    def factorize_calibrated(self, matrix: np.ndarray, plan: SizePlan, gram: np.ndarray) -> dict[str, np.ndarray]:
        import scipy.linalg

        ci, co, ibs, fi, obs, fo = self._sizes()
        a, g = np.asarray(matrix, np.float64), whiten.damped(gram)
        g = np.diag(g) if g.ndim == 1 else g  # a lookup table's diagonal Gram
        out = {}
        q = np.eye(plan.n)
        if co:
            d = _leading(_block_mean(a.T @ g @ a, obs), obs // fo).T
            q = np.kron(np.eye(plan.n // obs), d)
            out["d"] = d
        p = np.eye(plan.m)
        if ci:
            h = g @ a @ q.T @ q @ a.T @ g
            b = _leading(_block_mean(h, ibs), ibs // fi, _block_mean(g, ibs))
            p = np.kron(np.eye(plan.m // ibs), b)
            out["b"] = b
        gp = p.T @ g
        out["c"] = scipy.linalg.solve(gp @ p, gp @ a @ q.T, assume_a="pos", check_finite=False)
        return {name: value.astype(np.float32) for name, value in out.items()}

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        return tf_constants(self.factorize(np.zeros((plan.m, plan.n), np.float32), plan))

    def matmul(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        return on_rows(x, plan.n, lambda rows: self._rows(rows, factors, plan))

    def _rows(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        """The product for x of shape [rows, m]."""
        import tensorflow as tf

        def blockwise(h: Any, weight: Any, width: int) -> Any:
            size = weight.shape[0]
            h = tf.matmul(tf.reshape(h, [-1, h.shape[-1] // size, size]), tf.cast(weight, x.dtype))
            return tf.reshape(h, [-1, width])

        h = blockwise(x, factors["b"], plan.details["c"][0]) if "b" in factors else x
        h = tf.matmul(h, tf.cast(factors["c"], x.dtype))
        return blockwise(h, factors["d"], plan.n) if "d" in factors else h

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        return dense_by_identity(lambda eye: self._rows(eye, factors, plan), plan.m)

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        w = np.asarray(values["c"], np.float32)
        if "b" in values:
            w = np.kron(np.eye(plan.m // values["b"].shape[0], dtype=np.float32), values["b"]) @ w
        if "d" in values:
            w = w @ np.kron(np.eye(plan.n // values["d"].shape[1], dtype=np.float32), values["d"])
        return w


def _block_mean(matrix: np.ndarray, size: int) -> np.ndarray:
    """The mean of the diagonal size x size blocks of a square matrix."""
    count = matrix.shape[0] // size
    return np.mean([matrix[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(count)], axis=0)


def _leading(matrix: np.ndarray, count: int, metric: np.ndarray | None = None) -> np.ndarray:
    """The ``count`` leading (generalised, with ``metric``) eigenvectors, as columns."""
    import scipy.linalg

    _, vectors = scipy.linalg.eigh(matrix, metric, check_finite=False)
    return vectors[:, ::-1][:, :count]
