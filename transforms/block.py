"""Block-diagonal compression (reference option 10, ``BlockCompressionOp``).

Math. With ``nb = block_compression_factor`` (dividing m and n), the m x n weight is replaced outright
(no alpha) by a block-diagonal matrix of nb blocks of size m/nb x n/nb:

    W_c = blockdiag(C_0, ..., C_{nb-1}),   y = concat_i(x_i @ C_i)

where x_i is the i-th contiguous chunk of x's last axis. Two layouts, as in the reference:

* ``block_method='loop'``: ``c`` has shape [nb, m/nb, n/nb] and the product is taken block by block.
* ``block_method='mask'``: ``c`` is a dense m x n matrix and ``W_c = c * M`` with the block mask
  ``M[i, j] = 1`` iff ``j // (n/nb) == i // (m/nb)`` (m n / nb ones). M is computed from the shape,
  not stored.

Both give ``m n / nb`` effective parameters; ``mask`` stores all m n entries of ``c`` (``details``
records what is stored), so the size check judges both by the effective count. Initial values ignore
the weight: ``uniform(+-sqrt(3 / max(1, (m + n) / (2 nb))))`` from a fixed seed (the same limit for
both layouts). ``c`` is trainable per ``is_c_matrix_trainable``.

Differences from the reference:

* Its ``'loop'`` method, the default, used ``num_blocks`` before assigning it (``UnboundLocalError``,
  §7); here it works, with the mask method's initialiser limit.
* Its mask is a stored non-trainable variable ``c_mask``; here it is a constant computed from the shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite.transforms._common import (
    FLOAT_BYTES,
    dense_by_identity,
    divisibility,
    on_rows,
    plan_or_refusal,
    right_matmul,
    tf_constants,
    uniform_init,
    xavier_limit,
)
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform


def block_mask(m: int, n: int, blocks: int) -> np.ndarray:
    """The m x n 0/1 float32 block-diagonal mask of ``blocks`` blocks."""
    rows = np.arange(m)[:, None] // (m // blocks)
    cols = np.arange(n)[None, :] // (n // blocks)
    return (rows == cols).astype(np.float32)


@final
class BlockDiagonal(Transform):
    """nb diagonal blocks of size m/nb x n/nb; every other weight entry is zero."""

    name = "block"
    option = 10
    blended = False

    @property
    def blocks(self) -> int:
        return int(self.hparams["block_compression_factor"])

    @property
    def method(self) -> str:
        return str(self.hparams["block_method"])

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        nb = self.blocks
        refusal = divisibility([("block_compression_factor", nb, m, "rows"),
                                ("block_compression_factor", nb, n, "columns")])
        if refusal:
            return refusal
        params = m * n // nb
        stored = m * n if self.method == "mask" else params
        return plan_or_refusal(
            m, n, None, params, FLOAT_BYTES * params,
            {"blocks": nb, "method": self.method, "stored_values": stored,
             "stored_bytes": FLOAT_BYTES * stored},
            f"block_compression_factor={nb} on {m}x{n}", self.allow_larger)

    def flops(self, plan: SizePlan) -> int:
        return 2 * plan.m * plan.n // (self.blocks if self.method == "loop" else 1)

    def export_form(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> tuple[Transform, dict[str, np.ndarray]]:
        """The ``mask`` method's dense C becomes the ``loop`` method's diagonal blocks."""
        if self.method == "loop":
            return self, dict(values)
        nb, rows, cols = self.blocks, plan.m // self.blocks, plan.n // self.blocks
        c = np.asarray(values["c"])
        blocks = np.stack([c[i * rows:(i + 1) * rows, i * cols:(i + 1) * cols] for i in range(nb)])
        loop = BlockDiagonal({**self.hparams, "block_method": "loop"}, allow_larger=self.allow_larger)
        return loop, {"c": blocks}

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        nb, m, n = self.blocks, plan.m, plan.n
        shape = (m, n) if self.method == "mask" else (nb, m // nb, n // nb)
        return [FactorSpec("c", shape, "float32", bool(self.hparams["is_c_matrix_trainable"]))]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        (spec,) = self.factor_specs(plan)
        return uniform_init([("c", spec.shape, xavier_limit(plan.m, plan.n, 2.0 * self.blocks))])

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        return tf_constants(self.factorize(np.zeros((plan.m, plan.n), np.float32), plan))

    def _loop_rows(self, x: Any, c: Any) -> Any:
        """The block product for x of shape [rows, m] and c of shape [nb, m/nb, n/nb]."""
        import tensorflow as tf

        nb, size_in, size_out = c.shape
        chunks = tf.reshape(x, [-1, nb, size_in])
        return tf.reshape(tf.einsum("rbi,bio->rbo", chunks, tf.cast(c, x.dtype)), [-1, nb * size_out])

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        if self.method == "mask":
            return factors["c"] * block_mask(plan.m, plan.n, self.blocks)
        return dense_by_identity(lambda eye: self._loop_rows(eye, factors["c"]), plan.m)

    def matmul(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        if self.method == "mask":
            return right_matmul(x, self.dense(factors, plan))
        return on_rows(x, plan.n, lambda rows: self._loop_rows(rows, factors["c"]))

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        import scipy.linalg

        c = np.asarray(values["c"], np.float32)
        if self.method == "mask":
            return c * block_mask(plan.m, plan.n, self.blocks)
        return scipy.linalg.block_diag(*c)
