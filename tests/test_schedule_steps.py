"""--schedule-steps N / --schedule-start S: alpha goes from 1 to exactly 0 within N steps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from models import TESTDATA
from test_cli import run

from graphrewrite import hparams

MLP = os.path.join(TESTDATA, "digits_mlp")


@pytest.mark.parametrize("steps", [1, 7, 100, 150, 1000, 1050, 12_345, 250_000])
@pytest.mark.parametrize("start", [0, 40])
def test_alpha_is_zero_within_the_steps(steps, start):
    values = hparams.resolve(None, hparams.schedule_for_steps(steps, start))
    schedule = hparams.alpha_schedule(values)
    assert schedule["steps"] == steps
    assert start <= schedule["first_update_step"] <= schedule["alpha_zero_step"] <= start + steps - 1
    assert schedule["updates_to_zero"] == steps // values["compression_frequency"] <= hparams.SCHEDULE_UPDATES


def test_the_reference_default_needs_101_float32_updates():
    # seed-spec 4.3: 1/0.01 float32 subtractions leave a residue; the 101st reaches 0.
    schedule = hparams.alpha_schedule(hparams.resolve(None, {}))
    assert (schedule["updates_to_zero"], schedule["first_update_step"]) == (101, 9)
    assert schedule["alpha_zero_step"] == 9 + 100 * 10 and schedule["steps"] is None
    assert hparams.updates_to_zero(0.005) == 201


def test_the_saved_update_reaches_zero_at_the_announced_step(compressed_factory):
    """The model's own update (graphrewrite.compression_update), run at every step 1..N as a
    training loop with optimizer.iterations does (it never passes step 0), leaves alpha > 0 before
    the announced step and 0 at it, within the N steps; a short schedule from step 0 is the case a
    frequency of 1 got wrong (its first update fell on step 0)."""
    import tensorflow as tf

    import graphrewrite

    steps, start = 30, 0
    _, out, result, _ = compressed_factory("digits_mlp", rank=200, **hparams.schedule_for_steps(steps, start))
    zero = result.manifest["schedule"]["alpha_zero_step"]
    assert 1 <= zero <= start + steps - 1
    model = tf.saved_model.load(out)
    alphas = {step: np.asarray(graphrewrite.compression_update(model, step)["alpha"]) for step in range(1, 1 + steps)}
    assert np.all(alphas[zero - 1] > 0) and np.all(alphas[zero] == 0)
    assert np.all(alphas[1] == np.float32(1) - np.float32(hparams.schedule_for_steps(steps, start)["alpha_decrement_value"]))


def test_cli_records_the_schedule_and_inspect_shows_the_zero_step(capsys, tmp_path):
    out = str(tmp_path / "out")
    code, _, err = run(capsys, "compress", MLP, out, "--rank=200", "--schedule-steps", "1000", "--fast", "-q")
    assert code == 0, err
    code, stdout, err = run(capsys, "inspect", out, "--json")
    data = json.loads(stdout)
    assert code == 0, err
    assert (data["hparams"]["begin_compression_step"], data["hparams"]["end_compression_step"]) == (0, 999)
    assert data["hparams"]["compression_frequency"] == 10
    assert data["schedule"] == {"first_update_step": 9, "updates_to_zero": 100, "alpha_zero_step": 999,
                                "steps": 1000}
    code, stdout, _ = run(capsys, "inspect", out)
    assert "alpha = 0 at global step 999 (100 updates)" in stdout and "global step 0" in stdout


@pytest.mark.parametrize("argv, message", [
    (["--schedule-steps", "100", "--compression_frequency=5"], "--schedule-steps sets --compression_frequency"),
    (["--schedule-start", "5"], "--schedule-start needs --schedule-steps"),
    (["--schedule-steps", "0"], "--schedule-steps must be >= 1"),
])
def test_contradictions_are_usage_errors(capsys, tmp_path, argv, message):
    code, _, err = run(capsys, "compress", MLP, str(tmp_path / "out"), "--rank=200", *argv)
    assert code == 2 and message in err and err.count("\n") == 1
