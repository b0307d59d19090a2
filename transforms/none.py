"""No compression (reference option 0, ``NO_MATRIX_COMPRESSION``).

Math: none. The reference's ``get_apply_compression`` returns None for this option; graphrewrite
rewrites no site, says so, and writes an unchanged copy of the input model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import numpy as np

from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform


@final
class NoCompression(Transform):
    """Refuses every site: compression_option=0 asks for no rewrite."""

    name = "none"
    option = 0

    def check(self, m: int, n: int) -> SizePlan | Refusal:
        return Refusal("compression_option=0: no compression requested")

    def factor_specs(self, plan: SizePlan) -> list[FactorSpec]:
        return []

    def factorize(self, matrix: np.ndarray, plan: SizePlan) -> dict[str, np.ndarray]:
        return {}

    def dense(self, factors: Mapping[str, Any], plan: SizePlan) -> Any:
        raise NotImplementedError("option 0 builds no compressed weight")
