"""Coverage of the BERT-, GPT-2- and ViT-style models: the share of the original model's parameters
in rewritten sites under ``--target-ratio``, with i.i.d. Gaussian weights (flat spectra) and with
trained-like ones (tests/zoo.py's ``_trained_like``: s_i ~ i^-1.5 in each layer's matrix view), at
the test zoo's small config and a larger one (dry runs: nothing is written).

"Rewritable" adds the weights the policy keeps whole by its own choice (the optimum of its objective,
see graphrewrite/rewriting/rankpolicy.py) to those rewritten; the rest is what graphrewrite cannot factor
(biases and norms, position embeddings read through a Slice). Target: at least 95% rewritable.

    python benchmarks/bench_coverage.py [--sizes 128:2:1000,512:4:4000] [--ratios 0.5,0.3]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile

import common
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import zoo  # noqa: E402


def coverages(src: str, ratios: list[float]) -> list[tuple[float, float, float]]:
    """Per ratio: (share rewritten, share rewritable, total relative squared error of the sites)."""
    import scipy.linalg

    from graphrewrite import hparams, views
    from graphrewrite.rewriting.pipeline import plan_model
    from graphrewrite.rewriting.plan import Selection, make_plan
    from graphrewrite.rewriting.rankpolicy import Policy

    model, _, transform = plan_model(src, hparams.resolve(None, {"rank": 200}), probe=lambda: None)

    @functools.cache
    def spectrum(key: str, view: tuple) -> np.ndarray:
        return scipy.linalg.svdvals(views.apply_numpy(model.variables[key].numpy(), view).astype(np.float32))

    total = sum(int(np.prod(info.shape)) for info in model.infos.values())
    out = []
    for ratio in ratios:
        plan = make_plan(model.functions.values(), model.infos, transform,
                         Selection(policy=Policy(target_ratio=ratio)), spectrum)
        rewritten = sum(int(np.prod(s.variable.shape)) for s in plan.sites)
        kept = sum(int(np.prod(s.shape)) for s in plan.skipped if "leaves it dense" in s.reason)
        error = sum(s.size.details["relative_error"] ** 2 for s in plan.sites)
        out.append((rewritten / total, (rewritten + kept) / total, error))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128:2:1000,512:4:4000", help="hidden:layers:vocab,...")
    parser.add_argument("--ratios", default="0.5,0.3")
    parser.add_argument("--models", default="gpt2_tiny,bert_tiny,vit_tiny")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    targets = common.Targets()
    rows = []
    work = tempfile.mkdtemp(prefix="bench-coverage-")
    try:
        for size in args.sizes.split(","):
            hidden, layers, vocab = (int(v) for v in size.split(":"))
            for name in args.models.split(","):
                for trained in (False, True):
                    root = os.path.join(work, f"{name}_{size.replace(':', '_')}_{trained}")
                    src = zoo.ZOO[name].build(root, hidden=hidden, layers=layers, vocab=vocab, trained=trained)
                    for ratio, (rewritten, rewritable, error) in zip(ratios, coverages(src, ratios)):
                        ok = targets.check(rewritable >= 0.95, f"{name} {size} rewritable {rewritable:.1%}")
                        rows.append([name.replace("_tiny", ""), f"{hidden} wide, {layers} layers"
                                     + (f", vocab {vocab}" if name != "vit_tiny" else ""),
                                     "trained-like" if trained else "Gaussian", f"{ratio:g}", f"{rewritten:.1%}",
                                     f"{rewritable:.1%} {ok}", f"{error:.2g}"])
                    shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"# coverage under --target-ratio (dry runs); {common.machine()}")
    print(common.table(["model", "config", "weights", "target ratio", "rewritten", "rewritable",
                        "sum of relative squared errors"], rows))
    targets.exit()


if __name__ == "__main__":
    main()
