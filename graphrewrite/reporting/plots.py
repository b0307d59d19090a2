"""PNG plots for ``inspect --plot``: a weight's singular value spectrum and a parameter overview.

matplotlib is an optional dependency (``pip install 'graphrewrite[plot]'``), imported only when a
plot is drawn. Figures are drawn straight on matplotlib's Agg canvas, without pyplot: no display is
needed, and neither the process's backend (``matplotlib.use``) nor its open figures are touched, so
calling these from a notebook leaves its plots alone. Names from the models are drawn as plain text (no
mathtext: a ``$`` in a variable name is just a character).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.errors import UsageError

_DPI = 100


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, or a UsageError saying how to install matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'graphrewrite[plot]' "
                         "(or pip install matplotlib)") from None
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def spectrum_png(path: str, title: str, singular_values: Sequence[float] | np.ndarray, k: int,
                 kept_energy: float) -> str:
    """Writes the singular value spectrum of one weight with its chosen k; returns ``path``.

    Args:
      path: the PNG to write.
      title: the plot's title (a variable name; drawn as plain text).
      singular_values: descending singular values of the weight's matrix view.
      k: the kept number of singular values (a vertical line at k).
      kept_energy: ``sum(s[:k]**2) / sum(s**2)``, written on the plot.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    index = np.arange(1, s.size + 1)
    positive = s > 0  # a log axis cannot show zeros
    figure = _figure(7.0, 4.0)
    ax = figure.add_subplot()
    ax.semilogy(index[positive], s[positive], marker=".", markersize=3, linewidth=1)
    ax.axvline(k, color="tab:red", linestyle="--", linewidth=1)
    ax.text(0.98, 0.95, f"k = {k}\nkept energy {kept_energy:.2%}", transform=ax.transAxes, ha="right",
            va="top", parse_math=False, bbox={"facecolor": "white", "edgecolor": "0.7"})
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value s_i (log)", parse_math=False)
    ax.set_title(title, parse_math=False)
    ax.grid(True, which="both", alpha=0.3)
    figure.savefig(path)
    return path


def overview_png(path: str, sites: Sequence[Mapping[str, Any]]) -> str:
    """Writes one bar chart of parameters before and after per site; returns ``path``.

    Args:
      path: the PNG to write.
      sites: dicts with ``variable``, ``params_before`` and ``params_after`` (manifest sites).
    """
    names = [str(site["variable"]) for site in sites]
    before = [int(site["params_before"]) for site in sites]
    after = [int(site["params_after"]) for site in sites]
    x = np.arange(len(sites))
    figure = _figure(min(4.0 + 0.5 * len(sites), 40.0), 4.5)
    ax = figure.add_subplot()
    ax.bar(x - 0.2, before, width=0.4, label="before")
    ax.bar(x + 0.2, after, width=0.4, label="after")
    ax.set_xticks(x, names, rotation=45, ha="right", parse_math=False)
    ax.set_ylabel("parameters")
    ax.set_title(f"parameters per site: {sum(before):,} -> {sum(after):,}", parse_math=False)
    ax.legend()
    figure.savefig(path)
    return path
