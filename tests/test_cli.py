"""The command line: compress, inspect, scan; one-line errors; the README's commands."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from graphrewrite.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP = os.path.join(ROOT, "testdata", "digits_mlp")


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def tree_digest(path: str) -> str:
    digest = hashlib.sha256()
    for base, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(base, name)
            digest.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def test_compress_then_inspect_json(capsys, tmp_path):
    out = str(tmp_path / "out")
    code, stdout, err = run(capsys, "compress", MLP, out, "--rank=200", "-q")
    assert code == 0, err
    assert "rewrote 3 site(s)" in stdout
    assert "parameters of the rewritten weights: 50,432 -> 35,506" in stdout
    assert "verified" in stdout
    assert err == ""
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    assert code == 0
    data = json.loads(stdout)
    assert [s["variable"] for s in data["sites"]] == ["dense_1/kernel", "dense_2/kernel", "logits/kernel"]
    first = data["sites"][0]
    assert {k: first[k] for k in ("op", "option", "shape", "k", "params_before", "params_after")} == {
        "op": "digits_mlp_1/dense_1_1/MatMul", "option": 1, "shape": [64, 256], "k": 32,
        "params_before": 16384, "params_after": 10240}
    assert data["skipped"] == []
    assert data["totals"]["params_before"] == 50432 and data["totals"]["params_after"] == 35506
    code, table, _ = run(capsys, "inspect", out)
    assert "dense_2/kernel" in table and "total: 3 sites" in table


def test_inspect_of_an_original_model_is_a_dry_run(capsys):
    code, stdout, _ = run(capsys, "inspect", MLP, "--rank", "400", "--json")
    data = json.loads(stdout)
    assert code == 0 and data["rewritten"] is False
    assert [s["k"] for s in data["sites"]] == [16, 32, 3]


def test_skipped_sites_are_listed(capsys):
    code, stdout, _ = run(capsys, "inspect", MLP, "--rank=250", "--json")
    data = json.loads(stdout)
    assert code == 0
    reasons = {s["variable"]: s["reason"] for s in data["skipped"]}
    assert reasons == {}  # 250 shrinks all three
    code, stdout, _ = run(capsys, "inspect", MLP, "--json")  # reference default rank=7
    data = json.loads(stdout)
    assert data["sites"] == [] and len(data["skipped"]) == 3
    assert data["skipped"][0]["reason"].startswith("rank=7 gives k=64 on 64x256")


def test_dry_run_writes_nothing(capsys, tmp_path):
    out = tmp_path / "never"
    code, stdout, _ = run(capsys, "compress", MLP, str(out), "--rank=200", "--dry-run", "-q")
    assert code == 0 and "plan (dry run" in stdout and not out.exists()


@pytest.mark.parametrize("args, status, message", [
    (["--rank=0"], 2, "rank must be a positive integer"),
    (["--rank=-3"], 2, "rank must be a positive integer"),
    (["--rank=abc"], 2, "rank: 'abc' is not an integer"),
    (["--compression_hparams=rank=200,bogus=1"], 2, "unknown hyperparameter 'bogus'"),
    (["--compression_hparams=rank"], 2, "is not of the form key=value"),
    (["--method=zip"], 2, "unknown method 'zip'"),
    (["--tag-set=train"], 3, "no MetaGraph with tag set 'train'"),
    (["--no-such-flag"], 2, "No such option"),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, args, status, message):
    before = tree_digest(MLP)
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", MLP, str(out), *args)
    assert code == status
    assert err.count("\n") == 1 and err.startswith("graphrewrite: error: ") and message in err
    assert not out.exists()
    assert tree_digest(MLP) == before


def test_bad_input_paths(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.txt").write_text("x")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "saved_model.pb").write_bytes(os.urandom(512))
    cases = {
        str(tmp_path / "missing"): "no such file or directory",
        str(tmp_path / "file"): "is a file, not a SavedModel directory",
        str(tmp_path / "empty"): "empty directory",
        str(tmp_path / "other"): "not a SavedModel (no saved_model.pb)",
        str(tmp_path / "garbage"): "saved_model.pb is corrupted",
    }
    for path, message in cases.items():
        code, _, err = run(capsys, "compress", path, str(tmp_path / "out"), "--rank=200")
        assert code == 3, (path, err)
        assert err.count("\n") == 1 and message in err, err


def test_existing_output_is_refused_and_kept(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", MLP, str(out), "--rank=200")
    assert code == 5 and "exists and is not empty (use --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run(capsys, "compress", MLP, MLP, "--rank=200")
    assert code == 5 and "the output is the input model itself" in err
    code, _, err = run(capsys, "compress", MLP, os.path.join(MLP, "variables", "x"), "--rank=200")
    assert code == 5 and "inside the input model" in err


def test_overwrite_replaces_a_saved_model_only(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, err = run(capsys, "compress", MLP, str(out), "--rank=200", "--overwrite", "--fast", "-q")
    assert code == 5 and "--overwrite replaces SavedModels only" in err
    assert (out / "old.txt").read_text() == "old"
    (out / "saved_model.pb").write_bytes(b"previous")
    stale = tmp_path / ".out.graphrewrite-tmp-999999999-abc"  # left by a killed run
    stale.mkdir()
    code, _, err = run(capsys, "compress", MLP, str(out), "--rank=200", "--overwrite", "--fast", "-q")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "saved_model.pb").stat().st_size > 100
    assert not [p for p in os.listdir(tmp_path) if "graphrewrite-tmp" in p or "graphrewrite-old" in p]


def test_rewritten_model_is_refused(capsys, compressed_factory, tmp_path):
    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    code, _, err = run(capsys, "compress", out, str(tmp_path / "again"), "--rank=200")
    assert code == 7 and "already rewritten by graphrewrite" in err


def test_compression_option_zero_writes_an_unchanged_copy(capsys, tmp_path):
    out = tmp_path / "copy"
    code, stdout, err = run(capsys, "compress", MLP, str(out), "--compression_option=0")
    assert code == 0, err
    assert "no weight was rewritten (compression_option=0" in stdout
    assert tree_digest(str(out)) == tree_digest(MLP)


def test_help_all_is_fast_and_lists_every_hparam():
    code = ("import sys\nfrom graphrewrite.cli import main\ntry:\n    main(['compress', '--help-all'])\n"
            "except SystemExit:\n    pass\nprint('tensorflow imported' if 'tensorflow' in sys.modules else 'lazy')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.rstrip().endswith("lazy")
    from graphrewrite.hparams import HPARAMS

    for p in HPARAMS:
        assert f"--{p.name}" in proc.stdout
    assert "--compression_hparams" in proc.stdout


def readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README has no sh block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_starts_with_the_two_commands():
    commands = readme_commands()
    assert len(commands) == 2
    assert "graphrewrite compress testdata/digits_mlp" in commands[0]
    assert "pytest" in commands[1]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert commands[1] in f.read()


def test_readme_main_command_runs(tmp_path):
    # The first README command, minus the set-up already done in this environment.
    command = readme_commands()[0]
    job = command[command.index("graphrewrite compress"):]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(job.replace("out/", f"{tmp_path}/"), shell=True, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "verified" in proc.stdout


def test_readme_python_examples_run(tmp_path):
    """Every ```python block of the README, in order, in one process, after the first command."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert len(blocks) >= 4
    (tmp_path / "out").mkdir()
    (tmp_path / "testdata").symlink_to(os.path.join(ROOT, "testdata"))  # the calibration example's input
    main_proc = subprocess.run([sys.executable, "-c", "from graphrewrite.cli import main; main()", "compress",
                                os.path.join(ROOT, "testdata", "digits_mlp"), "out/digits_mlp_r200", "--rank=200",
                                "--fast", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert main_proc.returncode == 0, main_proc.stderr[-2000:]
    script = tmp_path / "readme_examples.py"
    script.write_text("\n\n".join(blocks))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "final" / "saved_model.pb").exists()
    assert "(4, 10)" in proc.stdout
