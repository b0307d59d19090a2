"""Verification: the rewritten model, reloaded, gives the input model's outputs at alpha = 1.

The last stage of ``compress`` (graphrewrite.rewriting.pipeline) and of ``export``'s check
(graphrewrite.rewriting.exporting): deterministic sample inputs for every signature
(``sample_inputs``), the input model's outputs for them computed in the sandbox
(``reference_job``: the input model is code nobody vetted), and the comparison
(``verify_output`` on the reloaded model, ``compare_outputs`` on any callable): equal within
1e-5 relative (1e-3 for float16 outputs) at alpha = 1, and how far alpha = 0 moves them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from graphrewrite.errors import VerificationError, first_line
from graphrewrite.rewriting import sandbox

# the sizes an unknown input dimension is sampled at, largest first, and the most values a
# sample's inputs may hold together (see reproducible)
UNKNOWN_SIZES = (32, 8, 2)
SAMPLE_ELEMENTS = 1 << 22


def sample_inputs(specs: Mapping[str, Any], seed: int = 0, unknown: int = 2) -> dict[str, Any] | None:
    """Deterministic inputs for a signature (unknown dimensions become ``unknown``); None if not
    sampleable."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    out = {}
    for name in sorted(specs):
        spec = specs[name]
        if spec.shape.rank is None:
            return None
        shape = [unknown if d is None else d for d in spec.shape.as_list()]
        if spec.dtype.is_floating:
            out[name] = tf.constant(rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype))
        elif spec.dtype.is_integer or spec.dtype == tf.bool:
            out[name] = tf.zeros(shape, spec.dtype)
        else:
            return None
    return out


def max_diff(a: Any, b: Any) -> tuple[float, float]:
    """Max absolute and relative difference of ``b`` from ``a``; a NaN or infinity ``b`` has where
    ``a`` has the same counts as equal, anywhere else as an infinite difference."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        gaps = np.nan_to_num(np.where(same, 0.0, np.abs(a - b)), nan=np.inf)
    finite = np.abs(a[np.isfinite(a)])
    diff = float(gaps.max()) if a.size else 0.0
    scale = float(finite.max()) if finite.size else 0.0
    return diff, diff / max(scale, 1e-12)


def reference_outputs(model: Any) -> dict[str, Any]:
    """Per signature of the input model: (sample inputs, its outputs as numpy), or why not
    (``reproducible``)."""
    import tensorflow as tf

    out: dict[str, Any] = {}
    for key, original in sorted(model.signature_functions.items()):
        found = reproducible(original)
        if isinstance(found, str):
            out[key] = found
            continue
        inputs, tensors = found
        out[key] = ({k: v.numpy() for k, v in inputs.items()},
                    {k: (v.numpy(), v.dtype in (tf.float16, tf.bfloat16)) for k, v in tensors.items()})
    return out


def reproducible(function: Any) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """``(inputs, outputs)`` of ``function`` (a signature) on sample inputs that it answers the
    same way twice, or why there are none.

    A reference must reproduce itself: the signature runs twice on the same inputs and its
    outputs must agree bit for bit (NaN with NaN); a signature with random ops never reproduces
    and is reported unchecked, with this reason, rather than failing compress. Unknown dimensions
    are sampled at the sizes ``sample_sizes`` gives, largest first, until the outputs reproduce
    and are finite (a reproducible one that is not finite stands if no later one reproduces).
    Largest first, because two calls agreeing does not prove the outputs defined: MobileNetV3
    at 2 x 2 pools an image to nothing and returns whatever memory held, which can repeat between
    two calls of one model and differ in another (the export check of the heavy zoo failed on
    it, 0.9 apart, 2026-12-02); models are built for sizes like real inputs. A size the
    signature fails at (a sequence longer than its position table) moves on to the next; where
    every size fails, the last error stands. Cost: one more call of the signature per size tried."""
    specs = function.structured_input_signature[1]
    found: tuple[dict[str, Any], dict[str, Any]] | str = "inputs of a type that cannot be sampled"
    tried: list[str] = []  # the sizes it answered at
    failed: list[str] = []
    failure: Exception | None = None
    for unknown in sample_sizes(specs):
        inputs = sample_inputs(specs, unknown=unknown)
        if inputs is None:
            break
        try:
            tensors = function(**inputs)
            again = function(**inputs)
        except Exception as exc:  # noqa: BLE001 - re-raised below where no size works
            failure = exc
            failed.append(str(unknown))
            continue
        tried.append(str(unknown))
        if not all(_same(tensors[k].numpy(), again[k].numpy()) for k in tensors):
            if not isinstance(found, tuple):
                fails = f"; it fails at {', '.join(failed)}" if failed else ""
                found = (f"its outputs differ between two calls on the same inputs (random ops, or values "
                         f"the model leaves undefined at the sampled sizes: {', '.join(tried)}{fails})")
            continue
        found = (inputs, tensors)
        if all(np.isfinite(v.numpy()).all() for v in tensors.values() if v.dtype.is_floating):
            break
    if failure is not None and not tried:
        raise failure
    return found


def sample_sizes(specs: Mapping[str, Any]) -> list[int]:
    """The sizes ``reproducible`` samples unknown dimensions at: those of UNKNOWN_SIZES at which the
    inputs hold at most SAMPLE_ELEMENTS values together (the smallest where none does), largest
    first; one size where no dimension is unknown."""
    shapes = [spec.shape.as_list() for spec in specs.values() if spec.shape.rank is not None]
    if not any(d is None for shape in shapes for d in shape):
        return [UNKNOWN_SIZES[-1]]

    def values(size: int) -> int:
        return sum(int(np.prod([size if d is None else d for d in shape], dtype=np.int64)) for shape in shapes)

    return [size for size in UNKNOWN_SIZES if values(size) <= SAMPLE_ELEMENTS] or [UNKNOWN_SIZES[-1]]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit equal, NaN equal to NaN in floating arrays."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.complexfloating)
    return bool(np.array_equal(a, b, equal_nan=nan))


def reference_job(input_dir: str, tags: Sequence[str]) -> dict[str, Any]:
    """Sandbox job: loads the input model and returns its reference outputs (see reference_outputs)."""

    loaded = sandbox.load_for_run(input_dir, tags)
    return reference_outputs(_SignaturesOnly(getattr(loaded, "signatures", None) or {}))


@dataclasses.dataclass
class _SignaturesOnly:
    """What reference_outputs reads of a LoadedModel: its signature functions."""

    signature_functions: Mapping[str, Any]


def verify_output(expected: Mapping[str, Any], output_dir: str, blended: bool = True) -> dict[str, Any]:
    """Reloads ``output_dir``; every signature must give the input model's outputs at alpha = 1.

    Also measures how far the outputs move at alpha = 0 (the one-shot compression error). Methods
    that replace the weight outright (``blended=False``) have no alpha = 1 state: for them only that
    initial error is reported.
    """
    import tensorflow as tf

    try:
        rewritten = tf.saved_model.load(output_dir)
    except Exception as exc:  # noqa: BLE001 - any failure to reload is a verification failure
        raise VerificationError(f"the rewritten model does not reload ({first_line(exc)})") from None
    missing = [key for key in expected if key not in rewritten.signatures]
    if missing:
        raise VerificationError(f"signature {missing[0]!r} is missing from the rewritten model")
    report = compare_outputs(expected, lambda key, inputs: rewritten.signatures[key](**inputs),
                             rewritten.graphrewrite_sites, blended)
    report["mode"] = "reloaded"
    return report


def compare_outputs(expected: Mapping[str, Any], call: Callable[[str, Any], Any], sites: Sequence[Any],
                    blended: bool) -> dict[str, Any]:
    """Outputs of ``call(signature, inputs)`` against ``expected`` at alpha = 1 (blended methods
    must match) and at alpha = 0 (the one-shot error, measured and reported)."""
    report: dict[str, Any] = {"signatures": {}}
    worst_alpha0 = 0.0
    alphas = [float(site.alpha.numpy()) for site in sites]
    for key, reference in sorted(expected.items()):
        if isinstance(reference, str):
            report["signatures"][key] = {"checked": False, "why": reference}
            continue
        inputs, want = reference
        for site in sites:
            site.alpha.assign(1.0)
        got = call(key, inputs)
        if set(want) != set(got):
            raise VerificationError(f"signature {key!r}: output keys differ ({sorted(want)} vs {sorted(got)})")
        worst = 0.0
        for out_key, (value, half) in sorted(want.items()):
            diff, rel = max_diff(value, got[out_key])
            tol = 1e-3 if half else 1e-5
            if blended and not (rel <= tol or diff <= tol):
                raise VerificationError(
                    f"signature {key!r} output {out_key!r} differs from the input model at alpha = 1 "
                    f"(max abs diff {diff:.3g}, relative {rel:.3g})")
            worst = max(worst, rel)
        for site in sites:
            site.alpha.assign(0.0)
        compressed = call(key, inputs)
        rel0 = max((max_diff(want[k][0], compressed[k])[1] for k in want), default=0.0)
        worst_alpha0 = max(worst_alpha0, rel0)
        report["signatures"][key] = {"checked": blended, "max_rel_diff_alpha1": worst,
                                     "max_rel_diff_alpha0": rel0}
    for site, alpha in zip(sites, alphas):
        site.alpha.assign(alpha)
    report["max_rel_diff_alpha0"] = worst_alpha0
    return report


__all__ = ["compare_outputs", "max_diff", "reference_job", "reference_outputs", "reproducible", "sample_inputs",
           "verify_output"]
