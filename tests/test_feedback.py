"""Error feedback (graphrewrite.rewriting.calibration.feedback): sites after other sites fitted to their inputs
in the compressed model, ||X A - X~ M||, checked against closed forms and an independent forward."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from test_calibration import CNN, at_alpha0, digits, random_calibration  # noqa: F401 - digits is a fixture
from test_cli import MLP, run

from graphrewrite import whiten


def chained_problem(seed: int, rows: int = 300, m: int = 20, n: int = 12):
    """Rows X, perturbed rows X~ (what an upstream compression leaves), a weight A."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, m)) @ rng.standard_normal((m, m))
    x_tilde = x + 0.3 * rng.standard_normal((rows, m)) @ rng.standard_normal((m, m))
    return x, x_tilde, rng.standard_normal((m, n))


def grams(x, x_tilde):
    return x.T @ x / len(x), x_tilde.T @ x_tilde / len(x), x_tilde.T @ x / len(x)


def damped_objective(x, x_tilde, a, approx, lam):
    return np.sum((x @ a - x_tilde @ approx) ** 2) / len(x) + lam * np.sum((a - approx) ** 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_feedback_factors_are_the_reduced_rank_regression_optimum(seed):
    x, x_tilde, a = chained_problem(seed)
    gram, tilde, cross = grams(x, x_tilde)
    lam = whiten.DAMPING * np.trace(tilde) / len(tilde)
    for k in (1, 4, 9):
        b, c = whiten.low_rank(whiten.feedback_target(a, tilde, cross), tilde, k)
        got = b.astype(np.float64) @ c
        # independent closed form (QR, not Cholesky): min ||Y - Z M|| over rank-k M with the
        # stacked design Z = [X~; sqrt(N lam) I] and target Y = [X A; sqrt(N lam) A] is
        # M = R^-1 trunc_k(Q^T Y) for Z = Q R
        root = np.sqrt(len(x) * lam)
        z = np.vstack([x_tilde, root * np.eye(len(a))])
        y = np.vstack([x @ a, root * a])
        q, r = np.linalg.qr(z)
        u, s, vt = np.linalg.svd(q.T @ y, full_matrices=False)
        optimum = np.linalg.solve(r, (u[:, :k] * s[:k]) @ vt[:k])
        best = damped_objective(x, x_tilde, a, optimum, lam)
        assert damped_objective(x, x_tilde, a, got, lam) == pytest.approx(best, rel=1e-5)
        np.testing.assert_allclose(got, optimum, atol=1e-4 * np.abs(optimum).max())
        # the figure the manifest reports is that of the rows themselves
        direct = np.linalg.norm(x @ a - x_tilde @ got) / np.linalg.norm(x @ a)
        assert whiten.chained_error(a, got, gram, tilde, cross) == pytest.approx(direct, rel=1e-6)
        # and it is never above the first pass's factors' or plain ones', given the same X~
        local_b, local_c = whiten.low_rank(a, gram, k)
        u, s, vt = np.linalg.svd(a, full_matrices=False)
        for other in (local_b.astype(np.float64) @ local_c, (u[:, :k] * s[:k]) @ vt[:k]):
            assert direct <= np.linalg.norm(x @ a - x_tilde @ other) / np.linalg.norm(x @ a) + 1e-9


def test_without_upstream_error_the_target_is_the_weight():
    x, _, a = chained_problem(3)
    gram, tilde, cross = grams(x, x)
    np.testing.assert_allclose(whiten.feedback_target(a, tilde, cross), a, rtol=1e-5, atol=1e-5)


def test_levels_and_passes_on_the_digits_mlp():
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import feedback

    model = loader.load(MLP, ["serve"], True)
    keys = {model.infos[k].name: k for k in model.infos}
    kernels = [keys[f"{n}/kernel"] for n in ("dense_1", "dense_2", "logits")]
    by_level = feedback.levels(model, "serving_default", kernels)
    assert [by_level[k] for k in kernels] == [0, 1, 2]  # the biases before them are not sites
    assert feedback.groups(by_level, 4) == [[kernels[1]], [kernels[2]]]
    assert feedback.groups(by_level, 1) == [[kernels[2]]]  # one level per pass: the deepest
    assert feedback.groups(by_level, 0) == []
    # without dense_1 among the sites, dense_2's input does not change: level 0
    assert feedback.levels(model, "serving_default", kernels[1:]) == {kernels[1]: 0, kernels[2]: 1}


def test_feedback_pass_sees_the_replaced_weights(digits):  # noqa: F811
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import statistics

    model = loader.load(MLP, ["serve"], True)
    keys = {model.infos[k].name: k for k in model.infos}
    first, second = keys["dense_1/kernel"], keys["dense_2/kernel"]
    x = digits[0][:80]  # 5 batches of 16: the 4th (examples 48-63) is also held out
    replaced = {first: np.zeros(model.infos[first].shape, np.float32)}
    stats = statistics.collect(model, {"pixels": x}, "serving_default", batch_size=16, replaced=replaced,
                               only=[second])
    assert sorted(stats.tilde) == [second]
    bias = next(v.numpy() for v in model.variables.values() if v.name.startswith("dense_1/bias"))
    kernel = model.variables[first].numpy()
    h = np.maximum(x @ kernel + bias, 0.0)  # dense_2's input in the original model
    h_tilde = np.tile(np.maximum(bias, 0.0), (len(x), 1))  # with dense_1's kernel zero
    np.testing.assert_allclose(stats.grams[second], h.T @ h / len(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.tilde[second], h_tilde.T @ h_tilde / len(x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats.cross[second], h_tilde.T @ h / len(x), rtol=1e-4, atol=1e-5)
    assert stats.held_rows == {second: 16}
    part, part_tilde = h[48:64], h_tilde[48:64]
    for value, expected in zip(stats.held[second], (part.T @ part, part_tilde.T @ part_tilde, part_tilde.T @ part)):
        np.testing.assert_allclose(value, expected / 16, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def fed_back(tmp_path_factory, digits):  # noqa: F811
    """The CNN at --target-ratio 0.48 calibrated by the CLI with and without error feedback (on these
    256 images the head's refit passes its held-out check at 0.48, not at 0.29)."""
    root = tmp_path_factory.mktemp("feedback")
    np.savez(root / "cal.npz", image=digits[0].reshape(-1, 8, 8, 1))
    from graphrewrite.cli import main
    from graphrewrite.rewriting.calibration import feedback

    for name, passes, rows in (("off", "0", None), ("on", "4", None), ("few rows", "4", 1e6)):
        with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.suppress(SystemExit), \
                pytest.MonkeyPatch.context() as patch:
            if rows is not None:
                patch.setattr(feedback, "MIN_ROWS_PER_FEATURE", rows)
            main(["compress", CNN, str(root / name), "--target-ratio=0.48", "-q", "--fast",
                  "--calibration", str(root / "cal.npz"), "--calibration-passes", passes])
        assert os.path.isfile(root / name / "saved_model.pb")
        (root / f"{name}.txt").write_text(stdout.getvalue())
    return root


def test_too_few_rows_per_feature_keeps_the_first_pass_and_says_why(capsys, fed_back):
    sites = {}
    for name in ("off", "few rows"):
        code, stdout, _ = run(capsys, "inspect", str(fed_back / name), "--json")
        sites[name] = {s["variable"]: s for s in json.loads(stdout)["sites"]}
    head = sites["few rows"]["logits/kernel"]
    assert "feedback_level" not in head
    code, stdout, _ = run(capsys, "inspect", str(fed_back / "few rows"))
    assert "not refitted: 256 calibration rows for 1,024 input features" in stdout
    # the first pass's factors, as with --calibration-passes 0
    assert head["output_error"] == pytest.approx(sites["off"]["logits/kernel"]["output_error"], rel=1e-6)


def test_error_feedback_lowers_the_compressed_models_output_error(capsys, fed_back, digits):  # noqa: F811
    import tensorflow as tf

    x = digits[0].reshape(-1, 8, 8, 1)
    original = tf.saved_model.load(CNN)  # kept referenced: a restored function dies with its object
    reference = original.serve(tf.constant(x)).numpy()
    errors = {}
    for name in ("off", "on"):
        model = at_alpha0(str(fed_back / name))
        out = model.serve(tf.constant(x)).numpy()
        errors[name] = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        code, stdout, _ = run(capsys, "inspect", str(fed_back / name), "--json")
        data = json.loads(stdout)
        levels = {s["variable"]: s.get("feedback_level") for s in data["sites"]}
        if name == "on":
            assert data["options"]["calibration"]["passes"] == 4
            assert levels == {"conv_2/kernel": None, "logits/kernel": 1}
            head = next(s for s in data["sites"] if s["variable"] == "logits/kernel")
            assert 0 < head["output_error"] <= head["output_error_first_pass"] < head["output_error_plain"]
            # the head's figure is ||X A - X~ W_c|| / ||X A|| on the calibration images: the model's
            # own logits give both norms (the bias cancels in the difference and is taken off X A)
            bias = next(v.numpy() for v in original.variables if v.name.startswith("logits/bias"))
            independent = np.linalg.norm(out - reference) / np.linalg.norm(reference - bias)
            assert head["output_error"] == pytest.approx(independent, rel=1e-3)
        else:
            assert set(levels.values()) == {None}
    assert errors["on"] < errors["off"], errors
    summaries = {name: (fed_back / f"{name}.txt").read_text() for name in ("off", "on", "few rows")}
    assert "error feedback: 1 of them refitted" in summaries["on"]  # the head, after conv_2
    assert "error feedback" not in summaries["off"] + summaries["few rows"]
    code, text, _ = run(capsys, "inspect", str(fed_back / "on"))
    assert "(fed back, level 1; first pass " in text and "at most 4 passes" in text


def test_bad_pass_count_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "compress", CNN, str(tmp_path / "out"), "--calibration-passes", "-1")
    assert code == 2 and "--calibration-passes" in err and "Traceback" not in err
    code, _, err = run(capsys, "compress", CNN, str(tmp_path / "out"), "--calibration-passes", "2")
    assert code == 2 and err.strip().endswith("--calibration-passes needs --calibration"), err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "out")


def test_cli_default_is_the_librarys():
    from graphrewrite.cli import compress
    from graphrewrite.rewriting.calibration import feedback

    option = next(p for p in compress.params if p.name == "calibration_passes")
    assert f"(default {feedback.DEFAULT_PASSES};" in option.help


@pytest.mark.parametrize("name", ["keras3_attention", "tf1_builder", "keras3_lstm"])
def test_feedback_pass_on_other_model_kinds(model_factory, name):
    """The second copy of the pruned graph reads the replaced values on Einsum/BatchMatMul models,
    TF1 VariableV2 weights and a model with a While loop: replacing every weight by itself gives
    back the first pass's Gram three times; halving them changes what the weights after the first
    ones see. The LSTM's kernels are read inside its loop through the handle it takes, which the
    second copy swaps: its head is at level 1 and sees other rows. (The kernels themselves get no
    tilde: their rows are summed inside the loop, in the first pass only.)"""
    from graphrewrite.rewriting.calibration import feedback, statistics

    model, data = random_calibration(model_factory, name)
    first = statistics.collect(model, data, "serving_default", batch_size=16)
    keys = sorted(first.grams)
    recurrent = {k for k in keys if "lstm_cell" in model.infos[k].name}
    assert len(recurrent) == (2 if name == "keras3_lstm" else 0)
    same = statistics.collect(model, data, "serving_default", batch_size=16, only=keys,
                              replaced={k: model.variables[k].numpy() for k in keys})
    assert sorted(same.tilde) == sorted(set(keys) - recurrent)
    for key in same.tilde:
        gram = whiten.dense(first.grams[key])
        for value in (same.grams[key], same.tilde[key], same.cross[key]):
            np.testing.assert_allclose(value, gram, rtol=1e-4, atol=1e-6 * np.abs(gram).max())
    halved = statistics.collect(model, data, "serving_default", batch_size=16, only=keys,
                                replaced={k: 0.5 * model.variables[k].numpy() for k in keys})
    by_level = feedback.levels(model, "serving_default", keys)
    moved = {k for k in halved.tilde if not np.allclose(halved.tilde[k], halved.grams[k], rtol=1e-3)}
    assert moved == {k for k in halved.tilde if by_level[k] > 0}, by_level
    assert moved
    if name == "keras3_lstm":
        assert {by_level[k] for k in recurrent} == {0}  # the loop's weights do not count for each other


def test_a_refit_that_does_not_lower_the_error_is_not_kept(digits, monkeypatch, tmp_path):  # noqa: F811
    """Input/output's calibrated fit is not an exact optimum, so a refit could come out worse than
    the first pass: then the first pass's factors stay, and the manifest says so. Forced here by a
    wrong target."""
    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.reporting.report import calibration_text

    def run_with(passes):
        return graphrewrite.compress(MLP, str(tmp_path / f"out{passes}"), hparams.resolve(None, {"rank": 200}),
                                     verify=False,
                                     calibration={"pixels": digits[0]}, calibration_passes=passes)

    run_with(0)
    monkeypatch.setattr(whiten, "feedback_target", lambda a, *_: -a)
    sites = {s["variable"]: s["details"] for s in run_with(4).manifest["sites"]}
    refitted = [name for name, d in sites.items() if "feedback_level" in d]
    assert refitted
    for name in refitted:
        d = sites[name]
        assert d["feedback"].startswith("refit not kept: on the held-out calibration rows")
        assert d["output_error"] == d["output_error_first_pass"] < d["output_error_plain"]
        assert calibration_text(d).endswith(f"(level {d['feedback_level']}: refit not kept)")
    # the written factors are the first pass's: the same as without feedback
    import tensorflow as tf

    written = {}
    for passes in (0, 4):
        model = tf.saved_model.load(str(tmp_path / f"out{passes}"))
        written[passes] = [{k: v.numpy() for k, v in s.factors.items()} for s in model.graphrewrite_sites]
    assert len(written[0]) == len(written[4]) == 3
    for without, with_feedback in zip(written[0], written[4]):
        for name, value in without.items():
            np.testing.assert_array_equal(value, with_feedback[name])
