"""Weights whose outputs matter only up to a shift of each row (softmax/argmax heads, --logits):
the centred whitened fit (whiten.ShiftFree), which weights qualify (graphrewrite.rewriting.calibration.shift),
and the digits CNN compressed with --logits against plain factors."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest
from test_calibration import CNN, at_alpha0, digits, one_shot_accuracy, plain_svd, problem  # noqa: F401 - digits is a fixture
from test_cli import run

from graphrewrite import whiten


def centred(t: np.ndarray) -> np.ndarray:
    return t - t.mean(axis=1, keepdims=True)


@pytest.mark.parametrize("form", ["dense", "rows", "outputs"])
def test_shift_free_factors_are_the_closed_form_optimum_of_the_centred_error(form):
    """min ||X (A - M) C|| over rank-k M (C the centring of the n outputs), X of full column rank:
    M* = A V_k V_k^T with V_k the leading right singular vectors of X A C (numpy), whatever form
    the Gram takes; the errors and the spectrum are those of X A C."""
    x, a = problem(5, rows=200 if form != "rows" else 20)
    rows, m = x.shape
    gram = x.T @ x / rows
    if form == "rows":
        given = whiten.RowGram((x / np.sqrt(rows)).astype(np.float32))
    elif form == "outputs":
        given = whiten.OutputGram(a.T @ gram @ a, float(np.trace(gram)), m)
    else:
        given = gram
    free = whiten.ShiftFree(given, "test")
    _, s, vt = np.linalg.svd(x @ centred(a), full_matrices=False)
    for k in (1, 4, 9):
        b, c = whiten.low_rank(a, free, k, damping=1e-12)
        product = b.astype(np.float64) @ c
        if form != "rows":  # 20 rows < m: the optimum is not unique there, its error is
            optimum = a @ vt[:k].T @ vt[:k]
            np.testing.assert_allclose(product, optimum, atol=1e-3 * np.abs(optimum).max())
        np.testing.assert_allclose(product.sum(axis=1), 0.0, atol=1e-4 * np.abs(product).max())  # nothing shared
        direct = np.linalg.norm(x @ (a - product) @ (np.eye(16) - 1 / 16)) / np.linalg.norm(x @ centred(a))
        assert whiten.output_error(a, product, free) == pytest.approx(direct, rel=1e-4)
        assert direct == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)), rel=1e-3)
        plain = plain_svd(a, k)  # the reference's factors, measured the same way: never better
        plain_error = np.linalg.norm(x @ centred(a - plain)) / np.linalg.norm(x @ centred(a))
        assert whiten.output_error(a, plain, free) == pytest.approx(plain_error, rel=1e-4)
        assert direct <= plain_error * (1 + 1e-5)
    spectrum = whiten.whitened_spectrum(a, free, damping=1e-12) * np.sqrt(rows)
    np.testing.assert_allclose(spectrum, s, rtol=1e-4, atol=1e-6 * s[0])  # the last ~0: C's null direction


def test_shift_free_chained_error_and_feedback_target():
    """Error feedback in the centred metric: ``||(X A - X~ M) C|| / ||X A C||`` from the three Grams,
    and low rank of feedback_target under a ShiftFree G~ is that objective's optimum (a reduced-rank
    regression, by numpy)."""
    x, a = problem(6)
    rng = np.random.default_rng(7)
    xt = x + 0.3 * rng.standard_normal(x.shape) @ np.diag(np.abs(x).mean(axis=0))
    rows = len(x)
    gram, tilde, cross = x.T @ x / rows, xt.T @ xt / rows, xt.T @ x / rows
    k = 4
    target = whiten.feedback_target(a, tilde, cross, damping=1e-12)
    b, c = whiten.low_rank(target, whiten.ShiftFree(tilde), k, damping=1e-12)
    m = b.astype(np.float64) @ c
    got = whiten.chained_error(a, m, whiten.ShiftFree(gram), tilde, cross)
    direct = np.linalg.norm(centred(x @ a - xt @ m)) / np.linalg.norm(centred(x @ a))
    assert got == pytest.approx(direct, rel=1e-4)
    # reduced-rank regression of Y = X A C on X~: the least squares fit projected on Y-hat's top k
    y = centred(x @ a)
    q, r = np.linalg.qr(xt)
    fit = q @ (q.T @ y)
    _, _, vt = np.linalg.svd(fit, full_matrices=False)
    best = np.linalg.solve(r, q.T @ y) @ vt[:k].T @ vt[:k]
    assert direct == pytest.approx(np.linalg.norm(y - xt @ best) / np.linalg.norm(y), rel=1e-3)


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A Keras 3 model with one hidden layer and five heads: softmax, logits, a layer read by the
    output and by another layer, that other layer, and one logit; and a tf.Module whose head's logits (plus a
    bias) go to tf.argmax and tf.nn.log_softmax, whose second head's to a ReLU, whose 1 x 1
    convolution's to a softmax of its pixels flattened, and whose fourth head's, rows of 4 cut in
    rows of 2, to a softmax; and a Keras 3 Conv1D with a softmax over its 5 channels at each step."""
    import keras
    import tensorflow as tf

    root = tmp_path_factory.mktemp("heads")
    keras.utils.set_random_seed(0)
    x = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    soft = keras.layers.Dense(5, activation="softmax", name="soft")(h)
    logit = keras.layers.Dense(4, name="logit")(h)
    shared = keras.layers.Dense(6, name="shared")(h)
    after = keras.layers.Dense(2, name="after")(shared)
    binary = keras.layers.Dense(1, name="binary")(h)  # one logit (a sigmoid's): never shift-free
    keras.Model(x, [soft, logit, shared, after, binary]).export(str(root / "keras"), verbose=False)
    tokens = keras.Input((6, 8), name="tokens")  # a per-step classifier: Keras' Conv1D is Conv2D + Squeeze
    per_step = keras.layers.Conv1D(5, 3, activation="softmax", name="per_step")(tokens)
    keras.Model(tokens, per_step).export(str(root / "conv1d"), verbose=False)

    rng = np.random.default_rng(0)
    module = tf.Module()
    module.hidden = tf.Variable(rng.standard_normal((8, 16)).astype(np.float32), name="hidden")
    module.head = tf.Variable(rng.standard_normal((16, 3)).astype(np.float32), name="head")
    module.bias = tf.Variable(np.zeros(3, np.float32), name="bias")
    module.other = tf.Variable(rng.standard_normal((16, 3)).astype(np.float32), name="other")
    module.conv = tf.Variable(rng.standard_normal((1, 1, 16, 3)).astype(np.float32), name="conv")
    module.wide = tf.Variable(rng.standard_normal((16, 4)).astype(np.float32), name="wide")

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)])
    def serve(x):
        h = tf.nn.relu(x @ module.hidden)
        scores = tf.identity(h @ module.head) + module.bias
        pixels = tf.nn.conv2d(tf.reshape(h, [-1, 1, 1, 16]), module.conv, 1, "VALID")
        return {"class": tf.argmax(scores, axis=-1), "log_p": tf.nn.log_softmax(scores),
                "other": tf.nn.relu(h @ module.other),
                # a 1 x 1 x 3 map flattened to rows of 3 keeps them; rows of 4 cut in 2 do not
                "conv_p": tf.nn.softmax(tf.reshape(pixels, [-1, 3])),
                "halves": tf.nn.softmax(tf.reshape(h @ module.wide, [-1, 2]))}

    tf.saved_model.save(module, str(root / "module"), signatures={"serving_default": serve})
    return {"keras": str(root / "keras"), "module": str(root / "module"), "conv1d": str(root / "conv1d")}


@pytest.mark.parametrize("logits", ["none", "all", "one"])
def test_which_weights_are_shift_free(heads, logits):
    """``logits``: no output declared logits, every one (--logits), or the "logit" layer's alone
    (--logits-output with its name)."""
    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import shift, statistics
    from graphrewrite.rewriting.match import match_function

    named = {}
    for path in heads.values():
        model = loader.load(path, ["serve"], True)
        fir = model.functions["signature:serving_default"]
        uses, _ = match_function(fir, dict(model.infos))
        names = statistics.output_names(model, "serving_default")
        chosen = {"none": [], "all": names, "one": [n for n in names if n == "output_1"]}[logits]
        declared = [fir.outputs[names.index(n)] for n in chosen]
        found = shift.shift_free(fir, uses, {k: tuple(i.shape) for k, i in model.infos.items()}, declared)
        named.update({model.infos[k].name.split("/")[0].split(":")[0]: why for k, why in found.items()})
    expected = {"soft": "its outputs feed a Softmax", "head": "its outputs feed a LogSoftmax and an argmax",
                "conv": "its outputs feed a Softmax", "per_step": "its outputs feed a Softmax"}
    if logits != "none":  # output_1 is the "logit" layer's
        expected.update(logit="its outputs feed an output declared logits")
    if logits == "all":  # the outputs of rank 2 are logits; "shared" is also read by "after"; one logit never
        expected.update(after="its outputs feed an output declared logits")
    assert named == expected


@pytest.fixture(scope="module")
def cnn_at_20(tmp_path_factory, digits):  # noqa: F811
    """The digits CNN at --target-ratio 0.2 by the CLI: plain, and calibrated with --logits on 512
    training images."""
    from make_testdata import digits_split

    root = tmp_path_factory.mktemp("logits")
    x = digits_split()[0].reshape(-1, 8, 8, 1)
    np.savez(root / "cal.npz", image=x[np.random.default_rng(0).choice(len(x), 512, replace=False)])
    outs = {}
    for name, extra in (("plain", ["--fast"]), ("logits", ["--calibration", str(root / "cal.npz"), "--logits"])):
        outs[name] = str(root / name)
        from graphrewrite.cli import main

        with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.suppress(SystemExit):
            main(["compress", CNN, outs[name], "--target-ratio=0.2", "-q", *extra])
        assert os.path.isfile(os.path.join(outs[name], "saved_model.pb"))
        (root / f"{name}.txt").write_text(stdout.getvalue())
    return root, outs


def test_the_digits_cnn_with_logits_is_better_than_plain(capsys, cnn_at_20, digits):  # noqa: F811
    """At 20% of the kernel parameters the default calibrated fit loses to plain SVD on accuracy
    (52% against 54%: the logits' shared part takes a rank of the head's 3); with --logits the
    head is fitted modulo each row's shift and the model check compares centred logits."""
    root, outs = cnn_at_20
    printed = (root / "logits.txt").read_text()
    assert "1 of them fitted up to a shift of each output row" in printed
    assert "with the shift per row that --logits leaves to the softmax" in printed
    code, stdout, _ = run(capsys, "inspect", outs["logits"], "--json")
    data = json.loads(stdout)
    calibration = data["options"]["calibration"]
    assert calibration["logits"] is True and calibration["model_check"]["checked"] and "as_logits" not in calibration
    assert "hint: logits/kernel" not in printed
    by_name = {s["variable"].split("/")[0]: s for s in data["sites"]}
    assert by_name["logits"]["outputs"] == ("fitted up to a shift of each row: its outputs feed an output "
                                            "declared logits")
    assert "outputs" not in by_name["conv_2"]
    code, text, _ = run(capsys, "inspect", outs["logits"])
    assert "fitted up to a shift of each row" in text
    head = by_name["logits"]
    assert f"{head['output_error_plain']:.4f} -> {head['output_error']:.4f}" in text
    html = os.path.join(root, "diff.html")
    code, _, err = run(capsys, "diff", CNN, outs["logits"], "--html", html)
    assert code == 0, err
    with open(html, encoding="utf-8") as f:
        assert "(up to a shift per row)" in f.read()
    # the head (refitted by error feedback after conv_2) reports ||(X A - X~ W_c) C|| / ||X A C|| on
    # the calibration images: the compressed model's own logits give it (the bias cancels in the
    # difference and is taken off X A; C removes each row's mean)
    import tensorflow as tf

    assert head["feedback_level"] == 1 and "feedback" not in head
    x = np.load(os.path.join(root, "cal.npz"))["image"]
    original = tf.saved_model.load(CNN)  # kept referenced: a restored function dies with its object
    reference = original.serve(tf.constant(x)).numpy().astype(np.float64)
    compressed = at_alpha0(outs["logits"])
    out = compressed.serve(tf.constant(x)).numpy().astype(np.float64)
    bias = next(v.numpy() for v in original.variables if v.name.startswith("logits/bias"))
    independent = np.linalg.norm(centred(out - reference)) / np.linalg.norm(centred(reference - bias))
    assert head["output_error"] == pytest.approx(independent, rel=1e-3)
    assert head["output_error"] < np.linalg.norm(out - reference) / np.linalg.norm(reference - bias)
    x_test, y_test = digits[1].reshape(-1, 8, 8, 1), digits[2]
    plain, calibrated = (one_shot_accuracy(outs[k], x_test, y_test) for k in ("plain", "logits"))
    assert calibrated >= plain + 0.03, (plain, calibrated)  # measured: 0.536 -> 0.613


def test_logits_needs_calibration_and_known_outputs(capsys, tmp_path):
    code, _, err = run(capsys, "compress", CNN, str(tmp_path / "out"), "--logits")
    assert code == 2 and err.strip().count("\n") == 0 and "--logits needs --calibration" in err
    np.savez(tmp_path / "cal.npz", image=np.zeros((8, 8, 8, 1), np.float32))
    code, _, err = run(capsys, "compress", CNN, str(tmp_path / "out"), "--calibration", str(tmp_path / "cal.npz"),
                       "--logits-output", "scores")
    assert code == 2 and err.strip().count("\n") == 0
    assert "--logits-output 'scores': signature 'serving_default' has the outputs output_0" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.heavy
@pytest.mark.parametrize("name,expected", [
    ("ResNet50", {"predictions/kernel"}), ("EfficientNetB0", {"predictions/kernel"}),
    ("ConvNeXtTiny", {"convnext_tiny_head_dense/kernel"}),
    # its 1 x 1 "logits" convolution reaches the Softmax through Flatten (a Reshape to (batch, 10))
    ("MobileNetV3Small", {"logits/kernel"})])
def test_keras_applications_heads_are_found(tmp_path, name, expected):
    """keras.applications' own classifiers (random weights, softmax on top): the classifier's
    kernel and nothing else qualifies."""
    import zoo

    from graphrewrite.rewriting import loader
    from graphrewrite.rewriting.calibration import shift
    from graphrewrite.rewriting.match import match_function

    model = loader.load(zoo.ZOO[name].build(tmp_path), ["serve"], True)
    fir = model.functions["signature:serving_default"]
    uses, _ = match_function(fir, dict(model.infos))
    found = shift.shift_free(fir, uses, {k: tuple(i.shape) for k, i in model.infos.items()})
    assert {model.infos[k].name for k in found} == expected
    assert set(found.values()) <= {"its outputs feed a Softmax"}


def test_logits_output_names_the_outputs(capsys, tmp_path):
    """--logits-output NAME declares that output alone (recorded as a list); distillation's loss
    stays mse unless every output is declared."""
    from make_testdata import digits_split

    np.savez(tmp_path / "cal.npz", image=digits_split()[0][:128].reshape(-1, 8, 8, 1))
    code, stdout, err = run(capsys, "compress", CNN, str(tmp_path / "out"), "--calibration",
                            str(tmp_path / "cal.npz"), "--logits-output", "output_0", "--target-ratio", "0.29",
                            "--distill-steps", "10", "--dry-run", "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["options"]["calibration"]["logits"] == ["output_0"]
    assert data["options"]["calibration"]["distill"]["loss"] == "mse"
    assert [s.get("outputs") for s in data["sites"]] == [
        None, "fitted up to a shift of each row: its outputs feed an output declared logits"]
