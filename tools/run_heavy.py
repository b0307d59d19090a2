"""Runs the heavy tests (``pytest -m heavy``) one test file per pytest process.

In one process the heavy set does not fit a 24 GB machine: its files build and load dozens of
models (the zoo's architectures, through compress, training and export), and on 2026-12-04 the
kernel's OOM killer ended ``pytest -m heavy`` after 95 of 103 tests at 14 GB resident (the zoo's
46 tests, then the calibrated zoo's; why one process grows that far was not found). A process
per file returns each file's memory when it ends. Every file that holds a heavy test runs,
whatever an earlier one gave; the exit status is 1 when any failed (pytest's "no tests
collected", 5, is not a failure here). Arguments after the script's own are passed to each
pytest run (``-x``, ``-k zoo``, ``-q``).

    .venv/bin/python tools/run_heavy.py [pytest arguments]
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TESTS = 5  # pytest's exit status when a run collected nothing


def files_of(collected: str) -> list[str]:
    """The test files, in order of first appearance, of ``pytest --collect-only -q`` output: its
    ``file::test`` lines, or with one more ``-q`` (from the arguments passed on) its ``file: N``."""
    files: list[str] = []
    for line in collected.splitlines():
        found = re.match(r"(\S+\.py)(::|: \d+$)", line)
        if found and found.group(1) not in files:
            files.append(found.group(1))
    return files


def run_all(files: Sequence[str], run: Callable[[str], int], say: Callable[[str], None] = print) -> int:
    """Runs ``run(file)`` for each file; prints a line per file and a summary; 0 or 1."""
    failed = []
    for name in files:
        start = time.monotonic()
        status = run(name)
        passed = status in (0, NO_TESTS)
        if not passed:
            failed.append(name)
        say(f"run_heavy: {name}: {'passed' if passed else f'FAILED (exit {status})'} in {time.monotonic() - start:.0f} s")
    say(f"run_heavy: {len(files) - len(failed)} of {len(files)} files passed" +
        (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv: Sequence[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", "-m", "heavy"]
    collected = subprocess.run([*pytest, "--collect-only", "-q", *argv], cwd=ROOT, capture_output=True, text=True)
    files = files_of(collected.stdout)
    if collected.returncode not in (0, NO_TESTS) or not files:
        sys.stderr.write(f"run_heavy: collecting the heavy tests failed (exit {collected.returncode})\n"
                         + collected.stdout[-2000:] + collected.stderr[-2000:])
        return 1
    return run_all(files, lambda name: subprocess.run([*pytest, name, *argv], cwd=ROOT).returncode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
