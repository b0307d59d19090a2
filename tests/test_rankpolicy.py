"""Rank policies on matrices with known spectra, and their use through inspect/compress."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import MLP, run

from graphrewrite.cli import main
from graphrewrite.errors import UsageError
from graphrewrite.rewriting import rankpolicy
from graphrewrite.rewriting.plan import Selection
from graphrewrite.rewriting.rankpolicy import Policy


def with_spectrum(s, m=40, n=30, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * np.asarray(s)) @ v.T


S = np.array([10.0, 5.0, 2.0, 1.0, 0.5, 0.1])  # squares: 100, 25, 4, 1, 0.25, 0.01 (total 130.26)


def test_energy_and_error_rules_on_a_known_spectrum():
    assert rankpolicy.energy_k(S, 0.76) == 1  # 100/130.26 = 0.7677
    assert rankpolicy.energy_k(S, 0.77) == 2
    assert rankpolicy.energy_k(S, 0.99) == 3  # 129/130.26 = 0.9903
    assert rankpolicy.energy_k(S, 1.0) == 6
    # relative errors sqrt(tail/total): k=2: sqrt(5.26/130.26)=0.2009, k=3: 0.0983, k=4: 0.0448
    assert rankpolicy.max_error_k(S, 0.21) == 2
    assert rankpolicy.max_error_k(S, 0.1) == 3
    assert rankpolicy.max_error_k(S, 0.05) == 4
    assert rankpolicy.relative_error(S, 3) == pytest.approx(np.sqrt(1.26 / 130.26))
    assert rankpolicy.kept_energy(S, 2) == pytest.approx(125 / 130.26)
    # ... and the spectrum of an actual matrix built with it
    a = with_spectrum(S)
    s = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(s[:6], S, rtol=1e-10)
    assert rankpolicy.energy_k(s, 0.99) == 3


def test_target_ratio_spends_the_budget_where_the_error_drops_most():
    flat = np.full(20, 2.0)  # each singular value removes 4 of the squared error
    steep = np.array([10.0, 3.0, 1.5] + [0.01] * 17)  # removes 9, then 2.25, then almost nothing
    shapes = [(20, 20), (20, 20)]
    ks = rankpolicy.target_ratio_ks([flat, steep], shapes, 0.25)  # budget 200 params = 5 singular values
    assert ks == [3, 2]  # both start at k = 1; then 9 (steep), 4 and 4 (flat) beat 2.25
    total = sum(k * 40 for k in ks)
    assert total <= 0.25 * 800


def test_target_ratio_is_blind_to_the_scale_of_each_layer():
    # A ReLU network is unchanged when one layer is scaled by c and the next by 1/c: the allocation
    # must not change either (an absolute-error criterion gives the big-norm layer everything).
    rng = np.random.default_rng(0)
    spectra = [np.sort(rng.uniform(0.1, 1.0, 30))[::-1], np.geomspace(1.0, 0.01, 10)]
    shapes = [(60, 30), (100, 10)]
    base = rankpolicy.target_ratio_ks(spectra, shapes, 0.3)
    for scale in (1e-3, 1e3):
        assert rankpolicy.target_ratio_ks([spectra[0] * scale, spectra[1]], shapes, 0.3) == base
    assert all(k is not None and k > 1 for k in base)  # both layers get a share of the budget


def test_target_ratio_leaves_a_small_expensive_to_factor_weight_dense():
    head = np.linspace(3.0, 1.0, 10)  # a 128x10 head: every singular value matters
    body = np.concatenate([np.linspace(10, 1, 20), np.full(236, 0.01)])
    ks = rankpolicy.target_ratio_ks([body, head], [(256, 256), (128, 10)], 0.3)
    assert ks[1] is None and ks[0] is not None
    assert ks[0] * 512 + 1280 <= 0.3 * (256 * 256 + 1280)


def test_same_rank_is_the_largest_k_that_fits_the_budget():
    """The digits CNN's shapes (conv_1 9 x 32, conv_2 288 x 64, head 1024 x 10; 28,960 kernel
    parameters): k (9 + 32 + 288 + 64 + 1024 + 10) = 1,427 k, so 20% (5,792) is k = 4 (5,708) and
    29% k = 5; past a weight's break-even (conv_1: 6) the weight stays whole and costs its m n."""
    shapes = [(9, 32), (288, 64), (1024, 10)]
    spectra = [np.geomspace(1.0, 0.01, min(m, n)) for m, n in shapes]  # the spectra do not matter
    assert rankpolicy.same_rank_ks(spectra, shapes, 0.2) == [4, 4, 4]
    assert rankpolicy.same_rank_ks(spectra[::-1], shapes[::-1], 0.2) == [4, 4, 4]
    assert rankpolicy.same_rank_ks(spectra, shapes, 0.29) == [5, 5, 5]
    # 48%: 13,900 parameters; k = 9 with conv_1 whole is 288 + 9 (352 + 1034) = 12,762, k = 10: 14,148
    assert rankpolicy.same_rank_ks(spectra, shapes, 0.48) == [None, 9, 9]
    for ratio in np.linspace(0.05, 1.0, 40):
        ks = rankpolicy.same_rank_ks(spectra, shapes, ratio)
        cost = sum(m * n if k is None else k * (m + n) for k, (m, n) in zip(ks, shapes))
        assert cost <= ratio * 28960, ratio
        bigger = [k + 1 if k is not None and k + 1 <= rankpolicy.break_even_k(m, n, min(m, n)) else None
                  for k, (m, n) in zip(ks, shapes)]
        more = sum(m * n if k is None else k * (m + n) for k, (m, n) in zip(bigger, shapes))
        assert bigger == ks or more > ratio * 28960, ratio  # the next k does not fit
    # below k = 1 for all, k = 1 for all (as target_ratio_ks starts)
    assert rankpolicy.same_rank_ks(spectra, shapes, 0.01) == [1, 1, 1]
    assert Policy(target_ratio=0.2, same_rank=True).describe(200) == "target_ratio=0.2, one rank for every weight"


@pytest.mark.parametrize("kwargs, message", [
    (dict(include="("), "--include: '(' is not a regular expression"),
    (dict(min_params=-1), "--min-params must be >= 0"),
    (dict(policy=Policy(energy=0.9, max_error=0.1)), "exclude each other"),
    (dict(policy=Policy(target_ratio=1.5)), "--target-ratio must be in (0, 1]"),
])
def test_selection_validation(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Selection(**kwargs)


def dry_run(capsys, *args):
    code, out, err = run(capsys, "inspect", MLP, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_inspect_dry_run_fields_match_numpy(capsys):
    import tensorflow as tf

    data = dry_run(capsys, "--max-error", "0.5")
    model = tf.saved_model.load(MLP)
    weights = {v.name[:-2]: v.numpy() for v in model.variables}
    for site in data["sites"]:
        s = np.linalg.svd(weights[site["variable"]].astype(np.float64), compute_uv=False)
        k = site["k"]
        assert k == rankpolicy.max_error_k(s, 0.5)
        m, n = site["matrix"]
        assert site["relative_error"] == pytest.approx(rankpolicy.relative_error(s, k), rel=1e-4)
        assert site["relative_error"] < 0.5 and rankpolicy.relative_error(s, k - 1) >= 0.5
        assert site["params_after"] == k * (m + n) and site["flops_after"] == 2 * k * (m + n)
        assert site["flops_before"] == 2 * m * n
        assert site["ratio"] == pytest.approx(k * (m + n) / (m * n))
        assert site["policy"] == "max_error=0.5"
    assert data["totals"]["flops_after"] == sum(s["flops_after"] for s in data["sites"])


def test_filters(capsys):
    data = dry_run(capsys, "--rank=200", "--exclude", "logits")
    assert [s["variable"] for s in data["sites"]] == ["dense_1/kernel", "dense_2/kernel"]
    assert data["skipped"] == [{"op": "digits_mlp_1/logits_1/MatMul", "variable": "logits/kernel",
                                "reason": "excluded by --exclude 'logits'"}]
    data = dry_run(capsys, "--rank=200", "--include", "dense_2")
    assert [s["variable"] for s in data["sites"]] == ["dense_2/kernel"]
    data = dry_run(capsys, "--rank=200", "--min-params", "2000")
    assert "fewer than --min-params 2000" in data["skipped"][0]["reason"]
    assert data["options"]["min_params"] == 2000


def test_target_ratio_meets_the_budget_on_the_digits_mlp(capsys):
    data = dry_run(capsys, "--target-ratio", "0.48")
    kept = sum(s["params_after"] for s in data["sites"])
    dense = sum(64 * 256 if s["variable"] == "dense_1/kernel" else 256 * 128 if s["variable"] == "dense_2/kernel"
                else 1280 for s in data["skipped"])
    assert kept + dense <= 0.48 * 50432
    # The head stays exact; so does dense_1 (64x256), whose break-even rank would cost all but 64
    # of its parameters: the optimum spends them on dense_2 (bench_accuracy: 98.22%, before 98.00%).
    assert {s["variable"] for s in data["skipped"]} == {"dense_1/kernel", "logits/kernel"}
    [reason] = [s["reason"] for s in data["skipped"] if s["variable"] == "dense_1/kernel"]
    assert "leaves it dense: rank at break-even saves nothing: k = 51 of 64 would keep 16,320 of its 16,384" in reason


def test_policies_need_low_rank(capsys, tmp_path):
    code, _, err = run(capsys, "compress", MLP, str(tmp_path / "o"), "--energy", "0.9", "--compression_option=2")
    assert code == 2 and "low rank (option 1) only" in err


def test_rewritten_inspect_shows_alpha_step_and_error(capsys, compressed_factory):
    _, out, _, _ = compressed_factory("digits_mlp", rank=200)
    code, stdout, _ = run(capsys, "inspect", out, "--json")
    data = json.loads(stdout)
    assert data["global_step"] == 0
    import tensorflow as tf

    model = tf.saved_model.load(out)
    for site, state in zip(data["sites"], model.graphrewrite_sites):
        a = state.weight.numpy()
        w_c = state.factors["b"].numpy() @ state.factors["c"].numpy()
        assert site["alpha"] == 1.0
        assert site["reconstruction_error"] == pytest.approx(np.linalg.norm(a - w_c) / np.linalg.norm(a), rel=1e-4)
        s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
        assert site["reconstruction_error"] == pytest.approx(rankpolicy.relative_error(s, site["k"]), rel=1e-3)


def test_main_is_importable():
    assert callable(main)
