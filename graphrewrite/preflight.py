"""Checks of paths that need no TensorFlow, so that the commonest mistakes answer at once.

Importing TensorFlow takes 15-20 s; a typo'd input path or an output that cannot be written must
not wait for it. These checks look at the file system only; ``scan`` and the loader check the rest.
"""

from __future__ import annotations

import os

from graphrewrite.errors import InputModelError


def model_dir(path: str) -> None:
    """``path`` is a directory holding ``saved_model.pb`` or ``saved_model.pbtxt``.

    Raises:
      InputModelError: naming what is wrong (missing, a file, empty, no saved_model.pb).
    """
    if not os.path.exists(path):
        raise InputModelError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        raise InputModelError(f"{path}: is a file, not a SavedModel directory")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
        if not os.listdir(path):
            raise InputModelError(f"{path}: empty directory, not a SavedModel")
        raise InputModelError(f"{path}: not a SavedModel (no saved_model.pb)")


def variables_missing(path: str) -> str | None:
    """Why the model's weights cannot be there (``variables/`` is missing), or None."""
    if os.path.isdir(os.path.join(path, "variables")):
        return None
    return (f"{path}: variables/ is missing (the directory of the model's weights: "
            "variables/variables.index and variables/variables.data-*)")


def weights(path: str) -> None:
    """A model to load has its ``variables/`` directory.

    Raises:
      InputModelError: "variables/ is missing", rather than TensorFlow's TensorSliceReader text.
    """
    why = variables_missing(path)
    if why is not None:
        raise InputModelError(why)
