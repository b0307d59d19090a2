"""tools/run_heavy.py: the heavy set, one test file per process (in one process it does not fit
24 GB). Its grouping of pytest's collection into files and its exit status."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("run_heavy", os.path.join(ROOT, "tools", "run_heavy.py"))
run_heavy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_heavy)


def test_files_in_order_of_first_appearance_once_each():
    collected = ("tests/test_b.py::test_one\ntests/test_b.py::test_two[x]\ntests/test_a.py::test_three\n"
                 "tests/test_b.py::test_four\n\n3/9 tests collected (6 deselected) in 1.00s\n")
    assert run_heavy.files_of(collected) == ["tests/test_b.py", "tests/test_a.py"]
    # with -q passed on, the collection is -qq: a count per file
    assert run_heavy.files_of("tests/test_b.py: 3\ntests/test_a.py: 1\n\n4/9 tests collected") == [
        "tests/test_b.py", "tests/test_a.py"]


def test_every_file_runs_and_any_failure_fails_the_run():
    ran, said = [], []
    statuses = {"tests/test_a.py": 1, "tests/test_b.py": 0, "tests/test_c.py": run_heavy.NO_TESTS}

    def run(name):
        ran.append(name)
        return statuses[name]

    assert run_heavy.run_all(list(statuses), run, said.append) == 1
    assert ran == list(statuses)  # a failure does not stop the files after it
    assert "FAILED (exit 1)" in said[0] and "passed" in said[1] and "passed" in said[2]
    assert said[-1] == "run_heavy: 2 of 3 files passed; failed: tests/test_a.py"
    assert run_heavy.run_all(["tests/test_b.py"], run, said.append) == 0


def test_the_files_cover_every_heavy_test_collected():
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "heavy", "--collect-only", "-q"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    files = run_heavy.files_of(out)
    tests = [line for line in out.splitlines() if "::" in line]
    assert len(tests) > 50 and "tests/test_zoo.py" in files
    assert {line.split("::")[0] for line in tests} == set(files)
    assert int(out.strip().splitlines()[-1].split("/")[0]) == len(tests)
