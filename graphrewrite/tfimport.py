"""Imports TensorFlow on first need, with its C++ start-up chatter kept off stderr.

TensorFlow prints CUDA probing and absl notices from C++ while it is imported, before any Python
logging setting applies. graphrewrite promises one clear line on stderr for every failure, so the
command line imports TensorFlow through here (library users get TensorFlow's usual output).
"""

from __future__ import annotations

import os
import sys


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow without its start-up output, and keeps its Python logging to errors
    (TF1 loading logs deprecation notices and warnings that are not the user's concern)."""
    if "tensorflow" in sys.modules:
        return
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
