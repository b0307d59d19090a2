"""Errors the tool reports as one line on stderr, each with its own exit status.

Every failure a user can cause (a bad path, a corrupted model, an impossible option) is raised as
one of these; the CLI prints ``graphrewrite: error: <message>`` and exits with ``exit_code``. Anything
else escaping the pipeline is a bug in graphrewrite, reported the same way with status 70.
"""

from __future__ import annotations


class GraphrewriteError(Exception):
    """Base class: a user-facing failure with a one-line message."""

    exit_code = 1


class UsageError(GraphrewriteError):
    """A bad option, hyperparameter or combination of them."""

    exit_code = 2


class InputModelError(GraphrewriteError):
    """The input is not a readable SavedModel (missing, truncated, corrupted, wrong tags)."""

    exit_code = 3


class UnsafeModelError(GraphrewriteError):
    """The model holds ops off the allow-list (file, network, process, ...) and
    --allow-unsafe-ops was not given."""

    exit_code = 4


class OutputError(GraphrewriteError):
    """The output location is unusable (exists, inside the input, unwritable, disk full)."""

    exit_code = 5


class VerificationError(GraphrewriteError):
    """The rewritten model does not reproduce the original at alpha = 1 (nothing was written)."""

    exit_code = 6


class AlreadyRewrittenError(GraphrewriteError):
    """The input was produced by graphrewrite already."""

    exit_code = 7


class ExportRefusedError(GraphrewriteError):
    """Export asked while some alpha > 0, without --force."""

    exit_code = 8


class NothingToRewriteError(GraphrewriteError):
    """Every candidate site was skipped: writing a "rewritten" copy would look like success."""

    exit_code = 9


class ModelRunError(GraphrewriteError):
    """Running the model (verification, calibration) hung, crashed or ran out of its limits in the
    child process that runs it."""

    exit_code = 10


class CalibrationDataError(GraphrewriteError):
    """The calibration data does not fit the model (names, dtypes, shapes, empty, unreadable)."""

    exit_code = 11


INTERNAL_ERROR_EXIT = 70


def first_line(exc: BaseException, limit: int | None = 300, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (TensorFlow's ``message`` where it has
    one), cut to ``limit`` characters, for a one-line error; ``default`` (else the exception's type
    name) when the message is empty."""
    text = getattr(exc, "message", None) or str(exc)
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), None)
    if line is None:
        return type(exc).__name__ if default is None else default
    return line if limit is None else line[:limit]
