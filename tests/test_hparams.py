"""The reference's hyperparameters: names, defaults, the hparams string, validation."""

from __future__ import annotations

import pytest

from graphrewrite import hparams
from graphrewrite.errors import UsageError

CIFAR = ("name=cifar10_compression,alpha_decrement_value=0.005,begin_compression_step=40000,"
         "end_compression_step=100000,compression_frequency=100,compression_option=1,use_tpu=True,"
         "update_option=0,rank=200")


def test_defaults_are_the_reference_compression_op_defaults():
    d = hparams.resolve()
    assert d["name"] == "model_compression"
    assert d["alpha_decrement_value"] == 0.01
    assert d["begin_compression_step"] == 0
    assert d["end_compression_step"] == -1
    assert d["compression_frequency"] == 10
    assert d["use_tpu"] is False
    assert d["compression_option"] == 1
    assert d["rank"] == 7  # the op default; the compressor's 100 is not the op's
    assert d["update_option"] == 0
    assert d["block_size"] == 1 and d["pruning_fraction"] == 0.0
    assert d["add_summary"] is True
    assert d["input_block_size"] == 32 and d["block_method"] == "loop"


def test_cifar_string_is_accepted_verbatim():
    d = hparams.resolve(CIFAR)
    assert d["name"] == "cifar10_compression"
    assert d["alpha_decrement_value"] == 0.005
    assert (d["begin_compression_step"], d["end_compression_step"]) == (40000, 100000)
    assert d["compression_frequency"] == 100 and d["rank"] == 200
    assert d["use_tpu"] is True and d["compression_option"] == 1 and d["update_option"] == 0


def test_string_round_trip():
    d = hparams.resolve(CIFAR, {"block_size": "4"})
    assert hparams.resolve(hparams.to_string(d)) == d


def test_options_override_the_string():
    d = hparams.resolve(CIFAR, {"rank": "400", "use_tpu": "false"})
    assert d["rank"] == 400 and d["use_tpu"] is False


def test_enum_fields_parse_from_strings_and_names():
    # The reference's HParams.parse raised on these (IntEnum defaults); here they parse.
    assert hparams.resolve("compression_option=9")["compression_option"] == 9
    assert hparams.resolve("update_option=PYTHON_UPDATE")["update_option"] == 1


@pytest.mark.parametrize("text, message", [
    ("rank=200,colour=blue", "unknown hyperparameter 'colour'"),
    ("rank=two", "rank: 'two' is not an integer"),
    ("use_tpu=maybe", "use_tpu: 'maybe' is not a boolean"),
    ("alpha_decrement_value=x", "alpha_decrement_value: 'x' is not a number"),
    ("compression_option=5", "compression_option: '5' is not one of"),
    ("update_option=7", "update_option: '7' is not one of"),
    ("rank", "'rank' is not of the form key=value"),
    ("rank=1,rank=2", "'rank' is given twice"),
    ("rank=0", "rank must be a positive integer"),
    ("rank=-5", "rank must be a positive integer"),
    ("begin_compression_step=-1", "begin_compression_step must be >= 0"),
    ("begin_compression_step=10,end_compression_step=5", "end_compression_step must be -1"),
    ("compression_frequency=0", "compression_frequency must be >= 1"),
    ("alpha_decrement_value=0", "alpha_decrement_value must be in (0, 1]"),
    ("block_method=spiral", "block_method must be 'loop' or 'mask'"),
])
def test_bad_values_are_one_line_errors_naming_the_key(text, message):
    with pytest.raises(UsageError) as err:
        hparams.resolve(text)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_every_hparam_has_help_and_a_typed_default():
    for p in hparams.HPARAMS:
        assert p.help and p.type in (int, float, bool, str)
