"""graphrewrite.reporting.diff and graphrewrite.reporting.htmlreport: what a rewrite changed, read from the protobufs.

The expected numbers come from outside the diff: variable counts and parameters from the models'
checkpoint indexes, and op counts from how graphrewrite.rewriting.blend builds one site (see
test_serving_ops_gain_the_gated_branches).
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from models import TESTDATA

from graphrewrite.errors import InputModelError
from graphrewrite.reporting.diff import diff_models, diff_text, printable
from graphrewrite.reporting.htmlreport import write_html

KERNELS = ("dense_1/kernel", "dense_2/kernel", "logits/kernel")
BIASES = ("dense_1/bias", "dense_2/bias", "logits/bias")
SVG = "{http://www.w3.org/2000/svg}svg"
HOSTILE = "<script>alert(1)</script>&w\x1b[2J"  # markup, and a terminal's clear-screen


@pytest.fixture(scope="module")
def digits(compressed_factory):
    """(original, rewritten at rank=200, their diff) of testdata/digits_mlp."""
    src, out, _, _ = compressed_factory("digits_mlp", rank=200)
    return src, out, diff_models(src, out)


def checkpoint_variables(path: str) -> tuple[int, int]:
    """(variables, parameters) of a TF2 SavedModel, from its checkpoint index, not its protobuf."""
    import tensorflow as tf

    shapes = [shape for name, shape in tf.train.list_variables(os.path.join(path, "variables", "variables"))
              if name.endswith("/.ATTRIBUTES/VARIABLE_VALUE")]
    return len(shapes), sum(math.prod(shape) for shape in shapes)


def test_signatures_keep_their_interface_and_gain_the_update(digits):
    _, _, result = digits
    sigs = result["signatures"]
    assert sorted(sigs) == ["compression_update", "serve", "serving_default"]
    for key in ("serve", "serving_default"):
        assert sigs[key]["status"] == "unchanged"
        assert sigs[key]["in"]["inputs"] == {"pixels": {"dtype": "float32", "shape": [None, 64]}}
        assert sigs[key]["out"]["outputs"] == {"output_0": {"dtype": "float32", "shape": [None, 10]}}
    update = sigs["compression_update"]
    assert update["status"] == "added" and update["in"] is None
    assert update["inputs"] == {"added": ["step"], "removed": [], "changed": {}}
    assert update["outputs"]["added"] == ["alpha", "updated"]
    assert update["out"]["outputs"]["alpha"] == {"dtype": "float32", "shape": [3]}


def test_sites_and_skips_come_from_the_manifest(digits):
    _, _, result = digits
    manifest = result["manifest"]
    assert manifest["method"] == "low_rank" and manifest["skipped"] == []
    assert [s["variable"] for s in manifest["sites"]] == list(KERNELS)
    # rank=200 keeps k = min(m, n) / 2 of each kernel: 64x256, 256x128, 128x10.
    assert [(s["matrix"], s["k"]) for s in manifest["sites"]] == [([64, 256], 32), ([256, 128], 64), ([128, 10], 5)]
    site = manifest["sites"][0]
    assert site["blended"] and site["alpha_variable"] == "dense_1/kernel/alpha"
    assert [(f["role"], f["shape"]) for f in site["factors"]] == [("b", [64, 32]), ("c", [32, 256])]


def test_variables_added_are_the_site_variables_and_the_global_step(digits):
    _, _, result = digits
    variables = result["variables"]
    per_site = ("b_matrix", "c_matrix", "alpha", "last_alpha_update_step")
    expected = sorted([f"{k}/{v}" for k in KERNELS for v in per_site] + ["graphrewrite_global_step"])
    assert [v["name"] for v in variables["added"]] == expected
    # Keras 3's export saves each weight twice; each counts once, and the rewrite keeps it as A.
    assert variables["removed"] == []
    assert variables["changed"] == []
    added = {v["name"]: v for v in variables["added"]}
    assert added["dense_2/kernel/b_matrix"] == {"name": "dense_2/kernel/b_matrix", "dtype": "float32",
                                                "shape": [256, 64], "trainable": True, "size": 256 * 64}
    assert added["logits/kernel/alpha"]["trainable"] is False
    assert added["graphrewrite_global_step"]["dtype"] == "int64"


def test_parameters_count_each_weight_once(digits):
    """Keras 3's export saves every weight twice (12 checkpoint entries for 6 weights); the diff
    counts the 6 weights of 64-256-128-10 once, so a model that grew reads as growing."""
    src, out, result = digits
    variables = result["variables"]
    count_in, params_in = checkpoint_variables(src)
    count_out, params_out = checkpoint_variables(out)
    weights = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert (count_in, params_in) == (12, 2 * weights)
    assert (len(variables["in"]), variables["params_before"]) == (6, weights) == (6, 50_826)
    assert (len(variables["out"]), variables["params_after"]) == (count_out, params_out) == (19, 86_339)
    # out = the six weights once (50,826) + the factors (the manifest's 35,506) + 3 alphas, 3 steps, 1 global step.
    factors = sum(s["params_after"] for s in result["manifest"]["sites"])
    assert factors == 35_506
    assert variables["params_after"] == weights + factors + 7


def test_two_originals_list_each_variable_once():
    result = diff_models(os.path.join(TESTDATA, "digits_mlp"), os.path.join(TESTDATA, "digits_cnn"))
    for side in ("in", "out"):
        names = [v["name"] for v in result["variables"][side]]
        assert len(names) == len(set(names)) == 6
    assert result["variables"]["params_before"] == 50_826


def test_serving_ops_gain_the_gated_branches(digits):
    """Per site, graphrewrite.rewriting.blend.gated builds StatelessIf(alpha >= 1) whose branches are the dense
    MatMul (1) and StatelessIf(alpha <= 0) over the compressed (x @ B) @ C (2) and the mix of both
    (1 + 2): 2 StatelessIf and 6 MatMul in place of 1 MatMul, and reads of b, c and alpha."""
    _, _, result = digits
    for key in ("serve", "serving_default"):
        ops = result["signatures"][key]["ops"]
        assert ops["in"]["MatMul"] == 3 and ops["out"]["MatMul"] == 3 * 6
        assert ops["added"]["MatMul"] == 3 * (6 - 1)
        assert ops["added"]["StatelessIf"] == 3 * 2
        assert ops["added"]["ReadVariableOp"] == 3 * 3
        assert "If" not in ops["out"]  # the forward pass holds no stateful cond
        assert ops["removed"] == {}
        assert ops["in"]["BiasAdd"] == ops["out"]["BiasAdd"] == 3 and "BiasAdd" not in ops["added"]
    # graphrewrite.rewriting.schedule: per site cond(due) holding cond(first update) whose true branch runs one
    # in-graph SVD and assigns b and c; each due update assigns alpha and last_update; then the step.
    update = result["signatures"]["compression_update"]["ops"]
    assert update["in"] == {}
    assert (update["out"]["If"], update["out"]["Svd"]) == (3 * 2, 3)
    assert update["out"]["AssignVariableOp"] == 3 * 4 + 1
    assert "StatelessIf" not in update["out"]


def test_text_shows_interfaces_op_changes_variables_and_parameters(digits):
    _, _, result = digits
    text = diff_text(result)
    assert "compression_update  added" in text
    assert "serve               unchanged" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("  serve:"))
    assert "+15 MatMul" in line and "+6 StatelessIf" in line and "-" not in line.split(":", 1)[1]
    assert "  + dense_1/kernel/b_matrix float32[64,32] trainable" in text
    assert "variables: 6 -> 19 (13 added, 0 removed, 0 changed)" in text
    assert "parameters: 50,826 -> 86,339 (1.699x)" in text
    assert "signatures: 2 unchanged, 1 added" in text
    assert "total: 3 sites, 0 skipped, parameters of the rewritten weights 50,432 -> 35,506 (0.704x)" in text


def test_result_is_plain_json(digits):
    _, _, result = digits
    assert json.loads(json.dumps(result)) == result
    assert result["format"] == "graphrewrite-diff" and result["version"] == 1
    assert (result["in"]["kind"], result["in"]["rewritten"], result["out"]["rewritten"]) == ("tf2", False, True)


def test_a_model_against_itself_shows_no_change(digits):
    _, out, _ = digits
    result = diff_models(out, out)
    assert {s["status"] for s in result["signatures"].values()} == {"unchanged"}
    assert all(s["ops"]["added"] == s["ops"]["removed"] == {} for s in result["signatures"].values())
    variables = result["variables"]
    assert variables["added"] == variables["removed"] == variables["changed"] == []
    assert variables["params_before"] == variables["params_after"] == 86_339


def test_tf1_variables_come_from_the_graph(model_factory):
    path, _ = model_factory("tf1_builder")
    result = diff_models(path, path)
    assert result["in"]["kind"] == "tf1" and result["manifest"] is None
    names = [(v["name"], v["shape"], v["trainable"]) for v in result["variables"]["in"]]
    assert sorted(names) == [("layer1/biases", [64], True), ("layer1/weights", [36, 64], True),
                             ("layer2/weights", [64, 32], True)]
    assert result["variables"]["params_before"] == 36 * 64 + 64 + 64 * 32
    ops = result["signatures"]["serving_default"]["ops"]["in"]
    # y = relu(x @ w1 + b1) @ w2: two MatMuls reading three VariableV2 through their Identity reads.
    assert (ops["MatMul"], ops["VariableV2"], ops["Placeholder"], ops["Relu"]) == (2, 3, 1, 1)
    assert "Assign" not in ops  # initializers are not part of the signature


@pytest.mark.parametrize("side", ["in", "out"])
def test_a_damaged_protobuf_is_an_input_model_error(digits, copy_model, side):
    src, out, _ = digits
    damaged = copy_model(src if side == "in" else out)
    pb = os.path.join(damaged, "saved_model.pb")
    with open(pb, "rb") as f:
        data = f.read()
    with open(pb, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(InputModelError, match="saved_model.pb"):
        diff_models(damaged, out) if side == "in" else diff_models(src, damaged)


def test_a_missing_tag_set_is_an_input_model_error(digits):
    src, out, _ = digits
    with pytest.raises(InputModelError, match="no MetaGraph with tag set 'train'"):
        diff_models(src, out, tags=["train"])


# ------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------


def test_html_is_one_page_with_a_picture_per_site(digits, tmp_path):
    _, _, result = digits
    path = write_html(result, str(tmp_path / "diff.html"))
    assert os.listdir(tmp_path) == ["diff.html"]
    root = ET.parse(path).getroot()  # well-formed XML as well as HTML
    pictures = root.findall(f".//{SVG}")
    assert len(pictures) == len(result["manifest"]["sites"]) == 3
    summary = root.find(".//table[@class='summary']")
    rows = {tr[0].text: tr[1].text for tr in summary.findall("tr")}
    assert rows["parameters"] == "50,826 -> 86,339 (1.699x)"
    assert "removed" not in [tr[0].text for tr in root.iter("tr")]  # the kernels stay, as A
    assert rows["signatures"] == "2 unchanged, 1 added"
    assert rows["parameters of the rewritten weights"] == "50,432 -> 35,506 (0.704x)"
    drawn = ["".join(t.itertext()) for t in pictures[0].iter("{http://www.w3.org/2000/svg}text")]
    assert "after: W = alpha*A + (1-alpha)*B@C" in drawn
    assert "B: dense_1/kernel/b_matrix" in drawn and "[64,32] float32" in drawn
    page = open(path, encoding="utf-8").read()
    for external in ("<script", "<link", "src=", "href=", "url(", "@import"):
        assert external not in page


def hostile_models(root: str) -> tuple[str, str]:
    """A tiny tf.Module and its rewrite whose variable and signature input carry markup.

    TensorFlow refuses such names when a variable is created, but a SavedModel is just a file: the
    names are written into both protobufs and the manifest, as an attacker would."""
    import tensorflow as tf

    from graphrewrite import compress, hparams
    from graphrewrite.rewriting import manifest

    class Tiny(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(np.random.default_rng(0).standard_normal((8, 64)).astype("float32"), name="w")

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])
        def serve(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": tf.matmul(x, self.w)}

    src, out = os.path.join(root, "tiny"), os.path.join(root, "tiny_out")
    tiny = Tiny()
    tf.saved_model.save(tiny, src, signatures={"serving_default": tiny.serve})
    compress(src, out, hparams.resolve(None, {"rank": 200}), verify=False)
    for path in (src, out):
        _rename(path)
    data = manifest.read_dir(out)
    for site in data["sites"]:
        site["variable"] = HOSTILE
    manifest.write(data, os.path.join(out, "assets", "graphrewrite_manifest.json"))
    return src, out


def _rename(path: str) -> None:
    from graphrewrite.rewriting.scan import read_saved_model_proto

    proto = read_saved_model_proto(path)
    meta = proto.meta_graphs[0]
    for node in meta.object_graph_def.nodes:
        name = node.variable.name
        if node.WhichOneof("kind") == "variable" and (name == "w" or name.startswith("w/")):
            node.variable.name = HOSTILE + name[1:]
    inputs = meta.signature_def["serving_default"].inputs
    inputs["<img src=x onerror=alert(2)>"].CopyFrom(inputs["x"])
    del inputs["x"]
    with open(os.path.join(path, "saved_model.pb"), "wb") as f:
        f.write(proto.SerializeToString())


def test_names_from_the_models_are_escaped_in_html_and_text(tmp_path):
    src, out = hostile_models(str(tmp_path))
    result = diff_models(src, out)
    assert result["manifest"]["sites"][0]["factors"][0]["name"] == HOSTILE + "/b_matrix"
    path = write_html(result, str(tmp_path / "diff.html"))
    page = open(path, encoding="utf-8").read()
    assert "<script" not in page and "<img" not in page and "\x1b" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;w\\x1b[2J/b_matrix" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page
    root = ET.parse(path).getroot()
    assert len(root.findall(f".//{SVG}")) == 1
    assert root.find(".//h3/code").text == printable(HOSTILE) == HOSTILE.replace("\x1b", "\\x1b")
    text = diff_text(result)
    assert "\x1b" not in text and "+ <script>alert(1)</script>&w\\x1b[2J/b_matrix float32[8,4]" in text
