"""Imports TensorFlow on first need; for the command line, without its start-up and C++ log lines.

TensorFlow prints CUDA probing, absl notices and C++ warnings (graph_constructor's
"_output_shapes" during export) on stderr, before or beside any Python logging setting.
graphrewrite's command line promises one clear line on stderr for every failure, so it asks for
quiet (``quiet_tensorflow``) unless ``-v`` or ``GRAPHREWRITE_DEBUG`` is set; library users keep their
own settings and TensorFlow's usual output.
"""

from __future__ import annotations

import os
import sys

_SETTINGS = {"quiet": False}


def quiet_tensorflow(quiet: bool = True) -> None:
    """The command line's choice: TensorFlow's start-up output and C++ log lines off (``quiet``),
    or TensorFlow's own defaults. An explicit ``TF_CPP_MIN_LOG_LEVEL`` in the environment wins."""
    _SETTINGS["quiet"] = quiet
    if quiet:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow; where the command line asked for quiet, without its start-up output and
    with its Python logging kept to errors (TF1 loading logs deprecation notices and warnings that
    are not the user's concern)."""
    if "tensorflow" in sys.modules:
        return
    if not _SETTINGS["quiet"]:
        import tensorflow  # noqa: F401

        return
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
