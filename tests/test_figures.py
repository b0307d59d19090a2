"""The figures the tool prints are claims: each says what it counts, against the original model."""

from __future__ import annotations

import json
import math
import os

import pytest
from models import TESTDATA

from graphrewrite.cli import main
from graphrewrite.rewriting.exporting import export

DIGITS_PARAMS = 64 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10  # 50,826: each weight once
DIGITS_BIASES = 256 + 128 + 10


def tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(base, f)) for base, _, files in os.walk(path) for f in files)


@pytest.fixture(scope="module")
def digits_export(compressed_factory, tmp_path_factory):
    """(rewritten dir, final dir, ExportResult, manifest sites) of digits_mlp at rank=200, --force."""
    _, out, result, _ = compressed_factory("digits_mlp", rank=200)
    final = str(tmp_path_factory.mktemp("figures") / "final")
    return out, final, export(out, final, force=True), result.manifest["sites"]


def test_export_counts_original_to_final(digits_export):
    out, final, result, sites = digits_export
    factors = sum(s["params_after"] for s in sites)
    assert factors == 35_506
    assert result.params_before == DIGITS_PARAMS == 50_826  # the original, not A plus the factors
    assert result.params_after == factors + DIGITS_BIASES == 35_900
    assert result.params_tuned == DIGITS_PARAMS + factors + 7  # 3 alphas, 3 last steps, 1 global step
    assert result.bytes_before == tree_bytes(os.path.join(TESTDATA, "digits_mlp"))
    assert result.bytes_after == tree_bytes(final) and result.bytes_tuned == tree_bytes(out)


def test_export_prints_original_to_final_in_one_line(digits_export, tmp_path, capsys):
    out, _, result, _ = digits_export
    main(["export", out, str(tmp_path / "final"), "--force", "-q"])
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("original -> final:"))
    assert f"parameters 50,826 -> 35,900 ({35_900 / 50_826:.3f}x)" in line
    assert f"on disk {result.bytes_before / 1e3:,.1f} kB ->" in line
    assert "the tuned model, with A and the factors: 86,339 parameters" in text
    assert "max |tuned - final| / max |tuned|" in text  # what "outputs move by" measures


def test_export_json_says_what_output_shift_is(digits_export, tmp_path, capsys):
    out, _, _, _ = digits_export
    main(["export", out, str(tmp_path / "final"), "--force", "--json", "--fast"])
    data = json.loads(capsys.readouterr().out)
    assert data["params_before"] == 50_826 and data["output_shift"] is None
    assert "alpha = 0" in data["output_shift_is"] and "inputs" in data["output_shift_is"]
    assert math.isclose(data["params_after"] / data["params_before"], 35_900 / 50_826)


@pytest.fixture(scope="module")
def compress_lines():
    """``compress_lines(overrides, selection)``: compress's text lines for digits_mlp's plan."""
    from graphrewrite import hparams
    from graphrewrite.reporting import report
    from graphrewrite.rewriting import pipeline

    def lines(overrides, selection=pipeline.DEFAULT_SELECTION):
        _, plan, _ = pipeline.plan_model(os.path.join(TESTDATA, "digits_mlp"), hparams.resolve(None, overrides),
                                         selection=selection)
        return report.compress_text(pipeline.CompressResult("OUT", plan, None, None), "IN").splitlines()

    return lines


def test_target_ratio_prints_the_achieved_overall_ratio(compress_lines):
    from graphrewrite.rewriting.plan import Selection
    from graphrewrite.rewriting.rankpolicy import Policy

    lines = compress_lines({"rank": 7}, Selection(policy=Policy(target_ratio=0.3)))
    # logits/kernel (128x10) stays dense; the two others get 13,824 parameters: of all 50,432
    # kernel parameters, 13,824 + 1,280 remain.
    assert lines[1] == "parameters of the rewritten weights: 49,152 -> 13,824 (ratio 0.281)"
    assert lines[2] == ("kernel parameters overall (the 2 rewritten and 1 left dense): 50,432 -> 15,104 "
                        f"(ratio {15_104 / 50_432:.3f}; --target-ratio 0.3)")


@pytest.mark.parametrize("method, why", [("kmeans", "1 byte (uint8)"), ("simhash", "1 bit")])
def test_byte_saving_methods_lead_with_bytes(compress_lines, method, why):
    lines = compress_lines({"rank": 200, "compression_option": {"kmeans": 4, "simhash": 2}[method]})
    assert lines[1].startswith("stored bytes of the rewritten weights: 201,728 -> ")
    assert lines[1].endswith(": the saving is in bytes")
    assert lines[2].startswith("parameters of the rewritten weights: 50,432 -> ") and why in lines[2]
    stored = int(lines[1].split("-> ")[1].split(" ")[0].replace(",", ""))
    params = int(lines[2].split("-> ")[1].split(" ")[0].replace(",", ""))
    assert stored < 4 * params  # fewer bytes than float32 parameters would take: the point of the line
