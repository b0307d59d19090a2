"""graphrewrite.reporting.plots: the spectrum and overview PNGs, and the error without matplotlib."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from graphrewrite.errors import UsageError
from graphrewrite.reporting import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SITES = [{"variable": "dense_1/kernel", "params_before": 16384, "params_after": 10240},
         {"variable": "dense_2/$kernel$", "params_before": 32768, "params_after": 24576},
         {"variable": "logits/kernel", "params_before": 1280, "params_after": 690}]


def assert_png(path: str) -> None:
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC


@pytest.fixture
def matplotlib_needed():
    pytest.importorskip("matplotlib")


def test_spectrum_png(tmp_path, matplotlib_needed):
    s = np.geomspace(10.0, 1e-3, 64)
    s[-2:] = 0.0  # zeros cannot sit on a log axis; they are left out, not an error
    path = str(tmp_path / "spectrum.png")
    assert plots.spectrum_png(path, "dense_1/kernel $x$", s, 16, 0.97) == path
    assert_png(path)


def test_overview_png(tmp_path, matplotlib_needed):
    path = str(tmp_path / "overview.png")
    assert plots.overview_png(path, SITES) == path
    assert_png(path)
    assert os.listdir(tmp_path) == ["overview.png"]


def test_without_matplotlib_plots_say_how_to_install_it(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(UsageError, match=r"pip install 'graphrewrite\[plot\]'"):
        plots.spectrum_png(str(tmp_path / "s.png"), "w", [3.0, 2.0, 1.0], 1, 0.64)
    with pytest.raises(UsageError, match="matplotlib"):
        plots.overview_png(str(tmp_path / "o.png"), SITES)
    assert os.listdir(tmp_path) == []
