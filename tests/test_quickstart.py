"""The README's quickstart runs to the end: compress with a schedule, fine-tune on the real digits
split until alpha = 0, export without --force, and print the original and final model side by side.
The figures it prints are checked, and so are the README's claims about them."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from models import TESTDATA

from graphrewrite import hparams

ROOT = os.path.dirname(TESTDATA)


def quickstart() -> tuple[str, str]:
    """(the quickstart's shell block, the section's text)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Quickstart"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1), section


def test_the_split_is_the_one_the_model_was_made_with():
    sys.path.insert(0, TESTDATA)
    try:
        from make_testdata import digits_split
    finally:
        sys.path.remove(TESTDATA)
    data = np.load(os.path.join(TESTDATA, "digits.npz"))
    for name, array in zip(("x_train", "y_train", "x_test", "y_test"), digits_split()):
        np.testing.assert_array_equal(data[name], array)
    assert data["x_train"].shape == (1347, 64) and data["x_test"].shape == (450, 64)


def test_readme_quickstart_runs_to_the_end(tmp_path):
    block, section = quickstart()
    assert "--force" not in block and "--schedule-steps" in block
    script = block.replace("out/", f"{tmp_path}/out/").replace("mkdir -p out", f"mkdir -p {tmp_path}/out")
    script = re.sub(r"^\.venv/bin/graphrewrite", f"{sys.executable} -m graphrewrite.cli", script, flags=re.M)
    script = re.sub(r"^\.venv/bin/python", sys.executable, script, flags=re.M)
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"after 860 steps, alpha = \[0\. 0\.\]", out), out
    rows = {m.group(1).split("/")[-1]: m.groups()[1:] for m in re.finditer(
        r"^(\S+)\s+([\d.]+)%\s+([\d,]+)\s+([\d,]+)$", out, re.M)}
    accuracy = {name: float(row[0]) / 100 for name, row in rows.items()}
    parameters = {name: int(row[1].replace(",", "")) for name, row in rows.items()}
    size = {name: int(row[2].replace(",", "")) for name, row in rows.items()}
    assert accuracy["digits_mlp"] == pytest.approx(0.9778, abs=1e-4)  # 440 of 450
    assert accuracy["quick_final"] >= accuracy["digits_mlp"] - 0.01
    assert parameters == {"digits_mlp": 50_826, "quick_final": 15_498}
    assert size["quick_final"] < size["digits_mlp"] / 3
    assert f"parameters 50,826 -> 15,498 ({15_498 / 50_826:.3f}x)" in out  # export's own line agrees
    # The README's claims about the schedule and the figures.
    schedule = hparams.alpha_schedule(hparams.resolve(None, hparams.schedule_for_steps(600)))
    assert (schedule["first_update_step"], schedule["alpha_zero_step"]) == (5, 599)
    assert "from\nglobal step 5 to 599" in section or "global step 5 to 599" in section.replace("\n", " ")
    assert "15,498" in section and "50,826" in section
