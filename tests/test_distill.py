"""Distillation (graphrewrite.rewriting.calibration.distill): the factors trained on the calibration examples
against the original model's outputs; its figures against the written model, its effect on the
held-out digits, and where it does not run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from test_calibration import CNN, at_alpha0, digits, one_shot_accuracy  # noqa: F401 - digits is a fixture
from test_cli import MLP, run

from graphrewrite.rewriting.calibration import statistics


def _softmax_cross_entropy(logits_original: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per row: -sum softmax(original) * log_softmax(logits), in float64."""
    def log_softmax(z):
        z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    return -np.sum(np.exp(log_softmax(logits_original)) * log_softmax(logits), axis=1)


def _compress(src: str, out: str, data: dict, ratio: float, same_rank: bool = False, **extra):
    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.rewriting.plan import Selection
    from graphrewrite.rewriting.rankpolicy import Policy

    return graphrewrite.compress(src, out, hparams.resolve(None, {}), overwrite=True, calibration=data,
                                 selection=Selection(policy=Policy(target_ratio=ratio, same_rank=same_rank)), **extra)


def _calibrated_as_written(src: str, out: str, data: dict, ratio: float, distilled):
    """The calibrated compress (no distillation) at the allocation a distilled one was written with."""
    from graphrewrite.rewriting.calibration import fitting

    allocation = distilled.manifest["options"]["calibration"]["distill"].get("allocation", {})
    return _compress(src, out, data, ratio, same_rank=allocation.get("kept") == fitting.SAME_RANK)


def _held_out_cross_entropy(path: str, data: dict) -> float:
    """The mean softmax cross-entropy of the model at ``path`` (alpha = 0) against the digits CNN on
    the held-out calibration examples."""
    import tensorflow as tf

    held = tf.constant(statistics.held_out(data, statistics.DEFAULT_BATCH)["image"])
    y = next(iter(tf.saved_model.load(CNN).signatures["serving_default"](image=held).values())).numpy()
    model = at_alpha0(path)
    y_c = next(iter(model.signatures["serving_default"](image=held).values())).numpy()
    return float(np.mean(_softmax_cross_entropy(y, y_c)))


@pytest.fixture(scope="module")
def distilled_cnn(tmp_path_factory, digits):  # noqa: F811
    """The digits CNN at --target-ratio 0.2, calibrated on 256 training images (a fourth held
    out), with 300 steps of softmax distillation (then again on all 256: distill.refit), the same
    without that refit (the early-stopped factors), and without distillation at the allocation it
    was written with."""
    root = tmp_path_factory.mktemp("distill")
    data = {"image": digits[0].reshape(-1, 8, 8, 1)}
    distilled = _compress(CNN, str(root / "distilled"), data, 0.2, distill_steps=300, distill_loss="softmax")
    early = _compress(CNN, str(root / "early"), data, 0.2, distill_steps=300, distill_loss="softmax",
                      distill_refit=False)
    results = {"calibrated": _calibrated_as_written(CNN, str(root / "calibrated"), data, 0.2, distilled),
               "distilled": distilled, "early": early}
    return root, data, results


def test_distillation_figures_are_the_written_models(distilled_cnn):
    """The held-out loss before and after, as the manifest records them, are the softmax cross-
    entropy of the written models at alpha = 0 against the original on the held-out examples:
    before, of the calibrated model; after, of the early-stopped factors (written with
    --no-distill-refit); and the refit's figure, of the model written by default (its factors
    trained on every example for as many epochs, from the same start and seed)."""
    root, data, results = distilled_cnn
    record = results["distilled"].manifest["options"]["calibration"]["distill"]
    early = results["early"].manifest["options"]["calibration"]["distill"]
    assert record["run"] and record["kept"] and record["steps"] == 300 and record["loss"] == "softmax"
    assert record["examples"] == 192 and 0 < record["best_step"] <= 300
    assert record["refit"] == {"run": True, "examples": 256, "steps": round(record["best_step"] * 256 / 192),
                               "steps_run": round(record["best_step"] * 256 / 192),
                               "loss_on_held_out": record["refit"]["loss_on_held_out"]}
    assert early["refit"] == {"run": False, "why": "not asked: --no-distill-refit"}
    assert {k: v for k, v in early.items() if k != "refit"} == {k: v for k, v in record.items() if k != "refit"}
    assert sorted(record["trained"]) == sorted(s["id"] for s in results["distilled"].manifest["sites"]
                                               if s["details"].get("distilled"))
    assert len(statistics.held_out(data, statistics.DEFAULT_BATCH)["image"]) == 64
    for name, figure in (("calibrated", record["held_out"]["before"]), ("early", record["held_out"]["after"]),
                         ("distilled", record["refit"]["loss_on_held_out"])):
        expected = _held_out_cross_entropy(str(root / name), data)
        assert figure == pytest.approx(expected, rel=1e-3), name
    # trained on them now, the refit's factors fit the held-out examples better than early stopping's
    assert record["refit"]["loss_on_held_out"] < record["held_out"]["after"]
    assert record["held_out"]["after"] < 0.7 * record["held_out"]["before"]
    from graphrewrite.reporting import report

    text = report.compress_text(results["distilled"], CNN)
    assert "distilled factors serve the model's outputs" in text and "kept the factors of step" in text
    assert (f"Then distilled again from the same start on all 256 examples, the held-out ones included, for as "
            f"many epochs ({record['refit']['steps']} steps): those factors are written") in text
    assert "Not distilled again on every example (not asked: --no-distill-refit)" in report.compress_text(
        results["early"], CNN)
    calibrated_text = report.compress_text(results["calibrated"], CNN)
    assert "distilled factors serve" not in calibrated_text
    # without distillation, a held-out output error of 10% or more suggests it, with the figure
    check = results["calibrated"].manifest["options"]["calibration"]["model_check"]
    error = check["errors"][check["kept"]]
    assert error >= report.DISTILL_HINT
    assert (f"hint: on the held-out calibration examples the compressed model's outputs are off by {error:.0%}"
            in calibrated_text and "--distill-steps 3000" in calibrated_text)
    assert "hint: on the held-out" not in text  # (the --logits hint stands: distillation's loss is no declaration)
    # alpha = 1 is the original still: compress verified the written model
    assert all(v["checked"] and v["max_rel_diff_alpha1"] == 0.0
               for v in results["distilled"].verification["signatures"].values())


def test_distillation_writes_the_allocation_with_the_lower_held_out_loss(distilled_cnn, tmp_path):
    """At --target-ratio with distillation, one rank for every weight at the same budget is fitted
    and distilled too (graphrewrite.rewriting.calibration.fitting); the written plan is the one with the lower
    held-out loss. Its figure is that of the early-stopped factors (written with --no-distill-refit,
    the test above); the other's is that of a compress forced to the other allocation, distilled
    alone, not refitted."""
    from graphrewrite.reporting import report
    from graphrewrite.rewriting.calibration import fitting

    root, data, results = distilled_cnn
    manifest = results["distilled"].manifest
    record = manifest["options"]["calibration"]["distill"]
    allocation = record["allocation"]
    assert allocation["compared"], allocation
    assert allocation["ranks"][fitting.SAME_RANK] == {"conv_1/kernel": 4, "conv_2/kernel": 4, "logits/kernel": 4}
    assert allocation["params_after"][fitting.SAME_RANK] == 5708 <= 0.2 * 28960
    assert allocation["params_after"][fitting.ALLOCATION] <= 0.2 * 28960
    held = allocation["held_out"]
    kept, other = allocation["kept"], next(name for name in held if name != allocation["kept"])
    assert held[kept] < held[other] and held[kept] == record["held_out"]["after"]
    written = {s["variable"].split(":")[0]: s["k"] for s in manifest["sites"]}
    assert written == allocation["ranks"][kept]
    assert manifest["totals"]["params_after"] == allocation["params_after"][kept] == sum(
        s["params_after"] for s in manifest["sites"])
    # the other allocation alone, written
    forced = _compress(CNN, str(tmp_path / "forced"), data, 0.2, same_rank=other == fitting.SAME_RANK,
                       distill_steps=300, distill_loss="softmax", compare_allocations=False, distill_refit=False)
    assert {s["variable"].split(":")[0]: s["k"] for s in forced.manifest["sites"]} == allocation["ranks"][other]
    assert held[other] == pytest.approx(_held_out_cross_entropy(str(tmp_path / "forced"), data), rel=1e-3)
    text = report.compress_text(results["distilled"], CNN)
    assert f"Allocation: held-out loss after distillation, {fitting.ALLOCATION} (" in text
    assert f"written with the lower, {kept}" in text


def test_distillation_lifts_the_held_out_digits(distilled_cnn, digits):  # noqa: F811
    """Measured: 0.56 calibrated, 0.92 distilled (300 steps, 192 images; 0.92 without mixup) at 20% of the
    kernel parameters; the 450 test images were not seen."""
    root, _, _ = distilled_cnn
    x_test, y_test = digits[1].reshape(-1, 8, 8, 1), digits[2]
    calibrated, distilled = (one_shot_accuracy(str(root / name), x_test, y_test)
                             for name in ("calibrated", "distilled"))
    assert distilled >= calibrated + 0.2, (calibrated, distilled)


def test_only_the_factors_move(distilled_cnn):
    """Distillation trains the sites' factors; every other variable and every A is the original's."""
    import tensorflow as tf

    root, _, results = distilled_cnn
    original = {v.name: v.numpy() for v in tf.saved_model.load(CNN).variables}
    values = {name: {v.name: v.numpy() for v in tf.saved_model.load(str(root / name)).variables}
              for name in ("calibrated", "distilled")}
    for name, value in original.items():
        np.testing.assert_array_equal(values["distilled"][name], value)
    moved = [n for n in values["distilled"] if n not in original
             and not np.array_equal(values["distilled"][n], values["calibrated"][n])]
    sites = [s["variable"].split(":")[0] for s in results["distilled"].manifest["sites"]]
    assert sorted(moved) == sorted(f"{v}/{m}_matrix:0" for v in sites for m in "bc")
    assert "conv_2/kernel" in sites and "logits/kernel" in sites


def test_a_distillation_that_does_not_help_is_not_kept(tmp_path, digits):  # noqa: F811
    """The MLP at 48% is as good as uncompressed: with a learning rate too large for any step to
    lower the held-out loss, the factors written are those of the calibrated compress (to rounding:
    without distillation the pass collects output Grams, with it input Grams, the same factors)."""
    from graphrewrite.reporting import report
    from graphrewrite.rewriting.calibration import distill

    data = {"pixels": digits[0]}
    calibrated = _compress(MLP, str(tmp_path / "plain"), data, 0.48)
    check = calibrated.manifest["options"]["calibration"]["model_check"]
    assert check["errors"][check["kept"]] < report.DISTILL_HINT  # as good as uncompressed: no hint
    assert "hint:" not in report.compress_text(calibrated, MLP)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill, "DEFAULT_RATE", 10.0)
        result = _compress(MLP, str(tmp_path / "distilled"), data, 0.48, distill_steps=24, distill_loss="mse")
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"] and record["rate"] == 10.0 and not record["kept"] and record["best_step"] == 0, record
    assert record["held_out"]["after"] == record["held_out"]["before"]
    # one rank for every weight was distilled too, not kept either: the --target-ratio allocation stands
    assert record["allocation"] == {"compared": False, "why": "at one rank for every weight distillation was "
                                    "not kept (no epoch lowered the held-out loss beyond noise)"}
    import tensorflow as tf

    written = [{v.name: v.numpy() for v in tf.saved_model.load(str(tmp_path / n)).variables}
               for n in ("plain", "distilled")]
    assert written[0].keys() == written[1].keys()
    for name in written[0]:
        np.testing.assert_allclose(written[0][name], written[1][name], rtol=1e-4,
                                   atol=1e-5 * np.abs(written[1][name]).max())
    assert not any(s["details"].get("distilled") for s in result.manifest["sites"])


def test_mse_loss_against_an_independent_count(tmp_path, digits):  # noqa: F811
    """mse: per held-out example the squared error of the logits over their mean square on the
    training examples; the figures before and after against the written models."""
    import tensorflow as tf

    data = {"pixels": digits[0]}
    distilled = _compress(MLP, str(tmp_path / "distilled"), data, 0.2, distill_steps=60, distill_loss="mse")
    results = {"calibrated": _calibrated_as_written(MLP, str(tmp_path / "calibrated"), data, 0.2, distilled),
               "distilled": distilled}
    record = results["distilled"].manifest["options"]["calibration"]["distill"]
    held = statistics.held_out(data, statistics.DEFAULT_BATCH)["pixels"]
    train = statistics.held_out(data, statistics.DEFAULT_BATCH, held=False)["pixels"]
    original = tf.saved_model.load(MLP)
    y, y_train = (original.serve(tf.constant(x)).numpy().astype(np.float64) for x in (held, train))
    scale = np.sum(np.square(y_train)) / len(y_train)
    figure = "after" if record["kept"] else "before"
    for name, which in (("calibrated", "before"), ("distilled", figure)):
        model = at_alpha0(str(tmp_path / name))  # kept referenced: its function dies with it
        y_c = model.serve(tf.constant(held)).numpy().astype(np.float64)
        expected = float(np.mean(np.sum(np.square(y_c - y), axis=1) / scale))
        assert record["held_out"][which] == pytest.approx(expected, rel=1e-3), name


def test_a_keras3_lstm_is_distilled_through_its_loop(model_factory, tmp_path):
    """compress --distill-steps on a Keras 3 LSTM (kernels read inside a While): every site is
    trained, and the held-out figure after is the written model's mse at alpha = 0."""
    import tensorflow as tf
    from test_calibration import random_calibration

    import graphrewrite
    from graphrewrite import hparams

    path, _ = model_factory("keras3_lstm")
    _, data = random_calibration(model_factory, "keras3_lstm", examples=128)
    result = graphrewrite.compress(path, str(tmp_path / "out"), hparams.resolve(None, {"rank": 400}),
                                   calibration=data, distill_steps=40)
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"] and len(record["trained"]) == 3 and not record["untouched"], record
    assert "allocation" not in record  # the reference's rule: one k per weight, no budget to share
    assert all(v["checked"] for v in result.verification["signatures"].values())
    held = statistics.held_out(data, statistics.DEFAULT_BATCH)
    train = statistics.held_out(data, statistics.DEFAULT_BATCH, held=False)
    original = tf.saved_model.load(path).signatures["serving_default"]
    model = at_alpha0(str(tmp_path / "out"))
    y, y_train, y_c = (next(iter(f(**{k: tf.constant(v) for k, v in x.items()}).values())).numpy().astype(np.float64)
                       for f, x in ((original, held), (original, train), (model.signatures["serving_default"], held)))
    expected = float(np.mean(np.sum(np.square(y_c - y), axis=1) / (np.sum(np.square(y_train)) / len(y_train))))
    assert record["held_out"]["after" if record["kept"] else "before"] == pytest.approx(expected, rel=1e-3)


def test_cli_options_and_reports(capsys, tmp_path, digits):  # noqa: F811
    np.savez(tmp_path / "cal.npz", pixels=digits[0])
    out = str(tmp_path / "out")
    code, _, err = run(capsys, "compress", MLP, out, "--distill-steps", "5")
    assert code == 2 and err.strip().endswith("--distill-steps needs --calibration") and not os.path.exists(out)
    code, _, err = run(capsys, "compress", MLP, out, "--calibration", str(tmp_path / "cal.npz"),
                       "--distill-loss", "hinge")
    assert code == 2 and "hinge" in err and not os.path.exists(out)
    code, stdout, err = run(capsys, "compress", MLP, out, "--calibration", str(tmp_path / "cal.npz"),
                            "--target-ratio", "0.2", "--distill-steps", "24", "--distill-loss", "softmax", "-q")
    assert code == 0, err
    assert ("distillation (softmax loss against the original model's outputs, 192 calibration examples and "
            "mixed pairs of them (mixup), Adam 0.1, cosine decay)") in stdout
    code, text, _ = run(capsys, "inspect", out)
    assert "distillation (softmax loss" in text and ". Allocation: " in text
    code, stdout, _ = run(capsys, "diff", MLP, out, "--json")
    record = json.loads(stdout)["manifest"]["distill"]
    assert record["steps"] == 24 and record["loss"] == "softmax" and record["run"]
    html = str(tmp_path / "diff.html")
    assert run(capsys, "diff", MLP, out, "--html", html)[0] == 0
    with open(html, encoding="utf-8") as f:
        assert "distillation (--distill-steps)" in f.read()
    code, _, err = run(capsys, "compress", MLP, out, "--no-distill-mixup", "--overwrite")
    assert code == 2 and err.strip().endswith("--no-distill-mixup needs --calibration")
    code, stdout, err = run(capsys, "compress", MLP, out, "--calibration", str(tmp_path / "cal.npz"), "--overwrite",
                            "--target-ratio", "0.2", "--distill-steps", "8", "--no-distill-mixup", "--json", "-q")
    assert code == 0, err
    assert json.loads(stdout)["options"]["calibration"]["distill"]["mixup"] == "not asked"
    assert "(no mixup: not asked)" in run(capsys, "inspect", out)[1]
    code, _, err = run(capsys, "compress", MLP, out, "--no-compare-allocations", "--overwrite")
    assert code == 2 and err.strip().endswith("--no-compare-allocations needs --calibration")
    code, stdout, err = run(capsys, "compress", MLP, out, "--calibration", str(tmp_path / "cal.npz"), "--overwrite",
                            "--target-ratio", "0.2", "--distill-steps", "8", "--no-compare-allocations", "--json",
                            "-q")
    assert code == 0, err
    assert json.loads(stdout)["options"]["calibration"]["distill"]["allocation"] == {
        "compared": False, "why": "not asked: --no-compare-allocations"}
    code, _, err = run(capsys, "compress", MLP, out, "--no-distill-refit", "--overwrite")
    assert code == 2 and err.strip().endswith("--no-distill-refit needs --calibration")


def test_a_second_plan_that_fails_leaves_the_first(tmp_path, digits, monkeypatch):  # noqa: F811
    """Where fitting the one-rank plan fails (its distillation out of time or memory in the
    sandbox), compress writes the --target-ratio plan, as without the comparison, and says why."""
    from graphrewrite.errors import ModelRunError
    from graphrewrite.reporting import report
    from graphrewrite.rewriting.calibration import fitting

    fit = fitting.fit

    def failing(model, plan, transform, progress):
        if plan.options["policy"].endswith("one rank for every weight"):
            raise ModelRunError("distilling the factors on the calibration examples: did not finish within 1 s")
        return fit(model, plan, transform, progress)

    monkeypatch.setattr(fitting, "fit", failing)
    data = {"pixels": digits[0]}
    result = _compress(MLP, str(tmp_path / "out"), data, 0.2, distill_steps=8)
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"] and record["allocation"] == {
        "compared": False, "why": "one rank for every weight failed: distilling the factors on the calibration "
                                  "examples: did not finish within 1 s"}
    assert result.plan.options["policy"] == "target_ratio=0.2"
    assert "Allocation: --target-ratio's (one rank for every weight failed:" in report.compress_text(result, MLP)


def test_python_api_refuses_bad_values(tmp_path, digits):  # noqa: F811
    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.errors import UsageError

    hp = hparams.resolve(None, {"rank": 200})
    for extra, message in (({"distill_steps": -1, "calibration": {"pixels": digits[0]}}, "must be 0 or more"),
                           ({"distill_steps": 3}, "needs --calibration"),
                           ({"distill_loss": "l1", "calibration": {"pixels": digits[0]}}, "one of mse, softmax")):
        with pytest.raises(UsageError, match=message):
            graphrewrite.compress(MLP, str(tmp_path / "out"), hp, **extra)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("mixup", [False, True])
def test_one_step_is_adam_on_the_gradient_of_the_models_loss(digits, monkeypatch, mixup):  # noqa: F811
    """One step from the rank=200 factors of the MLP: the head's B and C move by Adam's first
    step (relative: 0.1 times their RMS) on the gradient of the softmax loss, computed here in
    numpy from the compressed model's own forward pass. With mixup the step's inputs are the
    mixed rows (distill.mix, recorded here) and its targets the original model's outputs on
    them (numpy's forward pass of the original weights)."""
    from test_modelcheck import _mlp_forward

    from graphrewrite import hparams, views
    from graphrewrite.rewriting import build, loader, pipeline
    from graphrewrite.rewriting.calibration import distill

    model, plan, transform = pipeline.plan_model(MLP, hparams.resolve(None, {"rank": 200}))
    initial = build.factorize_all(model, plan, transform, lambda _: None)
    names = {s.id: model.infos[s.variable.key].name for s in plan.sites}
    assert sorted(names.values()) == ["dense_1/kernel", "dense_2/kernel", "logits/kernel"]
    sites = [(s.id, s.variable.key, views.to_json(s.view), s.size) for s in plan.sites]
    x = digits[0][:32]
    mixed = []

    def recorded(values, rng):
        mixed.append(original_mix(values, rng))
        return mixed[-1]

    original_mix = distill.mix
    monkeypatch.setattr(distill, "mix", recorded)
    got = distill.train_factors(loader.load(MLP, ["serve"], True), {"pixels": x}, {"pixels": x}, "serving_default",
                                32, transform, sites, initial, 1, "softmax", 0.1, 0, early_stopping=False,
                                mixup=mixup)
    assert got["mixup"] is mixup or (not mixup and got["mixup"] == "not asked")
    assert len(mixed) == int(mixup)
    if mixup:
        assert not np.allclose(mixed[0][0], x)
        x = mixed[0][0]
    variables = {model.infos[k].name: v.numpy().astype(np.float64) for k, v in model.variables.items()}
    dense = {names[s.id].split("/")[0]: views.invert_numpy(transform.numpy_dense(initial[s.id], s.size), s.view,
                                                            model.infos[s.variable.key].shape).astype(np.float64)
             for s in plan.sites}
    y = _mlp_forward(variables, x.astype(np.float64))
    h = np.maximum(x @ dense["dense_1"] + variables["dense_1/bias"], 0)
    h = np.maximum(h @ dense["dense_2"] + variables["dense_2/bias"], 0)
    y_c = _mlp_forward(variables, x.astype(np.float64), **dense)

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    g_w = h.T @ ((softmax(y_c) - softmax(y)) / len(x))  # d mean(cross-entropy) / d W_head
    head = next(sid for sid, name in names.items() if name == "logits/kernel")
    b0, c0 = (initial[head][k].astype(np.float64) for k in ("b", "c"))
    for name, start, grad in (("b", b0, g_w @ c0.T), ("c", c0, b0.T @ g_w)):
        size = np.sqrt(np.mean(np.square(start)))
        # Adam's first step: m = 0.1 g, v = 0.001 g^2, bias-corrected
        expected = -size * 0.1 * (np.sqrt(1 - 0.999) / 0.1) * (0.1 * grad) / (np.sqrt(0.001) * np.abs(grad) + 1e-7)
        np.testing.assert_allclose(got["factors"][head][name] - start, expected, rtol=2e-2, atol=1e-4 * size)


@pytest.mark.parametrize("name", ["keras3_multi_input", pytest.param("tf1_builder", marks=pytest.mark.heavy),
                                  pytest.param("keras3_mixed_precision", marks=pytest.mark.heavy),
                                  pytest.param("keras3_attention", marks=pytest.mark.heavy)])
def test_distillation_runs_on_other_model_kinds(model_factory, tmp_path, name):
    """Two inputs and two outputs, TF1 VariableV2 weights, float16 compute, Einsum/BatchMatMul
    attention: the loss sums every float output, the held-out loss does not rise where the
    factors are kept, and the written model is the original at alpha = 1 (compress verifies)."""
    from test_calibration import random_calibration

    import graphrewrite
    from graphrewrite import hparams

    path, _ = model_factory(name)
    _, data = random_calibration(model_factory, name, examples=128)
    result = graphrewrite.compress(path, str(tmp_path / "out"), hparams.resolve(None, {"rank": 200}),
                                   calibration=data, distill_steps=30)
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"], record
    assert record["trained"] and not record["untouched"]
    assert np.isfinite(list(record["held_out"].values())).all()
    assert record["held_out"]["after"] <= record["held_out"]["before"]
    assert all(v["checked"] for v in result.verification["signatures"].values())


@pytest.mark.parametrize("name", ["keras3_lstm", pytest.param("keras3_attention", marks=pytest.mark.heavy),
                                  pytest.param("tf1_builder", marks=pytest.mark.heavy)])
def test_the_second_allocation_on_other_model_kinds(model_factory, tmp_path, name):
    """At --target-ratio with distillation, the plan with one rank for every weight is made, fitted
    and distilled on models whose weights a loop reads (Keras 3 LSTM), that Einsum reads (attention)
    and TF1 VariableV2 weights; the written plan is the one the record says, within the budget,
    and compress verifies it at alpha = 1."""
    from test_calibration import random_calibration

    from graphrewrite.rewriting.calibration import fitting

    path, _ = model_factory(name)
    _, data = random_calibration(model_factory, name, examples=128)
    result = _compress(path, str(tmp_path / "out"), data, 0.3, distill_steps=40)
    record = result.manifest["options"]["calibration"]["distill"]
    allocation = record["allocation"]
    assert record["run"] and "compared" in allocation, record
    sites = {s["variable"].split(":")[0]: s["k"] for s in result.manifest["sites"]}
    kept = allocation.get("kept", fitting.ALLOCATION)
    if allocation["compared"]:
        assert sites == allocation["ranks"][kept]
        assert min(allocation["held_out"].values()) == allocation["held_out"][kept]
        assert len(set(allocation["ranks"][fitting.SAME_RANK].values())) == 1
    whole = [int(np.prod(s["shape"])) for s in result.manifest["skipped"] if "leaves it dense" in s["reason"]]
    before = sum(s["params_before"] for s in result.manifest["sites"]) + sum(whole)
    assert sum(s["params_after"] for s in result.manifest["sites"]) + sum(whole) <= 0.3 * before
    assert kept == fitting.ALLOCATION or result.plan.options["policy"].endswith("one rank for every weight")
    assert all(v["checked"] for v in result.verification["signatures"].values())


def test_gradients_reach_the_weights_a_loop_reads(model_factory):
    """A Keras 3 LSTM reads its kernels inside a While through their handles: distillation swaps
    them for variables holding the compressed values and carries their gradients on to the
    factors. One Adam step moves an entry against the sign of the loss's slope, which central
    differences of the forward loss (the held-out figure, itself checked against the written
    models above) give independently."""
    from graphrewrite import hparams, views
    from graphrewrite.rewriting import build, loader, pipeline
    from graphrewrite.rewriting.calibration import distill

    path, _ = model_factory("keras3_lstm")
    model, plan, transform = pipeline.plan_model(path, hparams.resolve(None, {"rank": 400}))
    fir = model.functions["signature:serving_default"]
    sites = [(s.id, s.variable.key, views.to_json(s.view), s.size) for s in plan.sites]
    names = {s.id: model.infos[s.variable.key].name for s in plan.sites}
    loop_read = distill.loop_handles(replay_of(model, fir), fir, {s[1] for s in sites})
    assert sorted(model.infos[k].name for k in loop_read) == ["lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel"]
    initial = build.factorize_all(model, plan, transform, lambda _: None)
    specs = statistics.input_specs(model, "serving_default")
    data = {s.name: np.random.default_rng(0).standard_normal((32, *s.shape[1:])).astype(s.dtype) for s in specs}
    fresh = loader.load(path, ["serve"], True)

    def loss(factors):
        got = distill.train_factors(fresh, data, data, "serving_default", 32, transform, sites, factors, 0, "mse",
                                    0.1, 0)
        return float(np.mean(got["scores"]["before"]))

    moved = distill.train_factors(fresh, data, data, "serving_default", 32, transform, sites, initial, 1, "mse",
                                  0.1, 0, early_stopping=False)
    assert sorted(names[sid] for sid in moved["trained"]) == sorted(names.values())
    rng = np.random.default_rng(1)
    checked = 0
    for sid in (s.id for s in plan.sites if s.variable.key in loop_read):
        for factor in ("b", "c"):
            start = initial[sid][factor]
            for index in map(tuple, rng.integers(0, start.shape, (2, start.ndim))):
                eps = 1e-2 * np.sqrt(np.mean(np.square(start)))
                up, down = ({**initial, sid: {**initial[sid], factor: _nudged(start, index, d)}} for d in (eps, -eps))
                slope = (loss(up) - loss(down)) / (2 * eps)
                step = moved["factors"][sid][factor][index] - start[index]
                if abs(slope) > 1e-4:
                    assert np.sign(step) == -np.sign(slope), (names[sid], factor, index, slope, step)
                    checked += 1
    assert checked >= 4


def replay_of(model, fir):
    from graphrewrite.rewriting.calibration import replay

    return replay.Pruned(fir, model, fir.outputs)


def _nudged(array, index, delta):
    out = array.copy()
    out[index] += delta
    return out


def test_distillation_stops_itself_before_the_sandbox_limit(tmp_path, digits, monkeypatch):  # noqa: F811
    """Far more steps than GRAPHREWRITE_RUN_TIMEOUT allows: the job stops at an epoch's end past
    80% of it and compress writes what it had, saying so, instead of failing on a timeout."""
    from graphrewrite.reporting import report

    monkeypatch.setenv("GRAPHREWRITE_RUN_TIMEOUT", "15")
    result = _compress(CNN, str(tmp_path / "out"), {"image": digits[0].reshape(-1, 8, 8, 1)}, 0.2,
                       distill_steps=10**6, distill_loss="softmax", compare_allocations=False)  # one job
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"] and 0 < record["steps_run"] < 10**6 and record["steps_run"] % 6 == 0, record
    assert f"stopped after {record['steps_run']} of 1000000 steps" in report.compress_text(result, CNN)


def test_a_signature_without_float_outputs_is_not_distilled(tmp_path):
    """Only class ids come out (argmax): nothing to match, the manifest says so, compress writes
    the calibrated model."""
    import tensorflow as tf

    import graphrewrite
    from graphrewrite import hparams

    class Classifier(tf.Module):
        def __init__(self):
            super().__init__()
            self.kernel = tf.Variable(np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32)])
        def serve(self, x):
            return {"label": tf.argmax(tf.matmul(x, self.kernel), axis=1)}

    model = Classifier()
    path = str(tmp_path / "ids")
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    data = {"x": np.random.default_rng(1).standard_normal((128, 64)).astype(np.float32)}
    result = graphrewrite.compress(path, str(tmp_path / "out"), hparams.resolve(None, {"rank": 400}),
                                   calibration=data, distill_steps=10)
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"] is False and "no float outputs" in record["why"], record
    assert os.path.isfile(tmp_path / "out" / "saved_model.pb")


@pytest.mark.parametrize("record", [{"run": True, "held_out": "x"}, {"run": True, "steps": "many"}, ["run"],
                                    {"allocation": {"compared": True, "held_out": 1}}, {"refit": {"run": True}},
                                    {"allocation": {"compared": True, "held_out": {"a": 1.0}, "ranks": [],
                                                    "params_after": {}, "z": "?"}}])
def test_a_hand_edited_distill_record_is_one_line(capsys, distilled_cnn, tmp_path, record):
    """inspect and diff (text and --html) read the record from the model's manifest: a damaged
    one (or a damaged allocation in it) is one line and exit status 3, never a traceback or an
    internal error."""
    import glob
    import shutil

    root, _, _ = distilled_cnn
    model = str(tmp_path / "edited")
    shutil.copytree(root / "distilled", model)
    (path,) = glob.glob(os.path.join(model, "assets", "*manifest*"))
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if isinstance(record, dict) and list(record) in (["allocation"], ["refit"]):  # the written record, damaged
        record = {**data["options"]["calibration"]["distill"], **record}
    data["options"]["calibration"]["distill"] = record
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    for argv in (["inspect", model], ["diff", CNN, model], ["diff", CNN, model, "--html", str(tmp_path / "d.html")]):
        code, _, err = run(capsys, *argv)
        assert code == 3 and err.count("\n") == 1 and "damaged graphrewrite manifest" in err, (argv, err)


def test_mix_is_convex_pairs_shared_by_every_input():
    """distill.mix: row i of each input is l_i x_i + (1 - l_i) x_p(i), with the same l and p for
    every input (numpy reference from the same seed), and keeps each input's dtype."""
    from graphrewrite.rewriting.calibration import distill

    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 4, 2)).astype(np.float32)
    b = rng.standard_normal((6, 5)).astype(np.float16)
    mixed = distill.mix([a, b], np.random.default_rng(11))
    reference = np.random.default_rng(11)
    order, share = reference.permutation(6), reference.uniform(size=6)
    np.testing.assert_allclose(mixed[0], share[:, None, None] * a + (1 - share[:, None, None]) * a[order], rtol=1e-6)
    np.testing.assert_allclose(mixed[1].astype(np.float64),
                               share[:, None] * b.astype(np.float64) + (1 - share[:, None]) * b[order], rtol=2e-3)
    assert [m.dtype for m in mixed] == [np.float32, np.float16] and [m.shape for m in mixed] == [a.shape, b.shape]
    assert 0 < share.min() and share.max() < 1 and sorted(order) == list(range(6))


def test_adam_decay_is_cosine():
    """The step's factor is (1 + cos(pi f)) / 2 of the share f of the steps done: 1 at the start,
    1/2 halfway, 0 at the end (no step moves a variable)."""
    import tensorflow as tf

    from graphrewrite.rewriting.calibration import distill

    var = tf.Variable(np.ones((3, 2), np.float32))
    adam = distill.Adam([var], 0.1)
    for fraction, factor in ((0.0, 1.0), (0.5, 0.5), (0.25, (1 + np.sqrt(0.5)) / 2), (1.0, 0.0)):
        adam.decay(fraction)
        assert float(adam.factor.numpy()) == pytest.approx(factor, abs=1e-7)
    adam.apply([tf.ones((3, 2))])
    np.testing.assert_array_equal(var.numpy(), np.ones((3, 2)))
    adam.decay(0.5)
    adam.apply([tf.ones((3, 2))])  # Adam's second step, bias-corrected: 0.5 x 0.1 x RMS 1 (m / sqrt(v) = 1)
    np.testing.assert_allclose(var.numpy(), 1 - 0.05, rtol=1e-4)


def test_inputs_that_are_not_all_float_are_not_mixed(tmp_path):
    """A signature with an integer input: distillation runs on the examples as they are and the
    manifest and inspect say why there was no mixup."""
    import tensorflow as tf

    import graphrewrite
    from graphrewrite import hparams
    from graphrewrite.reporting import report

    class Tagged(tf.Module):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.kernel = tf.Variable(rng.standard_normal((64, 48)).astype(np.float32))
            self.table = tf.Variable(rng.standard_normal((4, 48)).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 64], tf.float32), tf.TensorSpec([None], tf.int32)])
        def serve(self, x, tag):
            return {"y": tf.matmul(x, self.kernel) + tf.gather(self.table, tag)}

    model = Tagged()
    path = str(tmp_path / "tagged")
    tf.saved_model.save(model, path, signatures={"serving_default": model.serve})
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((128, 64)).astype(np.float32), "tag": rng.integers(0, 4, 128).astype(np.int32)}
    result = graphrewrite.compress(path, str(tmp_path / "out"), hparams.resolve(None, {"rank": 400}),
                                   calibration=data, distill_steps=10)
    record = result.manifest["options"]["calibration"]["distill"]
    assert record["run"] and record["mixup"] == "inputs not float: tag (int32)", record
    assert "(no mixup: inputs not float: tag (int32))" in report.compress_text(result, path)


def test_the_refit_scales_the_steps_and_keeps_the_early_stopped_factors_where_it_fails():
    """distill.refit on its own: it trains from the factors before distillation on every example
    for as many epochs as early stopping chose (best_step times all over the training examples);
    it does nothing where distillation was not kept; where the second distillation fails in the
    sandbox (a ModelRunError), the factors written stay the early-stopped ones and the record says
    why."""
    import types

    from graphrewrite.errors import ModelRunError
    from graphrewrite.rewriting.calibration import distill

    calls = []

    def fake(transform, sites, factors, steps, loss, rate, seed, mixup, everything=False):
        calls.append((factors, steps, loss, rate, mixup, everything))
        if steps > 1000:
            raise ModelRunError("distilling the factors on the calibration examples: did not finish within 9 s")
        return {"factors": {"s0": {"b": np.full(2, 7.0)}}, "examples": 512, "steps_run": steps,
                "scores": {distill.BEFORE: np.ones(4), distill.AFTER: np.full(4, 0.25)}}

    model = types.SimpleNamespace(calibration=types.SimpleNamespace(examples=512, distill=fake))
    plan = types.SimpleNamespace(sites=[])
    record = {"run": True, "kept": True, "best_step": 300, "examples": 384, "loss": "softmax", "rate": 0.1,
              "mixup": True}
    before, written = {"s0": {"b": np.zeros(2)}}, {"s0": {"b": np.ones(2)}}
    distill.refit(model, plan, None, before, written, record, lambda _: None)
    assert calls == [(before, 400, "softmax", 0.1, True, True)]
    np.testing.assert_array_equal(written["s0"]["b"], np.full(2, 7.0))
    assert record["refit"] == {"run": True, "examples": 512, "steps": 400, "steps_run": 400, "loss_on_held_out": 0.25}
    record.update(best_step=900)  # 1,200 steps: the fake sandbox gives up
    written = {"s0": {"b": np.ones(2)}}
    distill.refit(model, plan, None, before, written, record, lambda _: None)
    np.testing.assert_array_equal(written["s0"]["b"], np.ones(2))
    assert record["refit"] == {"run": False, "why": "distilling the factors on the calibration examples: did not "
                                                    "finish within 9 s"}
    for given in ({"run": True, "kept": False, "best_step": 0}, {"run": False, "why": "no float outputs"}):
        distill.refit(model, plan, None, before, written, given, lambda _: None)
        assert given.get("refit") == ({"run": False, "why": "distillation was not kept"} if given["run"] else None)
    assert len(calls) == 2
