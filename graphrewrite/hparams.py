"""The reference library's hyperparameters, parsed and validated.

Every hyperparameter of compression_lib's ``CompressionOp`` spec (and of the compressor spec and the
per-option op specs it reads) has the reference's name, type and default here. They arrive three
ways, later ones winning: the defaults, the reference's own ``--compression_hparams`` string
(``name=cifar10_compression,rank=200,...``), and one CLI option per key.

Differences from the reference's ``HParams.parse`` (seed-spec §2): ``compression_option`` and
``update_option`` parse from strings (the reference's IntEnum defaults made that raise), an unknown
option value is an error instead of silently becoming 1, and every value is range-checked up front.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any

from graphrewrite.errors import UsageError


class CompressionOption(enum.IntEnum):
    """``compression_option`` values of ``compression_op_utils.CompressionOptions`` (5-7, 11 unused)."""

    NO_MATRIX_COMPRESSION = 0
    LOWRANK_MATRIX_COMPRESSION = 1
    SIMHASH_MATRIX_COMPRESSION = 2
    DL_MATRIX_COMPRESSION = 3
    KMEANS_MATRIX_COMPRESSION = 4
    KMEANS_AND_PRUNING_MATRIX_COMPRESSION = 8
    INPUTOUTPUT_COMPRESSION = 9
    BLOCK_COMPRESSION = 10
    MIXED_BLOCK_COMPRESSION = 12


class UpdateOption(enum.IntEnum):
    """``update_option`` values of ``compression_op_utils.UpdateOptions``."""

    TF_UPDATE = 0
    PYTHON_UPDATE = 1
    TF_AND_PYTHON_UPDATE = 2
    NO_UPDATE = 3


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter: its reference default (which fixes its type) and what it does here."""

    name: str
    default: Any
    help: str
    kind: type = dataclasses.field(default=type(None))

    @property
    def type(self) -> type:
        return self.kind if self.kind is not type(None) else type(self.default)


_P = HParam
# Order: CompressionOp.get_default_hparams() (2022), then the compressor spec, then the keys of the
# input/output, block and mixed-block op specs. Help strings say where graphrewrite uses each.
HPARAMS: tuple[HParam, ...] = (
    _P("name", "model_compression", "spec name; prefixes summaries (the reference also keyed the shared last-update counter on it)"),
    _P("alpha_decrement_value", 0.01, "subtracted from alpha at each due update; alpha is clipped at 0"),
    _P("begin_compression_step", 0, "first global step at which updates may happen (>= 0)"),
    _P("end_compression_step", -1, "last global step of updates, inclusive; -1 means no end"),
    _P("compression_frequency", 10, "an update is due when last_update + frequency <= step"),
    _P("use_tpu", False, "factor in-graph (tf.linalg.svd) at the first update, so the update compiles for TPU"),
    _P("compression_option", 1, "method: 0 none, 1 low rank, 2 simhash, 3 dictionary learning, 4 k-means, 8 k-means+pruning, 9 input/output, 10 block, 12 mixed block", int),
    _P("rank", 7, "a compression factor x 100, not a rank: k = min(m, n, ceil(min(m, n) * 100 / rank)); the reference default 7 compresses nothing"),
    _P("update_option", 0, "0 in-graph update, 1 Python-side update, 2 in-graph mask + Python k-means (option 8), 3 no update", int),
    _P("run_update_interval_check", 1, "Python update with no step given: read the global step (!= 0) or use step 1 (0)"),
    _P("block_size", 1, "k-means: length of the quantised sub-vectors (must divide the column count)"),
    _P("pruning_fraction", 0.0, "k-means: fraction of smallest-magnitude entries zeroed before clustering"),
    _P("begin_pruning_step", 0, "k-means+pruning: first step of mask updates"),
    _P("end_pruning_step", -1, "k-means+pruning: last step of mask updates (-1: no end)"),
    _P("weight_sparsity_map", "", "k-means+pruning: accepted for compatibility (per-weight sparsity map of model_pruning)"),
    _P("block_dims_map", "", "k-means+pruning: accepted for compatibility (per-weight block dims of model_pruning)"),
    _P("threshold_decay", 0.0, "k-means+pruning: decay of the pruning threshold"),
    _P("pruning_frequency", 10, "k-means+pruning: steps between mask updates"),
    _P("nbins", 256, "k-means+pruning: histogram bins of model_pruning (accepted for compatibility)"),
    _P("block_height", 1, "k-means+pruning: pruning block height"),
    _P("block_width", 1, "k-means+pruning: pruning block width"),
    _P("block_pooling_function", "AVG", "k-means+pruning: pooling of pruning blocks (AVG or MAX)"),
    _P("initial_sparsity", 0.0, "k-means+pruning: sparsity at sparsity_function_begin_step"),
    _P("target_sparsity", 0.5, "k-means+pruning: sparsity at sparsity_function_end_step"),
    _P("sparsity_function_begin_step", 0, "k-means+pruning: start of the polynomial sparsity schedule"),
    _P("sparsity_function_end_step", 100, "k-means+pruning: end of the polynomial sparsity schedule"),
    _P("sparsity_function_exponent", 3.0, "k-means+pruning: exponent of the sparsity schedule"),
    _P("gradient_decay_rate", 0.99, "k-means+pruning: accepted for compatibility (gradient-based pruning)"),
    _P("prune_option", "weight", "k-means+pruning: only 'weight' (magnitude) pruning is supported"),
    _P("add_summary", True, "write alpha and factor norms as TensorBoard scalars (Keras callback)"),
    _P("do_transpose", False, "k-means+pruning: cluster the transposed weight"),
    # Compressor spec (LowRankDecompMatrixCompressor.get_default_hparams()).
    _P("is_b_matrix_trainable", True, "B factor is trainable"),
    _P("is_c_matrix_trainable", True, "C factor is trainable"),
    _P("is_d_matrix_trainable", True, "D factor (input/output compression) is trainable"),
    _P("is_c_matrix_present", True, "accepted for compatibility; set by each method itself"),
    _P("use_lsh", False, "dictionary learning: initialise codes with LSH instead of a KD-tree kNN"),
    _P("n_iterations", 8, "dictionary learning: least-squares/OMP rounds (the reference's argument, there 1)"),
    _P("num_rows", 10, "accepted for compatibility (used only by the reference's default_matrix())"),
    _P("num_cols", 10, "accepted for compatibility (used only by the reference's default_matrix())"),
    _P("compressor_option", 0, "accepted for compatibility (unused by the reference)"),
    # InputOutputCompressionOp / BlockCompressionOp / MixedBlockCompressionOp specs.
    _P("compress_input", True, "input/output: apply the blockwise input projection B"),
    _P("compress_output", False, "input/output: apply the blockwise output projection D"),
    _P("input_compression_factor", 1, "input/output: B maps input_block_size -> input_block_size / factor"),
    _P("input_block_size", 32, "input/output: block length of the input projection"),
    _P("output_compression_factor", 1, "input/output: D maps output_block_size / factor -> output_block_size"),
    _P("output_block_size", 1, "input/output: block length of the output projection"),
    _P("block_compression_factor", 1, "block: number of diagonal blocks"),
    _P("block_method", "loop", "block: 'loop' (block matrices) or 'mask' (dense C times a block mask)"),
    _P("use_collection", False, "accepted for compatibility (unused by the reference)"),
    _P("compression_factor", 1, "mixed block: number of blocks"),
    _P("num_bases", 1, "mixed block: number of linear-mixer bases"),
)

HPARAMS_BY_NAME: dict[str, HParam] = {p.name: p for p in HPARAMS}

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _convert(param: HParam, raw: Any) -> Any:
    """Converts ``raw`` (a string from the CLI, or a Python value) to ``param``'s type."""
    if param.name == "compression_option":
        return _enum_value(CompressionOption, param.name, raw)
    if param.name == "update_option":
        return _enum_value(UpdateOption, param.name, raw)
    if param.type is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UsageError(f"hyperparameter {param.name}: {raw!r} is not a boolean (True or False)")
    if param.type is int:
        if isinstance(raw, bool):
            raise UsageError(f"hyperparameter {param.name}: {raw!r} is not an integer")
        try:
            return int(str(raw).strip(), 10)
        except ValueError:
            raise UsageError(f"hyperparameter {param.name}: {raw!r} is not an integer") from None
    if param.type is float:
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise UsageError(f"hyperparameter {param.name}: {raw!r} is not a number") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"hyperparameter {param.name}: {raw!r} is not a finite number")
        return value
    return str(raw)


def _enum_value(enum_type: type[enum.IntEnum], name: str, raw: Any) -> int:
    text = str(raw).strip()
    try:
        return int(enum_type(int(text, 10)))
    except ValueError:
        pass
    for member in enum_type:
        if member.name.lower() == text.lower():
            return int(member)
    allowed = ", ".join(str(int(m)) for m in enum_type)
    raise UsageError(f"hyperparameter {name}: {raw!r} is not one of {allowed}")


def parse_hparams_string(text: str) -> dict[str, Any]:
    """Parses the reference's ``key=value,key=value`` string into typed values.

    Raises:
      UsageError: naming the first unknown key, malformed item or bad value.
    """
    values: dict[str, Any] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--compression_hparams: {item!r} is not of the form key=value")
        if key not in HPARAMS_BY_NAME:
            raise UsageError(f"--compression_hparams: unknown hyperparameter {key!r}")
        if key in values:
            raise UsageError(f"--compression_hparams: {key!r} is given twice")
        values[key] = _convert(HPARAMS_BY_NAME[key], raw)
    return values


def resolve(hparams_string: str | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Defaults, then the hparams string, then explicit overrides; validated.

    Args:
      hparams_string: the reference's ``--compression_hparams`` string, or None.
      overrides: values of individual options (already typed or strings); None values are ignored.

    Returns:
      A complete dict of every hyperparameter.
    """
    values = {p.name: p.default for p in HPARAMS}
    if hparams_string:
        values.update(parse_hparams_string(hparams_string))
    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in HPARAMS_BY_NAME:
            raise UsageError(f"unknown hyperparameter {key!r}")
        values[key] = _convert(HPARAMS_BY_NAME[key], raw)
    validate(values)
    return values


def validate(values: Mapping[str, Any]) -> None:
    """Range checks the reference makes (``_validate_spec``) and the ones it should have made."""
    if values["begin_compression_step"] < 0:
        raise UsageError("hyperparameter begin_compression_step must be >= 0")
    end = values["end_compression_step"]
    if end != -1 and end < values["begin_compression_step"]:
        raise UsageError(
            "hyperparameter end_compression_step must be -1 (no end) or >= begin_compression_step"
        )
    if end < -1:
        raise UsageError("hyperparameter end_compression_step must be -1 (no end) or >= 0")
    if values["compression_frequency"] < 1:
        raise UsageError("hyperparameter compression_frequency must be >= 1")
    if not 0.0 < values["alpha_decrement_value"] <= 1.0:
        raise UsageError("hyperparameter alpha_decrement_value must be in (0, 1]")
    if values["rank"] <= 0:
        raise UsageError(f"hyperparameter rank must be a positive integer, got {values['rank']}")
    if not 0.0 <= values["pruning_fraction"] <= 1.0:
        raise UsageError("hyperparameter pruning_fraction must be in [0, 1]")
    for key in ("block_size", "n_iterations", "input_compression_factor", "input_block_size",
                "output_compression_factor", "output_block_size", "block_compression_factor",
                "compression_factor", "num_bases", "compression_frequency", "pruning_frequency"):
        if values[key] < 1:
            raise UsageError(f"hyperparameter {key} must be >= 1, got {values[key]}")
    if values["block_method"] not in ("loop", "mask"):
        raise UsageError("hyperparameter block_method must be 'loop' or 'mask'")
    if values["prune_option"] != "weight":
        raise UsageError("hyperparameter prune_option: only 'weight' is supported")
    if not 0.0 <= values["target_sparsity"] < 1.0 or not 0.0 <= values["initial_sparsity"] < 1.0:
        raise UsageError("hyperparameters initial_sparsity and target_sparsity must be in [0, 1)")


def to_string(values: Mapping[str, Any]) -> str:
    """The reference's string form of ``values`` (round-trips through parse_hparams_string)."""
    return ",".join(f"{p.name}={values[p.name]}" for p in HPARAMS if p.name in values)


# At most this many alpha decrements for --schedule-steps (the reference's default, 0.01, is 100).
SCHEDULE_UPDATES = 100
# The decrement is 1/updates times this, so that the float32 alpha reaches exactly 0 at the last
# planned update: 1/updates float32 subtractions leave a tiny positive residue (seed-spec 4.3: 101
# updates for 0.01), and each subtraction rounds by at most 2^-24, far below this margin.
_DECREMENT_MARGIN = 1 + 1e-4
_MAX_SIMULATED_UPDATES = 1_000_000


def schedule_for_steps(steps: int, start: int = 0) -> dict[str, Any]:
    """The schedule hyperparameters that take alpha from 1 to 0 within ``steps`` fine-tuning steps
    from global step ``start`` (``--schedule-steps``/``--schedule-start``).

    Every ``compression_frequency = max(2, ceil(steps / 100))`` steps (1 for a single step),
    alpha drops by about ``1 / (steps // frequency)``; the last update, at ``alpha_zero_step`` of
    the result, leaves 0. A frequency of at least 2 puts the first update at step ``start + 1`` or
    later (the reference's rule: due once ``-1 + frequency <= step``), so a loop that counts its
    steps from 1 (``optimizer.iterations`` after the step) sees every update as one counting from 0
    does; with a frequency of 1 the first update would fall on step 0, which it never passes.

    Raises:
      UsageError: ``steps`` < 1 or ``start`` < 0.
    """
    if steps < 1:
        raise UsageError(f"--schedule-steps must be >= 1, got {steps}")
    if start < 0:
        raise UsageError(f"--schedule-start must be >= 0, got {start}")
    frequency = 1 if steps == 1 else max(2, -(-steps // SCHEDULE_UPDATES))
    updates = steps // frequency
    return {"begin_compression_step": start, "end_compression_step": start + steps - 1,
            "compression_frequency": frequency, "alpha_decrement_value": min(1.0, _DECREMENT_MARGIN / updates)}


def updates_to_zero(decrement: float) -> int | None:
    """How many due updates take a float32 alpha from 1 to exactly 0 (None beyond a million)."""
    import numpy as np

    alpha, step, count = np.float32(1.0), np.float32(decrement), 0
    while alpha > 0 and count < _MAX_SIMULATED_UPDATES:
        alpha, count = max(alpha - step, np.float32(0.0)), count + 1
    return count if alpha == 0 else None


def alpha_schedule(values: Mapping[str, Any]) -> dict[str, Any]:
    """When alpha moves under ``values`` (the update's rule, seed-spec 4.3, starting from
    ``last_update = -1``): ``first_update_step``, ``updates_to_zero``, ``alpha_zero_step`` (None
    when the schedule ends first, or after more than a million updates) and ``steps`` (the
    schedule's window, end - begin + 1; None without an end)."""
    begin, end = int(values["begin_compression_step"]), int(values["end_compression_step"])
    frequency = int(values["compression_frequency"])
    updates = updates_to_zero(float(values["alpha_decrement_value"]))
    first = max(begin, frequency - 1)
    zero = None if updates is None else first + (updates - 1) * frequency
    if zero is not None and end != -1 and zero > end:
        zero = None
    return {"first_update_step": first, "updates_to_zero": updates, "alpha_zero_step": zero,
            "steps": None if end == -1 else end - begin + 1}
