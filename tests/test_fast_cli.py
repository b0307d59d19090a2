"""A fast, quiet command line: mistakes answer before TensorFlow is imported, TensorFlow's log lines
stay off for CLI users only, progress lines carry elapsed time, and --help is short."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from models import TESTDATA
from test_cli import run

from graphrewrite import tfimport

MLP = os.path.join(TESTDATA, "digits_mlp")

# Each mistake runs in one fresh interpreter, in turn; TensorFlow must not be imported by any.
_NO_TENSORFLOW = """
import json, sys
from graphrewrite.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code or 0)
print(json.dumps({"codes": codes, "tensorflow": "tensorflow" in sys.modules}))
"""


def test_mistakes_answer_before_tensorflow_is_imported(tmp_path):
    cases = [  # (argv, exit status, what the one line says)
        (["compress", str(tmp_path / "missing"), str(tmp_path / "o"), "--rank=200"], 3, "no such file or directory"),
        (["compress", MLP, str(tmp_path / "no" / "parent"), "--rank=200"], 5, "parent directory"),
        (["compress", MLP, os.path.join(TESTDATA, "digits_cnn"), "--rank=200"], 5, "exists and is not empty"),
        (["compress", MLP, str(tmp_path / "o"), "--rank=abc"], 2, "'abc' is not an integer"),
        (["compress", MLP, str(tmp_path / "o"), "--target-ratio", "x"], 2, "is not a valid float"),
        (["compress", MLP, str(tmp_path / "o"), "--method", "nope"], 2, "unknown method 'nope'"),
        (["compress", MLP], 2, "Missing argument"),
        (["export", str(tmp_path / "missing"), str(tmp_path / "o")], 3, "no such file or directory"),
        (["inspect", str(tmp_path / "missing")], 3, "no such file or directory"),
        (["diff", str(tmp_path / "missing"), MLP], 3, "no such file or directory"),
        (["scan", str(tmp_path / "missing")], 3, "no such file or directory"),
        (["--help"], 0, ""),
        (["compress", "--help"], 0, ""),
    ]
    proc = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, json.dumps([c[0] for c in cases])],
                          capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"codes": [c[1] for c in cases], "tensorflow": False}, proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 11 and all(ln.startswith("graphrewrite: error: ") for ln in errors), proc.stderr
    for line, (_, _, message) in zip(errors, cases):
        assert message in line, (message, line)
    assert os.listdir(tmp_path) == []


def test_scan_and_compress_name_a_missing_variables_directory(capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    shutil.copy(os.path.join(MLP, "saved_model.pb"), model)
    code, _, err = run(capsys, "compress", str(model), str(tmp_path / "out"), "--rank=200")
    assert code == 3 and err == f"graphrewrite: error: {model}: variables/ is missing (the directory of the " \
        "model's weights: variables/variables.index and variables/variables.data-*)\n"
    code, stdout, err = run(capsys, "scan", str(model))
    assert code == 3 and "variables/ is missing: the model's weights are not there" in stdout
    assert err.count("\n") == 1 and "variables/ is missing" in err
    code, stdout, _ = run(capsys, "scan", str(model), "--json")
    assert code == 3 and json.loads(stdout)["variables_missing"] is True
    code, stdout, _ = run(capsys, "scan", MLP, "--json")
    assert code == 0 and json.loads(stdout)["variables_missing"] is False


def test_tensorflow_log_lines_are_off_for_the_cli_unless_verbose(capsys, monkeypatch):
    monkeypatch.delenv("GRAPHREWRITE_DEBUG", raising=False)
    monkeypatch.setitem(tfimport._SETTINGS, "quiet", False)
    for argv, quiet in ((["-v", "scan", "/nonexistent"], False), (["scan", "/nonexistent"], True)):
        assert run(capsys, *argv)[0] == 3
        assert tfimport._SETTINGS["quiet"] is quiet
    monkeypatch.setenv("GRAPHREWRITE_DEBUG", "1")
    run(capsys, "scan", "/nonexistent")
    assert tfimport._SETTINGS["quiet"] is False


def test_the_library_keeps_the_users_logging_settings():
    code = ("import logging, os\nfrom graphrewrite.rewriting.scan import scan\nscan(os.environ['MODEL'])\n"
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'), logging.getLogger('tensorflow').level)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(env, MODEL=MLP))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None", "0"]  # not set to 3, logger left at NOTSET


def test_progress_lines_carry_elapsed_time(capsys):
    code, _, err = run(capsys, "compress", MLP, "unused", "--rank=200", "--dry-run", "--progress")
    assert code == 0
    lines = err.splitlines()
    assert lines and all(re.match(r"graphrewrite: \[ *\d+\.\d s\] \S", ln) for ln in lines), err
    seconds = [float(re.search(r"\[ *([\d.]+) s\]", ln).group(1)) for ln in lines]
    assert seconds == sorted(seconds)


def test_compress_help_is_short_with_examples(capsys):
    code, short, _ = run(capsys, "compress", "--help")
    assert code == 0 and len(short.splitlines()) <= 60
    assert "Examples:" in short and "--schedule-steps" in short and "--help-all" in short
    assert "--alpha_decrement_value" not in short and "--rank" in short
    code, full, _ = run(capsys, "compress", "--help-all")
    assert code == 0 and "--alpha_decrement_value" in full and len(full.splitlines()) > 150
    assert run(capsys, "compress", "--help")[1] == short  # --help-all left the command as it was
