"""Compression methods, one module each, in one explicit ordered registry.

``REGISTRY`` maps the reference's ``compression_option`` number to the method class; ``BY_NAME`` maps
the readable name used by ``--method``. No import-time registration magic: adding a method means
adding it to the tuple below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphrewrite.errors import UsageError
from graphrewrite.transforms.base import FactorSpec, Refusal, SizePlan, Transform
from graphrewrite.transforms.block import BlockDiagonal
from graphrewrite.transforms.dictionary import DictionaryLearning
from graphrewrite.transforms.input_output import InputOutput
from graphrewrite.transforms.kmeans import KMeans
from graphrewrite.transforms.kmeans_pruning import KMeansPruning
from graphrewrite.transforms.low_rank import LowRank
from graphrewrite.transforms.mixed_block import MixedBlock
from graphrewrite.transforms.none import NoCompression
from graphrewrite.transforms.simhash import Simhash

# In the reference's compression_option order.
_ORDERED: tuple[type[Transform], ...] = (
    NoCompression, LowRank, Simhash, DictionaryLearning, KMeans, KMeansPruning, InputOutput,
    BlockDiagonal, MixedBlock)

REGISTRY: dict[int, type[Transform]] = {t.option: t for t in _ORDERED}
BY_NAME: dict[str, type[Transform]] = {t.name: t for t in _ORDERED}


def make(hparams: Mapping[str, Any], allow_larger: bool = False) -> Transform:
    """The method selected by ``hparams['compression_option']``, configured with ``hparams``."""
    option = int(hparams["compression_option"])
    if option not in REGISTRY:
        known = ", ".join(f"{o} ({t.name})" for o, t in REGISTRY.items())
        raise UsageError(f"compression_option={option} is not available; available: {known}")
    return REGISTRY[option](hparams, allow_larger=allow_larger)


__all__ = ["BY_NAME", "REGISTRY", "FactorSpec", "Refusal", "SizePlan", "Transform", "make"]
