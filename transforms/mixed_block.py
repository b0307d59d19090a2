"""Mixed block compression (reference option 12, ``MixedBlockCompressionOp``).

Math. With ``nb = compression_factor`` (dividing m and n) and ``nbases = num_bases``, the m x n
weight is replaced outright (no alpha) by block matrices ``BM`` ([m/nb, n/nb, nb]) and a linear mixer
``L`` ([nb, nb, nbases]). For x of shape [..., m], as in ``get_apply_matmul``:

    x3[..., b, c] = x[..., b nb + c]                       (a strided split: block c holds c, c+nb, ...)
    inter[..., d, c] = sum_b x3[..., b, c] BM[b, d, c]
    y[..., i (n/nb) + d] = sum_j sum_k inter[..., d, j] L[i, j, k]   (output blocks concatenated)

so ``W_c[b nb + c, i (n/nb) + d] = BM[b, d, c] * Lsum[i, c]`` with ``Lsum = sum_k L[:, :, k]``: the
bases only ever appear summed. Parameters: ``m n / nb + nb^2 nbases``.

Initial values ignore the weight: BM ``uniform(+-sqrt(3 / max(1, (m + n) / 2)))`` and L
``uniform(+-sqrt(3 / nb))``, from a fixed seed; both always trainable, as in the reference.

Differences from the reference: its products over L are Python loops (a TPU latency choice); here
they are one einsum with the same result. Its ``get_einsum_operator`` split the input contiguously,
inconsistent with ``get_apply_matmul``; only the strided split of ``get_apply_matmul`` is used here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite.transforms._common import (
    FLOAT_BYTES,
    divisibility,
    on_rows,
    plan_or_refusal,
    tf_constants,
    uniform_init,
    xavier_limit,
)
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform


@final
class MixedBlock(Transform):
    """nb block matrices on a strided split of the input, mixed linearly into nb output blocks."""

    name = "mixed_block"
    option = 12
    blended = False

    @property
    def blocks(self) -> int:
        return int(self.hparams["compression_factor"])

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        nb, bases = self.blocks, int(self.hparams["num_bases"])
        refusal = divisibility([("compression_factor", nb, m, "rows"),
                                ("compression_factor", nb, n, "columns")])
        if refusal:
            return refusal
        params = m * n // nb + nb * nb * bases
        return plan_or_refusal(m, n, None, params, FLOAT_BYTES * params, {"blocks": nb, "bases": bases},
                               f"compression_factor={nb}, num_bases={bases} on {m}x{n}", self.allow_larger)

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        nb = self.blocks
        return [FactorSpec("block_matrices", (plan.m // nb, plan.n // nb, nb), "float32", True),
                FactorSpec("linear_mixer", (nb, nb, int(plan.details["bases"])), "float32", True)]

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        bm, mixer = self.factor_specs(plan)
        return uniform_init([(bm.name, bm.shape, xavier_limit(plan.m, plan.n)),
                             (mixer.name, mixer.shape, xavier_limit(self.blocks, self.blocks))])

    def factorize_tf(self, matrix: Any, plan: SizePlan) -> dict[str, Any]:
        return tf_constants(self.factorize(np.zeros((plan.m, plan.n), np.float32), plan))

    def _rows(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        """The product for x of shape [rows, m]."""
        import tensorflow as tf

        nb = self.blocks
        strided = tf.reshape(x, [-1, plan.m // nb, nb])
        inter = tf.einsum("rbc,bdc->rdc", strided, tf.cast(factors["block_matrices"], x.dtype))
        mixer = tf.reduce_sum(tf.cast(factors["linear_mixer"], x.dtype), axis=2)
        return tf.reshape(tf.einsum("rdj,ij->rid", inter, mixer), [-1, plan.n])

    def matmul(self, x: Any, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        return on_rows(x, plan.n, lambda rows: self._rows(rows, factors, plan))

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        import tensorflow as tf

        mixer = tf.reduce_sum(factors["linear_mixer"], axis=2)
        return tf.reshape(tf.einsum("bdc,ic->bcid", factors["block_matrices"], mixer), [plan.m, plan.n])

    def numpy_dense(self, values: Mapping[str, np.ndarray], plan: SizePlan) -> np.ndarray:
        mixer = np.asarray(values["linear_mixer"]).sum(axis=2)
        return np.einsum("bdc,ic->bcid", np.asarray(values["block_matrices"]), mixer).reshape(plan.m, plan.n)
