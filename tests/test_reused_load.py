"""The sandbox worker keeps the model it loaded last (loader.load_reused) and hands it out again.

One compress with calibration sends the worker up to seven jobs on one model (the calibration
pass, four error-feedback passes, the model check, distillation); loading a ResNet50 took 2.3 s of
each ~9 s pass. What reuse must not change: every job sees the model as its files hold it, with
its variables at their saved values, whatever an earlier job's run of the model's own ops did.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from graphrewrite import whiten
from graphrewrite.rewriting import loader
from graphrewrite.rewriting.calibration import statistics

MLP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "testdata", "digits_mlp")


@pytest.fixture(autouse=True)
def _nothing_kept():
    loader._reused.clear()
    yield
    loader._reused.clear()


def test_the_same_model_comes_back_with_its_saved_values(tmp_path):
    path = str(tmp_path / "mlp")
    shutil.copytree(MLP, path)
    first = loader.load_reused(path, ["serve"], True)
    saved = {k: v.numpy() for k, v in first.variables.items()}
    for variable in first.variables.values():  # what a model's own assign ops could do
        variable.assign(variable + 1.0)
    again = loader.load_reused(path, ["serve"], True)
    assert again is first
    for key, value in saved.items():
        np.testing.assert_array_equal(again.variables[key].numpy(), value)


def test_changed_files_or_another_path_or_a_large_model_load_anew(tmp_path, monkeypatch):
    path, other = str(tmp_path / "mlp"), str(tmp_path / "other")
    shutil.copytree(MLP, path)
    shutil.copytree(MLP, other)
    first = loader.load_reused(path, ["serve"], True)
    assert loader.load_reused(other, ["serve"], True) is not first  # and ``other`` is kept now
    assert loader.load_reused(path, ["serve"], True) is not first
    kept = loader.load_reused(path, ["serve"], True)
    index = os.path.join(path, "variables", "variables.index")
    stat = os.stat(index)
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert loader.load_reused(path, ["serve"], True) is not kept
    monkeypatch.setattr(loader, "REUSE_BYTES", 0)
    loader._reused.clear()
    assert loader.load_reused(path, ["serve"], True) is not loader.load_reused(path, ["serve"], True)


def test_a_job_run_twice_gives_what_a_fresh_load_gives():
    data = {"pixels": np.random.default_rng(0).random((64, 64)).astype(np.float32)}
    fresh = statistics.collect(loader.load(MLP, ["serve"], True), data, "serving_default")
    runs = [statistics.collect_job(MLP, ["serve"], True, data, "serving_default") for _ in range(2)]
    assert loader._reused["model"] is not None
    for run in runs:
        assert sorted(run.grams) == sorted(fresh.grams)
        for key, gram in fresh.grams.items():
            np.testing.assert_array_equal(whiten.dense(run.grams[key]), whiten.dense(gram))
        assert run.rows == fresh.rows
