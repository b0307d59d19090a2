"""The model check (graphrewrite.rewriting.calibration.modelcheck): the compressed model's outputs on held-out
calibration examples decide which calibrated factors are kept, and the figures are the model's."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_calibration import CNN, at_alpha0, digits  # noqa: F401 - digits is a fixture
from test_cli import MLP, run

from graphrewrite import whiten


def _mlp_forward(variables, x, **replaced):
    """The digits MLP in numpy (dense_1, dense_2 with ReLU, logits), kernels replaceable."""
    v = {name: replaced.get(name.split("/")[0], value) if name.endswith("kernel") else value
         for name, value in variables.items()}
    h = np.maximum(x @ v["dense_1/kernel"] + v["dense_1/bias"], 0)
    h = np.maximum(h @ v["dense_2/kernel"] + v["dense_2/bias"], 0)
    return h @ v["logits/kernel"] + v["logits/bias"]


@pytest.mark.parametrize("examples", [64, 80])
def test_the_first_pass_holds_out_every_fourth_batch(digits, examples):  # noqa: F811
    """64 examples in batches of 16: dense_1 (64 features) keeps its rows (a RowGram), 80: a Gram.
    Either way ``fitted`` is the Gram of the examples outside batch 4 (48-63), ``held`` theirs."""
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import statistics

    model = loader.load(MLP, ["serve"], True)
    key = next(k for k in model.infos if model.infos[k].name == "dense_1/kernel")
    x = digits[0][:examples].astype(np.float64)
    stats = statistics.collect(model, {"pixels": digits[0][:examples]}, "serving_default", batch_size=16)
    assert isinstance(stats.grams[key], whiten.RowGram) == (examples == 64)
    assert stats.held_rows[key] == 16
    held = x[48:64]
    rest = np.concatenate([x[:48], x[64:]])
    np.testing.assert_allclose(whiten.dense(stats.held[key]), held.T @ held / 16, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(whiten.dense(stats.fitted(key)), rest.T @ rest / len(rest), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(whiten.dense(stats.grams[key]), x.T @ x / len(x), rtol=1e-4, atol=1e-4)
    held_examples = statistics.held_out({"pixels": digits[0][:examples]}, 16)["pixels"]
    np.testing.assert_array_equal(held_examples, digits[0][48:64])
    # with fewer than four batches there is nothing to hold out
    few = statistics.collect(model, {"pixels": digits[0][:48]}, "serving_default", batch_size=16)
    assert few.fitted(key) is None


@pytest.mark.parametrize("logits", [False, True])
def test_errors_are_the_models_outputs_against_an_independent_forward(digits, logits):  # noqa: F811
    """With ``logits`` (--logits) the outputs are compared with each row's mean removed."""
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import modelcheck

    model = loader.load(MLP, ["serve"], True)
    keys = {model.infos[k].name: k for k in model.infos}
    variables = {model.infos[k].name: v.numpy() for k, v in model.variables.items()}
    x = digits[0][:50]
    rng = np.random.default_rng(0)
    noisy = variables["dense_2/kernel"] + 0.05 * rng.standard_normal(variables["dense_2/kernel"].shape)
    halved = 0.5 * variables["logits/kernel"]
    got = modelcheck.errors(model, {"pixels": x}, "serving_default", 16, {keys["logits/kernel"]: halved},
                            [{}, {keys["dense_2/kernel"]: noisy}, {keys["dense_1/kernel"]: variables["dense_1/kernel"]}],
                            logits=["output_0"] if logits else ())

    def centred(y):
        return y - y.mean(axis=1, keepdims=True) if logits else y

    reference = centred(_mlp_forward(variables, x.astype(np.float64)))
    for result, replaced in zip(got, ({"logits": halved}, {"logits": halved, "dense_2": noisy}, {"logits": halved})):
        out = centred(_mlp_forward(variables, x.astype(np.float64), **replaced))
        assert list(result["outputs"]) == ["output_0"]
        expected = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        assert result["outputs"]["output_0"] == pytest.approx(expected, rel=1e-4)
        per_example = np.sum((out - reference) ** 2, axis=1) / np.sum(reference ** 2)
        np.testing.assert_allclose(result["scores"], per_example, rtol=1e-4, atol=1e-12)
    assert got[0]["outputs"] == pytest.approx(got[2]["outputs"])  # a weight replaced by itself


def test_a_less_data_aware_set_must_win_beyond_the_noise():
    from graphrewrite.rewriting.calibration import modelcheck

    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.5, 64)
    noise = 0.05 * rng.standard_normal(64)
    # a consistent 10% gain on every example: switch; the same mean gain from two examples: stay
    consistent = {"error feedback": base, "first pass": 0.9 * base, "plain": 2 * base}
    kept, z = modelcheck.decide(consistent)
    assert kept == "first pass" and z["first pass"] < -modelcheck.Z_TO_SWITCH and z["plain"] > 0
    lumpy = base.copy()
    lumpy[:2] -= 0.1 * base.sum() / 2
    kept, z = modelcheck.decide({"error feedback": base, "first pass": lumpy})
    assert np.sum(lumpy) < np.sum(base) and kept == "error feedback" and -modelcheck.Z_TO_SWITCH < z["first pass"] < 0
    # noise alone does not switch; the standing set is the one later sets are compared with
    kept, _ = modelcheck.decide({"first pass": base, "plain": base + noise})
    assert kept == "first pass"
    kept, z = modelcheck.decide({"a": base, "b": 0.8 * base, "c": 0.85 * base})
    assert kept == "b" and z["c"] > 0
    assert modelcheck.decide({"a": base, "b": base}) == ("a", {"b": 0.0})


@pytest.fixture(scope="module")
def cnn_checked(tmp_path_factory, digits):  # noqa: F811
    """The CNN at rank=200 (the same ranks with and without data) compressed plain and calibrated."""
    import graphrewrite
    from graphrewrite import hparams

    root = tmp_path_factory.mktemp("modelcheck")
    results = {}
    for name, data in (("plain", None), ("calibrated", {"image": digits[0].reshape(-1, 8, 8, 1)})):
        results[name] = graphrewrite.compress(CNN, str(root / name), hparams.resolve(None, {"rank": 200}),
                                              verify=False, calibration=data)
    return root, results


def test_the_plain_figure_is_the_plain_models_error_on_the_held_out_examples(cnn_checked, digits):  # noqa: F811
    """Plain factors do not depend on the data, so the check's plain figure must be the error of the
    model compressed without calibration, on the held-out examples (batches of 32: the 4th and 8th
    of 256 images), computed here from the saved models."""
    import tensorflow as tf

    from graphrewrite.rewriting.calibration import statistics

    root, results = cnn_checked
    check = results["calibrated"].manifest["options"]["calibration"]["model_check"]
    assert check["checked"] and check["examples"] == 64
    assert list(check["errors"]) == ["error feedback", "first pass", "plain"]  # the head is refitted
    held = statistics.held_out({"image": digits[0].reshape(-1, 8, 8, 1)}, 32)["image"]
    np.testing.assert_array_equal(held, np.concatenate([digits[0][96:128], digits[0][224:256]]).reshape(-1, 8, 8, 1))
    original = tf.saved_model.load(CNN)
    reference = original.signatures["serving_default"](image=tf.constant(held))["output_0"].numpy()
    plain = at_alpha0(str(root / "plain"))
    out = plain.signatures["serving_default"](image=tf.constant(held))["output_0"].numpy()
    assert check["errors"]["plain"] == pytest.approx(np.linalg.norm(out - reference) / np.linalg.norm(reference),
                                                     rel=1e-4)
    assert check["outputs"]["plain"] == {"output_0": pytest.approx(check["errors"]["plain"])}
    # on these images the calibrated sets are far better: plain is not kept
    assert check["errors"]["first pass"] < 0.5 * check["errors"]["plain"]
    assert check["z"]["plain"] > 0 and check["kept"] != "plain"
    calibrated = at_alpha0(str(root / "calibrated"))
    out = calibrated.signatures["serving_default"](image=tf.constant(held))["output_0"].numpy()
    # the written factors (fitted on all 256 images, these included) do at least as well as the trial
    assert np.linalg.norm(out - reference) / np.linalg.norm(reference) <= check["errors"][check["kept"]] * 1.01


def test_the_check_is_reported(capsys, cnn_checked):
    from graphrewrite.reporting.report import compress_text

    root, results = cnn_checked
    code, text, _ = run(capsys, "inspect", str(root / "calibrated"))
    assert code == 0
    line = next(line for line in text.splitlines() if line.startswith("model check on 64 held-out"))
    assert "error feedback 0." in line and "first pass 0." in line and "plain 0." in line and "; kept " in line
    summary = compress_text(results["calibrated"], CNN)
    assert line in summary.splitlines()
    code, stdout, _ = run(capsys, "inspect", str(root / "calibrated"), "--json")
    assert json.loads(stdout)["options"]["calibration"]["model_check"]["kept"] in ("error feedback", "first pass")


def test_plain_factors_kept_by_the_check_are_what_is_written(digits, tmp_path, monkeypatch):  # noqa: F811
    """Where the check keeps plain factors (forced here: its figures given, plain better by far on
    every held-out example), the written model is the one compressed without data, each site's
    ``factors`` says why, and its output errors are the plain ones."""
    import tensorflow as tf

    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.rewriting.calibration import modelcheck, statistics

    calibrate = statistics.calibrate

    def with_figures(*args, **kwargs):
        stats = calibrate(*args, **kwargs)
        real = stats.check

        def check(common, variants):
            out = real(common, variants)  # run it all the same: the figures must exist
            assert len(out) == len(variants) and all(len(r["scores"]) == stats.held_examples for r in out)
            return [{**r, "scores": np.full(stats.held_examples, 0.01 if i == len(out) - 1 else 0.5)}
                    for i, r in enumerate(out)]

        stats.check = check
        return stats

    monkeypatch.setattr(statistics, "calibrate", with_figures)
    hp = hparams.resolve(None, {"rank": 200})
    plain = graphrewrite.compress(MLP, str(tmp_path / "plain"), hp, verify=False)
    result = graphrewrite.compress(MLP, str(tmp_path / "checked"), hp, verify=False,
                                   calibration={"pixels": digits[0]})
    check = result.manifest["options"]["calibration"]["model_check"]
    assert check["kept"] == "plain" and check["z"]["plain"] == -modelcheck.Z_CAP, check
    for site in result.manifest["sites"]:
        details = site["details"]
        assert details["factors"] == "plain (kept by the model check)"
        assert details["output_error"] == pytest.approx(details["output_error_plain"])
    written = [[v.numpy() for _, v in sorted(s.factors.items())]
               for s in tf.saved_model.load(str(tmp_path / "checked")).graphrewrite_sites]
    expected = [[v.numpy() for _, v in sorted(s.factors.items())]
                for s in tf.saved_model.load(str(tmp_path / "plain")).graphrewrite_sites]
    assert len(written) == len(expected) == len(plain.manifest["sites"]) == 3
    for got, want in zip(written, expected):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)


def test_choose_keeps_the_lowest_and_puts_its_factors_back(digits, monkeypatch):  # noqa: F811
    """The decision alone, with the sandbox's figures given: error feedback's model error above the
    first pass's puts the first pass's factors back in the refitted sites (and notes say so)."""
    from graphrewrite import hparams
    from graphrewrite.rewriting.build import factorize_all
    from graphrewrite.rewriting.calibration import feedback, modelcheck, statistics
    from graphrewrite.rewriting.pipeline import plan_model

    model, plan, transform = plan_model(CNN, hparams.resolve(None, {"rank": 200}), probe=lambda: None,
                                        calibration={"image": digits[0].reshape(-1, 8, 8, 1)})
    initial = factorize_all(model, plan, transform, lambda _: None)
    first_pass = dict(initial)
    chained, trials = feedback.refine(model, plan, transform, initial, 4, lambda _: None)
    refitted = [sid for sid in initial if initial[sid] is not first_pass[sid]]
    assert refitted and set(refitted) == set(trials)
    seen = []

    def fake(common, variants):  # feedback, first pass, plain: per-example errors on 4 examples
        seen.append((common, variants))
        return [{"outputs": {"output_0": 0.0}, "scores": np.array(scores)}
                for scores in ([0.03, 0.02, 0.02, 0.02], [0.01, 0.01, 0.01, 0.01], [0.2, 0.2, 0.2, 0.21])]

    monkeypatch.setattr(model.calibration, "check", fake)
    check = modelcheck.choose(model, plan, transform, initial, first_pass, trials, lambda _: None)
    assert check["kept"] == "first pass"
    assert check["errors"] == pytest.approx({"error feedback": 0.3, "first pass": 0.2, "plain": np.sqrt(0.81)})
    for sid in refitted:
        assert initial[sid] is first_pass[sid]
    (common, variants), = seen
    # every site is calibrated here (conv_2 and the head): the first pass's trial goes once, in
    # common; error feedback's set adds the refitted head, plain's every site
    keys = {s.variable.key for s in plan.sites}
    assert set(common) == keys and len(variants) == 3 and variants[1] == {}
    assert set(variants[0]) == {s.variable.key for s in plan.sites if s.id in refitted} and set(variants[2]) == keys
    # what the check ran: the trials, fitted without the held-out batches
    key = plan.sites[0].variable.key
    fitted = model.calibration.fitted(key)
    assert statistics.HOLD_OUT_EVERY == 4 and fitted is not None
    notes = modelcheck.notes(check, chained, plan)
    assert all(n["feedback"].startswith("refit not kept: the model check kept the first pass factors")
               for sid, n in notes.items() if sid in refitted)


def test_with_too_few_examples_the_check_says_it_did_not_run(digits, tmp_path, capsys):  # noqa: F811
    import graphrewrite
    from graphrewrite import hparams

    result = graphrewrite.compress(MLP, str(tmp_path / "out"), hparams.resolve(None, {"rank": 200}), verify=False,
                                   calibration={"pixels": digits[0][:96]})  # three batches of 32
    check = result.manifest["options"]["calibration"]["model_check"]
    assert check == {"checked": False, "why": "fewer than 4 batches of calibration examples: none to hold out"}
    code, text, _ = run(capsys, "inspect", str(tmp_path / "out"))
    assert "model check: not run (fewer than 4 batches" in text


@pytest.mark.parametrize("name", ["keras3_multi_input", pytest.param("tf1_builder", marks=pytest.mark.heavy),
                                  pytest.param("keras3_mixed_precision", marks=pytest.mark.heavy)])
def test_the_check_runs_on_other_model_kinds(model_factory, tmp_path, name):
    """Two inputs and two outputs, TF1 VariableV2 weights, float16 compute: every float output
    of the signature is measured, and the model's figure is the root of their squares' sum."""
    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import statistics

    path, _ = model_factory(name)
    model = loader.load(path, ["serve"], name != "tf1_builder")
    specs = statistics.input_specs(model, "serving_default")
    rng = np.random.default_rng(0)
    data = {s.name: rng.standard_normal((128, *s.shape[1:])).astype(s.dtype) for s in specs}
    result = graphrewrite.compress(path, str(tmp_path / "out"), hparams.resolve(None, {"rank": 200}),
                                   calibration=data)
    check = result.manifest["options"]["calibration"]["model_check"]
    outputs = sorted(model.signature_functions["serving_default"].structured_outputs)
    assert check["checked"] and check["examples"] == 32
    for name_, per_output in check["outputs"].items():
        assert sorted(per_output) == outputs
        assert np.isfinite(list(per_output.values())).all()
        assert check["errors"][name_] == pytest.approx(np.sqrt(sum(v ** 2 for v in per_output.values())))
    assert check["kept"] in check["errors"]
