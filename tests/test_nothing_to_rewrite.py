"""Doing nothing must not look like success: compress refuses a plan without sites (exit 9), and
inspect refuses plan options on a rewritten model."""

from __future__ import annotations

import os

import pytest
from models import TESTDATA
from test_cli import run

from graphrewrite import compress, hparams
from graphrewrite.errors import NothingToRewriteError
from graphrewrite.rewriting.plan import Selection

MLP = os.path.join(TESTDATA, "digits_mlp")


def test_reference_defaults_are_refused_with_why_and_what_to_try(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", MLP, str(out))  # rank=7: every site skipped
    assert code == 9 and stdout == ""
    assert err.count("\n") == 1 and err.startswith("graphrewrite: error: "), err
    assert "nothing to rewrite, so nothing was written: all 3 candidate site(s) were skipped" in err
    assert "dense_1/kernel: rank=7 gives k=64 on 64x256" in err and "(and 2 more like it)" in err
    assert "try --rank=200 (halves each weight's rank) or --target-ratio 0.5" in err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_a_selection_that_skips_everything_is_refused(tmp_path):
    selection = Selection(min_params=10**6)
    with pytest.raises(NothingToRewriteError, match="fewer than --min-params 1000000"):
        compress(MLP, str(tmp_path / "out"), hparams.resolve(None, {"rank": 200}), selection=selection)
    assert os.listdir(tmp_path) == []


def test_allow_empty_keeps_the_old_behaviour(capsys, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "compress", MLP, str(out), "--allow-empty", "--fast", "-q")
    assert code == 0, err
    assert "rewrote 0 site(s), skipped 3" in stdout and (out / "saved_model.pb").exists()


def test_inspect_of_a_rewritten_model_refuses_plan_options(capsys, compressed_factory):
    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    code, stdout, err = run(capsys, "inspect", out, "--rank=400", "--exclude", "logits")
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "already rewritten: --exclude, --rank plan a compression" in err
