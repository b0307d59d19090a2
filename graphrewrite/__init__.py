"""graphrewrite: post-hoc compression of trained TensorFlow SavedModels.

``graphrewrite compress in_model out_model --rank=200`` rewrites every weight-bearing op of a
SavedModel to read its weight through compression_lib's alpha-gated compressed form; this package
also holds what fine-tuning the result needs. TensorFlow is imported lazily, on first use of a name
below, so that the command line answers ``--help`` at once.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compress": ("graphrewrite.rewriting.pipeline", "compress"),
    "CompressResult": ("graphrewrite.rewriting.pipeline", "CompressResult"),
    "compression_update": ("graphrewrite.training.update", "compression_update"),
    "resolve_hparams": ("graphrewrite.hparams", "resolve"),
    "schedule_for_steps": ("graphrewrite.hparams", "schedule_for_steps"),
    "read_manifest": ("graphrewrite.rewriting.manifest", "read_dir"),
    "CompressionCallback": ("graphrewrite.training.hooks", "CompressionCallback"),
    "CompressionHook": ("graphrewrite.training.hooks", "CompressionHook"),
    "RewrittenLayer": ("graphrewrite.training.hooks", "RewrittenLayer"),
    "export": ("graphrewrite.rewriting.exporting", "export"),
    "ExportResult": ("graphrewrite.rewriting.exporting", "ExportResult"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'graphrewrite' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
