"""Shared fixtures: the test models of every kind, built once per session, and compressed copies."""

from __future__ import annotations

import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("PYTHONHASHSEED", "0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402
import pytest  # noqa: E402

TESTDATA = models.TESTDATA


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """``model_factory(name)`` -> (path, example inputs), building each test model once."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, tuple[str, dict]] = {}

    def get(name: str) -> tuple[str, dict]:
        if name not in cache:
            if name in ("digits_mlp", "digits_cnn"):
                import numpy as np

                path = os.path.join(TESTDATA, name)
                rng = np.random.default_rng(0)
                key = "pixels" if name == "digits_mlp" else "image"
                shape = (5, 64) if name == "digits_mlp" else (5, 8, 8, 1)
                cache[name] = (path, {"serving_default": {key: rng.random(shape).astype("float32")}})
            else:
                path = str(root / name)
                cache[name] = (path, models.BUILDERS[name](path))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def compressed_factory(tmp_path_factory, model_factory):
    """``compressed_factory(name, **hparams)`` -> (source path, output path, CompressResult, inputs)."""
    from graphrewrite import compress, hparams

    root = tmp_path_factory.mktemp("compressed")
    cache: dict = {}

    def get(model: str, /, **overrides):
        key = (model, tuple(sorted(overrides.items())))
        if key not in cache:
            src, inputs = model_factory(model)
            out = str(root / f"{model}_{len(cache)}")
            result = compress(src, out, hparams.resolve(None, overrides))
            cache[key] = (src, out, result, inputs)
        return cache[key]

    return get


@pytest.fixture
def copy_model(tmp_path):
    """Copies a SavedModel directory so a test may damage or overwrite it."""

    def copy(src: str, name: str = "copy") -> str:
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        return dst

    return copy
